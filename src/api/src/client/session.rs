//! Login, token refresh, logout and login tokens for signing in other devices.

use std::time::Duration;

use axum::Router;
use ruma::api::client::{
    session::{get_login_token, get_login_types, login, logout, logout_all, refresh_token},
    uiaa::UserIdentifier,
};
use trellis_core::{Error, ErrorKind, Result};
use trellis_service::{
    accounts::{Credential, LoginRequest},
    ratelimit::Class,
};

use super::{account::user_id, uia::reauthenticate};
use crate::{
    AppState,
    ruma_route::{self, Ctx},
};

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = ruma_route::add::<get_login_types::v3::Request, _, _>(router, login_types);
    let router = ruma_route::add::<login::v3::Request, _, _>(router, login);
    let router = ruma_route::add::<refresh_token::v3::Request, _, _>(router, refresh);
    let router = ruma_route::add::<logout::v3::Request, _, _>(router, logout);
    let router = ruma_route::add::<logout_all::v3::Request, _, _>(router, logout_all);
    ruma_route::add::<get_login_token::v1::Request, _, _>(router, get_token)
}

/// GET /_matrix/client/v3/login
async fn login_types(
    ctx: Ctx,
    _: get_login_types::v3::Request,
) -> Result<get_login_types::v3::Response> {
    use get_login_types::v3::{LoginType, PasswordLoginType, TokenLoginType};
    let mut token = TokenLoginType::new();
    token.get_login_token = true;
    let mut flows = vec![LoginType::Password(PasswordLoginType::new()), LoginType::Token(token)];
    if ctx.services.accounts.jwt_enabled() {
        let jwt = LoginType::new(trellis_service::accounts::jwt::LOGIN_TYPE, Default::default())
            .map_err(|e| Error::internal("login type", e))?;
        flows.push(jwt);
    }
    Ok(get_login_types::v3::Response::new(flows))
}

// `user` is deprecated in favour of `identifier`, but older clients still send it.
/// POST /_matrix/client/v3/login
#[allow(deprecated)]
async fn login(ctx: Ctx, req: login::v3::Request) -> Result<login::v3::Response> {
    ctx.rate_limit(Class::Login)?;
    let credential = match req.login_info {
        login::v3::LoginInfo::Password(p) => {
            let user = match (&p.identifier, &p.user) {
                (Some(UserIdentifier::Matrix(id)), _) => Some(id.user.clone()),
                (Some(_), _) => {
                    return Err(Error::forbidden("Only m.id.user identifiers are supported"));
                }
                (None, user) => user.clone(),
            };
            Credential::Password { user, password: p.password }
        }
        login::v3::LoginInfo::Token(t) => Credential::Token(t.token),
        login::v3::LoginInfo::ApplicationService(a) => {
            let user = match (&a.identifier, &a.user) {
                (Some(UserIdentifier::Matrix(id)), _) => id.user.clone(),
                (None, Some(user)) => user.clone(),
                _ => return Err(Error::bad_json("An application service login names a user")),
            };
            let localpart =
                trellis_service::appservice::vouch(&ctx.services, ctx.session.as_ref(), &user)?;
            Credential::Vouched(localpart)
        }
        other if other.login_type() == trellis_service::accounts::jwt::LOGIN_TYPE => {
            let token = other.data().get("token").and_then(|t| t.as_str()).map(str::to_owned);
            Credential::Jwt(token.ok_or_else(|| Error::bad_json("A JWT login needs a token"))?)
        }
        other => {
            return Err(Error::new(
                ErrorKind::BadRequest,
                trellis_core::error::code::UNKNOWN,
                format!("Unsupported login type {}", other.login_type()),
            ));
        }
    };
    let (localpart, issued) = ctx
        .services
        .accounts
        .login(
            LoginRequest {
                credential,
                device_id: req.device_id.map(|d| d.to_string()),
                initial_device_display_name: req.initial_device_display_name,
                refresh_token: req.refresh_token,
            },
            &ctx.client,
        )
        .await?;
    let mut resp = login::v3::Response::new(
        user_id(&ctx, &localpart)?,
        issued.access_token,
        issued.device_id.into(),
    );
    resp.refresh_token = issued.refresh_token;
    resp.expires_in = issued.expires_in_ms.map(Duration::from_millis);
    Ok(resp)
}

/// POST /_matrix/client/v3/refresh
async fn refresh(ctx: Ctx, req: refresh_token::v3::Request) -> Result<refresh_token::v3::Response> {
    let issued = ctx.services.accounts.refresh(&req.refresh_token).await?;
    let mut resp = refresh_token::v3::Response::new(issued.access_token);
    resp.refresh_token = issued.refresh_token;
    resp.expires_in_ms = issued.expires_in_ms.map(Duration::from_millis);
    Ok(resp)
}

/// POST /_matrix/client/v3/logout
async fn logout(ctx: Ctx, _: logout::v3::Request) -> Result<logout::v3::Response> {
    let session = ctx.session()?;
    ctx.services.accounts.logout(session, &ctx.client).await?;
    // Open sync streams of the user re-check their token and end.
    ctx.services.rooms.stream.wake(&format!("@{}", session.localpart));
    ctx.services.pushers.remove_for_device(&session.localpart, &session.device_id).await?;
    Ok(logout::v3::Response::new())
}

/// POST /_matrix/client/v3/logout/all
async fn logout_all(ctx: Ctx, _: logout_all::v3::Request) -> Result<logout_all::v3::Response> {
    let localpart = ctx.session()?.localpart.clone();
    ctx.services.accounts.logout_all(&localpart, &ctx.client).await?;
    ctx.services.rooms.stream.wake(&format!("@{localpart}"));
    Ok(logout_all::v3::Response::new())
}

/// POST /_matrix/client/v1/login/get_token
async fn get_token(
    ctx: Ctx,
    req: get_login_token::v1::Request,
) -> Result<get_login_token::v1::Response> {
    let localpart = reauthenticate(&ctx, req.auth.as_ref(), "login_token").await?;
    let (token, lifetime_ms) = ctx.services.accounts.create_login_token(&localpart).await?;
    Ok(get_login_token::v1::Response::new(Duration::from_millis(lifetime_ms), token))
}
