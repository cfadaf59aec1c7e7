//! Registration tokens (`/_synapse/admin/v1/registration_tokens`), in Synapse's shapes.

use axum::{
    Router,
    body::Bytes,
    extract::{Path, RawQuery, State},
    http::request::Parts,
    response::Response,
    routing::get,
};
use serde::Deserialize;
use serde_json::json;
use trellis_core::Error;

use super::{admin_caller, parse_body, present, respond};
use crate::AppState;

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    router
        .route("/_synapse/admin/v1/registration_tokens", get(list_tokens))
        .route("/_synapse/admin/v1/registration_tokens/new", axum::routing::post(create_token))
        .route(
            "/_synapse/admin/v1/registration_tokens/{token}",
            get(get_token).put(update_token).delete(delete_token),
        )
}

/// GET /_synapse/admin/v1/registration_tokens
async fn list_tokens(
    State(s): State<AppState>,
    parts: Parts,
    RawQuery(query): RawQuery,
) -> Response {
    respond(
        async {
            admin_caller(&parts)?;
            let valid = match form_urlencoded::parse(query.unwrap_or_default().as_bytes())
                .find(|(k, _)| k == "valid")
                .map(|(_, v)| v.into_owned())
                .as_deref()
            {
                None => None,
                Some("true") => Some(true),
                Some("false") => Some(false),
                Some(_) => return Err(Error::invalid_param("valid must be true or false")),
            };
            Ok(json!({ "registration_tokens": s.accounts.registration_tokens(valid)? }))
        }
        .await,
    )
}

#[derive(Deserialize)]
struct NewToken {
    token: Option<String>,
    length: Option<u32>,
    uses_allowed: Option<u32>,
    expiry_time: Option<u64>,
}

/// POST /_synapse/admin/v1/registration_tokens/new
async fn create_token(State(s): State<AppState>, parts: Parts, body: Bytes) -> Response {
    respond(
        async {
            admin_caller(&parts)?;
            let req: NewToken = parse_body(&body)?;
            let token = s
                .accounts
                .create_registration_token(req.token, req.length, req.uses_allowed, req.expiry_time)
                .await?;
            Ok(json!(token))
        }
        .await,
    )
}

/// GET /_synapse/admin/v1/registration_tokens/{token}
async fn get_token(State(s): State<AppState>, parts: Parts, Path(token): Path<String>) -> Response {
    respond(
        async {
            admin_caller(&parts)?;
            Ok(json!(s.accounts.registration_token(&token)?))
        }
        .await,
    )
}

/// `null` removes a limit; an absent field leaves it unchanged.
#[derive(Deserialize)]
struct UpdateToken {
    #[serde(default, deserialize_with = "present")]
    uses_allowed: Option<Option<u32>>,
    #[serde(default, deserialize_with = "present")]
    expiry_time: Option<Option<u64>>,
}

/// PUT /_synapse/admin/v1/registration_tokens/{token}
async fn update_token(
    State(s): State<AppState>,
    parts: Parts,
    Path(token): Path<String>,
    body: Bytes,
) -> Response {
    respond(
        async {
            admin_caller(&parts)?;
            let req: UpdateToken = parse_body(&body)?;
            Ok(json!(
                s.accounts
                    .update_registration_token(&token, req.uses_allowed, req.expiry_time)
                    .await?
            ))
        }
        .await,
    )
}

/// DELETE /_synapse/admin/v1/registration_tokens/{token}
async fn delete_token(
    State(s): State<AppState>,
    parts: Parts,
    Path(token): Path<String>,
) -> Response {
    respond(
        async {
            admin_caller(&parts)?;
            s.accounts.delete_registration_token(&token).await?;
            Ok(json!({}))
        }
        .await,
    )
}
