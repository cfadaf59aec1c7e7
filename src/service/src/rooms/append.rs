//! Appending local events to a room: choose `prev_events` (the forward extremities) and
//! `auth_events` (from current state), build and sign the PDU, authorize it with ruma's
//! rules against the state before it, and store it with its state, timeline position
//! and membership changes in one atomic batch. Appends to one room are serialised by a
//! per-room lock; different rooms proceed in parallel.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use ruma::{
    CanonicalJsonObject, RoomId, RoomVersionId, UserId,
    events::{StateEventType, TimelineEventType},
    state_res::{
        auth_types_for_event, check_state_dependent_auth_rules, check_state_independent_auth_rules,
    },
};
use serde_json::Value;
use trellis_core::{Error, ErrorKind, Result, now_millis};
use trellis_store::{Batch, Json, Table, catalog};

use super::{
    EventRef, Pdu, PduTemplate, Rooms, build_pdu,
    builder::room_id_from_create,
    cache::CachedEvent,
    members::{ROOM_MEMBERS, USER_ROOMS},
    reads::{BUMP_EVENT_TYPES, EVENTS, ROOMS, RoomRecord, StoredEvent, TIMELINE},
    short::{Kind, state_key_text},
    state::StateSet,
};
use crate::{
    commit,
    keys::ServerKeys,
    pipeline::{Appended, Pipeline},
};

const TXN_IDS: Table<(String, String, String), String> = Table::new(&catalog::TXN_IDS);

/// A stored event waiting to become durable and visible on the stream.
#[must_use]
pub(super) struct Pending {
    pub(super) stream: super::stream::Ticket,
    wal: u64,
    /// Wake-up keys of those waiting for this event: the room, and the user a
    /// membership event is about (an invitee is not in the room yet).
    wake: Vec<String>,
    /// The event as cached, handed to the event pipeline.
    pdu: Arc<Pdu>,
    /// The room's joined members just after the event, read under the room's lock: the
    /// pipeline runs after it, when later events may have changed them.
    members: Option<Arc<Vec<String>>>,
}

/// Where a stored event stands in its room.
pub(super) enum Placement {
    /// A new head: the event's state becomes the room's and it the only forward extremity.
    Head,
    /// An event from another server: the forward extremities after it and, when the DAG
    /// forked, the room's resolved current state (`None`: the state after the event).
    Remote { extremities: Vec<u64>, current: Option<StateSet> },
}

impl Placement {
    /// Whether the room's state comes from resolution rather than from the event alone.
    fn resolved(&self) -> bool {
        matches!(self, Placement::Remote { current: Some(_), .. })
    }
}

/// A client's transaction, scoped to its device (and, when stored, to the room).
#[derive(Debug, Clone)]
pub struct Txn {
    pub localpart: String,
    pub device_id: String,
    pub txn_id: String,
}

/// A local event to append.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub kind: String,
    pub sender: String,
    pub state_key: Option<String>,
    pub content: Value,
    /// The sending device's transaction: a retried send returns the first event.
    pub txn: Option<Txn>,
    /// For `m.room.redaction`: the event to redact.
    pub redacts: Option<String>,
    /// An application service's `ts` (timestamp massaging); else now.
    pub origin_server_ts: Option<u64>,
}

/// Appends to rooms: local events (`append`, `create_room`, here) and events from other
/// servers (`intake.rs`). It writes through the room reads' caches, and hands every
/// stored event to the event pipeline before making it visible.
pub struct Timeline {
    pub(super) rooms: Arc<Rooms>,
    pub(super) keys: Arc<ServerKeys>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    durability: Arc<crate::durable::Durability>,
    pipeline: Pipeline,
}

impl Timeline {
    pub fn new(rooms: Arc<Rooms>, keys: Arc<ServerKeys>, pipeline: Pipeline) -> Self {
        let durability = crate::durable::Durability::start(rooms.db.clone());
        Self { rooms, keys, locks: Mutex::default(), durability, pipeline }
    }

    pub(super) fn room_lock(&self, room_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        if locks.len() > 10_000 {
            // Drop locks nobody holds; a room's lock is re-made on its next append.
            locks.retain(|_, l| Arc::strong_count(l) > 1);
        }
        locks.entry(room_id.to_owned()).or_default().clone()
    }

