//! Room state as a sync needs it: the state at a stream position, and what changed
//! between two positions, as differences of state snapshots (no timeline walk).

use std::{ops::Bound, sync::Arc};

use trellis_core::Result;

use super::{Pdu, Rooms, short::Kind, state::StateSet};
use crate::rooms::short::state_key_text;

impl Rooms {
    /// The state of `room_id` after its last event at or before `position` (empty
    /// before the room existed).
    pub fn state_at_position(&self, room_id: &str, position: u64) -> Result<StateSet> {
        Ok((*self.shared_state_at_position(room_id, position)?).clone())
    }

    /// The same, shared. The members of a room sync from the same token after each
    /// message, so each asks for the state at that position; once the position is
    /// visible the answer cannot change (history fetched later goes below the room's
    /// earliest event, and a room with nothing at or before the position is not kept).
    /// Kept only when the event there is not a state event: the answer is then the
    /// loaded snapshot itself, shared with the state cache, not a copy.
    pub fn shared_state_at_position(
        &self,
        room_id: &str,
        position: u64,
    ) -> Result<std::sync::Arc<StateSet>> {
        let key = (room_id.to_owned(), position);
        let settled = position <= self.stream.visible();
        let (hit, generation) = self.position_states.get(&key);
        if let Some(state) = hit.filter(|_| settled) {
            return Ok(state);
        }
        let page = self.scan_timeline(
            room_id,
            Bound::Unbounded,
            Bound::Included(position),
            false,
            1,
            |_, _| Ok(true),
        )?;
        let Some((_, pdu)) = page.events.first() else {
            return Ok(std::sync::Arc::new(StateSet::new()));
        };
        if pdu.state_key.is_none()
            && let Some(stored) = self.cached_event(pdu.event_id.as_str())?
            && stored.state_before != 0
        {
            let state = self.state_at(stored.state_before)?;
            if settled {
                self.position_states.insert(key, state.clone(), generation);
            }
            return Ok(state);
        }
        Ok(std::sync::Arc::new(self.state_after_event(pdu)?))
    }

    /// The state just before `pdu`.
    pub fn state_before_event(&self, pdu: &Pdu) -> Result<StateSet> {
        let Some(stored) = self.cached_event(pdu.event_id.as_str())? else {
            return Ok(StateSet::new());
        };
        if stored.state_before == 0 {
            // Backfilled history comes without its state: show it with the earliest
            // state known here, that of the first later event that has one.
            return self.earliest_state_after(stored.room, stored.position);
        }
        Ok((*self.state_at(stored.state_before)?).clone())
    }

    fn earliest_state_after(&self, room: u64, position: u64) -> Result<StateSet> {
        use std::ops::Bound::{Excluded, Unbounded};
        let rows = super::reads::TIMELINE.scan_range(
            &*self.db,
            Excluded(&(room, position)),
            Unbounded,
            trellis_store::Direction::Forward,
        )?;
        for row in rows.take(super::reads::SCAN_CAP) {
            let ((r, _), short) = row?;
            if r != room {
                break;
            }
            if let Some(trellis_store::Json(stored)) =
                super::reads::EVENTS.get(&*self.db, &short)?
                && stored.state_before != 0
            {
                return Ok((*self.state_at(stored.state_before)?).clone());
            }
        }
        Ok(StateSet::new())
    }

    /// The state just after `pdu` (its own change included).
    pub fn state_after_event(&self, pdu: &Pdu) -> Result<StateSet> {
        let mut state = self.state_before_event(pdu)?;
        if let Some(key) = &pdu.state_key
            && let Some(sk) =
                self.short.get(Kind::StateKey, &state_key_text(&pdu.kind.to_string(), key))?
            && let Some(ev) = self.short.get(Kind::Event, pdu.event_id.as_str())?
        {
            state.insert(sk, ev);
        }
        Ok(state)
    }

    /// The current state's snapshot contents.
    pub fn current_state_ids(&self, room_id: &str) -> Result<StateSet> {
        match self.room(room_id)? {
            Some((_, room)) => Ok((*self.state_at(room.state)?).clone()),
            None => Ok(StateSet::new()),
        }
    }

    /// Events of `to` that differ from `from` (state keys added or replaced).
    pub fn state_diff(&self, from: &StateSet, to: &StateSet) -> Result<Vec<Arc<Pdu>>> {
        let mut out = Vec::new();
        for (key, event) in to {
            if from.get(key) != Some(event)
                && let Some(cached) = self.cached(*event)?
            {
                out.push(cached.pdu.clone());
            }
        }
        Ok(out)
    }

    /// The events of a state set.
    pub fn state_events(&self, state: &StateSet) -> Result<Vec<Pdu>> {
        state.values().filter_map(|ev| self.pdu_by_short(*ev).transpose()).collect()
    }

    /// The stream position of a stored event.
    pub fn position_of(&self, event_id: &str) -> Result<Option<u64>> {
        Ok(self.cached_event(event_id)?.map(|e| e.position))
    }

    /// Whether anything was appended to the room after `since`.
    pub fn changed_after(&self, room_id: &str, since: u64) -> Result<bool> {
        Ok(self.room(room_id)?.is_some_and(|(_, r)| r.last_position > since))
    }
}
