//! Presence: `GET`/`PUT /presence/{userId}/status`.

use ruma::events::room::member::MembershipState;
use std::{collections::HashSet, time::Duration};

use axum::Router;
use ruma::{
    api::client::presence::{get_presence, set_presence},
    presence::PresenceState,
};
use trellis_core::{Error, Result};

use super::events::me;
use trellis_service::realtime::presence;

use crate::{
    AppState,
    ruma_route::{self, Ctx},
};

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = ruma_route::add::<get_presence::v3::Request, _, _>(router, get);
    ruma_route::add::<set_presence::v3::Request, _, _>(router, put)
}

/// Another user's presence is visible to those sharing a joined room with them.
fn require_visible(ctx: &Ctx, viewer: &str, target: &str) -> Result<()> {
    if viewer == target {
        return Ok(());
    }
    if let Some(localpart) = ctx.services.accounts.local_part(target)
        && ctx.services.accounts.user(localpart)?.is_none()
    {
        return Err(Error::not_found("No such user"));
    }
    let rooms = &ctx.services.rooms;
    let mine: HashSet<String> =
        rooms.rooms_of(viewer, &MembershipState::Join)?.into_iter().collect();
    if rooms.rooms_of(target, &MembershipState::Join)?.iter().any(|room| mine.contains(room)) {
        Ok(())
    } else {
        Err(Error::forbidden("You do not share a room with this user"))
    }
}

/// GET /_matrix/client/v3/presence/{userId}/status
async fn get(ctx: Ctx, req: get_presence::v3::Request) -> Result<get_presence::v3::Response> {
    let viewer = me(&ctx)?;
    let target = req.user_id.as_str();
    require_visible(&ctx, &viewer, target)?;
    let status = ctx.services.presence.status(target)?;
    let mut response = get_presence::v3::Response::new(PresenceState::from(status.presence));
    response.status_msg = status.status_msg;
    response.last_active_ago = status.last_active_ago.map(Duration::from_millis);
    response.currently_active = status.currently_active;
    Ok(response)
}

/// PUT /_matrix/client/v3/presence/{userId}/status
async fn put(ctx: Ctx, req: set_presence::v3::Request) -> Result<set_presence::v3::Response> {
    ctx.require_self(&req.user_id)?;
    // A status message left out clears the previous one: the request sets the whole state.
    presence::set_presence(
        &ctx.services,
        req.user_id.as_str(),
        req.presence.as_str(),
        req.status_msg,
    )
    .await?;
    Ok(set_presence::v3::Response::new())
}
