//! Server-side key backup: `room_keys/version` and `room_keys/keys` at the three levels.

use std::collections::BTreeMap;

use axum::Router;
use ruma::{
    UInt,
    api::client::backup::{
        RoomKeyBackup, add_backup_keys, add_backup_keys_for_room, add_backup_keys_for_session,
        create_backup_version, delete_backup_keys, delete_backup_keys_for_room,
        delete_backup_keys_for_session, delete_backup_version, get_backup_info, get_backup_keys,
        get_backup_keys_for_room, get_backup_keys_for_session, get_latest_backup_info,
        update_backup_version,
    },
    serde::Raw,
};
use serde_json::Value;
use trellis_core::{Error, Result};
use trellis_service::e2ee::backup::Sessions;

use crate::{
    AppState,
    convert::{from_value, raw_value},
    ruma_route::{self, Ctx},
};

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = ruma_route::add::<create_backup_version::v3::Request, _, _>(router, create);
    let router = ruma_route::add::<get_latest_backup_info::v3::Request, _, _>(router, latest);
    let router = ruma_route::add::<get_backup_info::v3::Request, _, _>(router, info);
    let router = ruma_route::add::<update_backup_version::v3::Request, _, _>(router, update);
    let router = ruma_route::add::<delete_backup_version::v3::Request, _, _>(router, delete);
    let router = ruma_route::add::<add_backup_keys::v3::Request, _, _>(router, put_all);
    let router = ruma_route::add::<add_backup_keys_for_room::v3::Request, _, _>(router, put_room);
    let router =
        ruma_route::add::<add_backup_keys_for_session::v3::Request, _, _>(router, put_session);
    let router = ruma_route::add::<get_backup_keys::v3::Request, _, _>(router, get_all);
    let router = ruma_route::add::<get_backup_keys_for_room::v3::Request, _, _>(router, get_room);
    let router =
        ruma_route::add::<get_backup_keys_for_session::v3::Request, _, _>(router, get_session);
    let router = ruma_route::add::<delete_backup_keys::v3::Request, _, _>(router, delete_all);
    let router =
        ruma_route::add::<delete_backup_keys_for_room::v3::Request, _, _>(router, delete_room);
    ruma_route::add::<delete_backup_keys_for_session::v3::Request, _, _>(router, delete_session)
}

fn localpart(ctx: &Ctx) -> Result<String> {
    Ok(ctx.session()?.localpart.clone())
}

const CURVE25519: &str = "m.megolm_backup.v1.curve25519-aes-sha2";
/// The spec's backup algorithm, and MSC3270's symmetric one (which clients also create).
const KNOWN_ALGORITHMS: [&str; 2] = [CURVE25519, "org.matrix.msc3270.v1.aes-hmac-sha2"];

/// `{algorithm, auth_data}` of a backup version body.
fn algorithm_and_auth(body: &Value) -> Result<(String, Value)> {
    let algorithm = body.get("algorithm").and_then(Value::as_str);
    let auth_data = body.get("auth_data").filter(|v| v.is_object());
    match (algorithm, auth_data) {
        (Some(a), _) if !KNOWN_ALGORITHMS.contains(&a) => Err(Error::invalid_param(format!(
            "Unknown backup algorithm {a}; known: {}",
            KNOWN_ALGORITHMS.join(", ")
        ))),
        (Some(a), Some(d)) if !d["public_key"].is_string() && a == CURVE25519 => {
            Err(Error::bad_json("auth_data of this algorithm needs a public_key"))
        }
        (Some(a), Some(d)) => Ok((a.to_owned(), d.clone())),
        _ => Err(Error::bad_json("A backup needs an algorithm and an auth_data object")),
    }
}

fn count(n: u64) -> UInt {
    UInt::new_saturating(n)
}

fn sessions_of<T>(sessions: &BTreeMap<String, Raw<T>>) -> Result<BTreeMap<String, Value>> {
    sessions.iter().map(|(id, data)| Ok((id.clone(), raw_value(data)?))).collect()
}

