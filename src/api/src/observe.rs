//! Per-request observability: request ids, tracing spans and Prometheus metrics.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Instant,
};

use axum::{
    extract::{MatchedPath, Request, State},
    middleware::Next,
    response::Response,
};
use tower_http::request_id::{MakeRequestId, RequestId};
use tracing::Span;
use trellis_core::metrics::{RequestLabels, RouteLabels};

use crate::AppState;

/// Request ids unique within the process and distinct across restarts:
/// `<start time hex>-<counter hex>`.
#[derive(Clone)]
pub struct RequestIds {
    boot: u64,
    next: std::sync::Arc<AtomicU64>,
}

impl Default for RequestIds {
    fn default() -> Self {
        Self { boot: trellis_core::now_millis(), next: Default::default() }
    }
}

impl MakeRequestId for RequestIds {
    fn make_request_id<B>(&mut self, _: &http::Request<B>) -> Option<RequestId> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        http::HeaderValue::from_str(&format!("{:x}-{n:x}", self.boot)).ok().map(RequestId::new)
    }
}

/// The span of one request. Only the path is recorded: query strings can hold access
/// tokens.
pub fn make_span<B>(req: &http::Request<B>) -> Span {
    let id = req.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("-");
    let path = req.uri().path();
    // A webhook's URL ends with its secret.
    let path = match path.strip_prefix("/_trellis/hooks/") {
        Some(rest) => {
            format!("/_trellis/hooks/{}/…", rest.rsplit_once('/').map_or(rest, |(h, _)| h))
        }
        None => path.to_owned(),
    };
    tracing::info_span!("request", id, method = %req.method(), path = %path)
}

pub async fn observe(State(services): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    let method = req.method().as_str().to_owned();
    let started = Instant::now();
    let resp = next.run(req).await;
    let elapsed = started.elapsed().as_secs_f64();
    let metrics = &services.metrics;
    metrics.requests_total.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if resp.status().is_server_error() {
        metrics.requests_failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    metrics
        .http_requests
        .get_or_create(&RequestLabels {
            method: method.clone(),
            route: route.clone(),
            status: resp.status().as_u16(),
        })
        .inc();
    metrics.http_duration.get_or_create(&RouteLabels { method, route }).observe(elapsed);
    resp
}
