//! The figures of the admin panel's dashboard, live: from the same counters and tables
//! as the metrics and analytics, nothing scanned but small tables.

use std::sync::atomic::Ordering;

use serde::Serialize;
use trellis_core::{Result, now_millis};
use trellis_store::Direction;

use crate::{Services, tables::MEDIA_USAGE};

#[derive(Debug, Clone, Serialize)]
pub struct Dashboard {
    pub server_name: String,
    pub version: String,
    pub uptime_seconds: u64,
    pub users: Users,
    pub rooms: usize,
    pub media_bytes: u64,
    /// Messages stored per hour, the last 24 hours (oldest first), since start-up.
    pub messages_per_hour: Vec<HourCount>,
    pub federation: FederationHealth,
    pub queues: Queues,
    pub requests: Requests,
    pub calls: Calls,
}

#[derive(Debug, Clone, Serialize)]
pub struct Calls {
    /// Group calls going on now.
    pub group_calls_now: usize,
    /// Relay allocations the built-in TURN server holds.
    pub turn_allocations: i64,
    /// Calls and participants on the built-in SFU now.
    pub sfu_calls_now: i64,
    pub sfu_participants_now: i64,
    /// Delayed events waiting to be posted.
    pub delayed_events_waiting: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Users {
    pub total: usize,
    /// Seen in the last 10 minutes.
    pub active_now: usize,
    pub active_today: usize,
    pub active_month: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct HourCount {
    pub hour_ts: u64,
    pub messages: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct FederationHealth {
    pub destinations: usize,
    /// Destinations whose last attempt failed.
    pub failing: usize,
    pub failing_destinations: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Queues {
    /// Items waiting for other servers.
    pub federation: usize,
    /// Pushes waiting for push gateways.
    pub push: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Requests {
    pub total: u64,
    pub server_errors: u64,
    /// Server errors per request since start-up.
    pub error_rate: f64,
}

pub fn dashboard(services: &Services) -> Result<Dashboard> {
    // Not the whole report: the panel polls this, and cohorts read every account.
    let (active_today, active_month) = services.analytics.active_users()?;
    let users = crate::tables::USERS.scan_prefix(&*services.db, &(), Direction::Forward)?.count();
    let mut media_bytes = 0u64;
    for row in MEDIA_USAGE.scan_prefix(&*services.db, &(), Direction::Forward)? {
        media_bytes = media_bytes.saturating_add(row?.1);
    }
    let destinations = services.federation.outbox.destinations()?;
    let failing: Vec<String> = destinations
        .iter()
        .filter(|d| d.health.failures > 0)
        .map(|d| d.destination.clone())
        .collect();
    let metrics = &services.metrics;
    let total = metrics.requests_total.load(Ordering::Relaxed);
    let failed = metrics.requests_failed.load(Ordering::Relaxed);
    let started = u64::try_from(metrics.start_time.get()).unwrap_or(0);
    Ok(Dashboard {
        server_name: services.server_name().to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        uptime_seconds: (now_millis() / 1000).saturating_sub(started),
        users: Users {
            total: users,
            active_now: services.accounts.active_since(now_millis().saturating_sub(600_000)),
            active_today,
            active_month,
        },
        rooms: services.rooms.rooms_with_events_after(0)?.len(),
        media_bytes,
        messages_per_hour: services
            .analytics
            .messages_per_hour(24)
            .into_iter()
            .map(|(hour_ts, messages)| HourCount { hour_ts, messages })
            .collect(),
        federation: FederationHealth {
            destinations: destinations.len(),
            failing: failing.len(),
            failing_destinations: failing,
        },
        queues: Queues {
            federation: destinations.iter().map(|d| d.queued).sum(),
            push: metrics.push_queue.get(),
        },
        requests: Requests {
            total,
            server_errors: failed,
            error_rate: if total == 0 { 0.0 } else { failed as f64 / total as f64 },
        },
        calls: Calls {
            group_calls_now: services.call_history.running()?,
            turn_allocations: metrics.turn.allocations.get(),
            sfu_calls_now: metrics.sfu.calls.get(),
            sfu_participants_now: metrics.sfu.participants.get(),
            delayed_events_waiting: services.delayed_events.waiting(),
        },
    })
}
