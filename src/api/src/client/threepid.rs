//! Email addresses: validation by a mailed code or link, adding, listing and removing
//! them, and the endpoints that start a validation for registration or a password reset.

use axum::{
    Router,
    body::Bytes,
    extract::{RawQuery, State},
    response::{Html, IntoResponse, Redirect, Response},
    routing::{get, post},
};
use http::StatusCode;
use ruma::{
    MilliSecondsSinceUnixEpoch, OwnedSessionId, UInt,
    api::client::account::{
        ThirdPartyIdRemovalStatus, add_3pid, delete_3pid, get_3pids,
        request_3pid_management_token_via_email, request_password_change_token_via_email,
        request_registration_token_via_email,
    },
    thirdparty::{Medium, ThirdPartyIdentifier, ThirdPartyIdentifierInit},
};
use serde::Deserialize;
use serde_json::json;
use trellis_core::{Error, ErrorKind, Result, error::code};
use trellis_service::accounts::threepid::Purpose;

use super::uia::reauthenticate;
use crate::{
    AppState,
    response::{ApiError, json_response},
    ruma_route::{self, Ctx, json_error},
};

pub const SUBMIT_PATH: &str = "/_trellis/client/v1/email/submit_token";
pub const VALIDATE_PATH: &str = "/_trellis/client/v1/email/validate";

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = ruma_route::add::<request_registration_token_via_email::v3::Request, _, _>(
        router,
        request_register,
    );
    let router = ruma_route::add::<request_password_change_token_via_email::v3::Request, _, _>(
        router,
        request_password,
    );
    let router = ruma_route::add::<request_3pid_management_token_via_email::v3::Request, _, _>(
        router,
        request_add,
    );
    let router = ruma_route::add::<add_3pid::v3::Request, _, _>(router, add);
    let router = ruma_route::add::<get_3pids::v3::Request, _, _>(router, list);
    let router = ruma_route::add::<delete_3pid::v3::Request, _, _>(router, delete);
    router.route(SUBMIT_PATH, post(submit)).route(VALIDATE_PATH, get(validate_link))
}

/// Starts a validation and mails the code; returns (sid, submit_url).
async fn start(
    ctx: &Ctx,
    purpose: Purpose,
    email: &str,
    client_secret: &str,
    send_attempt: UInt,
    next_link: Option<String>,
) -> Result<(OwnedSessionId, String)> {
    let mailer = ctx.services.mailer.as_ref().ok_or_else(|| {
        Error::new(
            ErrorKind::BadRequest,
            code::THREEPID_MEDIUM_NOT_SUPPORTED,
            "This server does not send email",
        )
    })?;
    ctx.rate_limit(trellis_service::ratelimit::Class::Register)?;
    let base = ctx.services.public_base_url();
    let validation = ctx
        .services
        .accounts
        .start_email_validation(
            purpose,
            email,
            client_secret,
            send_attempt.into(),
            next_link,
            &base,
        )
        .await?;
    if let Some((subject, body)) = validation.mail {
        let to = trellis_service::accounts::threepid::normalize_email(email)?;
        mailer.send(&to, &subject, body).await?;
    }
    let sid =
        OwnedSessionId::try_from(validation.sid).map_err(|e| Error::internal("session id", e))?;
    Ok((sid, format!("{base}{SUBMIT_PATH}")))
}

/// POST /_matrix/client/v3/register/email/requestToken
async fn request_register(
    ctx: Ctx,
    req: request_registration_token_via_email::v3::Request,
) -> Result<request_registration_token_via_email::v3::Response> {
    let (sid, submit_url) = start(
        &ctx,
        Purpose::Register,
        &req.email,
        req.client_secret.as_str(),
        req.send_attempt,
        req.next_link,
    )
    .await?;
    let mut resp = request_registration_token_via_email::v3::Response::new(sid);
    resp.submit_url = Some(submit_url);
    Ok(resp)
}

/// POST /_matrix/client/v3/account/password/email/requestToken
async fn request_password(
    ctx: Ctx,
    req: request_password_change_token_via_email::v3::Request,
) -> Result<request_password_change_token_via_email::v3::Response> {
    let (sid, submit_url) = start(
        &ctx,
        Purpose::Password,
        &req.email,
        req.client_secret.as_str(),
        req.send_attempt,
        req.next_link,
    )
    .await?;
    let mut resp = request_password_change_token_via_email::v3::Response::new(sid);
    resp.submit_url = Some(submit_url);
    Ok(resp)
}

