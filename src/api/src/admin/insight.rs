//! Trellis's live dashboard figures and usage analytics for admins:
//! `/_trellis/admin/v1/dashboard` and `/_trellis/admin/v1/analytics`.

use axum::{
    Router,
    extract::{RawQuery, State},
    response::Response,
    routing::get,
};
use trellis_core::Error;
use trellis_service::admin::dashboard;

use super::{Params, respond, to_json};
use crate::AppState;

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    router
        .route("/_trellis/admin/v1/dashboard", get(show_dashboard))
        .route("/_trellis/admin/v1/analytics", get(analytics))
}

/// GET /_trellis/admin/v1/dashboard
async fn show_dashboard(State(s): State<AppState>) -> Response {
    respond(dashboard::dashboard(&s).and_then(to_json))
}

/// GET /_trellis/admin/v1/analytics
async fn analytics(State(s): State<AppState>, RawQuery(q): RawQuery) -> Response {
    respond((|| {
        let days = Params::parse(q).u64("days")?.unwrap_or(30);
        if !(1..=366).contains(&days) {
            return Err(Error::invalid_param("days is 1 to 366"));
        }
        to_json(s.analytics.report(days)?)
    })())
}
