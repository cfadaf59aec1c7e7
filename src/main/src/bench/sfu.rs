//! `trellis bench sfu-live`: a live stream through the built-in SFU. One publisher and
//! `viewers` viewers, all in this process on WebRTC's Rust stack, speak LiveKit's
//! signalling to the server as its clients do (tokens from the server's own token
//! service). The publisher sends synthetic VP8-framed video at `kbps` (30 frames a
//! second, a keyframe every two seconds or when asked) and Opus-sized audio; nothing is
//! encoded or decoded, so the load generator's cost is the transport's and a 2-core
//! machine can hold hundreds of viewers. Each packet carries its send time, so viewers
//! measure the delay from publisher to viewer through the SFU, and sequence gaps give
//! loss. Reports viewers connected and receiving, delivery per viewer, loss, the delay
//! percentiles, forwarded Mbit/s and (with `--server-pid`) the server's CPU.

use std::{
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use clap::Args;
use futures_util::{SinkExt, StreamExt};
use livekit_protocol as lk;
use prost::Message as _;
use reqwest::Method;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use webrtc::{
    api::{
        API, APIBuilder, interceptor_registry::register_default_interceptors,
        media_engine::MediaEngine, setting_engine::SettingEngine,
    },
    ice_transport::ice_candidate::RTCIceCandidateInit,
    interceptor::registry::Registry,
    peer_connection::{
        RTCPeerConnection, configuration::RTCConfiguration,
        peer_connection_state::RTCPeerConnectionState,
        sdp::session_description::RTCSessionDescription,
    },
    rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication,
    rtp::{header::Header, packet::Packet},
    rtp_transceiver::rtp_codec::RTCRtpCodecCapability,
    track::track_local::{
        TrackLocal, TrackLocalWriter, track_local_static_rtp::TrackLocalStaticRTP,
    },
};

use super::{Api, Common, ServerProbe, join_all, round2, summary};

#[derive(Args)]
pub struct SfuLiveArgs {
    #[command(flatten)]
    pub common: Common,
    /// Viewers of the one publisher.
    #[arg(long, default_value_t = 100)]
    pub viewers: usize,
    /// The publisher's video bitrate, kbit/s.
    #[arg(long, default_value_t = 500)]
    pub kbps: u64,
    /// Length of the measured phase in seconds (after every viewer has connected).
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
    /// Viewers connecting at once.
    #[arg(long, default_value_t = 10)]
    pub connect_concurrency: usize,
    /// The local address the clients' media uses (default: the default route's, where
    /// the SFU advertises itself).
    #[arg(long)]
    pub media_ip: Option<IpAddr>,
}

const FPS: u64 = 30;
const PAYLOAD_MAX: usize = 1100;
const KEYFRAME_EVERY: u64 = 2 * FPS;
/// Publisher signalling and media setup, and each viewer's, must finish within this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

fn build_api(ip: IpAddr) -> Result<API, String> {
    let mut media = MediaEngine::default();
    media.register_default_codecs().map_err(|e| e.to_string())?;
    let registry =
        register_default_interceptors(Registry::new(), &mut media).map_err(|e| e.to_string())?;
    let mut engine = SettingEngine::default();
    engine.set_ip_filter(Box::new(move |candidate| candidate == ip));
    engine.set_include_loopback_candidate(ip.is_loopback());
    Ok(APIBuilder::new()
        .with_media_engine(media)
        .with_interceptor_registry(registry)
        .with_setting_engine(engine)
        .build())
}

/// One client's signalling: protobuf messages over the SFU's WebSocket.
struct Signal {
    out: mpsc::UnboundedSender<Vec<u8>>,
    incoming: mpsc::UnboundedReceiver<lk::signal_response::Message>,
}

impl Signal {
    async fn connect(url: &str, token: &str, auto_subscribe: bool) -> Result<Self, String> {
        let auto = u8::from(auto_subscribe);
        let address = format!(
            "{url}/rtc?access_token={token}&auto_subscribe={auto}&protocol=17&sdk=trellis-bench"
        );
        let (socket, _) = tokio_tungstenite::connect_async(address.as_str())
            .await
            .map_err(|e| format!("signalling: {e}"))?;
        let (mut sink, mut stream) = socket.split();
        let (out, mut to_send) = mpsc::unbounded_channel::<Vec<u8>>();
        let (deliver, incoming) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(bytes) = to_send.recv().await {
                if sink.send(Message::Binary(bytes.into())).await.is_err() {
                    return;
                }
            }
        });
        tokio::spawn(async move {
            while let Some(Ok(message)) = stream.next().await {
                if let Message::Binary(bytes) = message
                    && let Ok(response) = lk::SignalResponse::decode(&bytes[..])
                    && let Some(m) = response.message
                    && deliver.send(m).is_err()
                {
                    return;
                }
            }
        });
        Ok(Self { out, incoming })
    }

    fn send(&self, message: lk::signal_request::Message) {
        send(&self.out, message);
    }
}

