//! Reading a room's history: `/messages`, `/context`, `/event`, `/timestamp_to_event`
//! and `/members`, each showing a user only what history visibility lets them see.

use std::sync::Arc;

use axum::Router;
use ruma::{
    MilliSecondsSinceUnixEpoch, UInt,
    api::{
        Direction,
        client::{
            context::get_context,
            membership::get_member_events,
            message::get_message_events,
            room::{get_event_by_timestamp, get_room_event},
        },
    },
};
use trellis_core::{Error, Result};
use trellis_service::rooms::{
    Pdu,
    history::{self, MAX_PAGE},
};

use super::events::{Viewer, client_event, to_raw};
use crate::{
    AppState,
    ruma_route::{self, Ctx},
};

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = ruma_route::add::<get_room_event::v3::Request, _, _>(router, get_event);
    let router = ruma_route::add::<get_message_events::v3::Request, _, _>(router, messages);
    let router = ruma_route::add::<get_context::v3::Request, _, _>(router, context);
    let router = ruma_route::add::<get_member_events::v3::Request, _, _>(router, member_events);
    ruma_route::add::<get_event_by_timestamp::v1::Request, _, _>(router, by_timestamp)
}

fn page_limit(limit: UInt) -> usize {
    usize::try_from(u64::from(limit)).unwrap_or(MAX_PAGE)
}

/// GET /_matrix/client/v3/rooms/{roomId}/event/{eventId}
async fn get_event(
    ctx: Ctx,
    req: get_room_event::v3::Request,
) -> Result<get_room_event::v3::Response> {
    let viewer = Viewer::new(&ctx, req.room_id.as_str())?;
    let (_, pdu) = viewer.event(req.event_id.as_str())?;
    Ok(get_room_event::v3::Response::new(viewer.render_raw(&pdu)?))
}

/// GET /_matrix/client/v3/rooms/{roomId}/messages
async fn messages(
    ctx: Ctx,
    req: get_message_events::v3::Request,
) -> Result<get_message_events::v3::Response> {
    let room_id = req.room_id.as_str();
    let viewer = Viewer::new(&ctx, room_id)?;
    let query = history::MessagesQuery {
        room_id,
        backward: req.dir == Direction::Backward,
        from: req.from.as_deref().map(history::parse_token).transpose()?,
        to: req.to.as_deref().map(history::parse_token).transpose()?,
        limit: page_limit(req.filter.limit.unwrap_or(req.limit).min(req.limit)),
        filter: &req.filter,
    };
    let sees = |pos: u64, pdu: &Pdu| viewer.sees(pos, pdu);
    let page = history::messages(&ctx.services, query, &sees).await?;
    let mut resp = get_message_events::v3::Response::new();
    resp.start = history::token(page.start);
    resp.end = page.end.map(history::token);
    resp.chunk = page.events.iter().map(|(_, p)| viewer.render_raw(p)).collect::<Result<_>>()?;
    resp.state =
        page.members.iter().map(|p| to_raw(&client_event(p, room_id))).collect::<Result<_>>()?;
    Ok(resp)
}

/// GET /_matrix/client/v3/rooms/{roomId}/context/{eventId}
///
/// `/context`: an event with the events around it, for jumping into history.
async fn context(ctx: Ctx, req: get_context::v3::Request) -> Result<get_context::v3::Response> {
    let room_id = req.room_id.as_str();
    let viewer = Viewer::new(&ctx, room_id)?;
    let (position, pdu) = viewer.event(req.event_id.as_str())?;
    let sees = |pos: u64, pdu: &Pdu| viewer.sees(pos, pdu);
    let limit = page_limit(req.limit);
    let found =
        history::context(&ctx.services, room_id, (position, &pdu), limit, &req.filter, &sees)?;
    let render = |events: &[(u64, Arc<Pdu>)]| -> Result<Vec<_>> {
        events.iter().map(|(_, p)| viewer.render_raw(p)).collect()
    };
    let mut resp = get_context::v3::Response::new();
    resp.start = Some(history::token(found.start));
    resp.end = Some(history::token(found.end));
    resp.event = Some(viewer.render_raw(&pdu)?);
    resp.events_before = render(&found.before)?;
    resp.events_after = render(&found.after)?;
    resp.state =
        found.state.iter().map(|p| to_raw(&client_event(p, room_id))).collect::<Result<_>>()?;
    Ok(resp)
}

/// GET /_matrix/client/v1/rooms/{roomId}/timestamp_to_event
async fn by_timestamp(
    ctx: Ctx,
    req: get_event_by_timestamp::v1::Request,
) -> Result<get_event_by_timestamp::v1::Response> {
    let room_id = req.room_id.as_str();
    let viewer = Viewer::new(&ctx, room_id)?;
    let forward = req.dir == Direction::Forward;
    let (_, pdu) = ctx
        .services
        .rooms
        .event_near_time(room_id, u64::from(req.ts.get()), forward, |pos, pdu| {
            Ok(viewer.sees(pos, pdu))
        })?
        .ok_or_else(|| Error::not_found("No event found near that time"))?;
    Ok(get_event_by_timestamp::v1::Response::new(
        pdu.event_id,
        MilliSecondsSinceUnixEpoch(pdu.origin_server_ts.get()),
    ))
}

/// GET /_matrix/client/v3/rooms/{roomId}/members
///
/// `/members`: the member events now, or at a pagination token (`at`), with the
/// `membership`/`not_membership` filters.
async fn member_events(
    ctx: Ctx,
    req: get_member_events::v3::Request,
) -> Result<get_member_events::v3::Response> {
    let room_id = req.room_id.as_str();
    let viewer = Viewer::new(&ctx, room_id)?;
    let query = history::MembersQuery {
        room_id,
        user_id: &viewer.user,
        at: req.at.as_deref().map(history::parse_token).transpose()?,
        membership: req.membership.as_ref(),
        not_membership: req.not_membership.as_ref(),
    };
    let events = history::member_events(&ctx.services, query)?;
    let chunk = events.iter().map(|p| to_raw(&client_event(p, room_id))).collect::<Result<_>>()?;
    Ok(get_member_events::v3::Response::new(chunk))
}
