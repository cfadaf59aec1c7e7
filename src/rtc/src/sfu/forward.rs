//! One published track's forwarding. A track arrives as one RTP stream, or as up to
//! three simulcast layers; each subscriber has a local track that is fed from one layer
//! at a time, chosen by what it asked for and what its connection can take (see
//! [`layers`](super::layers)). Layers change only at a keyframe of the new layer, with
//! sequence numbers and timestamps rewritten to run on ([`Munger`]). Packets are
//! otherwise forwarded untouched but for their SSRC, payload type and header extensions
//! (whose ids belong to the publisher's connection), so encrypted frames pass.
//! Subscribers' picture-loss reports become keyframe requests to the publisher;
//! retransmissions are answered from each subscriber connection's packet cache. The
//! publisher is told which layers anyone receives (dynacast), so that it can pause the
//! others.

use std::{
    sync::{
        Arc, Mutex, RwLock, Weak,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use livekit_protocol as lk;
use webrtc::{
    peer_connection::RTCPeerConnection,
    rtcp::payload_feedbacks::{
        full_intra_request::FullIntraRequest, picture_loss_indication::PictureLossIndication,
        receiver_estimated_maximum_bitrate::ReceiverEstimatedMaximumBitrate,
    },
    rtcp::receiver_report::ReceiverReport,
    rtp_transceiver::{
        rtp_codec::{RTCRtpCodecCapability, RTPCodecType},
        rtp_sender::RTCRtpSender,
    },
    track::{
        track_local::{TrackLocal, TrackLocalWriter, track_local_static_rtp::TrackLocalStaticRTP},
        track_remote::TrackRemote,
    },
};

use super::{
    SfuObserver, congestion,
    layers::{self, LayerView, Quality, Wants},
    munge::Munger,
    packet::{self, VideoCodec},
    participant::Participant,
    speakers::Meter,
};

const AUDIO_LEVEL_URI: &str = "urn:ietf:params:rtp-hdrext:ssrc-audio-level";
/// A layer with no packet for this long is taken as stopped (the publisher dropped it).
const LAYER_TIMEOUT: Duration = Duration::from_millis(1500);
/// How often layer choices are looked at again (estimates and layers change).
const RETARGET_INTERVAL: Duration = Duration::from_millis(500);
/// Keyframe requests for one layer are at most this frequent.
const KEYFRAME_REQUEST_GAP: Duration = Duration::from_millis(500);
/// A publisher is told to pause layers only once nobody has wanted them for this long,
/// so that a subscriber changing its mind (or reconnecting) does not stop and restart
/// them; more layers are asked for at once.
const DYNACAST_PAUSE_DELAY: Duration = Duration::from_secs(3);

/// Receivers one task writes a packet to; more are shared among tasks on every core.
const RECEIVERS_PER_TASK: usize = 32;

static PARALLELISM: std::sync::LazyLock<usize> =
    std::sync::LazyLock::new(|| std::thread::available_parallelism().map_or(1, |n| n.get()));

/// A packet on its way to the receivers, with what choosing them needs.
struct Outgoing {
    packet: webrtc::rtp::packet::Packet,
    quality: Quality,
    keyframe: bool,
    video: bool,
    arrived: Instant,
}

/// What a subscriber asked of one track (`UpdateTrackSettings`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrackSettings {
    pub disabled: bool,
    pub max_quality: Quality,
}

impl Default for TrackSettings {
    fn default() -> Self {
        Self { disabled: false, max_quality: layers::HIGH }
    }
}

struct Layer {
    quality: Quality,
    remote: Arc<TrackRemote>,
    /// Milliseconds after the forwarder's start of the last packet (0: none yet).
    last_packet_ms: AtomicU64,
    keyframe_asked: Mutex<Option<Instant>>,
}

struct DownState {
    /// The layer being sent; `None` before the first packet and while disabled.
    current: Option<Quality>,
    /// The layer wanted; changed to at its next keyframe.
    target: Option<Quality>,
    settings: TrackSettings,
    munger: Munger,
}

struct Downtrack {
    subscriber: Weak<Participant>,
    subscriber_sid: String,
    track: Arc<TrackLocalStaticRTP>,
    sender: Arc<RTCRtpSender>,
    state: Mutex<DownState>,
}

impl Downtrack {
    fn state(&self) -> std::sync::MutexGuard<'_, DownState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What the publisher was last told of its layers (dynacast).
struct Dynacast {
    /// The highest layer anyone receives, with all below it; `None`: nothing is.
    told: Option<Quality>,
    /// Since when fewer layers have been wanted than told.
    fewer_since: Option<Instant>,
}

impl Dynacast {
    /// `wanted` is now the highest layer wanted: whether to tell the publisher (more
    /// layers at once, fewer after [`DYNACAST_PAUSE_DELAY`]).
    fn update(&mut self, wanted: Option<Quality>, now: Instant) -> bool {
        let tell = if wanted > self.told {
            true
        } else if wanted < self.told {
            let since = *self.fewer_since.get_or_insert(now);
            now.duration_since(since) >= DYNACAST_PAUSE_DELAY
        } else {
            self.fewer_since = None;
            false
        };
        if tell {
            self.told = wanted;
            self.fewer_since = None;
        }
        tell
    }
}

pub(crate) struct Forwarder {
    pub track_sid: String,
    pub publisher_sid: String,
    publisher: Weak<Participant>,
    kind: RTPCodecType,
    codec: VideoCodec,
    capability: RTCRtpCodecCapability,
    /// The layers the publisher announced (sizes, bitrates, stream ids).
    declared: RwLock<Vec<lk::VideoLayer>>,
    dynacast: Mutex<Dynacast>,
    /// Packets that arrived, and that should have (by sequence number), since the last
    /// [`Self::take_reception`]: the publisher's loss.
    received: AtomicU64,
    expected: AtomicU64,
    /// The share of the publisher's packets lost over the last rating (`f32` bits):
    /// receivers see those gaps too, and are not to blame for them.
    upstream_loss: AtomicU32,
    layers: RwLock<Vec<Arc<Layer>>>,
    publisher_pc: Weak<RTCPeerConnection>,
    downtracks: RwLock<Arc<Vec<Arc<Downtrack>>>>,
    observer: Arc<dyn SfuObserver>,
    /// The call's count of forwarded bytes.
    room_bytes: Arc<AtomicU64>,
    started: Instant,
    /// The loudness of an audio track, for active speakers.
    pub meter: Option<Meter>,
    /// Muted by its publisher: not a speaker whatever its packets say.
    pub muted: AtomicBool,
    closed: AtomicBool,
}

impl Forwarder {
    /// A forwarder for the track whose first stream is `remote`; call [`Self::add_layer`]
    /// with it (and each further simulcast layer).
    pub fn new(
        track_sid: String,
        publisher: &Arc<Participant>,
        remote: &TrackRemote,
        declared: Vec<lk::VideoLayer>,
        publisher_pc: Weak<RTCPeerConnection>,
        observer: Arc<dyn SfuObserver>,
        room_bytes: Arc<AtomicU64>,
    ) -> Arc<Self> {
        let kind = remote.kind();
        let capability = remote.codec().capability;
        let me = Arc::new(Self {
            track_sid,
            publisher_sid: publisher.sid.clone(),
            publisher: Arc::downgrade(publisher),
            kind,
            codec: VideoCodec::from_mime(&capability.mime_type),
            capability,
            declared: RwLock::new(declared),
            // Publishers start sending every layer.
            dynacast: Mutex::new(Dynacast { told: Some(layers::HIGH), fewer_since: None }),
            received: AtomicU64::new(0),
            expected: AtomicU64::new(0),
            upstream_loss: AtomicU32::new(0),
            layers: RwLock::new(Vec::new()),
            publisher_pc,
            downtracks: RwLock::new(Arc::new(Vec::new())),
            observer,
            room_bytes,
            started: Instant::now(),
            meter: (kind == RTPCodecType::Audio).then(Meter::default),
            muted: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        });
        if kind == RTPCodecType::Video {
            tokio::spawn(retarget_loop(Arc::downgrade(&me)));
        }
        me
    }

    pub fn is_video(&self) -> bool {
        self.kind == RTPCodecType::Video
    }

    fn declared(&self) -> std::sync::RwLockReadGuard<'_, Vec<lk::VideoLayer>> {
        self.declared.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The layers the publisher now says it sends (`UpdateVideoLayers`).
    pub fn set_layers(&self, declared: Vec<lk::VideoLayer>) {
        *self.declared.write().unwrap_or_else(|p| p.into_inner()) = declared;
        self.retarget();
    }

    /// Whether `subscriber_sid` receives this track.
    pub fn has_subscriber(&self, subscriber_sid: &str) -> bool {
        self.snapshot().iter().any(|d| d.subscriber_sid == subscriber_sid)
    }

    /// Packets received and expected since the last call (the publisher's rating).
    pub fn take_reception(&self) -> (u64, u64) {
        let counts =
            (self.received.swap(0, Ordering::Relaxed), self.expected.swap(0, Ordering::Relaxed));
        let loss = super::quality::loss(counts.0, counts.1);
        self.upstream_loss.store(loss.to_bits(), Ordering::Relaxed);
        counts
    }

    fn upstream_loss(&self) -> f32 {
        f32::from_bits(self.upstream_loss.load(Ordering::Relaxed))
    }

    /// The SSRCs of a video track's streams (none for audio).
    pub fn video_ssrcs(&self) -> Vec<u32> {
        if !self.is_video() {
            return Vec::new();
        }
        let layers = self.layers.read().unwrap_or_else(|p| p.into_inner());
        layers.iter().map(|l| l.remote.ssrc()).collect()
    }

    /// Forwards a stream of this track (its only one, or a simulcast layer) until it
    /// ends; `true` when it was the last of the track's streams still running.
    pub async fn add_layer(self: Arc<Self>, remote: Arc<TrackRemote>) -> bool {
        let quality = if self.is_video() {
            layers::quality_of_rid(remote.rid(), &self.declared())
        } else {
            layers::HIGH
        };
        let layer = Arc::new(Layer {
            quality,
            remote,
            last_packet_ms: AtomicU64::new(0),
            keyframe_asked: Mutex::new(None),
        });
        let duplicate = {
            let mut list = self.layers.write().unwrap_or_else(|p| p.into_inner());
            let duplicate = list.iter().any(|l| l.quality == quality);
            if !duplicate {
                list.push(layer.clone());
            }
            duplicate
        };
        if duplicate {
            tracing::debug!(track = %self.track_sid, quality, "a second stream of one layer is dropped");
            drain(layer.remote.clone()).await;
            return false;
        }
        self.retarget();
        self.run(&layer).await;
        let mut list = self.layers.write().unwrap_or_else(|p| p.into_inner());
        list.retain(|l| !Arc::ptr_eq(l, &layer));
        list.is_empty()
    }

    fn layer(&self, quality: Quality) -> Option<Arc<Layer>> {
        self.layers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|l| l.quality == quality)
            .cloned()
    }

    fn snapshot(&self) -> Arc<Vec<Arc<Downtrack>>> {
        self.downtracks.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn replace(&self, f: impl FnOnce(&mut Vec<Arc<Downtrack>>)) {
        let mut guard = self.downtracks.write().unwrap_or_else(|p| p.into_inner());
        let mut list = guard.as_ref().clone();
        f(&mut list);
        *guard = Arc::new(list);
    }

    /// Adds `subscriber`'s local track for this one to its receiving connection (the
    /// caller renegotiates); answers whether it was added (not there already).
    pub async fn subscribe(self: &Arc<Self>, subscriber: &Arc<Participant>) -> bool {
        if self.has_subscriber(&subscriber.sid) {
            return false;
        }
        // The stream id tells the client whose track this is: `<participant>|<track>`.
        let track = Arc::new(TrackLocalStaticRTP::new(
            self.capability.clone(),
            subscriber.local_track_id(&self.track_sid),
            format!("{}|{}", self.publisher_sid, self.track_sid),
        ));
        let local: Arc<dyn TrackLocal + Send + Sync> = track.clone();
        let sender = match subscriber.subscriber.add_track(local).await {
            Ok(sender) => sender,
            Err(e) => {
                tracing::warn!(error = %e, track = %self.track_sid, "adding a forwarded track failed");
                return false;
            }
        };
        let settings = subscriber.settings_for(&self.track_sid);
        let downtrack = Arc::new(Downtrack {
            subscriber: Arc::downgrade(subscriber),
            subscriber_sid: subscriber.sid.clone(),
            track,
            sender: sender.clone(),
            state: Mutex::new(DownState {
                current: None,
                target: None,
                settings,
                munger: Munger::new(self.capability.clock_rate),
            }),
        });
        // Another subscription of the same subscriber may have finished meanwhile.
        let mut added = false;
        self.replace(|list| {
            if !list.iter().any(|d| d.subscriber_sid == subscriber.sid) {
                list.push(downtrack.clone());
                added = true;
            }
        });
        if !added {
            let _ = subscriber.subscriber.remove_track(&sender).await;
            return false;
        }
        if self.is_video() {
            subscriber.video_subscriptions(1);
        }
        self.update_dynacast();
        self.retarget_one(&downtrack);
        // A new subscriber can decode from the next keyframe: one is asked for now.
        self.keyframe_for(&downtrack).await;
        // The subscriber's reports: a lost picture is asked of the publisher again, and
        // its bandwidth estimate sets the layers it gets.
        let me = Arc::downgrade(self);
        let subscriber = Arc::downgrade(subscriber);
        tokio::spawn(async move {
            while let Ok((packets, _)) = sender.read_rtcp().await {
                let Some(me) = me.upgrade() else { return };
                for p in &packets {
                    let any = p.as_any();
                    if any.is::<PictureLossIndication>() || any.is::<FullIntraRequest>() {
                        me.keyframe_for(&downtrack).await;
                    } else if let Some(remb) = any.downcast_ref::<ReceiverEstimatedMaximumBitrate>()
                        && let Some(s) = subscriber.upgrade()
                    {
                        me.observer.estimate(congestion::is_send_side(remb));
                        s.set_estimate(remb.bitrate);
                    } else if let Some(rr) = any.downcast_ref::<ReceiverReport>() {
                        for report in &rr.reports {
                            let loss = f32::from(report.fraction_lost) / 256.0;
                            let rtt = round_trip(report.last_sender_report, report.delay);
                            me.observer.receiver_report(loss, rtt);
                            if let Some(s) = subscriber.upgrade() {
                                s.reception_reported((loss - me.upstream_loss()).max(0.0), rtt);
                            }
                        }
                    }
                }
            }
        });
        true
    }

    /// Takes `subscriber_sid`'s local track out of the list: its connection is closing,
    /// or it unsubscribed (then the sender it must remove is returned).
    pub fn forget(&self, subscriber_sid: &str) -> Option<Arc<RTCRtpSender>> {
        let mut gone = None;
        self.replace(|list| {
            if let Some(i) = list.iter().position(|d| d.subscriber_sid == subscriber_sid) {
                gone = Some(list.remove(i));
            }
        });
        let gone = gone?;
        self.update_dynacast();
        if self.is_video()
            && let Some(s) = gone.subscriber.upgrade()
        {
            s.video_subscriptions(-1);
        }
        Some(gone.sender.clone())
    }

    /// Applies a subscriber's settings for this track.
    pub async fn apply(&self, subscriber_sid: &str, settings: TrackSettings) {
        let Some(downtrack) =
            self.snapshot().iter().find(|d| d.subscriber_sid == subscriber_sid).cloned()
        else {
            return;
        };
        {
            let mut state = downtrack.state();
            state.settings = settings;
            if settings.disabled {
                // Sending resumes at a keyframe of the layer then chosen, the numbering
                // continued.
                state.current = None;
            }
        }
        self.update_dynacast();
        self.retarget_one(&downtrack);
        if !settings.disabled {
            self.keyframe_for(&downtrack).await;
        }
    }

    /// The highest quality any subscriber wants (`None`: nobody receives the track).
    fn wanted(&self) -> Option<Quality> {
        self.snapshot()
            .iter()
            .filter_map(|d| {
                let state = d.state();
                (!state.settings.disabled).then_some(state.settings.max_quality)
            })
            .max()
    }

    /// Tells the publisher which layers are wanted when that changed: more at once,
    /// fewer after [`DYNACAST_PAUSE_DELAY`].
    fn update_dynacast(&self) {
        if !self.is_video() || self.closed.load(Ordering::Acquire) {
            return;
        }
        let wanted = self.wanted();
        let tell =
            self.dynacast.lock().unwrap_or_else(|p| p.into_inner()).update(wanted, Instant::now());
        if tell {
            tracing::debug!(track = %self.track_sid, ?wanted, "dynacast: the publisher is told the layers wanted");
            self.tell_layers(wanted);
        }
    }

    /// Tells the publisher again what it was last told (it resumed, and what was sent
    /// meanwhile was lost).
    pub fn resend_dynacast(&self) {
        if !self.is_video() {
            return;
        }
        let told = self.dynacast.lock().unwrap_or_else(|p| p.into_inner()).told;
        self.tell_layers(told);
    }

    /// Tells the publisher the highest layer anyone receives (`None`: none).
    fn tell_layers(&self, max: Option<Quality>) {
        if let Some(publisher) = self.publisher() {
            let codec = self.codec_name();
            publisher.send(super::signal::subscribed_qualities(&self.track_sid, &codec, max));
        }
    }

    /// The participant publishing this track, while it is here.
    pub fn publisher(&self) -> Option<Arc<Participant>> {
        self.publisher.upgrade()
    }

    /// The codec as LiveKit names it (`vp8`, `h264`, ...).
    fn codec_name(&self) -> String {
        let mime = &self.capability.mime_type;
        mime.split_once('/').map_or(mime.as_str(), |(_, name)| name).to_ascii_lowercase()
    }

    /// The quality a subscriber showing this track at `width` x `height` needs.
    pub fn quality_for_size(&self, width: u32, height: u32) -> Quality {
        layers::quality_for_size(&self.declared(), width, height)
    }

    fn layer_views(&self) -> Vec<LayerView> {
        let now_ms = self.now_ms();
        let timeout = LAYER_TIMEOUT.as_millis() as u64;
        let declared = self.declared();
        self.layers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|l| {
                let last = l.last_packet_ms.load(Ordering::Relaxed);
                LayerView {
                    quality: l.quality,
                    bitrate: declared
                        .iter()
                        .find(|d| layers::quality(d.quality) == l.quality)
                        .map_or(0, |d| d.bitrate),
                    live: last != 0 && now_ms.saturating_sub(last) < timeout,
                }
            })
            .collect()
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX).max(1)
    }

    fn retarget_one(&self, downtrack: &Downtrack) {
        self.retarget_with(&self.layer_views(), downtrack);
    }

    fn retarget_with(&self, views: &[LayerView], downtrack: &Downtrack) {
        if !self.is_video() {
            // Audio has one stream, sent whenever it flows (silences pause it).
            if let Some(layer) = views.first() {
                downtrack.state().target = Some(layer.quality);
            }
            return;
        }
        let budget = downtrack.subscriber.upgrade().and_then(|s| s.video_budget());
        let mut state = downtrack.state();
        // A codec whose keyframes cannot be told stays on the layer it started with.
        if !self.codec.switchable() && state.target.is_some() {
            return;
        }
        let wants = Wants { max_quality: state.settings.max_quality, budget };
        if let Some(target) = layers::choose(views, wants, state.current) {
            state.target = Some(target);
        }
    }

    /// Chooses every subscriber's layer again.
    fn retarget(&self) {
        let views = self.layer_views();
        for downtrack in self.snapshot().iter() {
            self.retarget_with(&views, downtrack);
        }
    }

    /// Asks the publisher for a keyframe of the layer `downtrack` is on or going to.
    async fn keyframe_for(&self, downtrack: &Downtrack) {
        let quality = {
            let state = downtrack.state();
            state.target.or(state.current)
        };
        if let Some(layer) = quality.and_then(|q| self.layer(q)) {
            self.request_keyframe(&layer).await;
        }
    }

    /// Asks the publisher for a keyframe of `layer`, so that a new, switching or lossy
    /// subscriber can decode; at most every [`KEYFRAME_REQUEST_GAP`].
    async fn request_keyframe(&self, layer: &Layer) {
        if !self.is_video() {
            return;
        }
        {
            let mut asked = layer.keyframe_asked.lock().unwrap_or_else(|p| p.into_inner());
            if asked.is_some_and(|at| at.elapsed() < KEYFRAME_REQUEST_GAP) {
                return;
            }
            *asked = Some(Instant::now());
        }
        let Some(pc) = self.publisher_pc.upgrade() else { return };
        let pli = PictureLossIndication { sender_ssrc: 0, media_ssrc: layer.remote.ssrc() };
        let _ = pc.write_rtcp(&[Box::new(pli)]).await;
    }

    /// Writes a packet to every receiver. Past [`RECEIVERS_PER_TASK`] receivers the
    /// writes (each encrypts for its own connection) are shared among tasks that run on
    /// every core; the next packet waits for all of them, so that each receiver gets the
    /// packets in order. Answers the packets and bytes sent.
    async fn fan_out(
        self: &Arc<Self>,
        downtracks: &Arc<Vec<Arc<Downtrack>>>,
        out: &Arc<Outgoing>,
    ) -> (u64, u64) {
        let shares = downtracks.len().div_ceil(RECEIVERS_PER_TASK).min(*PARALLELISM);
        if shares <= 1 {
            return self.write_to(downtracks, out).await;
        }
        let per_share = downtracks.len().div_ceil(shares);
        // Rounding up may leave fewer shares than asked for.
        let shares = downtracks.len().div_ceil(per_share);
        let mut tasks = Vec::with_capacity(shares - 1);
        for share in 1..shares {
            let (me, list, out) = (self.clone(), downtracks.clone(), out.clone());
            tasks.push(tokio::spawn(async move {
                let end = ((share + 1) * per_share).min(list.len());
                me.write_to(&list[share * per_share..end], &out).await
            }));
        }
        let (mut packets, mut bytes) = self.write_to(&downtracks[..per_share], out).await;
        for task in tasks {
            if let Ok((p, b)) = task.await {
                packets += p;
                bytes += b;
            }
        }
        (packets, bytes)
    }

    /// Writes a packet to each of `share`, rewritten for each receiver's layer.
    async fn write_to(&self, share: &[Arc<Downtrack>], out: &Outgoing) -> (u64, u64) {
        let mut packet = out.packet.clone();
        let (seq, ts) = (packet.header.sequence_number, packet.header.timestamp);
        let size = packet.payload.len() as u64;
        let quality = out.quality;
        let (mut packets, mut bytes) = (0, 0);
        for downtrack in share {
            let rewritten = {
                let mut state = downtrack.state();
                if state.settings.disabled {
                    None
                } else if state.current == Some(quality) {
                    Some(state.munger.rewrite(seq, ts, false, out.arrived))
                } else if state.target == Some(quality)
                    && (out.keyframe || !out.video || !self.codec.switchable())
                {
                    tracing::debug!(track = %self.track_sid, subscriber = %downtrack.subscriber_sid, quality, "layer switched");
                    state.current = Some(quality);
                    Some(state.munger.rewrite(seq, ts, true, out.arrived))
                } else {
                    None
                }
            };
            if let Some((seq, ts)) = rewritten {
                packet.header.sequence_number = seq;
                packet.header.timestamp = ts;
                match downtrack.track.write_rtp(&packet).await {
                    Ok(_) => {
                        packets += 1;
                        bytes += size;
                    }
                    Err(e) => {
                        tracing::trace!(error = %e, subscriber = %downtrack.subscriber_sid, "a forwarded packet was not sent")
                    }
                }
            }
        }
        (packets, bytes)
    }

    /// Forwards one stream until it ends.
    async fn run(self: &Arc<Self>, layer: &Layer) {
        let audio_level_id = layer
            .remote
            .params()
            .header_extensions
            .iter()
            .find(|e| e.uri == AUDIO_LEVEL_URI)
            .and_then(|e| u8::try_from(e.id).ok());
        let quality = layer.quality;
        let video = self.is_video();
        let mut packets = 0u64;
        let mut bytes = 0u64;
        let mut sequence = super::quality::Sequence::default();
        let timeout = LAYER_TIMEOUT.as_millis() as u64;
        while let Ok((mut packet, _)) = layer.remote.read_rtp().await {
            let arrived = Instant::now();
            let now_ms = self.now_ms();
            let last = layer.last_packet_ms.swap(now_ms, Ordering::Relaxed);
            if last == 0 || now_ms.saturating_sub(last) >= timeout {
                // The layer is live from now (or again, after a pause): subscribers may
                // be waiting for it.
                self.retarget();
            }
            let expected = sequence.advance(packet.header.sequence_number);
            self.expected.fetch_add(expected, Ordering::Relaxed);
            self.received.fetch_add(1, Ordering::Relaxed);
            if let (Some(meter), Some(id)) = (&self.meter, audio_level_id)
                && let Some(level) =
                    packet.header.get_extension(id).and_then(|e| packet::audio_level(&e))
            {
                meter.observe(level);
            }
            let keyframe = video && self.codec.starts_keyframe(&packet.payload);
            // The publisher's extension ids mean other things on a subscriber's
            // connection, which stamps its own.
            packet.header.extension = false;
            packet.header.extensions.clear();
            packet.header.extensions_padding = 0;
            let downtracks = self.snapshot();
            let out = Arc::new(Outgoing { packet, quality, keyframe, video, arrived });
            let (sent, sent_bytes) = self.fan_out(&downtracks, &out).await;
            packets += sent;
            bytes += sent_bytes;
            if !downtracks.is_empty() {
                self.observer.forward_time(arrived.elapsed());
            }
            if packets >= 256 {
                self.count(packets, bytes);
                (packets, bytes) = (0, 0);
            }
        }
        self.count(packets, bytes);
    }

    fn count(&self, packets: u64, bytes: u64) {
        self.observer.forwarded(packets, bytes);
        self.room_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Takes the track away from every subscriber (its publisher left or unpublished).
    pub async fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let list = self.snapshot();
        self.replace(Vec::clear);
        for downtrack in list.iter() {
            if let Some(subscriber) = downtrack.subscriber.upgrade() {
                if self.is_video() {
                    subscriber.video_subscriptions(-1);
                }
                let _ = subscriber.subscriber.remove_track(&downtrack.sender).await;
                subscriber.negotiate_subscriber().await;
            }
        }
    }
}

