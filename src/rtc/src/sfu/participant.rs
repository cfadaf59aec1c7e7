//! One participant: its signalling, the connection it publishes on (offered by the
//! client) and the one it receives on (offered here), its tracks and data channels.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use livekit_protocol as lk;
use prost::Message;
use tokio::sync::mpsc;
use webrtc::{
    data_channel::{RTCDataChannel, data_channel_message::DataChannelMessage},
    ice_transport::ice_candidate::{RTCIceCandidate, RTCIceCandidateInit},
    peer_connection::{
        RTCPeerConnection, offer_answer_options::RTCOfferOptions,
        sdp::session_description::RTCSessionDescription,
    },
    rtcp::payload_feedbacks::receiver_estimated_maximum_bitrate::ReceiverEstimatedMaximumBitrate,
    rtp_transceiver::{RTCRtpTransceiver, rtp_codec::RTPCodecType},
    track::track_remote::TrackRemote,
};

use super::{
    JoinGrant, RESUME_WINDOW, Sfu,
    forward::{self, Forwarder, TrackSettings},
    ids, layers, media,
    profile::Profile,
    quality::{self, Reception},
    room::Room,
    signal::{self, Request},
};

/// How often a publisher is reminded of the bitrate it may send (a REMB).
const PUBLISH_CAP_INTERVAL: Duration = Duration::from_secs(1);
/// Entries of a `SubscriptionPermission` kept (participants, and tracks of each).
const MAX_PERMISSIONS: usize = 1000;

struct Signal {
    tx: mpsc::UnboundedSender<Vec<u8>>,
    /// Bumped on each resume, so that an old connection's end does not end the session.
    generation: u64,
}

struct Track {
    cid: String,
    info: lk::TrackInfo,
    /// Media has arrived and is forwarded, by this.
    forwarder: Option<Arc<Forwarder>>,
    /// The media section of the publishing connection it arrives in.
    mid: Option<String>,
}

impl Track {
    fn forwarding(&self) -> bool {
        self.forwarder.is_some()
    }
}

/// What arriving media is to its participant.
enum Claim {
    /// The first stream of an announced track.
    New(Arc<Forwarder>),
    /// A further simulcast layer of a track already forwarded.
    Layer(Arc<Forwarder>),
    /// Nothing announced it.
    Unknown,
}

#[derive(Default)]
struct State {
    version: u32,
    tracks: Vec<Track>,
    /// What the participant may change of itself.
    profile: Profile,
}

/// The receiving connection's offers: one outstanding at a time, ids increasing.
#[derive(Default)]
struct Negotiation {
    last_id: u32,
    outstanding: bool,
    again: bool,
    ice_restart: bool,
}

pub(crate) struct Participant {
    pub sid: String,
    pub identity: String,
    grant: JoinGrant,
    joined_ms: i64,
    room: Weak<Room>,
    sfu: Weak<Sfu>,
    pub publisher: Arc<RTCPeerConnection>,
    pub subscriber: Arc<RTCPeerConnection>,
    signal: Mutex<Signal>,
    state: Mutex<State>,
    channels: Mutex<HashMap<String, Arc<RTCDataChannel>>>,
    negotiation: tokio::sync::Mutex<Negotiation>,
    /// Offers from the client are answered one at a time.
    answering: tokio::sync::Mutex<()>,
    /// The client's candidates that came before the description they belong to (the
    /// publisher's, then the subscriber's), added once it is set.
    early_candidates: Mutex<[Vec<RTCIceCandidateInit>; 2]>,
    /// What this participant asked of others' tracks, by track sid.
    track_settings: Mutex<HashMap<String, TrackSettings>>,
    /// The bandwidth its receiving connection reports (REMB), bits per second; 0: none.
    estimate: AtomicU64,
    /// Video tracks it receives, among which the estimate is shared.
    video_subscriptions: AtomicI64,
    publish_cap_running: AtomicBool,
    /// Tracks received so far, and how many times in all (see [`Self::local_track_id`]).
    received: Mutex<(HashSet<String>, u64)>,
    /// Who may receive this participant's tracks (`SubscriptionPermission`); `None`:
    /// everyone.
    permissions: Mutex<Option<lk::SubscriptionPermission>>,
    /// Tracks this participant subscribed to (`true`) or unsubscribed from by name,
    /// over what it gets by default ([`Self::auto_subscribes`]).
    choices: Mutex<HashMap<String, bool>>,
    /// What its receiving connection reported since it was last rated.
    reception: Mutex<Reception>,
    /// Its signalling connection dropped and it has not resumed yet.
    detached: AtomicBool,
    /// It is to hear everyone's connection quality again (it resumed).
    needs_qualities: AtomicBool,
    /// Tracks (by sid) it was told it may not receive, to be told when it may again.
    denied: Mutex<HashSet<String>>,
    left: AtomicBool,
}

/// A participant's signalling as the transport sees it: requests go in through
/// [`SessionHandle::handle`], responses come out of `responses`.
pub struct Session {
    pub responses: mpsc::UnboundedReceiver<Vec<u8>>,
    pub handle: SessionHandle,
}

