//! The server-server room endpoints: transactions, joining and leaving, and reading a
//! room's DAG (events, state, auth chains, missing events, backfill).

use axum::Router;
use ruma::{
    MilliSecondsSinceUnixEpoch, OwnedServerName,
    api::federation::{
        authorization::get_event_authorization,
        backfill::get_backfill,
        directory::{get_public_rooms, get_public_rooms_filtered},
        event::{
            get_event, get_event_by_timestamp, get_missing_events, get_room_state,
            get_room_state_ids,
        },
        membership::{
            RawStrippedState, create_invite, create_join_event, create_knock_event,
            create_leave_event, prepare_join_event, prepare_knock_event, prepare_leave_event,
        },
        transactions::send_transaction_message,
    },
};
use serde_json::{Value, value::RawValue};
use trellis_core::{Error, Result};
use trellis_service::{
    federation::{events, invites, membership, transactions},
    rooms::Pdu,
};

use crate::{
    AppState,
    ruma_route::{self, Ctx},
};

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = ruma_route::add::<send_transaction_message::v1::Request, _, _>(router, send);
    let router = ruma_route::add::<prepare_join_event::v1::Request, _, _>(router, make_join);
    let router = ruma_route::add::<create_join_event::v2::Request, _, _>(router, send_join);
    let router = ruma_route::add::<prepare_leave_event::v1::Request, _, _>(router, make_leave);
    let router = ruma_route::add::<create_leave_event::v2::Request, _, _>(router, send_leave);
    let router = ruma_route::add::<create_invite::v2::Request, _, _>(router, invite);
    let router = ruma_route::add::<prepare_knock_event::v1::Request, _, _>(router, make_knock);
    let router = ruma_route::add::<create_knock_event::v1::Request, _, _>(router, send_knock);
    let router = ruma_route::add::<get_event::v1::Request, _, _>(router, event);
    let router = ruma_route::add::<get_room_state::v1::Request, _, _>(router, state);
    let router = ruma_route::add::<get_room_state_ids::v1::Request, _, _>(router, state_ids);
    let router = ruma_route::add::<get_event_authorization::v1::Request, _, _>(router, event_auth);
    let router = ruma_route::add::<get_missing_events::v1::Request, _, _>(router, missing_events);
    let router = ruma_route::add::<get_event_by_timestamp::v1::Request, _, _>(router, by_time);
    let router = ruma_route::add::<get_public_rooms::v1::Request, _, _>(router, public_rooms);
    let router =
        ruma_route::add::<get_public_rooms_filtered::v1::Request, _, _>(router, search_rooms);
    ruma_route::add::<get_backfill::v1::Request, _, _>(router, backfill)
}

fn raw(value: &Value) -> Result<Box<RawValue>> {
    serde_json::value::to_raw_value(value).map_err(|e| Error::internal("event json", e))
}

fn raw_pdu(pdu: &Pdu) -> Result<Box<RawValue>> {
    serde_json::value::to_raw_value(&*pdu.json).map_err(|e| Error::internal("event json", e))
}

fn raw_pdus(pdus: &[Pdu]) -> Result<Vec<Box<RawValue>>> {
    pdus.iter().map(raw_pdu).collect()
}

fn own_name(ctx: &Ctx) -> Result<OwnedServerName> {
    OwnedServerName::try_from(ctx.services.server_name())
        .map_err(|e| Error::internal("own server name", e))
}

fn parse(raw: &RawValue) -> Result<Value> {
    serde_json::from_str(raw.get()).map_err(|e| Error::bad_json(e.to_string()))
}

/// PUT /_matrix/federation/v1/send/{transactionId}
async fn send(
    ctx: Ctx,
    req: send_transaction_message::v1::Request,
) -> Result<send_transaction_message::v1::Response> {
    let origin = ctx.origin()?.to_owned();
    if req.origin.as_str() != origin {
        return Err(Error::forbidden("The transaction's origin is not the signing server"));
    }
    let pdus = req.pdus.iter().map(|p| parse(p)).collect::<Result<Vec<_>>>()?;
    let edus = req.edus.iter().map(|e| parse(e.json())).collect::<Result<Vec<_>>>()?;
    let results =
        transactions::receive(&ctx.services, &origin, req.transaction_id.as_str(), pdus, edus)
            .await?;
    Ok(send_transaction_message::v1::Response::new(results))
}

