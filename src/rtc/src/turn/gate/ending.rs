//! Ending the allocations of TCP clients whose connection went away, which the crate
//! would otherwise keep until they expire.

use std::net::SocketAddr;

use super::Gate;
use super::tracking::{Kind, Tracking};
use crate::turn::ledger::lock;
use crate::turn::messages::refresh_to_zero;

impl Gate {
    /// Has the crate delete the allocation of a TCP client that disconnected. The crate
    /// can only delete every allocation of a username at once, and one user's
    /// credentials may serve several, so the gate sends the Refresh with LIFETIME 0 the
    /// client would have, signed with the client's key. The shared nonce is current;
    /// the client's own last one, the fallback, may be stale, and then the crate's 438
    /// brings one to retry with.
    pub(super) fn end_allocation(&self, client: SocketAddr, nonce: Option<String>, retried: bool) {
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

    pub(super) async fn ended(&self) -> Option<SocketAddr> {
        match &self.ended {
            Some(ended) => ended.lock().await.recv().await,
            None => std::future::pending().await,
        }
    }
}
