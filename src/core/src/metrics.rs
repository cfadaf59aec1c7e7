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
pub struct DirectionLabels {
    /// `sent` (by this server's users) or `received` (from other servers).
    pub direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WindowLabels {
    /// `day` (today, UTC) or `month` (the last 30 days).
    pub window: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    /// Where a bandwidth estimate came from: `receiver` (its REMB) or `send_side` (the
    /// SFU's own, from transport-wide congestion feedback).
    pub source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Why something was refused or cut (TURN: `auth`, `quota`, `peer`, `bandwidth`;
    /// connections: `total`, `per_ip`, `slow_body`).
    pub reason: String,
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
    /// Usage figures (kept by the analytics step).
    pub usage: UsageMetrics,
    /// Requests answered since start, and those answered with a 5xx (for the admin
    /// dashboard's error rate; Prometheus has them by route).
    pub requests_total: std::sync::atomic::AtomicU64,
    pub requests_failed: std::sync::atomic::AtomicU64,
    /// When the process started (seconds since the epoch).
    pub start_time: Gauge,
    /// The built-in TURN server's figures.
    pub turn: TurnMetrics,
    pub connections: ConnectionMetrics,
    pub storage_health: StorageHealthMetrics,
    pub sfu: SfuMetrics,
    pub backups: BackupMetrics,
}

/// The built-in SFU's calls and the media it forwards.
#[derive(Clone, Debug)]
pub struct SfuMetrics {
    pub calls: Gauge,
    pub participants: Gauge,
    pub forwarded_packets: Counter,
    pub forwarded_bytes: Counter,
    pub forward_seconds: Histogram,
    pub subscriber_loss: Histogram,
    pub rtt_seconds: Histogram,
    pub estimates: Family<SourceLabels, Counter>,
    /// The family's two members, held so that counting needs no lookup.
    pub send_side_estimates: Counter,
    pub receiver_estimates: Counter,
    /// Members' delayed call leaves handed over to the server, and those it posted
    /// because the member's participant left the call.
    pub leaves_handed_over: Counter,
    pub leaves_posted: Counter,
}

impl Default for SfuMetrics {
    fn default() -> Self {
        let estimates = Family::<SourceLabels, Counter>::default();
        let member =
            |source: &str| estimates.get_or_create(&SourceLabels { source: source.into() }).clone();
        let (send_side_estimates, receiver_estimates) = (member("send_side"), member("receiver"));
        Self {
            calls: Gauge::default(),
            participants: Gauge::default(),
            forwarded_packets: Counter::default(),
            forwarded_bytes: Counter::default(),
            forward_seconds: Histogram::new([
                0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005,
                0.01, 0.025,
            ]),
            subscriber_loss: Histogram::new([0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5]),
            rtt_seconds: Histogram::new([0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6]),
            estimates,
            send_side_estimates,
            receiver_estimates,
            leaves_handed_over: Counter::default(),
            leaves_posted: Counter::default(),
        }
    }
}

impl SfuMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register("sfu_calls", "Calls running on the built-in SFU", self.calls.clone());
        registry.register(
            "sfu_participants",
            "Participants connected to the built-in SFU",
            self.participants.clone(),
        );
        registry.register(
            "sfu_forwarded_packets",
            "RTP packets the built-in SFU forwarded (one per receiver)",
            self.forwarded_packets.clone(),
        );
        registry.register(
            "sfu_forward_seconds",
            "Time from a packet's arrival at the built-in SFU to its write to the last receiver",
            self.forward_seconds.clone(),
        );
        registry.register(
            "sfu_subscriber_loss_ratio",
            "Share of forwarded packets a receiver reported lost, per receiver report",
            self.subscriber_loss.clone(),
        );
        registry.register(
            "sfu_rtt_seconds",
            "Round-trip time between the built-in SFU and its receivers, per receiver report",
            self.rtt_seconds.clone(),
        );
        registry.register(
            "sfu_bandwidth_estimates",
            "Bandwidth estimates taken for receiving connections, by source",
            self.estimates.clone(),
        );
        registry.register(
            "sfu_forwarded_bytes",
            "RTP payload bytes the built-in SFU forwarded (one copy per receiver)",
            self.forwarded_bytes.clone(),
        );
        registry.register(
            "sfu_leaves_handed_over",
            "Members' delayed call leaves handed over to the server (MSC4195)",
            self.leaves_handed_over.clone(),
        );
        registry.register(
            "sfu_leaves_posted",
            "Handed-over call leaves posted because the member left the SFU's call",
            self.leaves_posted.clone(),
        );
    }
}

