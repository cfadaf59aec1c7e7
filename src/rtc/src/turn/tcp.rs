//! TURN over TCP (RFC 5766 §2.1, not the RFC 6062 TCP relaying): each client keeps a
//! TCP connection to the server that carries the same STUN and ChannelData messages a
//! UDP client would send as datagrams. The crate only knows datagram sockets, so the
//! listener is presented to it as one: frames from every connection come out of
//! `recv_from` with the connection's peer address, and `send_to` that address writes
//! to that connection.

use std::any::Any;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::BytesMut;
use stun::message::MAGIC_COOKIE;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use webrtc_util::Conn;

use super::ledger::lock;

/// Largest frame accepted; longer ones are not TURN. (The crate reads at most 1500 bytes
/// at a time, so frames past that are dropped later, without closing the connection.)
const MAX_FRAME: usize = 64 * 1024;
const MAX_CONNECTIONS: usize = 1024;
/// So that one host cannot take every connection slot from the others.
const MAX_CONNECTIONS_PER_IP: usize = 32;
/// A connection that neither sends a valid frame nor is written to for this long is
/// closed. Writes count because a client of an allocation may only be receiving.
const IDLE: Duration = Duration::from_secs(30);
/// Frames waiting for a slow client; more are dropped, as a full UDP buffer would.
const WRITE_QUEUE: usize = 256;
/// Frames read and not yet taken by the crate; readers wait when it is full, which
/// pushes back on the clients through TCP.
const READ_QUEUE: usize = 1024;
const READ_CHUNK: usize = 4096;
/// Pause after a failed accept (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

const STUN_HEADER: usize = 20;
const CHANNEL_HEADER: usize = 4;

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Framing {
    /// A message of `frame` bytes, followed by padding up to `consumed`.
    Complete {
        frame: usize,
        consumed: usize,
    },
    Incomplete,
    Invalid,
}

fn padded(len: usize) -> usize {
    len.div_ceil(4) * 4
}

/// Where the first message in `buf` ends: STUN messages are a 20-byte header plus the
/// length at bytes 2..4; ChannelData (first byte 0x40..=0x7F) a 4-byte header plus the
/// length at bytes 2..4, padded to a multiple of four over TCP.
pub(crate) fn frame(buf: &[u8]) -> Framing {
    let Some(&first) = buf.first() else {
        return Framing::Incomplete;
    };
    match first {
        0x00..=0x3f => {
            let Some(header) = buf.get(..STUN_HEADER) else {
                return Framing::Incomplete;
            };
            let len = usize::from(u16::from_be_bytes([header[2], header[3]]));
            if header[4..8] != MAGIC_COOKIE.to_be_bytes() || len % 4 != 0 {
                return Framing::Invalid;
            }
            let total = STUN_HEADER + len;
            if total > MAX_FRAME {
                Framing::Invalid
            } else if buf.len() < total {
                Framing::Incomplete
            } else {
                Framing::Complete { frame: total, consumed: total }
            }
        }
        0x40..=0x7f => {
            let Some(header) = buf.get(..CHANNEL_HEADER) else {
                return Framing::Incomplete;
            };
            let frame = CHANNEL_HEADER + usize::from(u16::from_be_bytes([header[2], header[3]]));
            let consumed = padded(frame);
            if consumed > MAX_FRAME {
                Framing::Invalid
            } else if buf.len() < consumed {
                Framing::Incomplete
            } else {
                Framing::Complete { frame, consumed }
            }
        }
        _ => Framing::Invalid,
    }
}

/// ChannelData as a TCP client must get it: padded to a multiple of four. (The crate
/// pads already; this does not rely on it.)
fn pad_channel_data(buf: &[u8]) -> Vec<u8> {
    let declared = match buf {
        [0x40..=0x7f, _, hi, lo, ..] => {
            CHANNEL_HEADER + usize::from(u16::from_be_bytes([*hi, *lo]))
        }
        _ => return buf.to_vec(),
    };
    let end = declared.min(buf.len());
    let mut out = Vec::with_capacity(padded(end));
    out.extend_from_slice(&buf[..end]);
    out.resize(padded(end), 0);
    out
}