/// POST /_matrix/client/v3/account/3pid/email/requestToken
async fn request_add(
    ctx: Ctx,
    req: request_3pid_management_token_via_email::v3::Request,
) -> Result<request_3pid_management_token_via_email::v3::Response> {
    let (sid, submit_url) = start(
        &ctx,
        Purpose::Add,
        &req.email,
        req.client_secret.as_str(),
        req.send_attempt,
        req.next_link,
    )
    .await?;
    let mut resp = request_3pid_management_token_via_email::v3::Response::new(sid);
    resp.submit_url = Some(submit_url);
    Ok(resp)
}

/// POST /_matrix/client/v3/account/3pid/add
async fn add(ctx: Ctx, req: add_3pid::v3::Request) -> Result<add_3pid::v3::Response> {
    let localpart = reauthenticate(&ctx, req.auth.as_ref(), "add_3pid").await?;
    ctx.services
        .accounts
        .add_email(&localpart, req.sid.as_str(), req.client_secret.as_str())
        .await?;
    Ok(add_3pid::v3::Response::new())
}

/// GET /_matrix/client/v3/account/3pid
async fn list(ctx: Ctx, _: get_3pids::v3::Request) -> Result<get_3pids::v3::Response> {
    let localpart = ctx.session()?.localpart.clone();
    let mut out = Vec::new();
    for (medium, address, t) in ctx.services.accounts.threepids(&localpart)? {
        let ts = |ms: u64| MilliSecondsSinceUnixEpoch(UInt::new_saturating(ms));
        out.push(ThirdPartyIdentifier::from(ThirdPartyIdentifierInit {
            address,
            medium: Medium::from(medium.as_str()),
            validated_at: ts(t.validated_ms),
            added_at: ts(t.added_ms),
        }));
    }
    Ok(get_3pids::v3::Response::new(out))
}

/// POST /_matrix/client/v3/account/3pid/delete
async fn delete(ctx: Ctx, req: delete_3pid::v3::Request) -> Result<delete_3pid::v3::Response> {
    let localpart = ctx.session()?.localpart.clone();
    ctx.services.accounts.delete_threepid(&localpart, req.medium.as_str(), &req.address).await?;
    Ok(delete_3pid::v3::Response::new(ThirdPartyIdRemovalStatus::NoSupport))
}

#[derive(Deserialize)]
struct Submit {
    sid: String,
    client_secret: String,
    token: String,
}

/// POST /_trellis/client/v1/email/submit_token
///
/// Where clients send the code the user typed (the `submit_url` we hand out).
async fn submit(State(s): State<AppState>, body: Bytes) -> Response {
    let result = async {
        let req: Submit = serde_json::from_slice(&body).map_err(json_error)?;
        s.accounts.submit_email_token(&req.sid, &req.client_secret, &req.token).await
    }
    .await;
    match result {
        Ok(_) => json_response(StatusCode::OK, json!({"success": true}).to_string().into_bytes()),
        Err(e) => ApiError(e).into_response(),
    }
}

/// GET /_trellis/client/v1/email/validate
///
/// The link in the mail: validates, then sends the browser to `next_link` or shows a page.
async fn validate_link(State(s): State<AppState>, RawQuery(query): RawQuery) -> Response {
    let query = query.unwrap_or_default();
    let param = |name: &str| {
        form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default()
    };
    let result = s
        .accounts
        .submit_email_token(&param("sid"), &param("client_secret"), &param("token"))
        .await;
    let page = |status: StatusCode, text: &str| {
        let html = format!(
            "<!doctype html><meta charset=utf-8><title>Email verification</title><p>{}</p>",
            text.replace('&', "&amp;").replace('<', "&lt;")
        );
        (status, Html(html)).into_response()
    };
    match result {
        Ok(Some(next)) if next.starts_with("https://") || next.starts_with("http://") => {
            Redirect::to(&next).into_response()
        }
        Ok(_) => page(
            StatusCode::OK,
            "Your email address is verified. You can return to your Matrix app.",
        ),
        Err(e) => {
            page(StatusCode::BAD_REQUEST, &format!("This link could not be used: {}", e.message))
        }
    }
}
