//! Reports for the server's admins, in Synapse's admin API shape (so moderation tools
//! work): `/_synapse/admin/v1/event_reports` lists (`from`, `limit`, `dir`, `user_id`,
//! `room_id`), `/{id}` shows one with its event, `DELETE /{id}` removes it.

use axum::{
    Router,
    extract::{Path, RawQuery, State},
    http::request::Parts,
    response::Response,
    routing::get,
};
use serde_json::json;
use trellis_core::{Error, Result};
use trellis_service::reports::{self, ListQuery};

use super::{admin_caller, respond};
use crate::AppState;

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    router
        .route("/_synapse/admin/v1/event_reports", get(list))
        .route("/_synapse/admin/v1/event_reports/{id}", get(show).delete(remove))
        .route("/_trellis/admin/v1/reports/{id}", axum::routing::put(triage))
}

#[derive(serde::Deserialize)]
struct TriageBody {
    status: Option<reports::Status>,
    #[serde(default, deserialize_with = "super::present")]
    assignee: Option<Option<ruma::OwnedUserId>>,
    note: Option<String>,
}

/// PUT /_trellis/admin/v1/reports/{id}
async fn triage(
    State(s): State<AppState>,
    parts: Parts,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    respond(
        async {
            let (admin, client) = admin_caller(&parts)?;
            let body: TriageBody = super::parse_body(&body)?;
            let change = reports::TriageChange {
                status: body.status,
                assignee: body.assignee.map(|a| a.map(|u| u.to_string())),
                note: body.note,
            };
            reports::triage(&s, report_id(&id)?, change, &admin, &client).await
        }
        .await,
    )
}

/// The reports shown per page unless `limit` says otherwise, and at most.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

fn parse_query(query: Option<String>) -> Result<ListQuery> {
    let mut out = ListQuery { limit: DEFAULT_LIMIT, ..ListQuery::default() };
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        let number = || {
            value
                .parse::<u64>()
                .map_err(|_| Error::invalid_param(format!("{key} must be a number")))
        };
        match key.as_ref() {
            "from" => out.from = number()?,
            "limit" => out.limit = usize::try_from(number()?).unwrap_or(MAX_LIMIT).min(MAX_LIMIT),
            "dir" => match value.as_ref() {
                "f" => out.forwards = true,
                "b" => out.forwards = false,
                _ => return Err(Error::invalid_param("dir must be f or b")),
            },
            "user_id" => out.reporter = Some(value.into_owned()),
            "status" => {
                out.status = Some(match value.as_ref() {
                    "open" => reports::Status::Open,
                    "assigned" => reports::Status::Assigned,
                    "resolved" => reports::Status::Resolved,
                    _ => return Err(Error::invalid_param("status is open, assigned or resolved")),
                })
            }
            "room_id" => out.room_id = Some(value.into_owned()),
            _ => {}
        }
    }
    Ok(out)
}

fn report_id(id: &str) -> Result<u64> {
    id.parse().map_err(|_| Error::invalid_param("The report id must be a number"))
}

/// GET /_synapse/admin/v1/event_reports
async fn list(State(s): State<AppState>, parts: Parts, RawQuery(query): RawQuery) -> Response {
    respond(
        async {
            admin_caller(&parts)?;
            let query = parse_query(query)?;
            let (page, total, next) = reports::list(&s, &query)?;
            let mut body = json!({"event_reports": page, "total": total});
            if let Some(next) = next {
                body["next_token"] = json!(next);
            }
            Ok(body)
        }
        .await,
    )
}

/// GET /_synapse/admin/v1/event_reports/{id}
async fn show(State(s): State<AppState>, parts: Parts, Path(id): Path<String>) -> Response {
    respond(
        async {
            admin_caller(&parts)?;
            reports::get(&s, report_id(&id)?)
        }
        .await,
    )
}

/// DELETE /_synapse/admin/v1/event_reports/{id}
async fn remove(State(s): State<AppState>, parts: Parts, Path(id): Path<String>) -> Response {
    respond(
        async {
            let (admin, client) = admin_caller(&parts)?;
            reports::delete(&s, report_id(&id)?, &admin, &client).await?;
            Ok(json!({}))
        }
        .await,
    )
}
