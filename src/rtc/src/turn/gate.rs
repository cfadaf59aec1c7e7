//! The gate: a wrapper around a listener socket that the crate reads requests from and
//! writes responses to, so everything between clients and the crate passes through it.
//!
//! Inbound, of the Allocate, Refresh, CreatePermission and ChannelBind requests only
//! those signed with a valid user's key and carrying a current nonce reach the crate.
//! The gate answers the rest itself: 401 with the shared nonce to requests without
//! credentials or with credentials that fail, 438 to those with an old nonce, 400 to
//! those missing credential attributes. Of the signed ones it answers, in the crate's place,
//! CreatePermission and ChannelBind for denied peers (403), requests on an allocation
//! made with other credentials (441), Allocate beyond a user's quota (486) and Allocate
//! it has no room to follow (508). Send indications to denied peers are dropped.
//!
//! The crate makes up a nonce, and keeps it for an hour, for every challenge it sends,
//! so letting it challenge spoofable datagrams would let anyone fill its memory. The gate
//! instead asks the crate for one nonce now and then, with a request of its own from
//! an address no client has, and hands that one out to everyone.
//!
//! Outbound it matches responses to the requests it noted by transaction id: a
//! successful Allocate opens an allocation in the ledger, and the nonce and permissions
//! of accepted requests are remembered.

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
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
    Message, MessageType, Method,
};
use stun::textattrs::TextAttribute;
use tokio::sync::{Notify, mpsc};
use webrtc_util::Conn;

use super::auth::parse_username;
use super::ledger::{Allocation, ListenerId, lock};
use super::messages::{
    Credentials, Peek, credentials, decode, error_code, error_response, integrity_holds,
    nonce_request, peek, peer_addresses, refresh_to_zero, text,
};
use super::{RefusalReason, Shared};

/// A request the crate has not answered by then never will be.
const TRACK_FOR: Duration = Duration::from_secs(30);

/// Requests in flight, all signed by credential holders. The crate answers each before
/// it reads the next, so normally there is hardly ever more than one; the caps only
/// matter for requests it never answers.
const MAX_TRACKED: usize = 4096;
const MAX_TRACKED_PER_IP: usize = 16;
const MAX_TRACKED_PER_USER: usize = 64;

/// Below this many, expired entries are left for later unless a cap is reached.
const SWEEP_AT: usize = 64;

/// How long a permission lasts without refresh (RFC 5766 §8; the crate's value too).
const PERMISSION_LIFETIME: Duration = Duration::from_secs(300);

/// How long the crate honours a nonce after making it up (`NONCE_LIFETIME` in its
/// server/request.rs, which it does not export).
const CRATE_NONCE_LIFETIME: Duration = Duration::from_secs(3600);

/// How often the gate asks the crate for a fresh shared nonce.
const NONCE_ROTATE: Duration = Duration::from_secs(20 * 60);

/// How long after the gate got it a nonce still lets a request through: the newest and
/// the one before it, each with at least twenty minutes of the crate's hour to go, so
/// the crate never finds a nonce the gate let through stale.
const NONCE_ACCEPTED: Duration = Duration::from_secs(40 * 60);

/// A nonce this much older than when the gate got it is stale in the crate too, which
/// made it up a little earlier; presenting it then makes the crate forget it.
const NONCE_RETIRE: Duration = Duration::from_secs(CRATE_NONCE_LIFETIME.as_secs() + 60);

const _: () = assert!(NONCE_ROTATE.as_secs() < NONCE_ACCEPTED.as_secs());
const _: () = assert!(NONCE_ACCEPTED.as_secs() < CRATE_NONCE_LIFETIME.as_secs());

/// How long to wait for the crate to answer a nonce request before asking again.
const NONCE_RETRY: Duration = Duration::from_secs(5);

/// Nonces remembered for retiring. Rotation and retiring keep about four; more only
/// if retiring fails, and those past this are left in the crate's map.
const MAX_ISSUED: usize = 8;

