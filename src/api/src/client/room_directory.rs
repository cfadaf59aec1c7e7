//! The published room directory: `GET/PUT /directory/list/room/{roomId}` and
//! `GET/POST /publicRooms`; and room summaries, `GET /room_summary/{roomIdOrAlias}`.
//!
//! A `server` other than ours is asked over federation (`/_matrix/federation/v1/publicRooms`);
//! with federation disabled those requests get 501 `M_UNRECOGNIZED` ("not implemented")
//! rather than a 404 (which would say the server has no directory) or an empty list
//! (which would say it has no rooms).

use axum::Router;
use http::Method;
use ruma::{
    OwnedServerName,
    api::{
        IncomingRequest, Metadata,
        auth_scheme::AccessTokenOptional,
        client::{
            directory::{
                get_public_rooms, get_public_rooms_filtered, get_room_visibility,
                set_room_visibility,
            },
            room::{Visibility, get_summary},
        },
        error::DeserializationError,
    },
    directory::RoomNetwork,
    events::room::member::MembershipState,
};
use serde_json::{Value, json};
use trellis_core::{Error, ErrorKind, Result, error::code};
use trellis_service::{
    federation::{encode, invites, server_of},
    rooms::public::{DirectoryPage, DirectoryQuery, Network, RoomInfo, may_preview},
};

use crate::{
    AppState,
    convert::from_value,
    ruma_route::{self, Ctx},
};

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = ruma_route::add::<get_room_visibility::v3::Request, _, _>(router, visibility);
    let router = ruma_route::add::<set_room_visibility::v3::Request, _, _>(router, set_visibility);
    let router = ruma_route::add::<PublicRoomsGet, _, _>(router, list);
    let router = ruma_route::add::<get_public_rooms_filtered::v3::Request, _, _>(router, search);
    ruma_route::add::<get_summary::v1::Request, _, _>(router, summary)
}

/// GET /_matrix/client/v1/room_summary/{roomIdOrAlias}
///
/// A room's summary for anyone who may preview it; 404 for everything else (unknown
/// rooms and aliases, rooms on other servers, rooms the requester may not see).
async fn summary(ctx: Ctx, req: get_summary::v1::Request) -> Result<get_summary::v1::Response> {
    let user = match &ctx.session {
        Some(session) => Some(ctx.services.accounts.user_id(&session.localpart)),
        None => None,
    };
    let target = req.room_id_or_alias.as_str();
    let local = trellis_service::rooms::public::summary(
        &ctx.services.rooms,
        &ctx.services.aliases,
        target,
        user.as_deref(),
    );
    let (info, membership) = match local {
        Err(e)
            if e.kind == trellis_core::ErrorKind::NotFound && ctx.services.federation.enabled() =>
        {
            // Each such request makes this server ask others: rate-limited like joins.
            ctx.rate_limit(trellis_service::ratelimit::Class::Join)?;
            remote_summary(&ctx, target, &req.via, user.as_deref()).await?.ok_or(e)?
        }
        other => other?,
    };
    let mut resp = get_summary::v1::Response::new(info.to_summary()?);
    resp.membership = membership;
    Ok(resp)
}

