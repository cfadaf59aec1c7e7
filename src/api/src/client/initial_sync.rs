//! The deprecated reads older clients and bots still call: `GET /initialSync`,
//! `GET /rooms/{roomId}/initialSync`, the `GET /events` stream and `GET /events/{eventId}`.

use axum::{
    Router,
    extract::{Path, RawQuery},
    response::{IntoResponse, Response},
    routing::get,
};
use http::StatusCode;
use ruma::{
    OwnedRoomId, RoomId, api::client::room::Visibility, events::room::member::MembershipState,
};
use serde_json::{Value, json};
use trellis_core::{Error, Result};
use trellis_service::{
    realtime::{events_stream, initial, sync::SyncToken},
    rooms::{Pdu, history},
};

use super::events::{Viewer, client_event, user};
use crate::{
    AppState,
    response::{ApiError, json_response},
    ruma_route::{Authenticated, Ctx},
};

/// Events per room when the client names no limit.
const DEFAULT_LIMIT: usize = 20;

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let mut router = router;
    for version in ["r0", "v3"] {
        let room = format!("/_matrix/client/{version}/rooms/{{room_id}}/initialSync");
        router = router
            .route(&room, get(room_initial_sync))
            .route(&format!("/_matrix/client/{version}/initialSync"), get(initial_sync))
            .route(&format!("/_matrix/client/{version}/events"), get(events))
            .route(&format!("/_matrix/client/{version}/events/{{event_id}}"), get(event));
    }
    router
}

/// GET /_matrix/client/v3/rooms/{roomId}/initialSync
async fn room_initial_sync(
    Authenticated(ctx): Authenticated,
    Path(room_id): Path<String>,
) -> Response {
    let answer = async {
        let room_id =
            OwnedRoomId::try_from(room_id).map_err(|_| Error::invalid_param("Not a room id"))?;
        room_json(&ctx, &room_id, DEFAULT_LIMIT).await
    };
    respond(answer.await)
}

/// GET /_matrix/client/v3/initialSync
async fn initial_sync(Authenticated(ctx): Authenticated, RawQuery(query): RawQuery) -> Response {
    let answer = async {
        if ctx.session()?.guest {
            return Err(Error::guest_forbidden());
        }
        let limit = param(query.as_deref(), "limit")
            .map(|v| v.parse::<usize>().map_err(|_| Error::invalid_param("Invalid limit")))
            .transpose()?
            .unwrap_or(DEFAULT_LIMIT);
        let end = SyncToken { position: ctx.services.rooms.stream.visible(), to_device: 0 };
        let user_id = user(&ctx)?;
        let joined = ctx.services.rooms.joined_rooms(&user_id)?;
        let mut rooms = Vec::new();
        for room in &joined {
            rooms.push(room_json(&ctx, room, limit).await?);
        }
        rooms.extend(initial::invites(&ctx.services, user_id.as_str())?);
        if param(query.as_deref(), "archived").as_deref() == Some("true") {
            let left = ctx.services.rooms.rooms_of(user_id.as_str(), &MembershipState::Leave)?;
            for room in left.iter().filter_map(|r| RoomId::parse(r).ok()) {
                rooms.push(room_json(&ctx, &room, limit).await?);
            }
        }
        let presence = initial::presence(&ctx.services, user_id.as_str(), &joined)?;
        let localpart = &ctx.session()?.localpart;
        let account_data: Vec<Value> = ctx
            .services
            .account_data
            .changed_since(localpart, 0)?
            .into_iter()
            .filter(|(room, _, _)| room.is_none())
            .map(|(_, kind, content)| json!({"type": kind, "content": content}))
            .collect();
        Ok(json!({
            "end": end.render(),
            "rooms": rooms,
            "presence": presence,
            "account_data": account_data,
        }))
    };
    respond(answer.await)
}

/// GET /_matrix/client/v3/events
async fn events(Authenticated(ctx): Authenticated, RawQuery(query): RawQuery) -> Response {
    let answer = async {
        let param = |name: &str| param(query.as_deref(), name);
        let timeout_ms = match param("timeout") {
            Some(t) => t.parse::<u64>().map_err(|_| Error::invalid_param("Invalid timeout"))?,
            None => 0,
        };
        let timeout = std::time::Duration::from_millis(timeout_ms.min(MAX_TIMEOUT_MS));
        let from = param("from");
        let session = ctx.session()?;
        let page = match param("room_id") {
            Some(room) => {
                let room_id =
                    RoomId::parse(&room).map_err(|_| Error::invalid_param("Bad room id"))?;
                events_stream::peek(&ctx.services, session, &room_id, from.as_deref(), timeout)
                    .await?
            }
            None => events_stream::events(&ctx.services, session, from.as_deref(), timeout).await?,
        };
        Ok(json!({"chunk": page.chunk, "start": page.start, "end": page.end}))
    };
    respond(answer.await)
}

/// The longest a `/events` request is held, as for `/sync`.
const MAX_TIMEOUT_MS: u64 = 120_000;

/// GET /_matrix/client/v3/events/{eventId}
async fn event(Authenticated(ctx): Authenticated, Path(event_id): Path<String>) -> Response {
    let answer = async {
        let not_found = || Error::not_found("Event not found");
        let stored = ctx.services.rooms.cached_event(&event_id)?.ok_or_else(not_found)?;
        let room_id = stored.pdu.room_id.clone().ok_or_else(not_found)?;
        let viewer = Viewer::new(&ctx, room_id.as_str()).map_err(|_| not_found())?;
        let (_, pdu) = viewer.event(&event_id)?;
        viewer.render(&pdu)
    };
    respond(answer.await)
}

/// A query parameter, decoded.
fn param(query: Option<&str>, name: &str) -> Option<String> {
    form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// One room as the initial sync endpoints show it: state, latest events (oldest first,
/// with tokens for `/messages`), membership and directory visibility.
async fn room_json(ctx: &Ctx, room_id: &RoomId, limit: usize) -> Result<Value> {
    let viewer = Viewer::new(ctx, room_id.as_str())?;
    let sees = |position: u64, pdu: &Pdu| viewer.sees(position, pdu);
    let snapshot = history::snapshot(&ctx.services, &user(ctx)?, room_id, limit, &sees).await?;
    let page = &snapshot.messages;
    let chunk: Vec<Value> =
        page.events.iter().rev().map(|(_, pdu)| viewer.render(pdu)).collect::<Result<_>>()?;
    let oldest = page.events.last().map_or(page.start, |(position, _)| *position);
    let state: Vec<Value> =
        snapshot.state.iter().map(|pdu| client_event(pdu, room_id.as_str())).collect();
    let visibility = if snapshot.published { Visibility::Public } else { Visibility::Private };
    let membership = snapshot.membership.unwrap_or(MembershipState::Leave);
    Ok(json!({
        "room_id": room_id,
        "membership": membership,
        "messages": {
            "chunk": chunk,
            "start": history::token(page.end.unwrap_or(oldest)),
            "end": history::token(page.start),
        },
        "state": state,
        "visibility": visibility,
        "account_data": [],
    }))
}

fn respond(answer: Result<Value>) -> Response {
    match answer {
        Ok(body) => json_response(StatusCode::OK, body.to_string().into_bytes()),
        Err(e) => ApiError(e).into_response(),
    }
}
