//! The process-wide metrics registry, rendered in the Prometheus text format.

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub method: String,
    /// The route template (`/_matrix/client/v3/rooms/{room_id}/send/...`), never the raw
    /// path, so that label cardinality stays bounded.
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub method: String,
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StorageLabels {
    /// The RocksDB column family: a table's own, or one shared by small tables.
    pub family: String,
    pub stat: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `sent`, `retried`, `failed` (given up), `rejected` (the gateway dropped the key).
    pub outcome: String,
}

pub struct Metrics {
    registry: Registry,
    /// Pushes to push gateways, by outcome.
    pub pushes: Family<OutcomeLabels, Counter>,
    /// Pushes waiting to be sent.
    pub push_queue: Gauge,
    /// Notification mails sent.
    pub notification_emails: Counter,
    pub http_requests: Family<RequestLabels, Counter>,
    pub http_duration: Family<RouteLabels, Histogram>,
    pub storage: Family<StorageLabels, Gauge<f64, AtomicU64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("trellis");
        let http_requests = Family::<RequestLabels, Counter>::default();
        let http_duration = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0,
            ])
        });
        let storage = Family::<StorageLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "http_requests",
            "HTTP requests by route and status",
            http_requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency by route",
            http_duration.clone(),
        );
        registry.register(
            "storage",
            "Storage engine statistics per column family",
            storage.clone(),
        );
        let pushes = Family::<OutcomeLabels, Counter>::default();
        registry.register("pushes", "Pushes to push gateways by outcome", pushes.clone());
        let push_queue = Gauge::default();
        registry.register("push_queue", "Pushes waiting to be sent", push_queue.clone());
        let notification_emails = Counter::default();
        registry.register(
            "notification_emails",
            "Notification mails sent",
            notification_emails.clone(),
        );
        Self {
            registry,
            http_requests,
            http_duration,
            storage,
            pushes,
            push_queue,
            notification_emails,
        }
    }

    /// Counts a push outcome.
    pub fn push(&self, outcome: &str) {
        self.pushes.get_or_create(&OutcomeLabels { outcome: outcome.to_owned() }).inc();
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
