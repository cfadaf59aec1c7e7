//! Rooms: creating them, sending events and reading their current state.

use axum::Router;
use ruma::events::room::member::MembershipState;
use ruma::{
    OwnedRoomId, OwnedUserId,
    api::client::{
        message::send_message_event,
        redact::redact_event,
        room::{create_room, upgrade_room},
        state::{get_state_event_for_key, get_state_events, send_state_event},
    },
};
use serde_json::json;
use trellis_core::{Error, Result};
use trellis_service::rooms::{
    append::{NewEvent, Txn},
    create::CreateRoomRequest,
    upgrade,
};

pub(super) use super::events::require_joined;
use super::events::{client_event, me, raw_value, to_raw};
use crate::{
    AppState,
    ruma_route::{self, Ctx},
};

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = ruma_route::add::<create_room::v3::Request, _, _>(router, create);
    let router = ruma_route::add::<send_message_event::v3::Request, _, _>(router, send);
    let router = ruma_route::add::<send_state_event::v3::Request, _, _>(router, put_state);
    let router =
        ruma_route::add::<get_state_event_for_key::v3::Request, _, _>(router, get_state_key);
    let router = ruma_route::add::<get_state_events::v3::Request, _, _>(router, get_state);
    let router = ruma_route::add::<upgrade_room::v3::Request, _, _>(router, upgrade);
    ruma_route::add::<redact_event::v3::Request, _, _>(router, redact)
}

/// PUT /_matrix/client/v3/rooms/{roomId}/redact/{eventId}/{txnId}
async fn redact(ctx: Ctx, req: redact_event::v3::Request) -> Result<redact_event::v3::Response> {
    let sender = require_joined(&ctx, req.room_id.as_str())?;
    let session = ctx.session()?;
    let mut content = json!({});
    if let Some(reason) = &req.reason {
        content["reason"] = json!(reason);
    }
    let event = NewEvent {
        kind: "m.room.redaction".into(),
        sender,
        state_key: None,
        content,
        txn: Some(Txn {
            localpart: session.localpart.clone(),
            device_id: session.device_id.clone(),
            txn_id: format!("redact:{}", req.txn_id),
        }),
        redacts: Some(req.event_id.to_string()),
    };
    let pdu = ctx.services.timeline.append(req.room_id.as_str(), event).await?;
    Ok(redact_event::v3::Response::new(pdu.event_id))
}

/// POST /_matrix/client/v3/createRoom
async fn create(ctx: Ctx, req: create_room::v3::Request) -> Result<create_room::v3::Response> {
    let creator = OwnedUserId::try_from(me(&ctx)?).map_err(|e| Error::internal("user id", e))?;
    let mut initial_state = Vec::new();
    for raw in &req.initial_state {
        let ev = raw_value(raw)?;
        let kind = ev["type"]
            .as_str()
            .ok_or_else(|| Error::bad_json("initial_state event lacks a type"))?;
        let key = ev["state_key"].as_str().unwrap_or("");
        initial_state.push((kind.to_owned(), key.to_owned(), ev["content"].clone()));
    }
    let request = CreateRoomRequest {
        alias_name: req.room_alias_name,
        public: req.visibility == ruma::api::client::room::Visibility::Public,
        preset: req.preset.as_ref().map(|p| p.to_string()),
        name: req.name,
        topic: req.topic,
        invite: req.invite,
        is_direct: req.is_direct,
        initial_state,
        power_level_override: req
            .power_level_content_override
            .as_ref()
            .map(raw_value)
            .transpose()?,
        version: req.room_version.as_ref().map(|v| v.to_string()),
        creation_content: req.creation_content.as_ref().map(raw_value).transpose()?,
    };
    let room_id =
        trellis_service::rooms::create::create_room(&ctx.services, &creator, request).await?;
    Ok(create_room::v3::Response::new(room_id))
}

/// PUT /_matrix/client/v3/rooms/{roomId}/send/{eventType}/{txnId}
async fn send(
    ctx: Ctx,
    req: send_message_event::v3::Request,
) -> Result<send_message_event::v3::Response> {
    ctx.rate_limit(trellis_service::ratelimit::Class::Message)?;
    let sender = require_joined(&ctx, req.room_id.as_str())?;
    let session = ctx.session()?;
    let event = NewEvent {
        kind: req.event_type.to_string(),
        sender,
        state_key: None,
        content: raw_value(&req.body)?,
        txn: Some(Txn {
            localpart: session.localpart.clone(),
            device_id: session.device_id.clone(),
            txn_id: req.txn_id.to_string(),
        }),
        redacts: None,
    };
    let pdu = ctx.services.timeline.append(req.room_id.as_str(), event).await?;
    Ok(send_message_event::v3::Response::new(pdu.event_id))
}

