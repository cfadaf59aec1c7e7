//! LiveKit's signalling messages: decoding requests, building and encoding responses.

use livekit_protocol as lk;
use prost::Message;

pub use lk::signal_request::Message as Request;
use lk::signal_response::Message as Response;

/// The protocol version spoken (what current clients send as `protocol`).
pub const PROTOCOL: i32 = 17;
/// Seconds between the client's pings, and without any message before it gives up.
pub const PING_INTERVAL: i32 = 5;
pub const PING_TIMEOUT: i32 = 15;

/// `SignalTarget`: the connection the client publishes on, and the one it receives on.
pub const TARGET_PUBLISHER: i32 = 0;
pub const TARGET_SUBSCRIBER: i32 = 1;

pub fn decode(bytes: &[u8]) -> Option<Request> {
    lk::SignalRequest::decode(bytes).ok().and_then(|r| r.message)
}

pub fn encode(message: Response) -> Vec<u8> {
    lk::SignalResponse { message: Some(message) }.encode_to_vec()
}

pub fn server_info(version: &str) -> lk::ServerInfo {
    lk::ServerInfo {
        edition: 0,
        version: version.to_owned(),
        protocol: PROTOCOL,
        region: String::new(),
        node_id: "trellis".to_owned(),
        ..Default::default()
    }
}

pub fn ice_servers(servers: &[super::IceServer]) -> Vec<lk::IceServer> {
    servers
        .iter()
        .map(|s| lk::IceServer {
            urls: s.urls.clone(),
            username: s.username.clone(),
            credential: s.credential.clone(),
        })
        .collect()
}

pub fn join(
    room: lk::Room,
    participant: lk::ParticipantInfo,
    others: Vec<lk::ParticipantInfo>,
    ice: &[super::IceServer],
    version: &str,
) -> Vec<u8> {
    encode(Response::Join(lk::JoinResponse {
        room: Some(room),
        participant: Some(participant),
        other_participants: others,
        server_version: version.to_owned(),
        ice_servers: ice_servers(ice),
        // The client offers its publishing connection at once and is connected when
        // that one is; the receiving connection follows when there is media to send.
        subscriber_primary: false,
        ping_timeout: PING_TIMEOUT,
        ping_interval: PING_INTERVAL,
        server_info: Some(server_info(version)),
        ..Default::default()
    }))
}

pub fn reconnected(ice: &[super::IceServer], version: &str) -> Vec<u8> {
    encode(Response::Reconnect(lk::ReconnectResponse {
        ice_servers: ice_servers(ice),
        server_info: Some(server_info(version)),
        ..Default::default()
    }))
}

/// Tells a client whose session is gone to join again from scratch.
pub fn leave_reconnect() -> Vec<u8> {
    encode(Response::Leave(lk::LeaveRequest {
        can_reconnect: true,
        reason: lk::DisconnectReason::StateMismatch as i32,
        action: lk::leave_request::Action::Reconnect as i32,
        regions: None,
    }))
}

/// Tells a client it has been taken out (another session took its identity).
pub fn leave_disconnect(reason: lk::DisconnectReason) -> Vec<u8> {
    encode(Response::Leave(lk::LeaveRequest {
        can_reconnect: false,
        reason: reason as i32,
        action: lk::leave_request::Action::Disconnect as i32,
        regions: None,
    }))
}

