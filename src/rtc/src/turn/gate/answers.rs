//! The answers the gate writes itself: its challenges, carrying the shared nonce, and
//! the sending of every refusal it makes in the crate's place.

use std::net::SocketAddr;

use stun::attributes::{ATTR_FINGERPRINT, ATTR_NONCE, ATTR_REALM};
use stun::message::Message;
use stun::textattrs::TextAttribute;

use super::{Gate, Verdict};
use crate::turn::ledger::lock;
use crate::turn::messages::error_response;

impl Gate {
    /// Answers in the crate's words (401 and 438 as it builds them, plus FINGERPRINT if
    /// the request had one), with the shared nonce rather than a new one.
    pub(super) async fn challenge(&self, m: &Message, to: SocketAddr, code: u16) -> Verdict {
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

    pub(super) async fn reply(&self, reply: Option<Message>, to: SocketAddr) {
        let Some(reply) = reply else {
            return;
        };
        if let Err(err) = self.inner.send_to(&reply.raw, to).await {
            tracing::debug!(client = %to, error = %err, "TURN reply not sent");
        }
    }
}
