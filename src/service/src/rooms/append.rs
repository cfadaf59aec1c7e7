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
    CanonicalJsonObject, OwnedEventId, RoomVersionId, UserId,
    events::{StateEventType, TimelineEventType},
    state_res::{
        auth_types_for_event, check_state_dependent_auth_rules, check_state_independent_auth_rules,
    },
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use trellis_core::{Error, Result, now_millis};
use trellis_store::{Batch, Db, Json, Table, catalog};

use super::{
    EventRef, Pdu, PduTemplate, build_pdu,
    builder::room_id_from_create,
    cache::{CachedEvent, EventCache, ShortCache, StateCache},
    short::{Kind, ShortIds, state_key_text},
    state::{StateSet, StateSnapshots},
    stream::StreamPositions,
};
use crate::{commit, keys::ServerKeys};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RoomRecord {
    pub room_id: String,
    pub version: String,
    /// Snapshot of the current state.
    pub state: u64,
    /// Short ids of the forward extremities.
    pub extremities: Vec<u64>,
    pub max_depth: u64,
    /// Stream position of the room's newest event.
    #[serde(default)]
    pub last_position: u64,
    /// Stream position of the newest event that moves the room up a client's room list
    /// ([`BUMP_EVENT_TYPES`]); 0 in records written before it existed.
    #[serde(default)]
    pub bump_position: u64,
}

/// A room in a user's list (see [`Timeline::user_rooms`]).
#[derive(Debug, Clone)]
pub struct UserRoom {
    pub room_id: String,
    /// The user's current membership.
    pub membership: String,
    /// Stream position of the room's newest event: nothing in the room, the user's
    /// membership included, changed after it.
    pub last_position: u64,
    /// See [`RoomRecord::bump`].
    pub bump_position: u64,
}

/// Event types that make a room "active" in sliding sync's ordering (`bump_stamp`):
/// messages and the like, not reactions, receipts of edits or state churn.
pub const BUMP_EVENT_TYPES: &[&str] = &[
    "m.room.create",
    "m.room.message",
    "m.room.encrypted",
    "m.sticker",
    "m.call.invite",
    "m.poll.start",
    "org.matrix.msc3381.poll.start",
    "m.beacon_info",
];

impl RoomRecord {
    /// The room's version and its rules.
    pub fn rules(&self) -> Result<(RoomVersionId, ruma::room_version_rules::RoomVersionRules)> {
        let version = RoomVersionId::try_from(self.version.as_str())
            .map_err(|e| Error::internal("room version", e))?;
        let rules =
            version.rules().ok_or_else(|| Error::internal("room version", "unsupported"))?;
        Ok((version, rules))
    }

