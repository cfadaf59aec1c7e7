//! Data exports for admins: an export of any local user (`POST
//! /_trellis/admin/v1/users/{userId}/export`), read with `GET
//! /_trellis/admin/v1/exports/{id}` and downloaded by its link like a user's own.

use axum::{
    Router,
    extract::{Path, State},
    http::{StatusCode, request::Parts},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use trellis_service::{admin::users, export};

use super::{admin_caller, respond};
use crate::AppState;

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    router
        .route("/_trellis/admin/v1/users/{user_id}/export", post(start))
        .route("/_trellis/admin/v1/exports/{id}", get(status))
}

/// POST /_trellis/admin/v1/users/{userId}/export
async fn start(State(s): State<AppState>, parts: Parts, Path(user): Path<String>) -> Response {
    let started = async {
        let (admin, client) = admin_caller(&parts)?;
        let (localpart, _) = users::existing(&s, &user)?;
        export::start(&s, &localpart, (&admin, &client)).await
    }
    .await;
    match started {
        Ok(e) => (StatusCode::ACCEPTED, axum::Json(export::describe(&e))).into_response(),
        Err(e) => respond(Err(e)),
    }
}

/// GET /_trellis/admin/v1/exports/{id}
async fn status(State(s): State<AppState>, Path(id): Path<String>) -> Response {
    respond(export::get(&s, &id, None).map(|e| export::describe(&e)))
}
