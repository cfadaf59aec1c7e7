//! Inbound: which requests reach the crate, and which the gate answers or drops in its
//! place.

use std::net::SocketAddr;

use stun::attributes::{ATTR_FINGERPRINT, ATTR_MESSAGE_INTEGRITY};
use stun::message::{
    CLASS_INDICATION, CLASS_REQUEST, METHOD_ALLOCATE, METHOD_CHANNEL_BIND,
    METHOD_CREATE_PERMISSION, METHOD_REFRESH, METHOD_SEND, Message,
};

use super::tracking::{Kind, Tracking};
use super::{Gate, Verdict};
use crate::turn::RefusalReason;
use crate::turn::auth::parse_username;
use crate::turn::ledger::{Allocation, lock};
use crate::turn::messages::{
    Credentials, Peek, credentials, decode, error_response, integrity_holds, peek, peer_addresses,
};

impl Gate {
    pub(super) async fn inspect(&self, data: &[u8], from: SocketAddr) -> Verdict {
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
}
