//! TURN/STUN server (RFC 5766/8656) on top of the webrtc-rs `turn` crate.
//!
//! The crate speaks the protocol: allocations, their lifetimes and refreshes, nonces,
//! permissions and channels. It has no notion of who may be reached through it, how
//! much one user may take, or TCP, so those live here, wrapped around it:
//!
//! - `gate` wraps each listener socket the crate reads from and writes to, so every
//!   message in both directions passes it: it challenges clients itself, with one
//!   nonce shared by all, so that only signed requests reach the crate; it refuses
//!   denied peers and over-quota allocations, keeps the per-user ledger current and
//!   ends the allocations of TCP connections that went away.
//! - `relay` makes the relay sockets, which enforce the peer policy again, count the
//!   relayed bytes and apply each user's bandwidth.
//! - `tcp` presents a TCP listener to the crate as if it were one datagram socket.
//! - `auth` checks TURN REST API credentials; `peers` is the peer address policy;
//!   `ledger` tracks live allocations per user; `bandwidth` is the token bucket;
//!   `messages` holds the STUN plumbing the others share.

mod auth;
mod bandwidth;
mod gate;
mod ledger;
mod messages;
mod peers;
mod relay;
mod tcp;

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ::turn::server::Server;
use ::turn::server::config::{ConnConfig, ServerConfig};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use webrtc_util::Conn;

pub use auth::rest_credentials;

use auth::RestAuth;
use gate::Gate;
use ledger::{Ledger, ListenerId};
use peers::PeerPolicy;
use relay::RelayGenerator;
use tcp::TcpConn;

/// Room for allocation-closed notices between the crate and the ledger; the crate waits
/// when it is full, so it only needs to absorb a burst such as a shutdown.
const CLOSE_QUEUE: usize = 1024;

/// How the TURN server listens, relays and authenticates.
#[derive(Clone)]
pub struct TurnSettings {
    /// UDP listener; port 0 picks an ephemeral port (see [`TurnServer::udp_addr`]).
    pub listen_udp: SocketAddr,
    /// TURN over TCP (RFC 5766 §2.1 framing, not RFC 6062); `None` turns it off.
    pub listen_tcp: Option<SocketAddr>,
    /// The address put in XOR-RELAYED-ADDRESS, i.e. what peers send to.
    pub relay_ip: IpAddr,
    /// The address relay sockets bind to (differs from `relay_ip` behind 1:1 NAT).
    pub relay_bind_ip: IpAddr,
    pub relay_min_port: u16,
    pub relay_max_port: u16,
    pub realm: String,
    /// The TURN REST API secret shared with whoever hands out credentials.
    pub shared_secret: String,
    /// Live allocations one user may hold; 0 = unlimited.
    pub max_allocations_per_user: usize,
    /// Relayed bytes per second per user over both directions, as a token bucket;
    /// datagrams beyond it are dropped. 0 = unlimited.
    pub user_bandwidth_bytes_per_sec: u64,
    /// Peers that are always allowed, even in ranges the policy otherwise refuses.
    pub allowed_peers: Vec<ipnet::IpNet>,
    /// Refuse loopback, private, link-local, CGNAT, ULA, multicast and other
    /// non-public peers, and the relay address itself.
    pub deny_private_peers: bool,
}

impl fmt::Debug for TurnSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TurnSettings")
            .field("listen_udp", &self.listen_udp)
            .field("listen_tcp", &self.listen_tcp)
            .field("relay_ip", &self.relay_ip)
            .field("relay_bind_ip", &self.relay_bind_ip)
            .field("relay_min_port", &self.relay_min_port)
            .field("relay_max_port", &self.relay_max_port)
            .field("realm", &self.realm)
            .field("shared_secret", &"<redacted>")
            .field("max_allocations_per_user", &self.max_allocations_per_user)
            .field("user_bandwidth_bytes_per_sec", &self.user_bandwidth_bytes_per_sec)
            .field("allowed_peers", &self.allowed_peers)
            .field("deny_private_peers", &self.deny_private_peers)
            .finish()
    }
}

impl TurnSettings {
    fn validate(&self) -> io::Result<()> {
        let invalid = |what: &str| Err(io::Error::new(io::ErrorKind::InvalidInput, what));
        if self.relay_min_port == 0 || self.relay_max_port < self.relay_min_port {
            return invalid("TURN relay ports must satisfy 1 <= min <= max");
        }
        if self.relay_ip.is_ipv4() != self.relay_bind_ip.is_ipv4() {
            return invalid("TURN relay_ip and relay_bind_ip must be of the same address family");
        }
        if self.shared_secret.is_empty() {
            return invalid("TURN shared secret must not be empty");
        }
        if self.realm.is_empty() {
            return invalid("TURN realm must not be empty");
        }
        Ok(())
    }
}

/// Why the server turned something away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefusalReason {
    /// A request with credentials that did not check out (expired, malformed or a wrong
    /// password).
    Auth,
    /// An Allocate from a user already at `max_allocations_per_user`.
    Quota,
    /// A permission, channel or datagram for a peer the policy refuses.
    Peer,
    /// A datagram dropped because its user's bandwidth was used up.
    Bandwidth,
}

