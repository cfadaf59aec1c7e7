//! One call: its participants and the tracks they publish. Created on the first join,
//! closed when the last participant leaves.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Instant,
};

use livekit_protocol as lk;

use super::{
    CallReport, IceServer, JoinError, JoinGrant, RoomSummary, Sfu,
    forward::Forwarder,
    ids,
    participant::{Participant, Session},
    quality, signal,
    speakers::{self, Speakers},
};

pub(crate) struct Room {
    sid: String,
    name: String,
    created_ms: i64,
    created: Instant,
    inner: Mutex<Inner>,
    peak_participants: AtomicUsize,
    /// RTP payload bytes its forwarders sent, one copy per receiver.
    pub forwarded_bytes: Arc<AtomicU64>,
}

#[derive(Default)]
struct Inner {
    participants: Vec<Arc<Participant>>,
    forwarders: HashMap<String, Arc<Forwarder>>,
}

impl Room {
    pub fn new(name: String) -> Arc<Self> {
        let room = Arc::new(Self {
            sid: ids::room(),
            name,
            created_ms: signal::now_ms(),
            created: Instant::now(),
            inner: Mutex::new(Inner::default()),
            peak_participants: AtomicUsize::new(0),
            forwarded_bytes: Arc::new(AtomicU64::new(0)),
        });
        tokio::spawn(speaker_loop(Arc::downgrade(&room)));
        tokio::spawn(quality_loop(Arc::downgrade(&room)));
        room
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn participant_count(&self) -> usize {
        self.inner().participants.len()
    }

    /// What the call was, for history (when it ends).
    pub fn report(&self) -> CallReport {
        CallReport {
            room: self.name.clone(),
            peak_participants: self.peak_participants.load(Ordering::Relaxed),
            forwarded_bytes: self.forwarded_bytes.load(Ordering::Relaxed),
            duration: self.created.elapsed(),
        }
    }

    pub fn summary(&self) -> RoomSummary {
        let inner = self.inner();
        RoomSummary {
            name: self.name.clone(),
            participants: inner.participants.len(),
            published_tracks: inner.forwarders.len(),
        }
    }

    fn info_of(&self, inner: &Inner) -> lk::Room {
        lk::Room {
            sid: self.sid.clone(),
            name: self.name.clone(),
            creation_time: self.created_ms / 1000,
            creation_time_ms: self.created_ms,
            num_participants: u32::try_from(inner.participants.len()).unwrap_or(u32::MAX),
            num_publishers: u32::try_from(
                inner.participants.iter().filter(|p| p.is_publisher()).count(),
            )
            .unwrap_or(u32::MAX),
            ..Default::default()
        }
    }

    fn others(&self, sid: &str) -> Vec<Arc<Participant>> {
        self.inner().participants.iter().filter(|p| p.sid != sid).cloned().collect()
    }

    /// Sends `bytes` to every participant but `except`.
    pub fn broadcast(&self, except: &str, bytes: &[u8]) {
        for p in self.others(except) {
            p.send(bytes.to_vec());
        }
    }

    pub async fn join(
        self: &Arc<Self>,
        sfu: &Arc<Sfu>,
        grant: JoinGrant,
        ice_servers: Vec<IceServer>,
    ) -> Result<Session, JoinError> {
        // One identity is one participant: a second session takes the place of the first.
        let duplicate =
            self.inner().participants.iter().find(|p| p.identity == grant.identity).cloned();
        if let Some(old) = duplicate {
            old.send(signal::leave_disconnect(lk::DisconnectReason::DuplicateIdentity));
            self.remove(sfu, &old).await;
        }
        let (participant, session) = Participant::new(sfu, self, grant)
            .await
            .map_err(|e| JoinError::Media(e.to_string()))?;
        let forwarders = {
            let mut inner = self.inner();
            let others: Vec<_> = inner.participants.iter().map(|p| p.info()).collect();
            inner.participants.push(participant.clone());
            self.peak_participants.fetch_max(inner.participants.len(), Ordering::Relaxed);
            // Queued before anything else can reach it: clients take the first message
            // for the join response.
            participant.send(signal::join(
                self.info_of(&inner),
                participant.info(),
                others,
                &ice_servers,
                &sfu.settings.server_version,
            ));
            inner.forwarders.values().cloned().collect::<Vec<_>>()
        };
        self.broadcast(&participant.sid, &signal::update(vec![participant.info()]));
        sfu.observer().participant_joined(&self.name, &participant.identity);
        tracing::info!(room = %self.name, identity = %participant.identity, "participant joined");
        if participant.auto_subscribes() && !forwarders.is_empty() {
            for forwarder in &forwarders {
                self.subscribe(forwarder, &participant).await;
            }
            participant.negotiate_subscriber().await;
        }
        Ok(session)
    }

    /// Re-attaches a participant whose signalling dropped, if it is still here.
    pub async fn resume(
        self: &Arc<Self>,
        sid: &str,
        identity: &str,
        ice_servers: &[IceServer],
        sfu: &Arc<Sfu>,
    ) -> Option<Session> {
        let participant = self
            .inner()
            .participants
            .iter()
            .find(|p| p.sid == sid && p.identity == identity)
            .cloned()?;
        let session =
            participant.reattach(signal::reconnected(ice_servers, &sfu.settings.server_version));
        participant.restart_subscriber().await;
        tracing::info!(room = %self.name, identity, "participant resumed");
        Some(session)
    }

    /// A track's media has started arriving: everyone else learns of it and receives it.
    pub async fn track_published(&self, publisher: &Arc<Participant>, forwarder: Arc<Forwarder>) {
        self.inner().forwarders.insert(forwarder.track_sid.clone(), forwarder.clone());
        self.broadcast(&publisher.sid, &signal::update(vec![publisher.info()]));
        for other in self.others(&publisher.sid) {
            if other.wants(&forwarder.track_sid) && self.subscribe(&forwarder, &other).await {
                other.negotiate_subscriber().await;
            }
        }
    }

    /// Subscribes `subscriber` to `forwarder`'s track if its publisher allows that, and
    /// tells the subscriber if not; answers whether it subscribed (the caller
    /// renegotiates).
    async fn subscribe(&self, forwarder: &Arc<Forwarder>, subscriber: &Arc<Participant>) -> bool {
        let allowed =
            || forwarder.publisher().is_none_or(|p| p.allows(subscriber, &forwarder.track_sid));
        if !allowed() {
            self.deny(forwarder, subscriber);
            return false;
        }
        if !forwarder.subscribe(subscriber).await {
            return false;
        }
        // The publisher may have changed its mind while the track was being added.
        if !allowed() {
            self.unsubscribe(forwarder, subscriber).await;
            self.deny(forwarder, subscriber);
            return false;
        }
        true
    }

    /// Tells `subscriber` it may not receive `forwarder`'s track.
    fn deny(&self, forwarder: &Forwarder, subscriber: &Participant) {
        subscriber.note_denied(&forwarder.track_sid, true);
        subscriber.send(signal::permission_update(
            &forwarder.publisher_sid,
            &forwarder.track_sid,
            false,
        ));
    }

    /// Takes `forwarder`'s track from `subscriber` (the caller renegotiates).
    async fn unsubscribe(&self, forwarder: &Forwarder, subscriber: &Participant) {
        if let Some(sender) = forwarder.forget(&subscriber.sid) {
            let _ = subscriber.subscriber.remove_track(&sender).await;
        }
    }

    /// `publisher` changed who may receive its tracks: subscribers no longer allowed
    /// lose them and are told; those told so before and now allowed are told, and get
    /// back what they want.
    pub async fn permissions_changed(&self, publisher: &Arc<Participant>) {
        let forwarders = publisher.forwarders();
        for other in self.others(&publisher.sid) {
            let mut renegotiate = false;
            for forwarder in &forwarders {
                let track = &forwarder.track_sid;
                if !publisher.allows(&other, track) {
                    if forwarder.has_subscriber(&other.sid) {
                        self.unsubscribe(forwarder, &other).await;
                        renegotiate = true;
                        self.deny(forwarder, &other);
                    }
                    continue;
                }
                if other.note_denied(track, false) {
                    other.send(signal::permission_update(&publisher.sid, track, true));
                }
                if other.wants(track) && !forwarder.has_subscriber(&other.sid) {
                    renegotiate |= self.subscribe(forwarder, &other).await;
                }
            }
            if renegotiate {
                other.negotiate_subscriber().await;
            }
        }
    }

    /// A published track's forwarder, by the track's sid.
    pub fn forwarder(&self, track_sid: &str) -> Option<Arc<Forwarder>> {
        self.inner().forwarders.get(track_sid).cloned()
    }

    /// Participants other than `sid` that publish (or announced a track).
    pub fn publishers_besides(&self, sid: &str) -> usize {
        self.others(sid).iter().filter(|p| p.has_tracks()).count()
    }

    /// `publisher` took the track `track_sid` away: the others are told (the caller
    /// closes its forwarder).
    pub async fn track_unpublished(&self, publisher: &Arc<Participant>, track_sid: &str) {
        self.inner().forwarders.remove(track_sid);
        for other in self.others(&publisher.sid) {
            other.forget_track(track_sid);
        }
        self.broadcast(&publisher.sid, &signal::update(vec![publisher.info()]));
    }

    /// Subscribes `subscriber` to the tracks `track_sids`, or unsubscribes it.
    pub async fn set_subscriptions(
        &self,
        subscriber: &Arc<Participant>,
        track_sids: &[String],
        subscribe: bool,
    ) {
        let forwarders: Vec<Arc<Forwarder>> = {
            let inner = self.inner();
            track_sids
                .iter()
                .filter_map(|sid| inner.forwarders.get(sid))
                .filter(|f| f.publisher_sid != subscriber.sid)
                .cloned()
                .collect()
        };
        if forwarders.is_empty() {
            return;
        }
        for forwarder in forwarders {
            if subscribe {
                self.subscribe(&forwarder, subscriber).await;
            } else {
                self.unsubscribe(&forwarder, subscriber).await;
            }
        }
        subscriber.negotiate_subscriber().await;
    }

    /// Data from `from` to everyone else, or to `to` (identities) when not empty.
    pub async fn send_data(&self, from: &str, label: &str, to: &[String], bytes: bytes::Bytes) {
        for other in self.others(from) {
            if to.is_empty() || to.contains(&other.identity) {
                other.send_data(label, &bytes).await;
            }
        }
    }

    /// Takes `participant` out: its tracks leave every subscriber and the others are told.
    pub async fn remove(self: &Arc<Self>, sfu: &Sfu, participant: &Arc<Participant>) {
        let forwarders = {
            let mut inner = self.inner();
            let before = inner.participants.len();
            inner.participants.retain(|p| !Arc::ptr_eq(p, participant));
            if inner.participants.len() == before {
                return;
            }
            let mine: Vec<String> = inner
                .forwarders
                .values()
                .filter(|f| f.publisher_sid == participant.sid)
                .map(|f| f.track_sid.clone())
                .collect();
            for f in inner.forwarders.values() {
                let _ = f.forget(&participant.sid);
            }
            mine.iter().filter_map(|sid| inner.forwarders.remove(sid)).collect::<Vec<_>>()
        };
        participant.mark_left();
        self.broadcast(&participant.sid, &signal::update(vec![participant.departed_info()]));
        for forwarder in forwarders {
            forwarder.close().await;
        }
        participant.close().await;
        sfu.observer().participant_left(&self.name, &participant.identity);
        tracing::info!(room = %self.name, identity = %participant.identity, "participant left");
        sfu.close_if_empty(self);
    }
}

/// Decides the call's active speakers every [`speakers::INTERVAL`] from the levels of
/// its unmuted audio tracks and tells everyone of changes, until the call ends.
async fn speaker_loop(room: Weak<Room>) {
    let mut speakers = Speakers::default();
    loop {
        tokio::time::sleep(speakers::INTERVAL).await;
        let Some(room) = room.upgrade() else { return };
        let participants = room.inner().participants.clone();
        let mut levels = HashMap::new();
        for p in &participants {
            let mut loudest: Option<f32> = None;
            for forwarder in p.forwarders() {
                let Some(meter) = &forwarder.meter else { continue };
                let level = meter.take();
                if forwarder.muted.load(std::sync::atomic::Ordering::Relaxed) {
                    continue;
                }
                if let Some(level) = level {
                    loudest = Some(loudest.map_or(level, |l: f32| l.max(level)));
                }
            }
            levels.insert(p.sid.clone(), loudest);
        }
        let changes = speakers.update(levels);
        if !changes.is_empty() {
            let bytes = signal::speakers(&changes);
            for p in &participants {
                p.send(bytes.clone());
            }
        }
    }
}

/// Rates every participant's connection every [`quality::INTERVAL`] until the call ends:
/// a participant hears everyone's rating when it first can, then the changes.
async fn quality_loop(room: Weak<Room>) {
    let mut told: HashMap<String, lk::ConnectionQuality> = HashMap::new();
    loop {
        tokio::time::sleep(quality::INTERVAL).await;
        let Some(room) = room.upgrade() else { return };
        let participants = room.inner().participants.clone();
        let ratings: Vec<(String, lk::ConnectionQuality, f32)> = participants
            .iter()
            .map(|p| {
                let (quality, score) = p.rate();
                (p.sid.clone(), quality, score)
            })
            .collect();
        let changed: Vec<_> =
            ratings.iter().filter(|(sid, q, _)| told.get(sid) != Some(q)).cloned().collect();
        let all = signal::connection_quality(&ratings);
        let changes = (!changed.is_empty()).then(|| signal::connection_quality(&changed));
        for p in &participants {
            // New here, or back after its signalling dropped.
            if p.take_needs_qualities() || !told.contains_key(&p.sid) {
                p.send(all.clone());
            } else if let Some(changes) = &changes {
                p.send(changes.clone());
            }
        }
        told = ratings.into_iter().map(|(sid, quality, _)| (sid, quality)).collect();
    }
}