/// The summary of a room this server is not in (or an alias of another server), from
/// the `/hierarchy` of a server the request's `via`, the alias, the room id or a pending
/// invite or knock names; `None` when none tells, or the user may not see it.
async fn remote_summary(
    ctx: &Ctx,
    target: &str,
    via: &[OwnedServerName],
    user: Option<&str>,
) -> Result<Option<(RoomInfo, Option<MembershipState>)>> {
    let services = &ctx.services;
    let mut servers: Vec<String> = via.iter().map(ToString::to_string).collect();
    let room_id = if target.starts_with('#') {
        if server_of(target).is_none_or(|s| s == services.server_name()) {
            return Ok(None);
        }
        let answer = services.federation.remote_alias(target).await?;
        let listed = answer["servers"].as_array().into_iter().flatten();
        servers.extend(listed.filter_map(Value::as_str).map(str::to_owned));
        answer["room_id"].as_str().unwrap_or_default().to_owned()
    } else {
        target.to_owned()
    };
    let pending = match user {
        Some(user) => invites::pending(services, user, &room_id)?,
        None => None,
    };
    if let Some(server) = pending.as_ref().and_then(|p| p.server.clone()) {
        servers.insert(0, server);
    }
    servers.extend(server_of(&room_id).map(str::to_owned));
    let Some(answer) =
        crate::client::spaces::ask_servers(services.clone(), room_id.clone(), servers, false).await
    else {
        return Ok(None);
    };
    let Some(info) = RoomInfo::from_summary(&answer["room"]).filter(|i| i.room_id == room_id)
    else {
        return Ok(None);
    };
    let membership = pending
        .map(|p| MembershipState::from(p.membership))
        .filter(|m| *m != MembershipState::Leave);
    if membership.is_none() && !may_preview(&services.rooms, &info, user)? {
        return Ok(None);
    }
    Ok(Some((info, user.map(|_| membership.unwrap_or(MembershipState::Leave)))))
}

/// GET /_matrix/client/v3/directory/list/room/{roomId}
async fn visibility(
    ctx: Ctx,
    req: get_room_visibility::v3::Request,
) -> Result<get_room_visibility::v3::Response> {
    let public = ctx.services.public_rooms.visibility(&ctx.services.rooms, req.room_id.as_str())?;
    Ok(get_room_visibility::v3::Response::new(if public {
        Visibility::Public
    } else {
        Visibility::Private
    }))
}

/// PUT /_matrix/client/v3/directory/list/room/{roomId}
async fn set_visibility(
    ctx: Ctx,
    req: set_room_visibility::v3::Request,
) -> Result<set_room_visibility::v3::Response> {
    let public = match req.visibility {
        Visibility::Public => true,
        Visibility::Private => false,
        _ => return Err(Error::invalid_param("visibility must be public or private")),
    };
    let localpart = ctx.session()?.localpart.clone();
    let user = ctx.services.accounts.user_id(&localpart);
    let admin = ctx.services.accounts.user(&localpart)?.is_some_and(|u| u.admin);
    ctx.services
        .public_rooms
        .set_visibility(
            &ctx.services.rooms,
            req.room_id.as_str(),
            &user,
            admin,
            ctx.services.config.rooms.publish,
            public,
        )
        .await?;
    Ok(set_room_visibility::v3::Response::new())
}

/// `GET /publicRooms` as ruma defines it, but taking an optional access token so that
/// `rooms.public_rooms_require_auth` can be enforced.
struct PublicRoomsGet(get_public_rooms::v3::Request);

type GetRequest = get_public_rooms::v3::Request;

impl Metadata for PublicRoomsGet {
    const METHOD: http::Method = <GetRequest as Metadata>::METHOD;
    const RATE_LIMITED: bool = <GetRequest as Metadata>::RATE_LIMITED;
    type Authentication = AccessTokenOptional;
    type PathBuilder = <GetRequest as Metadata>::PathBuilder;
    const PATH_BUILDER: Self::PathBuilder = <GetRequest as Metadata>::PATH_BUILDER;
}

impl IncomingRequest for PublicRoomsGet {
    type EndpointError = <GetRequest as IncomingRequest>::EndpointError;
    type OutgoingResponse = get_public_rooms::v3::Response;

    fn try_from_http_request_inner(
        request: http::Request<&[u8]>,
        path_args: &[&str],
    ) -> Result<Self, DeserializationError> {
        GetRequest::try_from_http_request_inner(request, path_args).map(Self)
    }
}

/// Another server's directory, when one is asked for (see the module documentation).
fn remote_server<'a>(ctx: &Ctx, server: Option<&'a OwnedServerName>) -> Result<Option<&'a str>> {
    match server {
        Some(server) if server.as_str() != ctx.services.server_name() => {
            if ctx.services.federation.enabled() {
                Ok(Some(server.as_str()))
            } else {
                Err(Error::new(
                    ErrorKind::Unimplemented,
                    code::UNRECOGNIZED,
                    "Listing another server's room directory needs federation, which is \
                     disabled on this server",
                ))
            }
        }
        _ => Ok(None),
    }
}

