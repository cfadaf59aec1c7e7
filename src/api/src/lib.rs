//! HTTP: axum routers for every API surface, and the layers every request passes through.

mod admin;
pub mod client;
mod convert;
pub(crate) mod federation;
mod media;
mod observe;
pub mod response;
pub mod ruma_route;
mod server;

use std::sync::Arc;

use axum::{Router, extract::DefaultBodyLimit, middleware, response::IntoResponse, routing::get};
use http::{HeaderName, Method, header};
use tower_http::{
    catch_panic::CatchPanicLayer,
    cors::{Any, CorsLayer},
    limit::RequestBodyLimitLayer,
    request_id::{PropagateRequestIdLayer, SetRequestIdLayer},
    trace::TraceLayer,
};
use trellis_service::Services;

pub type AppState = Arc<Services>;

/// The client-server (and, for now, federation key) listener.
pub fn main_router(services: AppState) -> Router {
    let max_body = services.config.http.max_request_bytes;
    let router = Router::new();
    let router = client::routes(router);
    let router = server::routes(router);
    let router = federation::routes(router);
    let router = admin::routes(router);
    // `layer` wraps only the routes added so far: media uploads, added after it, are
    // bounded by their own streaming limit instead of the whole-body one.
    let router = router.layer(RequestBodyLimitLayer::new(max_body));
    let router = media::routes(router);
    let request_id = HeaderName::from_static("x-request-id");

    router
        .fallback(|| async {
            response::ApiError(trellis_core::Error::unrecognized("Unrecognized request"))
        })
        .with_state(services.clone())
        // Layers run outermost-last: panics and framework errors are turned into Matrix
        // JSON, and every response gets CORS.
        .layer(DefaultBodyLimit::disable())
        .layer(middleware::from_fn_with_state(services, observe::observe))
        .layer(CatchPanicLayer::custom(response::panic_response))
        .layer(middleware::map_response(response::matrix_errors))
        .layer(cors())
        .layer(TraceLayer::new_for_http().make_span_with(observe::make_span))
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(SetRequestIdLayer::new(request_id, observe::RequestIds::default()))
}

/// The client-server spec's CORS requirements, so browser clients can call every endpoint.
fn cors() -> CorsLayer {
    CorsLayer::new()
        .allow_origin(Any)
        .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE, Method::OPTIONS])
        .allow_headers([
            HeaderName::from_static("x-requested-with"),
            header::CONTENT_TYPE,
            header::AUTHORIZATION,
        ])
}

/// The separate metrics listener: Prometheus text at `/metrics`, plus `/health`.
pub fn metrics_router(services: AppState) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|axum::extract::State(s): axum::extract::State<AppState>| async move {
                s.update_storage_metrics();
                (
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    s.metrics.render(),
                )
                    .into_response()
            }),
        )
        .route("/health", get(|| async { "OK" }))
        .with_state(services)
}
