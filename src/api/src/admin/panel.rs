//! The admin panel at `/_trellis/admin/`: three static files compiled into the binary,
//! served with a strict content security policy (only this origin's script, style and
//! API; no inline code; no framing). The page logs in with an admin's password and
//! calls the admin API with the token in a header, never a cookie, so it is CSRF-safe.

use axum::{
    Router,
    response::{IntoResponse, Redirect, Response},
    routing::get,
};
use http::{HeaderValue, header};

use crate::AppState;

const INDEX: &str = include_str!("panel/index.html");
const SCRIPT: &str = include_str!("panel/app.js");
const STYLE: &str = include_str!("panel/app.css");

const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    router
        .route("/_trellis/admin", get(|| async { Redirect::permanent("/_trellis/admin/") }))
        .route("/_trellis/admin/", get(|| async { file(INDEX, "text/html; charset=utf-8") }))
        .route(
            "/_trellis/admin/app.js",
            get(|| async { file(SCRIPT, "text/javascript; charset=utf-8") }),
        )
        .route("/_trellis/admin/app.css", get(|| async { file(STYLE, "text/css; charset=utf-8") }))
}

fn file(body: &'static str, content_type: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(POLICY));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}