#[derive(Clone)]
pub struct SessionHandle {
    participant: Option<Arc<Participant>>,
    generation: u64,
}

impl Session {
    /// A session with nothing behind it: the responses already queued, then the end.
    pub(crate) fn detached(responses: mpsc::UnboundedReceiver<Vec<u8>>) -> Self {
        Self { responses, handle: SessionHandle { participant: None, generation: 0 } }
    }
}

impl SessionHandle {
    /// The participant's identity, when there is one.
    pub fn identity(&self) -> Option<&str> {
        self.participant.as_deref().map(|p| p.identity.as_str())
    }

    /// Handles one request's bytes; `false` once the client has left.
    pub async fn handle(&self, bytes: &[u8]) -> bool {
        let Some(p) = &self.participant else { return false };
        match signal::decode(bytes) {
            Some(request) => p.handle(request).await,
            None => true,
        }
    }

    /// The signalling connection ended: unless the client resumes in time (or left
    /// already), the participant is taken out.
    pub fn closed(self) {
        let Some(p) = self.participant else { return };
        if p.left.load(Ordering::Acquire) {
            return;
        }
        let generation = self.generation;
        {
            // A resume replaces the connection (and so ends the old one): only the
            // current connection's end detaches the participant.
            let signal = p.signal.lock().unwrap_or_else(|e| e.into_inner());
            if signal.generation == generation {
                p.detached.store(true, Ordering::Release);
            }
        }
        tokio::spawn(async move {
            tokio::time::sleep(RESUME_WINDOW).await;
            let current = p.signal.lock().unwrap_or_else(|e| e.into_inner()).generation;
            if current == generation && !p.left.load(Ordering::Acquire) {
                p.leave().await;
            }
        });
    }
}

/// The media sections an offer sends media in (by mid): not rejected (port 0) and
/// `sendrecv` or `sendonly` (the default when none is said).
fn sending_mids(sdp: &str) -> HashSet<String> {
    let mut out = HashSet::new();
    let mut section: Option<(Option<String>, bool)> = None;
    let mut finish = |section: Option<(Option<String>, bool)>| {
        if let Some((Some(mid), true)) = section {
            out.insert(mid);
        }
    };
    for line in sdp.lines().map(str::trim_end) {
        if let Some(m) = line.strip_prefix("m=") {
            finish(section.take());
            let rejected = m.split_whitespace().nth(1) == Some("0");
            section = Some((None, !rejected));
        } else if let Some((mid, sends)) = section.as_mut() {
            if let Some(value) = line.strip_prefix("a=mid:") {
                *mid = Some(value.to_owned());
            } else if matches!(line, "a=recvonly" | "a=inactive") {
                *sends = false;
            }
        }
    }
    finish(section);
    out
}

/// The first `a=mid:` of a session description.
fn first_mid(sdp: &str) -> Option<&str> {
    sdp.lines().find_map(|l| l.trim_end().strip_prefix("a=mid:"))
}

fn candidate_json(c: &RTCIceCandidate) -> Option<String> {
    c.to_json().ok().map(|init| init.candidate).filter(|c| !c.is_empty())
}

impl Participant {
    pub async fn new(
        sfu: &Arc<Sfu>,
        room: &Arc<Room>,
        grant: JoinGrant,
    ) -> Result<(Arc<Self>, Session), webrtc::Error> {
        let publisher = media::new_peer(&sfu.api).await?;
        let subscriber = media::new_peer(&sfu.api).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let participant = Arc::new(Self {
            sid: ids::participant(),
            identity: grant.identity.clone(),
            joined_ms: signal::now_ms(),
            room: Arc::downgrade(room),
            sfu: Arc::downgrade(sfu),
            publisher,
            subscriber,
            signal: Mutex::new(Signal { tx, generation: 0 }),
            state: Mutex::new(State {
                version: 1,
                tracks: Vec::new(),
                profile: Profile {
                    name: grant.name.clone(),
                    metadata: grant.metadata.clone(),
                    attributes: HashMap::new(),
                },
            }),
            grant,
            channels: Mutex::new(HashMap::new()),
            negotiation: tokio::sync::Mutex::new(Negotiation::default()),
            answering: tokio::sync::Mutex::new(()),
            early_candidates: Mutex::new([Vec::new(), Vec::new()]),
            track_settings: Mutex::new(HashMap::new()),
            estimate: AtomicU64::new(0),
            video_subscriptions: AtomicI64::new(0),
            publish_cap_running: AtomicBool::new(false),
            received: Mutex::new((HashSet::new(), 0)),
            permissions: Mutex::new(None),
            choices: Mutex::new(HashMap::new()),
            reception: Mutex::new(Reception::default()),
            detached: AtomicBool::new(false),
            needs_qualities: AtomicBool::new(false),
            denied: Mutex::new(HashSet::new()),
            left: AtomicBool::new(false),
        });
        participant.wire();
        let handle = SessionHandle { participant: Some(participant.clone()), generation: 0 };
        Ok((participant.clone(), Session { responses: rx, handle }))
    }

