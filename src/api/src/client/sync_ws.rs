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
use trellis_service::{Client, accounts::Session, sync};

use crate::{AppState, response::ApiError};

pub const PATH: &str = "/_trellis/client/v1/sync";

/// How often the server pings an idle socket, so proxies keep it open and dead peers
/// are noticed.
const PING_EVERY: Duration = Duration::from_secs(30);

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    router.route(PATH, get(upgrade))
}

struct Params {
    since: Option<u64>,
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
    let since = q.get("since").map(|t| super::history::parse_token(t)).transpose()?;
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
    ws.on_upgrade(move |socket| async move {
        let span = tracing::debug_span!("sync_ws", user = %session.localpart);
        let _ =
            tracing::Instrument::instrument(stream(services, session, token, params, socket), span)
                .await;
    })
}

/// Sends a batch whenever there is one; answers pings; ends when the client leaves or
/// its token stops being valid (logout).
async fn stream(
    services: AppState,
    session: Session,
    token: String,
    params: Params,
    mut socket: WebSocket,
) -> Result<()> {
    let user_id = services.accounts.user_id(&session.localpart);
    let stream = services.rooms.stream.clone();
    let mut since = params.since;
    let mut full_state = params.full_state;
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.tick().await;
    loop {
        if services.accounts.authenticate(&token, &Client::from_ip(None)).await.is_err() {
            let _ = socket.send(Message::Close(None)).await;
            return Ok(());
        }
        let waiting = sync::subscribe(&services, &user_id)?;
        let now = stream.visible().max(since.unwrap_or(0));
        let request = sync::SyncRequest {
            user_id: &user_id,
            localpart: &session.localpart,
            since,
            full_state,
            filter: &params.filter,
            use_state_after: params.use_state_after,
        };
        let built = sync::build(&services, &request, now)?;
        if built.has_updates || since.is_none() || full_state {
            let text =
                serde_json::to_string(&built.body).map_err(|e| Error::internal("sync json", e))?;
            if socket.send(Message::Text(text.into())).await.is_err() {
                return Ok(());
            }
            since = Some(now);
            full_state = false;
        }
        tokio::select! {
            () = waiting.woken() => {}
            incoming = socket.recv() => match incoming {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return Ok(()),
                // Pings are answered by the WebSocket layer; other messages are ignored.
                Some(Ok(_)) => {}
            },
            _ = ping.tick() => {
                if socket.send(Message::Ping(Vec::new().into())).await.is_err() {
                    return Ok(());
                }
            }
        }
    }
}