struct Writer {
    id: u64,
    tx: mpsc::Sender<Vec<u8>>,
}

type Writers = Arc<Mutex<HashMap<SocketAddr, Writer>>>;

type PerIp = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// One of a client address's connection slots, given back when dropped.
struct IpSlot {
    counts: PerIp,
    ip: IpAddr,
}

impl IpSlot {
    fn take(counts: &PerIp, ip: IpAddr) -> Option<IpSlot> {
        // A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d; one host, one count.
        let ip = ip.to_canonical();
        let mut map = lock(counts);
        let held = map.entry(ip).or_insert(0);
        if *held >= MAX_CONNECTIONS_PER_IP {
            return None;
        }
        *held += 1;
        Some(IpSlot { counts: Arc::clone(counts), ip })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut map = lock(&self.counts);
        if let Some(held) = map.get_mut(&self.ip) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

pub(crate) struct TcpConn {
    local: SocketAddr,
    frames: tokio::sync::Mutex<mpsc::Receiver<(Vec<u8>, SocketAddr)>>,
    writers: Writers,
}

impl TcpConn {
    /// Starts accepting. The receiver names each connection that ended, so that its
    /// allocation can be ended too.
    pub(crate) fn start(
        listener: TcpListener,
        local: SocketAddr,
        cancel: CancellationToken,
    ) -> (TcpConn, mpsc::Receiver<SocketAddr>) {
        let (frames_tx, frames_rx) = mpsc::channel(READ_QUEUE);
        let (ended_tx, ended_rx) = mpsc::channel(MAX_CONNECTIONS);
        let writers: Writers = Arc::default();
        let accept = Acceptor {
            listener,
            frames: frames_tx,
            ended: ended_tx,
            writers: Arc::clone(&writers),
            slots: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            per_ip: PerIp::default(),
            cancel,
        };
        tokio::spawn(accept.run());
        let conn = TcpConn { local, frames: tokio::sync::Mutex::new(frames_rx), writers };
        (conn, ended_rx)
    }
}

struct Acceptor {
    listener: TcpListener,
    frames: mpsc::Sender<(Vec<u8>, SocketAddr)>,
    ended: mpsc::Sender<SocketAddr>,
    writers: Writers,
    slots: Arc<Semaphore>,
    per_ip: PerIp,
    cancel: CancellationToken,
}

impl Acceptor {
    async fn run(self) {
        let mut next_id = 0u64;
        loop {
            let accepted = tokio::select! {
                _ = self.cancel.cancelled() => return,
                accepted = self.listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::warn!(error = %err, "TURN TCP accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            let Some(ip_slot) = IpSlot::take(&self.per_ip, peer.ip()) else {
                tracing::debug!(client = %peer, "TURN TCP connection refused: too many from its address");
                continue;
            };
            let Ok(slot) = Arc::clone(&self.slots).try_acquire_owned() else {
                tracing::debug!(client = %peer, "TURN TCP connection refused: too many connections");
                continue;
            };
            next_id += 1;
            let connection = Connection {
                id: next_id,
                peer,
                frames: self.frames.clone(),
                ended: self.ended.clone(),
                writers: Arc::clone(&self.writers),
                server: self.cancel.clone(),
                cancel: self.cancel.child_token(),
                last_active: Arc::new(Mutex::new(Instant::now())),
            };
            tokio::spawn(connection.serve(stream, (slot, ip_slot)));
        }
    }
}

struct Connection {
    id: u64,
    peer: SocketAddr,
    frames: mpsc::Sender<(Vec<u8>, SocketAddr)>,
    ended: mpsc::Sender<SocketAddr>,
    writers: Writers,
    server: CancellationToken,
    /// Ends this connection's reader and writer together.
    cancel: CancellationToken,
    last_active: Arc<Mutex<Instant>>,
}

impl Connection {
    async fn serve(self, stream: TcpStream, _slots: (OwnedSemaphorePermit, IpSlot)) {
        let _ = stream.set_nodelay(true);
        let (reader, writer) = stream.into_split();
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        lock(&self.writers).insert(self.peer, Writer { id: self.id, tx });
        tokio::spawn(write_loop(writer, rx, Arc::clone(&self.last_active), self.cancel.clone()));

        let reason = self.read_loop(reader).await;
        tracing::debug!(client = %self.peer, reason, "TURN TCP connection ended");
        self.cancel.cancel();
        {
            let mut writers = lock(&self.writers);
            if writers.get(&self.peer).is_some_and(|w| w.id == self.id) {
                writers.remove(&self.peer);
            }
        }
        if !self.server.is_cancelled() && self.ended.try_send(self.peer).is_err() {
            tracing::debug!(client = %self.peer, "TURN TCP close not passed on; its allocation will expire");
        }
    }

    async fn read_loop(&self, mut reader: OwnedReadHalf) -> &'static str {
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        loop {
            loop {
                match frame(&buf) {
                    Framing::Complete { frame, consumed } => {
                        let mut message = buf.split_to(consumed);
                        message.truncate(frame);
                        *lock(&self.last_active) = Instant::now();
                        let delivered = tokio::select! {
                            _ = self.cancel.cancelled() => return "server closing",
                            sent = self.frames.send((message.to_vec(), self.peer)) => sent,
                        };
                        if delivered.is_err() {
                            return "listener closed";
                        }
                    }
                    Framing::Incomplete => break,
                    Framing::Invalid => return "not TURN framing",
                }
            }
            let idle_until = *lock(&self.last_active) + IDLE;
            buf.reserve(READ_CHUNK);
            let read = tokio::select! {
                _ = self.cancel.cancelled() => return "server closing",
                _ = tokio::time::sleep_until(idle_until) => {
                    if lock(&self.last_active).elapsed() >= IDLE {
                        return "idle";
                    }
                    continue;
                }
                read = reader.read_buf(&mut buf) => read,
            };
            match read {
                Ok(0) => return "closed by the client",
                Ok(_) => {}
                Err(_) => return "read failed",
            }
        }
    }
}

async fn write_loop(
    mut writer: OwnedWriteHalf,
    mut rx: mpsc::Receiver<Vec<u8>>,
    last_active: Arc<Mutex<Instant>>,
    cancel: CancellationToken,
) {
    loop {
        let frame = tokio::select! {
            _ = cancel.cancelled() => break,
            frame = rx.recv() => match frame {
                Some(frame) => frame,
                None => break,
            },
        };
        let written = tokio::select! {
            _ = cancel.cancelled() => break,
            written = writer.write_all(&frame) => written,
        };
        if written.is_err() {
            cancel.cancel();
            break;
        }
        *lock(&last_active) = Instant::now();
    }
    let _ = writer.shutdown().await;
}

#[async_trait]
impl Conn for TcpConn {
    async fn connect(&self, _addr: SocketAddr) -> webrtc_util::Result<()> {
        Err(crate::turn::messages::unsupported("not used on the TURN TCP listener"))
    }

    async fn recv(&self, _buf: &mut [u8]) -> webrtc_util::Result<usize> {
        Err(crate::turn::messages::unsupported("not used on the TURN TCP listener"))
    }

    async fn recv_from(&self, buf: &mut [u8]) -> webrtc_util::Result<(usize, SocketAddr)> {
        let mut frames = self.frames.lock().await;
        loop {
            let Some((frame, from)) = frames.recv().await else {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "TURN TCP listener closed",
                )
                .into());
            };
            match buf.get_mut(..frame.len()) {
                Some(slot) => {
                    slot.copy_from_slice(&frame);
                    return Ok((frame.len(), from));
                }
                None => {
                    tracing::debug!(client = %from, len = frame.len(), "TURN TCP frame too large to relay, dropped");
                }
            }
        }
    }