    /// Connects the peer connections' events to this participant.
    fn wire(self: &Arc<Self>) {
        for (pc, target) in [
            (&self.publisher, signal::TARGET_PUBLISHER),
            (&self.subscriber, signal::TARGET_SUBSCRIBER),
        ] {
            let me = Arc::downgrade(self);
            pc.on_ice_candidate(Box::new(move |candidate| {
                let me = me.clone();
                Box::pin(async move {
                    // The end of gathering (`None`) is never sent: clients fail on it.
                    if let (Some(me), Some(c)) = (me.upgrade(), candidate)
                        && let Some(json) = candidate_json(&c)
                    {
                        // Bundled: the first media section's mid names the transport.
                        let pc = me.connection(target);
                        let mid = match pc.local_description().await {
                            Some(d) => first_mid(&d.sdp).unwrap_or("0").to_owned(),
                            None => "0".to_owned(),
                        };
                        me.send(signal::trickle(&json, &mid, target));
                    }
                })
            }));
        }
        let me = Arc::downgrade(self);
        self.publisher.on_track(Box::new(move |remote, _, transceiver| {
            let me = me.clone();
            Box::pin(async move {
                if let Some(me) = me.upgrade() {
                    me.track_arrived(remote, &transceiver).await;
                }
            })
        }));
        let me = Arc::downgrade(self);
        self.publisher.on_data_channel(Box::new(move |channel: Arc<RTCDataChannel>| {
            let me = me.clone();
            Box::pin(async move {
                let Some(p) = me.upgrade() else { return };
                let label = channel.label().to_owned();
                p.channels
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(label.clone(), channel.clone());
                let me = Arc::downgrade(&p);
                channel.on_message(Box::new(move |message: DataChannelMessage| {
                    let me = me.clone();
                    let label = label.clone();
                    Box::pin(async move {
                        if let Some(me) = me.upgrade() {
                            me.data_received(&label, message.data).await;
                        }
                    })
                }));
            })
        }));
    }

    pub fn send(&self, bytes: Vec<u8>) {
        let _ = self.signal.lock().unwrap_or_else(|e| e.into_inner()).tx.send(bytes);
    }

    /// Receives what is published without asking for it track by track.
    pub fn auto_subscribes(&self) -> bool {
        self.grant.can_subscribe && self.grant.auto_subscribe
    }

