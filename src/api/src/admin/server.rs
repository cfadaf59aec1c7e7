//! The server as a whole: its version, server notices, media statistics.

use axum::{
    Router,
    body::Bytes,
    extract::{Path, RawQuery, State},
    http::request::Parts,
    response::Response,
    routing::{get, post, put},
};
use ruma::{OwnedTransactionId, OwnedUserId};
use serde::Deserialize;
use serde_json::{Value, json};
use trellis_core::{Error, Result};
use trellis_service::admin::{federation, media, notices};

use super::{Params, admin_caller, next_from, page, parse_body, respond, to_json};
use crate::AppState;

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    router
        .route("/_synapse/admin/v1/send_server_notice", post(send_notice))
        .route("/_synapse/admin/v1/send_server_notice/{txn_id}", put(send_notice_txn))
        .route("/_synapse/admin/v1/statistics/users/media", get(user_media_stats))
        .route(
            "/_synapse/admin/v1/background_updates/enabled",
            get(jobs_enabled).post(set_jobs_enabled),
        )
        .route("/_synapse/admin/v1/background_updates/status", get(jobs_status))
        .route("/_synapse/admin/v1/background_updates/start_job", post(start_job))
        .route("/_synapse/admin/v1/federation/destinations", get(destinations))
        .route("/_synapse/admin/v1/federation/destinations/{destination}", get(destination))
        .route(
            "/_synapse/admin/v1/federation/destinations/{destination}/rooms",
            get(destination_rooms),
        )
        .route(
            "/_synapse/admin/v1/federation/destinations/{destination}/reset_connection",
            post(reset_connection),
        )
}

/// GET /_synapse/admin/v1/background_updates/enabled
async fn jobs_enabled() -> Response {
    super::ok_json(json!({"enabled": true}))
}

#[derive(Deserialize)]
struct EnabledBody {
    enabled: Option<bool>,
}

/// POST /_synapse/admin/v1/background_updates/enabled: Trellis's background work
/// (indexing, catch-up, sweeps) cannot be paused; asking for it is refused.
async fn set_jobs_enabled(body: Bytes) -> Response {
    respond((|| {
        let body: EnabledBody = parse_body(&body)?;
        match body.enabled.unwrap_or(true) {
            true => Ok(json!({"enabled": true})),
            false => Err(Error::invalid_param("Trellis's background work cannot be paused")),
        }
    })())
}

/// GET /_synapse/admin/v1/background_updates/status
async fn jobs_status(State(s): State<AppState>) -> Response {
    respond((|| {
        let current = match s.jobs.current() {
            Some(job) => json!({"main": to_json(job)?}),
            None => json!({}),
        };
        Ok(json!({"enabled": true, "current_updates": current}))
    })())
}

#[derive(Deserialize)]
struct JobBody {
    job_name: Option<String>,
}

/// POST /_synapse/admin/v1/background_updates/start_job
async fn start_job(State(s): State<AppState>, body: Bytes) -> Response {
    respond((|| {
        let body: JobBody = parse_body(&body)?;
        let name = body.job_name.ok_or_else(|| Error::missing_param("Missing job_name"))?;
        trellis_service::admin::jobs::start(&s, &name)?;
        Ok(json!({}))
    })())
}

/// A destination in Synapse's shape (plus `queued`, `failures` and `last_error`).
fn destination_json(d: trellis_service::federation::sender::Destination) -> Value {
    json!({
        "destination": d.destination,
        "retry_last_ts": d.health.retry_last_ts,
        "retry_interval": d.health.retry_interval_ms,
        "failure_ts": d.health.failure_ts,
        "last_successful_stream_ordering": null,
        "last_success_ts": d.health.last_success_ts,
        "failures": d.health.failures,
        "last_error": d.health.last_error,
        "queued": d.queued,
    })
}

/// GET /_synapse/admin/v1/federation/destinations
async fn destinations(State(s): State<AppState>, RawQuery(q): RawQuery) -> Response {
    respond((|| {
        let params = Params::parse(q);
        let paging = params.paging(100)?;
        let order = params.order_by(
            &[
                "destination",
                "retry_last_ts",
                "retry_interval",
                "failure_ts",
                "last_successful_stream_ordering",
            ],
            "destination",
        )?;
        let filter = params.str("destination");
        let items = federation::destinations(&s)?
            .into_iter()
            .filter(|d| filter.is_none_or(|f| d.destination.contains(f)))
            .map(destination_json)
            .collect();
        let (destinations, total) = page(items, order, "destination", false, paging);
        let mut body = json!({"total": total});
        if let Some(next) = next_from(paging, destinations.len(), total) {
            body["next_token"] = json!(next.to_string());
        }
        body["destinations"] = Value::Array(destinations);
        Ok(body)
    })())
}