/// The source of the gate's own nonce requests, so the crate's answers to them can be
/// told apart. No datagram or TCP peer comes from port 0 of the unspecified address;
/// anything that claims to is dropped.
const SYNTHETIC: SocketAddr = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0);

type TxId = [u8; 12];

enum Kind {
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
    method: Method,
    user: String,
    /// Counted against the client's and the user's caps; the gate's own requests are not.
    capped: bool,
    at: Instant,
    kind: Kind,
}

enum Tracking {
    Tracked,
    /// The same request again from the same client: the entry already there serves it.
    Retransmission,
    Refused,
}

#[derive(Default)]
struct Requests {
    entries: HashMap<TxId, Tracked>,
    per_ip: HashMap<IpAddr, usize>,
    per_user: HashMap<String, usize>,
}

impl Requests {
    fn at_cap(&self, client: IpAddr, user: &str) -> bool {
        self.entries.len() >= MAX_TRACKED
            || self.per_ip.get(&client).is_some_and(|n| *n >= MAX_TRACKED_PER_IP)
            || self.per_user.get(user).is_some_and(|n| *n >= MAX_TRACKED_PER_USER)
    }

    /// Notes a request, unless its transaction id is taken (an Allocate overwritten
    /// would hold its quota slot for good) or a cap is reached. Returns the users whose
    /// Allocate slots expired entries held.
    fn insert(&mut self, tx: TxId, tracked: Tracked) -> (Tracking, Vec<String>) {
        if let Some(existing) = self.entries.get(&tx) {
            let again = existing.client == tracked.client && existing.method == tracked.method;
            let tracking = if again { Tracking::Retransmission } else { Tracking::Refused };
            return (tracking, Vec::new());
        }
        let ip = tracked.client.ip();
        let mut expired = Vec::new();
        if self.entries.len() >= SWEEP_AT || self.at_cap(ip, &tracked.user) {
            expired = self.sweep();
        }
        let refused = if tracked.capped {
            self.at_cap(ip, &tracked.user)
        } else {
            self.entries.len() >= MAX_TRACKED
        };
        if refused {
            return (Tracking::Refused, expired);
        }
        if tracked.capped {
            *self.per_ip.entry(ip).or_default() += 1;
            *self.per_user.entry(tracked.user.clone()).or_default() += 1;
        }
        self.entries.insert(tx, tracked);
        (Tracking::Tracked, expired)
    }

    fn sweep(&mut self) -> Vec<String> {
        let now = Instant::now();
        let expired: Vec<TxId> = self
            .entries
            .iter()
            .filter(|(_, t)| now.saturating_duration_since(t.at) >= TRACK_FOR)
            .map(|(tx, _)| *tx)
            .collect();
        expired
            .iter()
            .filter_map(|tx| self.remove(tx))
            .filter_map(|t| match t.kind {
                Kind::Allocate(a) => Some(a.user),
                _ => None,
            })
            .collect()
    }

    fn remove(&mut self, tx: &TxId) -> Option<Tracked> {
        let tracked = self.entries.remove(tx)?;
        if tracked.capped {
            let ip = tracked.client.ip();
            if let Some(n) = self.per_ip.get_mut(&ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.per_ip.remove(&ip);
                }
            }
            if let Some(n) = self.per_user.get_mut(&tracked.user) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.per_user.remove(&tracked.user);
                }
            }
        }
        Some(tracked)
    }
}

/// The nonce request awaiting the crate's answer.
struct Asking {
    tx: TxId,
    since: tokio::time::Instant,
    retiring: Option<String>,
}

/// The shared nonces: made up by the crate, handed out by the gate. Timed on tokio's
/// clock, which is the crate's.
struct Nonces {
    /// Oldest first; the newest is the one handed out.
    issued: VecDeque<(String, tokio::time::Instant)>,
    /// The crate's realm, as it puts it in its challenges.
    realm: String,
    asking: Option<Asking>,
    next: tokio::time::Instant,
}

