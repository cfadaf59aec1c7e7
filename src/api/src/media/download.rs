//! Downloads and thumbnails, authenticated (`/_matrix/client/v1/media`) and legacy.

use std::time::Duration;

use axum::{
    extract::{Path, Request, State},
    response::Response,
};
use http::{header, request::Parts};
use trellis_core::{Error, ErrorKind, Result, error::code};
use trellis_service::media::{Method, Spec, ThumbnailRequest};

use super::{param, query, respond, response::serve, session};
use crate::AppState;

/// The spec's default for `timeout_ms`.
const DEFAULT_WAIT_MS: u64 = 20_000;

fn wait(query: &[(String, String)]) -> Result<Duration> {
    match param(query, "timeout_ms") {
        None => Ok(Duration::from_millis(DEFAULT_WAIT_MS)),
        Some(v) => v
            .parse::<u64>()
            .map(Duration::from_millis)
            .map_err(|_| Error::invalid_param("timeout_ms must be a non-negative integer")),
    }
}

async fn download_inner(
    s: &AppState,
    parts: &Parts,
    server: &str,
    id: &str,
    filename: Option<&str>,
) -> Result<Response> {
    let query = query(parts);
    super::federation::ensure_local_copy(s, server, id).await?;
    let content = s.media.content(server, id, wait(&query)?).await?;
    let filename = filename.or(content.filename.as_deref());
    serve(s, &content, filename, parts.headers.get(header::RANGE)).await
}

async fn thumbnail_inner(s: &AppState, parts: &Parts, server: &str, id: &str) -> Result<Response> {
    let content = thumbnail_content(s, parts, server, id).await?;
    serve(s, &content, content.filename.as_deref(), parts.headers.get(header::RANGE)).await
}

/// The thumbnail a request's query asks for.
pub(super) async fn thumbnail_content(
    s: &AppState,
    parts: &Parts,
    server: &str,
    id: &str,
) -> Result<trellis_service::media::Content> {
    let query = query(parts);
    let dimension = |name: &str| -> Result<u32> {
        let value = param(&query, name).ok_or_else(|| {
            Error::new(ErrorKind::BadRequest, code::MISSING_PARAM, format!("Missing {name}"))
        })?;
        value
            .parse::<u32>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| Error::invalid_param(format!("{name} must be a positive integer")))
    };
    let method = match param(&query, "method") {
        None | Some("scale") => Method::Scale,
        Some("crop") => Method::Crop,
        Some(_) => return Err(Error::invalid_param("method must be crop or scale")),
    };
    let animated = match param(&query, "animated") {
        None => None,
        Some("true") => Some(true),
        Some("false") => Some(false),
        Some(_) => return Err(Error::invalid_param("animated must be true or false")),
    };
    let request = ThumbnailRequest {
        spec: Spec::new(dimension("width")?, dimension("height")?, method),
        animated,
    };
    super::federation::ensure_local_copy(s, server, id).await?;
    s.media.thumbnail(server, id, request, wait(&query)?).await
}

/// Who may fetch: a signed-in user, or anyone on the deprecated endpoints when the
/// operator lifted the freeze.
#[derive(Clone, Copy)]
enum Access {
    Token,
    Legacy,
}

async fn check(s: &AppState, parts: &Parts, access: Access) -> Result<()> {
    match access {
        Access::Token => session(s, parts).await.map(|_| ()),
        Access::Legacy => legacy_allowed(s),
    }
}

async fn download_with(
    s: AppState,
    req: Request,
    access: Access,
    (server, id, filename): (String, String, Option<String>),
) -> Response {
    let parts = req.into_parts().0;
    respond(
        async {
            check(&s, &parts, access).await?;
            download_inner(&s, &parts, &server, &id, filename.as_deref()).await
        }
        .await,
    )
}

async fn thumbnail_with(
    s: AppState,
    req: Request,
    access: Access,
    (server, id): (String, String),
) -> Response {
    let parts = req.into_parts().0;
    respond(
        async {
            check(&s, &parts, access).await?;
            thumbnail_inner(&s, &parts, &server, &id).await
        }
        .await,
    )
}

/// GET /_matrix/client/v1/media/download/{serverName}/{mediaId}
pub async fn download(
    State(s): State<AppState>,
    Path((server, id)): Path<(String, String)>,
    req: Request,
) -> Response {
    download_with(s, req, Access::Token, (server, id, None)).await
}

/// GET /_matrix/client/v1/media/download/{serverName}/{mediaId}/{fileName}
pub async fn download_as(
    State(s): State<AppState>,
    Path((server, id, filename)): Path<(String, String, String)>,
    req: Request,
) -> Response {
    download_with(s, req, Access::Token, (server, id, Some(filename))).await
}

/// GET /_matrix/client/v1/media/thumbnail/{serverName}/{mediaId}
pub async fn thumbnail(
    State(s): State<AppState>,
    Path(path): Path<(String, String)>,
    req: Request,
) -> Response {
    thumbnail_with(s, req, Access::Token, path).await
}

/// The deprecated unauthenticated endpoints exist only when the operator lifted the
/// freeze; otherwise no media is found through them.
fn legacy_allowed(s: &AppState) -> Result<()> {
    if s.media.config().legacy_unauthenticated {
        Ok(())
    } else {
        Err(Error::not_found(
            "Unauthenticated media access is disabled; use /_matrix/client/v1/media",
        ))
    }
}

/// GET /_matrix/media/v3/download/{serverName}/{mediaId}
pub async fn legacy_download(
    State(s): State<AppState>,
    Path((server, id)): Path<(String, String)>,
    req: Request,
) -> Response {
    download_with(s, req, Access::Legacy, (server, id, None)).await
}

/// GET /_matrix/media/v3/download/{serverName}/{mediaId}/{fileName}
pub async fn legacy_download_as(
    State(s): State<AppState>,
    Path((server, id, filename)): Path<(String, String, String)>,
    req: Request,
) -> Response {
    download_with(s, req, Access::Legacy, (server, id, Some(filename))).await
}

/// GET /_matrix/media/v3/thumbnail/{serverName}/{mediaId}
pub async fn legacy_thumbnail(
    State(s): State<AppState>,
    Path(path): Path<(String, String)>,
    req: Request,
) -> Response {
    thumbnail_with(s, req, Access::Legacy, path).await
}
