//! A WebSocket carrying `/sync` (a Trellis extension, see docs/websocket.md): one JSON
//! text message per sync batch, the same query parameters as `/sync`, resumable by
//! reconnecting with the last `next_batch` as `since`.

use std::{collections::HashMap, time::Duration};

use axum::{
    Router,
    extract::{
        Query, State,
        ws::{Message, WebSocket, WebSocketUpgrade},
    },
    http::HeaderMap,
    response::{IntoResponse, Response},
    routing::get,
};
use ruma::api::client::filter::FilterDefinition;
use trellis_core::{Error, Result};
use trellis_service::{
    Client,
    accounts::Session,
    realtime::{live, sync},
};

use crate::{AppState, response::ApiError};

pub const PATH: &str = "/_trellis/client/v1/sync";

/// The WebSocket read buffer a stream starts with.
const READ_BUFFER: usize = 4096;

/// How often the server pings an idle socket, so proxies keep it open and dead peers
/// are noticed.
const PING_EVERY: Duration = Duration::from_secs(30);

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    router.route(PATH, get(upgrade))
}

struct Params {
    since: Option<sync::SyncToken>,
    filter: FilterDefinition,
    full_state: bool,
    use_state_after: bool,
}

fn bearer(headers: &HeaderMap, query: &HashMap<String, String>) -> Option<String> {
    headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned)
        // Browsers cannot set headers on a WebSocket: the query parameter is the way.
        .or_else(|| query.get("access_token").cloned())
}

fn params(services: &AppState, session: &Session, q: &HashMap<String, String>) -> Result<Params> {
    let since = q.get("since").map(|t| super::sync::parse_since(t)).transpose()?;
    let filter = match q.get("filter") {
        None => FilterDefinition::default(),
        Some(f) => services.filters.resolve(&session.localpart, f)?,
    };
    let flag = |name: &str| q.get(name).is_some_and(|v| v == "true");
    Ok(Params {
        since,
        filter,
        full_state: flag("full_state"),
        use_state_after: flag("use_state_after"),
    })
}

/// GET /_trellis/client/v1/sync (upgraded to a WebSocket)
async fn upgrade(
    State(services): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let Some(token) = bearer(&headers, &query) else {
        return ApiError(Error::missing_token()).into_response();
    };
    let session = match services.accounts.authenticate(&token, &Client::from_ip(None)).await {
        Ok(s) => s,
        Err(e) => return ApiError(e).into_response(),
    };
    let params = match params(&services, &session, &query) {
        Ok(p) => p,
        Err(e) => return ApiError(e).into_response(),
    };
    // tungstenite's default read buffer is 128 KiB, zero-filled at the first read: a
    // stream that has seen one pong held it for its life (160 KB per connection in all).
    // What clients send here is pings, pongs and small control messages; a larger
    // message still grows the buffer as it needs.
    ws.read_buffer_size(READ_BUFFER).on_upgrade(move |socket| async move {
        let span = tracing::debug_span!("sync_ws", user = %session.localpart);
        let _ =
            tracing::Instrument::instrument(stream(services, session, token, params, socket), span)
                .await;
    })
}

/// Sends a batch whenever there is one; answers pings; ends when the client leaves or
/// its token stops being valid (logout).
///
/// To-device messages are deleted once the client has surely received them: a pong to a
/// ping sent after a batch proves the batch arrived (frames are ordered), as does
/// reconnecting with a later `since`.
async fn stream(
    services: AppState,
    session: Session,
    token: String,
    params: Params,
    mut socket: WebSocket,
) -> Result<()> {
    let user_id = services.accounts.user_id(&session.localpart);
    if let Some(since) = params.since {
        let (localpart, device) = (&session.localpart, &session.device_id);
        services.e2ee.ack_to_device(localpart, device, since.to_device).await?;
    }
    let request = sync::SyncRequest {
        user_id: &user_id,
        localpart: &session.localpart,
        device_id: &session.device_id,
        since: params.since.map(|t| t.position),
        to_device_since: params.since.map_or(0, |t| t.to_device),
        full_state: params.full_state,
        filter: &params.filter,
        use_state_after: params.use_state_after,
    };
    let mut live = sync::LiveSync::new(&services, request)?;
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.tick().await;
    // The token is checked before each answer (a logout wakes the stream with its
    // device-list change, and ends it instead of being sent) and after each ping, pong
    // or message from the client.
    let signed_out =
        async || services.accounts.authenticate(&token, &Client::from_ip(None)).await.is_err();
    loop {
        let answered = tokio::select! {
            built = live::wait(&services, &mut live, None) => {
                let built = built?;
                if signed_out().await {
                    let _ = socket.send(Message::Close(None)).await;
                    return Ok(());
                }
                let text = serde_json::to_string(&built.body)
                    .map_err(|e| Error::internal("sync json", e))?;
                if socket.send(Message::Text(text.into())).await.is_err() {
                    return Ok(());
                }
                let delivered = built.token.to_device;
                if delivered > live.request.to_device_since && built.has_to_device {
                    // Ask for a pong at once so the delivered messages can go.
                    if socket.send(ping_covering(delivered)).await.is_err() {
                        return Ok(());
                    }
                }
                live.answered(built);
                true
            }
            incoming = socket.recv() => match incoming {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return Ok(()),
                Some(Ok(Message::Pong(payload))) => {
                    // The pong echoes the position its ping covered.
                    if let Ok(bytes) = <[u8; 8]>::try_from(&payload[..]) {
                        let upto = u64::from_be_bytes(bytes).min(live.request.to_device_since);
                        let (lp, device) = (&session.localpart, &session.device_id);
                        services.e2ee.ack_to_device(lp, device, upto).await?;
                    }
                    false
                }
                // Pings are answered by the WebSocket layer; other messages are ignored.
                Some(Ok(_)) => false,
            },
            _ = ping.tick() => {
                if socket.send(ping_covering(live.request.to_device_since)).await.is_err() {
                    return Ok(());
                }
                false
            }
        };
        if !answered && signed_out().await {
            let _ = socket.send(Message::Close(None)).await;
            return Ok(());
        }
    }
}

/// A ping whose pong proves the client received every batch up to to-device position
/// `upto` (the position rides in the payload, which the pong echoes).
fn ping_covering(upto: u64) -> Message {
    Message::Ping(upto.to_be_bytes().to_vec().into())
}