/// The round trip a receiver report tells (RFC 3550 6.4.1): now less the time of the
/// sender report it answers (`lsr`) less how long the receiver held it (`dlsr`), all in
/// 1/65536 s of the NTP clock's middle 32 bits. `None` before any sender report.
fn round_trip(lsr: u32, dlsr: u32) -> Option<Duration> {
    if lsr == 0 {
        return None;
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).ok()?;
    // NTP counts from 1900; its middle 32 bits are 16 of seconds and 16 of fraction.
    let ntp_seconds = now.as_secs() + 2_208_988_800;
    let fraction = (u64::from(now.subsec_nanos()) << 16) / 1_000_000_000;
    let middle = (((ntp_seconds & 0xffff) << 16) | fraction) as u32;
    let units = middle.wrapping_sub(lsr).wrapping_sub(dlsr);
    // A reading over a minute is a clock or report error.
    (units < 60 << 16).then(|| Duration::from_micros(u64::from(units) * 1_000_000 / 65_536))
}

/// Chooses layers again every [`RETARGET_INTERVAL`] until the forwarder closes, and
/// asks for a keyframe for subscribers waiting to switch.
async fn retarget_loop(forwarder: Weak<Forwarder>) {
    loop {
        tokio::time::sleep(RETARGET_INTERVAL).await;
        let Some(me) = forwarder.upgrade() else { return };
        if me.closed.load(Ordering::Acquire) {
            return;
        }
        me.retarget();
        me.update_dynacast();
        for downtrack in me.snapshot().iter() {
            let waiting = {
                let state = downtrack.state();
                !state.settings.disabled && state.target.is_some() && state.target != state.current
            };
            if waiting {
                me.keyframe_for(downtrack).await;
            }
        }
    }
}

