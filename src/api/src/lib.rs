//! HTTP: axum routers for every API surface, and the layers every request passes through.

mod admin;
pub mod client;
mod convert;
mod cors;
pub(crate) mod federation;
mod guest_access;
mod media;
mod observe;
pub mod response;
pub mod ruma_route;
mod server;
mod suspension;

use std::sync::Arc;

use axum::{Router, extract::DefaultBodyLimit, middleware, response::IntoResponse, routing::get};
use http::{HeaderName, header};
use tower::ServiceBuilder;
use tower_http::{
    catch_panic::CatchPanicLayer,
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
    let router = admin::routes(router, services.clone());
    // `layer` wraps only the routes added so far: media uploads, added after it, are
    // bounded by their own streaming limit instead of the whole-body one.
    let router = router.layer(RequestBodyLimitLayer::new(max_body));
    let router = media::routes(router);
    let request_id = HeaderName::from_static("x-request-id");

    // Sends that ask for a delay share their paths with the ordinary ones: routed apart
    // before the main router matches them.
    let delayed = client::delayed_events::delayed_sends(services.clone())
        .layer(RequestBodyLimitLayer::new(max_body))
        .layer(middleware::from_fn_with_state(services.clone(), observe::observe));
    let routes = router
        .fallback(|| async {
            response::ApiError(trellis_core::Error::unrecognized("Unrecognized request"))
        })
        .with_state(services.clone())
        // Per route: `observe` labels metrics with the matched route.
        .layer(DefaultBodyLimit::disable())
        .layer(middleware::from_fn_with_state(services, observe::observe));
    // The layers every request passes, outermost first: panics and framework errors are
    // turned into Matrix JSON, and every response gets CORS. One tower stack around the
    // router rather than `Router::layer`, which boxes each layer's future separately for
    // every request: a held `/sync` kept about 3 KB of such boxes.
    let stack = ServiceBuilder::new()
        .layer(SetRequestIdLayer::new(request_id.clone(), observe::RequestIds::default()))
        .layer(PropagateRequestIdLayer::new(request_id))
        .layer(TraceLayer::new_for_http().make_span_with(observe::make_span))
        .layer(cors::CorsLayer)
        .map_response(response::matrix_errors)
        .map_response(IntoResponse::into_response)
        .layer(CatchPanicLayer::custom(response::panic_response))
        .layer(middleware::from_fn_with_state(delayed, client::delayed_events::divert))
        .service(routes);
    Router::new().fallback_service(stack)
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
        .route("/health", get(server::health))
        .with_state(services)
}