    /// Creates a room with its create event; returns the room id.
    pub async fn create_room(
        &self,
        creator: &str,
        version: &RoomVersionId,
        content: Value,
    ) -> Result<String> {
        self.create_room_as(creator, version, content, None).await
    }

    /// As [`Self::create_room`], with the room id chosen beforehand (`chosen`) where the
    /// room version lets the creating server pick it (before version 12): an upgrade
    /// names the new room in the old room's tombstone before creating it.
    pub async fn create_room_as(
        &self,
        creator: &str,
        version: &RoomVersionId,
        mut content: Value,
        chosen: Option<String>,
    ) -> Result<String> {
        if let Value::Object(map) = &mut content {
            map.insert("room_version".into(), Value::String(version.to_string()));
        }
        let rules = version
            .rules()
            .ok_or_else(|| Error::bad_json(format!("unsupported room version {version}")))?;
        let room_id = match rules.room_id_format {
            ruma::room_version_rules::RoomIdFormatVersion::V1 => {
                Some(chosen.unwrap_or_else(|| {
                    format!("!{}:{}", crate::random::alphanumeric(18), self.rooms.server_name)
                }))
            }
            _ => None,
        };
        // Before room version 11 the create event names its creator in the content.
        if !rules.authorization.use_room_create_sender
            && let Value::Object(map) = &mut content
        {
            map.insert("creator".into(), Value::String(creator.to_owned()));
        }
        let template = PduTemplate {
            room_id,
            sender: creator.to_owned(),
            kind: "m.room.create".into(),
            state_key: Some(String::new()),
            content,
            redacts: None,
            prev_events: Vec::new(),
            auth_events: Vec::new(),
            depth: 1,
            origin_server_ts: now_millis(),
        };
        let (pdu, hash) = build_pdu(&self.keys, &self.rooms.server_name, version, template)?;
        check_state_independent_auth_rules(&rules.authorization, &pdu, |_: &ruma::EventId| {
            None::<Pdu>
        })
        .map_err(Error::forbidden)?;
        let room_id = match &pdu.room_id {
            Some(r) => r.to_string(),
            None => room_id_from_create(&pdu),
        };
        let lock = self.room_lock(&room_id);
        let _guard = lock.lock().await;
        let mut batch = Batch::new();
        let room_short = self.rooms.short.get_or_create(&mut batch, Kind::Room, &room_id)?;
        let empty = StateSet::new();
        let before = self.rooms.snapshots.save(&mut batch, None, &empty)?;
        // The empty "before" snapshot is not committed yet, so the create event's state is
        // stored whole rather than as a layer on it.
        let pending = self.store(
            &mut batch,
            room_short,
            &room_id,
            version,
            &pdu,
            hash,
            before,
            None,
            0,
            Placement::Head,
        )?;
        drop(_guard);
        self.finish(pending).await?;
        Ok(room_id)
    }

    /// Appends a local event to an existing room.
    pub async fn append(&self, room_id: &str, event: NewEvent) -> Result<Pdu> {
        let lock = self.room_lock(room_id);
        let _guard = lock.lock().await;
        let (room_short, room) =
            self.rooms.room(room_id)?.ok_or_else(|| Error::not_found("Unknown room"))?;
        // Transaction ids are scoped to the device and the room (the request path).
        let txn_key = event.txn.as_ref().map(|txn| {
            (txn.localpart.clone(), txn.device_id.clone(), format!("{room_id}\u{0}{}", txn.txn_id))
        });
        if let Some(txn) = &txn_key
            && let Some(event_id) = TXN_IDS.get(&*self.rooms.db, txn)?
            && let Some(short) = self.rooms.short.get(Kind::Event, &event_id)?
            && let Some(pdu) = self.rooms.pdu_by_short(short)?
        {
            return Ok(pdu);
        }
        let (version, rules) = room.rules()?;
        let state = self.rooms.state_at(room.state)?;
        self.rooms.check_relation(room_short, &event.sender, &event.content)?;

        let redacts = event.redacts.clone();
        let transaction = event.txn.as_ref().map(|txn| {
            Arc::new(super::pdu::LocalTransaction {
                device_id: txn.device_id.clone(),
                txn_id: txn.txn_id.clone(),
            })
        });
        let (mut pdu, hash) = self.build_checked(room_id, &room, &state, event)?;
        pdu.transaction = transaction;

        let mut batch = Batch::new();
        if let Some(txn) = &txn_key {
            TXN_IDS.put(&mut batch, txn, &pdu.event_id.to_string());
        }
        let redacted = match &redacts {
            Some(target) => {
                Some(self.redact_into(&mut batch, room_short, target, &pdu, &rules, &state)?)
            }
            None => None,
        };
        let pending = self.store(
            &mut batch,
            room_short,
            room_id,
            &version,
            &pdu,
            hash,
            room.state,
            Some((room.state, &state)),
            room.max_depth,
            Placement::Head,
        )?;
        if let Some(short) = redacted {
            self.rooms.cache.invalidate(&short);
        }
        drop(_guard);
        self.publish(room_id, pending).await?;
        Ok(pdu)
    }

