//! What a user gets of a room's history: the events the spec's history visibility rules
//! show them, less those sent by users they ignore (`m.ignored_user_list`). Every path
//! serving room events to a client filters through [`Viewer::sees`], so that `/sync`,
//! sliding sync, `/messages`, `/context`, relations and the event checks of receipts
//! and read markers cannot disagree on it.

use ruma::{RoomId, UserId, events::room::member::MembershipState};
use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use serde_json::Value;
use trellis_core::{Error, Result};

use crate::{
    Services,
    rooms::{Pdu, cache::CachedEvent, visibility::VisibilityView},
};

/// One user reading rooms: who they ignore, read once for all the rooms of an answer.
pub struct Viewer {
    ignored: HashSet<String>,
    /// Erased users and when they were erased (see `erasure.rs`).
    erased: Arc<HashMap<String, u64>>,
}

impl Viewer {
    /// The user with local part `localpart`, as their account data stands now.
    pub fn load(services: &Services, localpart: &str) -> Result<Self> {
        let ignored = services
            .account_data
            .get(localpart, None, "m.ignored_user_list")?
            .and_then(|v| v.get("ignored_users").and_then(Value::as_object).cloned())
            .map(|users| users.keys().cloned().collect())
            .unwrap_or_default();
        Ok(Self { ignored, erased: services.rooms.erasures.snapshot() })
    }

    /// Whether the user ignores `sender`: nothing of theirs reaches the user, invites
    /// included.
    pub fn ignores(&self, sender: &str) -> bool {
        // Most users ignore nobody: no hashing then.
        !self.ignored.is_empty() && self.ignored.contains(sender)
    }

    /// The one decision on what a user gets of a room's history: the event at stream
    /// position `position` is visible to them by `view` (history visibility) and not
    /// from someone they ignore.
    pub fn sees(&self, view: &VisibilityView, position: u64, pdu: &Pdu) -> bool {
        !self.ignores(pdu.sender.as_str()) && view.may_see(position, pdu)
    }

    /// `user_id`'s view of `room_id`'s history for reading it outside a sync: only
    /// someone who has been in the room may, or anyone if it is world readable.
    pub fn reader_view(
        services: &Services,
        room_id: &str,
        user_id: &str,
    ) -> Result<VisibilityView> {
        let view = services.rooms.visibility_view(room_id, user_id)?;
        if !view.may_read() {
            return Err(Error::forbidden("You are not allowed to read this room"));
        }
        Ok(view)
    }

    /// A stored event of `room_id` the user gets by `view`, else 404 (not 403: whether
    /// an event exists is not revealed).
    pub fn visible_event(
        &self,
        services: &Services,
        view: &VisibilityView,
        room_id: &str,
        event_id: &str,
    ) -> Result<Arc<CachedEvent>> {
        let not_found = || Error::not_found("Event not found");
        let stored = services.rooms.cached_event(event_id)?.ok_or_else(not_found)?;
        let pdu = &stored.pdu;
        if pdu.room_id.as_ref().is_some_and(|r| r.as_str() != room_id)
            || stored.rejected
            || !self.sees(view, stored.position, pdu)
        {
            return Err(not_found());
        }
        Ok(stored)
    }

    /// What `user_id` (this viewer) gets of `room_id`'s history.
    pub fn room(
        &self,
        services: &Services,
        room_id: &str,
        user_id: &str,
    ) -> Result<RoomViewer<'_>> {
        let view = services.rooms.visibility_view(room_id, user_id)?;
        Ok(RoomViewer { viewer: self, view })
    }

    /// [`Self::room`] for reading the room outside a sync: only someone who has been in
    /// it may, or anyone if it is world readable.
    pub fn reader(
        &self,
        services: &Services,
        room_id: &str,
        user_id: &str,
    ) -> Result<RoomViewer<'_>> {
        let view = Self::reader_view(services, room_id, user_id)?;
        Ok(RoomViewer { viewer: self, view })
    }

    /// The redacted copy the user gets of an event they see by `view`, when its sender
    /// was erased before the user joined the room; `None`: the event as it is.
    pub fn erased_view(
        &self,
        services: &Services,
        view: &VisibilityView,
        pdu: &Pdu,
    ) -> Result<Option<Arc<Pdu>>> {
        // Nearly always nobody is erased: one map lookup.
        let Some(&erased_at) = self.erased.get(pdu.sender.as_str()) else { return Ok(None) };
        if !services.config.retention.erase_for_everyone && view.joined_by(erased_at) {
            return Ok(None);
        }
        let room = pdu.room_id.as_ref().map(|r| services.rooms.room(r.as_str())).transpose()?;
        match room.flatten() {
            Some((_, record)) => {
                super::erasure::redacted_copy(pdu, &record.rules()?.1.redaction).map(Some)
            }
            None => Ok(None),
        }
    }
}

/// One user's view of one room's history (see [`Viewer::room`]).
pub struct RoomViewer<'a> {
    viewer: &'a Viewer,
    view: VisibilityView,
}

impl RoomViewer<'_> {
    /// Whether the user gets the event at stream position `position`: visible to them
    /// and not from someone they ignore.
    pub fn sees(&self, position: u64, pdu: &Pdu) -> bool {
        self.viewer.sees(&self.view, position, pdu)
    }

    /// An event the user sees, as they get it: redacted if its sender was erased before
    /// the user joined.
    pub fn shown(&self, services: &Services, pdu: &Arc<Pdu>) -> Result<Arc<Pdu>> {
        Ok(self.viewer.erased_view(services, &self.view, pdu)?.unwrap_or_else(|| pdu.clone()))
    }

    /// A stored event of `room_id` the user gets, else 404 (not 403: whether an event
    /// exists is not revealed).
    pub fn event(
        &self,
        services: &Services,
        room_id: &str,
        event_id: &str,
    ) -> Result<Arc<CachedEvent>> {
        self.viewer.visible_event(services, &self.view, room_id, event_id)
    }
}

/// Acting in a room (typing, receipts) and reading its current state need a current
/// membership of `join`.
pub fn require_joined(services: &Services, room_id: &RoomId, user_id: &UserId) -> Result<()> {
    match services.rooms.membership(room_id.as_str(), user_id.as_str())? {
        Some(MembershipState::Join) => Ok(()),
        _ => Err(Error::forbidden("You are not a member of this room")),
    }
}

/// The room state `user_id` may read: the current state while joined (or when anyone
/// may read the room), the state when they left for someone who left or was banned.
pub fn readable_state(services: &Services, user_id: &UserId, room_id: &RoomId) -> Result<Vec<Pdu>> {
    let (rooms, room, user) = (&services.rooms, room_id.as_str(), user_id.as_str());
    match rooms.membership(room, user)? {
        Some(MembershipState::Join) => return rooms.current_state(room),
        Some(MembershipState::Leave | MembershipState::Ban) => {
            let left_at = rooms.last_membership_position(room, user)?.unwrap_or(0);
            let state = rooms.state_at_position(room, left_at)?;
            return rooms.state_events(&state);
        }
        _ => {}
    }
    // Anyone else (invited, knocking, a stranger) reads only world-readable rooms.
    let world_readable = rooms.state_of(room, "m.room.history_visibility", "")?.is_some_and(|p| {
        serde_json::from_str::<Value>(p.content.get())
            .is_ok_and(|c| c["history_visibility"] == "world_readable")
    });
    if !world_readable {
        return Err(Error::forbidden("You are not a member of this room"));
    }
    rooms.current_state(room)
}
