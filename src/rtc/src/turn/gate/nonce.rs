//! The shared nonce: asked of the crate now and then, handed out to every client, and
//! presented back to the crate to be forgotten once the crate no longer honours it.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use stun::attributes::{ATTR_NONCE, ATTR_REALM};
use stun::message::CLASS_ERROR_RESPONSE;

use super::Gate;
use super::tracking::TxId;
use crate::turn::ledger::lock;
use crate::turn::messages::{decode, error_code, nonce_request, text};

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
pub(super) const SYNTHETIC: SocketAddr = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0);

/// The nonce request awaiting the crate's answer.
struct Asking {
    tx: TxId,
    since: tokio::time::Instant,
    retiring: Option<String>,
}

/// The shared nonces: made up by the crate, handed out by the gate. Timed on tokio's
/// clock, which is the crate's.
pub(super) struct Nonces {
    /// Oldest first; the newest is the one handed out.
    issued: VecDeque<(String, tokio::time::Instant)>,
    /// The crate's realm, as it puts it in its challenges.
    realm: String,
    asking: Option<Asking>,
    next: tokio::time::Instant,
}

impl Nonces {
    pub(super) fn new() -> Self {
        Nonces {
            issued: VecDeque::new(),
            realm: String::new(),
            asking: None,
            next: tokio::time::Instant::now(),
        }
    }

    pub(super) fn due(&self) -> tokio::time::Instant {
        match &self.asking {
            Some(asking) => asking.since + NONCE_RETRY,
            None => self.next,
        }
    }

    /// The nonce and realm to challenge with.
    pub(super) fn current(&self, now: tokio::time::Instant) -> Option<(String, String)> {
        let (nonce, at) = self.issued.back()?;
        (now.saturating_duration_since(*at) < NONCE_ACCEPTED)
            .then(|| (nonce.clone(), self.realm.clone()))
    }

    pub(super) fn accepts(&self, nonce: &str, now: tokio::time::Instant) -> bool {
        self.issued
            .iter()
            .any(|(n, at)| n == nonce && now.saturating_duration_since(*at) < NONCE_ACCEPTED)
    }
}

impl Gate {
    /// Hands the crate a request from `SYNTHETIC` that it answers with a fresh nonce,
    /// retiring the oldest nonce on the way once the crate no longer honours it.
    pub(super) fn ask_for_nonce(&self, now: tokio::time::Instant) {
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

    pub(super) fn nonce_answer(&self, buf: &[u8], now: tokio::time::Instant) {
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
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use stun::agent::TransactionId;
    use stun::attributes::ATTR_MESSAGE_INTEGRITY;
    use stun::message::{CLASS_REQUEST, METHOD_REFRESH, Message, MessageType, Setter};
    use stun::textattrs::TextAttribute;
    use tokio::net::UdpSocket;
    use tokio::time::Instant;

    use super::*;
    use crate::turn::auth::RestAuth;
    use crate::turn::ledger::{Ledger, ListenerId};
    use crate::turn::messages::error_response;
    use crate::turn::peers::PeerPolicy;
    use crate::turn::{RefusalReason, Shared, TurnObserver};

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
