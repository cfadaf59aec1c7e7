//! The audit log for admins: `/_trellis/admin/v1/audit`.

use axum::{
    Router,
    extract::{RawQuery, State},
    response::Response,
    routing::get,
};
use serde_json::json;
use trellis_service::admin::audit_log::{self, AuditQuery};

use super::{Params, respond, to_json};
use crate::AppState;

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    router.route("/_trellis/admin/v1/audit", get(list))
}

/// GET /_trellis/admin/v1/audit
async fn list(State(s): State<AppState>, RawQuery(q): RawQuery) -> Response {
    respond((|| {
        let params = Params::parse(q);
        // `from` is a record id here, not an offset.
        let limit = params.u64("limit")?.map_or(100, |l| usize::try_from(l).unwrap_or(1000));
        let query = AuditQuery {
            actor: params.str("actor").map(str::to_owned),
            action: params.str("action").map(str::to_owned),
            target: params.str("target").map(str::to_owned),
            from_ts: params.u64("from_ts")?,
            until_ts: params.u64("until_ts")?,
            after: params.str("from").map(str::to_owned),
            forwards: params.str("dir") == Some("f"),
            limit: limit.clamp(1, 1000),
        };
        let (entries, next) = audit_log::query(&s, &query)?;
        let mut body = json!({"entries": to_json(entries)?});
        if let Some(next) = next {
            body["next_token"] = json!(next);
        }
        Ok(body)
    })())
}
