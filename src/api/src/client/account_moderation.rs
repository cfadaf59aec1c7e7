//! Account locking and suspension by server admins (spec v1.18):
//! `/_matrix/client/v1/admin/lock/{userId}` and `/_matrix/client/v1/admin/suspend/{userId}`.

use axum::Router;
use ruma::api::client::admin::{is_user_locked, is_user_suspended, lock_user, suspend_user};
use trellis_core::Result;
use trellis_service::accounts::moderation::Restriction;

use crate::{
    AppState,
    ruma_route::{self, Ctx},
};

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = ruma_route::add::<is_user_locked::v1::Request, _, _>(router, is_locked);
    let router = ruma_route::add::<lock_user::v1::Request, _, _>(router, lock);
    let router = ruma_route::add::<is_user_suspended::v1::Request, _, _>(router, is_suspended);
    ruma_route::add::<suspend_user::v1::Request, _, _>(router, suspend)
}

/// GET /_matrix/client/v1/admin/lock/{userId}
async fn is_locked(
    ctx: Ctx,
    req: is_user_locked::v1::Request,
) -> Result<is_user_locked::v1::Response> {
    let admin = &ctx.session()?.localpart;
    let locked =
        ctx.services.accounts.restricted(admin, req.user_id.as_str(), Restriction::Lock)?;
    Ok(is_user_locked::v1::Response::new(locked))
}

/// PUT /_matrix/client/v1/admin/lock/{userId}
async fn lock(ctx: Ctx, req: lock_user::v1::Request) -> Result<lock_user::v1::Response> {
    let admin = &ctx.session()?.localpart;
    let accounts = &ctx.services.accounts;
    let target = req.user_id.as_str();
    let locked =
        accounts.restrict(admin, target, Restriction::Lock, req.locked, &ctx.client).await?;
    Ok(lock_user::v1::Response::new(locked))
}

/// GET /_matrix/client/v1/admin/suspend/{userId}
async fn is_suspended(
    ctx: Ctx,
    req: is_user_suspended::v1::Request,
) -> Result<is_user_suspended::v1::Response> {
    let admin = &ctx.session()?.localpart;
    let suspended =
        ctx.services.accounts.restricted(admin, req.user_id.as_str(), Restriction::Suspend)?;
    Ok(is_user_suspended::v1::Response::new(suspended))
}

/// PUT /_matrix/client/v1/admin/suspend/{userId}
async fn suspend(ctx: Ctx, req: suspend_user::v1::Request) -> Result<suspend_user::v1::Response> {
    let admin = &ctx.session()?.localpart;
    let accounts = &ctx.services.accounts;
    let target = req.user_id.as_str();
    let on = req.suspended;
    let suspended = accounts.restrict(admin, target, Restriction::Suspend, on, &ctx.client).await?;
    Ok(suspend_user::v1::Response::new(suspended))
}
