//! Who may see which event: the spec's history visibility rules, answered from two small
//! logs kept per room (each user's membership changes and the room's history visibility
//! changes, keyed by stream position) so that checking an event is a couple of seeks
//! instead of loading the room state at that event.

use std::{
    ops::Bound::{Excluded, Included},
    sync::Arc,
};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use trellis_core::Result;
use trellis_store::{Batch, Direction, Json, Table, catalog};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct MemberRow {
    membership: String,
    event: u64,
}

use super::{Pdu, Rooms, cache::ShortCache, short::Kind};

/// The two logs as read, kept until a batch writing to them is written (see
/// `Rooms::memberships_written`): every sync reads them for each room that changed.
pub(super) struct LogCaches {
    memberships: ShortCache<Vec<(u64, String)>, (u64, String)>,
    visibilities: ShortCache<Vec<(u64, String)>>,
}

impl LogCaches {
    pub(super) fn new() -> Self {
        Self { memberships: ShortCache::new(100_000), visibilities: ShortCache::new(10_000) }
    }

    pub(super) fn clear(&self) {
        self.memberships.clear();
        self.visibilities.clear();
    }
}

pub(super) const MEMBERSHIP_LOG: Table<(u64, String, u64), Json<MemberRow>> =
    Table::new(&catalog::MEMBERSHIP_LOG);
pub(super) const VISIBILITY_LOG: Table<(u64, u64), String> = Table::new(&catalog::VISIBILITY_LOG);
/// (room, position) -> user whose membership changed: device list tracking asks which
/// members came and went between two positions.
pub(super) const MEMBER_CHANGES: Table<(u64, u64), String> = Table::new(&catalog::MEMBER_CHANGES);
/// Changes between two positions are read with one scan however many rooms a user is
/// in: the key is (position, room).
pub(super) const EVENT_TIMES: Table<(u64, u64, u64), u64> = Table::new(&catalog::EVENT_TIMES);
const TIMELINE_ALL: Table<(u64, u64), u64> = Table::new(&catalog::TIMELINE);

/// What a room shows a user: the spec's default visibility is `shared`.
const DEFAULT_VISIBILITY: &str = "shared";

/// Set once the per-event indexes (membership and visibility logs, timestamps,
/// relations) cover every stored event.
const INDEXED_KEY: &str = "event_indexes_v1";
/// The stream's note for membership changes in any room (see
/// `StreamPositions::note_change`): noted while the batch is built, before its position
/// is retired.
pub const MEMBER_CHANGES_NOTE: &str = "member_changes";

/// Set once `MEMBER_CHANGES` covers the membership log.
const MEMBER_CHANGES_KEY: &str = "member_changes_v2";
const META: Table<String, u64> = Table::new(&catalog::META);
/// Events indexed per batch while backfilling.
const BACKFILL_BATCH: usize = 1_000;

impl Rooms {
    /// Databases written before these indexes existed get them built from the stored
    /// timelines once, at start-up (in stream order, so relations find their parents).
    pub(super) fn backfill_indexes(&self) -> Result<()> {
        self.backfill_event_indexes()?;
        self.backfill_member_changes()
    }

    fn backfill_event_indexes(&self) -> Result<()> {
        if META.get(&*self.db, &INDEXED_KEY.to_owned())?.is_some() {
            return Ok(());
        }
        let mut entries = Vec::new();
        for row in TIMELINE_ALL.scan_range(
            &*self.db,
            std::ops::Bound::Unbounded,
            std::ops::Bound::Unbounded,
            Direction::Forward,
        )? {
            let ((room, position), event) = row?;
            entries.push((position, room, event));
        }
        entries.sort_unstable();
        let total = entries.len();
        for chunk in entries.chunks(BACKFILL_BATCH) {
            let mut batch = Batch::new();
            for (position, room, event) in chunk {
                let Some(pdu) = self.pdu_by_short(*event)? else { continue };
                let content: Value = serde_json::from_str(pdu.content.get()).unwrap_or(Value::Null);
                self.log_event(&mut batch, *room, *event, *position, &pdu, &content);
                self.index_relation(&mut batch, *room, *event, *position, &pdu, &content)?;
            }
            self.db.write(batch)?;
        }
        let mut batch = Batch::new();
        META.put(&mut batch, &INDEXED_KEY.to_owned(), &1);
        self.db.write(batch)?;
        if total > 0 {
            tracing::info!(events = total, "built the event indexes of existing rooms");
        }
        Ok(())
    }

