//! `GET /media/config` and `GET /media/preview_url`.

use axum::{
    extract::{Request, State},
    response::Response,
};
use http::StatusCode;
use serde_json::json;
use trellis_core::{Error, ErrorKind, error::code};
use trellis_service::ratelimit::Class;

use super::{param, query, respond, session};
use crate::{AppState, response::json_response};

/// GET /_matrix/client/v1/media/config, GET /_matrix/media/v3/config
pub async fn config(State(s): State<AppState>, req: Request) -> Response {
    respond(
        async {
            session(&s, &req.into_parts().0).await?;
            let body = json!({ "m.upload.size": s.media.config().max_upload_bytes });
            Ok(json_response(StatusCode::OK, body.to_string().into_bytes()))
        }
        .await,
    )
}

/// GET /_matrix/client/v1/media/preview_url, GET /_matrix/media/v3/preview_url
pub async fn preview_url(State(s): State<AppState>, req: Request) -> Response {
    respond(
        async {
            let parts = req.into_parts().0;
            let session = session(&s, &parts).await?;
            s.rate_limits.check(Class::Default, &session.localpart)?;
            let query = query(&parts);
            let url = param(&query, "url").ok_or_else(|| {
                Error::new(ErrorKind::BadRequest, code::MISSING_PARAM, "Missing url parameter")
            })?;
            // `ts` asks for a version no older than it; a cached preview within the cache
            // lifetime is always acceptable, so it needs no handling of its own.
            let og = s.media.preview(url).await?;
            Ok(json_response(StatusCode::OK, og.to_string().into_bytes()))
        }
        .await,
    )
}
