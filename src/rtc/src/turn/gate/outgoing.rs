//! Outbound: the crate's answers matched to the requests the gate noted, and what they
//! change in the ledger.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ::turn::proto::relayaddr::RelayedAddress;
use stun::attributes::ATTR_NONCE;
use stun::message::{CLASS_ERROR_RESPONSE, CLASS_SUCCESS_RESPONSE, Getter, MessageType};

use super::tracking::Kind;
use super::{Gate, Outgoing};
use crate::turn::messages::{decode, error_code, text};

/// How long a permission lasts without refresh (RFC 5766 §8; the crate's value too).
const PERMISSION_LIFETIME: Duration = Duration::from_secs(300);

impl Gate {
    pub(super) fn outgoing(&self, buf: &[u8], client: SocketAddr, typ: MessageType) -> Outgoing {
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
}