/// Backups (`trellis_backups_total{outcome}` and the last success's figures).
#[derive(Clone, Debug, Default)]
pub struct BackupMetrics {
    pub taken: Family<OutcomeLabels, Counter>,
    /// When the last backup that succeeded was checkpointed (seconds since the epoch).
    pub last_success: Gauge,
    pub last_duration_seconds: Gauge<f64, AtomicU64>,
    /// Bytes the last backup copied (the rest its repository held already).
    pub last_copied_bytes: Gauge,
    pub last_total_bytes: Gauge,
}

impl BackupMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register("backups", "Backups taken, by outcome (ok, failed)", self.taken.clone());
        registry.register(
            "backup_last_success_timestamp_seconds",
            "When the newest successful backup was checkpointed",
            self.last_success.clone(),
        );
        registry.register(
            "backup_last_duration_seconds",
            "How long the last successful backup took",
            self.last_duration_seconds.clone(),
        );
        registry.register(
            "backup_last_copied_bytes",
            "Bytes the last successful backup copied (files not held by earlier backups)",
            self.last_copied_bytes.clone(),
        );
        registry.register(
            "backup_last_total_bytes",
            "Bytes of all the files the last successful backup holds",
            self.last_total_bytes.clone(),
        );
        for outcome in ["ok", "failed"] {
            let _ = self.taken.get_or_create(&OutcomeLabels { outcome: outcome.to_owned() });
        }
    }

    /// Counts a backup's outcome.
    pub fn outcome(&self, outcome: &str) {
        self.taken.get_or_create(&OutcomeLabels { outcome: outcome.to_owned() }).inc();
    }
}

/// Whether storage takes writes (a full disk stops it), filled in at each scrape.
#[derive(Clone, Debug, Default)]
pub struct StorageHealthMetrics {
    pub writable: Gauge,
    pub write_errors: Family<CauseLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CauseLabels {
    pub cause: String,
}

impl StorageHealthMetrics {
    fn register(&self, registry: &mut Registry) {
        self.writable.set(1);
        registry.register(
            "storage_writable",
            "1 while the database takes writes, 0 while they fail (such as on a full disk)",
            self.writable.clone(),
        );
        registry.register(
            "storage_write_errors",
            "Failed database writes, by cause (out_of_space, io)",
            self.write_errors.clone(),
        );
        for cause in ["out_of_space", "io"] {
            let _ = self.write_errors.get_or_create(&CauseLabels { cause: cause.to_owned() });
        }
    }

    /// Brings the failure counter for `cause` up to the engine's own running total.
    pub fn set_write_errors(&self, cause: &str, total: u64) {
        let counter = self.write_errors.get_or_create(&CauseLabels { cause: cause.to_owned() });
        let seen = counter.get();
        if total > seen {
            counter.inc_by(total - seen);
        }
    }
}

/// Client connections open, refused when accepted (`reason`: `total`, `per_ip`) and cut
/// (`slow_body`).
#[derive(Clone, Debug, Default)]
pub struct ConnectionMetrics {
    pub open: Gauge,
    pub refused: Family<ReasonLabels, Counter>,
    pub cut: Family<ReasonLabels, Counter>,
}

impl ConnectionMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register("connections_open", "Client connections open", self.open.clone());
        registry.register(
            "connections_refused",
            "Connections refused, by reason (total, per_ip; anonymous: a request without credentials shed near the total cap)",
            self.refused.clone(),
        );
        registry.register(
            "connections_cut",
            "Connections cut, by reason (slow_body)",
            self.cut.clone(),
        );
        for reason in ["total", "per_ip", "anonymous"] {
            let _ = self.refused.get_or_create(&ReasonLabels { reason: reason.to_owned() });
        }
        let _ = self.cut.get_or_create(&ReasonLabels { reason: "slow_body".to_owned() });
    }

    pub fn refused(&self, reason: &str) {
        self.refused.get_or_create(&ReasonLabels { reason: reason.to_owned() }).inc();
    }

    pub fn cut(&self, reason: &str) {
        self.cut.get_or_create(&ReasonLabels { reason: reason.to_owned() }).inc();
    }
}

