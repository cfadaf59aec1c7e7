//! `POST /upload`, `POST /create` and `PUT /upload/{server}/{id}`.

use axum::{
    body::Body,
    extract::{Path, Request, State},
    response::Response,
};
use http::{StatusCode, header, request::Parts};
use serde_json::json;
use trellis_core::{Error, Result};
use trellis_service::{
    accounts::Session,
    media::{Upload, UploadInfo},
    ratelimit::Class,
};

use super::{param, query, respond, session};
use crate::{AppState, response::json_response};

/// Longest file name kept, in bytes.
const MAX_FILENAME: usize = 255;

fn upload_of(
    parts: &Parts,
    owner: String,
    body: Body,
) -> Upload<impl futures_util::Stream<Item = Result<bytes::Bytes, axum::Error>> + Unpin> {
    let header_str =
        |name| parts.headers.get(name).and_then(|v: &http::HeaderValue| v.to_str().ok());
    let query = query(parts);
    let filename = param(&query, "filename").filter(|f| !f.is_empty()).map(|f| {
        let mut end = f.len().min(MAX_FILENAME);
        while !f.is_char_boundary(end) {
            end -= 1;
        }
        f[..end].to_owned()
    });
    Upload {
        info: UploadInfo {
            owner,
            content_type: header_str(header::CONTENT_TYPE).map(str::to_owned),
            filename,
            declared_len: header_str(header::CONTENT_LENGTH).and_then(|v| v.parse().ok()),
        },
        body: body.into_data_stream(),
    }
}

/// A refused upload may leave the body unread, and the connection then cannot carry
/// another request: say so, or a client reusing it sees its next request fail.
fn respond_upload(result: Result<Response>) -> Response {
    let failed = result.is_err();
    let mut resp = respond(result);
    if failed {
        resp.headers_mut().insert(header::CONNECTION, http::HeaderValue::from_static("close"));
    }
    resp
}

fn ok(value: serde_json::Value) -> Response {
    json_response(StatusCode::OK, value.to_string().into_bytes())
}

/// Who uploads: a full account (guests only read media), within the upload rate.
async fn uploader(s: &AppState, parts: &Parts) -> Result<Session> {
    let session = session(s, parts).await?;
    if session.guest {
        return Err(Error::guest_forbidden());
    }
    s.rate_limits.check(Class::MediaUpload, &session.localpart)?;
    Ok(session)
}

/// POST /_matrix/media/v3/upload
pub async fn upload(State(s): State<AppState>, req: Request) -> Response {
    respond_upload(
        async {
            let (parts, body) = req.into_parts();
            let session = uploader(&s, &parts).await?;
            let mxc = s.media.upload(upload_of(&parts, session.localpart, body)).await?;
            Ok(ok(json!({ "content_uri": mxc })))
        }
        .await,
    )
}

/// POST /_matrix/media/v1/create
pub async fn create(State(s): State<AppState>, req: Request) -> Response {
    respond(
        async {
            let (parts, _) = req.into_parts();
            let session = uploader(&s, &parts).await?;
            let (mxc, expires) = s.media.create(&session.localpart).await?;
            Ok(ok(json!({ "content_uri": mxc, "unused_expires_at": expires })))
        }
        .await,
    )
}

/// PUT /_matrix/media/v3/upload/{serverName}/{mediaId}
pub async fn upload_to(
    State(s): State<AppState>,
    Path((server, id)): Path<(String, String)>,
    req: Request,
) -> Response {
    respond_upload(
        async {
            let (parts, body) = req.into_parts();
            let session = uploader(&s, &parts).await?;
            s.media.upload_to(&server, &id, upload_of(&parts, session.localpart, body)).await?;
            Ok(ok(json!({})))
        }
        .await,
    )
}
