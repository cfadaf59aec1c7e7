//! Reading a room's history: `/messages`, `/context`, `/event`, `/timestamp_to_event`
//! and `/members`, each showing a user only what history visibility lets them see.

use ruma::events::room::member::MembershipState;
use std::{
    collections::BTreeSet,
    ops::Bound::{Excluded, Included, Unbounded},
    sync::Arc,
};

use axum::Router;
use ruma::{
    MilliSecondsSinceUnixEpoch, UInt,
    api::{
        Direction,
        client::{
            context::get_context,
            filter::{LazyLoadOptions, RoomEventFilter},
            membership::get_member_events,
            message::get_message_events,
            room::{get_event_by_timestamp, get_room_event},
        },
    },
    serde::Raw,
};
use serde_json::Value;
use trellis_core::{Error, Result};
use trellis_service::rooms::{Pdu, filter};

use super::events::{Viewer, client_event, to_raw};
use trellis_service::federation::backfill;

use crate::{
    AppState,
    ruma_route::{self, Ctx},
};

/// The most events one page returns.
const MAX_PAGE: usize = 1000;

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = ruma_route::add::<get_room_event::v3::Request, _, _>(router, get_event);
    let router = ruma_route::add::<get_message_events::v3::Request, _, _>(router, messages);
    let router = ruma_route::add::<get_context::v3::Request, _, _>(router, context);
    let router = ruma_route::add::<get_member_events::v3::Request, _, _>(router, member_events);
    ruma_route::add::<get_event_by_timestamp::v1::Request, _, _>(router, by_timestamp)
}

/// Pagination tokens name the gap before a stream position: `t<pos>`. Sync tokens
/// (`s<pos>`) name the same gaps, so a sync's `prev_batch` works here too.
pub(super) fn parse_token(token: &str) -> Result<u64> {
    token
        .strip_prefix('t')
        .and_then(|p| p.parse().ok())
        .or_else(|| trellis_service::realtime::sync::SyncToken::parse(token).map(|t| t.position))
        .ok_or_else(|| Error::invalid_param("Invalid pagination token"))
}