/// A `make_*` template for the origin's user: the room version and the event.
fn template(
    ctx: &Ctx,
    room_id: &ruma::RoomId,
    user_id: &ruma::UserId,
    membership: &str,
    ver: &[ruma::RoomVersionId],
) -> Result<(ruma::RoomVersionId, Box<RawValue>)> {
    let versions: Vec<String> = ver.iter().map(ToString::to_string).collect();
    let (version, event) = membership::make_membership(
        &ctx.services,
        ctx.origin()?,
        room_id.as_str(),
        user_id.as_str(),
        membership,
        &versions,
    )?;
    Ok((version, raw(&event)?))
}

/// GET /_matrix/federation/v1/make_join/{roomId}/{userId}
async fn make_join(
    ctx: Ctx,
    req: prepare_join_event::v1::Request,
) -> Result<prepare_join_event::v1::Response> {
    let (version, event) = template(&ctx, &req.room_id, &req.user_id, "join", &req.ver)?;
    let mut resp = prepare_join_event::v1::Response::new(event);
    resp.room_version = Some(version);
    Ok(resp)
}

/// PUT /_matrix/federation/v2/send_join/{roomId}/{eventId}
async fn send_join(
    ctx: Ctx,
    req: create_join_event::v2::Request,
) -> Result<create_join_event::v2::Response> {
    let origin = ctx.origin()?.to_owned();
    let join = membership::receive_membership(
        &ctx.services,
        &origin,
        req.room_id.as_str(),
        req.event_id.as_str(),
        "join",
        parse(&req.pdu)?,
    )
    .await?;
    let (state, chain) =
        events::state_at(&ctx.services, req.room_id.as_str(), join.event_id.as_str())?;
    let mut room_state = create_join_event::v2::RoomState::new();
    room_state.state = raw_pdus(&state)?;
    room_state.auth_chain = raw_pdus(&chain)?;
    room_state.event = Some(raw_pdu(&join)?);
    Ok(create_join_event::v2::Response::new(room_state))
}

/// GET /_matrix/federation/v1/make_leave/{roomId}/{userId}
async fn make_leave(
    ctx: Ctx,
    req: prepare_leave_event::v1::Request,
) -> Result<prepare_leave_event::v1::Response> {
    let (version, event) = template(&ctx, &req.room_id, &req.user_id, "leave", &[])?;
    Ok(prepare_leave_event::v1::Response::new(Some(version), event))
}

/// PUT /_matrix/federation/v2/send_leave/{roomId}/{eventId}
async fn send_leave(
    ctx: Ctx,
    req: create_leave_event::v2::Request,
) -> Result<create_leave_event::v2::Response> {
    let origin = ctx.origin()?.to_owned();
    membership::receive_membership(
        &ctx.services,
        &origin,
        req.room_id.as_str(),
        req.event_id.as_str(),
        "leave",
        parse(&req.pdu)?,
    )
    .await?;
    Ok(create_leave_event::v2::Response::new())
}

/// PUT /_matrix/federation/v2/invite/{roomId}/{eventId}
async fn invite(ctx: Ctx, req: create_invite::v2::Request) -> Result<create_invite::v2::Response> {
    let origin = ctx.origin()?.to_owned();
    let state =
        req.invite_room_state.iter().map(stripped_state_json).collect::<Result<Vec<_>>>()?;
    let signed = invites::receive_invite(
        &ctx.services,
        &origin,
        req.room_id.as_str(),
        req.event_id.as_str(),
        req.room_version.as_str(),
        parse(&req.event)?,
        state,
    )
    .await?;
    Ok(create_invite::v2::Response::new(raw(&signed)?))
}

/// One entry of an invite's room state: a full PDU (Matrix 1.16 and later) or, from
/// older servers, a stripped event.
#[allow(deprecated)]
fn stripped_state_json(state: &RawStrippedState) -> Result<Value> {
    match state {
        RawStrippedState::Pdu(pdu) => parse(pdu),
        RawStrippedState::Stripped(raw) => parse(raw.json()),
        _ => Err(Error::bad_json("Unknown invite room state entry")),
    }
}

