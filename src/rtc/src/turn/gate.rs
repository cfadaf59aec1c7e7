//! The gate: a wrapper around a listener socket that the crate reads requests from and
//! writes responses to, so everything between clients and the crate passes through it.
//!
//! Inbound it answers, in the crate's place, what the crate would let through:
//! CreatePermission and ChannelBind for denied peers (403) and Allocate beyond a user's
//! quota (486); Send indications to denied peers are dropped. It only speaks for the
//! crate once the request's integrity has checked out with the user's key; anything
//! else goes on to the crate, which challenges it.
//!
//! Outbound it matches responses to the requests it noted by transaction id: a
//! successful Allocate opens an allocation in the ledger, a 400 the crate gives a
//! request whose credentials failed becomes the 401 RFC 5389 §10.2.2 asks for, and the
//! nonce and permissions of accepted requests are remembered.

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ::turn::allocation::five_tuple::FiveTuple;
use ::turn::proto::PROTO_UDP;
use ::turn::proto::relayaddr::RelayedAddress;
use async_trait::async_trait;
use stun::attributes::{ATTR_FINGERPRINT, ATTR_MESSAGE_INTEGRITY, ATTR_NONCE, ATTR_REALM};
use stun::message::{
    CLASS_ERROR_RESPONSE, CLASS_INDICATION, CLASS_REQUEST, CLASS_SUCCESS_RESPONSE, Getter,
    METHOD_ALLOCATE, METHOD_CHANNEL_BIND, METHOD_CREATE_PERMISSION, METHOD_REFRESH, METHOD_SEND,
    Message, MessageType,
};
use stun::textattrs::TextAttribute;
use tokio::sync::mpsc;
use webrtc_util::Conn;

use super::auth::parse_username;
use super::ledger::{Allocation, ListenerId, lock};
use super::messages::{
    Credentials, Peek, credentials, decode, error_code, error_response, integrity_holds, peek,
    peer_addresses, refresh_to_zero, text,
};
use super::{RefusalReason, Shared};

/// A request the crate has not answered by then never will be (it drops some requests
/// silently, e.g. a CreatePermission without an allocation).
const TRACK_FOR: Duration = Duration::from_secs(30);

/// Authenticated requests in flight; only credential holders can add to these.
const MAX_TRACKED: usize = 4096;

/// Requests whose credentials failed, which anyone can send, so kept apart and fewer;
/// past this they simply keep the crate's 400.
const MAX_FAILED: usize = 1024;

/// Below this many, expired entries are left for later.
const SWEEP_AT: usize = 64;

/// How long a permission lasts without refresh (RFC 5766 §8; the crate's value too).
const PERMISSION_LIFETIME: Duration = Duration::from_secs(300);

type TxId = [u8; 12];

enum Kind {
    AuthFailed {
        nonce: String,
        fingerprint: bool,
    },
    Allocate(Allocation),
    Accepted {
        nonce: String,
        peers: Vec<IpAddr>,
    },
    /// The Refresh the gate sent on behalf of a TCP client that went away.
    Ending {
        retried: bool,
    },
}

struct Tracked {
    client: SocketAddr,
    at: Instant,
    kind: Kind,
}

#[derive(Default)]
struct Requests {
    verified: HashMap<TxId, Tracked>,
    failed: HashMap<TxId, Tracked>,
}

enum Verdict {
    Pass,
    Drop,
}

enum Outgoing {
    Forward,
    Swallow,
    Replace(Vec<u8>),
}

pub(crate) struct Gate {
    inner: Arc<dyn Conn + Send + Sync>,
    listener: ListenerId,
    local: SocketAddr,
    shared: Arc<Shared>,
    requests: Mutex<Requests>,
    /// Requests the gate makes itself, handed to the crate as if the client sent them.
    injected: Mutex<VecDeque<(Vec<u8>, SocketAddr)>>,
    /// Clients of the TCP listener whose connection ended.
    ended: Option<tokio::sync::Mutex<mpsc::Receiver<SocketAddr>>>,
}