    /// The membership-change index came after the membership log: derive it once.
    fn backfill_member_changes(&self) -> Result<()> {
        if META.get(&*self.db, &MEMBER_CHANGES_KEY.to_owned())?.is_some() {
            return Ok(());
        }
        let mut batch = Batch::new();
        for row in MEMBERSHIP_LOG.scan_range(
            &*self.db,
            std::ops::Bound::Unbounded,
            std::ops::Bound::Unbounded,
            Direction::Forward,
        )? {
            let ((room, user, position), _) = row?;
            MEMBER_CHANGES.put(&mut batch, &(position, room), &user);
        }
        META.put(&mut batch, &MEMBER_CHANGES_KEY.to_owned(), &1);
        self.db.write(batch)?;
        Ok(())
    }

    /// Membership changes in `(since, now]` in every room, in order: `(room id, user)`.
    pub fn member_changes(&self, since: u64, now: u64) -> Result<Vec<(String, String)>> {
        let start = (since, u64::MAX);
        let end = (now, u64::MAX);
        let mut rooms: std::collections::HashMap<u64, Option<String>> = Default::default();
        let mut out = Vec::new();
        for row in MEMBER_CHANGES.scan_range(
            &*self.db,
            Excluded(&start),
            Included(&end),
            Direction::Forward,
        )? {
            let ((_, room), user) = row?;
            let room_id = match rooms.get(&room) {
                Some(id) => id.clone(),
                None => {
                    let id = self.short.text(Kind::Room, room)?;
                    rooms.insert(room, id.clone());
                    id
                }
            };
            if let Some(room_id) = room_id {
                out.push((room_id, user));
            }
        }
        Ok(out)
    }

    /// Records what visibility checks and timestamp lookups need about a stored event.
    pub(super) fn log_event(
        &self,
        batch: &mut Batch,
        room: u64,
        event_short: u64,
        position: u64,
        pdu: &Pdu,
        content: &Value,
    ) {
        let ts = u64::from(pdu.origin_server_ts.get());
        EVENT_TIMES.put(batch, &(room, ts, position), &event_short);
        let Some(key) = &pdu.state_key else { return };
        match pdu.kind.to_string().as_str() {
            "m.room.member" => {
                let membership = content["membership"].as_str().unwrap_or("leave");
                let row = MemberRow { membership: membership.to_owned(), event: event_short };
                MEMBERSHIP_LOG.put(batch, &(room, key.clone(), position), &Json(row));
                MEMBER_CHANGES.put(batch, &(position, room), key);
                self.stream.note_change(MEMBER_CHANGES_NOTE, position);
            }
            "m.room.history_visibility" if key.is_empty() => {
                let visibility =
                    content["history_visibility"].as_str().unwrap_or(DEFAULT_VISIBILITY);
                VISIBILITY_LOG.put(batch, &(room, position), &visibility.to_owned());
            }
            _ => {}
        }
    }

    /// The history visibility a room had when this server joined it over federation
    /// (its state then came whole, not as logged events): in force from the start.
    pub(super) fn log_imported_visibility(&self, batch: &mut Batch, room: u64, visibility: &str) {
        VISIBILITY_LOG.put(batch, &(room, 0), &visibility.to_owned());
    }

    /// The user's membership changes in the room, `(position, membership)` in order.
    pub fn membership_log(&self, room_id: &str, user: &str) -> Result<Arc<Vec<(u64, String)>>> {
        let Some(room) = self.short.get(Kind::Room, room_id)? else { return Ok(Arc::default()) };
        let key = (room, user.to_owned());
        let log = self.logs.memberships.get_or_load(key.clone(), || {
            MEMBERSHIP_LOG
                .scan_prefix(&*self.db, &key, Direction::Forward)?
                .map(|row| row.map(|((_, _, pos), Json(row))| (pos, row.membership)))
                .collect::<std::result::Result<_, _>>()
        })?;
        Ok(log)
    }

    /// A room's history visibility changes, `(position, visibility)` oldest first.
    fn visibility_log(&self, room: u64) -> Result<Arc<Vec<(u64, String)>>> {
        let log = self.logs.visibilities.get_or_load(room, || {
            VISIBILITY_LOG
                .scan_prefix(&*self.db, &room, Direction::Forward)?
                .map(|row| row.map(|((_, pos), visibility)| (pos, visibility)))
                .collect::<std::result::Result<_, _>>()
        })?;
        Ok(log)
    }

