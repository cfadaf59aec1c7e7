//! Turning results into HTTP responses, and making sure every error a client sees is
//! Matrix error JSON — including the ones produced below our handlers (unknown routes,
//! wrong methods, oversize bodies, panics).

use axum::{
    body::Body,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use trellis_core::{Error, ErrorKind};

/// Our error type as an axum response (a newtype: both types are foreign here).
pub struct ApiError(pub Error);

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        Self(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error_response(&self.0)
    }
}

/// How HTTP spells each kind of failure.
pub fn status_of(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
        ErrorKind::Unauthenticated => StatusCode::UNAUTHORIZED,
        ErrorKind::Forbidden => StatusCode::FORBIDDEN,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        ErrorKind::Conflict => StatusCode::CONFLICT,
        ErrorKind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorKind::RangeNotSatisfiable => StatusCode::RANGE_NOT_SATISFIABLE,
        ErrorKind::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        ErrorKind::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        ErrorKind::Upstream => StatusCode::BAD_GATEWAY,
        ErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
        ErrorKind::InsufficientStorage => StatusCode::INSUFFICIENT_STORAGE,
    }
}

pub fn error_response(e: &Error) -> Response {
    let mut resp = json_response(status_of(e.kind), e.body().to_string().into_bytes());
    if let Some(ms) =
        e.extra.as_ref().and_then(|x| x.get("retry_after_ms")).and_then(|v| v.as_u64())
    {
        let secs = ms.div_ceil(1000).max(1);
        if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
    }
    resp
}

pub fn json_response(status: StatusCode, body: Vec<u8>) -> Response {
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// Rewrites framework-generated error responses (which are plain text) as Matrix errors.
pub fn matrix_errors(resp: Response) -> Response {
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json {
        return resp;
    }
    let replacement = match resp.status() {
        StatusCode::NOT_FOUND => Error::unrecognized("Unrecognized request"),
        StatusCode::METHOD_NOT_ALLOWED => Error::method_not_allowed(),
        StatusCode::PAYLOAD_TOO_LARGE => Error::too_large("Request body is too large"),
        StatusCode::UNSUPPORTED_MEDIA_TYPE | StatusCode::UNPROCESSABLE_ENTITY => {
            Error::bad_json("Malformed request body")
        }
        StatusCode::BAD_REQUEST => {
            Error::new(ErrorKind::BadRequest, trellis_core::error::code::UNKNOWN, "Bad request")
        }
        StatusCode::INTERNAL_SERVER_ERROR => Error::new(
            ErrorKind::Internal,
            trellis_core::error::code::UNKNOWN,
            "Internal server error",
        ),
        _ => return resp,
    };
    let (mut parts, _) = resp.into_parts();
    let fresh = error_response(&replacement);
    parts.headers.remove(header::CONTENT_LENGTH);
    for (k, v) in fresh.headers() {
        parts.headers.insert(k, v.clone());
    }
    Response::from_parts(parts, fresh.into_body())
}

/// A panic in a handler becomes a 500 `M_UNKNOWN`; the process carries on.
pub fn panic_response(payload: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let detail = payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("(non-string panic)");
    tracing::error!(panic = detail, "request handler panicked");
    error_response(&Error::new(
        ErrorKind::Internal,
        trellis_core::error::code::UNKNOWN,
        "Internal server error",
    ))
}
