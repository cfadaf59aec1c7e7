//! `GET /voip/turnServer`: TURN credentials for calls.

use std::time::Duration;

use axum::Router;
use ruma::api::client::voip::get_turn_server_info;
use trellis_core::Result;
use trellis_service::{ratelimit::Class, voip};

use crate::{
    AppState,
    ruma_route::{self, Ctx},
};

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    ruma_route::add_patched::<get_turn_server_info::v3::Request, _, _>(
        router,
        turn_server,
        Some(empty_without_servers),
    )
}

/// Without a TURN server the answer is `{}`, as clients expect (they then call without
/// a relay), rather than empty credentials.
fn empty_without_servers(body: &mut serde_json::Value) {
    if body["uris"].as_array().is_some_and(Vec::is_empty) {
        *body = serde_json::json!({});
    }
}

/// GET /_matrix/client/v3/voip/turnServer
async fn turn_server(
    ctx: Ctx,
    _: get_turn_server_info::v3::Request,
) -> Result<get_turn_server_info::v3::Response> {
    ctx.rate_limit(Class::Default)?;
    let session = ctx.session()?;
    let user_id = ctx.services.accounts.user_id(&session.localpart);
    let builtin = ctx.services.builtin_turn.get();
    let credentials =
        voip::turn_server(&ctx.services.config.voip, builtin, &user_id, session.guest)?;
    Ok(match credentials {
        Some(c) => get_turn_server_info::v3::Response::new(
            c.username,
            c.password,
            c.uris,
            Duration::from_secs(c.ttl_seconds),
        ),
        None => get_turn_server_info::v3::Response::new(
            String::new(),
            String::new(),
            Vec::new(),
            Duration::ZERO,
        ),
    })
}
