//! What one client, or all of them, may hold of the server's connections: a cap on
//! connections open at once in total and per client address (taken when a connection
//! is accepted, given back when it ends), the open-file limit raised to what the system
//! allows, and the pace a request body must keep.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use trellis_core::{config::HttpConfig, metrics::ConnectionMetrics};

/// Files kept aside for the storage engine, the TURN relays, logs and the like when the
/// connection cap is derived from the open-file limit.
const FILES_KEPT_ASIDE: u64 = 1024;

/// Raises the soft open-file limit to the hard one, logged: the soft default (often
/// 1,024) is far below what a server holding long-polls needs. Answers the soft limit
/// in force afterwards.
pub fn raise_open_files() -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read or write the struct passed by pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        let before = limit.rlim_cur;
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
        tracing::info!(before, now = limit.rlim_cur, "open-file limit");
        limit.rlim_cur
    }
}

/// An address or CIDR network; config validation has already refused anything else.
pub fn parse_net(text: &str) -> Option<ipnet::IpNet> {
    text.parse::<ipnet::IpNet>()
        .ok()
        .or_else(|| text.parse::<IpAddr>().ok().map(ipnet::IpNet::from))
}

/// The caps of one listener's connections.
pub struct ConnectionLimits {
    pub pace: BodyPace,
    max_total: usize,
    /// From this many open connections on, anonymous requests are shed.
    shed_from: usize,
    max_per_ip: usize,
    exempt: Vec<ipnet::IpNet>,
    open: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    metrics: ConnectionMetrics,
}

/// A connection's place under the caps, given back when dropped.
pub struct Admitted {
    limits: Arc<ConnectionLimits>,
    ip: IpAddr,
}

impl Admitted {
    pub fn limits(&self) -> &ConnectionLimits {
        &self.limits
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let limits = &self.limits;
        limits.open.fetch_sub(1, Ordering::Relaxed);
        limits.metrics.open.dec();
        let mut per_ip = limits.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

impl ConnectionLimits {
    pub fn new(config: &HttpConfig, open_files: u64, metrics: ConnectionMetrics) -> Arc<Self> {
        let max_total = match config.max_connections {
            0 => usize::try_from(open_files.saturating_sub(FILES_KEPT_ASIDE).max(256))
                .unwrap_or(usize::MAX),
            n => n,
        };
        let shed_from = if config.shed_anonymous_percent >= 100 {
            usize::MAX
        } else {
            (max_total.saturating_mul(usize::from(config.shed_anonymous_percent)) / 100).max(1)
        };
        tracing::info!(
            max_total,
            per_ip = config.max_connections_per_ip,
            shed_anonymous_from = shed_from,
            "connection caps"
        );
        Arc::new(Self {
            pace: BodyPace::from_config(config),
            max_total,
            shed_from,
            max_per_ip: config.max_connections_per_ip,
            exempt: config.connection_limit_exempt.iter().filter_map(|n| parse_net(n)).collect(),
            open: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
            metrics,
        })
    }

    pub fn metrics(&self) -> &ConnectionMetrics {
        &self.metrics
    }

    /// Whether so many connections are open that anonymous requests are turned away.
    pub fn shedding_anonymous(&self) -> bool {
        self.open.load(Ordering::Relaxed) >= self.shed_from
    }

    /// A place for a connection from `ip`, or `None` (counted) when a cap is reached:
    /// the caller closes the connection at once, so that its file is free again.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Admitted> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        let refuse = |reason: &str| {
            self.metrics.refused(reason);
            None
        };
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if self.open.load(Ordering::Relaxed) >= self.max_total {
            return refuse("total");
        }
        let held = per_ip.entry(ip).or_insert(0);
        if *held >= self.max_per_ip && !self.exempt.iter().any(|net| net.contains(&ip)) {
            return refuse("per_ip");
        }
        *held += 1;
        self.open.fetch_add(1, Ordering::Relaxed);
        self.metrics.open.inc();
        Some(Admitted { limits: self.clone(), ip })
    }
}

/// The pace a request body must keep (see `http.body_read_window_seconds`).
#[derive(Clone, Copy)]
pub struct BodyPace {
    pub window: Duration,
    /// Bytes each window must bring.
    pub min_bytes: u64,
}

impl BodyPace {
    pub fn from_config(config: &HttpConfig) -> Self {
        let window = Duration::from_secs(config.body_read_window_seconds.max(1));
        let min_bytes = config.body_min_bytes_per_second.saturating_mul(window.as_secs());
        Self { window, min_bytes }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anonymous_requests_are_shed_from_the_configured_share() {
        let metrics = trellis_core::metrics::Metrics::new();
        let config =
            HttpConfig { max_connections: 10, shed_anonymous_percent: 50, ..Default::default() };
        let limits = ConnectionLimits::new(&config, 0, metrics.connections.clone());
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let held: Vec<_> = (0..4).map(|_| limits.admit(ip).unwrap()).collect();
        assert!(!limits.shedding_anonymous());
        let fifth = limits.admit(ip).unwrap();
        assert!(limits.shedding_anonymous());
        drop(fifth);
        assert!(!limits.shedding_anonymous());
        drop(held);
        let never = HttpConfig { shed_anonymous_percent: 100, ..config };
        let limits = ConnectionLimits::new(&never, 0, metrics.connections.clone());
        let _all: Vec<_> = (0..10).map(|_| limits.admit(ip).unwrap()).collect();
        assert!(!limits.shedding_anonymous());
    }

    #[test]
    fn connections_are_capped_per_address_and_in_total_and_given_back() {
        let config = HttpConfig {
            max_connections: 6,
            max_connections_per_ip: 2,
            connection_limit_exempt: vec!["127.0.0.0/8".into()],
            ..Default::default()
        };
        let metrics = trellis_core::metrics::Metrics::new();
        let limits = ConnectionLimits::new(&config, 0, metrics.connections.clone());
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        let first = limits.admit(a).unwrap();
        let _second = limits.admit(mapped).unwrap();
        assert!(limits.admit(a).is_none(), "a third from one address");
        let _third = limits.admit(b).unwrap();
        // A reverse proxy's address is not held to the per-address cap.
        let proxy: IpAddr = "127.0.0.1".parse().unwrap();
        let _proxied: Vec<_> = (0..3).map(|_| limits.admit(proxy).unwrap()).collect();
        assert!(limits.admit(b).is_none(), "over the total");
        drop(first);
        assert!(limits.admit(b).is_some(), "a place freed is given again");
        let text = metrics.render();
        assert!(text.contains("trellis_connections_refused_total{reason=\"per_ip\"} 1"), "{text}");
        assert!(text.contains("trellis_connections_refused_total{reason=\"total\"} 1"), "{text}");
    }
}
