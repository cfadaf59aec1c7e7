//! A user's call history (a Trellis extension): `GET /_trellis/client/v1/calls`.

use axum::{Router, extract::RawQuery, response::Response, routing::get};
use serde_json::json;
use trellis_core::Error;
use trellis_service::call_history;

use super::{events::user, webhooks::respond};
use crate::AppState;
use crate::ruma_route::Authenticated;

/// Calls per page unless the client asks for fewer.
const DEFAULT_LIMIT: usize = 50;

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    router.route("/_trellis/client/v1/calls", get(calls))
}

/// GET /_trellis/client/v1/calls
async fn calls(Authenticated(ctx): Authenticated, RawQuery(query): RawQuery) -> Response {
    respond((|| {
        let (mut from, mut limit) = (None, DEFAULT_LIMIT);
        for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
            match &*key {
                "from" => from = Some(value.into_owned()),
                "limit" => {
                    limit = value
                        .parse::<usize>()
                        .map_err(|_| Error::invalid_param("limit must be a number"))?
                        .clamp(1, 500)
                }
                _ => {}
            }
        }
        let page =
            ctx.services.call_history.of_user(user(&ctx)?.as_str(), from.as_deref(), limit)?;
        Ok(json!({
            "calls": page.calls.iter().map(call_history::describe).collect::<Vec<_>>(),
            "next_batch": page.next,
        }))
    })())
}
