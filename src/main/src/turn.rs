//! Starting the built-in TURN server (`trellis-rtc`) from the configuration, its
//! figures into the metrics, and what `/voip/turnServer` tells clients about it.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    sync::Arc,
};

use trellis_core::metrics::TurnMetrics;
use trellis_rtc::turn::{RefusalReason, TurnObserver, TurnServer, TurnSettings};
use trellis_service::{Services, voip::BuiltinTurn};

struct Observer(TurnMetrics);

impl TurnObserver for Observer {
    fn allocation_opened(&self, _user: &str) {
        self.0.allocations.inc();
        self.0.allocations_opened.inc();
    }

    fn allocation_closed(&self, _user: &str) {
        self.0.allocations.dec();
    }

    fn relayed(&self, bytes: u64) {
        self.0.relayed_bytes.inc_by(bytes);
    }

    fn refused(&self, reason: RefusalReason) {
        self.0.refused(match reason {
            RefusalReason::Auth => "auth",
            RefusalReason::Quota => "quota",
            RefusalReason::Peer => "peer",
            RefusalReason::Bandwidth => "bandwidth",
        });
    }
}

/// The address of the interface the default route leaves by: what peers on the same
/// network reach this machine at. (Connecting a UDP socket sends nothing.)
pub(crate) fn default_route_ip() -> IpAddr {
    let probe = || -> std::io::Result<IpAddr> {
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        socket.connect((Ipv4Addr::new(192, 0, 2, 1), 9))?;
        Ok(socket.local_addr()?.ip())
    };
    probe().unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))
}

/// The secret credentials are made with: configured, or derived from the signing key
/// (an Ed25519 signature is deterministic), so it survives restarts and is never stored.
fn shared_secret(services: &Services) -> String {
    let configured = &services.config.turn.shared_secret;
    if !configured.is_empty() {
        return configured.clone();
    }
    services.keys.derived_secret(b"trellis built-in TURN shared secret")
}

/// Starts the TURN server unless it is off or an external one is configured. A TURN
/// server that cannot listen is logged and left out: calls still work where peers reach
/// each other directly.
pub async fn start(services: &Arc<Services>) -> Option<TurnServer> {
    let config = &services.config.turn;
    if !config.enabled || !services.config.voip.turn_uris.is_empty() {
        return None;
    }
    let relay_ip = config.public_ip.parse().unwrap_or_else(|_| default_route_ip());
    let bind_ip = match config.listen_udp.ip() {
        ip if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        ip => ip,
    };
    let settings = TurnSettings {
        listen_udp: config.listen_udp,
        listen_tcp: config.listen_tcp.parse::<SocketAddr>().ok(),
        relay_ip,
        relay_bind_ip: bind_ip,
        relay_min_port: config.relay_min_port,
        relay_max_port: config.relay_max_port,
        realm: services.server_name().to_owned(),
        shared_secret: shared_secret(services),
        max_allocations_per_user: config.max_allocations_per_user,
        user_bandwidth_bytes_per_sec: config.user_bandwidth_kbps.saturating_mul(1000) / 8,
        allowed_peers: config
            .allowed_peer_ips
            .iter()
            .filter_map(|n| crate::limits::parse_net(n))
            .collect(),
        deny_private_peers: config.deny_private_peers,
    };
    let secret = settings.shared_secret.clone();
    let observer = Arc::new(Observer(services.metrics.turn.clone()));
    let server = match TurnServer::start(settings, observer).await {
        Ok(server) => server,
        Err(e) => {
            tracing::error!(error = %e, listen = %config.listen_udp, "the TURN server cannot start; calls get no relay");
            return None;
        }
    };
    let host = if !config.uri_host.is_empty() {
        config.uri_host.clone()
    } else if !config.public_ip.is_empty() {
        config.public_ip.clone()
    } else {
        host_of(services.server_name())
    };
    let host =
        if host.contains(':') && !host.starts_with('[') { format!("[{host}]") } else { host };
    let mut uris = vec![format!("turn:{host}:{}?transport=udp", server.udp_addr().port())];
    if let Some(tcp) = server.tcp_addr() {
        uris.push(format!("turn:{host}:{}?transport=tcp", tcp.port()));
    }
    tracing::info!(udp = %server.udp_addr(), tcp = ?server.tcp_addr(), %relay_ip, "TURN listening");
    let _ = services.builtin_turn.set(BuiltinTurn { uris, shared_secret: secret });
    Some(server)
}

/// The host of a server name (`example.org:8448` -> `example.org`, `[::1]:8448` -> `::1`).
fn host_of(server_name: &str) -> String {
    if let Some(rest) = server_name.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest).to_owned();
    }
    server_name.rsplit_once(':').map_or(server_name, |(host, _)| host).to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_and_networks_are_read() {
        assert_eq!(host_of("example.org:8448"), "example.org");
        assert_eq!(host_of("example.org"), "example.org");
        assert_eq!(host_of("[::1]:8448"), "::1");
        use crate::limits::parse_net;
        assert_eq!(parse_net("10.0.0.0/8").map(|n| n.prefix_len()), Some(8));
        assert_eq!(parse_net("127.0.0.1").map(|n| n.prefix_len()), Some(32));
        assert_eq!(parse_net("nonsense"), None);
    }
}
