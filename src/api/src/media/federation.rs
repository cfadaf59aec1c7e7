//! Media across servers: serving ours to other servers (`/_matrix/federation/v1/media`,
//! multipart responses, X-Matrix authenticated) and fetching theirs on first use, then
//! serving it from the local cache like any other media.

use axum::{
    body::Body,
    extract::{Path, Request, State},
    response::Response,
};
use futures_util::StreamExt;
use http::{HeaderValue, header};
use trellis_core::{Error, ErrorKind, Result, error::code};
use trellis_service::media::{
    Content,
    multipart::{self, MediaPart},
    valid_media_id,
};

use super::{
    download::thumbnail_content,
    respond,
    response::{disposition, inline_safe},
};
use crate::AppState;

/// Extra room for the multipart envelope around a remote file.
const ENVELOPE_SLACK: usize = 64 * 1024;

/// Fetches `(server, id)` from its server unless this server has it (or is it).
pub(super) async fn ensure_local_copy(s: &AppState, server: &str, id: &str) -> Result<()> {
    if server == s.server_name() || s.media.known(server, id)? {
        return Ok(());
    }
    if !valid_media_id(id) || !s.federation.enabled() {
        return Err(Error::not_found("Media not found"));
    }
    let limit = usize::try_from(s.media.config().max_upload_bytes).unwrap_or(usize::MAX);
    let limit = limit.saturating_add(ENVELOPE_SLACK);
    let path = format!(
        "/_matrix/federation/v1/media/download/{}",
        trellis_service::federation::encode(id)
    );
    let (content_type, body) = s.federation.get_bytes(server, &path, limit).await?;
    let bad =
        || Error::new(ErrorKind::Upstream, code::UNKNOWN, format!("{server} sent malformed media"));
    let boundary = content_type.as_deref().and_then(multipart::boundary).ok_or_else(bad)?;
    let (content_type, filename, bytes) = match multipart::media_part(&body, &boundary) {
        Some(MediaPart::Content { content_type, disposition, body }) => {
            (content_type, disposition.as_deref().and_then(multipart::filename), body)
        }
        Some(MediaPart::Redirect(url)) => {
            // Following it would let another server point this one at any address,
            // internal ones included; it waits for the preview fetcher's address policy.
            tracing::debug!(server, url, "remote media answered with a redirect");
            return Err(Error::new(
                ErrorKind::Upstream,
                code::UNKNOWN,
                format!("{server} redirects its media elsewhere, which is not followed yet"),
            ));
        }
        None => return Err(bad()),
    };
    s.media.store_remote(server, id, content_type, filename, bytes).await
}

/// A multipart response around `content`, as the federation media endpoints answer.
async fn multipart_response(s: &AppState, content: &Content) -> Result<Response> {
    let boundary = trellis_service::random_token(24);
    let disposition = disposition(inline_safe(&content.content_type), content.filename.as_deref());
    let (head, tail) = multipart::envelope(&boundary, &content.content_type, &disposition);
    let file = match &content.inline {
        Some(bytes) => futures_util::stream::iter([Ok(bytes.clone())]).boxed(),
        None => s.media.open(content, None).await?,
    };
    let body = futures_util::stream::iter([Ok(bytes::Bytes::from(head))])
        .chain(file)
        .chain(futures_util::stream::iter([Ok(bytes::Bytes::from(tail))]));
    let mut resp = Response::new(Body::from_stream(body));
    let value = HeaderValue::from_str(&format!("multipart/mixed; boundary={boundary}"))
        .map_err(|e| Error::internal("boundary", e))?;
    resp.headers_mut().insert(header::CONTENT_TYPE, value);
    Ok(resp)
}

/// The origin of a signed federation request without a body.
async fn verify(s: &AppState, parts: &http::request::Parts) -> Result<String> {
    let mut request = http::Request::new(&[][..]);
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = parts.uri.clone();
    *request.headers_mut() = parts.headers.clone();
    s.federation.verify_request(&request).await
}

/// GET /_matrix/federation/v1/media/download/{mediaId}
pub async fn download(State(s): State<AppState>, Path(id): Path<String>, req: Request) -> Response {
    let parts = req.into_parts().0;
    respond(
        async {
            verify(&s, &parts).await?;
            let content =
                s.media.content(s.server_name(), &id, std::time::Duration::from_secs(0)).await?;
            multipart_response(&s, &content).await
        }
        .await,
    )
}

/// GET /_matrix/federation/v1/media/thumbnail/{mediaId}
pub async fn thumbnail(
    State(s): State<AppState>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    let parts = req.into_parts().0;
    respond(
        async {
            verify(&s, &parts).await?;
            let server = s.server_name().to_owned();
            let content = thumbnail_content(&s, &parts, &server, &id).await?;
            multipart_response(&s, &content).await
        }
        .await,
    )
}
