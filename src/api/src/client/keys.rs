//! End-to-end encryption keys: `keys/upload`, `keys/query`, `keys/claim`,
//! `keys/changes`, `keys/device_signing/upload`, `keys/signatures/upload`.

use std::collections::BTreeMap;

use axum::Router;
use ruma::{
    OwnedOneTimeKeyId, UInt,
    api::client::keys::{
        claim_keys, get_key_changes, get_keys, upload_keys, upload_signatures, upload_signing_keys,
    },
    encryption::{DeviceKeys, OneTimeKey},
    serde::Raw,
};
use serde_json::Value;
use trellis_core::{Error, Result};
use trellis_service::{
    e2ee::{
        cross_signing::{self, SigningUpload},
        device_keys::{self, Upload},
        device_lists,
    },
    realtime::sync::SyncToken,
};

use super::{events::me, uia::reauthenticate};
use crate::{
    AppState,
    convert::{from_value, raw_value},
    ruma_route::{self, Ctx},
};

/// Clients iterate `failures` unconditionally; ruma leaves an empty map out.
fn failures(body: &mut Value) {
    if let Some(body) = body.as_object_mut() {
        body.entry("failures").or_insert_with(|| Value::Object(Default::default()));
    }
}

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = ruma_route::add::<upload_keys::v3::Request, _, _>(router, upload);
    let router =
        ruma_route::add_patched::<get_keys::v3::Request, _, _>(router, query, Some(failures));
    let router =
        ruma_route::add_patched::<claim_keys::v3::Request, _, _>(router, claim, Some(failures));
    let router = ruma_route::add::<get_key_changes::v3::Request, _, _>(router, changes);
    let router = ruma_route::add::<upload_signing_keys::v3::Request, _, _>(router, signing_keys);
    ruma_route::add::<upload_signatures::v3::Request, _, _>(router, signatures)
}

/// POST /_matrix/client/v3/keys/upload
async fn upload(ctx: Ctx, req: upload_keys::v3::Request) -> Result<upload_keys::v3::Response> {
    let session = ctx.session()?;
    let input = upload_input(req.device_keys.as_ref(), &req.one_time_keys, &req.fallback_keys)?;
    let counts =
        device_keys::upload_keys(&ctx.services, &session.localpart, &session.device_id, input)
            .await?;
    let counts = counts.into_iter().map(|(alg, n)| (alg.into(), UInt::new_saturating(n))).collect();
    Ok(upload_keys::v3::Response::new(counts))
}

/// Keys a device publishes, as the service takes them (also a dehydrated device's).
pub(super) fn upload_input(
    device_keys: Option<&Raw<DeviceKeys>>,
    one_time_keys: &BTreeMap<OwnedOneTimeKeyId, Raw<OneTimeKey>>,
    fallback_keys: &BTreeMap<OwnedOneTimeKeyId, Raw<OneTimeKey>>,
) -> Result<Upload> {
    let mut input =
        Upload { device_keys: device_keys.map(raw_value).transpose()?, ..Default::default() };
    for (id, key) in one_time_keys {
        input.one_time_keys.insert(id.to_string(), raw_value(key)?);
    }
    for (id, key) in fallback_keys {
        input.fallback_keys.insert(id.to_string(), raw_value(key)?);
    }
    Ok(input)
}

/// POST /_matrix/client/v3/keys/query
async fn query(ctx: Ctx, req: get_keys::v3::Request) -> Result<get_keys::v3::Response> {
    let user_id = me(&ctx)?;
    let requested: BTreeMap<String, Vec<String>> = req
        .device_keys
        .iter()
        .map(|(u, ds)| (u.to_string(), ds.iter().map(ToString::to_string).collect()))
        .collect();
    let (local, remote) = split_by_server(&ctx, requested);
    let mut out = ctx.services.e2ee.query(Some(&user_id), &local)?;
    if !remote.is_empty() {
        let (answers, failures) = ctx
            .services
            .federation
            .remote_keys("/_matrix/federation/v1/user/keys/query", "device_keys", remote)
            .await;
        for answer in answers {
            for field in ["device_keys", "master_keys", "self_signing_keys"] {
                if let (Some(into), Some(from)) =
                    (out[field].as_object_mut(), answer.get(field).and_then(Value::as_object))
                {
                    into.extend(from.clone());
                }
            }
        }
        if let Some(into) = out["failures"].as_object_mut() {
            into.extend(failures);
        }
    }
    let mut resp = get_keys::v3::Response::new();
    resp.device_keys = from_value(out["device_keys"].clone())?;
    resp.master_keys = from_value(out["master_keys"].clone())?;
    resp.self_signing_keys = from_value(out["self_signing_keys"].clone())?;
    resp.user_signing_keys = from_value(out["user_signing_keys"].clone())?;
    resp.failures = from_value(out["failures"].clone())?;
    Ok(resp)
}