/// GET /_matrix/federation/v1/event/{eventId}
async fn event(ctx: Ctx, req: get_event::v1::Request) -> Result<get_event::v1::Response> {
    let pdu = events::event_for(&ctx.services, ctx.origin()?, req.event_id.as_str())?;
    Ok(get_event::v1::Response::new(
        own_name(&ctx)?,
        MilliSecondsSinceUnixEpoch::now(),
        raw_pdu(&pdu)?,
    ))
}

/// GET /_matrix/federation/v1/state/{roomId}
async fn state(ctx: Ctx, req: get_room_state::v1::Request) -> Result<get_room_state::v1::Response> {
    events::require_in_room(&ctx.services, req.room_id.as_str(), ctx.origin()?)?;
    let (state, chain) =
        events::state_at(&ctx.services, req.room_id.as_str(), req.event_id.as_str())?;
    Ok(get_room_state::v1::Response::new(raw_pdus(&chain)?, raw_pdus(&state)?))
}

/// GET /_matrix/federation/v1/state_ids/{roomId}
async fn state_ids(
    ctx: Ctx,
    req: get_room_state_ids::v1::Request,
) -> Result<get_room_state_ids::v1::Response> {
    events::require_in_room(&ctx.services, req.room_id.as_str(), ctx.origin()?)?;
    let (state, chain) =
        events::state_at(&ctx.services, req.room_id.as_str(), req.event_id.as_str())?;
    let ids = |pdus: &[Pdu]| pdus.iter().map(|p| p.event_id.clone()).collect::<Vec<_>>();
    Ok(get_room_state_ids::v1::Response::new(ids(&chain), ids(&state)))
}

/// GET /_matrix/federation/v1/event_auth/{roomId}/{eventId}
async fn event_auth(
    ctx: Ctx,
    req: get_event_authorization::v1::Request,
) -> Result<get_event_authorization::v1::Response> {
    events::require_in_room(&ctx.services, req.room_id.as_str(), ctx.origin()?)?;
    let chain = ctx.services.rooms.auth_chain(&[req.event_id])?;
    Ok(get_event_authorization::v1::Response::new(raw_pdus(&chain)?))
}

/// POST /_matrix/federation/v1/get_missing_events/{roomId}
async fn missing_events(
    ctx: Ctx,
    req: get_missing_events::v1::Request,
) -> Result<get_missing_events::v1::Response> {
    events::require_in_room(&ctx.services, req.room_id.as_str(), ctx.origin()?)?;
    let limit = usize::try_from(u64::from(req.limit)).unwrap_or(usize::MAX);
    let mut found = events::walk_back(
        &ctx.services,
        req.room_id.as_str(),
        &req.latest_events,
        &req.earliest_events,
        false,
        limit,
        u64::from(req.min_depth),
    )?;
    // Oldest first, so the receiver can take them in order.
    found.reverse();
    Ok(get_missing_events::v1::Response::new(raw_pdus(&found)?))
}

/// GET /_matrix/federation/v1/backfill/{roomId}
async fn backfill(ctx: Ctx, req: get_backfill::v1::Request) -> Result<get_backfill::v1::Response> {
    events::require_in_room(&ctx.services, req.room_id.as_str(), ctx.origin()?)?;
    let limit = usize::try_from(u64::from(req.limit)).unwrap_or(usize::MAX);
    let found =
        events::walk_back(&ctx.services, req.room_id.as_str(), &req.v, &[], true, limit, 0)?;
    Ok(get_backfill::v1::Response::new(
        own_name(&ctx)?,
        MilliSecondsSinceUnixEpoch::now(),
        raw_pdus(&found)?,
    ))
}

/// GET /_matrix/federation/v1/timestamp_to_event/{roomId}
async fn by_time(
    ctx: Ctx,
    req: get_event_by_timestamp::v1::Request,
) -> Result<get_event_by_timestamp::v1::Response> {
    let room_id = req.room_id.as_str();
    events::require_in_room(&ctx.services, room_id, ctx.origin()?)?;
    let forward = req.dir == ruma::api::Direction::Forward;
    let rooms = &ctx.services.rooms;
    let (_, pdu) = rooms
        .event_near_time(room_id, u64::from(req.ts.get()), forward, |_, pdu| {
            Ok(rooms.pdu_for_federation(room_id, pdu.event_id.as_str())?.is_some())
        })?
        .ok_or_else(|| Error::not_found("No event found near that time"))?;
    Ok(get_event_by_timestamp::v1::Response::new(pdu.event_id, pdu.origin_server_ts))
}