impl Nonces {
    fn new() -> Self {
        Nonces {
            issued: VecDeque::new(),
            realm: String::new(),
            asking: None,
            next: tokio::time::Instant::now(),
        }
    }

    fn due(&self) -> tokio::time::Instant {
        match &self.asking {
            Some(asking) => asking.since + NONCE_RETRY,
            None => self.next,
        }
    }

    /// The nonce and realm to challenge with.
    fn current(&self, now: tokio::time::Instant) -> Option<(String, String)> {
        let (nonce, at) = self.issued.back()?;
        (now.saturating_duration_since(*at) < NONCE_ACCEPTED)
            .then(|| (nonce.clone(), self.realm.clone()))
    }

    fn accepts(&self, nonce: &str, now: tokio::time::Instant) -> bool {
        self.issued
            .iter()
            .any(|(n, at)| n == nonce && now.saturating_duration_since(*at) < NONCE_ACCEPTED)
    }
}

enum Verdict {
    Pass,
    Drop,
}

enum Outgoing {
    Forward,
    Swallow,
}

pub(crate) struct Gate {
    inner: Arc<dyn Conn + Send + Sync>,
    listener: ListenerId,
    local: SocketAddr,
    shared: Arc<Shared>,
    requests: Mutex<Requests>,
    nonces: Mutex<Nonces>,
    /// Requests the gate makes itself, handed to the crate as if the client sent them.
    injected: Mutex<VecDeque<(Vec<u8>, SocketAddr)>>,
    /// Wakes `recv_from` for what was injected while it waited on the socket.
    wake: Notify,
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
            nonces: Mutex::new(Nonces::new()),
            injected: Mutex::new(VecDeque::new()),
            wake: Notify::new(),
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

    fn inject(&self, message: Vec<u8>, client: SocketAddr) {
        lock(&self.injected).push_back((message, client));
        self.wake.notify_one();
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
        // What the gate cannot decode, the crate cannot either; it drops it unanswered.
        let Some(m) = decode(data) else {
            return Verdict::Pass;
        };
        let fingerprint = m.contains(ATTR_FINGERPRINT);
        if !m.contains(ATTR_MESSAGE_INTEGRITY) {
            return self.challenge(&m, from, 401).await;
        }
        let Some(creds) = credentials(&m) else {
            // RFC 5389 §10.2.2. The crate would answer 400 too, but would first look up
            // the nonce, and make up a new one if it did not know it.
            let reply = error_response(&m, 400, "Bad Request", Vec::new(), None, fingerprint);
            self.reply(reply, from).await;
            return Verdict::Drop;
        };
        // Credentials before the nonce, as RFC 5389 §10.2.2 orders them: a client with
        // both wrong learns about the credentials.
        let key = match self.shared.auth.key(&creds.username, &creds.realm) {
            Ok(key) if integrity_holds(&m, &key) => key,
            _ => {
                tracing::debug!(client = %from, username = %creds.username, "TURN request with bad credentials refused");
                self.shared.observer.refused(RefusalReason::Auth);
                return self.challenge(&m, from, 401).await;
            }
        };
        if !lock(&self.nonces).accepts(&creds.nonce, tokio::time::Instant::now()) {
            return self.challenge(&m, from, 438).await;
        }
        // A valid key means a well-formed username.
        let Some((_, user)) = parse_username(&creds.username) else {
            return Verdict::Drop;
        };

        if typ.method == METHOD_ALLOCATE {
            return self.admit_allocate(&m, from, &creds, user, key).await;
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
            let reply = error_response(&m, 403, "Forbidden", Vec::new(), Some(&key), fingerprint);
            self.reply(reply, from).await;
            return Verdict::Drop;
        }
        let Some(allocation) = self.shared.ledger.allocation(self.listener, &self.five_tuple(from))
        else {
            // Without an allocation the crate changes nothing, and answers at most a
            // Refresh to zero; nothing to follow, so nothing for a flood to fill.
            return Verdict::Pass;
        };
        if allocation.username != creds.username {
            // RFC 5766 §4: requests on an allocation must use the credentials that made
            // it; the crate does not check, so one user could otherwise refresh another
            // user's allocation to zero with a spoofed source address.
            tracing::debug!(client = %from, username = %creds.username, "TURN request with another allocation's credentials refused");
            self.shared.observer.refused(RefusalReason::Auth);
            let reply =
                error_response(&m, 441, "Wrong Credentials", Vec::new(), Some(&key), fingerprint);
            self.reply(reply, from).await;
            return Verdict::Drop;
        }
        let kind = Kind::Accepted {
            nonce: creds.nonce.clone(),
            peers: peers.iter().map(SocketAddr::ip).collect(),
        };
        match self.track(&m, from, user, true, kind) {
            Tracking::Tracked | Tracking::Retransmission => Verdict::Pass,
            // Let through unfollowed, a permission would be granted but not mirrored
            // on the relay; the client retransmits.
            Tracking::Refused => Verdict::Drop,
        }
    }