impl Gate {
    pub(crate) fn new(
        inner: Arc<dyn Conn + Send + Sync>,
        listener: ListenerId,
        shared: Arc<Shared>,
        ended: Option<mpsc::Receiver<SocketAddr>>,
    ) -> io::Result<Self> {
        let local = inner.local_addr().map_err(io::Error::other)?;
        Ok(Gate {
            inner,
            listener,
            local,
            shared,
            requests: Mutex::new(Requests::default()),
            injected: Mutex::new(VecDeque::new()),
            ended: ended.map(tokio::sync::Mutex::new),
        })
    }

    /// The 5-tuple the crate files a client's allocation under: it puts its own
    /// listener's local address and UDP in every one, TCP included.
    fn five_tuple(&self, client: SocketAddr) -> FiveTuple {
        FiveTuple { protocol: PROTO_UDP, src_addr: client, dst_addr: self.local }
    }

    fn any_denied(&self, peers: &[SocketAddr]) -> bool {
        peers.iter().any(|p| self.shared.policy.is_denied(p.ip()))
    }

    async fn inspect(&self, data: &[u8], from: SocketAddr) -> Verdict {
        let Peek::Stun(typ) = peek(data) else {
            return Verdict::Pass;
        };
        if typ.class == CLASS_INDICATION {
            if typ.method == METHOD_SEND
                && let Some(m) = decode(data)
            {
                let peers = peer_addresses(&m);
                if self.any_denied(&peers) {
                    tracing::debug!(client = %from, ?peers, "TURN send indication to a denied peer dropped");
                    self.shared.observer.refused(RefusalReason::Peer);
                    return Verdict::Drop;
                }
            }
            return Verdict::Pass;
        }
        let watched =
            [METHOD_ALLOCATE, METHOD_REFRESH, METHOD_CREATE_PERMISSION, METHOD_CHANNEL_BIND];
        if typ.class != CLASS_REQUEST || !watched.contains(&typ.method) {
            return Verdict::Pass;
        }
        let Some(m) = decode(data) else {
            return Verdict::Pass;
        };
        // Without integrity the crate answers 401 with a nonce, and without the other
        // credential attributes 400; neither needs the gate.
        if !m.contains(ATTR_MESSAGE_INTEGRITY) {
            return Verdict::Pass;
        }
        let Some(creds) = credentials(&m) else {
            return Verdict::Pass;
        };
        let key = match self.shared.auth.key(&creds.username, &creds.realm) {
            Ok(key) if integrity_holds(&m, &key) => key,
            _ => {
                let fingerprint = m.contains(ATTR_FINGERPRINT);
                self.track(&m, from, Kind::AuthFailed { nonce: creds.nonce, fingerprint });
                return Verdict::Pass;
            }
        };

        if typ.method == METHOD_ALLOCATE {
            return self.admit_allocate(&m, from, creds, key).await;
        }
        let peers = peer_addresses(&m);
        if self.any_denied(&peers) {
            tracing::debug!(
                client = %from,
                username = %creds.username,
                ?peers,
                method = %typ.method,
                "TURN peer refused by policy"
            );
            self.shared.observer.refused(RefusalReason::Peer);
            let reply = error_response(
                &m,
                403,
                "Forbidden",
                Vec::new(),
                Some(&key),
                m.contains(ATTR_FINGERPRINT),
            );
            self.reply(reply, from).await;
            return Verdict::Drop;
        }
        self.track(
            &m,
            from,
            Kind::Accepted {
                nonce: creds.nonce,
                peers: peers.iter().map(SocketAddr::ip).collect(),
            },
        );
        Verdict::Pass
    }

    async fn admit_allocate(
        &self,
        m: &Message,
        from: SocketAddr,
        creds: Credentials,
        key: Vec<u8>,
    ) -> Verdict {
        let Some((_, user)) = parse_username(&creds.username) else {
            return Verdict::Pass;
        };
        // A retransmission already holds its slot.
        if lock(&self.requests).verified.contains_key(&m.transaction_id.0) {
            return Verdict::Pass;
        }
        if !self.shared.ledger.reserve(user) {
            tracing::debug!(%user, client = %from, "TURN allocation quota reached");
            self.shared.observer.refused(RefusalReason::Quota);
            let reply = error_response(
                m,
                486,
                "Allocation Quota Reached",
                Vec::new(),
                Some(&key),
                m.contains(ATTR_FINGERPRINT),
            );
            self.reply(reply, from).await;
            return Verdict::Drop;
        }
        let allocation = Allocation::new(user.to_owned(), creds.username.clone(), key, creds.nonce);
        if !self.track(m, from, Kind::Allocate(allocation)) {
            // Untracked, its success would never be counted, so nor is its slot.
            self.shared.ledger.release(user);
        }
        Verdict::Pass
    }