fn send(out: &mpsc::UnboundedSender<Vec<u8>>, message: lk::signal_request::Message) {
    let _ = out.send(lk::SignalRequest { message: Some(message) }.encode_to_vec());
}

/// Sends this connection's candidates to the SFU as they are found.
fn trickle_out(pc: &RTCPeerConnection, out: mpsc::UnboundedSender<Vec<u8>>, target: i32) {
    pc.on_ice_candidate(Box::new(move |candidate| {
        let out = out.clone();
        Box::pin(async move {
            if let Some(c) = candidate.and_then(|c| c.to_json().ok()) {
                let init = json!({
                    "candidate": c.candidate,
                    "sdpMid": c.sdp_mid,
                    "sdpMLineIndex": c.sdp_mline_index,
                });
                send(
                    &out,
                    lk::signal_request::Message::Trickle(lk::TrickleRequest {
                        candidate_init: init.to_string(),
                        target,
                        r#final: false,
                    }),
                );
            }
        })
    }));
}

async fn add_candidate(pc: &RTCPeerConnection, trickle: &lk::TrickleRequest) {
    let Ok(init) = serde_json::from_str::<Value>(&trickle.candidate_init) else { return };
    let Some(candidate) = init["candidate"].as_str() else { return };
    let _ = pc
        .add_ice_candidate(RTCIceCandidateInit {
            candidate: candidate.to_owned(),
            sdp_mid: init["sdpMid"].as_str().map(str::to_owned),
            sdp_mline_index: init["sdpMLineIndex"].as_u64().and_then(|i| u16::try_from(i).ok()),
            username_fragment: None,
        })
        .await;
}

/// Waits until `pc` is connected.
async fn connected(pc: &RTCPeerConnection) -> Result<(), String> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    pc.on_peer_connection_state_change(Box::new(move |state| {
        let _ = tx.send(state);
        Box::pin(async {})
    }));
    if pc.connection_state() == RTCPeerConnectionState::Connected {
        return Ok(());
    }
    while let Some(state) = rx.recv().await {
        match state {
            RTCPeerConnectionState::Connected => return Ok(()),
            RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed => {
                return Err(format!("connection {state}"));
            }
            _ => {}
        }
    }
    Err("connection state unknown".into())
}