/// Metrics hooks. Called on the relay path, so implementations must be cheap and must
/// not block.
pub trait TurnObserver: Send + Sync {
    fn allocation_opened(&self, user: &str);
    fn allocation_closed(&self, user: &str);
    /// Every datagram relayed, in either direction.
    fn relayed(&self, bytes: u64);
    fn refused(&self, reason: RefusalReason);
}

/// What every listener's gate and relay share.
pub(crate) struct Shared {
    pub(crate) realm: String,
    pub(crate) auth: Arc<RestAuth>,
    pub(crate) policy: PeerPolicy,
    pub(crate) ledger: Ledger,
    pub(crate) observer: Arc<dyn TurnObserver>,
}

/// A running TURN server. Dropping it stops it too, though less tidily than
/// [`TurnServer::close`].
pub struct TurnServer {
    // One crate server per listener: the crate tells which allocation closed only by
    // its 5-tuple, and a UDP and a TCP listener on the same address would share those.
    servers: Vec<Server>,
    udp_addr: SocketAddr,
    tcp_addr: Option<SocketAddr>,
    cancel: CancellationToken,
}

impl TurnServer {
    pub async fn start(
        settings: TurnSettings,
        observer: Arc<dyn TurnObserver>,
    ) -> io::Result<TurnServer> {
        settings.validate()?;
        let shared = Arc::new(Shared {
            realm: settings.realm.clone(),
            auth: Arc::new(RestAuth::new(settings.shared_secret.clone(), settings.realm.clone())),
            policy: PeerPolicy::new(
                settings.allowed_peers.clone(),
                settings.deny_private_peers,
                settings.relay_ip,
            ),
            ledger: Ledger::new(
                Arc::clone(&observer),
                settings.max_allocations_per_user,
                settings.user_bandwidth_bytes_per_sec,
            ),
            observer,
        });
        let cancel = CancellationToken::new();
        let mut servers = Vec::new();
        let started = Self::listen(&settings, &shared, &cancel, &mut servers).await;
        let (udp_addr, tcp_addr) = match started {
            Ok(addrs) => addrs,
            Err(err) => {
                cancel.cancel();
                for server in &servers {
                    let _ = server.close().await;
                }
                return Err(err);
            }
        };

        let drain = Arc::clone(&shared);
        tokio::spawn(async move { drain.ledger.follow_closes().await });

        tracing::info!(
            udp = %udp_addr,
            tcp = ?tcp_addr,
            relay_ip = %settings.relay_ip,
            relay_ports = %format_args!("{}-{}", settings.relay_min_port, settings.relay_max_port),
            "TURN server listening"
        );
        Ok(TurnServer { servers, udp_addr, tcp_addr, cancel })
    }

    async fn listen(
        settings: &TurnSettings,
        shared: &Arc<Shared>,
        cancel: &CancellationToken,
        servers: &mut Vec<Server>,
    ) -> io::Result<(SocketAddr, Option<SocketAddr>)> {
        let udp = UdpSocket::bind(settings.listen_udp).await?;
        let udp_addr = udp.local_addr()?;
        servers.push(serve(settings, shared, ListenerId::Udp, Arc::new(udp), None).await?);

        let Some(listen_tcp) = settings.listen_tcp else {
            return Ok((udp_addr, None));
        };
        let listener = TcpListener::bind(listen_tcp).await?;
        let tcp_addr = listener.local_addr()?;
        let (conn, ended) = TcpConn::start(listener, tcp_addr, cancel.child_token());
        servers.push(serve(settings, shared, ListenerId::Tcp, Arc::new(conn), Some(ended)).await?);
        Ok((udp_addr, Some(tcp_addr)))
    }

    /// The bound UDP address, with the port resolved.
    pub fn udp_addr(&self) -> SocketAddr {
        self.udp_addr
    }

    /// The bound TCP address, with the port resolved, if TCP is on.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp_addr
    }

    /// Stops listening and closes every allocation (reported to the observer as the
    /// crate gets round to each).
    pub async fn close(&self) {
        for server in &self.servers {
            if let Err(err) = server.close().await {
                tracing::debug!(error = %err, "TURN listener already closed");
            }
        }
        self.cancel.cancel();
    }
}

impl Drop for TurnServer {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn serve(
    settings: &TurnSettings,
    shared: &Arc<Shared>,
    listener: ListenerId,
    conn: Arc<dyn Conn + Send + Sync>,
    ended: Option<mpsc::Receiver<SocketAddr>>,
) -> io::Result<Server> {
    let (close_tx, close_rx) = mpsc::channel(CLOSE_QUEUE);
    shared.ledger.add_close_source(listener, close_rx);
    let gate = Gate::new(conn, listener, Arc::clone(shared), ended)?;
    let relays = RelayGenerator::new(Arc::clone(shared), settings);
    Server::new(ServerConfig {
        conn_configs: vec![ConnConfig {
            conn: Arc::new(gate),
            relay_addr_generator: Box::new(relays),
        }],
        realm: settings.realm.clone(),
        auth_handler: Arc::clone(&shared.auth) as _,
        // Zero means the crate's default (ten minutes, as RFC 5766 has it).
        channel_bind_timeout: Duration::ZERO,
        alloc_close_notify: Some(close_tx),
    })
    .await
    .map_err(io::Error::other)
}