/// POST /_matrix/client/v3/keys/claim
async fn claim(ctx: Ctx, req: claim_keys::v3::Request) -> Result<claim_keys::v3::Response> {
    ctx.session()?;
    let requested: BTreeMap<String, BTreeMap<String, String>> = req
        .one_time_keys
        .iter()
        .map(|(u, ds)| {
            let devices = ds.iter().map(|(d, alg)| (d.to_string(), alg.to_string())).collect();
            (u.to_string(), devices)
        })
        .collect();
    let (local, remote) = split_by_server(&ctx, requested);
    let mut claimed = ctx.services.e2ee.claim(&local).await?;
    let mut failures = serde_json::json!({});
    if !remote.is_empty() {
        let (answers, remote_failures) = ctx
            .services
            .federation
            .remote_keys("/_matrix/federation/v1/user/keys/claim", "one_time_keys", remote)
            .await;
        for answer in answers {
            if let (Some(into), Some(from)) =
                (claimed.as_object_mut(), answer.get("one_time_keys").and_then(Value::as_object))
            {
                into.extend(from.clone());
            }
        }
        if let Some(into) = failures.as_object_mut() {
            into.extend(remote_failures);
        }
    }
    let mut resp = claim_keys::v3::Response::new(from_value(claimed)?);
    resp.failures = from_value(failures)?;
    Ok(resp)
}

/// GET /_matrix/client/v3/keys/changes
async fn changes(
    ctx: Ctx,
    req: get_key_changes::v3::Request,
) -> Result<get_key_changes::v3::Response> {
    let user_id = me(&ctx)?;
    let parse = |t: &str| {
        SyncToken::parse(t)
            .map(|t| t.position)
            .ok_or_else(|| Error::invalid_param("Invalid stream token"))
    };
    let (from, to) = (parse(&req.from)?, parse(&req.to)?);
    // `to` may not be ahead of what has been written.
    let to = to.min(ctx.services.rooms.stream.visible());
    let lists = device_lists::changes(&ctx.services, &user_id, from, to)?;
    Ok(get_key_changes::v3::Response::new(
        from_value(lists.changed.into())?,
        from_value(lists.left.into())?,
    ))
}

/// POST /_matrix/client/v3/keys/device_signing/upload
async fn signing_keys(
    ctx: Ctx,
    req: upload_signing_keys::v3::Request,
) -> Result<upload_signing_keys::v3::Response> {
    let localpart = ctx.session()?.localpart.clone();
    let upload = SigningUpload {
        master: req.master_key.as_ref().map(raw_value).transpose()?,
        self_signing: req.self_signing_key.as_ref().map(raw_value).transpose()?,
        user_signing: req.user_signing_key.as_ref().map(raw_value).transpose()?,
    };
    // Replacing existing keys needs the user's password; a first upload or a retry of
    // the same keys does not.
    if ctx.services.e2ee.signing_upload_needs_auth(&localpart, &upload)? {
        reauthenticate(&ctx, req.auth.as_ref(), "device_signing_upload").await?;
    }
    cross_signing::upload_signing_keys(&ctx.services, &localpart, upload).await?;
    Ok(upload_signing_keys::v3::Response::new())
}

/// POST /_matrix/client/v3/keys/signatures/upload
async fn signatures(
    ctx: Ctx,
    req: upload_signatures::v3::Request,
) -> Result<upload_signatures::v3::Response> {
    let localpart = ctx.session()?.localpart.clone();
    let mut signed: BTreeMap<String, BTreeMap<String, Value>> = BTreeMap::new();
    for (user, keys) in &req.signed_keys {
        let per_user = signed.entry(user.to_string()).or_default();
        for (key_id, object) in keys.iter() {
            let value =
                serde_json::from_str(object.get()).map_err(|e| Error::bad_json(e.to_string()))?;
            per_user.insert(key_id.to_string(), value);
        }
    }
    let failures = cross_signing::upload_signatures(&ctx.services, &localpart, signed).await?;
    let mut resp = upload_signatures::v3::Response::new();
    resp.failures = from_value(failures)?;
    Ok(resp)
}

/// Splits a per-user request into this server's users and, by server, everyone else's.
fn split_by_server<T: serde::Serialize>(
    ctx: &Ctx,
    requested: BTreeMap<String, T>,
) -> (BTreeMap<String, T>, BTreeMap<String, Value>) {
    let mut local = BTreeMap::new();
    let mut remote: BTreeMap<String, Value> = BTreeMap::new();
    for (user, wanted) in requested {
        if ctx.services.accounts.local_part(&user).is_some() {
            local.insert(user, wanted);
        } else if let Some(server) = trellis_service::federation::server_of(&user) {
            let entry = remote.entry(server.to_owned()).or_insert_with(|| serde_json::json!({}));
            entry[user.as_str()] = serde_json::to_value(&wanted).unwrap_or(Value::Null);
        }
    }
    (local, remote)
}