    async fn send(&self, _buf: &[u8]) -> webrtc_util::Result<usize> {
        Err(crate::turn::messages::unsupported("not used on the TURN TCP listener"))
    }

    async fn send_to(&self, buf: &[u8], target: SocketAddr) -> webrtc_util::Result<usize> {
        let tx = lock(&self.writers).get(&target).map(|w| w.tx.clone());
        let Some(tx) = tx else {
            tracing::trace!(client = %target, "TURN TCP connection gone, frame dropped");
            return Ok(buf.len());
        };
        match tx.try_send(pad_channel_data(buf)) {
            Ok(()) | Err(TrySendError::Closed(_)) => {}
            Err(TrySendError::Full(_)) => {
                tracing::trace!(client = %target, "TURN TCP client not keeping up, frame dropped");
            }
        }
        Ok(buf.len())
    }

    fn local_addr(&self) -> webrtc_util::Result<SocketAddr> {
        Ok(self.local)
    }

    fn remote_addr(&self) -> Option<SocketAddr> {
        None
    }

    async fn close(&self) -> webrtc_util::Result<()> {
        Ok(())
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync) {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stun_header(len: u16) -> Vec<u8> {
        let mut b = vec![0x00, 0x01];
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        b.extend_from_slice(&[0; 12]);
        b
    }

    #[test]
    fn stun_messages_are_framed_by_their_length() {
        let mut b = stun_header(8);
        assert_eq!(frame(&b[..3]), Framing::Incomplete);
        assert_eq!(frame(&b), Framing::Incomplete);
        b.extend_from_slice(&[0; 8]);
        b.extend_from_slice(&[0x40, 0, 0]);
        assert_eq!(frame(&b), Framing::Complete { frame: 28, consumed: 28 });
    }

    #[test]
    fn channel_data_padding_is_consumed_but_not_delivered() {
        let mut b = vec![0x40, 0x00, 0x00, 0x05, 1, 2, 3, 4, 5];
        assert_eq!(frame(&b), Framing::Incomplete);
        b.extend_from_slice(&[0, 0, 0]);
        assert_eq!(frame(&b), Framing::Complete { frame: 9, consumed: 12 });
        assert_eq!(pad_channel_data(&b[..9]), b);
        assert_eq!(pad_channel_data(&b), b);
    }

    #[test]
    fn connections_per_address_are_capped_and_given_back() {
        let counts = PerIp::default();
        let v4: IpAddr = "192.0.2.1".parse().unwrap();
        let slots: Vec<_> =
            (0..MAX_CONNECTIONS_PER_IP).map(|_| IpSlot::take(&counts, v4).unwrap()).collect();
        assert!(IpSlot::take(&counts, v4).is_none());
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert!(IpSlot::take(&counts, mapped).is_none(), "the mapped form is the same host");
        assert!(IpSlot::take(&counts, "192.0.2.2".parse().unwrap()).is_some());
        drop(slots);
        assert!(lock(&counts).is_empty());
        assert!(IpSlot::take(&counts, v4).is_some());
    }

    #[test]
    fn garbage_and_oversized_frames_are_invalid() {
        let tls_hello = [
            0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03, 0, 0, 0, 0, 0, 0, 0,
            0, 0,
        ];
        assert_eq!(frame(&tls_hello), Framing::Invalid);
        assert_eq!(frame(&[0x80, 0, 0, 0]), Framing::Invalid);
        let mut no_cookie = stun_header(0);
        no_cookie[4] = 0;
        assert_eq!(frame(&no_cookie), Framing::Invalid);
        assert_eq!(frame(&stun_header(6)), Framing::Invalid);
        assert_eq!(frame(&stun_header(65532)), Framing::Invalid);
        assert_eq!(frame(&[0x7f, 0xff, 0xff, 0xff]), Framing::Invalid);
    }
}
