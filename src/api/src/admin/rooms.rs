//! Rooms: `/_synapse/admin/v1/rooms...`, blocking, joining users, room admins, shutdown.

use std::sync::Arc;

use axum::{
    Router,
    body::Bytes,
    extract::{Path, RawQuery, State},
    http::request::Parts,
    response::Response,
    routing::{get, post},
};
use ruma::api::client::filter::RoomEventFilter;
use ruma::{OwnedServerName, OwnedUserId, RoomId, RoomOrAliasId, UserId};
use serde::Deserialize;
use serde_json::{Value, json};
use trellis_core::{Error, Result};
use trellis_service::{
    admin::{media as admin_media, rooms},
    rooms::{
        blocks,
        history::{self, MessagesQuery},
    },
};

use super::{Params, admin_caller, next_from, page, parse_body, respond, to_json, yes};
use crate::AppState;

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    router
        .route("/_synapse/admin/v1/rooms", get(list))
        .route("/_synapse/admin/v1/rooms/{room_id}", get(show).delete(delete_v1))
        .route("/_synapse/admin/v2/rooms/{room_id}", axum::routing::delete(delete_v2))
        .route("/_synapse/admin/v2/rooms/{room_id}/delete_status", get(delete_status_of_room))
        .route("/_synapse/admin/v2/rooms/delete_status/{delete_id}", get(delete_status))
        .route("/_synapse/admin/v1/rooms/{room_id}/members", get(members))
        .route("/_synapse/admin/v1/rooms/{room_id}/state", get(state))
        .route("/_synapse/admin/v1/rooms/{room_id}/messages", get(messages))
        .route("/_synapse/admin/v1/rooms/{room_id}/timestamp_to_event", get(timestamp_to_event))
        .route("/_synapse/admin/v1/rooms/{room_id}/block", get(get_block).put(set_block))
        .route("/_synapse/admin/v1/rooms/{room_id}/make_room_admin", post(make_room_admin))
        .route(
            "/_synapse/admin/v1/rooms/{room_id}/forward_extremities",
            get(extremities).delete(trim_extremities),
        )
        .route("/_synapse/admin/v1/statistics/database/rooms", get(largest))
        .route("/_synapse/admin/v1/join/{room_id}", post(join))
        .route("/_synapse/admin/v1/room/{room_id}/media", get(media))
}

const ROOM_ORDERS: &[&str] = &[
    "name",
    "alphabetical",
    "size",
    "canonical_alias",
    "joined_members",
    "joined_local_members",
    "version",
    "creator",
    "encryption",
    "federatable",
    "public",
    "join_rules",
    "guest_access",
    "history_visibility",
    "state_events",
];

/// GET /_synapse/admin/v1/rooms
async fn list(State(s): State<AppState>, RawQuery(q): RawQuery) -> Response {
    respond((|| {
        let params = Params::parse(q);
        let paging = params.paging(100)?;
        let order = match params.order_by(ROOM_ORDERS, "name")? {
            "alphabetical" => "name",
            "size" => "joined_members",
            other => other,
        };
        let largest_first =
            matches!(order, "joined_members" | "joined_local_members" | "state_events");
        let search = params.term("search_term")?;
        let found =
            rooms::list(&s, search, params.bool("public_rooms")?, params.bool("empty_rooms")?)?;
        let items = found.into_iter().map(to_json).collect::<Result<_>>()?;
        let (rooms, total) = page(items, order, "room_id", largest_first, paging);
        let mut body = json!({"offset": paging.from, "total_rooms": total});
        if let Some(next) = next_from(paging, rooms.len(), total) {
            body["next_batch"] = json!(next);
        }
        if paging.from > 0 {
            body["prev_batch"] = json!(paging.from.saturating_sub(paging.limit));
        }
        body["rooms"] = Value::Array(rooms);
        Ok(body)
    })())
}

fn room_id(raw: &str) -> Result<&RoomId> {
    <&RoomId>::try_from(raw)
        .map_err(|_| Error::invalid_param(format!("{raw} is not a legal room ID")))
}