/// POST /_matrix/client/v3/room_keys/version
async fn create(
    ctx: Ctx,
    req: create_backup_version::v3::Request,
) -> Result<create_backup_version::v3::Response> {
    let (algorithm, auth_data) = algorithm_and_auth(&raw_value(&req.algorithm)?)?;
    let version = ctx.services.e2ee.create_backup(&localpart(&ctx)?, algorithm, auth_data).await?;
    Ok(create_backup_version::v3::Response::new(version))
}

/// The version's info as ruma's response fields.
fn info_parts(
    info: Value,
) -> Result<(Raw<ruma::api::client::backup::BackupAlgorithm>, UInt, String, String)> {
    let algorithm = from_value(serde_json::json!({
        "algorithm": info["algorithm"],
        "auth_data": info["auth_data"],
    }))?;
    let n = count(info["count"].as_u64().unwrap_or(0));
    let etag = info["etag"].as_str().unwrap_or_default().to_owned();
    let version = info["version"].as_str().unwrap_or_default().to_owned();
    Ok((algorithm, n, etag, version))
}

/// GET /_matrix/client/v3/room_keys/version
async fn latest(
    ctx: Ctx,
    _: get_latest_backup_info::v3::Request,
) -> Result<get_latest_backup_info::v3::Response> {
    let info = ctx.services.e2ee.backup_info(&localpart(&ctx)?, None)?;
    let (algorithm, n, etag, version) = info_parts(info)?;
    Ok(get_latest_backup_info::v3::Response::new(algorithm, n, etag, version))
}

/// GET /_matrix/client/v3/room_keys/version/{version}
async fn info(
    ctx: Ctx,
    req: get_backup_info::v3::Request,
) -> Result<get_backup_info::v3::Response> {
    let info = ctx.services.e2ee.backup_info(&localpart(&ctx)?, Some(&req.version))?;
    let (algorithm, n, etag, version) = info_parts(info)?;
    Ok(get_backup_info::v3::Response::new(algorithm, n, etag, version))
}

/// PUT /_matrix/client/v3/room_keys/version/{version}
async fn update(
    ctx: Ctx,
    req: update_backup_version::v3::Request,
) -> Result<update_backup_version::v3::Response> {
    let body = raw_value(&req.algorithm)?;
    let (algorithm, auth_data) = algorithm_and_auth(&body)?;
    let body_version = body.get("version").and_then(Value::as_str);
    ctx.services
        .e2ee
        .update_backup(&localpart(&ctx)?, &req.version, &algorithm, auth_data, body_version)
        .await?;
    Ok(update_backup_version::v3::Response::new())
}

/// DELETE /_matrix/client/v3/room_keys/version/{version}
async fn delete(
    ctx: Ctx,
    req: delete_backup_version::v3::Request,
) -> Result<delete_backup_version::v3::Response> {
    ctx.services.e2ee.delete_backup(&localpart(&ctx)?, &req.version).await?;
    Ok(delete_backup_version::v3::Response::new())
}

async fn put(ctx: &Ctx, version: &str, rooms: Sessions) -> Result<(String, UInt)> {
    let (etag, n) = ctx.services.e2ee.put_backup_keys(&localpart(ctx)?, version, rooms).await?;
    Ok((etag, count(n)))
}

/// PUT /_matrix/client/v3/room_keys/keys
async fn put_all(
    ctx: Ctx,
    req: add_backup_keys::v3::Request,
) -> Result<add_backup_keys::v3::Response> {
    let mut rooms = Sessions::new();
    for (room, backup) in &req.rooms {
        rooms.insert(room.to_string(), sessions_of(&backup.sessions)?);
    }
    let (etag, n) = put(&ctx, &req.version, rooms).await?;
    Ok(add_backup_keys::v3::Response::new(etag, n))
}

/// PUT /_matrix/client/v3/room_keys/keys/{roomId}
async fn put_room(
    ctx: Ctx,
    req: add_backup_keys_for_room::v3::Request,
) -> Result<add_backup_keys_for_room::v3::Response> {
    let rooms = Sessions::from([(req.room_id.to_string(), sessions_of(&req.sessions)?)]);
    let (etag, n) = put(&ctx, &req.version, rooms).await?;
    Ok(add_backup_keys_for_room::v3::Response::new(etag, n))
}