    /// Builds, signs and authorizes the next event of a room against `state` (its current
    /// state), without storing it.
    fn build_checked(
        &self,
        room_id: &str,
        room: &RoomRecord,
        state: &StateSet,
        event: NewEvent,
    ) -> Result<(Pdu, String)> {
        let (version, rules) = room.rules()?;
        let template = self.template(room_id, room, &rules, state, event)?;
        let (pdu, hash) = build_pdu(&self.keys, &self.rooms.server_name, &version, template)?;
        let fetch_event = |id: &ruma::EventId| {
            let short = self.rooms.short.get(Kind::Event, id.as_str()).ok()??;
            self.rooms.cached(short).ok()?.map(|e| e.pdu.clone())
        };
        check_state_independent_auth_rules(&rules.authorization, &pdu, fetch_event)
            .map_err(Error::forbidden)?;
        check_state_dependent_auth_rules(
            &rules.authorization,
            &pdu,
            |t: &StateEventType, k: &str| self.rooms.state_event(state, t, k),
        )
        .map_err(Error::forbidden)?;
        Ok((pdu, hash))
    }

    /// The next event of a room, built and authorized but not stored: for events another
    /// server must countersign first (invites).
    pub fn prepare(&self, room_id: &str, event: NewEvent) -> Result<(Pdu, String)> {
        let (room_short, room) =
            self.rooms.room(room_id)?.ok_or_else(|| Error::not_found("Unknown room"))?;
        self.rooms.check_relation(room_short, &event.sender, &event.content)?;
        let state = self.rooms.state_at(room.state)?;
        self.build_checked(room_id, &room, &state, event)
    }

    /// Runs the event pipeline on a stored event, then makes it durable and visible.
    pub(super) async fn publish(&self, room_id: &str, mut pending: Pending) -> Result<()> {
        self.run_pipeline(room_id, &mut pending).await;
        self.finish(pending).await
    }

    /// Hands a stored event to the event pipeline; what its consumers wrote unsynced is
    /// made durable by the event's own sync.
    pub(super) async fn run_pipeline(&self, room_id: &str, pending: &mut Pending) {
        let room_id = match <&RoomId>::try_from(room_id) {
            Ok(room_id) => room_id,
            Err(e) => {
                tracing::warn!(room_id, error = %e, "a stored room id does not parse");
                return;
            }
        };
        let members = pending.members.take();
        let event = Appended {
            room_id,
            position: pending.stream.position,
            pdu: &pending.pdu,
            members: members.as_ref(),
        };
        if let Some(wal) = self.pipeline.run(&event).await {
            pending.wal = pending.wal.max(wal);
        }
    }

