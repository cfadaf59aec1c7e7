//! Dehydrated devices (MSC3814): `/_matrix/client/unstable/org.matrix.msc3814.v1/...`.

use axum::Router;
use ruma::{
    api::client::dehydrated_device::{
        delete_dehydrated_device, get_dehydrated_device, get_events, put_dehydrated_device,
    },
    serde::Raw,
};
use trellis_core::{Error, Result};
use trellis_service::e2ee::dehydrated::{self, NewDehydrated};

use super::keys::upload_input;

use crate::{
    AppState,
    convert::{from_value, raw_value},
    ruma_route::{self, Ctx},
};

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = ruma_route::add::<put_dehydrated_device::unstable::Request, _, _>(router, put);
    let router = ruma_route::add::<get_dehydrated_device::unstable::Request, _, _>(router, get);
    let router =
        ruma_route::add::<delete_dehydrated_device::unstable::Request, _, _>(router, delete);
    ruma_route::add::<get_events::unstable::Request, _, _>(router, events)
}

/// PUT /_matrix/client/unstable/org.matrix.msc3814.v1/dehydrated_device
async fn put(
    ctx: Ctx,
    req: put_dehydrated_device::unstable::Request,
) -> Result<put_dehydrated_device::unstable::Response> {
    let session = ctx.session()?;
    let keys = upload_input(Some(&req.device_keys), &req.one_time_keys, &req.fallback_keys)?;
    let new = NewDehydrated {
        device_id: req.device_id.to_string(),
        display_name: req.initial_device_display_name,
        device_data: raw_value(&req.device_data)?,
        keys,
    };
    dehydrated::put(&ctx.services, &session.localpart, new, &ctx.client).await?;
    Ok(put_dehydrated_device::unstable::Response::new(req.device_id))
}

/// GET /_matrix/client/unstable/org.matrix.msc3814.v1/dehydrated_device
async fn get(
    ctx: Ctx,
    _: get_dehydrated_device::unstable::Request,
) -> Result<get_dehydrated_device::unstable::Response> {
    let session = ctx.session()?;
    let device = dehydrated::get(&ctx.services, &session.localpart)?
        .ok_or_else(|| Error::not_found("No dehydrated device"))?;
    let data = Raw::from_json(
        serde_json::value::to_raw_value(&device.device_data)
            .map_err(|e| Error::internal("device data", e))?,
    );
    Ok(get_dehydrated_device::unstable::Response::new(device.device_id.into(), data))
}

/// DELETE /_matrix/client/unstable/org.matrix.msc3814.v1/dehydrated_device
async fn delete(
    ctx: Ctx,
    _: delete_dehydrated_device::unstable::Request,
) -> Result<delete_dehydrated_device::unstable::Response> {
    let session = ctx.session()?;
    let id = dehydrated::delete(&ctx.services, &session.localpart, &ctx.client).await?;
    Ok(delete_dehydrated_device::unstable::Response::new(id.into()))
}

/// POST /_matrix/client/unstable/org.matrix.msc3814.v1/dehydrated_device/{deviceId}/events
async fn events(
    ctx: Ctx,
    req: get_events::unstable::Request,
) -> Result<get_events::unstable::Response> {
    let session = ctx.session()?;
    let (events, next_batch) = dehydrated::events(
        &ctx.services,
        &session.localpart,
        req.device_id.as_str(),
        req.next_batch.as_deref(),
    )
    .await?;
    let mut resp = get_events::unstable::Response::new(from_value(events.into())?);
    resp.next_batch = Some(next_batch);
    Ok(resp)
}
