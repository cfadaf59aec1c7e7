//! Relay sockets: bound in the configured port range and wrapped so that the relay path
//! itself refuses denied peers (should anything get past the gate), counts what it
//! relays and holds each user to their bandwidth.

use std::any::Any;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ::turn::relay::RelayAddressGenerator;
use async_trait::async_trait;
use tokio::net::UdpSocket;
use webrtc_util::Conn;

use super::bandwidth::SharedBucket;
use super::ledger::lock;
use super::{RefusalReason, Shared, TurnSettings};

/// Random ports tried before the range counts as full; enough to find one of a few free
/// ports in a small range with near certainty.
const BIND_ATTEMPTS: usize = 64;

/// Permissions mirrored beyond this many are swept of expired ones.
const PERMISSION_SWEEP_AT: usize = 64;

/// What a relay socket learns about its allocation once the gate has seen the crate
/// grant it, and then the permissions the crate grants on it.
#[derive(Default)]
pub(crate) struct RelayLink {
    state: Mutex<LinkState>,
}

#[derive(Default)]
struct LinkState {
    bucket: Option<SharedBucket>,
    /// Mirrors the crate's permissions, so that datagrams the crate would discard
    /// anyway neither count as relayed nor use up the user's bandwidth: otherwise anyone
    /// who learnt a relay address could spend its owner's allowance.
    permissions: HashMap<IpAddr, Instant>,
}

impl RelayLink {
    pub(crate) fn attach(&self, bucket: Option<SharedBucket>) {
        lock(&self.state).bucket = bucket;
    }

    pub(crate) fn permit(&self, peers: &[IpAddr], until: Instant) {
        let mut state = lock(&self.state);
        if state.permissions.len() >= PERMISSION_SWEEP_AT {
            let now = Instant::now();
            state.permissions.retain(|_, expiry| *expiry > now);
        }
        for ip in peers {
            state.permissions.insert(*ip, until);
        }
    }

    fn permits(&self, ip: IpAddr) -> bool {
        let mut state = lock(&self.state);
        match state.permissions.get(&ip) {
            Some(expiry) if *expiry > Instant::now() => true,
            Some(_) => {
                state.permissions.remove(&ip);
                false
            }
            None => false,
        }
    }

    fn charge(&self, bytes: usize) -> bool {
        let bucket = lock(&self.state).bucket.clone();
        bucket.is_none_or(|bucket| bucket.take(bytes))
    }
}

pub(crate) struct RelayGenerator {
    shared: Arc<Shared>,
    bind_ip: IpAddr,
    relay_ip: IpAddr,
    min_port: u16,
    max_port: u16,
}

impl RelayGenerator {
    pub(crate) fn new(shared: Arc<Shared>, settings: &TurnSettings) -> Self {
        RelayGenerator {
            shared,
            bind_ip: settings.relay_bind_ip,
            relay_ip: settings.relay_ip,
            min_port: settings.relay_min_port,
            max_port: settings.relay_max_port,
        }
    }

    async fn bind_in_range(&self) -> io::Result<UdpSocket> {
        let mut last_err = None;
        for _ in 0..BIND_ATTEMPTS {
            let port = rand::random_range(self.min_port..=self.max_port);
            match UdpSocket::bind((self.bind_ip, port)).await {
                Ok(socket) => return Ok(socket),
                Err(err) => last_err = Some(err),
            }
        }
        let err = last_err.unwrap_or_else(|| io::Error::other("no relay port tried"));
        tracing::warn!(
            error = %err,
            range = %format_args!("{}-{}", self.min_port, self.max_port),
            "no free TURN relay port"
        );
        Err(err)
    }
}

#[async_trait]
impl RelayAddressGenerator for RelayGenerator {
    fn validate(&self) -> Result<(), ::turn::Error> {
        // `TurnSettings::validate` has checked the range before anything was bound.
        Ok(())
    }

    async fn allocate_conn(
        &self,
        use_ipv4: bool,
        requested_port: u16,
    ) -> Result<(Arc<dyn Conn + Send + Sync>, SocketAddr), ::turn::Error> {
        if use_ipv4 != self.bind_ip.is_ipv4() {
            return Err(::turn::Error::Other(
                "requested address family is not relayed here".into(),
            ));
        }
        // A requested port comes from an earlier EVEN-PORT reservation, which this
        // generator picked from the range itself.
        let socket = if requested_port != 0 {
            UdpSocket::bind((self.bind_ip, requested_port)).await?
        } else {
            self.bind_in_range().await?
        };
        let announced = SocketAddr::new(self.relay_ip, socket.local_addr()?.port());
        let link = Arc::new(RelayLink::default());
        self.shared.ledger.register_relay(announced, &link);
        let conn = RelayConn { socket, announced, link, shared: Arc::clone(&self.shared) };
        Ok((Arc::new(conn), announced))
    }
}

struct RelayConn {
    socket: UdpSocket,
    announced: SocketAddr,
    link: Arc<RelayLink>,
    shared: Arc<Shared>,
}

#[async_trait]
impl Conn for RelayConn {
    async fn connect(&self, _addr: SocketAddr) -> webrtc_util::Result<()> {
        Err(crate::turn::messages::unsupported("not used on a relay socket"))
    }

    async fn recv(&self, _buf: &mut [u8]) -> webrtc_util::Result<usize> {
        Err(crate::turn::messages::unsupported("not used on a relay socket"))
    }

    async fn recv_from(&self, buf: &mut [u8]) -> webrtc_util::Result<(usize, SocketAddr)> {
        loop {
            let (n, from) = self.socket.recv_from(buf).await?;
            if !self.link.permits(from.ip()) {
                continue;
            }
            if self.shared.policy.is_denied(from.ip()) {
                self.shared.observer.refused(RefusalReason::Peer);
                continue;
            }
            if !self.link.charge(n) {
                self.shared.observer.refused(RefusalReason::Bandwidth);
                continue;
            }
            self.shared.observer.relayed(n as u64);
            return Ok((n, from));
        }
    }

    async fn send(&self, _buf: &[u8]) -> webrtc_util::Result<usize> {
        Err(crate::turn::messages::unsupported("not used on a relay socket"))
    }

    async fn send_to(&self, buf: &[u8], target: SocketAddr) -> webrtc_util::Result<usize> {
        // Dropped datagrams report as sent, as a lossy network would; an error would
        // only make the crate log one per datagram.
        if self.shared.policy.is_denied(target.ip()) {
            self.shared.observer.refused(RefusalReason::Peer);
            return Ok(buf.len());
        }
        if !self.link.charge(buf.len()) {
            self.shared.observer.refused(RefusalReason::Bandwidth);
            return Ok(buf.len());
        }
        let n = self.socket.send_to(buf, target).await?;
        self.shared.observer.relayed(n as u64);
        Ok(n)
    }

    fn local_addr(&self) -> webrtc_util::Result<SocketAddr> {
        Ok(self.socket.local_addr()?)
    }

    fn remote_addr(&self) -> Option<SocketAddr> {
        None
    }

    async fn close(&self) -> webrtc_util::Result<()> {
        // The socket itself goes when the crate drops the allocation; making reads fail
        // now would have the crate's relay task remove the allocation's map entry,
        // which by then may belong to a new allocation on the same 5-tuple.
        self.shared.ledger.unregister_relay(self.announced, &self.link);
        Ok(())
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync) {
        self
    }
}

impl Drop for RelayConn {
    fn drop(&mut self) {
        self.shared.ledger.unregister_relay(self.announced, &self.link);
    }
}