    /// The next event of a room as `event` describes it: `prev_events` are the forward
    /// extremities, `auth_events` come from `state` (the current state), and `redacts`
    /// goes where the room version puts it.
    pub(super) fn template(
        &self,
        room_id: &str,
        room: &RoomRecord,
        rules: &ruma::room_version_rules::RoomVersionRules,
        state: &StateSet,
        event: NewEvent,
    ) -> Result<PduTemplate> {
        let kind = TimelineEventType::from(event.kind.clone());
        let sender = UserId::parse(&event.sender)
            .map_err(|e| Error::bad_json(format!("bad sender: {e}")))?;
        let content_raw = serde_json::value::to_raw_value(&event.content)
            .map_err(|e| Error::bad_json(e.to_string()))?;
        let auth_types = auth_types_for_event(
            &kind,
            &sender,
            event.state_key.as_deref(),
            &content_raw,
            &rules.authorization,
        )
        .map_err(Error::bad_json)?;
        let mut auth_events = Vec::new();
        for (t, k) in &auth_types {
            if let Some(ev) = self.rooms.state_event_cached(state, t, k) {
                auth_events.push(EventRef {
                    event_id: ev.pdu.event_id.to_string(),
                    sha256: ev.reference_hash.clone(),
                });
            }
        }
        let mut prev_events = Vec::new();
        for short in &room.extremities {
            if let Some(ev) = self.rooms.cached(*short)? {
                prev_events.push(EventRef {
                    event_id: ev.pdu.event_id.to_string(),
                    sha256: ev.reference_hash.clone(),
                });
            }
        }
        // Where `redacts` goes depends on the room version (content from version 11).
        let mut content = event.content;
        let mut top_level_redacts = None;
        if let Some(target) = &event.redacts {
            if rules.redaction.keep_room_redaction_redacts {
                if let Value::Object(map) = &mut content {
                    map.insert("redacts".into(), Value::String(target.clone()));
                }
            } else {
                top_level_redacts = Some(target.clone());
            }
        }
        Ok(PduTemplate {
            room_id: Some(room_id.to_owned()),
            sender: event.sender,
            kind: event.kind,
            state_key: event.state_key,
            content,
            redacts: top_level_redacts,
            prev_events,
            auth_events,
            depth: room.max_depth + 1,
            origin_server_ts: event.origin_server_ts.unwrap_or_else(now_millis),
        })
    }

    /// Applies a redaction to its target in `batch`: the stored event keeps only what the
    /// room version's redaction algorithm keeps, so the removed content is gone from
    /// storage. Redacting someone else's event needs the `redact` power level.
    pub(super) fn redact_into(
        &self,
        batch: &mut Batch,
        room_short: u64,
        target: &str,
        redaction: &Pdu,
        rules: &ruma::room_version_rules::RoomVersionRules,
        state: &StateSet,
    ) -> Result<u64> {
        let Some(short) = self.rooms.short.get(Kind::Event, target)? else {
            return Err(Error::not_found("No such event to redact"));
        };
        let Some(Json(mut stored)) = EVENTS.get(&*self.rooms.db, &short)? else {
            return Err(Error::not_found("No such event to redact"));
        };
        if stored.room != room_short {
            return Err(Error::not_found("No such event in this room"));
        }
        let original: CanonicalJsonObject = serde_json::from_value(stored.json.clone())
            .map_err(|e| Error::internal("stored event", e))?;
        let original_sender = original.get("sender").and_then(|v| v.as_str()).unwrap_or_default();
        if original_sender != redaction.sender.as_str() {
            let power = self.rooms.power_in(state, rules, redaction.sender.as_str());
            if power.level < power.levels["redact"].as_i64().unwrap_or(50) {
                return Err(Error::forbidden("You may not redact other users' events"));
            }
        }
        self.rooms.unindex_relation(batch, &stored, original_sender, &stored.json["content"])?;
        // Clients read `redacted_because` as an event of theirs: with its id.
        let mut because_json = (*redaction.json).clone();
        because_json.insert(
            "event_id".to_owned(),
            ruma::CanonicalJsonValue::String(redaction.event_id.to_string()),
        );
        let because = ruma::canonical_json::RedactedBecause::from_json(because_json);
        let redacted = ruma::canonical_json::redact(original, &rules.redaction, Some(because))
            .map_err(|e| Error::internal("redacting an event", e))?;
        stored.json =
            serde_json::to_value(&redacted).map_err(|e| Error::internal("redacted event", e))?;
        EVENTS.put(batch, &short, &Json(stored));
        Ok(short)
    }