pub fn description(kind: &str, sdp: String, id: u32) -> lk::SessionDescription {
    lk::SessionDescription { r#type: kind.to_owned(), sdp, id, ..Default::default() }
}

pub fn answer(sdp: String, id: u32) -> Vec<u8> {
    encode(Response::Answer(description("answer", sdp, id)))
}

pub fn offer(sdp: String, id: u32) -> Vec<u8> {
    encode(Response::Offer(description("offer", sdp, id)))
}

/// A local ICE candidate as the client parses it: `sdpMid` a string naming a media
/// section of the connection (libwebrtc refuses an unknown one) and `sdpMLineIndex` a
/// number (the Rust SDK fails on anything else).
pub fn trickle(candidate: &str, mid: &str, target: i32) -> Vec<u8> {
    let init = serde_json::json!({
        "candidate": candidate,
        "sdpMid": mid,
        "sdpMLineIndex": 0,
    });
    encode(Response::Trickle(lk::TrickleRequest {
        candidate_init: init.to_string(),
        target,
        r#final: false,
    }))
}

pub fn update(participants: Vec<lk::ParticipantInfo>) -> Vec<u8> {
    encode(Response::Update(lk::ParticipantUpdate { participants }))
}

pub fn track_published(cid: String, track: lk::TrackInfo) -> Vec<u8> {
    encode(Response::TrackPublished(lk::TrackPublishedResponse { cid, track: Some(track) }))
}

pub fn track_unpublished(track_sid: &str) -> Vec<u8> {
    encode(Response::TrackUnpublished(lk::TrackUnpublishedResponse {
        track_sid: track_sid.to_owned(),
    }))
}

/// An `AddTrack` the SFU will not publish, and why.
pub fn refused_track(add: lk::AddTrackRequest, message: &str) -> Vec<u8> {
    let reason = lk::request_response::Reason::LimitExceeded;
    request_answer(0, reason, message, lk::request_response::Request::AddTrack(add))
}

/// The SFU's answer to a request (with the id the client gave it): `Ok`, or why not.
pub fn request_answer(
    request_id: u32,
    reason: lk::request_response::Reason,
    message: &str,
    request: lk::request_response::Request,
) -> Vec<u8> {
    encode(Response::RequestResponse(lk::RequestResponse {
        request_id,
        reason: reason as i32,
        message: message.to_owned(),
        request: Some(request),
    }))
}

/// Speakers who started (with their level) or stopped (`None`).
pub fn speakers(changes: &[(String, Option<f32>)]) -> Vec<u8> {
    let speakers = changes
        .iter()
        .map(|(sid, level)| lk::SpeakerInfo {
            sid: sid.clone(),
            level: level.unwrap_or(0.0),
            active: level.is_some(),
        })
        .collect();
    encode(Response::SpeakersChanged(lk::SpeakersChanged { speakers }))
}

/// Dynacast: which of a track's layers anyone receives (`max`, and those below it), so
/// that the publisher may pause the others; `None`: none at all. Sent per codec too, as
/// current clients read it.
#[allow(deprecated)] // the plain qualities: what older clients read
pub fn subscribed_qualities(track_sid: &str, codec: &str, max: Option<u8>) -> Vec<u8> {
    let qualities: Vec<lk::SubscribedQuality> =
        [lk::VideoQuality::Low, lk::VideoQuality::Medium, lk::VideoQuality::High]
            .into_iter()
            .map(|q| lk::SubscribedQuality {
                quality: q as i32,
                enabled: max.is_some_and(|max| q as i32 <= i32::from(max)),
            })
            .collect();
    encode(Response::SubscribedQualityUpdate(lk::SubscribedQualityUpdate {
        track_sid: track_sid.to_owned(),
        subscribed_codecs: vec![lk::SubscribedCodec {
            codec: codec.to_owned(),
            qualities: qualities.clone(),
        }],
        subscribed_qualities: qualities,
    }))
}

/// Whether a subscriber may receive `publisher_sid`'s track `track_sid`.
pub fn permission_update(publisher_sid: &str, track_sid: &str, allowed: bool) -> Vec<u8> {
    encode(Response::SubscriptionPermissionUpdate(lk::SubscriptionPermissionUpdate {
        participant_sid: publisher_sid.to_owned(),
        track_sid: track_sid.to_owned(),
        allowed,
    }))
}

/// Participants' connection quality, with a score from 1 (bad) to 5 (excellent).
pub fn connection_quality(ratings: &[(String, lk::ConnectionQuality, f32)]) -> Vec<u8> {
    let updates = ratings
        .iter()
        .map(|(sid, quality, score)| lk::ConnectionQualityInfo {
            participant_sid: sid.clone(),
            quality: *quality as i32,
            score: *score,
        })
        .collect();
    encode(Response::ConnectionQuality(lk::ConnectionQualityUpdate { updates }))
}

pub fn pong(now_ms: i64) -> Vec<u8> {
    encode(Response::Pong(now_ms))
}

pub fn pong_resp(last_ping: i64, now_ms: i64) -> Vec<u8> {
    encode(Response::PongResp(lk::Pong { last_ping_timestamp: last_ping, timestamp: now_ms }))
}

/// A client's ICE candidate (`candidate_init` is the JSON of an `RTCIceCandidateInit`).
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CandidateInit {
    pub candidate: String,
    #[serde(default)]
    pub sdp_mid: Option<String>,
    #[serde(default, rename = "sdpMLineIndex")]
    pub sdp_m_line_index: Option<u16>,
    #[serde(default)]
    pub username_fragment: Option<String>,
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ping_request_decodes_and_a_trickle_is_what_clients_parse() {
        let req = lk::SignalRequest { message: Some(Request::Ping(42)) }.encode_to_vec();
        assert!(matches!(decode(&req), Some(Request::Ping(42))));
        assert!(decode(b"\xff\xff garbage").is_none());
        let bytes = trickle("candidate:1 1 udp 2130706431 127.0.0.1 5000 typ host", "7", 1);
        let Some(Response::Trickle(t)) = lk::SignalResponse::decode(&bytes[..]).unwrap().message
        else {
            panic!("not a trickle")
        };
        let init: serde_json::Value = serde_json::from_str(&t.candidate_init).unwrap();
        assert_eq!(init["sdpMid"], "7");
        assert_eq!(init["sdpMLineIndex"], 0);
        assert_eq!(t.target, TARGET_SUBSCRIBER);
    }
}
