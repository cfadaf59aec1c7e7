//! One published track's forwarding: RTP read from the publisher is written, untouched
//! but for its SSRC and payload type, to one local track per subscriber. Subscribers'
//! picture-loss reports become a keyframe request to the publisher; retransmissions are
//! answered from the NACK interceptor's packet cache of each subscriber connection.

use std::sync::{Arc, RwLock, Weak};

use webrtc::{
    peer_connection::RTCPeerConnection,
    rtcp::payload_feedbacks::{
        full_intra_request::FullIntraRequest, picture_loss_indication::PictureLossIndication,
    },
    rtp_transceiver::{rtp_codec::RTPCodecType, rtp_sender::RTCRtpSender},
    track::{
        track_local::{TrackLocal, TrackLocalWriter, track_local_static_rtp::TrackLocalStaticRTP},
        track_remote::TrackRemote,
    },
};

use super::{SfuObserver, participant::Participant};

struct Downtrack {
    subscriber: Weak<Participant>,
    subscriber_sid: String,
    track: Arc<TrackLocalStaticRTP>,
    sender: Arc<RTCRtpSender>,
}

pub(crate) struct Forwarder {
    pub track_sid: String,
    pub publisher_sid: String,
    remote: Arc<TrackRemote>,
    publisher_pc: Weak<RTCPeerConnection>,
    downtracks: RwLock<Arc<Vec<Arc<Downtrack>>>>,
    observer: Arc<dyn SfuObserver>,
}

impl Forwarder {
    pub fn new(
        track_sid: String,
        publisher_sid: String,
        remote: Arc<TrackRemote>,
        publisher_pc: Weak<RTCPeerConnection>,
        observer: Arc<dyn SfuObserver>,
    ) -> Arc<Self> {
        Arc::new(Self {
            track_sid,
            publisher_sid,
            remote,
            publisher_pc,
            downtracks: RwLock::new(Arc::new(Vec::new())),
            observer,
        })
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
    /// caller renegotiates).
    pub async fn subscribe(self: &Arc<Self>, subscriber: &Arc<Participant>) {
        if self.snapshot().iter().any(|d| d.subscriber_sid == subscriber.sid) {
            return;
        }
        // The stream id tells the client whose track this is: `<participant>|<track>`.
        let track = Arc::new(TrackLocalStaticRTP::new(
            self.remote.codec().capability,
            self.track_sid.clone(),
            format!("{}|{}", self.publisher_sid, self.track_sid),
        ));
        let local: Arc<dyn TrackLocal + Send + Sync> = track.clone();
        let sender = match subscriber.subscriber.add_track(local).await {
            Ok(sender) => sender,
            Err(e) => {
                tracing::warn!(error = %e, track = %self.track_sid, "adding a forwarded track failed");
                return;
            }
        };
        let downtrack = Arc::new(Downtrack {
            subscriber: Arc::downgrade(subscriber),
            subscriber_sid: subscriber.sid.clone(),
            track,
            sender: sender.clone(),
        });
        self.replace(|list| list.push(downtrack));
        // The subscriber's reports: a lost picture is asked of the publisher again.
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            while let Ok((packets, _)) = sender.read_rtcp().await {
                let Some(me) = me.upgrade() else { return };
                let wants_keyframe = packets.iter().any(|p| {
                    let any = p.as_any();
                    any.is::<PictureLossIndication>() || any.is::<FullIntraRequest>()
                });
                if wants_keyframe {
                    me.request_keyframe().await;
                }
            }
        });
        self.request_keyframe().await;
    }

    /// Takes `subscriber_sid`'s local track out of the list (its connection is closing).
    pub fn forget(&self, subscriber_sid: &str) {
        self.replace(|list| list.retain(|d| d.subscriber_sid != subscriber_sid));
    }

    /// Asks the publisher for a keyframe, so that a new or lossy subscriber can decode.
    pub async fn request_keyframe(&self) {
        if self.remote.kind() != RTPCodecType::Video {
            return;
        }
        let Some(pc) = self.publisher_pc.upgrade() else { return };
        let pli = PictureLossIndication { sender_ssrc: 0, media_ssrc: self.remote.ssrc() };
        let _ = pc.write_rtcp(&[Box::new(pli)]).await;
    }

    /// Forwards until the publisher's track ends.
    pub async fn run(self: Arc<Self>) {
        let mut packets = 0u64;
        let mut bytes = 0u64;
        while let Ok((packet, _)) = self.remote.read_rtp().await {
            let arrived = std::time::Instant::now();
            let size = packet.payload.len() as u64;
            let downtracks = self.snapshot();
            for downtrack in downtracks.iter() {
                if downtrack.track.write_rtp(&packet).await.is_ok() {
                    packets += 1;
                    bytes += size;
                }
            }
            if !downtracks.is_empty() {
                self.observer.forward_time(arrived.elapsed());
            }
            if packets >= 256 {
                self.observer.forwarded(packets, bytes);
                (packets, bytes) = (0, 0);
            }
        }
        self.observer.forwarded(packets, bytes);
    }

    /// Takes the track away from every subscriber (its publisher left or unpublished).
    pub async fn close(&self) {
        let list = self.snapshot();
        self.replace(Vec::clear);
        for downtrack in list.iter() {
            if let Some(subscriber) = downtrack.subscriber.upgrade() {
                let _ = subscriber.subscriber.remove_track(&downtrack.sender).await;
                subscriber.negotiate_subscriber().await;
            }
        }
    }
}

/// Reads and drops a track that is not forwarded (a simulcast layer not chosen), so
/// that its buffers do not fill.
pub async fn drain(remote: Arc<TrackRemote>) {
    while remote.read_rtp().await.is_ok() {}
}
