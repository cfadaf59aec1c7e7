//! Relations and threads: `/relations` (all three forms) and `/threads`.

use std::ops::Bound::{self, Excluded, Included, Unbounded};

use axum::Router;
use ruma::{
    UInt,
    api::{
        Direction,
        client::{
            relations::{
                get_relating_events, get_relating_events_with_rel_type,
                get_relating_events_with_rel_type_and_event_type,
            },
            threads::get_threads,
        },
    },
    serde::Raw,
};
use trellis_core::Result;

use super::events::Viewer;
use crate::{
    AppState,
    ruma_route::{self, Ctx},
};
use trellis_service::rooms::history::parse_token;

const DEFAULT_LIMIT: usize = 50;
const MAX_LIMIT: usize = 1000;

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = ruma_route::add::<get_relating_events::v1::Request, _, _>(router, all);
    let router =
        ruma_route::add::<get_relating_events_with_rel_type::v1::Request, _, _>(router, by_rel);
    let router = ruma_route::add::<
        get_relating_events_with_rel_type_and_event_type::v1::Request,
        _,
        _,
    >(router, by_rel_and_type);
    ruma_route::add::<get_threads::v1::Request, _, _>(router, threads)
}

fn limit(limit: Option<UInt>) -> usize {
    limit
        .and_then(|l| usize::try_from(u64::from(l)).ok())
        .unwrap_or(DEFAULT_LIMIT)
        .clamp(1, MAX_LIMIT)
}

/// One relations query, whichever path it came by.
struct Query<'a> {
    parent: &'a ruma::EventId,
    rel_type: Option<String>,
    event_type: Option<String>,
    from: Option<&'a str>,
    to: Option<&'a str>,
    dir: Direction,
    limit: Option<UInt>,
    recurse: bool,
}

struct Page<T> {
    chunk: Vec<Raw<T>>,
    next_batch: Option<String>,
    recursion_depth: Option<UInt>,
}

/// Tokens name the gap before a position, as on `/messages`: going backwards a page
/// holds positions below `from` and at or above `to`; going forwards the reverse.
fn relations<T>(ctx: &Ctx, room_id: &str, q: Query<'_>) -> Result<Page<T>> {
    let viewer = Viewer::new(ctx, room_id)?;
    // The parent must be an event the viewer can see in this room.
    viewer.event(q.parent.as_str())?;
    let from = q.from.map(parse_token).transpose()?;
    let to = q.to.map(parse_token).transpose()?;
    let forward = q.dir == Direction::Forward;
    let (lo, hi): (Bound<u64>, Bound<u64>) = if forward {
        (from.map_or(Unbounded, Included), to.map_or(Unbounded, Excluded))
    } else {
        (to.map_or(Unbounded, Included), from.map_or(Unbounded, Excluded))
    };
    let page = ctx.services.rooms.relations(
        q.parent.as_str(),
        q.rel_type.as_deref(),
        q.event_type.as_deref(),
        lo,
        hi,
        forward,
        limit(q.limit),
        |pos, pdu| Ok(viewer.sees(pos, pdu)),
    )?;
    let next_batch =
        page.next.map(|p| if forward { format!("t{}", p + 1) } else { format!("t{p}") });
    Ok(Page {
        chunk: page.events.iter().map(|(_, p)| viewer.render_raw(p)).collect::<Result<_>>()?,
        next_batch,
        // Only direct relations are followed; a client asking to recurse learns so.
        recursion_depth: q.recurse.then(|| UInt::from(1u32)),
    })
}

/// GET /_matrix/client/v1/rooms/{roomId}/relations/{eventId}
async fn all(
    ctx: Ctx,
    req: get_relating_events::v1::Request,
) -> Result<get_relating_events::v1::Response> {
    let q = Query {
        parent: &req.event_id,
        rel_type: None,
        event_type: None,
        from: req.from.as_deref(),
        to: req.to.as_deref(),
        dir: req.dir,
        limit: req.limit,
        recurse: req.recurse,
    };
    let page = relations(&ctx, req.room_id.as_str(), q)?;
    let mut resp = get_relating_events::v1::Response::new(page.chunk);
    resp.next_batch = page.next_batch;
    resp.recursion_depth = page.recursion_depth;
    Ok(resp)
}

/// GET /_matrix/client/v1/rooms/{roomId}/relations/{eventId}/{relType}
async fn by_rel(
    ctx: Ctx,
    req: get_relating_events_with_rel_type::v1::Request,
) -> Result<get_relating_events_with_rel_type::v1::Response> {
    let q = Query {
        parent: &req.event_id,
        rel_type: Some(req.rel_type.to_string()),
        event_type: None,
        from: req.from.as_deref(),
        to: req.to.as_deref(),
        dir: req.dir,
        limit: req.limit,
        recurse: req.recurse,
    };
    let page = relations(&ctx, req.room_id.as_str(), q)?;
    let mut resp = get_relating_events_with_rel_type::v1::Response::new(page.chunk);
    resp.next_batch = page.next_batch;
    resp.recursion_depth = page.recursion_depth;
    Ok(resp)
}

/// GET /_matrix/client/v1/rooms/{roomId}/relations/{eventId}/{relType}/{eventType}
async fn by_rel_and_type(
    ctx: Ctx,
    req: get_relating_events_with_rel_type_and_event_type::v1::Request,
) -> Result<get_relating_events_with_rel_type_and_event_type::v1::Response> {
    let q = Query {
        parent: &req.event_id,
        rel_type: Some(req.rel_type.to_string()),
        event_type: Some(req.event_type.to_string()),
        from: req.from.as_deref(),
        to: req.to.as_deref(),
        dir: req.dir,
        limit: req.limit,
        recurse: req.recurse,
    };
    let page = relations(&ctx, req.room_id.as_str(), q)?;
    let mut resp = get_relating_events_with_rel_type_and_event_type::v1::Response::new(page.chunk);
    resp.next_batch = page.next_batch;
    resp.recursion_depth = page.recursion_depth;
    Ok(resp)
}

/// GET /_matrix/client/v1/rooms/{roomId}/threads
///
/// `/threads`: thread roots by latest activity, newest first.
async fn threads(ctx: Ctx, req: get_threads::v1::Request) -> Result<get_threads::v1::Response> {
    let room_id = req.room_id.as_str();
    let viewer = Viewer::new(&ctx, room_id)?;
    let from = req.from.as_deref().map(parse_token).transpose()?;
    let participant = match req.include {
        get_threads::v1::IncludeThreads::Participated => Some(viewer.user.as_str()),
        _ => None,
    };
    let page =
        ctx.services.rooms.threads(room_id, from, limit(req.limit), participant, |pos, pdu| {
            Ok(viewer.sees(pos, pdu))
        })?;
    let mut resp = get_threads::v1::Response::new(
        page.events.iter().map(|(_, p)| viewer.render_raw(p)).collect::<Result<_>>()?,
    );
    resp.next_batch = page.next.map(|p| format!("t{p}"));
    Ok(resp)
}
