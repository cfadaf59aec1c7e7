//! Trellis's live dashboard figures, usage analytics and call history for admins:
//! `/_trellis/admin/v1/dashboard`, `/_trellis/admin/v1/analytics` and
//! `/_trellis/admin/v1/calls`.

use axum::{
    Router,
    extract::{RawQuery, State},
    response::Response,
    routing::get,
};
use trellis_core::Error;
use trellis_service::{admin::dashboard, call_history};

use super::{Params, respond, to_json};
use crate::AppState;

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    router
        .route("/_trellis/admin/v1/dashboard", get(show_dashboard))
        .route("/_trellis/admin/v1/analytics", get(analytics))
        .route("/_trellis/admin/v1/calls", get(calls))
}

/// GET /_trellis/admin/v1/calls
async fn calls(State(s): State<AppState>, RawQuery(q): RawQuery) -> Response {
    respond((|| {
        let params = Params::parse(q);
        let paging = params.paging(100)?;
        let room = params.term("room_id")?;
        let (calls, total) = s.call_history.all(room, paging.from, paging.limit)?;
        let shown = calls.len();
        Ok(serde_json::json!({
            "calls": calls.iter().map(call_history::describe).collect::<Vec<_>>(),
            "total": total,
            "next_token": super::next_from(paging, shown, total),
        }))
    })())
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
