//! The content repository: uploads (`/_matrix/media/v3/upload`, `/v1/create`), the
//! authenticated downloads of spec v1.11 (`/_matrix/client/v1/media/...`) and, behind
//! `media.legacy_unauthenticated`, the deprecated `/_matrix/media/v3/...` downloads.
//!
//! These handlers stream request and response bodies, so they are plain axum handlers
//! (ruma's request types buffer whole bodies) mounted outside the global body limit;
//! uploads are bounded by `media.max_upload_bytes` as they arrive.

mod download;
mod federation;
mod info;
mod response;
mod upload;

use axum::{
    Router,
    response::{IntoResponse, Response},
    routing::{get, post, put},
};
use trellis_core::{Error, Result};
use trellis_service::accounts::Session;

use crate::{
    AppState,
    response::ApiError,
    ruma_route::{access_token, client_of},
};

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let mut router = router
        .route("/_matrix/media/v1/create", post(upload::create))
        .route("/_matrix/client/v1/media/config", get(info::config))
        .route("/_matrix/client/v1/media/preview_url", get(info::preview_url))
        .route("/_matrix/client/v1/media/download/{server}/{id}", get(download::download))
        .route(
            "/_matrix/client/v1/media/download/{server}/{id}/{filename}",
            get(download::download_as),
        )
        .route("/_matrix/client/v1/media/thumbnail/{server}/{id}", get(download::thumbnail))
        .route("/_matrix/federation/v1/media/download/{id}", get(federation::download))
        .route("/_matrix/federation/v1/media/thumbnail/{id}", get(federation::thumbnail));
    // Deprecated forms, under both versions clients still use (Hydrogen and older bots
    // speak `r0`): uploads, config and previews always needed a token and stay served;
    // unauthenticated downloads answer as `media.legacy_unauthenticated` says.
    for version in ["r0", "v3"] {
        let base = format!("/_matrix/media/{version}");
        router = router
            .route(&format!("{base}/upload"), post(upload::upload))
            .route(&format!("{base}/upload/{{server}}/{{id}}"), put(upload::upload_to))
            .route(&format!("{base}/config"), get(info::config))
            .route(&format!("{base}/preview_url"), get(info::preview_url))
            .route(&format!("{base}/download/{{server}}/{{id}}"), get(download::legacy_download))
            .route(
                &format!("{base}/download/{{server}}/{{id}}/{{filename}}"),
                get(download::legacy_download_as),
            )
            .route(&format!("{base}/thumbnail/{{server}}/{{id}}"), get(download::legacy_thumbnail));
    }
    router
}

/// The caller's session; every media endpoint but the legacy downloads needs one.
async fn session(state: &AppState, parts: &http::request::Parts) -> Result<Session> {
    let token = access_token(parts).ok_or_else(Error::missing_token)?;
    let client = client_of(parts, state.config.http.x_forwarded_for);
    trellis_service::appservice::authenticate(state, &token, parts.uri.query(), &client).await
}

fn respond(result: Result<Response>) -> Response {
    result.unwrap_or_else(|e| ApiError(e).into_response())
}

/// Query parameters as (name, value) pairs.
fn query(parts: &http::request::Parts) -> Vec<(String, String)> {
    form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn param<'a>(query: &'a [(String, String)], name: &str) -> Option<&'a str> {
    query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}
