//! "Download my data" (a Trellis extension, docs/operations.md):
//! `/_trellis/client/v1/export`.

use axum::{
    Router,
    body::Body,
    extract::{Path, RawQuery, State},
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use trellis_core::Error;
use trellis_service::export;

use super::webhooks::respond;
use crate::{AppState, response::ApiError, ruma_route::Authenticated};

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    router
        .route("/_trellis/client/v1/export", post(start))
        .route("/_trellis/client/v1/export/{id}", get(status))
        .route("/_trellis/client/v1/export/{id}/download", get(download))
}

/// POST /_trellis/client/v1/export
async fn start(Authenticated(ctx): Authenticated) -> Response {
    let started = async {
        let localpart = ctx.session()?.localpart.clone();
        export::start(&ctx.services, &localpart, (&localpart, &ctx.client)).await
    }
    .await;
    match started {
        Ok(e) => (StatusCode::ACCEPTED, axum::Json(export::describe(&e))).into_response(),
        Err(e) => respond(Err(e)),
    }
}

/// GET /_trellis/client/v1/export/{id}
async fn status(Authenticated(ctx): Authenticated, Path(id): Path<String>) -> Response {
    respond(
        ctx.session()
            .and_then(|s| export::get(&ctx.services, &id, Some(&s.localpart)))
            .map(|e| export::describe(&e)),
    )
}

/// GET /_trellis/client/v1/export/{id}/download?token=...
async fn download(
    State(s): State<AppState>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Response {
    let token = form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.into_owned());
    let Some(token) = token else {
        return ApiError(Error::missing_param("Missing token")).into_response();
    };
    match export::take(&s, &id, &token).await {
        Ok((file, size)) => {
            let mut resp =
                Response::new(Body::from_stream(tokio_util::io::ReaderStream::new(file)));
            let headers = resp.headers_mut();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/zip"));
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
            if let Ok(v) = HeaderValue::from_str(&format!(
                "attachment; filename=\"trellis-export-{}.zip\"",
                id.chars().filter(char::is_ascii_alphanumeric).collect::<String>()
            )) {
                headers.insert(header::CONTENT_DISPOSITION, v);
            }
            resp
        }
        Err(e) => ApiError(e).into_response(),
    }
}
