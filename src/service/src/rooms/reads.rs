//! Rooms as stored, read through shared caches: records, events, state snapshots,
//! timelines and memberships. Every read path (sync, `/messages`, federation, push
//! rules) reads rooms here; the writers (`append.rs`, `intake.rs`) write the same tables
//! and keep these caches in step.

use std::sync::Arc;

use ruma::{CanonicalJsonObject, OwnedEventId, RoomVersionId, events::StateEventType};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use trellis_core::{Error, Result};
use trellis_store::{Db, Json, Table, catalog};

use super::{
    Pdu,
    cache::{CachedEvent, EventCache, ShortCache, StateCache},
    members::MemberSummary,
    short::{Kind, ShortIds, state_key_text},
    state::{StateSet, StateSnapshots},
    stream::StreamPositions,
};

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

pub(super) const ROOMS: Table<u64, Json<RoomRecord>> = Table::new(&catalog::ROOMS);
pub(super) const EVENTS: Table<u64, Json<StoredEvent>> = Table::new(&catalog::EVENTS);
pub(super) const TIMELINE: Table<(u64, u64), u64> = Table::new(&catalog::TIMELINE);

/// Parsed events kept in memory (auth events of busy rooms, recent timelines), in
/// estimated bytes: about 20,000 small messages.
const EVENT_CACHE_BYTES: usize = 64 << 20;
/// A record is ~200 bytes parsed: 100k rooms is ~20 MB at most.
const ROOM_CACHE_ENTRIES: usize = 100_000;
/// Member lists are the size of their rooms: fewer of them.
const JOINED_CACHE_ENTRIES: usize = 10_000;

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

/// A user's standing in a room's power levels.
#[derive(Debug, Clone)]
pub struct Power {
    pub level: i64,
    /// The `m.room.power_levels` content (`null` if the room has none).
    pub levels: Value,
}

pub struct Rooms {
    pub(super) db: Db,
    pub(super) server_name: ruma::OwnedServerName,
    pub(super) short: ShortIds,
    pub(super) snapshots: StateSnapshots,
    pub stream: Arc<StreamPositions>,
    pub(super) cache: EventCache,
    /// Room records: every sync reads one per room of the user.
    pub(super) records: ShortCache<RoomRecord>,
    /// Joined members by room, with the state snapshot they belong to: every event
    /// notifies them, and messages leave the snapshot as it is.
    pub(super) joined: ShortCache<(u64, Arc<Vec<String>>)>,
    /// Each user's rooms and membership there (short ids): every sync reads them twice.
    /// Writers of the membership index clear it once their batch is written.
    pub(super) user_rooms: ShortCache<Vec<(u64, String)>, String>,
    /// Membership and history visibility logs (see `visibility.rs`), cleared alike.
    pub(super) logs: super::visibility::LogCaches,
    /// Member counts and the first members by name, per room and state snapshot: every
    /// sync's room summary, which would otherwise read the whole member list.
    pub(super) summaries: ShortCache<(u64, MemberSummary)>,
    pub(super) states: StateCache,
    /// A room's state at a stream position (`shared_state_at_position`).
    pub(super) position_states: ShortCache<StateSet, (String, u64)>,
    /// Erased users, whose events later joiners get redacted.
    pub erasures: super::erasure::Erasures,
    /// How long messages live (see `retention.rs`).
    pub(super) retention: super::retention::RetentionSettings,
}

