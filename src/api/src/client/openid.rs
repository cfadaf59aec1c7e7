//! `POST /user/{userId}/openid/request_token`: a token another service (an integration
//! manager, a widget host) can check with `/_matrix/federation/v1/openid/userinfo` to
//! learn who the user is.

use std::time::Duration;

use axum::Router;
use ruma::{
    OwnedServerName, api::client::account::request_openid_token, authentication::TokenType,
};
use trellis_core::{Error, Result};

use crate::{
    AppState,
    ruma_route::{self, Ctx},
};

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    ruma_route::add::<request_openid_token::v3::Request, _, _>(router, request_token)
}

/// POST /_matrix/client/v3/user/{userId}/openid/request_token
async fn request_token(
    ctx: Ctx,
    req: request_openid_token::v3::Request,
) -> Result<request_openid_token::v3::Response> {
    let session = ctx.require_self(&req.user_id)?;
    let (token, lifetime_ms) =
        ctx.services.accounts.create_openid_token(&session.localpart).await?;
    let server = OwnedServerName::try_from(ctx.services.server_name())
        .map_err(|e| Error::internal("server name", e))?;
    Ok(request_openid_token::v3::Response::new(
        token,
        TokenType::Bearer,
        server,
        Duration::from_millis(lifetime_ms),
    ))
}
