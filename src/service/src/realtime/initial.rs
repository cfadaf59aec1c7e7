//! What the deprecated `GET /initialSync` shows besides each joined room (which
//! `rooms::history::snapshot` reads): the presence of the user's co-members and the rooms
//! the user is invited to.

use ruma::{OwnedRoomId, events::room::member::MembershipState};
use serde_json::{Value, json};
use trellis_core::Result;

use super::sync::sync_event;
use crate::{Services, federation::invites};

/// The presence of everyone in the user's joined rooms.
pub fn presence(services: &Services, user_id: &str, joined: &[OwnedRoomId]) -> Result<Vec<Value>> {
    let rooms: Vec<String> = joined.iter().map(ToString::to_string).collect();
    // Nothing changed after the last position: only the rooms' members count.
    super::sync::presence_events(services, user_id, &[], u64::MAX, &rooms)
}

/// The rooms the user is invited to, each with its invite event, as `/initialSync`'s
/// room entries.
pub fn invites(services: &Services, user_id: &str) -> Result<Vec<Value>> {
    let rooms = &services.rooms;
    let mut out = Vec::new();
    for room_id in rooms.rooms_of(user_id, &MembershipState::Invite)? {
        let Some(invite) = rooms.state_of(&room_id, "m.room.member", user_id)? else { continue };
        let mut event = sync_event(&invite);
        event["room_id"] = json!(room_id);
        out.push(json!({"room_id": room_id, "membership": "invite", "invite": event}));
    }
    // Invites to rooms this server is not in, as their servers sent them.
    for (room_id, invite) in invites::pending_since(services, user_id, 0)? {
        if invite.membership == "invite" {
            let entry = json!({"room_id": room_id, "membership": "invite", "invite": invite.event,
                               "state": invite.stripped});
            out.push(entry);
        }
    }
    Ok(out)
}