/// Microseconds since `base`, as the publisher stamps them into payloads.
fn stamp(base: Instant) -> u64 {
    u64::try_from(base.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// The publisher: announces a video and an audio track, offers its connection and,
/// once connected, sends until the run ends. Returns the video packets sent.
async fn publish(
    api: &API,
    url: &str,
    token: &str,
    kbps: u64,
    base: Instant,
    stop: Arc<AtomicBool>,
) -> Result<Arc<AtomicU64>, String> {
    let mut signal = Signal::connect(url, token, true).await?;
    let pc = Arc::new(
        api.new_peer_connection(RTCConfiguration::default()).await.map_err(|e| e.to_string())?,
    );
    let video = Arc::new(TrackLocalStaticRTP::new(
        RTCRtpCodecCapability {
            mime_type: "video/VP8".into(),
            clock_rate: 90_000,
            ..Default::default()
        },
        "video".into(),
        "bench".into(),
    ));
    let audio = Arc::new(TrackLocalStaticRTP::new(
        RTCRtpCodecCapability {
            mime_type: "audio/opus".into(),
            clock_rate: 48_000,
            channels: 2,
            ..Default::default()
        },
        "audio".into(),
        "bench".into(),
    ));
    let keyframe_wanted = Arc::new(AtomicBool::new(true));
    for track in [video.clone(), audio.clone()] {
        let local: Arc<dyn TrackLocal + Send + Sync> = track;
        let sender = pc.add_track(local).await.map_err(|e| e.to_string())?;
        let wanted = keyframe_wanted.clone();
        tokio::spawn(async move {
            while let Ok((packets, _)) = sender.read_rtcp().await {
                if packets.iter().any(|p| p.as_any().is::<PictureLossIndication>()) {
                    wanted.store(true, Ordering::Relaxed);
                }
            }
        });
    }
    let width = 1280;
    for (cid, kind, source) in [
        ("video", lk::TrackType::Video, lk::TrackSource::Camera),
        ("audio", lk::TrackType::Audio, lk::TrackSource::Microphone),
    ] {
        signal.send(lk::signal_request::Message::AddTrack(lk::AddTrackRequest {
            cid: cid.into(),
            name: cid.into(),
            r#type: kind as i32,
            source: source as i32,
            width: if kind == lk::TrackType::Video { width } else { 0 },
            height: if kind == lk::TrackType::Video { 720 } else { 0 },
            ..Default::default()
        }));
    }
    trickle_out(&pc, signal.out.clone(), 0);
    let offer = pc.create_offer(None).await.map_err(|e| e.to_string())?;
    pc.set_local_description(offer.clone()).await.map_err(|e| e.to_string())?;
    signal.send(lk::signal_request::Message::Offer(lk::SessionDescription {
        r#type: "offer".into(),
        sdp: offer.sdp,
        id: 1,
        ..Default::default()
    }));
    let waiting = pc.clone();
    let mut ready = tokio::spawn(async move { connected(&waiting).await });
    let handshake = async {
        loop {
            let message = tokio::select! {
                done = &mut ready => {
                    return done.map_err(|e| e.to_string()).and_then(|r| r);
                }
                m = signal.incoming.recv() => m.ok_or("signalling closed")?,
            };
            match message {
                lk::signal_response::Message::Answer(answer) => {
                    let answer =
                        RTCSessionDescription::answer(answer.sdp).map_err(|e| e.to_string())?;
                    pc.set_remote_description(answer).await.map_err(|e| e.to_string())?;
                }
                lk::signal_response::Message::Trickle(t) if t.target == 0 => {
                    add_candidate(&pc, &t).await
                }
                _ => {}
            }
        }
    };
    tokio::time::timeout(CONNECT_TIMEOUT, handshake)
        .await
        .map_err(|_| "the publisher did not connect".to_string())??;
    let sent = Arc::new(AtomicU64::new(0));
    let counter = sent.clone();
    tokio::spawn(async move {
        // Keep the signalling (and with it the session) open while sending.
        let _signal = signal;
        let _pc = pc;
        let frame_bytes = usize::try_from(kbps * 1000 / 8 / FPS).unwrap_or(PAYLOAD_MAX).max(16);
        let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / FPS));
        let (mut seq, mut audio_seq) = (0u16, 0u16);
        let mut frame = 0u64;
        while !stop.load(Ordering::Relaxed) {
            tick.tick().await;
            let keyframe = frame.is_multiple_of(KEYFRAME_EVERY)
                || keyframe_wanted.swap(false, Ordering::Relaxed);
            let mut left = frame_bytes;
            let mut first = true;
            while left > 0 {
                let size = left.clamp(16, PAYLOAD_MAX);
                left = left.saturating_sub(size);
                let mut payload = vec![0u8; size];
                // VP8 descriptor (start of partition 0 on the first packet), the frame
                // header's keyframe bit, then the send time.
                payload[0] = if first { 0x10 } else { 0x00 };
                payload[1] = if keyframe { 0x00 } else { 0x01 };
                payload[2..10].copy_from_slice(&stamp(base).to_be_bytes());
                let packet = Packet {
                    header: Header {
                        version: 2,
                        marker: left == 0,
                        sequence_number: seq,
                        timestamp: u32::try_from((frame * 3000) % (1 << 32)).unwrap_or(0),
                        ..Default::default()
                    },
                    payload: payload.into(),
                };
                seq = seq.wrapping_add(1);
                first = false;
                if video.write_rtp(&packet).await.is_ok() {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            }
            // Audio: 20 ms frames, three to each 33 ms video frame on average.
            for _ in 0..(if frame.is_multiple_of(2) { 2 } else { 1 }) {
                let mut payload = vec![0u8; 100];
                payload[0..8].copy_from_slice(&stamp(base).to_be_bytes());
                let packet = Packet {
                    header: Header {
                        version: 2,
                        sequence_number: audio_seq,
                        timestamp: u32::from(audio_seq).wrapping_mul(960),
                        ..Default::default()
                    },
                    payload: payload.into(),
                };
                audio_seq = audio_seq.wrapping_add(1);
                let _ = audio.write_rtp(&packet).await;
            }
            frame += 1;
        }
    });
    Ok(sent)
}

/// What one viewer received while measuring.
#[derive(Default)]
struct Received {
    video_packets: u64,
    video_bytes: u64,
    /// Video packets expected from the first and highest sequence numbers seen.
    expected: u64,
    delays: Vec<Duration>,
    first_packet: Option<Duration>,
    /// Offers answered, and the receiving connection's last state.
    answered: u32,
    state: String,
    audio_packets: u64,
    tracks: Vec<String>,
    /// Media sections of the last offer, by kind.
    offered: String,
}

/// One viewer: joins, answers the SFU's offers and counts what arrives, until `stop`.
async fn view(
    api: Arc<API>,
    url: String,
    token: String,
    base: Instant,
    measuring: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    got: Arc<Mutex<Received>>,
) -> Result<(), String> {
    let joined = Instant::now();
    // Viewers pick the video track (`auto_subscribe=0`, then `UpdateSubscription`) as a
    // live-stream page would.
    let mut signal = Signal::connect(&url, &token, false).await?;
    let pc = Arc::new(
        api.new_peer_connection(RTCConfiguration::default()).await.map_err(|e| e.to_string())?,
    );
    trickle_out(&pc, signal.out.clone(), 1);
    let states = got.clone();
    pc.on_peer_connection_state_change(Box::new(move |state| {
        states.lock().unwrap_or_else(|p| p.into_inner()).state = state.to_string();
        Box::pin(async {})
    }));
    let counts = got.clone();
    let measure = measuring.clone();
    pc.on_track(Box::new(move |track, _, _| {
        let (got, measuring) = (counts.clone(), measure.clone());
        Box::pin(async move {
            let video = track.kind() == webrtc::rtp_transceiver::rtp_codec::RTPCodecType::Video;
            got.lock().unwrap_or_else(|p| p.into_inner()).tracks.push(track.kind().to_string());
            let mut highest: Option<u32> = None;
            let mut first_seq: Option<u32> = None;
            while let Ok((packet, _)) = track.read_rtp().await {
                if !video {
                    got.lock().unwrap_or_else(|p| p.into_inner()).audio_packets += 1;
                    continue;
                }
                let mut g = got.lock().unwrap_or_else(|p| p.into_inner());
                if g.first_packet.is_none() {
                    g.first_packet = Some(joined.elapsed());
                }
                if !measuring.load(Ordering::Relaxed) {
                    first_seq = None;
                    continue;
                }
                // Sequence numbers unwrapped against the highest so far.
                let seq = u32::from(packet.header.sequence_number);
                let unwrapped = match highest {
                    None => seq,
                    Some(h) => {
                        let delta = (seq.wrapping_sub(h) as u16) as i16;
                        (h as i64 + i64::from(delta)).max(0) as u32
                    }
                };
                let first = *first_seq.get_or_insert(unwrapped);
                highest = Some(highest.map_or(unwrapped, |h| h.max(unwrapped)));
                g.expected = u64::from(highest.unwrap_or(first) - first + 1);
                g.video_packets += 1;
                g.video_bytes += packet.payload.len() as u64;
                if packet.payload.first() == Some(&0x10) && packet.payload.len() >= 10 {
                    let mut sent = [0u8; 8];
                    sent.copy_from_slice(&packet.payload[2..10]);
                    let delay = stamp(base).saturating_sub(u64::from_be_bytes(sent));
                    g.delays.push(Duration::from_micros(delay));
                }
            }
        })
    }));
    while !stop.load(Ordering::Relaxed) {
        let message = tokio::select! {
            m = signal.incoming.recv() => m,
            () = tokio::time::sleep(Duration::from_millis(200)) => continue,
        };
        let Some(message) = message else { return Err("signalling closed".into()) };
        match message {
            lk::signal_response::Message::Offer(offer) => {
                let id = offer.id;
                got.lock().unwrap_or_else(|p| p.into_inner()).offered = offer
                    .sdp
                    .lines()
                    .filter_map(|l| l.strip_prefix("m=").and_then(|m| m.split(' ').next()))
                    .collect::<Vec<_>>()
                    .join(",");
                let offer = RTCSessionDescription::offer(offer.sdp).map_err(|e| e.to_string())?;
                pc.set_remote_description(offer).await.map_err(|e| e.to_string())?;
                let answer = pc.create_answer(None).await.map_err(|e| e.to_string())?;
                pc.set_local_description(answer.clone()).await.map_err(|e| e.to_string())?;
                signal.send(lk::signal_request::Message::Answer(lk::SessionDescription {
                    r#type: "answer".into(),
                    sdp: answer.sdp,
                    id,
                    ..Default::default()
                }));
                got.lock().unwrap_or_else(|p| p.into_inner()).answered += 1;
            }
            lk::signal_response::Message::Trickle(t) if t.target == 1 => {
                add_candidate(&pc, &t).await
            }
            lk::signal_response::Message::Join(join) => {
                let video: Vec<String> = join
                    .other_participants
                    .iter()
                    .flat_map(|p| &p.tracks)
                    .filter(|t| t.r#type == lk::TrackType::Video as i32)
                    .map(|t| t.sid.clone())
                    .collect();
                signal.send(lk::signal_request::Message::Subscription(lk::UpdateSubscription {
                    track_sids: video,
                    subscribe: true,
                    ..Default::default()
                }));
            }
            _ => {}
        }
    }
    signal.send(lk::signal_request::Message::Leave(lk::LeaveRequest::default()));
    let _ = pc.close().await;
    Ok(())
}

/// A LiveKit URL and token for each of `tokens` (Matrix access tokens) in `room`.
async fn livekit_tokens(
    api: &Api,
    tokens: &[String],
    room: &str,
) -> Result<(String, Vec<String>), String> {
    let mut url = String::new();
    let mut jwts = Vec::with_capacity(tokens.len());
    for chunk in tokens.chunks(8) {
        let batch = chunk.iter().map(|token| {
            let (api, token, room) = (api.clone(), token.clone(), room.to_owned());
            async move {
                let me = api
                    .call(Method::GET, "/_matrix/client/v3/account/whoami", &token, None)
                    .await?;
                let user = me["user_id"]
                    .as_str()
                    .unwrap_or_default()
                    .replace('@', "%40")
                    .replace(':', "%3A");
                let path = format!("/_matrix/client/v3/user/{user}/openid/request_token");
                let openid = api.call(Method::POST, &path, &token, Some(&json!({}))).await?;
                let body = json!({"room": room, "openid_token": openid, "device_id": "BENCH"});
                let (status, got) = api
                    .request(Method::POST, "/_trellis/livekit/sfu/get", None, Some(&body))
                    .await?;
                if status != 200 {
                    return Err(format!("/_trellis/livekit/sfu/get: {status} {got}"));
                }
                Ok::<_, String>((
                    got["url"].as_str().unwrap_or_default().to_owned(),
                    got["jwt"].as_str().unwrap_or_default().to_owned(),
                ))
            }
        });
        for r in join_all(batch).await? {
            let (u, jwt) = r?;
            url = u;
            jwts.push(jwt);
        }
    }
    Ok((url, jwts))
}

pub async fn sfu_live(args: SfuLiveArgs) -> Result<Value, String> {
    crate::limits::raise_open_files();
    let ip = args.media_ip.unwrap_or_else(crate::turn::default_route_ip);
    let http = Api::new(&args.common, 16)?;
    let tokens = http.register_many("sfu_live", args.viewers + 1).await?;
    let room =
        http.create_room(&tokens[0], &json!({"preset": "public_chat", "name": "live"})).await?;
    for chunk in tokens[1..].chunks(8) {
        let joins = chunk.iter().map(|t| {
            let (http, t, room) = (http.clone(), t.clone(), room.clone());
            async move { http.join(&t, &room).await }
        });
        for r in join_all(joins).await? {
            r?;
        }
    }
    let (url, jwts) = livekit_tokens(&http, &tokens, &room).await?;
    let api = Arc::new(build_api(ip)?);
    let base = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let sent = publish(&api, &url, &jwts[0], args.kbps, base, stop.clone()).await?;
    // Viewers join once the tracks are published (their media has reached the SFU), so
    // that each gets one offer with both: WebRTC's Rust stack, as a receiver, misses a
    // video track added by a second offer now and then.
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Viewers join a few at a time; each runs until the end.
    let started = Instant::now();
    let mut viewers = Vec::new();
    let mut tasks = Vec::new();
    for chunk in jwts[1..].chunks(args.connect_concurrency.max(1)) {
        let mut batch = Vec::new();
        for jwt in chunk {
            let got = Arc::new(Mutex::new(Received::default()));
            viewers.push(got.clone());
            let task = tokio::spawn(view(
                api.clone(),
                url.clone(),
                jwt.clone(),
                base,
                measuring.clone(),
                stop.clone(),
                got.clone(),
            ));
            tasks.push(task);
            batch.push(got);
        }
        // The next batch once this one receives (or its time is up).
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        while Instant::now() < deadline
            && batch
                .iter()
                .any(|g| g.lock().unwrap_or_else(|p| p.into_inner()).first_packet.is_none())
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let connect_seconds = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;

    let probe = ServerProbe::start(args.common.server_pid);
    let sent_before = sent.load(Ordering::Relaxed);
    measuring.store(true, Ordering::Relaxed);
    let measured = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = measured.elapsed();
    let cpu = probe.cpu();
    let server = probe.report();
    let video_sent = sent.load(Ordering::Relaxed) - sent_before;
    stop.store(true, Ordering::Relaxed);

    let mut delays = Vec::new();
    let mut first_packets = Vec::new();
    let (mut bytes, mut packets, mut expected) = (0u64, 0u64, 0u64);
    let mut shares = Vec::new();
    let mut receiving = 0;
    for v in &viewers {
        let mut g = v.lock().unwrap_or_else(|p| p.into_inner());
        delays.append(&mut g.delays);
        first_packets.extend(g.first_packet);
        bytes += g.video_bytes;
        packets += g.video_packets;
        expected += g.expected;
        if g.video_packets > 0 {
            receiving += 1;
        }
        shares.push(g.video_packets as f64 / video_sent.max(1) as f64);
    }
    // Why viewers did not receive, when some did not.
    let mut failures: std::collections::BTreeMap<String, usize> = Default::default();
    for v in &viewers {
        let g = v.lock().unwrap_or_else(|p| p.into_inner());
        if g.first_packet.is_none() {
            let what = format!(
                "no video; {} answers ({}); connection {}; tracks {:?}",
                g.answered, g.offered, g.state, g.tracks
            );
            *failures.entry(what).or_default() += 1;
        }
    }
    for task in tasks {
        if let Ok(Ok(Err(e))) = tokio::time::timeout(Duration::from_secs(2), task).await {
            *failures.entry(e).or_default() += 1;
        }
    }
    let mbit_s = bytes as f64 * 8.0 / 1e6 / elapsed.as_secs_f64();
    let min_share = shares.iter().copied().fold(f64::INFINITY, f64::min);
    let avg_share = shares.iter().sum::<f64>() / shares.len().max(1) as f64;
    Ok(json!({
        "scenario": "sfu-live",
        "viewers": args.viewers,
        "kbps": args.kbps,
        "seconds": args.seconds,
        "viewers_receiving": receiving,
        "connect_all_seconds": round2(connect_seconds),
        "first_video": summary(&mut first_packets),
        "video_packets_sent": video_sent,
        "delivered_share": {"min": round2(if min_share.is_finite() { min_share } else { 0.0 }), "avg": round2(avg_share)},
        "loss_percent": round2(100.0 * (1.0 - packets as f64 / expected.max(1) as f64)),
        "forwarded_mbit_s": round2(mbit_s),
        "forwarded_packets_s": round2(packets as f64 / elapsed.as_secs_f64()),
        "delay": summary(&mut delays),
        "server": server,
        "server_cpu_percent": cpu.map(|c| round2(100.0 * c.as_secs_f64() / elapsed.as_secs_f64())),
        "failures": failures,
        "server_cpu_ms_per_mbit": cpu.map(|c| round2(c.as_secs_f64() * 1000.0 / (mbit_s * elapsed.as_secs_f64()).max(1e-9))),
    }))
}