/// GET /_synapse/admin/v1/rooms/{roomId}
async fn show(State(s): State<AppState>, Path(id): Path<String>) -> Response {
    respond(rooms::details(&s, &id).and_then(to_json))
}

/// GET /_synapse/admin/v1/rooms/{roomId}/members
async fn members(State(s): State<AppState>, Path(id): Path<String>) -> Response {
    respond(rooms::members(&s, &id).map(|m| json!({"total": m.len(), "members": m})))
}

fn client_event(pdu: &trellis_service::rooms::pdu::Pdu) -> Value {
    let mut event = trellis_service::realtime::sync::sync_event(pdu);
    if let Some(room) = &pdu.room_id {
        event["room_id"] = json!(room);
    }
    event
}

/// GET /_synapse/admin/v1/rooms/{roomId}/state
async fn state(
    State(s): State<AppState>,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Response {
    respond((|| {
        let params = Params::parse(q);
        let state = rooms::state(&s, &id, params.str("type"))?;
        Ok(json!({"state": state.iter().map(client_event).collect::<Vec<_>>()}))
    })())
}

/// GET /_synapse/admin/v1/rooms/{roomId}/messages: the room's history as `/messages`
/// pages it, all of it, whatever the admin's membership.
async fn messages(
    State(s): State<AppState>,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Response {
    respond(
        async {
            let params = Params::parse(q);
            room_id(&id)?;
            rooms::details(&s, &id)?;
            let filter: RoomEventFilter = match params.str("filter") {
                Some(f) => serde_json::from_str(f)
                    .map_err(|_| Error::invalid_param("filter is not a room event filter"))?,
                None => RoomEventFilter::default(),
            };
            let token = |name: &str| params.str(name).map(history::parse_token).transpose();
            let query = MessagesQuery {
                room_id: &id,
                backward: params.str("dir") == Some("b"),
                from: token("from")?,
                to: token("to")?,
                limit: usize::try_from(params.u64("limit")?.unwrap_or(10))
                    .unwrap_or(1000)
                    .min(1000),
                filter: &filter,
            };
            // Admins see every message but those retention expired, as every reader.
            let expired_before = s.rooms.expired_before(&id)?;
            let sees = move |_: u64, pdu: &trellis_service::rooms::Pdu| {
                !trellis_service::rooms::Rooms::is_expired(pdu, expired_before)
            };
            let page = history::messages(&s, query, &sees).await?;
            let mut body = json!({
                "start": history::token(page.start),
                "chunk": page.events.iter().map(|(_, pdu)| client_event(pdu)).collect::<Vec<_>>(),
            });
            if let Some(end) = page.end {
                body["end"] = json!(history::token(end));
            }
            Ok(body)
        }
        .await,
    )
}

/// GET /_synapse/admin/v1/rooms/{roomId}/timestamp_to_event
async fn timestamp_to_event(
    State(s): State<AppState>,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Response {
    respond((|| {
        let params = Params::parse(q);
        let ts = params.u64("ts")?.ok_or_else(|| Error::missing_param("Missing ts"))?;
        let forward = !params.paging(1)?.backwards;
        let (_, pdu) = s
            .rooms
            .event_near_time(&id, ts, forward, |_, _| Ok(true))?
            .ok_or_else(|| Error::not_found("No event found"))?;
        Ok(json!({"event_id": pdu.event_id, "origin_server_ts": pdu.origin_server_ts}))
    })())
}

/// GET /_synapse/admin/v1/rooms/{roomId}/block
async fn get_block(State(s): State<AppState>, Path(id): Path<String>) -> Response {
    respond(room_id(&id).and_then(|room| {
        Ok(match blocks::blocked_by(&s, room.as_str())? {
            Some(admin) => json!({"block": true, "user_id": admin}),
            None => json!({"block": false}),
        })
    }))
}

#[derive(Deserialize)]
struct BlockBody {
    block: Option<bool>,
}

/// PUT /_synapse/admin/v1/rooms/{roomId}/block
async fn set_block(
    State(s): State<AppState>,
    parts: Parts,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    respond(
        async {
            let (admin, client) = admin_caller(&parts)?;
            let room = room_id(&id)?;
            let body: BlockBody = parse_body(&body)?;
            let block = body.block.ok_or_else(|| Error::missing_param("Missing block"))?;
            rooms::set_blocked(&s, &admin, room, block, &client).await?;
            Ok(json!({"block": block}))
        }
        .await,
    )
}

#[derive(Deserialize)]
struct UserBody {
    user_id: Option<OwnedUserId>,
}

/// The room an id or alias names.
fn resolve(s: &AppState, raw: &str) -> Result<ruma::OwnedRoomId> {
    let target = <&RoomOrAliasId>::try_from(raw)
        .map_err(|_| Error::invalid_param(format!("{raw} is not a legal room ID or alias")))?;
    match <&RoomId>::try_from(target.as_str()) {
        Ok(room) => Ok(room.to_owned()),
        Err(_) => s
            .aliases
            .resolve(raw)?
            .and_then(|a| RoomId::parse(a.room_id).ok())
            .ok_or_else(|| Error::not_found("Unknown room alias")),
    }
}

/// POST /_synapse/admin/v1/rooms/{roomIdOrAlias}/make_room_admin
async fn make_room_admin(
    State(s): State<AppState>,
    parts: Parts,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    respond(
        async {
            let (admin, _) = admin_caller(&parts)?;
            let body: UserBody = parse_body(&body)?;
            let room = resolve(&s, &id)?;
            let target = match body.user_id {
                Some(user) => user,
                None => UserId::parse(s.accounts.user_id(&admin))
                    .map_err(|e| Error::internal("user id", e))?,
            };
            rooms::make_room_admin(&s, &room, &target).await?;
            Ok(json!({}))
        }
        .await,
    )
}

/// GET /_synapse/admin/v1/rooms/{roomIdOrAlias}/forward_extremities
async fn extremities(State(s): State<AppState>, Path(id): Path<String>) -> Response {
    respond((|| {
        let room = resolve(&s, &id)?;
        let results: Vec<Value> = s
            .rooms
            .extremities(room.as_str())?
            .into_iter()
            .map(|event_id| {
                let depth =
                    s.rooms.cached_event(event_id.as_str()).ok().flatten().map(|e| e.pdu.depth);
                json!({"event_id": event_id, "depth": depth})
            })
            .collect();
        Ok(json!({"count": results.len(), "results": results}))
    })())
}

/// DELETE /_synapse/admin/v1/rooms/{roomIdOrAlias}/forward_extremities: keeps the
/// deepest one.
async fn trim_extremities(State(s): State<AppState>, Path(id): Path<String>) -> Response {
    respond(
        async {
            let room = resolve(&s, &id)?;
            Ok(json!({"deleted": s.timeline.trim_extremities(room.as_str()).await?}))
        }
        .await,
    )
}

/// GET /_synapse/admin/v1/statistics/database/rooms: the ten largest rooms.
async fn largest(State(s): State<AppState>) -> Response {
    respond(rooms::largest(&s, 10).and_then(to_json).map(|rooms| json!({"rooms": rooms})))
}

/// POST /_synapse/admin/v1/join/{roomIdOrAlias}
async fn join(
    State(s): State<AppState>,
    parts: Parts,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
    body: Bytes,
) -> Response {
    respond(
        async {
            let (admin, _) = admin_caller(&parts)?;
            let body: UserBody = parse_body(&body)?;
            let user = body.user_id.ok_or_else(|| Error::missing_param("Missing user_id"))?;
            let target = <&RoomOrAliasId>::try_from(id.as_str()).map_err(|_| {
                Error::invalid_param(format!("{id} is not a legal room ID or alias"))
            })?;
            let via: Vec<OwnedServerName> = Params::parse(q)
                .all("server_name")
                .into_iter()
                .filter_map(|s| OwnedServerName::try_from(s).ok())
                .collect();
            let admin = UserId::parse(s.accounts.user_id(&admin))
                .map_err(|e| Error::internal("user id", e))?;
            let room = rooms::force_join(&s, &admin, target, &via, &user).await?;
            Ok(json!({"room_id": room}))
        }
        .await,
    )
}

/// GET /_synapse/admin/v1/room/{roomId}/media
async fn media(State(s): State<AppState>, Path(id): Path<String>) -> Response {
    respond(rooms::media(&s, &id).map(|(local, remote)| json!({"local": local, "remote": remote})))
}

/// The body of a room deletion.
#[derive(Deserialize)]
struct DeleteBody {
    new_room_user_id: Option<OwnedUserId>,
    room_name: Option<String>,
    message: Option<String>,
    #[serde(default)]
    block: bool,
    #[serde(default = "yes")]
    purge: bool,
    #[serde(default)]
    force_purge: bool,
}

fn shutdown_request(body: &Bytes) -> Result<(rooms::Shutdown, bool, bool)> {
    if body.is_empty() {
        return Err(Error::bad_json("The body must be a JSON object (at least {})"));
    }
    let body: DeleteBody = parse_body(body)?;
    let request = rooms::Shutdown {
        new_room_user_id: body.new_room_user_id,
        room_name: body.room_name.unwrap_or_else(|| "Content Violation Notification".to_owned()),
        message: body.message.unwrap_or_else(|| {
            "Sharing illegal content on this server is not permitted and rooms in violation \
             will be blocked."
                .to_owned()
        }),
        block: body.block,
    };
    Ok((request, body.purge, body.force_purge))
}

/// DELETE /_synapse/admin/v1/rooms/{roomId}: shuts the room down and answers when done.
async fn delete_v1(
    State(s): State<AppState>,
    parts: Parts,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    respond(
        async {
            let (admin, client) = admin_caller(&parts)?;
            let room = room_id(&id)?;
            let (request, purge, force) = shutdown_request(&body)?;
            let result = rooms::delete(&s, &admin, room, &request, purge, force, &client).await?;
            to_json(result)
        }
        .await,
    )
}

/// DELETE /_synapse/admin/v2/rooms/{roomId}: starts the shutdown and answers at once
/// with an id to follow it by.
async fn delete_v2(
    State(s): State<AppState>,
    parts: Parts,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    respond(
        async {
            let (admin, client) = admin_caller(&parts)?;
            let room = room_id(&id)?.to_owned();
            let (request, purge, force) = shutdown_request(&body)?;
            let delete_id =
                rooms::start_delete(Arc::clone(&s), admin, room, request, purge, force, client)
                    .await?;
            Ok(json!({"delete_id": delete_id}))
        }
        .await,
    )
}

/// GET /_synapse/admin/v2/rooms/{roomId}/delete_status
async fn delete_status_of_room(State(s): State<AppState>, Path(id): Path<String>) -> Response {
    respond(room_id(&id).and_then(|room| {
        let results = rooms::deletions_of(&s, room.as_str())?;
        if results.is_empty() {
            return Err(Error::not_found("No deletion of this room"));
        }
        Ok(json!({"results": to_json(results)?}))
    }))
}

/// GET /_synapse/admin/v2/rooms/delete_status/{deleteId}
async fn delete_status(State(s): State<AppState>, Path(id): Path<String>) -> Response {
    respond(rooms::deletion(&s, &id).and_then(to_json))
}

/// Used by the media module: quarantine every item a room's events name.
pub(super) async fn quarantine_room_media(s: &AppState, admin: &str, id: &str) -> Result<usize> {
    let (local, remote) = rooms::media(s, id)?;
    let admin = s.accounts.user_id(admin);
    let uris: Vec<String> = local.into_iter().chain(remote).collect();
    admin_media::quarantine_uris(s, &admin, &uris).await
}
