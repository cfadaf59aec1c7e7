//! The admin API. Paths and shapes follow Synapse's admin API where one exists, so that
//! existing admin tools work against Trellis. Every call needs an admin's access token.

use axum::{
    Router,
    body::Bytes,
    extract::{Path, RawQuery, State},
    http::request::Parts,
    response::{IntoResponse, Response},
    routing::get,
};
use http::StatusCode;
use serde::{Deserialize, de::DeserializeOwned};
use serde_json::json;
use trellis_core::{Error, Result};

use crate::{
    AppState,
    response::{ApiError, json_response},
    ruma_route::{access_token, client_ip, json_error},
};

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    router
        .route("/_synapse/admin/v1/registration_tokens", get(list_tokens))
        .route("/_synapse/admin/v1/registration_tokens/new", axum::routing::post(create_token))
        .route(
            "/_synapse/admin/v1/registration_tokens/{token}",
            get(get_token).put(update_token).delete(delete_token),
        )
        .route(
            "/_synapse/admin/v1/media/quarantine/{server}/{id}",
            axum::routing::post(quarantine_media),
        )
        .route("/_synapse/admin/v1/media/{server}/{id}", axum::routing::delete(delete_media))
}

/// Checks that the caller is a server admin.
async fn require_admin(state: &AppState, parts: &Parts) -> Result<()> {
    admin_caller(state, parts).await.map(|_| ())
}

/// The admin making the request (their localpart) and where from; others are refused.
pub(crate) async fn admin_caller(
    state: &AppState,
    parts: &Parts,
) -> Result<(String, trellis_service::Client)> {
    let token = access_token(parts).ok_or_else(Error::missing_token)?;
    let client =
        trellis_service::Client::from_ip(client_ip(parts, state.config.http.x_forwarded_for));
    let session =
        trellis_service::appservice::authenticate(state, &token, parts.uri.query(), &client)
            .await?;
    match state.accounts.user(&session.localpart)? {
        Some(u) if u.admin => Ok((session.localpart, client)),
        _ => Err(Error::forbidden("You are not a server admin")),
    }
}

fn ok_json(value: serde_json::Value) -> Response {
    json_response(StatusCode::OK, value.to_string().into_bytes())
}

fn parse_body<T: DeserializeOwned>(body: &Bytes) -> Result<T> {
    let body: &[u8] = if body.is_empty() { b"{}" } else { body };
    serde_json::from_slice(body).map_err(json_error)
}

pub(crate) fn respond(result: Result<serde_json::Value>) -> Response {
    match result {
        Ok(v) => ok_json(v),
        Err(e) => ApiError(e).into_response(),
    }
}

/// GET /_synapse/admin/v1/registration_tokens
async fn list_tokens(
    State(s): State<AppState>,
    parts: Parts,
    RawQuery(query): RawQuery,
) -> Response {
    respond(
        async {
            require_admin(&s, &parts).await?;
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
            require_admin(&s, &parts).await?;
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
            require_admin(&s, &parts).await?;
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

fn present<'de, D, T>(d: D) -> std::result::Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
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
            require_admin(&s, &parts).await?;
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
            require_admin(&s, &parts).await?;
            s.accounts.delete_registration_token(&token).await?;
            Ok(json!({}))
        }
        .await,
    )
}

/// POST /_synapse/admin/v1/media/quarantine/{serverName}/{mediaId}
///
/// Quarantined media is served to nobody; the file stays for the admin to inspect.
async fn quarantine_media(
    State(s): State<AppState>,
    parts: Parts,
    Path((server, id)): Path<(String, String)>,
) -> Response {
    respond(
        async {
            require_admin(&s, &parts).await?;
            s.media.quarantine(&server, &id).await?;
            Ok(json!({}))
        }
        .await,
    )
}

/// DELETE /_synapse/admin/v1/media/{serverName}/{mediaId}
///
/// Deletes a media item; its file goes once no other media item has the same content.
async fn delete_media(
    State(s): State<AppState>,
    parts: Parts,
    Path((server, id)): Path<(String, String)>,
) -> Response {
    respond(
        async {
            require_admin(&s, &parts).await?;
            s.media.delete(&server, &id).await?;
            Ok(json!({ "deleted_media": [id], "total": 1 }))
        }
        .await,
    )
}
