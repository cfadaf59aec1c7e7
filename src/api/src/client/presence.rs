//! Presence: `GET`/`PUT /presence/{userId}/status`.

use std::time::Duration;

use axum::Router;
use ruma::{
    api::client::presence::{get_presence, set_presence},
    presence::PresenceState,
};
use trellis_core::Result;

use super::events::user;
use trellis_service::realtime::presence;

use crate::{
    AppState,
    ruma_route::{self, Ctx},
};

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = ruma_route::add::<get_presence::v3::Request, _, _>(router, get);
    ruma_route::add::<set_presence::v3::Request, _, _>(router, put)
}

/// GET /_matrix/client/v3/presence/{userId}/status
async fn get(ctx: Ctx, req: get_presence::v3::Request) -> Result<get_presence::v3::Response> {
    let status = presence::status_for(&ctx.services, &user(&ctx)?, &req.user_id)?;
    let mut response = get_presence::v3::Response::new(PresenceState::from(status.presence));
    response.status_msg = status.status_msg;
    response.last_active_ago = status.last_active_ago.map(Duration::from_millis);
    response.currently_active = status.currently_active;
    Ok(response)
}

/// PUT /_matrix/client/v3/presence/{userId}/status
async fn put(ctx: Ctx, req: set_presence::v3::Request) -> Result<set_presence::v3::Response> {
    ctx.require_self(&req.user_id)?;
    presence::set_presence(&ctx.services, &req.user_id, &req.presence, req.status_msg).await?;
    Ok(set_presence::v3::Response::new())
}