/// Reads and drops a stream that is not forwarded, so that its buffers do not fill.
pub async fn drain(remote: Arc<TrackRemote>) {
    while remote.read_rtp().await.is_ok() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_trip_is_read_from_a_receiver_report() {
        assert_eq!(round_trip(0, 0), None);
        // A sender report sent 150 ms ago (in NTP middle-32 units), held 100 ms by the
        // receiver: 50 ms.
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
        let ntp = now.as_secs() + 2_208_988_800;
        let middle = (((ntp & 0xffff) << 16)
            | ((u64::from(now.subsec_nanos()) << 16) / 1_000_000_000)) as u32;
        let lsr = middle.wrapping_sub(65_536 * 150 / 1000);
        let rtt = round_trip(lsr, 65_536 / 10).unwrap();
        assert!(rtt >= Duration::from_millis(45) && rtt < Duration::from_millis(100), "{rtt:?}");
        // A report from the future is refused, not a huge round trip.
        assert_eq!(round_trip(middle.wrapping_add(65_536), 0), None);
    }

    #[test]
    fn dynacast_asks_for_more_at_once_and_pauses_only_after_a_while() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut d = Dynacast { told: Some(layers::HIGH), fewer_since: None };
        assert!(!d.update(Some(layers::HIGH), at(0)));
        // Nobody receives it: paused only after the delay, and told once.
        assert!(!d.update(None, at(100)));
        assert!(!d.update(None, at(3000)));
        assert!(d.update(None, at(3100)));
        assert_eq!(d.told, None);
        assert!(!d.update(None, at(9000)));
        // A subscriber comes: at once.
        assert!(d.update(Some(layers::LOW), at(9100)));
        assert_eq!(d.told, Some(layers::LOW));
        // Fewer wanted for a moment only: nothing is paused, and the wait starts over.
        assert!(d.update(Some(layers::HIGH), at(9200)));
        assert!(!d.update(Some(layers::LOW), at(9300)));
        assert!(!d.update(Some(layers::HIGH), at(10000)));
        assert!(!d.update(Some(layers::LOW), at(12000)));
        assert!(!d.update(Some(layers::LOW), at(14000)));
        assert!(d.update(Some(layers::LOW), at(15000)));
    }
}
