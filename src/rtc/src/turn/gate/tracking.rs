//! The requests the gate follows from the crate reading them to its answer going out,
//! and the caps that keep the requests it never answers from piling up.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use stun::message::{Message, Method};

use super::Gate;
use crate::turn::ledger::{Allocation, lock};

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

pub(super) type TxId = [u8; 12];

pub(super) enum Kind {
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

pub(super) struct Tracked {
    pub(super) client: SocketAddr,
    pub(super) method: Method,
    user: String,
    /// Counted against the client's and the user's caps; the gate's own requests are not.
    capped: bool,
    at: Instant,
    pub(super) kind: Kind,
}

pub(super) enum Tracking {
    Tracked,
    /// The same request again from the same client: the entry already there serves it.
    Retransmission,
    Refused,
}

#[derive(Default)]
pub(super) struct Requests {
    pub(super) entries: HashMap<TxId, Tracked>,
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

impl Gate {
    /// Notes a request until its response goes out.
    pub(super) fn track(
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

    pub(super) fn take(&self, tx: &TxId, client: SocketAddr, method: Method) -> Option<Tracked> {
        let mut requests = lock(&self.requests);
        requests
            .entries
            .get(tx)
            .is_some_and(|t| t.client == client && t.method == method)
            .then(|| requests.remove(tx))
            .flatten()
    }
}