/// PUT /_matrix/client/v3/room_keys/keys/{roomId}/{sessionId}
async fn put_session(
    ctx: Ctx,
    req: add_backup_keys_for_session::v3::Request,
) -> Result<add_backup_keys_for_session::v3::Response> {
    let session = BTreeMap::from([(req.session_id.clone(), raw_value(&req.session_data)?)]);
    let rooms = Sessions::from([(req.room_id.to_string(), session)]);
    let (etag, n) = put(&ctx, &req.version, rooms).await?;
    Ok(add_backup_keys_for_session::v3::Response::new(etag, n))
}

fn to_ruma_sessions(sessions: BTreeMap<String, Value>) -> Result<RoomKeyBackup> {
    Ok(RoomKeyBackup::new(from_value(Value::Object(sessions.into_iter().collect()))?))
}

/// GET /_matrix/client/v3/room_keys/keys
async fn get_all(
    ctx: Ctx,
    req: get_backup_keys::v3::Request,
) -> Result<get_backup_keys::v3::Response> {
    let rooms = ctx.services.e2ee.get_backup_keys(&localpart(&ctx)?, &req.version, None)?;
    let mut out = BTreeMap::new();
    for (room, sessions) in rooms {
        let room = room.try_into().map_err(|_| Error::internal("stored room id", "invalid"))?;
        out.insert(room, to_ruma_sessions(sessions)?);
    }
    Ok(get_backup_keys::v3::Response::new(out))
}

/// GET /_matrix/client/v3/room_keys/keys/{roomId}
async fn get_room(
    ctx: Ctx,
    req: get_backup_keys_for_room::v3::Request,
) -> Result<get_backup_keys_for_room::v3::Response> {
    let room = req.room_id.as_str();
    let mut rooms =
        ctx.services.e2ee.get_backup_keys(&localpart(&ctx)?, &req.version, Some(room))?;
    let sessions = rooms.remove(room).unwrap_or_default();
    Ok(get_backup_keys_for_room::v3::Response::new(to_ruma_sessions(sessions)?.sessions))
}

/// GET /_matrix/client/v3/room_keys/keys/{roomId}/{sessionId}
async fn get_session(
    ctx: Ctx,
    req: get_backup_keys_for_session::v3::Request,
) -> Result<get_backup_keys_for_session::v3::Response> {
    let data = ctx.services.e2ee.get_backup_session(
        &localpart(&ctx)?,
        &req.version,
        req.room_id.as_str(),
        &req.session_id,
    )?;
    Ok(get_backup_keys_for_session::v3::Response::new(from_value(data)?))
}

async fn remove(
    ctx: &Ctx,
    version: &str,
    room: Option<&str>,
    session: Option<&str>,
) -> Result<(String, UInt)> {
    let (etag, n) =
        ctx.services.e2ee.delete_backup_keys(&localpart(ctx)?, version, room, session).await?;
    Ok((etag, count(n)))
}

/// DELETE /_matrix/client/v3/room_keys/keys
async fn delete_all(
    ctx: Ctx,
    req: delete_backup_keys::v3::Request,
) -> Result<delete_backup_keys::v3::Response> {
    let (etag, n) = remove(&ctx, &req.version, None, None).await?;
    Ok(delete_backup_keys::v3::Response::new(etag, n))
}

/// DELETE /_matrix/client/v3/room_keys/keys/{roomId}
async fn delete_room(
    ctx: Ctx,
    req: delete_backup_keys_for_room::v3::Request,
) -> Result<delete_backup_keys_for_room::v3::Response> {
    let (etag, n) = remove(&ctx, &req.version, Some(req.room_id.as_str()), None).await?;
    Ok(delete_backup_keys_for_room::v3::Response::new(etag, n))
}

/// DELETE /_matrix/client/v3/room_keys/keys/{roomId}/{sessionId}
async fn delete_session(
    ctx: Ctx,
    req: delete_backup_keys_for_session::v3::Request,
) -> Result<delete_backup_keys_for_session::v3::Response> {
    let room = Some(req.room_id.as_str());
    let (etag, n) = remove(&ctx, &req.version, room, Some(&req.session_id)).await?;
    Ok(delete_backup_keys_for_session::v3::Response::new(etag, n))
}
