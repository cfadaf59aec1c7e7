//! The server-server API: queries other servers make of this one (profiles, aliases,
//! devices and keys) and the notary key server. Every endpoint but the notary requires
//! a valid X-Matrix signature (checked in `ruma_route`).

use std::collections::BTreeMap;

use axum::Router;
use ruma::{
    UInt,
    api::federation::{
        device::get_devices,
        discovery::{get_remote_server_keys, get_remote_server_keys_batch},
        keys::{claim_keys, get_keys},
        openid::get_openid_userinfo,
        query::{get_profile_information, get_room_information},
    },
    serde::Raw,
};
use serde_json::Value;
use trellis_core::{Error, ErrorKind, Result};

use crate::{
    AppState,
    convert::from_value,
    ruma_route::{self, Ctx},
};

mod rooms;
mod spaces;

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = rooms::routes(router);
    let router = spaces::routes(router);
    let router = ruma_route::add::<get_profile_information::v1::Request, _, _>(router, profile);
    let router = ruma_route::add::<get_room_information::v1::Request, _, _>(router, directory);
    let router = ruma_route::add::<get_devices::v1::Request, _, _>(router, devices);
    let router = ruma_route::add::<get_keys::v1::Request, _, _>(router, query_keys);
    let router = ruma_route::add::<claim_keys::v1::Request, _, _>(router, claim);
    let router = ruma_route::add::<get_openid_userinfo::v1::Request, _, _>(router, userinfo);
    let router = ruma_route::add::<get_remote_server_keys::v2::Request, _, _>(router, notary_one);
    ruma_route::add::<get_remote_server_keys_batch::v2::Request, _, _>(router, notary_batch)
}

/// The localpart of an active local user, else 404.
fn local_user(ctx: &Ctx, user_id: &str) -> Result<String> {
    let not_found = || Error::not_found("No such user");
    let localpart = ctx.services.accounts.local_part(user_id).ok_or_else(not_found)?;
    match ctx.services.accounts.user(localpart)? {
        Some(u) if !u.deactivated => Ok(localpart.to_owned()),
        _ => Err(not_found()),
    }
}

/// GET /_matrix/federation/v1/openid/userinfo
///
/// Who an OpenID token (from `/openid/request_token`) belongs to. Asked by services
/// that are not homeservers, so the request is not signed; an unknown or expired token
/// is 401 `M_UNKNOWN_TOKEN`.
async fn userinfo(
    ctx: Ctx,
    req: get_openid_userinfo::v1::Request,
) -> Result<get_openid_userinfo::v1::Response> {
    let localpart = ctx.services.accounts.openid_owner(&req.access_token)?.ok_or_else(|| {
        Error::new(
            ErrorKind::Unauthenticated,
            trellis_core::error::code::UNKNOWN_TOKEN,
            "Unknown or expired OpenID token",
        )
    })?;
    let user = ruma::UserId::parse(ctx.services.accounts.user_id(&localpart))
        .map_err(|e| Error::internal("user id", e))?;
    Ok(get_openid_userinfo::v1::Response::new(user))
}

/// GET /_matrix/federation/v1/query/profile
async fn profile(
    ctx: Ctx,
    req: get_profile_information::v1::Request,
) -> Result<get_profile_information::v1::Response> {
    let localpart = local_user(&ctx, req.user_id.as_str())?;
    let mut profile = ruma::api::federation::query::get_profile_information::v1::Response::new();
    for (field, value) in ctx.services.profiles.get_all(&localpart)? {
        if req.field.as_ref().is_none_or(|f| f.as_str() == field) {
            profile.data.set(field, value);
        }
    }
    Ok(profile)
}

/// GET /_matrix/federation/v1/query/directory
async fn directory(
    ctx: Ctx,
    req: get_room_information::v1::Request,
) -> Result<get_room_information::v1::Response> {
    let (room_id, servers) = crate::client::local_alias(&ctx.services, req.room_alias.as_str())?;
    Ok(get_room_information::v1::Response::new(room_id, servers))
}

