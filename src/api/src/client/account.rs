//! Registration, username availability and `whoami`.

use axum::Router;
use ruma::{
    OwnedUserId, UserId,
    api::client::account::{get_username_availability, register, whoami},
};
use trellis_core::{Error, Result};
use trellis_service::accounts::RegisterRequest;

use crate::{
    AppState,
    ruma_route::{self, Ctx},
};

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = ruma_route::add::<register::v3::Request, _, _>(router, register);
    let router = ruma_route::add::<get_username_availability::v3::Request, _, _>(router, available);
    ruma_route::add::<whoami::v3::Request, _, _>(router, whoami)
}

fn user_id(ctx: &Ctx, localpart: &str) -> Result<OwnedUserId> {
    UserId::parse(ctx.services.accounts.user_id(localpart))
        .map_err(|e| Error::internal("building a user id", e))
}

async fn register(ctx: Ctx, req: register::v3::Request) -> Result<register::v3::Response> {
    if req.kind == register::RegistrationKind::Guest {
        return Err(Error::forbidden("Guest access is disabled"));
    }
    let registered = ctx
        .services
        .accounts
        .register(RegisterRequest {
            username: req.username,
            password: req.password,
            device_id: req.device_id.map(|d| d.to_string()),
            initial_device_display_name: req.initial_device_display_name,
            inhibit_login: req.inhibit_login,
            auth_type: req.auth.as_ref().and_then(|a| a.auth_type()).map(|t| t.to_string()),
            auth_session: req.auth.as_ref().and_then(|a| a.session()).map(str::to_owned),
        })
        .await?;
    let mut resp = register::v3::Response::new(user_id(&ctx, &registered.localpart)?);
    if let Some((device_id, token)) = registered.login {
        resp.device_id = Some(device_id.into());
        resp.access_token = Some(token);
    }
    Ok(resp)
}

async fn available(
    ctx: Ctx,
    req: get_username_availability::v3::Request,
) -> Result<get_username_availability::v3::Response> {
    ctx.services.accounts.check_available(&req.username)?;
    Ok(get_username_availability::v3::Response::new(true))
}

async fn whoami(ctx: Ctx, _: whoami::v3::Request) -> Result<whoami::v3::Response> {
    let session = ctx.session()?;
    let mut resp = whoami::v3::Response::new(user_id(&ctx, &session.localpart)?, false);
    resp.device_id = Some(session.device_id.clone().into());
    Ok(resp)
}