    pub fn is_publisher(&self) -> bool {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).tracks.iter().any(Track::forwarding)
    }

    /// Has announced a track (counted against the call's publisher limit).
    pub fn has_tracks(&self) -> bool {
        !self.state.lock().unwrap_or_else(|e| e.into_inner()).tracks.is_empty()
    }

    /// Whether it receives the track `track_sid` when allowed: it asked for it, or it
    /// gets everything and did not turn it down.
    pub fn wants(&self, track_sid: &str) -> bool {
        if !self.grant.can_subscribe {
            return false;
        }
        let choices = self.choices.lock().unwrap_or_else(|e| e.into_inner());
        choices.get(track_sid).copied().unwrap_or_else(|| self.auto_subscribes())
    }

    /// Whether this participant lets `subscriber` receive its track `track_sid`.
    pub fn allows(&self, subscriber: &Participant, track_sid: &str) -> bool {
        let permissions = self.permissions.lock().unwrap_or_else(|e| e.into_inner());
        let Some(permissions) = permissions.as_ref() else { return true };
        permissions.all_participants
            || permissions.track_permissions.iter().any(|p| {
                let names = p.participant_sid == subscriber.sid
                    || (!p.participant_identity.is_empty()
                        && p.participant_identity == subscriber.identity);
                names && (p.all_tracks || p.track_sids.iter().any(|t| t == track_sid))
            })
    }

    /// Whether it must hear everyone's connection quality again (once).
    pub fn take_needs_qualities(&self) -> bool {
        self.needs_qualities.swap(false, Ordering::AcqRel)
    }

    /// Notes that it was told it may not receive `track_sid` (`true`), or that it may
    /// again; answers whether that changes what it was told.
    pub fn note_denied(&self, track_sid: &str, denied: bool) -> bool {
        let mut set = self.denied.lock().unwrap_or_else(|e| e.into_inner());
        if denied { set.insert(track_sid.to_owned()) } else { set.remove(track_sid) }
    }

    /// Forgets what it chose or was told about a track that is gone.
    pub fn forget_track(&self, track_sid: &str) {
        self.choices.lock().unwrap_or_else(|e| e.into_inner()).remove(track_sid);
        self.denied.lock().unwrap_or_else(|e| e.into_inner()).remove(track_sid);
    }

    /// A receiver report from its receiving connection.
    pub fn reception_reported(&self, loss: f32, rtt: Option<Duration>) {
        self.reception.lock().unwrap_or_else(|e| e.into_inner()).add(loss, rtt);
    }

    /// Its connection quality since it was last rated, and the score that gave: the
    /// worse of what it loses publishing and what its receiving connection reports;
    /// lost while its signalling is gone.
    pub fn rate(&self) -> (lk::ConnectionQuality, f32) {
        if self.detached.load(Ordering::Acquire) {
            return (lk::ConnectionQuality::Lost, 1.0);
        }
        let (mut received, mut expected) = (0, 0);
        for forwarder in self.forwarders() {
            let (r, e) = forwarder.take_reception();
            received += r;
            expected += e;
        }
        let reception =
            std::mem::take(&mut *self.reception.lock().unwrap_or_else(|e| e.into_inner()));
        let loss = quality::loss(received, expected).max(reception.loss);
        let score = quality::score(loss, reception.rtt);
        (quality::quality(score), score)
    }

    /// What this participant asked of the track `track_sid` (defaults until it asks).
    pub fn settings_for(&self, track_sid: &str) -> TrackSettings {
        self.track_settings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(track_sid)
            .copied()
            .unwrap_or_default()
    }

    /// The id of the local track that sends `track_sid` to this participant: the sid
    /// itself the first time, a fresh id after an unsubscription (the receiving
    /// connection would otherwise try to reuse the stopped sender of that id). Clients
    /// know the track by the stream id, `<publisher>|<track sid>`, either way.
    pub fn local_track_id(&self, track_sid: &str) -> String {
        let mut received = self.received.lock().unwrap_or_else(|e| e.into_inner());
        received.1 += 1;
        if received.0.insert(track_sid.to_owned()) {
            track_sid.to_owned()
        } else {
            format!("{track_sid}~{}", received.1)
        }
    }

    pub fn set_estimate(&self, bits_per_second: f32) {
        tracing::trace!(identity = %self.identity, bits_per_second, "a receiver's estimate");
        self.estimate.store(bits_per_second.max(0.0) as u64, Ordering::Relaxed);
    }

    pub fn video_subscriptions(&self, delta: i64) {
        self.video_subscriptions.fetch_add(delta, Ordering::Relaxed);
    }

    /// One video track's share of the bandwidth the receiving connection reports.
    pub fn video_budget(&self) -> Option<u64> {
        let estimate = self.estimate.load(Ordering::Relaxed);
        let tracks = self.video_subscriptions.load(Ordering::Relaxed).max(1);
        (estimate > 0).then(|| estimate / u64::try_from(tracks).unwrap_or(1))
    }

    /// The forwarders of this participant's published tracks.
    pub fn forwarders(&self) -> Vec<Arc<Forwarder>> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.tracks.iter().filter_map(|t| t.forwarder.clone()).collect()
    }

    fn permission(&self) -> lk::ParticipantPermission {
        lk::ParticipantPermission {
            can_subscribe: self.grant.can_subscribe,
            can_publish: self.grant.can_publish,
            can_publish_data: self.grant.can_publish_data,
            can_update_metadata: self.grant.can_update_metadata,
            ..Default::default()
        }
    }

    /// What others are told about this participant: only tracks whose media flows.
    pub fn info(&self) -> lk::ParticipantInfo {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let tracks: Vec<lk::TrackInfo> =
            state.tracks.iter().filter(|t| t.forwarding()).map(|t| t.info.clone()).collect();
        lk::ParticipantInfo {
            sid: self.sid.clone(),
            identity: self.identity.clone(),
            name: state.profile.name.clone(),
            metadata: state.profile.metadata.clone(),
            attributes: state.profile.attributes.clone(),
            state: if tracks.is_empty() {
                lk::participant_info::State::Joined as i32
            } else {
                lk::participant_info::State::Active as i32
            },
            is_publisher: !tracks.is_empty(),
            tracks,
            joined_at: self.joined_ms / 1000,
            joined_at_ms: self.joined_ms,
            version: state.version,
            permission: Some(self.permission()),
            ..Default::default()
        }
    }

    /// The last word about a participant that left.
    pub fn departed_info(&self) -> lk::ParticipantInfo {
        let mut info = self.info();
        info.state = lk::participant_info::State::Disconnected as i32;
        info.version = info.version.saturating_add(1);
        info.tracks.clear();
        info
    }

    /// A new signalling connection for this session (a resume): `first` goes out first.
    pub fn reattach(self: &Arc<Self>, first: Vec<u8>) -> Session {
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = tx.send(first);
        let generation = {
            let mut signal = self.signal.lock().unwrap_or_else(|e| e.into_inner());
            signal.tx = tx;
            signal.generation += 1;
            self.detached.store(false, Ordering::Release);
            signal.generation
        };
        // What was sent while the client was away is lost with its connection: what it
        // must know of its tracks' layers and of everyone's connection is sent again.
        for forwarder in self.forwarders() {
            forwarder.resend_dynacast();
        }
        self.needs_qualities.store(true, Ordering::Release);
        Session {
            responses: rx,
            handle: SessionHandle { participant: Some(self.clone()), generation },
        }
    }

    /// After a resume the receiving connection restarts ICE with a fresh offer.
    pub async fn restart_subscriber(&self) {
        {
            let mut negotiation = self.negotiation.lock().await;
            negotiation.outstanding = false;
            negotiation.ice_restart = true;
        }
        self.negotiate_subscriber().await;
    }

    #[allow(deprecated)] // `UpdateLayers`: what clients still send
    async fn handle(self: &Arc<Self>, request: Request) -> bool {
        match request {
            Request::Offer(offer) => self.answer_offer(offer).await,
            Request::Answer(answer) => self.subscriber_answered(answer).await,
            Request::Trickle(trickle) => self.remote_candidate(trickle).await,
            Request::AddTrack(add) => self.add_track(add),
            Request::Mute(mute) => self.mute(&mute.sid, mute.muted),
            Request::Subscription(update) => self.update_subscription(update).await,
            Request::TrackSetting(settings) => self.update_track_settings(settings).await,
            Request::UpdateLayers(update) => self.update_layers(update),
            Request::SubscriptionPermission(permission) => {
                self.set_permissions(permission).await;
            }
            Request::Leave(_) => {
                self.leave().await;
                return false;
            }
            Request::Ping(_) => self.send(signal::pong(signal::now_ms())),
            Request::PingReq(ping) => {
                self.send(signal::pong_resp(ping.timestamp, signal::now_ms()));
            }
            Request::UpdateMetadata(update) => self.update_metadata(update),
            // Sync state (a migration between servers) is not acted on.
            _ => {}
        }
        true
    }

    async fn answer_offer(self: &Arc<Self>, offer: lk::SessionDescription) {
        let _one_at_a_time = self.answering.lock().await;
        let sending = sending_mids(&offer.sdp);
        let result = async {
            let offer = RTCSessionDescription::offer(offer.sdp)?;
            self.publisher.set_remote_description(offer).await?;
            self.add_early_candidates(signal::TARGET_PUBLISHER).await;
            let answer = self.publisher.create_answer(None).await?;
            self.publisher.set_local_description(answer.clone()).await?;
            Ok::<_, webrtc::Error>(answer.sdp)
        }
        .await;
        match result {
            // The answer carries the offer's id: clients wait for exactly that.
            Ok(sdp) => {
                self.send(signal::answer(sdp, offer.id));
                self.unpublish_stopped(&sending).await;
            }
            Err(e) => {
                tracing::info!(identity = %self.identity, error = %e, "a publisher offer failed")
            }
        }
    }

    async fn subscriber_answered(&self, answer: lk::SessionDescription) {
        let again = {
            let mut negotiation = self.negotiation.lock().await;
            let result = match RTCSessionDescription::answer(answer.sdp) {
                Ok(answer) => self.subscriber.set_remote_description(answer).await,
                Err(e) => Err(e),
            };
            self.add_early_candidates(signal::TARGET_SUBSCRIBER).await;
            if let Err(e) = result {
                tracing::info!(identity = %self.identity, error = %e, "a subscriber answer failed");
            }
            negotiation.outstanding = false;
            std::mem::take(&mut negotiation.again)
        };
        if again {
            self.negotiate_subscriber().await;
        }
    }

    /// Offers the receiving connection's current tracks, unless an offer is waiting for
    /// its answer (then once that comes).
    pub async fn negotiate_subscriber(&self) {
        if self.left.load(Ordering::Acquire) {
            return;
        }
        let mut negotiation = self.negotiation.lock().await;
        if negotiation.outstanding {
            negotiation.again = true;
            return;
        }
        if self.subscriber.get_transceivers().await.is_empty() {
            return;
        }
        let options =
            RTCOfferOptions { ice_restart: negotiation.ice_restart, ..Default::default() };
        let result = async {
            let offer = self.subscriber.create_offer(Some(options)).await?;
            self.subscriber.set_local_description(offer.clone()).await?;
            Ok::<_, webrtc::Error>(offer.sdp)
        }
        .await;
        match result {
            Ok(sdp) => {
                negotiation.last_id += 1;
                negotiation.outstanding = true;
                negotiation.ice_restart = false;
                self.send(signal::offer(sdp, negotiation.last_id));
            }
            Err(e) => {
                tracing::info!(identity = %self.identity, error = %e, "a subscriber offer failed")
            }
        }
    }

    async fn remote_candidate(&self, trickle: lk::TrickleRequest) {
        let Ok(init) = serde_json::from_str::<signal::CandidateInit>(&trickle.candidate_init)
        else {
            return;
        };
        if init.candidate.is_empty() {
            return;
        }
        let target = if trickle.target == signal::TARGET_SUBSCRIBER {
            signal::TARGET_SUBSCRIBER
        } else {
            signal::TARGET_PUBLISHER
        };
        let candidate = RTCIceCandidateInit {
            candidate: init.candidate,
            sdp_mid: init.sdp_mid,
            sdp_mline_index: init.sdp_m_line_index,
            username_fragment: init.username_fragment,
        };
        let pc = self.connection(target);
        if pc.remote_description().await.is_none() {
            // Candidates may overtake the offer or answer they belong to.
            let mut early = self.early_candidates.lock().unwrap_or_else(|e| e.into_inner());
            early[target as usize].push(candidate);
            return;
        }
        if let Err(e) = pc.add_ice_candidate(candidate).await {
            tracing::debug!(identity = %self.identity, error = %e, "a remote candidate was refused");
        }
    }

    fn connection(&self, target: i32) -> &Arc<RTCPeerConnection> {
        if target == signal::TARGET_SUBSCRIBER { &self.subscriber } else { &self.publisher }
    }

    /// Adds the candidates that arrived before `target`'s remote description.
    async fn add_early_candidates(&self, target: i32) {
        let early = std::mem::take(
            &mut self.early_candidates.lock().unwrap_or_else(|e| e.into_inner())[target as usize],
        );
        let pc = self.connection(target);
        for candidate in early {
            if let Err(e) = pc.add_ice_candidate(candidate).await {
                tracing::debug!(identity = %self.identity, error = %e, "an early candidate was refused");
            }
        }
    }

    #[allow(deprecated)] // layers, simulcast, DTX and stereo: what clients still read
    fn add_track(&self, add: lk::AddTrackRequest) {
        if !self.grant.can_publish {
            return;
        }
        if !self.has_tracks()
            && let (Some(room), Some(sfu)) = (self.room.upgrade(), self.sfu.upgrade())
            && sfu.settings.max_publishers > 0
            && room.publishers_besides(&self.sid) >= sfu.settings.max_publishers
        {
            tracing::info!(identity = %self.identity, room = %room.name(), "a publisher over the call's limit was refused");
            self.send(signal::refused_track(add, "the call has as many publishers as it may"));
            return;
        }
        let info = lk::TrackInfo {
            sid: ids::track(),
            r#type: add.r#type,
            name: add.name,
            muted: add.muted,
            width: add.width,
            height: add.height,
            simulcast: add.layers.len() > 1,
            disable_dtx: add.disable_dtx,
            source: add.source,
            layers: add.layers,
            stereo: add.stereo,
            disable_red: add.disable_red,
            encryption: add.encryption,
            stream: add.stream,
            ..Default::default()
        };
        let cid = add.cid;
        self.state.lock().unwrap_or_else(|e| e.into_inner()).tracks.push(Track {
            cid: cid.clone(),
            info: info.clone(),
            forwarder: None,
            mid: None,
        });
        self.send(signal::track_published(cid, info));
    }

    fn mute(&self, sid: &str, muted: bool) {
        let changed = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let Some(track) = state.tracks.iter_mut().find(|t| t.info.sid == sid) else {
                return;
            };
            let changed = track.info.muted != muted;
            track.info.muted = muted;
            if let Some(forwarder) = &track.forwarder {
                forwarder.muted.store(muted, Ordering::Relaxed);
            }
            if changed {
                state.version = state.version.saturating_add(1);
            }
            changed
        };
        if changed && let Some(room) = self.room.upgrade() {
            room.broadcast(&self.sid, &signal::update(vec![self.info()]));
        }
    }

    /// Media arrives: the first stream of a track announced by `AddTrack` (matched by
    /// the client's track id, or failing that the first waiting track of its kind) is
    /// forwarded to the call; further simulcast layers join its forwarder.
    async fn track_arrived(
        self: &Arc<Self>,
        remote: Arc<TrackRemote>,
        transceiver: &RTCRtpTransceiver,
    ) {
        let mid = transceiver.mid().map(|m| m.to_string());
        let (Some(room), Some(sfu)) = (self.room.upgrade(), self.sfu.upgrade()) else { return };
        let (forwarder, new) = match self.claim_track(&remote, mid, &sfu, &room) {
            Claim::New(forwarder) => (forwarder, true),
            Claim::Layer(forwarder) => (forwarder, false),
            Claim::Unknown => {
                forward::drain(remote).await;
                return;
            }
        };
        let me = Arc::downgrade(self);
        let layer = forwarder.clone();
        tokio::spawn(async move {
            // The last stream of a track ended: the publisher took it away.
            if layer.clone().add_layer(remote).await
                && let Some(me) = me.upgrade()
            {
                me.unpublish(&layer.track_sid).await;
            }
        });
        if new {
            if forwarder.is_video() {
                self.start_publish_cap(&sfu);
            }
            room.track_published(self, forwarder).await;
        }
    }

    /// Finds (or creates) the forwarder for arriving media.
    #[allow(deprecated)] // the announced layers: what clients still send
    fn claim_track(
        self: &Arc<Self>,
        remote: &TrackRemote,
        mid: Option<String>,
        sfu: &Sfu,
        room: &Room,
    ) -> Claim {
        let kind = match remote.kind() {
            RTPCodecType::Audio => lk::TrackType::Audio as i32,
            _ => lk::TrackType::Video as i32,
        };
        let cid = remote.id();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let found =
            state.tracks.iter().position(|t| t.cid == cid).or_else(|| {
                state.tracks.iter().position(|t| !t.forwarding() && t.info.r#type == kind)
            });
        let Some(index) = found else { return Claim::Unknown };
        if let Some(forwarder) = &state.tracks[index].forwarder {
            return Claim::Layer(forwarder.clone());
        }
        state.version = state.version.saturating_add(1);
        let track = &mut state.tracks[index];
        track.info.mime_type = remote.codec().capability.mime_type.clone();
        track.mid = mid;
        let forwarder = Forwarder::new(
            track.info.sid.clone(),
            self,
            remote,
            track.info.layers.clone(),
            Arc::downgrade(&self.publisher),
            sfu.observer(),
            room.forwarded_bytes.clone(),
        );
        forwarder.muted.store(track.info.muted, Ordering::Relaxed);
        track.forwarder = Some(forwarder.clone());
        Claim::New(forwarder)
    }

    /// Tracks whose media sections the client's latest offer no longer sends in were
    /// unpublished.
    async fn unpublish_stopped(self: &Arc<Self>, sending: &HashSet<String>) {
        let stopped: Vec<String> = {
            let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            state
                .tracks
                .iter()
                .filter(|t| t.forwarding() && t.mid.as_ref().is_some_and(|m| !sending.contains(m)))
                .map(|t| t.info.sid.clone())
                .collect()
        };
        for sid in stopped {
            self.unpublish(&sid).await;
        }
    }

    /// Takes the published track `track_sid` away from the call (once).
    pub async fn unpublish(self: &Arc<Self>, track_sid: &str) {
        // A participant that left took its tracks with it.
        if self.left.load(Ordering::Acquire) {
            return;
        }
        let removed = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let Some(index) = state.tracks.iter().position(|t| t.info.sid == track_sid) else {
                return;
            };
            state.version = state.version.saturating_add(1);
            state.tracks.remove(index).forwarder
        };
        self.send(signal::track_unpublished(track_sid));
        if let Some(room) = self.room.upgrade() {
            room.track_unpublished(self, track_sid).await;
        }
        if let Some(forwarder) = removed {
            forwarder.close().await;
        }
        tracing::info!(identity = %self.identity, track = track_sid, "track unpublished");
    }

    /// Subscribes to or unsubscribes from tracks, by their sids or their publishers'.
    async fn update_subscription(self: &Arc<Self>, update: lk::UpdateSubscription) {
        if !self.grant.can_subscribe {
            return;
        }
        let Some(room) = self.room.upgrade() else { return };
        let mut sids = update.track_sids;
        for p in update.participant_tracks {
            sids.extend(p.track_sids);
        }
        sids.sort();
        sids.dedup();
        // Only tracks that exist are remembered (and forgotten when they go).
        sids.retain(|sid| room.forwarder(sid).is_some());
        {
            let mut choices = self.choices.lock().unwrap_or_else(|e| e.into_inner());
            for sid in &sids {
                choices.insert(sid.clone(), update.subscribe);
            }
        }
        room.set_subscriptions(self, &sids, update.subscribe).await;
    }

    /// What this participant asks of tracks it receives: off, or a quality or the size
    /// it shows them at.
    async fn update_track_settings(&self, update: lk::UpdateTrackSettings) {
        let Some(room) = self.room.upgrade() else { return };
        for sid in &update.track_sids {
            let forwarder = room.forwarder(sid);
            let max_quality = match &forwarder {
                Some(f) if update.width > 0 || update.height > 0 => {
                    f.quality_for_size(update.width, update.height)
                }
                _ => layers::quality(update.quality),
            };
            let settings = TrackSettings { disabled: update.disabled, max_quality };
            self.track_settings
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(sid.clone(), settings);
            if let Some(forwarder) = forwarder {
                forwarder.apply(&self.sid, settings).await;
            }
        }
    }

    /// The layers a publisher now sends of one of its tracks.
    #[allow(deprecated)] // the track's layers: what clients still read
    fn update_layers(&self, update: lk::UpdateVideoLayers) {
        let forwarder = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let Some(track) = state.tracks.iter_mut().find(|t| t.info.sid == update.track_sid)
            else {
                return;
            };
            track.info.layers = update.layers.clone();
            track.info.simulcast = update.layers.len() > 1;
            let forwarder = track.forwarder.clone();
            state.version = state.version.saturating_add(1);
            forwarder
        };
        if let Some(forwarder) = forwarder {
            forwarder.set_layers(update.layers);
            if let Some(room) = self.room.upgrade() {
                room.broadcast(&self.sid, &signal::update(vec![self.info()]));
            }
        }
    }

    /// The participant changes its own name, metadata or attributes (an empty attribute
    /// value removes it), as its token allows; everyone, itself included, hears of it,
    /// which is how its client learns the change took.
    fn update_metadata(&self, update: lk::UpdateParticipantMetadata) {
        use lk::request_response::Reason;
        let request_id = update.request_id;
        let answer = |reason, message: &str| {
            let request = lk::request_response::Request::UpdateMetadata(update.clone());
            signal::request_answer(request_id, reason, message, request)
        };
        if !self.grant.can_update_metadata {
            self.send(answer(Reason::NotAllowed, "the token does not allow updating metadata"));
            return;
        }
        let changed = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let changed = state.profile.apply(&update);
            if changed == Ok(true) {
                state.version = state.version.saturating_add(1);
            }
            changed
        };
        match changed {
            Err((reason, message)) => self.send(answer(reason, message)),
            Ok(changed) => {
                if changed {
                    let update = signal::update(vec![self.info()]);
                    self.send(update.clone());
                    if let Some(room) = self.room.upgrade() {
                        room.broadcast(&self.sid, &update);
                    }
                }
                // After the update, as LiveKit answers: clients waiting on either see it.
                self.send(answer(Reason::Ok, ""));
            }
        }
    }

    /// Who may receive this participant's tracks: those no longer allowed lose them at
    /// once, those allowed again get them back.
    async fn set_permissions(self: &Arc<Self>, mut permission: lk::SubscriptionPermission) {
        // Each is looked through whenever one of its tracks is subscribed to.
        permission.track_permissions.truncate(MAX_PERMISSIONS);
        for p in &mut permission.track_permissions {
            p.track_sids.truncate(MAX_PERMISSIONS);
        }
        *self.permissions.lock().unwrap_or_else(|e| e.into_inner()) = Some(permission);
        if let Some(room) = self.room.upgrade() {
            room.permissions_changed(self).await;
        }
    }

    /// Tells the publisher (a REMB on its connection, which browsers honour as a ceiling)
    /// not to send more video than the call allows, for as long as it is here.
    fn start_publish_cap(self: &Arc<Self>, sfu: &Sfu) {
        let cap = sfu.settings.max_publish_bitrate;
        if cap == 0 || self.publish_cap_running.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(p) = me.upgrade() else { return };
                if p.left.load(Ordering::Acquire) {
                    return;
                }
                let ssrcs: Vec<u32> = p.forwarders().iter().flat_map(|f| f.video_ssrcs()).collect();
                if !ssrcs.is_empty() {
                    let remb = ReceiverEstimatedMaximumBitrate {
                        sender_ssrc: 0,
                        bitrate: cap as f32,
                        ssrcs,
                    };
                    let _ = p.publisher.write_rtcp(&[Box::new(remb)]).await;
                }
                drop(p);
                tokio::time::sleep(PUBLISH_CAP_INTERVAL).await;
            }
        });
    }

    #[allow(deprecated)] // the user packet's own sender fields, which older clients read
    async fn data_received(&self, label: &str, data: Bytes) {
        if !self.grant.can_publish_data {
            return;
        }
        let Ok(mut packet) = lk::DataPacket::decode(&data[..]) else { return };
        // The sender is who the SFU says it is, whatever the packet claimed.
        packet.participant_identity = self.identity.clone();
        packet.participant_sid = self.sid.clone();
        let mut to = packet.destination_identities.clone();
        if let Some(lk::data_packet::Value::User(user)) = &mut packet.value {
            user.participant_identity = self.identity.clone();
            user.participant_sid = self.sid.clone();
            to.extend(user.destination_identities.iter().cloned());
        }
        let Some(room) = self.room.upgrade() else { return };
        room.send_data(&self.sid, label, &to, Bytes::from(packet.encode_to_vec())).await;
    }

    /// Data from another participant, on the channel of the same label.
    pub async fn send_data(&self, label: &str, bytes: &Bytes) {
        let channel = self.channels.lock().unwrap_or_else(|e| e.into_inner()).get(label).cloned();
        if let Some(channel) = channel {
            let _ = channel.send(bytes).await;
        }
    }

    pub fn mark_left(&self) {
        self.left.store(true, Ordering::Release);
    }

    async fn leave(self: &Arc<Self>) {
        if let (Some(room), Some(sfu)) = (self.room.upgrade(), self.sfu.upgrade()) {
            room.remove(&sfu, self).await;
        }
    }

    pub async fn close(&self) {
        let _ = self.publisher.close().await;
        let _ = self.subscriber.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::{first_mid, sending_mids};

    #[test]
    fn an_offer_tells_which_sections_still_send() {
        let sdp = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\na=sendonly\r\n\
                   m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:1\r\na=inactive\r\n\
                   m=video 0 UDP/TLS/RTP/SAVPF 96\r\na=mid:2\r\n\
                   m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=mid:3\r\n\
                   m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=recvonly\r\na=mid:4\r\n";
        let mut mids: Vec<String> = sending_mids(sdp).into_iter().collect();
        mids.sort();
        assert_eq!(mids, ["0", "3"]);
    }

    #[test]
    fn the_first_mid_names_the_bundle() {
        let sdp = "v=0\r\na=group:BUNDLE 7 8\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:7\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:8\r\n";
        assert_eq!(first_mid(sdp), Some("7"));
        assert_eq!(first_mid("v=0\r\n"), None);
    }
}