    /// Keeps only the room's deepest forward extremity (an admin's repair of a room whose
    /// extremities piled up): the next event refers to that one alone. Returns how many
    /// were dropped.
    pub async fn trim_extremities(&self, room_id: &str) -> Result<usize> {
        let lock = self.room_lock(room_id);
        let _room = lock.lock().await;
        let Some(short) = self.rooms.short.get(Kind::Room, room_id)? else {
            return Err(Error::not_found("Room not found"));
        };
        let Some(Json(mut record)) = ROOMS.get(&*self.rooms.db, &short)? else {
            return Err(Error::not_found("Room not found"));
        };
        let mut deepest: Option<(u64, u64)> = None;
        for &event in &record.extremities {
            let depth = self.rooms.cached(event)?.map_or(0, |e| e.pdu.depth);
            if deepest.is_none_or(|(_, d)| depth > d) {
                deepest = Some((event, depth));
            }
        }
        let Some((keep, _)) = deepest else { return Ok(0) };
        let dropped = record.extremities.len() - 1;
        if dropped == 0 {
            return Ok(0);
        }
        record.extremities = vec![keep];
        let mut batch = Batch::new();
        ROOMS.put(&mut batch, &short, &Json(record.clone()));
        commit(&self.rooms.db, batch).await?;
        self.rooms.records.put(short, Arc::new(record));
        tracing::info!(room = room_id, dropped, "forward extremities trimmed");
        Ok(dropped)
    }

    /// Drops a room from the user's list after they left it (`/forget`).
    pub async fn forget(&self, room_id: &RoomId, user_id: &UserId) -> Result<()> {
        let Some(room) = self.rooms.short.get(Kind::Room, room_id.as_str())? else {
            return Err(Error::not_found("Unknown room"));
        };
        match ROOM_MEMBERS.get(&*self.rooms.db, &(room, user_id.to_string()))?.as_deref() {
            Some("join") | Some("invite") | Some("knock") => Err(Error::new(
                ErrorKind::BadRequest,
                trellis_core::error::code::UNKNOWN,
                "Leave the room before forgetting it",
            )),
            None => Err(Error::not_found("You were never in this room")),
            Some(_) => {
                let mut batch = Batch::new();
                USER_ROOMS.delete(&mut batch, &(user_id.to_string(), room));
                let written = commit(&self.rooms.db, batch).await;
                self.rooms.memberships_written();
                written
            }
        }
    }

