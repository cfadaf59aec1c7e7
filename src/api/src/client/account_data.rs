//! Account data, global and per room.

use axum::Router;
use ruma::{
    api::client::config::{
        get_global_account_data, get_room_account_data, set_global_account_data,
        set_room_account_data,
    },
    serde::Raw,
};
use serde_json::Value;
use trellis_core::{Error, Result};

use crate::{
    AppState,
    ruma_route::{self, Ctx},
};

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = ruma_route::add::<get_global_account_data::v3::Request, _, _>(router, get_global);
    let router = ruma_route::add::<set_global_account_data::v3::Request, _, _>(router, set_global);
    let router = ruma_route::add::<get_room_account_data::v3::Request, _, _>(router, get_room);
    ruma_route::add::<set_room_account_data::v3::Request, _, _>(router, set_room)
}

fn parse<T>(raw: &Raw<T>) -> Result<Value> {
    serde_json::from_str(raw.json().get()).map_err(|e| Error::bad_json(e.to_string()))
}

fn to_raw<T>(value: &Value) -> Result<Raw<T>> {
    serde_json::value::to_raw_value(value)
        .map(Raw::from_json)
        .map_err(|e| Error::internal("account data", e))
}

fn not_found() -> Error {
    Error::not_found("No account data of this type")
}

/// GET /_matrix/client/v3/user/{userId}/account_data/{eventType}
async fn get_global(
    ctx: Ctx,
    req: get_global_account_data::v3::Request,
) -> Result<get_global_account_data::v3::Response> {
    let localpart = ctx.require_self(&req.user_id)?.localpart.clone();
    let content = ctx
        .services
        .account_data
        .get(&localpart, None, &req.event_type.to_string())?
        .ok_or_else(not_found)?;
    Ok(get_global_account_data::v3::Response::new(to_raw(&content)?))
}

/// PUT /_matrix/client/v3/user/{userId}/account_data/{eventType}
async fn set_global(
    ctx: Ctx,
    req: set_global_account_data::v3::Request,
) -> Result<set_global_account_data::v3::Response> {
    let localpart = ctx.require_self(&req.user_id)?.localpart.clone();
    let content = parse(&req.data)?;
    ctx.services.account_data.set(&localpart, None, &req.event_type.to_string(), content).await?;
    Ok(set_global_account_data::v3::Response::new())
}

/// GET /_matrix/client/v3/user/{userId}/rooms/{roomId}/account_data/{eventType}
async fn get_room(
    ctx: Ctx,
    req: get_room_account_data::v3::Request,
) -> Result<get_room_account_data::v3::Response> {
    let localpart = ctx.require_self(&req.user_id)?.localpart.clone();
    let content = ctx
        .services
        .account_data
        .get(&localpart, Some(req.room_id.as_str()), &req.event_type.to_string())?
        .ok_or_else(not_found)?;
    Ok(get_room_account_data::v3::Response::new(to_raw(&content)?))
}

/// PUT /_matrix/client/v3/user/{userId}/rooms/{roomId}/account_data/{eventType}
async fn set_room(
    ctx: Ctx,
    req: set_room_account_data::v3::Request,
) -> Result<set_room_account_data::v3::Response> {
    let localpart = ctx.require_self(&req.user_id)?.localpart.clone();
    let content = parse(&req.data)?;
    ctx.services
        .account_data
        .set(&localpart, Some(req.room_id.as_str()), &req.event_type.to_string(), content)
        .await?;
    Ok(set_room_account_data::v3::Response::new())
}