/// PUT /_matrix/client/v3/rooms/{roomId}/state/{eventType}/{stateKey}
async fn put_state(
    ctx: Ctx,
    req: send_state_event::v3::Request,
) -> Result<send_state_event::v3::Response> {
    let sender = me(&ctx)?;
    let event = NewEvent {
        kind: req.event_type.to_string(),
        sender,
        state_key: Some(req.state_key.clone()),
        content: raw_value(&req.body)?,
        txn: None,
        redacts: None,
    };
    let pdu = ctx.services.timeline.append(req.room_id.as_str(), event).await?;
    Ok(send_state_event::v3::Response::new(pdu.event_id))
}

/// GET /_matrix/client/v3/rooms/{roomId}/state/{eventType}/{stateKey}
async fn get_state_key(
    ctx: Ctx,
    req: get_state_event_for_key::v3::Request,
) -> Result<get_state_event_for_key::v3::Response> {
    let kind = req.event_type.to_string();
    let pdu = readable_state(&ctx, req.room_id.as_str())?
        .into_iter()
        .find(|p| p.kind.to_string() == kind && p.state_key.as_deref() == Some(&req.state_key))
        .ok_or_else(|| Error::not_found("No such state event"))?;
    let body = match req.format {
        get_state_event_for_key::v3::StateEventFormat::Event => {
            serde_json::value::to_raw_value(&client_event(&pdu, req.room_id.as_str()))
                .map_err(|e| Error::internal("state event", e))?
        }
        _ => pdu.content.clone(),
    };
    Ok(get_state_event_for_key::v3::Response::new(body))
}

/// GET /_matrix/client/v3/rooms/{roomId}/state
async fn get_state(
    ctx: Ctx,
    req: get_state_events::v3::Request,
) -> Result<get_state_events::v3::Response> {
    let state = readable_state(&ctx, req.room_id.as_str())?;
    let events = state
        .iter()
        .map(|p| to_raw(&client_event(p, req.room_id.as_str())))
        .collect::<Result<_>>()?;
    Ok(get_state_events::v3::Response::new(events))
}

/// The room state a user may read: the current state while joined (or when anyone may
/// read the room), the state when they left for someone who left or was banned.
fn readable_state(ctx: &Ctx, room_id: &str) -> Result<Vec<trellis_service::rooms::Pdu>> {
    let user = me(ctx)?;
    let rooms = &ctx.services.rooms;
    if rooms.membership(room_id, &user)? == Some(MembershipState::Join) {
        return rooms.current_state(room_id);
    }
    if let Some("leave") | Some("ban") =
        rooms.membership(room_id, &user)?.as_ref().map(MembershipState::as_str)
    {
        let left_at = rooms.last_membership_position(room_id, &user)?.unwrap_or(0);
        let state = rooms.state_at_position(room_id, left_at)?;
        return rooms.state_events(&state);
    }
    // Anyone else (invited, knocking, a stranger) reads only world-readable rooms.
    let world_readable =
        rooms.state_of(room_id, "m.room.history_visibility", "")?.is_some_and(|p| {
            serde_json::from_str::<serde_json::Value>(p.content.get())
                .is_ok_and(|c| c["history_visibility"] == "world_readable")
        });
    if !world_readable {
        return Err(Error::forbidden("You are not a member of this room"));
    }
    rooms.current_state(room_id)
}

/// POST /_matrix/client/v3/rooms/{roomId}/upgrade
///
/// `/upgrade`: the new room, then the room's local aliases and canonical alias move to it.
async fn upgrade(ctx: Ctx, req: upgrade_room::v3::Request) -> Result<upgrade_room::v3::Response> {
    let creators = req.additional_creators.iter().map(|u| u.to_string()).collect();
    let version = req.new_version.as_str();
    let new_room =
        upgrade::upgrade(&ctx.services, &me(&ctx)?, req.room_id.as_str(), version, creators)
            .await?;
    let new_room = OwnedRoomId::try_from(new_room).map_err(|e| Error::internal("room id", e))?;
    Ok(upgrade_room::v3::Response::new(new_room))
}