fn page_limit(limit: UInt) -> usize {
    usize::try_from(u64::from(limit)).unwrap_or(MAX_PAGE).clamp(1, MAX_PAGE)
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

/// The member events a lazy-loading client needs with `events`: their senders'.
fn lazy_members<T>(
    ctx: &Ctx,
    viewer: &Viewer<'_>,
    events: &[(u64, Arc<Pdu>)],
) -> Result<Vec<Raw<T>>> {
    let senders: BTreeSet<&str> = events.iter().map(|(_, p)| p.sender.as_str()).collect();
    let mut state = Vec::new();
    for sender in senders {
        if let Some(pdu) = ctx.services.rooms.state_of(viewer.room_id, "m.room.member", sender)? {
            state.push(to_raw(&client_event(&pdu, viewer.room_id))?);
        }
    }
    Ok(state)
}

fn lazy(filter: &RoomEventFilter) -> bool {
    !matches!(filter.lazy_load_options, LazyLoadOptions::Disabled)
}

/// GET /_matrix/client/v3/rooms/{roomId}/messages
async fn messages(
    ctx: Ctx,
    req: get_message_events::v3::Request,
) -> Result<get_message_events::v3::Response> {
    let room_id = req.room_id.as_str();
    let viewer = Viewer::new(&ctx, room_id)?;
    let limit = page_limit(req.filter.limit.unwrap_or(req.limit).min(req.limit));
    let from = req.from.as_deref().map(parse_token).transpose()?;
    let to = req.to.as_deref().map(parse_token).transpose()?;
    let accept = |pos: u64, pdu: &Pdu| -> Result<bool> {
        Ok(filter::passes(&req.filter, room_id, pdu) && viewer.sees(pos, pdu)?)
    };
    let rooms = &ctx.services.rooms;
    let (start, page, end) = match req.dir {
        Direction::Backward => {
            let from = from.unwrap_or_else(|| rooms.stream.visible() + 1);
            let lo = to.map_or(Unbounded, Included);
            let mut page =
                rooms.scan_timeline(room_id, lo, Excluded(from), false, limit, accept)?;
            // The start of what this server has is not the start of the room: ask
            // another server in it for the history before (once per page).
            if !page.more && page.events.len() < limit && to.is_none() {
                let wanted = limit - page.events.len();
                let fetched = backfill::backfill(&ctx.services, room_id, wanted).await;
                if fetched.as_ref().is_ok_and(|n| *n > 0) {
                    page =
                        rooms.scan_timeline(room_id, lo, Excluded(from), false, limit, accept)?;
                }
            }
            // More may be had from other servers even when nothing more is here.
            let more = page.more
                || (to.is_none()
                    && page.last.is_some()
                    && backfill::more_remote(&ctx.services, room_id)?);
            let end = page.last.filter(|_| more).map(|p| format!("t{p}"));
            (from, page, end)
        }
        Direction::Forward => {
            let from = from.unwrap_or(0);
            let hi = to.map_or(Unbounded, Excluded);
            let page = rooms.scan_timeline(room_id, Included(from), hi, true, limit, accept)?;
            let end = page.last.filter(|_| page.more).map(|p| format!("t{}", p + 1));
            (from, page, end)
        }
    };
    let mut resp = get_message_events::v3::Response::new();
    resp.start = format!("t{start}");
    resp.end = end;
    resp.chunk = page.events.iter().map(|(_, p)| viewer.render_raw(p)).collect::<Result<_>>()?;
    if lazy(&req.filter) {
        resp.state = lazy_members(&ctx, &viewer, &page.events)?;
    }
    Ok(resp)
}

/// GET /_matrix/client/v3/rooms/{roomId}/context/{eventId}
///
/// `/context`: an event with the events around it, for jumping into history.
async fn context(ctx: Ctx, req: get_context::v3::Request) -> Result<get_context::v3::Response> {
    let room_id = req.room_id.as_str();
    let viewer = Viewer::new(&ctx, room_id)?;
    let (position, pdu) = viewer.event(req.event_id.as_str())?;
    let limit = usize::try_from(u64::from(req.limit)).unwrap_or(MAX_PAGE).min(MAX_PAGE);
    let accept = |pos: u64, pdu: &Pdu| -> Result<bool> {
        Ok(filter::passes(&req.filter, room_id, pdu) && viewer.sees(pos, pdu)?)
    };
    let rooms = &ctx.services.rooms;
    let before_count = limit / 2;
    let after_count = limit - before_count;
    let before =
        rooms.scan_timeline(room_id, Unbounded, Excluded(position), false, before_count, accept)?;
    let after =
        rooms.scan_timeline(room_id, Excluded(position), Unbounded, true, after_count, accept)?;
    let mut resp = get_context::v3::Response::new();
    resp.start = Some(format!("t{}", before.last.unwrap_or(position)));
    resp.end = Some(format!("t{}", after.last.unwrap_or(position) + 1));
    resp.event = Some(viewer.render_raw(&pdu)?);
    resp.events_before =
        before.events.iter().map(|(_, p)| viewer.render_raw(p)).collect::<Result<_>>()?;
    resp.events_after =
        after.events.iter().map(|(_, p)| viewer.render_raw(p)).collect::<Result<_>>()?;
    let lazy = lazy(&req.filter);
    let mut senders: BTreeSet<&str> = BTreeSet::new();
    if lazy {
        senders.insert(pdu.sender.as_str());
        senders.extend(before.events.iter().chain(&after.events).map(|(_, p)| p.sender.as_str()));
    }
    // The spec's `state` is the room's state at the last event returned.
    let last = after.events.last().map_or(&pdu, |(_, p)| p);
    let state = rooms.state_after_event(last)?;
    resp.state = rooms
        .state_events(&state)?
        .iter()
        .filter(|p| {
            !lazy
                || p.kind != ruma::events::TimelineEventType::RoomMember
                || p.state_key.as_deref().is_some_and(|k| senders.contains(k))
        })
        .map(|p| to_raw(&client_event(p, room_id)))
        .collect::<Result<_>>()?;
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
            viewer.sees(pos, pdu)
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
    let rooms = &ctx.services.rooms;
    // A user who left sees the members as they were when they left.
    let current = rooms.membership(room_id, &viewer.user)?;
    let at = req.at.as_deref().map(parse_token).transpose()?;
    let joined = current == Some(MembershipState::Join);
    let events: Vec<Pdu> = match (at, joined) {
        (None, true) => rooms
            .current_state(room_id)?
            .into_iter()
            .filter(|p| p.kind == ruma::events::TimelineEventType::RoomMember)
            .collect(),
        (at, _) => {
            let left_at =
                rooms.last_membership_position(room_id, &viewer.user)?.filter(|_| !joined);
            let position = match (at, left_at) {
                (Some(a), Some(l)) => a.saturating_sub(1).min(l),
                (Some(a), None) => a.saturating_sub(1),
                (None, Some(l)) => l,
                (None, None) => rooms.stream.visible(),
            };
            rooms.members_at(room_id, position)?.into_iter().map(|(_, p)| p).collect()
        }
    };
    let wanted = req.membership.as_ref().map(|m| m.to_string());
    let unwanted = req.not_membership.as_ref().map(|m| m.to_string());
    let mut chunk = Vec::new();
    for pdu in events {
        let content: Value = serde_json::from_str(pdu.content.get()).unwrap_or(Value::Null);
        let membership = content["membership"].as_str().unwrap_or_default().to_owned();
        if wanted.as_ref().is_some_and(|w| *w != membership)
            || unwanted.as_ref().is_some_and(|u| *u == membership)
        {
            continue;
        }
        chunk.push(to_raw(&client_event(&pdu, room_id))?);
    }
    Ok(get_member_events::v3::Response::new(chunk))
}
