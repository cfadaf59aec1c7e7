//! Registration, username availability, `whoami`, password change and deactivation.

use axum::Router;
use ruma::{
    OwnedUserId, UserId,
    api::client::account::{
        ThirdPartyIdRemovalStatus, change_password, check_registration_token_validity, deactivate,
        get_username_availability, register, whoami,
    },
    api::client::admin::get_user_info,
};
use trellis_core::{Error, Result};
use trellis_service::{
    accounts::{RegisterRequest, deactivation},
    appservice,
    ratelimit::Class,
};

use super::uia::{auth_input, reauthenticate};
use crate::{
    AppState,
    ruma_route::{self, Ctx},
};

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = ruma_route::add_patched::<register::v3::Request, _, _>(
        router,
        register,
        Some(no_null_login),
    );
    let router = ruma_route::add::<get_username_availability::v3::Request, _, _>(router, available);
    let router = ruma_route::add::<whoami::v3::Request, _, _>(router, whoami);
    let router = ruma_route::add::<change_password::v3::Request, _, _>(router, change_password);
    let router = ruma_route::add::<check_registration_token_validity::v1::Request, _, _>(
        router,
        token_validity,
    );
    let router = ruma_route::add::<get_user_info::v3::Request, _, _>(router, whois);
    ruma_route::add::<deactivate::v3::Request, _, _>(router, deactivate)
}

/// GET /_matrix/client/v1/register/m.login.registration_token/validity
async fn token_validity(
    ctx: Ctx,
    req: check_registration_token_validity::v1::Request,
) -> Result<check_registration_token_validity::v1::Response> {
    if ctx.services.config.registration.mode != trellis_core::config::RegistrationMode::Token {
        return Err(Error::forbidden("Registration does not use tokens on this server"));
    }
    let valid = ctx.services.accounts.registration_token_valid(&req.token)?;
    Ok(check_registration_token_validity::v1::Response::new(valid))
}

pub fn user_id(ctx: &Ctx, localpart: &str) -> Result<OwnedUserId> {
    UserId::parse(ctx.services.accounts.user_id(localpart))
        .map_err(|e| Error::internal("building a user id", e))
}

/// POST /_matrix/client/v3/register
async fn register(ctx: Ctx, req: register::v3::Request) -> Result<register::v3::Response> {
    ctx.rate_limit(Class::Register)?;
    let accounts = &ctx.services.accounts;
    let by_service = req.login_type == Some(register::LoginType::ApplicationService);
    if let Some(username) = &req.username
        && !by_service
    {
        appservice::check_not_exclusive(&ctx.services, &accounts.parse_username(username)?)?;
    }
    let flagged = match (&req.username, by_service) {
        (Some(username), false) => trellis_service::policy::check_name(&ctx.services, username)?,
        _ => None,
    };
    let registered = if req.kind == register::RegistrationKind::Guest {
        accounts.register_guest(req.initial_device_display_name, &ctx.client).await?
    } else {
        let vouched = match (&req.username, by_service) {
            (Some(username), true) => {
                Some(appservice::vouch(&ctx.services, ctx.session.as_ref(), username)?)
            }
            (None, true) => {
                return Err(Error::bad_json("m.login.application_service needs a username"));
            }
            (_, false) => None,
        };
        let request = RegisterRequest {
            username: req.username,
            password: req.password,
            device_id: req.device_id.map(|d| d.to_string()),
            initial_device_display_name: req.initial_device_display_name,
            inhibit_login: req.inhibit_login,
            refresh_token: req.refresh_token,
            auth: auth_input(req.auth.as_ref()),
            guest_access_token: req.guest_access_token,
        };
        match vouched {
            Some(localpart) => accounts.register_vouched(localpart, request, &ctx.client).await?,
            None => accounts.register(request, &ctx.client).await?,
        }
    };
    let mut resp = register::v3::Response::new(user_id(&ctx, &registered.localpart)?);
    if let Some(found) = flagged {
        trellis_service::policy::flag_user(&ctx.services, resp.user_id.as_str(), &found).await;
    }
    if let Some(issued) = registered.login {
        resp.device_id = Some(issued.device_id.into());
        resp.access_token = Some(issued.access_token);
        resp.refresh_token = issued.refresh_token;
        resp.expires_in = issued.expires_in_ms.map(std::time::Duration::from_millis);
    }
    Ok(resp)
}

/// GET /_matrix/client/v3/register/available
async fn available(
    ctx: Ctx,
    req: get_username_availability::v3::Request,
) -> Result<get_username_availability::v3::Response> {
    let localpart = ctx.services.accounts.check_available(&req.username)?;
    appservice::check_not_exclusive(&ctx.services, &localpart)?;
    Ok(get_username_availability::v3::Response::new(true))
}

/// GET /_matrix/client/v3/account/whoami
async fn whoami(ctx: Ctx, _: whoami::v3::Request) -> Result<whoami::v3::Response> {
    let session = ctx.session()?;
    let mut resp = whoami::v3::Response::new(user_id(&ctx, &session.localpart)?, false);
    resp.device_id = Some(session.device_id.clone().into());
    Ok(resp)
}

/// POST /_matrix/client/v3/account/password
async fn change_password(
    ctx: Ctx,
    req: change_password::v3::Request,
) -> Result<change_password::v3::Response> {
    let auth = auth_input(req.auth.as_ref());
    ctx.services
        .accounts
        .change_password(
            ctx.session.as_ref(),
            auth.as_ref(),
            req.new_password,
            req.logout_devices,
            &ctx.client,
        )
        .await?;
    Ok(change_password::v3::Response::new())
}

/// POST /_matrix/client/v3/account/deactivate
async fn deactivate(ctx: Ctx, req: deactivate::v3::Request) -> Result<deactivate::v3::Response> {
    let localpart = reauthenticate(&ctx, req.auth.as_ref(), "deactivate").await?;
    deactivation::deactivate(&ctx.services, &localpart, req.erase, &ctx.client).await?;
    // No identity server binding is ever made, so there is nothing to unbind.
    Ok(deactivate::v3::Response::new(ThirdPartyIdRemovalStatus::NoSupport))
}

/// A registration with `inhibit_login` signs nobody in: no `device_id` (ruma writes a
/// `null` one, which clients take for a device).
fn no_null_login(body: &mut serde_json::Value) {
    if let Some(body) = body.as_object_mut() {
        body.retain(|_, v| !v.is_null());
    }
}

/// GET /_matrix/client/v3/admin/whois/{userId}
async fn whois(ctx: Ctx, req: get_user_info::v3::Request) -> Result<get_user_info::v3::Response> {
    let requester = super::events::user(&ctx)?;
    let devices =
        trellis_service::accounts::devices::whois(&ctx.services, &requester, &req.user_id)?;
    let mut resp = get_user_info::v3::Response::new();
    resp.devices = devices
        .into_iter()
        .map(|d| {
            let mut connection = get_user_info::v3::ConnectionInfo::new();
            connection.ip = d.last_seen_ip;
            connection.last_seen = d
                .last_seen_ms
                .and_then(|ms| ruma::UInt::try_from(ms).ok())
                .map(ruma::MilliSecondsSinceUnixEpoch);
            let mut session = get_user_info::v3::SessionInfo::new();
            session.connections = vec![connection];
            let mut device = get_user_info::v3::DeviceInfo::new();
            device.sessions = vec![session];
            (d.device_id, device)
        })
        .collect();
    resp.user_id = Some(req.user_id);
    Ok(resp)
}