/// GET /_synapse/admin/v1/federation/destinations/{destination}
async fn destination(State(s): State<AppState>, Path(name): Path<String>) -> Response {
    respond(federation::destination(&s, &name).map(destination_json))
}

/// GET /_synapse/admin/v1/federation/destinations/{destination}/rooms
async fn destination_rooms(
    State(s): State<AppState>,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
) -> Response {
    respond((|| {
        let params = Params::parse(q);
        let paging = params.paging(100)?;
        federation::destination(&s, &name)?;
        let items = federation::shared_rooms(&s, &name)?
            .into_iter()
            .map(|room| json!({"room_id": room, "stream_ordering": null}))
            .collect();
        let (rooms, total) = page(items, "room_id", "room_id", false, paging);
        let mut body = json!({"total": total});
        if let Some(next) = next_from(paging, rooms.len(), total) {
            body["next_token"] = json!(next.to_string());
        }
        body["rooms"] = Value::Array(rooms);
        Ok(body)
    })())
}

/// POST /_synapse/admin/v1/federation/destinations/{destination}/reset_connection
async fn reset_connection(State(s): State<AppState>, Path(name): Path<String>) -> Response {
    respond(federation::reset_connection(&s, &name).map(|()| json!({})))
}

/// Routes outside the admin guard: admin tools read the version before logging in.
pub fn public_routes(router: Router<AppState>) -> Router<AppState> {
    router.route("/_synapse/admin/v1/server_version", get(server_version))
}

/// GET /_synapse/admin/v1/server_version
async fn server_version() -> Response {
    super::ok_json(json!({"server_version": format!("Trellis {}", env!("CARGO_PKG_VERSION"))}))
}

#[derive(Deserialize)]
struct NoticeBody {
    user_id: Option<OwnedUserId>,
    content: Option<Value>,
    #[serde(rename = "type")]
    kind: Option<String>,
    state_key: Option<String>,
}

async fn notice(s: &AppState, parts: &Parts, body: &Bytes, txn: Option<String>) -> Result<Value> {
    let (admin, _) = admin_caller(parts)?;
    let body: NoticeBody = parse_body(body)?;
    let user = body.user_id.ok_or_else(|| Error::missing_param("Missing user_id"))?;
    let content = body.content.ok_or_else(|| Error::missing_param("Missing content"))?;
    if !content.is_object() {
        return Err(Error::bad_json("content must be an object"));
    }
    let notice = notices::Notice {
        kind: body.kind.unwrap_or_else(|| "m.room.message".to_owned()),
        state_key: body.state_key,
        content,
    };
    // A retried PUT names the same transaction: it sends nothing new.
    let txn = OwnedTransactionId::from(match txn {
        Some(txn) => format!("{admin}/{txn}"),
        None => trellis_service::random_token(16),
    });
    let event_id = notices::send_notice(s, &user, notice, &txn).await?;
    Ok(json!({"event_id": event_id}))
}

/// POST /_synapse/admin/v1/send_server_notice
async fn send_notice(State(s): State<AppState>, parts: Parts, body: Bytes) -> Response {
    respond(notice(&s, &parts, &body, None).await)
}

/// PUT /_synapse/admin/v1/send_server_notice/{txnId}
async fn send_notice_txn(
    State(s): State<AppState>,
    parts: Parts,
    Path(txn): Path<String>,
    body: Bytes,
) -> Response {
    respond(notice(&s, &parts, &body, Some(txn)).await)
}

/// GET /_synapse/admin/v1/statistics/users/media
async fn user_media_stats(State(s): State<AppState>, RawQuery(q): RawQuery) -> Response {
    respond((|| {
        let params = Params::parse(q);
        let paging = params.paging(100)?;
        let order = params
            .order_by(&["user_id", "displayname", "media_length", "media_count"], "user_id")?;
        let from_ts = params.u64("from_ts")?.unwrap_or(0);
        let until_ts = params.u64("until_ts")?;
        if until_ts.is_some_and(|u| u <= from_ts) {
            return Err(Error::invalid_param("until_ts must be after from_ts"));
        }
        let term = params.term("search_term")?.map(str::to_lowercase);
        let mut stats = media::user_stats(&s, from_ts, until_ts)?;
        if let Some(term) = &term {
            stats.retain(|u| {
                u.user_id.to_lowercase().contains(term)
                    || u.displayname.as_deref().is_some_and(|d| d.to_lowercase().contains(term))
            });
        }
        let items = stats.into_iter().map(to_json).collect::<Result<_>>()?;
        let (users, total) = page(items, order, "user_id", false, paging);
        let mut body = json!({"total": total});
        if let Some(next) = next_from(paging, users.len(), total) {
            body["next_token"] = json!(next);
        }
        body["users"] = Value::Array(users);
        Ok(body)
    })())
}
