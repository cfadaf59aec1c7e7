//! A selective forwarding unit that speaks LiveKit's client signalling, so that Element
//! Call and any livekit-client app use it unchanged. Each participant has a WebSocket of
//! protobuf `SignalRequest`/`SignalResponse` messages and two peer connections: the one
//! it publishes on (which it offers) and the one it receives on (which the SFU offers).
//! Media is forwarded as RTP without being decoded, so end-to-end encrypted frames pass
//! untouched; every peer connection shares one UDP port.
//!
//! The transport of the signalling (the WebSocket, the token check) is the caller's: a
//! [`Session`] takes each request's bytes and hands back responses' bytes.

mod congestion;
mod forward;
mod ids;
mod layers;
mod media;
mod munge;
mod packet;
mod participant;
mod profile;
mod quality;
mod room;
mod signal;
mod speakers;

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::mpsc;

pub use participant::Session;
use room::Room;

/// How the SFU is set up.
#[derive(Debug, Clone)]
pub struct SfuSettings {
    /// The UDP address every peer connection's media goes through.
    pub udp_listen: SocketAddr,
    /// Addresses clients reach the UDP port at (the host candidates offered).
    pub public_ips: Vec<IpAddr>,
    /// Participants one call may hold.
    pub max_participants: usize,
    /// Participants of one call that may publish (0: as many as may join).
    pub max_publishers: usize,
    /// Video one publisher may send, all its tracks and layers together, in bits per
    /// second (0: no ceiling).
    pub max_publish_bitrate: u64,
    /// Estimate receivers' bandwidth from transport-wide congestion feedback
    /// (`congestion.rs`) rather than take their REMB.
    pub send_side_estimate: bool,
    /// Shown to clients as the server's version.
    pub server_version: String,
}

/// A TURN or STUN server handed to clients in the join response.
#[derive(Debug, Clone, Default)]
pub struct IceServer {
    pub urls: Vec<String>,
    pub username: String,
    pub credential: String,
}

/// What a verified access token allows.
#[derive(Debug, Clone)]
pub struct JoinGrant {
    pub room: String,
    pub identity: String,
    pub name: String,
    pub metadata: String,
    pub can_publish: bool,
    pub can_subscribe: bool,
    pub can_publish_data: bool,
    /// The token may create the room (LiveKit's `roomCreate`).
    pub may_create: bool,
    /// The participant may change its own name, metadata and attributes (LiveKit's
    /// `canUpdateOwnMetadata`).
    pub can_update_metadata: bool,
    /// Receives every published track without asking (the client's `auto_subscribe`).
    pub auto_subscribe: bool,
}

/// Why a join was refused.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("the call does not exist and this token may not start it")]
    NoSuchRoom,
    #[error("the call is full")]
    Full,
    #[error("media setup failed: {0}")]
    Media(String),
}

/// A call that ended on the SFU, for call history.
#[derive(Debug, Clone)]
pub struct CallReport {
    /// The LiveKit room name (what the token named).
    pub room: String,
    /// The most participants it held at once.
    pub peak_participants: usize,
    /// RTP payload bytes forwarded in it (one copy per receiver).
    pub forwarded_bytes: u64,
    pub duration: Duration,
}

/// What the SFU tells its owner about calls (for metrics and call history).
pub trait SfuObserver: Send + Sync + 'static {
    fn room_opened(&self, _room: &str) {}
    fn room_closed(&self, _report: &CallReport) {}
    fn participant_joined(&self, _room: &str, _identity: &str) {}
    fn participant_left(&self, _room: &str, _identity: &str) {}
    fn forwarded(&self, _packets: u64, _bytes: u64) {}
    /// How long one packet took from its arrival to its last subscriber's write.
    fn forward_time(&self, _took: Duration) {}
    /// A subscriber's receiver report: the share of packets it lost since its last
    /// report, and the round trip when the report says.
    fn receiver_report(&self, _loss: f32, _rtt: Option<Duration>) {}
    /// A receiving connection's bandwidth estimate was taken: the SFU's own (from
    /// transport-wide congestion feedback) or the receiver's REMB.
    fn estimate(&self, _send_side: bool) {}
}

struct NoObserver;
impl SfuObserver for NoObserver {}

/// How long a participant whose signalling dropped may resume before it is taken out.
const RESUME_WINDOW: Duration = Duration::from_secs(20);
/// How long a room permitted by [`Sfu::permit_room`] waits for its first participant.
const PERMIT_LIFETIME: Duration = Duration::from_secs(300);

