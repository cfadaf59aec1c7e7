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

mod admission;
mod answers;
mod ending;
mod nonce;
mod outgoing;
mod tracking;

use std::any::Any;
use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use ::turn::allocation::five_tuple::FiveTuple;
use ::turn::proto::PROTO_UDP;
use async_trait::async_trait;
use stun::message::{CLASS_ERROR_RESPONSE, CLASS_SUCCESS_RESPONSE};
use tokio::sync::{Notify, mpsc};
use webrtc_util::Conn;

use super::Shared;
use super::ledger::{ListenerId, lock};
use super::messages::{Peek, peek};
use nonce::{Nonces, SYNTHETIC};
use tracking::Requests;

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
}

#[async_trait]
impl Conn for Gate {
    async fn connect(&self, _addr: SocketAddr) -> webrtc_util::Result<()> {
        Err(crate::turn::messages::unsupported("not used on a TURN listener"))
    }

    async fn recv(&self, _buf: &mut [u8]) -> webrtc_util::Result<usize> {
        Err(crate::turn::messages::unsupported("not used on a TURN listener"))
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
        Err(crate::turn::messages::unsupported("not used on a TURN listener"))
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