    /// What one user may see of one room, loaded once: a page of history is then
    /// checked in memory. A user's membership changes and a room's visibility changes
    /// are few, so both lists are small.
    pub fn visibility_view(&self, room_id: &str, user: &str) -> Result<VisibilityView> {
        let mut view = VisibilityView { user: user.to_owned(), ..VisibilityView::default() };
        let Some(room) = self.short.get(Kind::Room, room_id)? else { return Ok(view) };
        view.memberships = self.membership_log(room_id, user)?;
        view.visibilities = self.visibility_log(room)?;
        view.expired_before = self.expired_before(room_id)?;
        Ok(view)
    }

    /// The event closest to `ts` (ms): the first at or after it going forward, the last
    /// at or before it going backward, among those `accept` lets through.
    pub fn event_near_time(
        &self,
        room_id: &str,
        ts: u64,
        forward: bool,
        mut accept: impl FnMut(u64, &Pdu) -> Result<bool>,
    ) -> Result<Option<(u64, Pdu)>> {
        let Some(room) = self.short.get(Kind::Room, room_id)? else { return Ok(None) };
        let (lo, hi, direction) = if forward {
            (Included((room, ts, 0)), Included((room, u64::MAX, u64::MAX)), Direction::Forward)
        } else {
            (Included((room, 0, 0)), Included((room, ts, u64::MAX)), Direction::Backward)
        };
        let visible = self.stream.visible();
        for row in
            EVENT_TIMES.scan_range(&*self.db, lo.as_ref(), hi.as_ref(), direction)?.take(10_000)
        {
            let ((_, _, pos), short) = row?;
            if pos > visible {
                continue;
            }
            if let Some(pdu) = self.pdu_by_short(short)?
                && accept(pos, &pdu)?
            {
                return Ok(Some((pos, pdu)));
            }
        }
        Ok(None)
    }

    /// The member events in effect at `position`, one per user who had one then: for
    /// `/members` with `at`.
    pub fn members_at(&self, room_id: &str, position: u64) -> Result<Vec<(String, Pdu)>> {
        let Some(room) = self.short.get(Kind::Room, room_id)? else { return Ok(Vec::new()) };
        let mut latest: Vec<(String, u64)> = Vec::new();
        for row in MEMBERSHIP_LOG.scan_prefix(&*self.db, &room, Direction::Forward)? {
            let ((_, user, pos), Json(row)) = row?;
            if pos > position {
                continue;
            }
            match latest.last_mut() {
                Some((u, event)) if *u == user => *event = row.event,
                _ => latest.push((user, row.event)),
            }
        }
        let mut out = Vec::with_capacity(latest.len());
        for (user, event) in latest {
            if let Some(pdu) = self.pdu_by_short(event)? {
                out.push((user, pdu));
            }
        }
        Ok(out)
    }

    /// The stream position of the user's latest membership change in the room.
    pub fn last_membership_position(&self, room_id: &str, user: &str) -> Result<Option<u64>> {
        Ok(self.membership_log(room_id, user)?.last().map(|(pos, _)| *pos))
    }
}

/// One user's view of one room's history (see [`Rooms::visibility_view`]).
#[derive(Debug, Default)]
pub struct VisibilityView {
    user: String,
    /// `(position, membership)` in position order.
    memberships: Arc<Vec<(u64, String)>>,
    /// `(position, history visibility)` in position order.
    visibilities: Arc<Vec<(u64, String)>>,
    /// Messages sent before this time (ms) have expired under the room's retention
    /// policy: nobody sees them any more. 0 when none expire.
    expired_before: u64,
}

