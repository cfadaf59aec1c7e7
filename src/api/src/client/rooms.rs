//! Rooms: creating them, sending events and reading their current state.

use axum::Router;
use ruma::api::client::{
    message::send_message_event,
    redact::redact_event,
    room::{create_room, upgrade_room},
    state::{get_state_event_for_key, get_state_events, send_state_event},
};
use trellis_core::{Error, Result};
use trellis_service::rooms::{
    create::CreateRoomRequest,
    send::{self, Sender},
    upgrade, viewer,
};

pub(super) use super::events::require_joined;
use super::events::{client_event, device, raw_value, to_raw, user};
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
    let (user, device) = (user(&ctx)?, device(&ctx)?);
    let sender = Sender { user: &user, device: &device, ts: None };
    let redact =
        send::redact(&ctx.services, sender, &req.room_id, &req.event_id, req.reason, &req.txn_id);
    Ok(redact_event::v3::Response::new(redact.await?))
}

/// POST /_matrix/client/v3/createRoom
async fn create(ctx: Ctx, req: create_room::v3::Request) -> Result<create_room::v3::Response> {
    let creator = user(&ctx)?;
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

/// The `ts` an application service gives its event (timestamp massaging); ignored from
/// anyone else.
fn service_ts(ctx: &Ctx, ts: Option<ruma::MilliSecondsSinceUnixEpoch>) -> Option<u64> {
    let by_service = ctx.session.as_ref().is_some_and(|s| s.appservice.is_some());
    ts.filter(|_| by_service).map(|t| t.get().into())
}

/// PUT /_matrix/client/v3/rooms/{roomId}/send/{eventType}/{txnId}
async fn send(
    ctx: Ctx,
    req: send_message_event::v3::Request,
) -> Result<send_message_event::v3::Response> {
    ctx.rate_limit(trellis_service::ratelimit::Class::Message)?;
    let (user, device) = (user(&ctx)?, device(&ctx)?);
    let ts = service_ts(&ctx, req.timestamp);
    let sender = Sender { user: &user, device: &device, ts };
    let (kind, content) = (req.event_type.to_string(), raw_value(&req.body)?);
    let sent = send::message(&ctx.services, sender, &req.room_id, kind, content, &req.txn_id);
    Ok(send_message_event::v3::Response::new(sent.await?))
}

/// PUT /_matrix/client/v3/rooms/{roomId}/state/{eventType}/{stateKey}
async fn put_state(
    ctx: Ctx,
    req: send_state_event::v3::Request,
) -> Result<send_state_event::v3::Response> {
    let (kind, content) = (req.event_type.to_string(), raw_value(&req.body)?);
    let user = user(&ctx)?;
    let ts = service_ts(&ctx, req.timestamp);
    let sent = send::state(&ctx.services, &user, ts, &req.room_id, kind, req.state_key, content);
    Ok(send_state_event::v3::Response::new(sent.await?))
}

/// GET /_matrix/client/v3/rooms/{roomId}/state/{eventType}/{stateKey}
async fn get_state_key(
    ctx: Ctx,
    req: get_state_event_for_key::v3::Request,
) -> Result<get_state_event_for_key::v3::Response> {
    let kind = req.event_type.to_string();
    let pdu = viewer::readable_state(&ctx.services, &user(&ctx)?, &req.room_id)?
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
    let state = viewer::readable_state(&ctx.services, &user(&ctx)?, &req.room_id)?;
    let events = state
        .iter()
        .map(|p| to_raw(&client_event(p, req.room_id.as_str())))
        .collect::<Result<_>>()?;
    Ok(get_state_events::v3::Response::new(events))
}

/// POST /_matrix/client/v3/rooms/{roomId}/upgrade
///
/// `/upgrade`: the new room, then the room's local aliases and canonical alias move to it.
async fn upgrade(ctx: Ctx, req: upgrade_room::v3::Request) -> Result<upgrade_room::v3::Response> {
    let (room, version, creators) = (&req.room_id, &req.new_version, &req.additional_creators);
    let new_room = upgrade::upgrade(&ctx.services, &user(&ctx)?, room, version, creators).await?;
    Ok(upgrade_room::v3::Response::new(new_room))
}