pub struct Sfu {
    settings: SfuSettings,
    api: webrtc::api::API,
    udp_addr: SocketAddr,
    rooms: Mutex<HashMap<String, Arc<Room>>>,
    permitted: Mutex<HashMap<String, Instant>>,
    observer: std::sync::OnceLock<Arc<dyn SfuObserver>>,
}

/// A call as the SFU holds it, for the admin view and metrics.
#[derive(Debug, Clone)]
pub struct RoomSummary {
    pub name: String,
    pub participants: usize,
    pub published_tracks: usize,
}

impl Sfu {
    /// Binds the media port and builds the WebRTC stack.
    pub async fn start(settings: SfuSettings) -> std::io::Result<Arc<Self>> {
        let (api, udp_addr) = media::build_api(&settings).await?;
        Ok(Arc::new(Self {
            settings,
            api,
            udp_addr,
            rooms: Mutex::new(HashMap::new()),
            permitted: Mutex::new(HashMap::new()),
            observer: std::sync::OnceLock::new(),
        }))
    }

    /// Sets who hears about calls (once, before the first join).
    pub fn observe(&self, observer: Arc<dyn SfuObserver>) {
        let _ = self.observer.set(observer);
    }

    fn observer(&self) -> Arc<dyn SfuObserver> {
        self.observer.get().cloned().unwrap_or_else(|| Arc::new(NoObserver))
    }

    /// The UDP address media flows through.
    pub fn media_addr(&self) -> SocketAddr {
        self.udp_addr
    }

    /// Lets the next join of `room` create it although its token may not: the owner
    /// vouched for a user who may start calls (what LiveKit's `CreateRoom` is for).
    pub fn permit_room(&self, room: &str) {
        let mut permitted = self.permitted.lock().unwrap_or_else(|p| p.into_inner());
        permitted.retain(|_, at| at.elapsed() < PERMIT_LIFETIME);
        permitted.insert(room.to_owned(), Instant::now());
    }

    fn take_permit(&self, room: &str) -> bool {
        let mut permitted = self.permitted.lock().unwrap_or_else(|p| p.into_inner());
        permitted.remove(room).is_some_and(|at| at.elapsed() < PERMIT_LIFETIME)
    }

    /// The calls running now.
    pub fn rooms(&self) -> Vec<RoomSummary> {
        let rooms: Vec<Arc<Room>> =
            self.rooms.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        rooms.iter().map(|r| r.summary()).collect()
    }

    /// Joins `grant`'s room (creating it when allowed), or resumes the participant `resume`
    /// (a participant sid) when the client asks to: the session's first response is the
    /// join (or reconnect) response the client waits for.
    pub async fn join(
        self: &Arc<Self>,
        grant: JoinGrant,
        resume: Option<&str>,
        ice_servers: Vec<IceServer>,
    ) -> Result<Session, JoinError> {
        let existing =
            self.rooms.lock().unwrap_or_else(|p| p.into_inner()).get(&grant.room).cloned();
        if let (Some(sid), Some(room)) = (resume, &existing)
            && let Some(session) = room.resume(sid, &grant.identity, &ice_servers, self).await
        {
            return Ok(session);
        }
        if resume.is_some() {
            // Nothing to resume: the client is told to join afresh.
            let (tx, rx) = mpsc::unbounded_channel();
            let _ = tx.send(signal::leave_reconnect());
            return Ok(Session::detached(rx));
        }
        let room = match existing {
            Some(room) => room,
            None => {
                if !grant.may_create && !self.take_permit(&grant.room) {
                    return Err(JoinError::NoSuchRoom);
                }
                let mut rooms = self.rooms.lock().unwrap_or_else(|p| p.into_inner());
                rooms
                    .entry(grant.room.clone())
                    .or_insert_with(|| {
                        self.observer().room_opened(&grant.room);
                        tracing::info!(room = %grant.room, "call started");
                        Room::new(grant.room.clone())
                    })
                    .clone()
            }
        };
        if room.participant_count() >= self.settings.max_participants {
            return Err(JoinError::Full);
        }
        room.join(self, grant, ice_servers).await
    }

    /// Takes an empty room out.
    fn close_if_empty(&self, room: &Arc<Room>) {
        let mut rooms = self.rooms.lock().unwrap_or_else(|p| p.into_inner());
        if room.participant_count() == 0
            && rooms.get(room.name()).is_some_and(|r| Arc::ptr_eq(r, room))
        {
            rooms.remove(room.name());
            self.observer().room_closed(&room.report());
            tracing::info!(room = %room.name(), "call ended");
        }
    }
}
