//! Endpoints for application services and the networks they bridge: the ping
//! (`/appservice/{id}/ping`), a service's room lists
//! (`/directory/list/appservice/{networkId}/{roomId}`), and the third-party lookups
//! (`/thirdparty/...`), which are answered by the services.

use axum::Router;
use ruma::api::client::{
    appservice::{request_ping, set_room_visibility},
    room::Visibility,
    thirdparty::{
        get_location_for_protocol, get_location_for_room_alias, get_protocol, get_protocols,
        get_user_for_protocol, get_user_for_user_id,
    },
};
use std::collections::BTreeMap;
use trellis_core::{Error, Result};
use trellis_service::appservice::{queries, thirdparty};

use crate::{
    AppState,
    convert::from_value,
    ruma_route::{self, Ctx},
};

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = ruma_route::add::<request_ping::v1::Request, _, _>(router, ping);
    let router = ruma_route::add::<set_room_visibility::v3::Request, _, _>(router, list_room);
    let router = ruma_route::add::<get_protocols::v3::Request, _, _>(router, protocols);
    let router = ruma_route::add::<get_protocol::v3::Request, _, _>(router, protocol);
    let router = ruma_route::add::<get_location_for_protocol::v3::Request, _, _>(router, locations);
    let router = ruma_route::add::<get_user_for_protocol::v3::Request, _, _>(router, users);
    let router =
        ruma_route::add::<get_location_for_room_alias::v3::Request, _, _>(router, location_of);
    ruma_route::add::<get_user_for_user_id::v3::Request, _, _>(router, user_of)
}

/// POST /_matrix/client/v1/appservice/{appserviceId}/ping
async fn ping(ctx: Ctx, req: request_ping::v1::Request) -> Result<request_ping::v1::Response> {
    let txn = req.transaction_id.as_ref().map(|t| t.as_str());
    let took = queries::ping(&ctx.services, ctx.session()?, &req.appservice_id, txn).await?;
    Ok(request_ping::v1::Response::new(took))
}

/// PUT /_matrix/client/v3/directory/list/appservice/{networkId}/{roomId}
async fn list_room(
    ctx: Ctx,
    req: set_room_visibility::v3::Request,
) -> Result<set_room_visibility::v3::Response> {
    let service = ctx.session()?.appservice.clone().ok_or_else(|| {
        Error::forbidden("Only an application service may publish rooms of its networks")
    })?;
    if ctx.services.rooms.room(req.room_id.as_str())?.is_none() {
        return Err(Error::not_found("Unknown room"));
    }
    let instance = thirdparty::instance_id(&service, &req.network_id);
    let public = req.visibility == Visibility::Public;
    ctx.services.public_rooms.publish_in_network(&instance, req.room_id.as_str(), public).await?;
    Ok(set_room_visibility::v3::Response::new())
}

/// GET /_matrix/client/v3/thirdparty/protocols
async fn protocols(ctx: Ctx, _: get_protocols::v3::Request) -> Result<get_protocols::v3::Response> {
    let all = thirdparty::protocols(&ctx.services).await?;
    let mut typed = BTreeMap::new();
    for (name, meta) in all {
        // A service describing its protocol badly leaves it out rather than failing all.
        if let Ok(protocol) = from_value(meta) {
            typed.insert(name, protocol);
        }
    }
    Ok(get_protocols::v3::Response::new(typed))
}

/// GET /_matrix/client/v3/thirdparty/protocol/{protocol}
async fn protocol(ctx: Ctx, req: get_protocol::v3::Request) -> Result<get_protocol::v3::Response> {
    let mut all = thirdparty::protocols(&ctx.services).await?;
    let meta = all.remove(&req.protocol).ok_or_else(|| Error::not_found("Unknown protocol"))?;
    Ok(get_protocol::v3::Response::new(from_value(meta)?))
}

/// GET /_matrix/client/v3/thirdparty/location/{protocol}
async fn locations(
    ctx: Ctx,
    req: get_location_for_protocol::v3::Request,
) -> Result<get_location_for_protocol::v3::Response> {
    let found =
        thirdparty::lookup(&ctx.services, "location", Some(&req.protocol), &req.fields).await?;
    Ok(get_location_for_protocol::v3::Response::new(from_value(found.into())?))
}

/// GET /_matrix/client/v3/thirdparty/user/{protocol}
async fn users(
    ctx: Ctx,
    req: get_user_for_protocol::v3::Request,
) -> Result<get_user_for_protocol::v3::Response> {
    let found = thirdparty::lookup(&ctx.services, "user", Some(&req.protocol), &req.fields).await?;
    Ok(get_user_for_protocol::v3::Response::new(from_value(found.into())?))
}

/// GET /_matrix/client/v3/thirdparty/location
async fn location_of(
    ctx: Ctx,
    req: get_location_for_room_alias::v3::Request,
) -> Result<get_location_for_room_alias::v3::Response> {
    let query = BTreeMap::from([("alias".to_owned(), req.alias.to_string())]);
    let found = thirdparty::lookup(&ctx.services, "location", None, &query).await?;
    Ok(get_location_for_room_alias::v3::Response::new(from_value(found.into())?))
}

/// GET /_matrix/client/v3/thirdparty/user
async fn user_of(
    ctx: Ctx,
    req: get_user_for_user_id::v3::Request,
) -> Result<get_user_for_user_id::v3::Response> {
    let query = BTreeMap::from([("userid".to_owned(), req.userid.to_string())]);
    let found = thirdparty::lookup(&ctx.services, "user", None, &query).await?;
    Ok(get_user_for_user_id::v3::Response::new(from_value(found.into())?))
}