    async fn reply(&self, reply: Option<Message>, to: SocketAddr) {
        let Some(reply) = reply else {
            return;
        };
        if let Err(err) = self.inner.send_to(&reply.raw, to).await {
            tracing::debug!(client = %to, error = %err, "TURN reply not sent");
        }
    }

    /// Notes a request until its response goes out; false if there is no room.
    fn track(&self, m: &Message, client: SocketAddr, kind: Kind) -> bool {
        let failed = matches!(kind, Kind::AuthFailed { .. });
        let mut expired_reservations = Vec::new();
        let tracked = {
            let mut requests = lock(&self.requests);
            let (map, cap) = if failed {
                (&mut requests.failed, MAX_FAILED)
            } else {
                (&mut requests.verified, MAX_TRACKED)
            };
            if map.len() >= SWEEP_AT {
                let now = Instant::now();
                map.retain(|_, t| {
                    let keep = now.saturating_duration_since(t.at) < TRACK_FOR;
                    if !keep && let Kind::Allocate(a) = &t.kind {
                        expired_reservations.push(a.user.clone());
                    }
                    keep
                });
            }
            if map.len() < cap {
                map.insert(m.transaction_id.0, Tracked { client, at: Instant::now(), kind });
                true
            } else {
                false
            }
        };
        for user in expired_reservations {
            self.shared.ledger.release(&user);
        }
        if !tracked {
            tracing::debug!(client = %client, "too many TURN requests in flight to track one more");
        }
        tracked
    }

    fn take(&self, tx: &TxId, client: SocketAddr) -> Option<Tracked> {
        let mut guard = lock(&self.requests);
        let requests = &mut *guard;
        for map in [&mut requests.verified, &mut requests.failed] {
            if map.get(tx).is_some_and(|t| t.client == client) {
                return map.remove(tx);
            }
        }
        None
    }

    fn outgoing(&self, buf: &[u8], client: SocketAddr, typ: MessageType) -> Outgoing {
        let Some(m) = decode(buf) else {
            return Outgoing::Forward;
        };
        let Some(tracked) = self.take(&m.transaction_id.0, client) else {
            return Outgoing::Forward;
        };
        let success = typ.class == CLASS_SUCCESS_RESPONSE;
        match tracked.kind {
            Kind::AuthFailed { nonce, fingerprint } => {
                // The crate answers failed credentials with 400; 401 with a fresh
                // challenge is what clients expect. Other answers (438 for a stale
                // nonce) stand.
                if success || error_code(&m) != Some(400) {
                    return Outgoing::Forward;
                }
                tracing::debug!(%client, "TURN request with bad credentials refused");
                self.shared.observer.refused(RefusalReason::Auth);
                let challenge = error_response(
                    &m,
                    401,
                    "Unauthorized",
                    vec![
                        Box::new(TextAttribute::new(ATTR_REALM, self.shared.realm.clone())),
                        Box::new(TextAttribute::new(ATTR_NONCE, nonce)),
                    ],
                    None,
                    fingerprint,
                );
                match challenge {
                    Some(challenge) => Outgoing::Replace(challenge.raw),
                    None => Outgoing::Forward,
                }
            }
            Kind::Allocate(allocation) => {
                if success {
                    let mut relayed = RelayedAddress::default();
                    let relay = relayed
                        .get_from(&m)
                        .ok()
                        .map(|()| SocketAddr::new(relayed.ip, relayed.port));
                    self.shared.ledger.opened(
                        self.listener,
                        self.five_tuple(client),
                        allocation,
                        relay,
                    );
                } else {
                    self.shared.ledger.release(&allocation.user);
                }
                Outgoing::Forward
            }
            Kind::Accepted { nonce, peers } => {
                if success {
                    self.shared.ledger.accepted(
                        self.listener,
                        &self.five_tuple(client),
                        nonce,
                        &peers,
                        Instant::now() + PERMISSION_LIFETIME,
                    );
                }
                Outgoing::Forward
            }
            Kind::Ending { retried } => {
                if typ.class == CLASS_ERROR_RESPONSE {
                    let code = error_code(&m);
                    match text(&m, ATTR_NONCE) {
                        Some(nonce) if code == Some(438) && !retried => {
                            self.end_allocation(client, Some(nonce), true);
                        }
                        _ => tracing::debug!(
                            %client,
                            ?code,
                            "TURN allocation of a closed TCP connection left to expire"
                        ),
                    }
                }
                // The client is gone; its answer has nowhere to go.
                Outgoing::Swallow
            }
        }
    }