/// The stretches of `memberships` (a [`Rooms::membership_log`]) during which the user
/// was joined, `(first position, last position)`, oldest first.
pub fn joined_stretches(memberships: &[(u64, String)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for (i, (pos, membership)) in memberships.iter().enumerate() {
        if membership == "join" && (i == 0 || memberships[i - 1].1 != "join") {
            let end = memberships[i + 1..]
                .iter()
                .find(|(_, m)| m != "join")
                .map_or(u64::MAX, |(p, _)| p.saturating_sub(1));
            out.push((*pos, end));
        }
    }
    out
}

/// The entry in effect at `position`: the last one at or before it.
pub fn at(entries: &[(u64, String)], position: u64) -> Option<&str> {
    let idx = entries.partition_point(|(p, _)| *p <= position);
    idx.checked_sub(1).map(|i| entries[i].1.as_str())
}

/// The entry in effect just before `position`: the last one before it.
fn before(entries: &[(u64, String)], position: u64) -> Option<&str> {
    at(entries, position.checked_sub(1)?)
}

impl VisibilityView {
    /// The spec's history visibility rules for the event at `position`.
    pub fn may_see(&self, position: u64, pdu: &Pdu) -> bool {
        if Rooms::is_expired(pdu, self.expired_before) {
            return false;
        }
        // Users always see their own membership changes (a kick or ban included).
        if pdu.state_key.as_deref() == Some(self.user.as_str())
            && pdu.kind.to_string() == "m.room.member"
        {
            return true;
        }
        let visibility = at(&self.visibilities, position).unwrap_or(DEFAULT_VISIBILITY);
        if self.allows(visibility, position) {
            return true;
        }
        // A change of history visibility is itself seen by whoever the setting before it
        // let see the room then, so a later joiner learns why older history is hidden.
        pdu.kind.to_string() == "m.room.history_visibility"
            && pdu.state_key.as_deref() == Some("")
            && self.allows(
                before(&self.visibilities, position).unwrap_or(DEFAULT_VISIBILITY),
                position,
            )
    }

    /// Whether `visibility`, in effect at `position`, shows the user an event there.
    fn allows(&self, visibility: &str, position: u64) -> bool {
        if visibility == "world_readable" {
            return true;
        }
        match at(&self.memberships, position) {
            Some("join") => true,
            Some("invite") if visibility == "invited" => true,
            _ => {
                visibility == "shared"
                    && self.memberships.iter().any(|(p, m)| *p > position && m == "join")
            }
        }
    }

    /// Whether the user had joined the room at or before `position`.
    pub fn joined_by(&self, position: u64) -> bool {
        self.memberships.iter().any(|(p, m)| *p <= position && m == "join")
    }

    /// Whether the user may read the room at all: they have been in it, or anyone may.
    pub fn may_read(&self) -> bool {
        !self.memberships.is_empty()
            || self.visibilities.last().is_some_and(|(_, v)| v == "world_readable")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joined_stretches_run_from_a_join_to_the_position_before_the_next_non_join() {
        let log = |v: &[(u64, &str)]| -> Vec<(u64, String)> {
            v.iter().map(|(p, s)| (*p, (*s).to_owned())).collect()
        };
        assert_eq!(joined_stretches(&log(&[])), vec![]);
        assert_eq!(joined_stretches(&log(&[(3, "invite")])), vec![]);
        // A profile change (join after join) does not start a new stretch.
        let rejoined = log(&[(2, "invite"), (5, "join"), (9, "join"), (12, "leave"), (20, "join")]);
        assert_eq!(joined_stretches(&rejoined), vec![(5, 11), (20, u64::MAX)]);
        assert_eq!(joined_stretches(&log(&[(1, "join"), (4, "ban")])), vec![(1, 3)]);
    }

    fn view(memberships: &[(u64, &str)], visibilities: &[(u64, &str)]) -> VisibilityView {
        let own =
            |v: &[(u64, &str)]| Arc::new(v.iter().map(|(p, s)| (*p, (*s).to_owned())).collect());
        VisibilityView {
            user: "@u:x".into(),
            memberships: own(memberships),
            visibilities: own(visibilities),
            expired_before: 0,
        }
    }

    fn message() -> Pdu {
        let json: ruma::CanonicalJsonObject = serde_json::from_value(serde_json::json!({
            "room_id": "!r:x", "sender": "@a:x", "origin_server_ts": 1, "type": "m.room.message",
            "content": {}, "prev_events": [], "auth_events": [], "depth": 2,
        }))
        .unwrap();
        Pdu::from_json(ruma::OwnedEventId::try_from("$e").unwrap(), json).unwrap()
    }

    #[test]
    fn expired_messages_are_seen_by_nobody_but_state_stays() {
        let mut v = view(&[(1, "join")], &[(1, "world_readable")]);
        let m = message();
        assert!(v.may_see(5, &m));
        v.expired_before = 2;
        assert!(!v.may_see(5, &m), "sent at 1, expired before 2");
        v.expired_before = 1;
        assert!(v.may_see(5, &m), "sent at 1 is not before 1");
        let mut state = message();
        state.state_key = Some(String::new());
        v.expired_before = 1_000;
        assert!(v.may_see(5, &state), "state never expires");
    }

    #[test]
    fn the_spec_rules_by_position() {
        let m = message();
        // Joined at 10, left at 20, visibility `joined` from 5 and `shared` from 30.
        let v = view(&[(10, "join"), (20, "leave")], &[(5, "joined"), (30, "shared")]);
        assert!(!v.may_see(9, &m), "before joining");
        assert!(v.may_see(15, &m), "while joined");
        assert!(!v.may_see(25, &m), "after leaving");
        assert!(!v.may_see(35, &m), "shared, but never joined again");
        // Rejoining later makes `shared` history visible, not `joined` history.
        let v =
            view(&[(10, "join"), (20, "leave"), (40, "join")], &[(5, "joined"), (30, "shared")]);
        assert!(v.may_see(35, &m));
        assert!(!v.may_see(25, &m));
        // `invited`: visible while invited; world_readable: visible to anyone.
        let v = view(&[(10, "invite")], &[(1, "invited")]);
        assert!(v.may_see(12, &m) && !v.may_see(9, &m));
        let v = view(&[], &[(1, "world_readable")]);
        assert!(v.may_see(2, &m) && v.may_read());
        assert!(!view(&[], &[]).may_read());
    }

    #[test]
    fn a_visibility_change_is_seen_under_the_setting_before_it_too() {
        let json: ruma::CanonicalJsonObject = serde_json::from_value(serde_json::json!({
            "room_id": "!r:x", "sender": "@a:x", "origin_server_ts": 1, "depth": 3,
            "type": "m.room.history_visibility", "state_key": "",
            "content": {"history_visibility": "joined"}, "prev_events": [], "auth_events": [],
        }))
        .unwrap();
        let change = Pdu::from_json(ruma::OwnedEventId::try_from("$v").unwrap(), json).unwrap();
        // `shared` until 10, `joined` from 10; the user joins at 20.
        let v = view(&[(20, "join")], &[(1, "shared"), (10, "joined")]);
        assert!(v.may_see(5, &message()), "shared history before the change");
        assert!(v.may_see(10, &change), "the change, under the `shared` before it");
        assert!(!v.may_see(15, &message()), "joined-only history before the join");
        // Under `joined` before and after, the change is as hidden as any event.
        let v = view(&[(20, "join")], &[(1, "joined"), (10, "invited")]);
        assert!(!v.may_see(10, &change));
    }

    #[tokio::test]
    async fn indexes_missing_from_an_older_database_are_rebuilt_at_start() {
        use std::sync::Arc;

        use trellis_core::config::StorageConfig;

        use crate::{
            keys::ServerKeys,
            rooms::append::{NewEvent, Timeline},
        };

        let dir = tempfile::tempdir().unwrap();
        let cfg = StorageConfig { block_cache_mb: 8, sync_writes: false, ..Default::default() };
        let db = trellis_store::open(&dir.path().join("db"), &cfg).unwrap();
        let keys = Arc::new(
            ServerKeys::load_or_generate(&dir.path().join("key"), "example.org", 24).unwrap(),
        );
        let rooms = Arc::new(Rooms::open(db.clone(), "example.org").unwrap());
        let t = Timeline::new(rooms.clone(), keys.clone(), crate::pipeline::Pipeline::empty());
        let alice = "@alice:example.org";
        let room =
            t.create_room(alice, &ruma::RoomVersionId::V11, serde_json::json!({})).await.unwrap();
        let join = NewEvent {
            kind: "m.room.member".into(),
            sender: alice.into(),
            state_key: Some(alice.into()),
            content: serde_json::json!({"membership": "join"}),
            txn: None,
            redacts: None,
            origin_server_ts: None,
        };
        t.append(&room, join).await.unwrap();
        assert!(rooms.visibility_view(&room, alice).unwrap().may_read());

        // An older database: no membership log, no marker.
        let mut batch = Batch::new();
        let short = rooms.short.get(Kind::Room, &room).unwrap().unwrap();
        for row in MEMBERSHIP_LOG.scan_prefix(&*db, &short, Direction::Forward).unwrap() {
            let (key, _) = row.unwrap();
            MEMBERSHIP_LOG.delete(&mut batch, &key);
        }
        META.delete(&mut batch, &INDEXED_KEY.to_owned());
        db.write(batch).unwrap();
        rooms.memberships_written();
        assert!(!rooms.visibility_view(&room, alice).unwrap().may_read(), "the log is gone");

        let reopened = Rooms::open(db.clone(), "example.org").unwrap();
        assert!(reopened.visibility_view(&room, alice).unwrap().may_read(), "rebuilt");
        assert_eq!(META.get(&*db, &INDEXED_KEY.to_owned()).unwrap(), Some(1));
    }
}