impl Rooms {
    /// Opens the rooms of `db`, with the stream positions resuming after the newest
    /// event of any room (one row per room to read at start-up, not one per event), and
    /// rebuilds indexes an older database lacks.
    pub fn open(db: Db, server_name: &str) -> Result<Self> {
        let server_name = ruma::OwnedServerName::try_from(server_name)
            .map_err(|e| Error::internal("server name", e))?;
        let last = ROOMS
            .scan_range(
                &*db,
                std::ops::Bound::Unbounded,
                std::ops::Bound::Unbounded,
                trellis_store::Direction::Forward,
            )?
            .map(|e| e.map(|(_, Json(r))| r.last_position))
            .try_fold(0u64, |max, pos| pos.map(|p| max.max(p)))?;
        let rooms = Self {
            short: ShortIds::new(db.clone())?,
            erasures: super::erasure::Erasures::load(db.clone())?,
            snapshots: StateSnapshots::new(db.clone())?,
            stream: Arc::new(StreamPositions::persistent(db.clone(), last)?),
            db,
            server_name,
            cache: EventCache::with_bytes(EVENT_CACHE_BYTES),
            records: ShortCache::new(ROOM_CACHE_ENTRIES),
            joined: ShortCache::new(JOINED_CACHE_ENTRIES),
            user_rooms: ShortCache::new(USER_ROOMS_CACHE_ENTRIES),
            logs: super::visibility::LogCaches::new(),
            summaries: ShortCache::new(JOINED_CACHE_ENTRIES),
            states: StateCache::new(STATE_CACHE_ENTRIES),
            position_states: ShortCache::new(POSITION_STATE_CACHE_ENTRIES),
            retention: Default::default(),
        };
        rooms.backfill_indexes()?;
        Ok(rooms)
    }

    /// The rooms with events after stream position `after`, by short id: for indexes
    /// derived from the timelines (search) catching up.
    pub fn rooms_with_events_after(&self, after: u64) -> Result<Vec<(u64, String)>> {
        let mut out = Vec::new();
        let all = std::ops::Bound::Unbounded;
        for row in ROOMS.scan_range(&*self.db, all, all, trellis_store::Direction::Forward)? {
            let (short, Json(record)) = row?;
            if record.last_position > after
                && let Some(room_id) = self.short.text(Kind::Room, short)?
            {
                out.push((short, room_id));
            }
        }
        Ok(out)
    }

    /// How many events the room's timeline holds (reads every key: for admins' room
    /// statistics, not for requests).
    pub fn event_count(&self, room_id: &str) -> Result<u64> {
        let Some(short) = self.short.get(Kind::Room, room_id)? else { return Ok(0) };
        let mut n = 0;
        for row in TIMELINE.scan_prefix(&*self.db, &short, trellis_store::Direction::Forward)? {
            row?;
            n += 1;
        }
        Ok(n)
    }

    pub(super) fn room_by_short(&self, short: u64) -> Result<Option<RoomRecord>> {
        Ok(self.record(short)?.map(|r| (*r).clone()))
    }

    /// A room's record, through the cache.
    pub(super) fn record(&self, short: u64) -> Result<Option<Arc<RoomRecord>>> {
        let (hit, generation) = self.records.get(&short);
        if hit.is_some() {
            return Ok(hit);
        }
        let Some(Json(record)) = ROOMS.get(&*self.db, &short)? else { return Ok(None) };
        let record = Arc::new(record);
        self.records.insert(short, record.clone(), generation);
        Ok(Some(record))
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

    pub fn state_event(
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

    /// The current state event `(kind, state_key)` of a room.
    pub fn state_of(&self, room_id: &str, kind: &str, state_key: &str) -> Result<Option<Pdu>> {
        let Some((_, room)) = self.room(room_id)? else { return Ok(None) };
        let state = self.state_at(room.state)?;
        Ok(self.state_event(&state, &StateEventType::from(kind), state_key).map(|p| (*p).clone()))
    }

    /// A non-empty text `field` of the room's current `(kind, "")` state event: its
    /// name (`m.room.name`, `name`), canonical alias, topic.
    pub fn state_text(&self, room_id: &str, kind: &str, field: &str) -> Result<Option<String>> {
        Ok(self.state_of(room_id, kind, "")?.and_then(|event| {
            let content: serde_json::Value = serde_json::from_str(event.content.get()).ok()?;
            content[field].as_str().filter(|text| !text.is_empty()).map(str::to_owned)
        }))
    }
}
