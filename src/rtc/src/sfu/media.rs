//! The WebRTC stack every peer connection is made from: the codecs browsers send
//! (Opus, VP8, VP9, H.264, AV1), the RTP header extensions simulcast needs, the default
//! interceptors (NACK answered from a packet cache, RTCP reports, transport-wide
//! congestion feedback), the send-side estimate from that feedback, and one UDP socket
//! shared by all connections.

use std::{net::SocketAddr, sync::Arc};

use webrtc::{
    api::{
        API, APIBuilder, interceptor_registry::register_default_interceptors,
        media_engine::MediaEngine, setting_engine::SettingEngine,
    },
    ice::udp_mux::{UDPMuxDefault, UDPMuxParams},
    ice::udp_network::UDPNetwork,
    ice_transport::ice_candidate_type::RTCIceCandidateType,
    interceptor::registry::Registry,
    rtp_transceiver::rtp_codec::{RTCRtpHeaderExtensionCapability, RTPCodecType},
};

use super::SfuSettings;

/// Extensions a simulcast publisher's packets are told apart by, and the audio level
/// speaker detection reads.
const VIDEO_EXTENSIONS: &[&str] = &[
    "urn:ietf:params:rtp-hdrext:sdes:mid",
    "urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id",
    "urn:ietf:params:rtp-hdrext:sdes:repaired-rtp-stream-id",
];
const AUDIO_EXTENSIONS: &[&str] =
    &["urn:ietf:params:rtp-hdrext:sdes:mid", "urn:ietf:params:rtp-hdrext:ssrc-audio-level"];

fn io_error(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

pub async fn build_api(settings: &SfuSettings) -> std::io::Result<(API, SocketAddr)> {
    let mut media = MediaEngine::default();
    media.register_default_codecs().map_err(io_error)?;
    for (uris, kind) in
        [(VIDEO_EXTENSIONS, RTPCodecType::Video), (AUDIO_EXTENSIONS, RTPCodecType::Audio)]
    {
        for uri in uris {
            media
                .register_header_extension(
                    RTCRtpHeaderExtensionCapability { uri: (*uri).to_owned() },
                    kind,
                    None,
                )
                .map_err(io_error)?;
        }
    }
    let mut registry = Registry::new();
    if settings.send_side_estimate {
        // Added first, it is innermost: it stamps what reaches the wire, the NACK
        // responder's retransmissions included (each with a number of its own).
        registry.add(Box::new(super::congestion::Builder));
    }
    let registry = register_default_interceptors(registry, &mut media).map_err(io_error)?;

    let socket = tokio::net::UdpSocket::bind(settings.udp_listen).await?;
    let udp_addr = socket.local_addr()?;
    let mut engine = SettingEngine::default();
    engine.set_udp_network(UDPNetwork::Muxed(UDPMuxDefault::new(UDPMuxParams::new(socket))));
    if !settings.public_ips.is_empty() {
        engine.set_nat_1to1_ips(
            settings.public_ips.iter().map(ToString::to_string).collect(),
            RTCIceCandidateType::Host,
        );
    }
    // The profile every WebRTC endpoint must implement (RFC 8827). webrtc-rs's AES-GCM
    // sealing copies its output a byte at a time: with it, forwarding cost about 40 %
    // more CPU per Mbit (docs/performance.md).
    engine.set_srtp_protection_profiles(vec![
        webrtc::dtls::extension::extension_use_srtp::SrtpProtectionProfile::Srtp_Aes128_Cm_Hmac_Sha1_80,
    ]);
    engine.set_include_loopback_candidate(settings.public_ips.iter().any(|ip| ip.is_loopback()));
    let api = APIBuilder::new()
        .with_media_engine(media)
        .with_interceptor_registry(registry)
        .with_setting_engine(engine)
        .build();
    Ok((api, udp_addr))
}

/// A connection's configuration: the SFU gathers only its own host candidates.
pub fn peer_config() -> webrtc::peer_connection::configuration::RTCConfiguration {
    webrtc::peer_connection::configuration::RTCConfiguration::default()
}

/// An `Arc` of a peer connection made from `api`.
pub async fn new_peer(
    api: &API,
) -> Result<Arc<webrtc::peer_connection::RTCPeerConnection>, webrtc::Error> {
    Ok(Arc::new(api.new_peer_connection(peer_config()).await?))
}