    /// The position that orders this room by activity.
    pub fn bump(&self) -> u64 {
        if self.bump_position > 0 { self.bump_position } else { self.last_position }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredEvent {
    pub event_id: String,
    pub room: u64,
    /// The signed PDU.
    pub json: Value,
    pub reference_hash: String,
    pub position: u64,
    /// Snapshot of the state before the event.
    pub state_before: u64,
    pub rejected: bool,
    /// Passed authorization but failed it against the room's current state: kept for the
    /// DAG, never served to clients (position 0, no timeline entry).
    #[serde(default)]
    pub soft_failed: bool,
    /// The sending device's transaction, for local events sent with one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transaction: Option<super::pdu::LocalTransaction>,
}

const ROOMS: Table<u64, Json<RoomRecord>> = Table::new(&catalog::ROOMS);
pub(super) const EVENTS: Table<u64, Json<StoredEvent>> = Table::new(&catalog::EVENTS);
pub(super) const TIMELINE: Table<(u64, u64), u64> = Table::new(&catalog::TIMELINE);
const ROOM_MEMBERS: Table<(u64, String), String> = Table::new(&catalog::ROOM_MEMBERS);
const USER_ROOMS: Table<(String, u64), String> = Table::new(&catalog::USER_ROOMS);
const TXN_IDS: Table<(String, String, String), String> = Table::new(&catalog::TXN_IDS);

/// Parsed events kept in memory (auth events of busy rooms, recent timelines).
const EVENT_CACHE_ENTRIES: usize = 50_000;
/// A record is ~200 bytes parsed: 100k rooms is ~20 MB at most.
const ROOM_CACHE_ENTRIES: usize = 100_000;
/// Member lists are the size of their rooms: fewer of them.
const JOINED_CACHE_ENTRIES: usize = 10_000;
/// Members a summary keeps by name: five heroes, and one more in case the reader is
/// among them.
const SUMMARY_FIRST_MEMBERS: usize = 6;

/// Joined and invited members of a room: how many, and the first by user id.
#[derive(Debug, Clone, Default)]
pub struct MemberSummary {
    pub joined: usize,
    pub invited: usize,
    pub first: Vec<String>,
}

/// Users whose room lists are kept (a short id and membership per room).
const USER_ROOMS_CACHE_ENTRIES: usize = 50_000;

/// State entries (one per state event of a snapshot) kept in memory, summed over
/// snapshots: current states of busy rooms stay loaded.
const STATE_CACHE_ENTRIES: usize = 2_000_000;

/// Rooms' states at sync positions kept (each shares a loaded snapshot).
const POSITION_STATE_CACHE_ENTRIES: usize = 4_096;

/// Timeline entries one page looks at, at most.
pub const SCAN_CAP: usize = 5_000;

/// A page of a room's timeline.
#[derive(Debug, Default)]
pub struct TimelinePage {
    /// Shared with the event cache: a page is read, rarely changed.
    pub events: Vec<(u64, Arc<Pdu>)>,
    /// The position of the last entry looked at (returned or filtered out).
    pub last: Option<u64>,
    /// Whether entries remain beyond `last`.
    pub more: bool,
}

/// A stored event waiting to become durable and visible on the stream.
#[must_use]
pub(super) struct Pending {
    pub(super) stream: super::stream::Ticket,
    wal: u64,
    /// Wake-up keys of those waiting for this event: the room, and the user a
    /// membership event is about (an invitee is not in the room yet).
    wake: Vec<String>,
    /// The event as cached, handed to the append hook.
    pdu: Arc<Pdu>,
    /// The room's joined members just after the event, read under the room's lock: the
    /// hook runs after it, when later events may have changed them.
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

/// A user's standing in a room's power levels.
#[derive(Debug, Clone)]
pub struct Power {
    pub level: i64,
    /// The `m.room.power_levels` content (`null` if the room has none).
    pub levels: Value,
}

/// A local event to append.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub kind: String,
    pub sender: String,
    pub state_key: Option<String>,
    pub content: Value,
    /// `(localpart, device id, transaction id)`: a retried send returns the first event.
    pub txn: Option<(String, String, String)>,
    /// For `m.room.redaction`: the event to redact.
    pub redacts: Option<String>,
}

/// Runs for every appended event after it is stored and before readers of the stream
/// see it (push rule evaluation), with the room id, the event's position, the event and
/// the room's joined members just after it (`None` if they could not be read).
/// It answers the WAL ticket of what it wrote unsynced, if anything: the event's own
/// sync then covers that too, instead of a sync of its own.
pub type AppendHook = Arc<
    dyn Fn(
            String,
            u64,
            Arc<Pdu>,
            Option<Arc<Vec<String>>>,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Option<u64>> + Send>>
        + Send
        + Sync,
>;

pub struct Timeline {
    pub(super) db: Db,
    pub(super) keys: Arc<ServerKeys>,
    pub(super) server_name: ruma::OwnedServerName,
    pub(super) short: ShortIds,
    pub(super) snapshots: StateSnapshots,
    pub stream: Arc<StreamPositions>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    pub(super) cache: EventCache,
    /// Room records: every sync reads one per room of the user.
    records: ShortCache<RoomRecord>,
    /// Joined members by room, with the state snapshot they belong to: every event
    /// notifies them, and messages leave the snapshot as it is.
    joined: ShortCache<(u64, Arc<Vec<String>>)>,
    /// Each user's rooms and membership there (short ids): every sync reads them twice.
    /// Writers of the membership index clear it once their batch is written.
    user_rooms: ShortCache<Vec<(u64, String)>, String>,
    /// Membership and history visibility logs (see `visibility.rs`), cleared alike.
    pub(super) logs: super::visibility::LogCaches,
    /// Member counts and the first members by name, per room and state snapshot: every
    /// sync's room summary, which would otherwise read the whole member list.
    summaries: ShortCache<(u64, MemberSummary)>,
    pub(super) states: StateCache,
    /// A room's state at a stream position (`shared_state_at_position`).
    pub(super) position_states: ShortCache<StateSet, (String, u64)>,
    durability: Arc<crate::durable::Durability>,
    pub(super) hook: std::sync::OnceLock<AppendHook>,
}

impl Timeline {
    pub fn new(db: Db, keys: Arc<ServerKeys>, server_name: &str) -> Result<Self> {
        let server_name = ruma::OwnedServerName::try_from(server_name)
            .map_err(|e| Error::internal("server name", e))?;
        // Positions resume after the newest event of any room: one row per room to read
        // at start-up, not one per event.
        let last = ROOMS
            .scan_range(
                &*db,
                std::ops::Bound::Unbounded,
                std::ops::Bound::Unbounded,
                trellis_store::Direction::Forward,
            )?
            .map(|e| e.map(|(_, Json(r))| r.last_position))
            .try_fold(0u64, |max, pos| pos.map(|p| max.max(p)))?;
        let durability = crate::durable::Durability::start(db.clone());
        let timeline = Self {
            short: ShortIds::new(db.clone())?,
            snapshots: StateSnapshots::new(db.clone())?,
            stream: Arc::new(StreamPositions::persistent(db.clone(), last)?),
            db,
            keys,
            server_name,
            locks: Mutex::default(),
            cache: EventCache::new(EVENT_CACHE_ENTRIES),
            records: ShortCache::new(ROOM_CACHE_ENTRIES),
            joined: ShortCache::new(JOINED_CACHE_ENTRIES),
            user_rooms: ShortCache::new(USER_ROOMS_CACHE_ENTRIES),
            logs: super::visibility::LogCaches::new(),
            summaries: ShortCache::new(JOINED_CACHE_ENTRIES),
            states: StateCache::new(STATE_CACHE_ENTRIES),
            position_states: ShortCache::new(POSITION_STATE_CACHE_ENTRIES),
            durability,
            hook: std::sync::OnceLock::new(),
        };
        timeline.backfill_indexes()?;
        Ok(timeline)
    }

    /// Installs the append hook (once, at start-up).
    pub fn set_hook(&self, hook: AppendHook) {
        let _ = self.hook.set(hook);
    }

    pub(super) fn room_lock(&self, room_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        if locks.len() > 10_000 {
            // Drop locks nobody holds; a room's lock is re-made on its next append.
            locks.retain(|_, l| Arc::strong_count(l) > 1);
        }
        locks.entry(room_id.to_owned()).or_default().clone()
    }

    pub(super) fn room_by_short(&self, short: u64) -> Result<Option<RoomRecord>> {
        Ok(self.record(short)?.map(|r| (*r).clone()))
    }

    /// A room's record, through the cache.
    fn record(&self, short: u64) -> Result<Option<Arc<RoomRecord>>> {
        let (hit, generation) = self.records.get(&short);
        if hit.is_some() {
            return Ok(hit);
        }
        let Some(Json(record)) = ROOMS.get(&*self.db, &short)? else { return Ok(None) };
        let record = Arc::new(record);
        self.records.insert(short, record.clone(), generation);
        Ok(Some(record))
    }

    /// Records a user's membership in both directions (room -> users, user -> rooms).
    /// Whoever writes the batch calls [`Self::memberships_written`] after it.
    pub(super) fn index_membership(
        &self,
        batch: &mut Batch,
        room_short: u64,
        user: &str,
        membership: &str,
    ) {
        ROOM_MEMBERS.put(batch, &(room_short, user.to_owned()), &membership.to_owned());
        USER_ROOMS.put(batch, &(user.to_owned(), room_short), &membership.to_owned());
    }

    /// Drops the cached room lists once a batch changing memberships is written: a
    /// list read before the write is then never kept. Membership changes are rare next
    /// to syncs, so all lists go rather than tracking whose changed.
    pub(super) fn memberships_written(&self) {
        self.user_rooms.clear();
        self.logs.clear();
    }

    pub fn room(&self, room_id: &str) -> Result<Option<(u64, RoomRecord)>> {
        let Some(short) = self.short.get(Kind::Room, room_id)? else { return Ok(None) };
        Ok(self.room_by_short(short)?.map(|r| (short, r)))
    }

    /// A stored event, parsed, through the event cache (what readers want; `event`
    /// gives the raw stored record).
    pub fn cached_event(&self, event_id: &str) -> Result<Option<Arc<CachedEvent>>> {
        let Some(short) = self.short.get(Kind::Event, event_id)? else { return Ok(None) };
        self.cached(short)
    }

    pub fn event(&self, event_id: &str) -> Result<Option<StoredEvent>> {
        let Some(short) = self.short.get(Kind::Event, event_id)? else { return Ok(None) };
        Ok(EVENTS.get(&*self.db, &short)?.map(|j| j.0))
    }

    /// The state of snapshot `id`, through the state cache.
    pub(super) fn state_at(&self, id: u64) -> Result<Arc<StateSet>> {
        if let Some(state) = self.states.get(id) {
            return Ok(state);
        }
        let state = Arc::new(self.snapshots.load(id)?);
        self.states.insert(id, state.clone());
        Ok(state)
    }

    /// A stored event, parsed, through the event cache.
    pub(super) fn cached(&self, short: u64) -> Result<Option<Arc<CachedEvent>>> {
        let (hit, generation) = self.cache.get(&short);
        if hit.is_some() {
            return Ok(hit);
        }
        let Some(Json(stored)) = EVENTS.get(&*self.db, &short)? else { return Ok(None) };
        let json: CanonicalJsonObject =
            serde_json::from_value(stored.json).map_err(|e| Error::internal("stored event", e))?;
        let id = OwnedEventId::try_from(stored.event_id)
            .map_err(|e| Error::internal("stored event id", e))?;
        let mut pdu = Pdu::from_json(id, json)?;
        pdu.rejected = stored.rejected;
        pdu.transaction = stored.transaction.map(Arc::new);
        let event = Arc::new(CachedEvent {
            pdu: Arc::new(pdu),
            reference_hash: stored.reference_hash,
            position: stored.position,
            room: stored.room,
            state_before: stored.state_before,
            rejected: stored.rejected,
            soft_failed: stored.soft_failed,
        });
        self.cache.insert(short, event.clone(), generation);
        Ok(Some(event))
    }

    pub(super) fn pdu_by_short(&self, short: u64) -> Result<Option<Pdu>> {
        Ok(self.cached(short)?.map(|e| (*e.pdu).clone()))
    }

    pub(super) fn state_event_cached(
        &self,
        state: &StateSet,
        kind: &StateEventType,
        key: &str,
    ) -> Option<Arc<CachedEvent>> {
        let sk = self.short.get(Kind::StateKey, &state_key_text(&kind.to_string(), key)).ok()??;
        let ev = *state.get(&sk)?;
        self.cached(ev).ok()?
    }

    pub(super) fn state_event(
        &self,
        state: &StateSet,
        kind: &StateEventType,
        key: &str,
    ) -> Option<Arc<Pdu>> {
        self.state_event_cached(state, kind, key).map(|e| e.pdu.clone())
    }

    /// A user's power in a state: its power levels content and the user's level, with
    /// room creators above everyone where the room version privileges them.
    pub(super) fn power_in(
        &self,
        state: &StateSet,
        rules: &ruma::room_version_rules::RoomVersionRules,
        user: &str,
    ) -> Power {
        let levels: Value = self
            .state_event(state, &StateEventType::RoomPowerLevels, "")
            .and_then(|p| serde_json::from_str(p.content.get()).ok())
            .unwrap_or(Value::Null);
        let creator = rules.authorization.explicitly_privilege_room_creators
            && self
                .state_event(state, &StateEventType::RoomCreate, "")
                .is_some_and(|c| c.sender.as_str() == user);
        let level = if creator {
            i64::MAX
        } else {
            levels["users"][user].as_i64().or_else(|| levels["users_default"].as_i64()).unwrap_or(0)
        };
        Power { level, levels }
    }

    /// A user's power in the current state of a room.
    pub fn power(&self, room_id: &str, user: &str) -> Result<Power> {
        let (_, room) = self.room(room_id)?.ok_or_else(|| Error::not_found("Unknown room"))?;
        let (_, rules) = room.rules()?;
        let state = self.state_at(room.state)?;
        Ok(self.power_in(&state, &rules, user))
    }

    /// The current state of a room as `(type, state_key) -> event`.
    pub fn current_state(&self, room_id: &str) -> Result<Vec<Pdu>> {
        let (_, room) = self.room(room_id)?.ok_or_else(|| Error::not_found("Unknown room"))?;
        let state = self.state_at(room.state)?;
        state.values().filter_map(|ev| self.pdu_by_short(*ev).transpose()).collect()
    }

    /// The membership of `user_id` in the room, if any.
    pub fn membership(&self, room_id: &str, user_id: &str) -> Result<Option<String>> {
        let Some(room) = self.short.get(Kind::Room, room_id)? else { return Ok(None) };
        Ok(ROOM_MEMBERS.get(&*self.db, &(room, user_id.to_owned()))?)
    }

    /// Creates a room with its create event; returns the room id.
    pub async fn create_room(
        &self,
        creator: &str,
        version: &RoomVersionId,
        mut content: Value,
    ) -> Result<String> {
        if let Value::Object(map) = &mut content {
            map.insert("room_version".into(), Value::String(version.to_string()));
        }
        let rules = version
            .rules()
            .ok_or_else(|| Error::bad_json(format!("unsupported room version {version}")))?;
        let room_id = match rules.room_id_format {
            ruma::room_version_rules::RoomIdFormatVersion::V1 => {
                Some(format!("!{}:{}", crate::random::alphanumeric(18), self.server_name))
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
        let (pdu, hash) = build_pdu(&self.keys, &self.server_name, version, template)?;
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
        let room_short = self.short.get_or_create(&mut batch, Kind::Room, &room_id)?;
        let empty = StateSet::new();
        let before = self.snapshots.save(&mut batch, None, &empty)?;
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
            self.room(room_id)?.ok_or_else(|| Error::not_found("Unknown room"))?;
        // Transaction ids are scoped to the device and the room (the request path).
        let txn_key = event.txn.as_ref().map(|(user, device, txn)| {
            (user.clone(), device.clone(), format!("{room_id}\u{0}{txn}"))
        });
        if let Some(txn) = &txn_key
            && let Some(event_id) = TXN_IDS.get(&*self.db, txn)?
            && let Some(short) = self.short.get(Kind::Event, &event_id)?
            && let Some(pdu) = self.pdu_by_short(short)?
        {
            return Ok(pdu);
        }
        let (version, rules) = room.rules()?;
        let state = self.state_at(room.state)?;
        self.check_relation(room_short, &event.sender, &event.content)?;

        let redacts = event.redacts.clone();
        let transaction = event.txn.as_ref().map(|(_, device_id, txn_id)| {
            Arc::new(super::pdu::LocalTransaction {
                device_id: device_id.clone(),
                txn_id: txn_id.clone(),
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
            self.cache.invalidate(&short);
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
        let (pdu, hash) = build_pdu(&self.keys, &self.server_name, &version, template)?;
        let fetch_event = |id: &ruma::EventId| {
            let short = self.short.get(Kind::Event, id.as_str()).ok()??;
            self.cached(short).ok()?.map(|e| e.pdu.clone())
        };
        check_state_independent_auth_rules(&rules.authorization, &pdu, fetch_event)
            .map_err(Error::forbidden)?;
        check_state_dependent_auth_rules(
            &rules.authorization,
            &pdu,
            |t: &StateEventType, k: &str| self.state_event(state, t, k),
        )
        .map_err(Error::forbidden)?;
        Ok((pdu, hash))
    }

    /// The next event of a room, built and authorized but not stored: for events another
    /// server must countersign first (invites).
    pub fn prepare(&self, room_id: &str, event: NewEvent) -> Result<(Pdu, String)> {
        let (room_short, room) =
            self.room(room_id)?.ok_or_else(|| Error::not_found("Unknown room"))?;
        self.check_relation(room_short, &event.sender, &event.content)?;
        let state = self.state_at(room.state)?;
        self.build_checked(room_id, &room, &state, event)
    }

    /// Runs the append hook for a stored event, then makes it durable and visible.
    pub(super) async fn publish(&self, room_id: &str, mut pending: Pending) -> Result<()> {
        self.run_hook(room_id, &mut pending).await;
        self.finish(pending).await
    }

    pub(super) async fn run_hook(&self, room_id: &str, pending: &mut Pending) {
        if let Some(hook) = self.hook.get() {
            let (pdu, members) = (pending.pdu.clone(), pending.members.take());
            if let Some(wal) = hook(room_id.to_owned(), pending.stream.position, pdu, members).await
            {
                pending.wal = pending.wal.max(wal);
            }
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
            if let Some(ev) = self.state_event_cached(state, t, k) {
                auth_events.push(EventRef {
                    event_id: ev.pdu.event_id.to_string(),
                    sha256: ev.reference_hash.clone(),
                });
            }
        }
        let mut prev_events = Vec::new();
        for short in &room.extremities {
            if let Some(ev) = self.cached(*short)? {
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
            origin_server_ts: now_millis(),
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
        let Some(short) = self.short.get(Kind::Event, target)? else {
            return Err(Error::not_found("No such event to redact"));
        };
        let Some(Json(mut stored)) = EVENTS.get(&*self.db, &short)? else {
            return Err(Error::not_found("No such event to redact"));
        };
        if stored.room != room_short {
            return Err(Error::not_found("No such event in this room"));
        }
        let original: CanonicalJsonObject = serde_json::from_value(stored.json.clone())
            .map_err(|e| Error::internal("stored event", e))?;
        let original_sender = original.get("sender").and_then(|v| v.as_str()).unwrap_or_default();
        if original_sender != redaction.sender.as_str() {
            let power = self.power_in(state, rules, redaction.sender.as_str());
            if power.level < power.levels["redact"].as_i64().unwrap_or(50) {
                return Err(Error::forbidden("You may not redact other users' events"));
            }
        }
        self.unindex_relation(batch, &stored, original_sender, &stored.json["content"])?;
        let because = ruma::canonical_json::RedactedBecause::from_json((*redaction.json).clone());
        let redacted = ruma::canonical_json::redact(original, &rules.redaction, Some(because))
            .map_err(|e| Error::internal("redacting an event", e))?;
        stored.json =
            serde_json::to_value(&redacted).map_err(|e| Error::internal("redacted event", e))?;
        EVENTS.put(batch, &short, &Json(stored));
        Ok(short)
    }

    /// Drops a room from the user's list after they left it (`/forget`).
    pub async fn forget(&self, room_id: &str, user_id: &str) -> Result<()> {
        let Some(room) = self.short.get(Kind::Room, room_id)? else {
            return Err(Error::not_found("Unknown room"));
        };
        match ROOM_MEMBERS.get(&*self.db, &(room, user_id.to_owned()))?.as_deref() {
            Some("join") | Some("invite") | Some("knock") => Err(Error::new(
                http::StatusCode::BAD_REQUEST,
                trellis_core::error::code::UNKNOWN,
                "Leave the room before forgetting it",
            )),
            None => Err(Error::not_found("You were never in this room")),
            Some(_) => {
                let mut batch = Batch::new();
                USER_ROOMS.delete(&mut batch, &(user_id.to_owned(), room));
                let written = commit(&self.db, batch).await;
                self.memberships_written();
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
        let event_short = self.short.get_or_create(batch, Kind::Event, pdu.event_id.as_str())?;
        let content: Value =
            serde_json::from_str(pdu.content.get()).map_err(|e| Error::bad_json(e.to_string()))?;
        let mut state_after_id = state_before_id;
        // Memberships, or the history visibility log (state events are few).
        let indexed_memberships = pdu.state_key.is_some() || placement.resolved();
        if let Some(key) = &pdu.state_key {
            let sk = self.short.get_or_create(
                batch,
                Kind::StateKey,
                &state_key_text(&pdu.kind.to_string(), key),
            )?;
            let mut after = before.map(|(_, s)| s.clone()).unwrap_or_default();
            after.insert(sk, event_short);
            state_after_id = self.snapshots.save(batch, before, &after)?;
            self.states.insert(state_after_id, Arc::new(after));
            if pdu.kind == TimelineEventType::RoomMember && !placement.resolved() {
                let membership = content["membership"].as_str().unwrap_or("leave");
                self.index_membership(batch, room_short, key, membership);
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
        let previous_bump = self.record(room_short)?.map_or(0, |r| r.bump_position);
        let ticket = self.stream.dispatch();
        // A dispatched position must be retired whatever happens, or the stream stalls.
        if let Err(e) =
            self.index_relation(batch, room_short, event_short, ticket.position, pdu, &content)
        {
            self.stream.retire(ticket);
            return Err(e);
        }
        self.log_event(batch, room_short, event_short, ticket.position, pdu, &content);
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
        let generation = self.cache.get(&event_short).1;
        match self.db.write_unsynced(std::mem::take(batch)) {
            Ok(wal) => {
                // Before the position is retired: a sync that sees the event also sees
                // the room's new position (and, for a membership, the user's rooms).
                self.records.put(room_short, Arc::new(record));
                if indexed_memberships {
                    self.memberships_written();
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
                self.cache.insert(event_short, Arc::new(cached), generation);
                let mut wake = vec![room_id.to_owned()];
                if pdu.kind == TimelineEventType::RoomMember
                    && let Some(target) = &pdu.state_key
                {
                    wake.push(super::stream::user_key(target));
                }
                let members = match self.joined_members(room_id) {
                    Ok(members) => Some(members),
                    Err(e) => {
                        tracing::warn!(room_id, error = %e, "reading the joined members failed");
                        None
                    }
                };
                Ok(Pending { stream: ticket, wal, wake, pdu: shared, members })
            }
            Err(e) => {
                self.stream.retire(ticket);
                Err(e.into())
            }
        }
    }

    /// Waits until a stored event is durable, then lets readers of the stream see it.
    pub(super) async fn finish(&self, pending: Pending) -> Result<()> {
        let synced = self.durability.wait(pending.wal).await;
        let retired = self.stream.retire(pending.stream);
        for key in &pending.wake {
            self.stream.wake_for(retired, key);
        }
        synced
    }

    /// Events of a room from oldest to newest, after stream position `after` (exclusive).
    pub fn timeline_forwards(
        &self,
        room_id: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Arc<Pdu>)>> {
        use std::ops::Bound::{Excluded, Unbounded};
        let page =
            self.scan_timeline(room_id, Excluded(after), Unbounded, true, limit, |_, _| Ok(true))?;
        Ok(page.events)
    }

    /// Events of a room from newest to oldest, before stream position `before` (exclusive).
    pub fn timeline_backwards(
        &self,
        room_id: &str,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, Arc<Pdu>)>> {
        use std::ops::Bound::{Excluded, Unbounded};
        let end = before.map_or(Unbounded, Excluded);
        let page = self.scan_timeline(room_id, Unbounded, end, false, limit, |_, _| Ok(true))?;
        Ok(page.events)
    }

    /// Up to `limit` events with positions within `(start, end)` of one room that
    /// `accept` lets through, oldest first when `forward`. Only events already visible
    /// on the stream are returned, and at most [`SCAN_CAP`] entries are looked at, so a
    /// sparse filter yields a short page with `more` set rather than a long scan.
    pub fn scan_timeline(
        &self,
        room_id: &str,
        start: std::ops::Bound<u64>,
        end: std::ops::Bound<u64>,
        forward: bool,
        limit: usize,
        mut accept: impl FnMut(u64, &Pdu) -> Result<bool>,
    ) -> Result<TimelinePage> {
        use std::ops::Bound::{Excluded, Included, Unbounded};
        let mut page = TimelinePage { events: Vec::new(), last: None, more: false };
        let Some(room) = self.short.get(Kind::Room, room_id)? else { return Ok(page) };
        let visible = self.stream.visible();
        // Unbounded positions still stay within the room's key range.
        let lo = match start {
            Included(p) => Included((room, p)),
            Excluded(p) => Excluded((room, p)),
            Unbounded => Included((room, 0)),
        };
        let hi = match end {
            Included(p) => Included((room, p.min(visible))),
            Excluded(p) if p <= visible => Excluded((room, p)),
            _ => Included((room, visible)),
        };
        let direction = if forward {
            trellis_store::Direction::Forward
        } else {
            trellis_store::Direction::Backward
        };
        for (scanned, entry) in
            TIMELINE.scan_range(&*self.db, lo.as_ref(), hi.as_ref(), direction)?.enumerate()
        {
            if page.events.len() == limit || scanned == SCAN_CAP {
                page.more = true;
                break;
            }
            let ((_, pos), ev) = entry?;
            page.last = Some(pos);
            if let Some(event) = self.cached(ev)?
                && accept(pos, &event.pdu)?
            {
                page.events.push((pos, event.pdu.clone()));
            }
        }
        Ok(page)
    }

    /// Every room in `user_id`'s list (any membership, forgotten rooms excepted), with
    /// what a sync needs to skip the rooms where nothing happened: one scan of the
    /// user's index and one record read per room.
    pub fn user_rooms(&self, user_id: &str) -> Result<Vec<UserRoom>> {
        let user = user_id.to_owned();
        let memberships = self.user_rooms.get_or_load(user.clone(), || {
            USER_ROOMS
                .scan_prefix(&*self.db, &user, trellis_store::Direction::Forward)?
                .map(|entry| entry.map(|((_, room), membership)| (room, membership)))
                .collect::<Result<Vec<_>, _>>()
        })?;
        let mut out = Vec::with_capacity(memberships.len());
        for (room, membership) in memberships.iter() {
            if let Some(r) = self.record(*room)? {
                out.push(UserRoom {
                    room_id: r.room_id.clone(),
                    membership: membership.clone(),
                    last_position: r.last_position,
                    bump_position: r.bump(),
                });
            }
        }
        Ok(out)
    }

    /// Rooms in which `user_id` has `membership`.
    pub fn rooms_of(&self, user_id: &str, membership: &str) -> Result<Vec<String>> {
        let rooms = self.user_rooms(user_id)?.into_iter();
        Ok(rooms.filter(|r| r.membership == membership).map(|r| r.room_id).collect())
    }

    /// Joined members of a room as of its current state. Kept per state snapshot, which
    /// changes with every membership change (the member index is written in the same
    /// batch as the room's new snapshot), so an entry is never stale for its snapshot.
    pub fn joined_members(&self, room_id: &str) -> Result<Arc<Vec<String>>> {
        let Some(short) = self.short.get(Kind::Room, room_id)? else { return Ok(Arc::default()) };
        let Some(record) = self.record(short)? else { return Ok(Arc::default()) };
        let (hit, generation) = self.joined.get(&short);
        if let Some(hit) = hit
            && hit.0 == record.state
        {
            return Ok(hit.1.clone());
        }
        let members = Arc::new(self.members(room_id, "join")?);
        self.joined.insert(short, Arc::new((record.state, members.clone())), generation);
        Ok(members)
    }

    /// What a sync's room summary says of the members, as of the room's current state.
    pub fn member_summary(&self, room_id: &str) -> Result<MemberSummary> {
        let Some(short) = self.short.get(Kind::Room, room_id)? else {
            return Ok(Default::default());
        };
        let Some(record) = self.record(short)? else { return Ok(Default::default()) };
        let (hit, generation) = self.summaries.get(&short);
        if let Some(hit) = hit
            && hit.0 == record.state
        {
            return Ok(hit.1.clone());
        }
        let (joined, invited) = self.joined_and_invited(room_id)?;
        let mut first: Vec<String> = joined.iter().chain(invited.iter()).cloned().collect();
        first.sort();
        first.truncate(SUMMARY_FIRST_MEMBERS);
        let summary = MemberSummary { joined: joined.len(), invited: invited.len(), first };
        self.summaries.insert(short, Arc::new((record.state, summary.clone())), generation);
        Ok(summary)
    }

    /// Joined and invited members of a room, in one scan.
    pub fn joined_and_invited(&self, room_id: &str) -> Result<(Vec<String>, Vec<String>)> {
        let Some(room) = self.short.get(Kind::Room, room_id)? else {
            return Ok(Default::default());
        };
        let (mut joined, mut invited) = (Vec::new(), Vec::new());
        for entry in
            ROOM_MEMBERS.scan_prefix(&*self.db, &room, trellis_store::Direction::Forward)?
        {
            let ((_, user), m) = entry?;
            match m.as_str() {
                "join" => joined.push(user),
                "invite" => invited.push(user),
                _ => {}
            }
        }
        Ok((joined, invited))
    }

    /// Members of a room with `membership`.
    pub fn members(&self, room_id: &str, membership: &str) -> Result<Vec<String>> {
        let Some(room) = self.short.get(Kind::Room, room_id)? else { return Ok(Vec::new()) };
        let mut out = Vec::new();
        for entry in
            ROOM_MEMBERS.scan_prefix(&*self.db, &room, trellis_store::Direction::Forward)?
        {
            let ((_, user), m) = entry?;
            if m == membership {
                out.push(user);
            }
        }
        Ok(out)
    }

    /// Whether a user of `server` has one of `memberships` in the room (one scan).
    pub fn has_member_from(
        &self,
        room_id: &str,
        server: &str,
        memberships: &[&str],
    ) -> Result<bool> {
        let Some(room) = self.short.get(Kind::Room, room_id)? else { return Ok(false) };
        for entry in
            ROOM_MEMBERS.scan_prefix(&*self.db, &room, trellis_store::Direction::Forward)?
        {
            let ((_, user), m) = entry?;
            if memberships.contains(&m.as_str())
                && user.split_once(':').is_some_and(|(_, s)| s == server)
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The current state event `(kind, state_key)` of a room.
    /// The display names in the room's current state of `users` (`None`: no member
    /// event or no name), read from one state snapshot.
    pub fn display_names(&self, room_id: &str, users: &[String]) -> Result<Vec<Option<String>>> {
        #[derive(serde::Deserialize)]
        struct Named {
            displayname: Option<String>,
        }
        let Some((_, room)) = self.room(room_id)? else { return Ok(vec![None; users.len()]) };
        let state = self.state_at(room.state)?;
        let kind = StateEventType::RoomMember;
        Ok(users
            .iter()
            .map(|user| {
                let event = self.state_event_cached(&state, &kind, user)?;
                serde_json::from_str::<Named>(event.pdu.content.get()).ok()?.displayname
            })
            .collect())
    }

    pub fn state_of(&self, room_id: &str, kind: &str, state_key: &str) -> Result<Option<Pdu>> {
        let Some((_, room)) = self.room(room_id)? else { return Ok(None) };
        let state = self.state_at(room.state)?;
        Ok(self.state_event(&state, &StateEventType::from(kind), state_key).map(|p| (*p).clone()))
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
        let t = Timeline::new(db, Arc::new(keys), "example.org").unwrap();
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

            assert_eq!(t.membership(&room, bob).unwrap().as_deref(), Some("join"));
            let state = t.current_state(&room).unwrap();
            let kinds: Vec<String> = state.iter().map(|p| p.kind.to_string()).collect();
            for k in ["m.room.create", "m.room.member", "m.room.power_levels", "m.room.join_rules"]
            {
                assert!(kinds.contains(&k.to_owned()), "{version}: {kinds:?}");
            }
            assert_eq!(state.iter().filter(|p| p.kind == TimelineEventType::RoomMember).count(), 2);

            // The timeline, newest first, links each event to the previous one.
            let events = t.timeline_backwards(&room, None, 100).unwrap();
            assert_eq!(events.len(), 6, "{version}");
            assert_eq!(events[0].1.event_id, msg.event_id);
            for pair in events.windows(2) {
                assert!(pair[0].0 > pair[1].0, "positions decrease");
                assert_eq!(pair[0].1.prev_events, vec![pair[1].1.event_id.clone()], "{version}");
                assert_eq!(pair[0].1.depth, pair[1].1.depth + 1);
            }
            let older = t.timeline_backwards(&room, Some(events[2].0), 2).unwrap();
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
