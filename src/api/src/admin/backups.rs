//! Backups for admins (docs/operations.md): `/_trellis/admin/v1/backups`. Restoring is
//! not here: it fills an empty data directory, so it is the command line's
//! (`trellis backup restore`).

use axum::{
    Router,
    body::Bytes,
    extract::{Path, State},
    http::request::Parts,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};
use trellis_core::Error;
use trellis_service::backup::{self, Manifest, State as BackupState};

use super::{admin_caller, parse_body, respond, to_json};
use crate::AppState;

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    router
        .route("/_trellis/admin/v1/backups", get(list).post(create))
        .route("/_trellis/admin/v1/backups/prune", post(prune))
        .route("/_trellis/admin/v1/backups/{id}", get(one))
        .route("/_trellis/admin/v1/backups/{id}/verify", post(verify))
}

/// POST /_trellis/admin/v1/backups
async fn create(State(s): State<AppState>, parts: Parts) -> Response {
    let started = admin_caller(&parts)
        .and_then(|by| backup::start(&s, "manual", Some(by)))
        .map(|id| json!({"id": id, "state": "running"}));
    match started {
        Ok(body) => (StatusCode::ACCEPTED, axum::Json(body)).into_response(),
        Err(e) => respond(Err(e)),
    }
}

/// GET /_trellis/admin/v1/backups
async fn list(State(s): State<AppState>) -> Response {
    respond(backup::overview(&s).await.map(|(status, manifests)| {
        let running =
            status.running.map(|(id, at)| json!({"id": id, "started_at": at, "state": "running"}));
        let failed = status.last_error.map(|(id, error)| json!({"id": id, "error": error}));
        // Newest first, as admins read them.
        let backups: Vec<Value> = manifests.iter().rev().map(Manifest::summary).collect();
        json!({
            "destination": s.config.backup.destination,
            "running": running,
            "last_failure": failed,
            "backups": backups,
        })
    }))
}

/// GET /_trellis/admin/v1/backups/{id}
async fn one(State(s): State<AppState>, Path(id): Path<String>) -> Response {
    respond(backup::state(&s, &id).await.map(|state| match state {
        BackupState::Running { started_at_ms } => {
            json!({"id": id, "state": "running", "started_at": started_at_ms})
        }
        BackupState::Failed { error } => json!({"id": id, "state": "failed", "error": error}),
        BackupState::Done(manifest) => {
            let mut body = manifest.summary();
            body["state"] = json!("done");
            body
        }
    }))
}

/// POST /_trellis/admin/v1/backups/{id}/verify
async fn verify(State(s): State<AppState>, parts: Parts, Path(id): Path<String>) -> Response {
    respond(
        async {
            let (admin, client) = admin_caller(&parts)?;
            let verified = backup::verify_configured(&s, &id, &admin, &client).await?;
            let mut body = to_json(&verified)?;
            body["ok"] = json!(verified.ok());
            Ok(body)
        }
        .await,
    )
}

#[derive(Deserialize)]
struct PruneBody {
    keep: Option<usize>,
}

/// POST /_trellis/admin/v1/backups/prune
async fn prune(State(s): State<AppState>, parts: Parts, body: Bytes) -> Response {
    respond(
        async {
            let (admin, client) = admin_caller(&parts)?;
            let body: PruneBody = parse_body(&body)?;
            let keep = body.keep.ok_or_else(|| Error::missing_param("Missing keep"))?;
            to_json(backup::prune_configured(&s, keep, &admin, &client).await?)
        }
        .await,
    )
}