/// The built-in TURN server's figures.
#[derive(Clone, Debug, Default)]
pub struct TurnMetrics {
    /// Relay allocations held now, and opened since start.
    pub allocations: Gauge,
    pub allocations_opened: Counter,
    /// Bytes relayed, either direction.
    pub relayed_bytes: Counter,
    /// Requests refused and datagrams dropped, by reason.
    pub refusals: Family<ReasonLabels, Counter>,
}

impl TurnMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "turn_allocations",
            "TURN relay allocations held",
            self.allocations.clone(),
        );
        registry.register(
            "turn_allocations_opened",
            "TURN relay allocations opened",
            self.allocations_opened.clone(),
        );
        registry.register(
            "turn_relayed_bytes",
            "Bytes relayed by TURN",
            self.relayed_bytes.clone(),
        );
        registry.register(
            "turn_refusals",
            "TURN requests refused and datagrams dropped, by reason",
            self.refusals.clone(),
        );
        for reason in ["auth", "quota", "peer", "bandwidth"] {
            let _ = self.refusals.get_or_create(&ReasonLabels { reason: reason.to_owned() });
        }
    }

    pub fn refused(&self, reason: &str) {
        self.refusals.get_or_create(&ReasonLabels { reason: reason.to_owned() }).inc();
    }
}

/// The usage figures, in a handle of their own for the part that keeps them.
#[derive(Clone, Debug)]
pub struct UsageMetrics {
    /// Messages (plain and encrypted) stored, by direction.
    messages: Family<DirectionLabels, Counter>,
    /// Read receipts set by this server's users.
    read_receipts: Counter,
    /// Distinct users active today and in the last 30 days.
    active_users: Family<WindowLabels, Gauge>,
}

impl UsageMetrics {
    /// A message was stored: `sent` by a user of this server or `received`.
    pub fn message(&self, direction: &str) {
        self.messages.get_or_create(&DirectionLabels { direction: direction.to_owned() }).inc();
    }

    pub fn read(&self) {
        self.read_receipts.inc();
    }

    /// Distinct active users in `window` (`day` or `month`).
    pub fn active(&self, window: &str, users: usize) {
        let labels = WindowLabels { window: window.to_owned() };
        self.active_users.get_or_create(&labels).set(i64::try_from(users).unwrap_or(i64::MAX));
    }
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
        let messages = Family::<DirectionLabels, Counter>::default();
        registry.register("messages", "Messages stored, by direction", messages.clone());
        let read_receipts = Counter::default();
        registry.register(
            "read_receipts",
            "Read receipts set by this server's users",
            read_receipts.clone(),
        );
        let active_users = Family::<WindowLabels, Gauge>::default();
        registry.register(
            "active_users",
            "Distinct users active today and in the last 30 days",
            active_users.clone(),
        );
        let start_time = Gauge::default();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        start_time.set(i64::try_from(now).unwrap_or(0));
        registry.register(
            "process_start_time_seconds",
            "When the server process started",
            start_time.clone(),
        );
        let turn = TurnMetrics::default();
        turn.register(&mut registry);
        let connections = ConnectionMetrics::default();
        connections.register(&mut registry);
        let storage_health = StorageHealthMetrics::default();
        storage_health.register(&mut registry);
        let sfu = SfuMetrics::default();
        sfu.register(&mut registry);
        let backups = BackupMetrics::default();
        backups.register(&mut registry);
        // Known label sets start at zero, so that rates exist before the first event.
        for outcome in ["sent", "retried", "failed", "rejected"] {
            let _ = pushes.get_or_create(&OutcomeLabels { outcome: outcome.to_owned() });
        }
        for direction in ["sent", "received"] {
            let _ = messages.get_or_create(&DirectionLabels { direction: direction.to_owned() });
        }
        for window in ["day", "month"] {
            let _ = active_users.get_or_create(&WindowLabels { window: window.to_owned() });
        }
        Self {
            registry,
            http_requests,
            http_duration,
            storage,
            pushes,
            push_queue,
            notification_emails,
            usage: UsageMetrics { messages, read_receipts, active_users },
            requests_total: Default::default(),
            requests_failed: Default::default(),
            start_time,
            turn,
            connections,
            storage_health,
            sfu,
            backups,
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
