//! Endpoints about the server itself: the key server, federation version, `.well-known`
//! discovery and health.

use axum::{
    Router,
    response::{IntoResponse, Response},
    routing::get,
};
use http::{StatusCode, header};
use ruma::{
    api::federation::discovery::{get_server_keys, get_server_version},
    serde::Raw,
};
use serde_json::json;
use trellis_core::{Error, Result};

use crate::{
    AppState,
    response::{ApiError, json_response},
    ruma_route::{self, Ctx},
};

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = ruma_route::add::<get_server_keys::v2::Request, _, _>(router, server_keys);
    let router = ruma_route::add::<get_server_version::v1::Request, _, _>(router, server_version);
    router
        // The deprecated form with a key id in the path returns the same document.
        .route("/_matrix/key/v2/server/{key_id}", get(server_keys_legacy))
        .route("/.well-known/matrix/client", get(well_known_client))
        .route("/.well-known/matrix/server", get(well_known_server))
        .route("/health", get(health))
}

/// GET /_matrix/key/v2/server
async fn server_keys(
    ctx: Ctx,
    _: get_server_keys::v2::Request,
) -> Result<get_server_keys::v2::Response> {
    let doc = ctx.services.keys.server_keys_document()?;
    let raw: Raw<ruma::api::federation::discovery::ServerSigningKeys> = Raw::from_json(
        serde_json::value::to_raw_value(&doc).map_err(|e| Error::internal("key document", e))?,
    );
    Ok(get_server_keys::v2::Response::new(raw))
}

/// GET /_matrix/key/v2/server/{keyId}
async fn server_keys_legacy(axum::extract::State(s): axum::extract::State<AppState>) -> Response {
    match s.keys.server_keys_document() {
        Ok(doc) => json_response(StatusCode::OK, serde_json::to_vec(&doc).unwrap_or_default()),
        Err(e) => ApiError(e).into_response(),
    }
}

/// GET /_matrix/federation/v1/version
async fn server_version(
    _: Ctx,
    _: get_server_version::v1::Request,
) -> Result<get_server_version::v1::Response> {
    let mut server = get_server_version::v1::Server::new();
    server.name = Some("Trellis".into());
    server.version = Some(trellis_core::VERSION.into());
    let mut resp = get_server_version::v1::Response::new();
    resp.server = Some(server);
    Ok(resp)
}

/// GET /.well-known/matrix/client
async fn well_known_client(
    axum::extract::State(s): axum::extract::State<AppState>,
    headers: axum::http::HeaderMap,
) -> Response {
    let configured = [&s.config.well_known.client, &s.config.email.public_base_url]
        .into_iter()
        .map(|url| url.trim_end_matches('/'))
        .find(|url| !url.is_empty());
    // Unconfigured: the address the client reached this server at, which is where it
    // should keep talking to.
    let base_url = match configured {
        Some(url) => url.to_owned(),
        None => {
            let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
            let Some(host) = header("host").filter(|h| valid_host(h)) else {
                return ApiError(Error::not_found("No client discovery information configured"))
                    .into_response();
            };
            let scheme = match header("x-forwarded-proto") {
                Some("https") => "https",
                _ => "http",
            };
            format!("{scheme}://{host}")
        }
    };
    let mut answer = json!({ "m.homeserver": { "base_url": base_url } });
    let foci = trellis_service::rtc::transports(&s);
    if !foci.is_empty() {
        answer["org.matrix.msc4143.rtc_foci"] = json!(foci);
    }
    json_response(StatusCode::OK, answer.to_string().into_bytes())
}

/// A `Host` header that can stand in a URL: a name or address and an optional port.
fn valid_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 255
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
}

/// GET /.well-known/matrix/server
async fn well_known_server(axum::extract::State(s): axum::extract::State<AppState>) -> Response {
    let server = &s.config.well_known.server;
    if server.is_empty() {
        return ApiError(Error::not_found("No server delegation configured")).into_response();
    }
    json_response(StatusCode::OK, json!({ "m.server": server }).to_string().into_bytes())
}

/// GET /health
pub(crate) async fn health(axum::extract::State(s): axum::extract::State<AppState>) -> Response {
    let text = |status: StatusCode, body: String| {
        (status, [(header::CONTENT_TYPE, "text/plain")], body).into_response()
    };
    match s.storage_health() {
        Ok(()) => text(StatusCode::OK, "OK".into()),
        Err(fault) => {
            let what = match fault.cause {
                trellis_service::FaultCause::OutOfSpace => "out of disk space",
                trellis_service::FaultCause::Io => "failing",
            };
            let secs = fault.since.elapsed().map_or(0, |d| d.as_secs());
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("storage {what} for {secs} s: writes are refused\n"),
            )
        }
    }
}