/// GET /_matrix/federation/v1/user/devices/{userId}
async fn devices(ctx: Ctx, req: get_devices::v1::Request) -> Result<get_devices::v1::Response> {
    let localpart = local_user(&ctx, req.user_id.as_str())?;
    let out = ctx.services.e2ee.user_devices(&localpart)?;
    let devices = from_value(out["devices"].clone())?;
    let stream_id = UInt::new_saturating(out["stream_id"].as_u64().unwrap_or(0));
    let mut resp = get_devices::v1::Response::new(req.user_id, stream_id);
    resp.devices = devices;
    resp.master_key = out.get("master_key").map(|k| from_value(k.clone())).transpose()?;
    resp.self_signing_key =
        out.get("self_signing_key").map(|k| from_value(k.clone())).transpose()?;
    Ok(resp)
}

/// POST /_matrix/federation/v1/user/keys/query
async fn query_keys(ctx: Ctx, req: get_keys::v1::Request) -> Result<get_keys::v1::Response> {
    let origin = ctx.origin()?.to_owned();
    // Only this server's users; another server's user-signing keys are never shown.
    let requested: BTreeMap<String, Vec<String>> = req
        .device_keys
        .iter()
        .filter(|(u, _)| ctx.services.accounts.local_part(u.as_str()).is_some())
        .map(|(u, ds)| (u.to_string(), ds.iter().map(ToString::to_string).collect()))
        .collect();
    tracing::debug!(origin, users = requested.len(), "federation keys query");
    let out = ctx.services.e2ee.query(None, &requested)?;
    let mut resp = get_keys::v1::Response::new(from_value(out["device_keys"].clone())?);
    resp.master_keys = from_value(out["master_keys"].clone())?;
    resp.self_signing_keys = from_value(out["self_signing_keys"].clone())?;
    Ok(resp)
}

/// POST /_matrix/federation/v1/user/keys/claim
async fn claim(ctx: Ctx, req: claim_keys::v1::Request) -> Result<claim_keys::v1::Response> {
    ctx.origin()?;
    let requested: BTreeMap<String, BTreeMap<String, String>> = req
        .one_time_keys
        .iter()
        .filter(|(u, _)| ctx.services.accounts.local_part(u.as_str()).is_some())
        .map(|(u, ds)| {
            (u.to_string(), ds.iter().map(|(d, a)| (d.to_string(), a.to_string())).collect())
        })
        .collect();
    let claimed = ctx.services.e2ee.claim(&requested).await?;
    Ok(claim_keys::v1::Response::new(from_value(claimed)?))
}

fn signed_keys(
    responses: Vec<Value>,
) -> Result<Vec<Raw<ruma::api::federation::discovery::ServerSigningKeys>>> {
    responses.into_iter().map(from_value).collect()
}

/// GET /_matrix/key/v2/query/{serverName}
async fn notary_one(
    ctx: Ctx,
    req: get_remote_server_keys::v2::Request,
) -> Result<get_remote_server_keys::v2::Response> {
    let servers = BTreeMap::from([(
        req.server_name.to_string(),
        u64::from(req.minimum_valid_until_ts.get()),
    )]);
    let out = ctx.services.federation.notary(&servers).await?;
    Ok(get_remote_server_keys::v2::Response::new(signed_keys(out)?))
}

/// POST /_matrix/key/v2/query
async fn notary_batch(
    ctx: Ctx,
    req: get_remote_server_keys_batch::v2::Request,
) -> Result<get_remote_server_keys_batch::v2::Response> {
    let mut servers = BTreeMap::new();
    for (server, keys) in &req.server_keys {
        let minimum = keys
            .values()
            .filter_map(|c| c.minimum_valid_until_ts.map(|t| u64::from(t.get())))
            .max()
            .unwrap_or(0);
        servers.insert(server.to_string(), minimum);
    }
    let out = ctx.services.federation.notary(&servers).await?;
    Ok(get_remote_server_keys_batch::v2::Response::new(signed_keys(out)?))
}