/// A remote directory answer's fields.
fn remote_parts(answer: Value) -> Result<Parts> {
    let chunk = from_value(answer["chunk"].clone())?;
    let text = |field: &str| answer[field].as_str().map(str::to_owned);
    let total = answer["total_room_count_estimate"].as_u64().unwrap_or(0);
    let total = ruma::UInt::try_from(total).unwrap_or(ruma::UInt::MAX);
    Ok((chunk, text("next_batch"), text("prev_batch"), total))
}

/// GET /_matrix/client/v3/publicRooms
async fn list(ctx: Ctx, req: PublicRoomsGet) -> Result<get_public_rooms::v3::Response> {
    let req = req.0;
    if ctx.services.config.rooms.public_rooms_require_auth && ctx.session.is_none() {
        return Err(Error::missing_token());
    }
    let (chunk, next_batch, prev_batch, total) = match remote_server(&ctx, req.server.as_ref())? {
        Some(server) => {
            let mut path = "/_matrix/federation/v1/publicRooms?".to_owned();
            if let Some(limit) = req.limit {
                path.push_str(&format!("limit={limit}&"));
            }
            if let Some(since) = &req.since {
                path.push_str(&format!("since={}", encode(since)));
            }
            let answer = ctx.services.federation.request(server, Method::GET, &path, None).await?;
            remote_parts(answer)?
        }
        None => {
            let query = DirectoryQuery {
                limit: req.limit.map(u64::from),
                since: req.since.as_deref(),
                ..Default::default()
            };
            parts(ctx.services.public_rooms.list(&ctx.services.rooms, &query)?)?
        }
    };
    let mut resp = get_public_rooms::v3::Response::new(chunk);
    resp.next_batch = next_batch;
    resp.prev_batch = prev_batch;
    resp.total_room_count_estimate = Some(total);
    Ok(resp)
}

/// POST /_matrix/client/v3/publicRooms
async fn search(
    ctx: Ctx,
    req: get_public_rooms_filtered::v3::Request,
) -> Result<get_public_rooms_filtered::v3::Response> {
    let remote = remote_server(&ctx, req.server.as_ref())?;
    let mut resp = get_public_rooms_filtered::v3::Response::new();
    let query = DirectoryQuery {
        network: match req.room_network.clone() {
            RoomNetwork::All => Network::All,
            RoomNetwork::ThirdParty(id) => Network::ThirdParty(id),
            _ => Network::Matrix,
        },
        limit: req.limit.map(u64::from),
        since: req.since.as_deref(),
        search_term: req.filter.generic_search_term.as_deref(),
        room_types: req.filter.room_types.iter().map(|t| t.as_str().map(str::to_owned)).collect(),
    };
    let (chunk, next_batch, prev_batch, total) = match remote {
        Some(server) => {
            let body = json!({
                "limit": query.limit,
                "since": query.since,
                "filter": {
                    "generic_search_term": query.search_term,
                    "room_types": query.room_types,
                },
            });
            let path = "/_matrix/federation/v1/publicRooms";
            let answer =
                ctx.services.federation.request(server, Method::POST, path, Some(&body)).await?;
            remote_parts(answer)?
        }
        None => parts(ctx.services.public_rooms.list(&ctx.services.rooms, &query)?)?,
    };
    resp.chunk = chunk;
    resp.next_batch = next_batch;
    resp.prev_batch = prev_batch;
    resp.total_room_count_estimate = Some(total);
    Ok(resp)
}

pub(crate) type Parts =
    (Vec<ruma::directory::PublicRoomsChunk>, Option<String>, Option<String>, ruma::UInt);

pub(crate) fn parts(page: DirectoryPage) -> Result<Parts> {
    let chunk = page.rooms.iter().map(|r| r.to_chunk()).collect::<Result<_>>()?;
    let total = ruma::UInt::try_from(page.total).unwrap_or(ruma::UInt::MAX);
    Ok((chunk, page.next_batch, page.prev_batch, total))
}
