//! Room upgrades: a new room of the requested version that carries over the old room's
//! settings, linked both ways (`predecessor` in the new create event, an
//! `m.room.tombstone` in the old room), with the old room then muted for non-moderators.

use ruma::{
    OwnedRoomId, OwnedUserId, RoomId, RoomVersionId, UserId, events::room::member::MembershipState,
};
use serde_json::{Value, json};
use trellis_core::{Error, Result};

use super::{
    append::{NewEvent, Timeline},
    create::{CreateRoom, CreateRoomRequest, state},
};

/// State carried into the replacement room, as the spec lists it.
const TRANSFERRED: &[&str] = &[
    "m.room.server_acl",
    "m.room.encryption",
    "m.room.name",
    "m.room.avatar",
    "m.room.topic",
    "m.room.guest_access",
    "m.room.history_visibility",
    "m.room.join_rules",
];

fn content_of(pdu: &super::Pdu) -> Value {
    serde_json::from_str(pdu.content.get()).unwrap_or(Value::Null)
}

impl Timeline {
    /// Replaces `room_id` by a new room of `new_version`; returns the new room's id.
    pub async fn upgrade_room(
        &self,
        room_id: &str,
        user: &str,
        new_version: &str,
        additional_creators: Vec<String>,
    ) -> Result<String> {
        let version = super::create::supported_version(new_version)?;
        let rules = version.rules().ok_or_else(|| Error::internal("room version", "no rules"))?;
        if self.rooms.room(room_id)?.is_none() {
            return Err(Error::not_found("Unknown room"));
        }
        if self.rooms.membership(room_id, user)? != Some(MembershipState::Join) {
            return Err(Error::forbidden("You are not a member of this room"));
        }
        // Upgrading ends in a tombstone, so it needs the power to send one.
        let power = self.rooms.power(room_id, user)?;
        let needed = power.levels["events"]["m.room.tombstone"]
            .as_i64()
            .or_else(|| power.levels["state_default"].as_i64())
            .unwrap_or(50);
        if power.level < needed {
            return Err(Error::forbidden("You may not upgrade this room"));
        }
        if self.rooms.state_of(room_id, "m.room.tombstone", "")?.is_some() {
            return Err(Error::bad_json("This room has already been upgraded"));
        }

        let old_create = self
            .rooms
            .state_of(room_id, "m.room.create", "")?
            .map(|p| content_of(&p))
            .ok_or_else(|| Error::not_found("Unknown room"))?;
        // Where this server picks the new room's id, the tombstone naming it goes first,
        // and the new room's `predecessor` points at it, as clients follow the chain.
        // Room ids from version 12 are the create event's hash: the tombstone then comes
        // after, and `predecessor` names no event (the spec made it optional).
        let chosen = match rules.room_id_format {
            ruma::room_version_rules::RoomIdFormatVersion::V1 => {
                Some(format!("!{}:{}", crate::random::alphanumeric(18), self.rooms.server_name))
            }
            _ => None,
        };
        let mut creation = json!({"predecessor": {"room_id": room_id}});
        if let Some(new_room) = &chosen {
            let tombstone = self.append(room_id, tombstone_event(user, new_room)).await?;
            creation["predecessor"]["event_id"] = json!(tombstone.event_id);
        }
        for field in ["type", "m.federate"] {
            if let Some(v) = old_create.get(field) {
                creation[field] = v.clone();
            }
        }
        let privileged = rules.authorization.explicitly_privilege_room_creators;
        if privileged && !additional_creators.is_empty() {
            creation["additional_creators"] = json!(additional_creators);
        }

        // Power levels carry over; creators of a version that privileges them must not be
        // listed, and elsewhere the upgrader keeps at least the level to run the room.
        let mut levels = power.levels.clone();
        if levels.is_object() {
            let users = levels["users"].as_object_mut().map(std::mem::take).unwrap_or_default();
            let mut users: serde_json::Map<String, Value> = users
                .into_iter()
                .filter(|(u, _)| !privileged || (u != user && !additional_creators.contains(u)))
                .collect();
            if !privileged {
                let level = power.level.clamp(100, i64::from(i32::MAX));
                users.insert(user.to_owned(), json!(level));
            }
            levels["users"] = Value::Object(users);
        }
        let mut initial_state = Vec::new();
        for kind in TRANSFERRED {
            if let Some(pdu) = self.rooms.state_of(room_id, kind, "")? {
                initial_state.push(((*kind).to_owned(), String::new(), content_of(&pdu)));
            }
        }
        let request = CreateRoomRequest {
            preset: Some("private_chat".into()),
            initial_state,
            power_level_override: levels.is_object().then_some(levels),
            version: Some(version.to_string()),
            creation_content: Some(creation),
            ..CreateRoomRequest::default()
        };
        let options = CreateRoom { request, room_id: chosen.clone(), ..CreateRoom::default() };
        let new_room = self.create_room_with(user, new_version, options).await?;

        // Bans carry over so an upgrade is no way back in.
        for banned in self.rooms.members(room_id, &MembershipState::Ban)? {
            let content = json!({"membership": "ban"});
            self.append(&new_room, state("m.room.member", user, &banned, content)).await?;
        }

        if chosen.is_none() {
            self.append(room_id, tombstone_event(user, &new_room)).await?;
        }

        // The old room stays readable but only moderators may still talk or invite.
        let mut old_levels = power.levels;
        if old_levels.is_object() {
            let users_default = old_levels["users_default"].as_i64().unwrap_or(0);
            let restricted = (users_default + 1).max(50);
            for key in ["events_default", "invite"] {
                let current = old_levels[key].as_i64().unwrap_or(0);
                old_levels[key] = json!(current.max(restricted));
            }
            // The upgrade itself has happened; a moderator without the power to change
            // levels leaves the old room as it was.
            if let Err(e) =
                self.append(room_id, state("m.room.power_levels", user, "", old_levels)).await
            {
                tracing::warn!(room_id, error = %e, "could not restrict the upgraded room");
            }
        }
        Ok(new_room)
    }
}