    async fn admit_allocate(
        &self,
        m: &Message,
        from: SocketAddr,
        creds: &Credentials,
        user: &str,
        key: Vec<u8>,
    ) -> Verdict {
        let fingerprint = m.contains(ATTR_FINGERPRINT);
        let insufficient =
            || error_response(m, 508, "Insufficient Capacity", Vec::new(), Some(&key), fingerprint);
        let earlier = lock(&self.requests)
            .entries
            .get(&m.transaction_id.0)
            .map(|t| t.client == from && t.method == METHOD_ALLOCATE);
        match earlier {
            // A retransmission: the first one holds the slot and will be matched to the
            // answer.
            Some(true) => return Verdict::Pass,
            // Another client's transaction id: following both is not possible, and
            // passing this one unfollowed would escape the quota.
            Some(false) => {
                self.reply(insufficient(), from).await;
                return Verdict::Drop;
            }
            None => {}
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
                fingerprint,
            );
            self.reply(reply, from).await;
            return Verdict::Drop;
        }
        let allocation = Allocation::new(
            user.to_owned(),
            creds.username.clone(),
            key.clone(),
            creds.nonce.clone(),
        );
        match self.track(m, from, user, true, Kind::Allocate(allocation)) {
            Tracking::Tracked => Verdict::Pass,
            Tracking::Retransmission => {
                self.shared.ledger.release(user);
                Verdict::Pass
            }
            Tracking::Refused => {
                // Unfollowed, it would escape the quota and the bandwidth limit, and its
                // relay would never learn its permissions.
                self.shared.ledger.release(user);
                self.reply(insufficient(), from).await;
                Verdict::Drop
            }
        }
    }

    /// Answers in the crate's words (401 and 438 as it builds them, plus FINGERPRINT if
    /// the request had one), with the shared nonce rather than a new one.
    async fn challenge(&self, m: &Message, to: SocketAddr, code: u16) -> Verdict {
        let current = lock(&self.nonces).current(tokio::time::Instant::now());
        let Some((nonce, realm)) = current else {
            // The crate is asked for a nonce before any client's message is read, so it
            // has failed to answer; passing the request on would have it make up one
            // for this request alone. Dropped, it is retransmitted.
            tracing::debug!(client = %to, "TURN request dropped: no nonce to challenge it with");
            return Verdict::Drop;
        };
        let reason = if code == 438 { "Stale Nonce" } else { "Unauthorized" };
        let reply = error_response(
            m,
            code,
            reason,
            vec![
                Box::new(TextAttribute::new(ATTR_NONCE, nonce)),
                Box::new(TextAttribute::new(ATTR_REALM, realm)),
            ],
            None,
            m.contains(ATTR_FINGERPRINT),
        );
        self.reply(reply, to).await;
        Verdict::Drop
    }

    async fn reply(&self, reply: Option<Message>, to: SocketAddr) {
        let Some(reply) = reply else {
            return;
        };
        if let Err(err) = self.inner.send_to(&reply.raw, to).await {
            tracing::debug!(client = %to, error = %err, "TURN reply not sent");
        }
    }

    /// Notes a request until its response goes out.
    fn track(
        &self,
        m: &Message,
        client: SocketAddr,
        user: &str,
        capped: bool,
        kind: Kind,
    ) -> Tracking {
        let tracked = Tracked {
            client,
            method: m.typ.method,
            user: user.to_owned(),
            capped,
            at: Instant::now(),
            kind,
        };
        let (tracking, expired) = lock(&self.requests).insert(m.transaction_id.0, tracked);
        for user in expired {
            self.shared.ledger.release(&user);
        }
        if matches!(tracking, Tracking::Refused) {
            tracing::debug!(%client, %user, "TURN request not followed: too many in flight or its id is taken");
        }
        tracking
    }

    fn take(&self, tx: &TxId, client: SocketAddr, method: Method) -> Option<Tracked> {
        let mut requests = lock(&self.requests);
        requests
            .entries
            .get(tx)
            .is_some_and(|t| t.client == client && t.method == method)
            .then(|| requests.remove(tx))
            .flatten()
    }

    fn outgoing(&self, buf: &[u8], client: SocketAddr, typ: MessageType) -> Outgoing {
        let Some(m) = decode(buf) else {
            return Outgoing::Forward;
        };
        let Some(tracked) = self.take(&m.transaction_id.0, client, typ.method) else {
            return Outgoing::Forward;
        };
        let success = typ.class == CLASS_SUCCESS_RESPONSE;
        match tracked.kind {
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
    /// client would have, signed with the client's key. The shared nonce is current;
    /// the client's own last one, the fallback, may be stale, and then the crate's 438
    /// brings one to retry with.
    fn end_allocation(&self, client: SocketAddr, nonce: Option<String>, retried: bool) {
        let five_tuple = self.five_tuple(client);
        let Some(allocation) = self.shared.ledger.allocation(self.listener, &five_tuple) else {
            return;
        };
        let shared =
            || lock(&self.nonces).current(tokio::time::Instant::now()).map(|(nonce, _)| nonce);
        let nonce = nonce.or_else(shared).unwrap_or(allocation.nonce);
        let Some(refresh) =
            refresh_to_zero(&allocation.username, &self.shared.realm, &nonce, &allocation.key)
        else {
            return;
        };
        let ending = Kind::Ending { retried };
        if let Tracking::Tracked = self.track(&refresh, client, &allocation.user, false, ending) {
            tracing::debug!(%client, user = %allocation.user, "ending the TURN allocation of a closed TCP connection");
            self.inject(refresh.raw, client);
        }
    }

    /// Hands the crate a request from `SYNTHETIC` that it answers with a fresh nonce,
    /// retiring the oldest nonce on the way once the crate no longer honours it.
    fn ask_for_nonce(&self, now: tokio::time::Instant) {
        let request = {
            let mut nonces = lock(&self.nonces);
            let retiring = nonces
                .issued
                .front()
                .filter(|(_, at)| now.saturating_duration_since(*at) >= NONCE_RETIRE)
                .map(|(nonce, _)| nonce.clone());
            let Some(request) = nonce_request(retiring.as_deref()) else {
                nonces.next = now + NONCE_RETRY;
                return;
            };
            nonces.asking = Some(Asking { tx: request.transaction_id.0, since: now, retiring });
            request
        };
        self.inject(request.raw, SYNTHETIC);
    }

    fn nonce_answer(&self, buf: &[u8], now: tokio::time::Instant) {
        let Some(m) = decode(buf) else {
            return;
        };
        let mut nonces = lock(&self.nonces);
        if nonces.asking.as_ref().is_none_or(|a| a.tx != m.transaction_id.0) {
            return;
        }
        let Some(asking) = nonces.asking.take() else {
            return;
        };
        if let Some(retiring) = asking.retiring {
            // Gone from the crate's map if it answered 438; if not, it is left there
            // rather than tried again and again.
            nonces.issued.retain(|(nonce, _)| *nonce != retiring);
        }
        let challenge =
            m.typ.class == CLASS_ERROR_RESPONSE && matches!(error_code(&m), Some(401 | 438));
        match (challenge, text(&m, ATTR_NONCE), text(&m, ATTR_REALM)) {
            (true, Some(nonce), Some(realm)) if !nonce.is_empty() => {
                nonces.issued.push_back((nonce, now));
                while nonces.issued.len() > MAX_ISSUED {
                    nonces.issued.pop_front();
                }
                nonces.realm = realm;
                nonces.next = now + NONCE_ROTATE;
            }
            _ => {
                tracing::warn!(answer = %m.typ, code = ?error_code(&m), "TURN server answered a nonce request without a nonce");
                nonces.next = now + NONCE_RETRY;
            }
        }
    }

    async fn ended(&self) -> Option<SocketAddr> {
        match &self.ended {
            Some(ended) => ended.lock().await.recv().await,
            None => std::future::pending().await,
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
            let due = lock(&self.nonces).due();
            let now = tokio::time::Instant::now();
            if due <= now {
                self.ask_for_nonce(now);
                continue;
            }
            let (n, from) = tokio::select! {
                received = self.inner.recv_from(buf) => received?,
                Some(client) = self.ended() => {
                    self.end_allocation(client, None, false);
                    continue;
                }
                () = self.wake.notified() => continue,
                () = tokio::time::sleep_until(due) => continue,
            };
            if from == SYNTHETIC {
                continue;
            }
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
        if target == SYNTHETIC {
            self.nonce_answer(buf, tokio::time::Instant::now());
            return Ok(buf.len());
        }
        if let Peek::Stun(typ) = peek(buf)
            && (typ.class == CLASS_SUCCESS_RESPONSE || typ.class == CLASS_ERROR_RESPONSE)
            && let Outgoing::Swallow = self.outgoing(buf, target, typ)
        {
            return Ok(buf.len());
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

#[cfg(test)]
mod tests {
    use stun::agent::TransactionId;
    use stun::message::Setter;
    use tokio::net::UdpSocket;
    use tokio::time::Instant;

    use super::super::TurnObserver;
    use super::super::auth::RestAuth;
    use super::super::ledger::Ledger;
    use super::super::peers::PeerPolicy;
    use super::*;

    struct Unobserved;

    impl TurnObserver for Unobserved {
        fn allocation_opened(&self, _: &str) {}
        fn allocation_closed(&self, _: &str) {}
        fn relayed(&self, _: u64) {}
        fn refused(&self, _: RefusalReason) {}
    }

    async fn gate() -> Gate {
        let observer: Arc<dyn TurnObserver> = Arc::new(Unobserved);
        let shared = Arc::new(Shared {
            realm: "example.org".into(),
            auth: Arc::new(RestAuth::new("s3cret".into(), "example.org".into())),
            policy: PeerPolicy::new(Vec::new(), true, "127.0.0.1".parse().unwrap()),
            ledger: Ledger::new(Arc::clone(&observer), 0, 0),
            observer,
        });
        let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        Gate::new(socket, ListenerId::Udp, shared, None).unwrap()
    }

    /// What the gate handed the crate to ask for a nonce.
    fn asked(gate: &Gate) -> Message {
        let (raw, from) = lock(&gate.injected).pop_front().expect("a nonce request");
        assert_eq!(from, SYNTHETIC);
        assert!(lock(&gate.injected).is_empty());
        let m = decode(&raw).unwrap();
        assert_eq!(m.typ, MessageType::new(METHOD_REFRESH, CLASS_REQUEST));
        m
    }

    /// The crate's answer to it: a challenge with `nonce`, or a 400.
    fn answer(gate: &Gate, request: &Message, code: u16, nonce: Option<&str>, at: Instant) {
        let mut extra: Vec<Box<dyn Setter>> = Vec::new();
        if let Some(nonce) = nonce {
            extra.push(Box::new(TextAttribute::new(ATTR_NONCE, nonce.into())));
            extra.push(Box::new(TextAttribute::new(ATTR_REALM, "example.org".into())));
        }
        let response = error_response(request, code, "", extra, None, false).unwrap();
        gate.nonce_answer(&response.raw, at);
    }

    fn issued(gate: &Gate) -> Vec<String> {
        lock(&gate.nonces).issued.iter().map(|(n, _)| n.clone()).collect()
    }

    #[tokio::test]
    async fn shared_nonces_rotate_and_retire_in_the_crate() {
        let gate = gate().await;
        let t0 = Instant::now();
        assert!(lock(&gate.nonces).due() <= t0, "asked for at once");
        assert_eq!(lock(&gate.nonces).current(t0), None);

        gate.ask_for_nonce(t0);
        let request = asked(&gate);
        assert!(!request.contains(ATTR_NONCE) && !request.contains(ATTR_MESSAGE_INTEGRITY));
        // Answers to anything but the outstanding request change nothing.
        let mut stray = Message::new();
        stray
            .build(&[
                Box::new(TransactionId::new()),
                Box::new(MessageType::new(METHOD_REFRESH, CLASS_REQUEST)),
            ])
            .unwrap();
        answer(&gate, &stray, 401, Some("stray"), t0);
        assert_eq!(lock(&gate.nonces).current(t0), None);
        assert_eq!(lock(&gate.nonces).due(), t0 + NONCE_RETRY, "asked again if unanswered");

        answer(&gate, &request, 401, Some("n0"), t0);
        assert_eq!(lock(&gate.nonces).current(t0), Some(("n0".into(), "example.org".into())));
        assert_eq!(lock(&gate.nonces).due(), t0 + NONCE_ROTATE);

        // Rotation: a new nonce each time, the one before still let through for a while.
        for (i, nonce) in ["n1", "n2", "n3"].into_iter().enumerate() {
            let at = t0 + NONCE_ROTATE * (i as u32 + 1);
            gate.ask_for_nonce(at);
            let request = asked(&gate);
            assert!(!request.contains(ATTR_NONCE), "nothing old enough to retire yet");
            answer(&gate, &request, 401, Some(nonce), at);
            assert_eq!(lock(&gate.nonces).current(at).unwrap().0, nonce);
        }
        let t3 = t0 + NONCE_ROTATE * 3;
        let nonces = lock(&gate.nonces);
        assert!(nonces.accepts("n3", t3) && nonces.accepts("n2", t3));
        assert!(!nonces.accepts("n1", t3) && !nonces.accepts("n0", t3));
        assert!(!nonces.accepts("stray", t3));
        drop(nonces);

        // Past the crate's lifetime the oldest is presented to the crate, which forgets
        // it and answers 438 with the next one.
        let t4 = t0 + NONCE_ROTATE * 4;
        assert!(t4 - t0 >= NONCE_RETIRE);
        gate.ask_for_nonce(t4);
        let request = asked(&gate);
        assert_eq!(text(&request, ATTR_NONCE).as_deref(), Some("n0"));
        assert!(request.contains(ATTR_MESSAGE_INTEGRITY));
        answer(&gate, &request, 438, Some("n4"), t4);
        assert_eq!(issued(&gate), ["n1", "n2", "n3", "n4"]);

        // If the crate did not take it as stale after all (it answers 400), the nonce is
        // not presented again, and a fresh one is asked for soon.
        let t5 = t0 + NONCE_ROTATE * 5;
        gate.ask_for_nonce(t5);
        let request = asked(&gate);
        assert_eq!(text(&request, ATTR_NONCE).as_deref(), Some("n1"));
        answer(&gate, &request, 400, None, t5);
        assert_eq!(issued(&gate), ["n2", "n3", "n4"]);
        assert_eq!(lock(&gate.nonces).due(), t5 + NONCE_RETRY);
        assert_eq!(lock(&gate.nonces).current(t5).unwrap().0, "n4", "handed out meanwhile");
    }
}
