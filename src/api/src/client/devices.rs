//! `/devices`: list, get, rename, delete (with re-authentication). Application services
//! also create their users' devices with `PUT` and delete them without re-authenticating
//! (spec v1.17, MSC4190).

use axum::{
    Router,
    body::Bytes,
    extract::Path,
    response::{IntoResponse, Response},
    routing::put,
};
use http::StatusCode;
use ruma::{
    MilliSecondsSinceUnixEpoch, UInt,
    api::client::device::{self, delete_device, delete_devices, get_device, get_devices},
};
use serde::Deserialize;
use trellis_core::Result;
use trellis_service::accounts::{DeviceInfo, devices};

use super::uia::reauthenticate;
use crate::{
    AppState,
    response::{ApiError, json_response},
    ruma_route::{self, Authenticated, Ctx, json_error},
};

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router =
        ruma_route::add_patched::<get_devices::v3::Request, _, _>(router, list, Some(no_nulls));
    let router =
        ruma_route::add_patched::<get_device::v3::Request, _, _>(router, get, Some(no_nulls));
    let router =
        ["/_matrix/client/v3/devices/{device_id}", "/_matrix/client/r0/devices/{device_id}"]
            .into_iter()
            .fold(router, |router, path| router.route(path, put(update)));
    let router = ruma_route::add::<delete_device::v3::Request, _, _>(router, delete_one);
    ruma_route::add::<delete_devices::v3::Request, _, _>(router, delete_many)
}

/// A device's unset fields (`display_name`, `last_seen_ip`, `last_seen_ts`) are left out,
/// not `null`: clients read a present `display_name` as a name.
fn no_nulls(body: &mut serde_json::Value) {
    let drop_nulls = |device: &mut serde_json::Value| {
        if let Some(fields) = device.as_object_mut() {
            fields.retain(|_, v| !v.is_null());
        }
    };
    match body.get_mut("devices").and_then(serde_json::Value::as_array_mut) {
        Some(devices) => devices.iter_mut().for_each(drop_nulls),
        None => drop_nulls(body),
    }
}

fn to_ruma(d: DeviceInfo) -> device::Device {
    let mut out = device::Device::new(d.device_id.into());
    out.display_name = d.display_name;
    out.last_seen_ip = d.last_seen_ip;
    out.last_seen_ts = d.last_seen_ms.and_then(UInt::new).map(MilliSecondsSinceUnixEpoch);
    out
}

/// GET /_matrix/client/v3/devices
async fn list(ctx: Ctx, _: get_devices::v3::Request) -> Result<get_devices::v3::Response> {
    let devices = ctx.services.accounts.devices(&ctx.session()?.localpart)?;
    Ok(get_devices::v3::Response::new(devices.into_iter().map(to_ruma).collect()))
}

/// GET /_matrix/client/v3/devices/{deviceId}
async fn get(ctx: Ctx, req: get_device::v3::Request) -> Result<get_device::v3::Response> {
    let device = ctx.services.accounts.device(&ctx.session()?.localpart, req.device_id.as_str())?;
    Ok(get_device::v3::Response::new(to_ruma(device)))
}

#[derive(Deserialize)]
struct DeviceUpdate {
    display_name: Option<String>,
}

/// PUT /_matrix/client/v3/devices/{deviceId}
async fn update(
    Authenticated(ctx): Authenticated,
    Path(device_id): Path<String>,
    body: Bytes,
) -> Response {
    let answer = async {
        let req: DeviceUpdate = match body.is_empty() {
            true => DeviceUpdate { display_name: None },
            false => serde_json::from_slice(&body).map_err(json_error)?,
        };
        let session = ctx.session()?;
        devices::put_device(&ctx.services, session, &device_id, req.display_name).await
    };
    match answer.await {
        Ok(created) => {
            let status = if created { StatusCode::CREATED } else { StatusCode::OK };
            json_response(status, b"{}".to_vec())
        }
        Err(e) => ApiError(e).into_response(),
    }
}

async fn delete(
    ctx: &Ctx,
    ids: Vec<String>,
    auth: Option<&ruma::api::client::uiaa::AuthData>,
) -> Result<()> {
    let session = ctx.session()?;
    // An application service manages its users' devices itself (spec v1.17).
    let localpart = match session.appservice {
        Some(_) => session.localpart.clone(),
        None => reauthenticate(ctx, auth, "delete_devices").await?,
    };
    devices::delete_devices(&ctx.services, &localpart, &ids, &ctx.client).await
}

/// DELETE /_matrix/client/v3/devices/{deviceId}
async fn delete_one(
    ctx: Ctx,
    req: delete_device::v3::Request,
) -> Result<delete_device::v3::Response> {
    // Deleting an unknown device is 404, before any re-authentication round trip; an
    // application service (which needs none) may repeat a deletion.
    let session = ctx.session()?;
    if session.appservice.is_none() {
        ctx.services.accounts.device(&session.localpart, req.device_id.as_str())?;
    }
    delete(&ctx, vec![req.device_id.to_string()], req.auth.as_ref()).await?;
    Ok(delete_device::v3::Response::new())
}

/// POST /_matrix/client/v3/delete_devices
async fn delete_many(
    ctx: Ctx,
    req: delete_devices::v3::Request,
) -> Result<delete_devices::v3::Response> {
    let ids = req.devices.iter().map(|d| d.to_string()).collect();
    delete(&ctx, ids, req.auth.as_ref()).await?;
    Ok(delete_devices::v3::Response::new())
}