/// The old room's last word: where its conversation went.
fn tombstone_event(user: &str, new_room: &str) -> NewEvent {
    let content = json!({"body": "This room has been replaced", "replacement_room": new_room});
    state("m.room.tombstone", user, "", content)
}

/// `/upgrade`: `user` replaces `room_id` by a new room of `new_version`, then the old
/// room's local aliases and its canonical alias move to the new one. Returns the new
/// room's id.
pub async fn upgrade(
    services: &crate::Services,
    user: &UserId,
    room_id: &RoomId,
    new_version: &RoomVersionId,
    additional_creators: &[OwnedUserId],
) -> Result<OwnedRoomId> {
    let (user, room_id, new_version) = (user.as_str(), room_id.as_str(), new_version.as_str());
    let additional_creators = additional_creators.iter().map(ToString::to_string).collect();
    let timeline = &services.timeline;
    let new_room = timeline.upgrade_room(room_id, user, new_version, additional_creators).await?;
    services.aliases.move_room(room_id, &new_room).await?;
    if let Some(canonical) = services.rooms.state_of(room_id, "m.room.canonical_alias", "")? {
        for (room, content) in [(new_room.as_str(), content_of(&canonical)), (room_id, json!({}))] {
            let event = NewEvent {
                kind: "m.room.canonical_alias".into(),
                sender: user.to_owned(),
                state_key: Some(String::new()),
                content,
                txn: None,
                redacts: None,
                origin_server_ts: None,
            };
            // The aliases already point at the new room; a missing power in one of the
            // rooms only leaves its canonical alias event as it was.
            if let Err(e) = timeline.append(room, event).await {
                tracing::warn!(room, error = %e, "could not move the canonical alias");
            }
        }
    }
    OwnedRoomId::try_from(new_room).map_err(|e| Error::internal("new room id", e))
}
