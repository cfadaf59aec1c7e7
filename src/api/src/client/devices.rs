//! `/devices`: list, get, rename, delete (with re-authentication).

use axum::Router;
use ruma::{
    MilliSecondsSinceUnixEpoch, UInt,
    api::client::device::{
        self, delete_device, delete_devices, get_device, get_devices, update_device,
    },
};
use trellis_core::Result;
use trellis_service::accounts::{DeviceInfo, devices};

use super::uia::reauthenticate;
use crate::{
    AppState,
    ruma_route::{self, Ctx},
};

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = ruma_route::add::<get_devices::v3::Request, _, _>(router, list);
    let router = ruma_route::add::<get_device::v3::Request, _, _>(router, get);
    let router = ruma_route::add::<update_device::v3::Request, _, _>(router, update);
    let router = ruma_route::add::<delete_device::v3::Request, _, _>(router, delete_one);
    ruma_route::add::<delete_devices::v3::Request, _, _>(router, delete_many)
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

/// PUT /_matrix/client/v3/devices/{deviceId}
async fn update(ctx: Ctx, req: update_device::v3::Request) -> Result<update_device::v3::Response> {
    let localpart = ctx.session()?.localpart.clone();
    ctx.services
        .accounts
        .rename_device(&localpart, req.device_id.as_str(), req.display_name)
        .await?;
    Ok(update_device::v3::Response::new())
}

async fn delete(
    ctx: &Ctx,
    ids: Vec<String>,
    auth: Option<&ruma::api::client::uiaa::AuthData>,
) -> Result<()> {
    let localpart = reauthenticate(ctx, auth, "delete_devices").await?;
    devices::delete_devices(&ctx.services, &localpart, &ids, &ctx.client).await
}

/// DELETE /_matrix/client/v3/devices/{deviceId}
async fn delete_one(
    ctx: Ctx,
    req: delete_device::v3::Request,
) -> Result<delete_device::v3::Response> {
    // Deleting an unknown device is 404, before any re-authentication round trip.
    ctx.services.accounts.device(&ctx.session()?.localpart, req.device_id.as_str())?;
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