    /// Writes an accepted event with everything it changes, atomically.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn store(
        &self,
        batch: &mut Batch,
        room_short: u64,
        room_id: &str,
        version: &RoomVersionId,
        pdu: &Pdu,
        reference_hash: String,
        state_before_id: u64,
        before: Option<(u64, &StateSet)>,
        max_depth: u64,
        placement: Placement,
    ) -> Result<Pending> {
        let event_short =
            self.rooms.short.get_or_create(batch, Kind::Event, pdu.event_id.as_str())?;
        let content: Value =
            serde_json::from_str(pdu.content.get()).map_err(|e| Error::bad_json(e.to_string()))?;
        let mut state_after_id = state_before_id;
        // Memberships, or the history visibility log (state events are few).
        let indexed_memberships = pdu.state_key.is_some() || placement.resolved();
        if let Some(key) = &pdu.state_key {
            let sk = self.rooms.short.get_or_create(
                batch,
                Kind::StateKey,
                &state_key_text(&pdu.kind.to_string(), key),
            )?;
            let mut after = before.map(|(_, s)| s.clone()).unwrap_or_default();
            after.insert(sk, event_short);
            state_after_id = self.rooms.snapshots.save(batch, before, &after)?;
            self.rooms.states.insert(state_after_id, Arc::new(after));
            if pdu.kind == TimelineEventType::RoomMember && !placement.resolved() {
                let membership = content["membership"].as_str().unwrap_or("leave");
                self.rooms.index_membership(batch, room_short, key, membership);
            }
        }
        let (room_state, extremities) = match placement {
            Placement::Head => (state_after_id, vec![event_short]),
            Placement::Remote { extremities, current: None } => (state_after_id, extremities),
            Placement::Remote { extremities, current: Some(current) } => {
                let id = self.save_resolved_state(batch, room_short, &current)?;
                (id, extremities)
            }
        };
        let json =
            serde_json::to_value(&*pdu.json).map_err(|e| Error::internal("event json", e))?;
        // Read before a position is drawn: nothing may fail between drawing and retiring.
        let previous_bump = self.rooms.record(room_short)?.map_or(0, |r| r.bump_position);
        let ticket = self.rooms.stream.dispatch();
        // A dispatched position must be retired whatever happens, or the stream stalls.
        if let Err(e) = self.rooms.index_relation(
            batch,
            room_short,
            event_short,
            ticket.position,
            pdu,
            &content,
        ) {
            self.rooms.stream.retire(ticket);
            return Err(e);
        }
        self.rooms.log_event(batch, room_short, event_short, ticket.position, pdu, &content);
        EVENTS.put(
            batch,
            &event_short,
            &Json(StoredEvent {
                event_id: pdu.event_id.to_string(),
                room: room_short,
                json,
                reference_hash: reference_hash.clone(),
                position: ticket.position,
                state_before: state_before_id,
                rejected: false,
                soft_failed: false,
                transaction: pdu.transaction.as_deref().cloned(),
            }),
        );
        TIMELINE.put(batch, &(room_short, ticket.position), &event_short);
        let kind = pdu.kind.to_string();
        let bump_position =
            if BUMP_EVENT_TYPES.contains(&kind.as_str()) { ticket.position } else { previous_bump };
        let record = RoomRecord {
            room_id: room_id.to_owned(),
            version: version.to_string(),
            state: room_state,
            extremities,
            max_depth: max_depth.max(pdu.depth),
            last_position: ticket.position,
            bump_position,
        };
        ROOMS.put(batch, &room_short, &Json(record.clone()));
        // Applied now, so the next event of the room builds on it; made durable by
        // `finish` outside the room lock, where concurrent appends share one sync.
        let generation = self.rooms.cache.get(&event_short).1;
        match self.rooms.db.write_unsynced(std::mem::take(batch)) {
            Ok(wal) => {
                // Before the position is retired: a sync that sees the event also sees
                // the room's new position (and, for a membership, the user's rooms).
                self.rooms.records.put(room_short, Arc::new(record));
                if indexed_memberships {
                    self.rooms.memberships_written();
                }
                // The next event of the room refers to this one: keep it parsed.
                let shared = Arc::new(pdu.clone());
                let cached = CachedEvent {
                    pdu: shared.clone(),
                    reference_hash,
                    position: ticket.position,
                    room: room_short,
                    state_before: state_before_id,
                    rejected: false,
                    soft_failed: false,
                };
                self.rooms.cache.insert(event_short, Arc::new(cached), generation);
                let mut wake = vec![room_id.to_owned()];
                if pdu.kind == TimelineEventType::RoomMember
                    && let Some(target) = &pdu.state_key
                {
                    wake.push(super::stream::user_key(target));
                    // Application services following device lists read membership
                    // changes once they are visible.
                    wake.push(crate::appservice::extensions::CO_MEMBER_CHANGES_KEY.to_owned());
                }
                let members = match self.rooms.joined_members(room_id) {
                    Ok(members) => Some(members),
                    Err(e) => {
                        tracing::warn!(room_id, error = %e, "reading the joined members failed");
                        None
                    }
                };
                Ok(Pending { stream: ticket, wal, wake, pdu: shared, members })
            }
            Err(e) => {
                self.rooms.stream.retire(ticket);
                Err(e.into())
            }
        }
    }

    /// Waits until a stored event is durable, then lets readers of the stream see it.
    pub(super) async fn finish(&self, pending: Pending) -> Result<()> {
        let synced = self.durability.wait(pending.wal).await;
        let retired = self.rooms.stream.retire(pending.stream);
        for key in &pending.wake {
            self.rooms.stream.wake_for(retired, key);
        }
        synced
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use trellis_core::config::StorageConfig;

    use super::*;

    fn timeline() -> (tempfile::TempDir, Timeline) {
        let dir = tempfile::tempdir().unwrap();
        let cfg = StorageConfig { block_cache_mb: 8, sync_writes: false, ..Default::default() };
        let db = trellis_store::open(&dir.path().join("db"), &cfg).unwrap();
        let keys =
            ServerKeys::load_or_generate(&dir.path().join("key"), "example.org", 24).unwrap();
        let rooms = Arc::new(Rooms::open(db, "example.org").unwrap());
        let t = Timeline::new(rooms, Arc::new(keys), Pipeline::empty());
        (dir, t)
    }

    fn ev(kind: &str, sender: &str, state_key: Option<&str>, content: Value) -> NewEvent {
        NewEvent {
            kind: kind.into(),
            sender: sender.into(),
            state_key: state_key.map(str::to_owned),
            content,
            txn: None,
            redacts: None,
            origin_server_ts: None,
        }
    }

    async fn room_with_creator(t: &Timeline, version: RoomVersionId) -> String {
        let alice = "@alice:example.org";
        let room = t.create_room(alice, &version, json!({})).await.unwrap();
        t.append(&room, ev("m.room.member", alice, Some(alice), json!({"membership": "join"})))
            .await
            .unwrap();
        let mut users = json!({});
        // Room version 12 gives creators unlimited power; they may not be listed.
        if !version.rules().unwrap().authorization.explicitly_privilege_room_creators {
            users[alice] = json!(100);
        }
        t.append(&room, ev("m.room.power_levels", alice, Some(""), json!({"users": users})))
            .await
            .unwrap();
        t.append(&room, ev("m.room.join_rules", alice, Some(""), json!({"join_rule": "public"})))
            .await
            .unwrap();
        room
    }

    #[tokio::test]
    async fn a_room_grows_as_a_dag_with_authorized_events() {
        for version in
            [RoomVersionId::V10, RoomVersionId::V11, RoomVersionId::V12, RoomVersionId::V1]
        {
            let (_d, t) = timeline();
            let room = room_with_creator(&t, version.clone()).await;
            let bob = "@bob:example.org";
            // Bob may join the public room and talk; Mallory, not joined, may not talk.
            t.append(&room, ev("m.room.member", bob, Some(bob), json!({"membership": "join"})))
                .await
                .unwrap();
            let msg = t
                .append(
                    &room,
                    ev("m.room.message", bob, None, json!({"msgtype": "m.text", "body": "hi"})),
                )
                .await
                .unwrap();
            let err = t
                .append(
                    &room,
                    ev("m.room.message", "@mallory:example.org", None, json!({"body": "x"})),
                )
                .await
                .unwrap_err();
            assert_eq!(err.errcode, "M_FORBIDDEN", "{version}");
            // Bob has no power to change the name.
            let err = t
                .append(&room, ev("m.room.name", bob, Some(""), json!({"name": "n"})))
                .await
                .unwrap_err();
            assert_eq!(err.errcode, "M_FORBIDDEN");

            assert_eq!(
                t.rooms.membership(&room, bob).unwrap(),
                Some(ruma::events::room::member::MembershipState::Join)
            );
            let state = t.rooms.current_state(&room).unwrap();
            let kinds: Vec<String> = state.iter().map(|p| p.kind.to_string()).collect();
            for k in ["m.room.create", "m.room.member", "m.room.power_levels", "m.room.join_rules"]
            {
                assert!(kinds.contains(&k.to_owned()), "{version}: {kinds:?}");
            }
            assert_eq!(state.iter().filter(|p| p.kind == TimelineEventType::RoomMember).count(), 2);

            // The timeline, newest first, links each event to the previous one.
            let events = t.rooms.timeline_backwards(&room, None, 100).unwrap();
            assert_eq!(events.len(), 6, "{version}");
            assert_eq!(events[0].1.event_id, msg.event_id);
            for pair in events.windows(2) {
                assert!(pair[0].0 > pair[1].0, "positions decrease");
                assert_eq!(pair[0].1.prev_events, vec![pair[1].1.event_id.clone()], "{version}");
                assert_eq!(pair[0].1.depth, pair[1].1.depth + 1);
            }
            let older = t.rooms.timeline_backwards(&room, Some(events[2].0), 2).unwrap();
            assert_eq!(older.len(), 2);
            assert_eq!(older[0].1.event_id, events[3].1.event_id);
        }
    }

    #[tokio::test]
    async fn unknown_rooms_and_versions_are_errors() {
        let (_d, t) = timeline();
        let err = t
            .append("!nope:example.org", ev("m.room.message", "@a:example.org", None, json!({})))
            .await
            .unwrap_err();
        assert_eq!(err.errcode, "M_NOT_FOUND");
        assert!(
            t.create_room("@a:example.org", &RoomVersionId::try_from("999").unwrap(), json!({}))
                .await
                .is_err()
        );
    }
}
