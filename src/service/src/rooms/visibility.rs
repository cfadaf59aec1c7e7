//! Who may see which event: the spec's history visibility rules, answered from two small
//! logs kept per room (each user's membership changes and the room's history visibility
//! changes, keyed by stream position) so that checking an event is a couple of seeks
//! instead of loading the room state at that event.

use std::ops::Bound::{Excluded, Included};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use trellis_core::Result;
use trellis_store::{Batch, Direction, Json, Table, catalog};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct MemberRow {
    membership: String,
    event: u64,
}

use super::{Pdu, append::Timeline, short::Kind};

const MEMBERSHIP_LOG: Table<(u64, String, u64), Json<MemberRow>> =
    Table::new(&catalog::MEMBERSHIP_LOG);
const VISIBILITY_LOG: Table<(u64, u64), String> = Table::new(&catalog::VISIBILITY_LOG);
const EVENT_TIMES: Table<(u64, u64, u64), u64> = Table::new(&catalog::EVENT_TIMES);

/// What a room shows a user: the spec's default visibility is `shared`.
const DEFAULT_VISIBILITY: &str = "shared";

impl Timeline {
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
            }
            "m.room.history_visibility" if key.is_empty() => {
                let visibility =
                    content["history_visibility"].as_str().unwrap_or(DEFAULT_VISIBILITY);
                VISIBILITY_LOG.put(batch, &(room, position), &visibility.to_owned());
            }
            _ => {}
        }
    }

    /// The user's membership in effect at `position` (their own event at that position
    /// included, so a user sees their own join).
    fn membership_at(&self, room: u64, user: &str, position: u64) -> Result<Option<String>> {
        let lo = Included((room, user.to_owned(), 0));
        let hi = Included((room, user.to_owned(), position));
        Ok(MEMBERSHIP_LOG
            .scan_range(&*self.db, lo.as_ref(), hi.as_ref(), Direction::Backward)?
            .next()
            .transpose()?
            .map(|(_, Json(m))| m.membership))
    }

    fn joined_after(&self, room: u64, user: &str, position: u64) -> Result<bool> {
        let lo = Excluded((room, user.to_owned(), position));
        let hi = Included((room, user.to_owned(), u64::MAX));
        for row in
            MEMBERSHIP_LOG.scan_range(&*self.db, lo.as_ref(), hi.as_ref(), Direction::Forward)?
        {
            if row?.1.0.membership == "join" {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn visibility_at(&self, room: u64, position: u64) -> Result<String> {
        let lo = Included((room, 0));
        let hi = Included((room, position));
        Ok(VISIBILITY_LOG
            .scan_range(&*self.db, lo.as_ref(), hi.as_ref(), Direction::Backward)?
            .next()
            .transpose()?
            .map_or_else(|| DEFAULT_VISIBILITY.to_owned(), |(_, v)| v))
    }

    /// The spec's history visibility rules for the event at `position` of `room_id`.
    pub fn may_see(&self, room_id: &str, position: u64, pdu: &Pdu, user: &str) -> Result<bool> {
        // Users always see their own membership changes (a kick or ban included).
        if pdu.state_key.as_deref() == Some(user) && pdu.kind.to_string() == "m.room.member" {
            return Ok(true);
        }
        let Some(room) = self.short.get(Kind::Room, room_id)? else { return Ok(false) };
        let visibility = self.visibility_at(room, position)?;
        if visibility == "world_readable" {
            return Ok(true);
        }
        let membership = self.membership_at(room, user, position)?;
        Ok(match membership.as_deref() {
            Some("join") => true,
            Some("invite") if visibility == "invited" => true,
            _ => visibility == "shared" && self.joined_after(room, user, position)?,
        })
    }

    /// Whether a user may read a room at all: they have been in it, or anyone may read.
    pub fn may_read_room(&self, room_id: &str, user: &str) -> Result<bool> {
        let Some(room) = self.short.get(Kind::Room, room_id)? else { return Ok(false) };
        let mut rows =
            MEMBERSHIP_LOG.scan_prefix(&*self.db, &(room, user.to_owned()), Direction::Forward)?;
        if rows.next().transpose()?.is_some() {
            return Ok(true);
        }
        Ok(self.visibility_at(room, u64::MAX)? == "world_readable")
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
        let Some(room) = self.short.get(Kind::Room, room_id)? else { return Ok(None) };
        Ok(MEMBERSHIP_LOG
            .scan_prefix(&*self.db, &(room, user.to_owned()), Direction::Backward)?
            .next()
            .transpose()?
            .map(|((_, _, pos), _)| pos))
    }
}