    /// Has the crate delete the allocation of a TCP client that disconnected. The crate
    /// can only delete every allocation of a username at once, and one user's
    /// credentials may serve several, so the gate sends the Refresh with LIFETIME 0 the
    /// client would have, signed with the key and the last nonce the client used.
    fn end_allocation(&self, client: SocketAddr, nonce: Option<String>, retried: bool) {
        let five_tuple = self.five_tuple(client);
        let Some(allocation) = self.shared.ledger.allocation(self.listener, &five_tuple) else {
            return;
        };
        let nonce = nonce.unwrap_or(allocation.nonce);
        let Some(refresh) =
            refresh_to_zero(&allocation.username, &self.shared.realm, &nonce, &allocation.key)
        else {
            return;
        };
        if self.track(&refresh, client, Kind::Ending { retried }) {
            tracing::debug!(%client, user = %allocation.user, "ending the TURN allocation of a closed TCP connection");
            lock(&self.injected).push_back((refresh.raw, client));
        }
    }
}

fn not_applicable() -> webrtc_util::Error {
    io::Error::new(io::ErrorKind::Unsupported, "not used on a TURN listener").into()
}

#[async_trait]
impl Conn for Gate {
    async fn connect(&self, _addr: SocketAddr) -> webrtc_util::Result<()> {
        Err(not_applicable())
    }

    async fn recv(&self, _buf: &mut [u8]) -> webrtc_util::Result<usize> {
        Err(not_applicable())
    }

    async fn recv_from(&self, buf: &mut [u8]) -> webrtc_util::Result<(usize, SocketAddr)> {
        loop {
            let injected = lock(&self.injected).pop_front();
            if let Some((message, client)) = injected {
                if let Some(slot) = buf.get_mut(..message.len()) {
                    slot.copy_from_slice(&message);
                    return Ok((message.len(), client));
                }
                continue;
            }
            let (n, from) = match &self.ended {
                Some(ended) => tokio::select! {
                    received = self.inner.recv_from(buf) => received?,
                    Some(client) = async { ended.lock().await.recv().await } => {
                        self.end_allocation(client, None, false);
                        continue;
                    }
                },
                None => self.inner.recv_from(buf).await?,
            };
            let Some(data) = buf.get(..n) else {
                continue;
            };
            match self.inspect(data, from).await {
                Verdict::Pass => return Ok((n, from)),
                Verdict::Drop => continue,
            }
        }
    }

    async fn send(&self, _buf: &[u8]) -> webrtc_util::Result<usize> {
        Err(not_applicable())
    }

    async fn send_to(&self, buf: &[u8], target: SocketAddr) -> webrtc_util::Result<usize> {
        if let Peek::Stun(typ) = peek(buf)
            && (typ.class == CLASS_SUCCESS_RESPONSE || typ.class == CLASS_ERROR_RESPONSE)
        {
            match self.outgoing(buf, target, typ) {
                Outgoing::Forward => {}
                Outgoing::Swallow => return Ok(buf.len()),
                Outgoing::Replace(raw) => {
                    self.inner.send_to(&raw, target).await?;
                    return Ok(buf.len());
                }
            }
        }
        self.inner.send_to(buf, target).await
    }

    fn local_addr(&self) -> webrtc_util::Result<SocketAddr> {
        Ok(self.local)
    }

    fn remote_addr(&self) -> Option<SocketAddr> {
        None
    }

    async fn close(&self) -> webrtc_util::Result<()> {
        // Every allocation the crate closes closes its listener socket too, which would
        // end the listener for everyone; the listener ends with the server instead.
        Ok(())
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync) {
        self
    }
}