/// This server's published rooms, for another server's users.
fn directory_page(
    ctx: &Ctx,
    query: &trellis_service::rooms::public::DirectoryQuery<'_>,
) -> Result<crate::client::room_directory::Parts> {
    ctx.origin()?;
    let page = ctx.services.public_rooms.list(&ctx.services.rooms, query)?;
    crate::client::room_directory::parts(page)
}

/// GET /_matrix/federation/v1/publicRooms
async fn public_rooms(
    ctx: Ctx,
    req: get_public_rooms::v1::Request,
) -> Result<get_public_rooms::v1::Response> {
    let query = trellis_service::rooms::public::DirectoryQuery {
        network: network(req.room_network),
        limit: req.limit.map(u64::from),
        since: req.since.as_deref(),
        ..Default::default()
    };
    let (chunk, next_batch, prev_batch, total) = directory_page(&ctx, &query)?;
    let mut resp = get_public_rooms::v1::Response::new();
    resp.chunk = chunk;
    resp.next_batch = next_batch;
    resp.prev_batch = prev_batch;
    resp.total_room_count_estimate = Some(total);
    Ok(resp)
}

/// POST /_matrix/federation/v1/publicRooms
async fn search_rooms(
    ctx: Ctx,
    req: get_public_rooms_filtered::v1::Request,
) -> Result<get_public_rooms_filtered::v1::Response> {
    let query = trellis_service::rooms::public::DirectoryQuery {
        network: network(req.room_network),
        limit: req.limit.map(u64::from),
        since: req.since.as_deref(),
        search_term: req.filter.generic_search_term.as_deref(),
        room_types: req.filter.room_types.iter().map(|t| t.as_str().map(str::to_owned)).collect(),
    };
    let (chunk, next_batch, prev_batch, total) = directory_page(&ctx, &query)?;
    let mut resp = get_public_rooms_filtered::v1::Response::new();
    resp.chunk = chunk;
    resp.next_batch = next_batch;
    resp.prev_batch = prev_batch;
    resp.total_room_count_estimate = Some(total);
    Ok(resp)
}

/// GET /_matrix/federation/v1/make_knock/{roomId}/{userId}
async fn make_knock(
    ctx: Ctx,
    req: prepare_knock_event::v1::Request,
) -> Result<prepare_knock_event::v1::Response> {
    let (version, event) = template(&ctx, &req.room_id, &req.user_id, "knock", &req.ver)?;
    Ok(prepare_knock_event::v1::Response::new(version, event))
}

/// PUT /_matrix/federation/v1/send_knock/{roomId}/{eventId}
async fn send_knock(
    ctx: Ctx,
    req: create_knock_event::v1::Request,
) -> Result<create_knock_event::v1::Response> {
    let origin = ctx.origin()?.to_owned();
    membership::receive_membership(
        &ctx.services,
        &origin,
        req.room_id.as_str(),
        req.event_id.as_str(),
        "knock",
        parse(&req.pdu)?,
    )
    .await?;
    // What the knocking user's client shows of the room, as full PDUs (v1.16).
    let mut state = Vec::new();
    for kind in trellis_service::realtime::sync::STRIPPED_STATE {
        if let Some(pdu) = ctx.services.rooms.state_of(req.room_id.as_str(), kind, "")? {
            state.push(RawStrippedState::Pdu(raw_pdu(&pdu)?));
        }
    }
    Ok(create_knock_event::v1::Response::new(state))
}

/// The directory list a request names.
fn network(requested: ruma::directory::RoomNetwork) -> trellis_service::rooms::public::Network {
    use trellis_service::rooms::public::Network;
    match requested {
        ruma::directory::RoomNetwork::All => Network::All,
        ruma::directory::RoomNetwork::ThirdParty(id) => Network::ThirdParty(id),
        _ => Network::Matrix,
    }
}
