//! `createRoom`: the sequence of events that makes a new room, per the spec's presets.

use std::sync::Arc;

use ruma::{OwnedRoomId, OwnedUserId, RoomVersionId, UserId};
use serde_json::{Value, json};
use trellis_core::{Error, ErrorKind, Result, config::RoomPublishing};

use super::append::{NewEvent, Timeline};
use crate::{Services, federation::invites::invite_remote};

/// What [`Timeline::create_room_with`] makes: a `createRoom` request as the client sent
/// it (its `invite` is not read here), with the invitees split by how they are invited
/// and the creator's profile.
#[derive(Debug, Clone, Default)]
pub struct CreateRoom {
    pub request: CreateRoomRequest,
    /// Invitees invited by the room's own events (this server's users).
    pub invite: Vec<String>,
    /// Invitees the caller invites once the room exists (other servers' users, whose
    /// servers countersign): they get the preset's invitee power all the same.
    pub invite_after: Vec<String>,
    /// The creator's profile, copied into their membership event.
    pub creator_displayname: Option<String>,
    pub creator_avatar_url: Option<String>,
    /// The room id to use, where the room version lets this server choose it.
    pub room_id: Option<String>,
}

/// A room version this server implements, else 400 `M_UNSUPPORTED_ROOM_VERSION`.
pub(super) fn supported_version(text: &str) -> Result<RoomVersionId> {
    RoomVersionId::try_from(text).ok().filter(|v| v.rules().is_some()).ok_or_else(|| {
        Error::new(
            ErrorKind::BadRequest,
            "M_UNSUPPORTED_ROOM_VERSION",
            format!("Room version {text} is not supported"),
        )
    })
}

pub(super) fn state(kind: &str, sender: &str, key: &str, content: Value) -> NewEvent {
    NewEvent {
        kind: kind.into(),
        sender: sender.into(),
        state_key: Some(key.into()),
        content,
        txn: None,
        redacts: None,
        origin_server_ts: None,
    }
}

impl Timeline {
    /// Creates a room for `creator` (a user id) and returns its id.
    pub async fn create_room_with(
        &self,
        creator: &str,
        default_version: &str,
        req: CreateRoom,
    ) -> Result<String> {
        let version_text =
            req.request.version.clone().unwrap_or_else(|| default_version.to_owned());
        let version = supported_version(&version_text)?;
        let rules = version.rules().ok_or_else(|| Error::internal("room version", "no rules"))?;
        let preset = req.request.preset.clone().unwrap_or_else(|| {
            if req.request.public { "public_chat" } else { "private_chat" }.to_owned()
        });
        if !["private_chat", "trusted_private_chat", "public_chat"].contains(&preset.as_str()) {
            return Err(Error::bad_json(format!("Unknown preset {preset}")));
        }
        let mut creation = req.request.creation_content.clone().unwrap_or_else(|| json!({}));
        if !creation.is_object() {
            return Err(Error::bad_json("creation_content must be an object"));
        }
        if let Some(map) = creation.as_object_mut() {
            map.remove("room_version");
        }
        let room_id = self.create_room_as(creator, &version, creation, req.room_id).await?;

        let mut member = json!({"membership": "join"});
        if let Some(name) = &req.creator_displayname {
            member["displayname"] = json!(name);
        }
        if let Some(avatar) = &req.creator_avatar_url {
            member["avatar_url"] = json!(avatar);
        }
        self.append(&room_id, state("m.room.member", creator, creator, member)).await?;

        // Power levels: the spec's defaults, the preset's, then the client's override.
        let mut users = serde_json::Map::new();
        if !rules.authorization.explicitly_privilege_room_creators {
            users.insert(creator.to_owned(), json!(100));
        }
        if preset == "trusted_private_chat" {
            for invitee in req.invite.iter().chain(&req.invite_after) {
                users.insert(invitee.clone(), json!(100));
            }
        }
        let mut power = json!({
            "users": users,
            "users_default": 0,
            "events": {
                "m.room.name": 50, "m.room.power_levels": 100, "m.room.history_visibility": 100,
                "m.room.canonical_alias": 50, "m.room.avatar": 50, "m.room.tombstone": 100,
                "m.room.server_acl": 100, "m.room.encryption": 100,
            },
            "events_default": 0,
            "state_default": 50,
            "ban": 50,
            "kick": 50,
            "redact": 50,
            "invite": if preset == "public_chat" { 50 } else { 0 },
            "notifications": {"room": 50},
        });
        if let Some(Value::Object(over)) = &req.request.power_level_override
            && let Some(map) = power.as_object_mut()
        {
            for (k, v) in over {
                map.insert(k.clone(), v.clone());
            }
        }
        self.append(&room_id, state("m.room.power_levels", creator, "", power)).await?;

        let join_rule = if preset == "public_chat" { "public" } else { "invite" };
        self.append(
            &room_id,
            state("m.room.join_rules", creator, "", json!({"join_rule": join_rule})),
        )
        .await?;
        self.append(
            &room_id,
            state(
                "m.room.history_visibility",
                creator,
                "",
                json!({"history_visibility": "shared"}),
            ),
        )
        .await?;
        if preset != "public_chat" {
            self.append(
                &room_id,
                state("m.room.guest_access", creator, "", json!({"guest_access": "can_join"})),
            )
            .await?;
        }
        for (kind, key, content) in &req.request.initial_state {
            self.append(&room_id, state(kind, creator, key, content.clone())).await?;
        }
        if let Some(name) = &req.request.name {
            self.append(&room_id, state("m.room.name", creator, "", json!({"name": name}))).await?;
        }
        if let Some(topic) = &req.request.topic {
            let content = json!({"topic": topic, "m.topic": {"m.text": [{"body": topic, "mimetype": "text/plain"}]}});
            self.append(&room_id, state("m.room.topic", creator, "", content)).await?;
        }
        for invitee in &req.invite {
            let mut content = json!({"membership": "invite"});
            if req.request.is_direct {
                content["is_direct"] = json!(true);
            }
            self.append(&room_id, state("m.room.member", creator, invitee, content)).await?;
        }
        Ok(room_id)
    }
}

/// A client's `createRoom` request, parsed.
#[derive(Debug, Clone, Default)]
pub struct CreateRoomRequest {
    /// The localpart of an alias on this server to give the room.
    pub alias_name: Option<String>,
    /// Whether to publish the room in this server's room directory.
    pub public: bool,
    /// `private_chat`, `trusted_private_chat` or `public_chat`.
    pub preset: Option<String>,
    pub name: Option<String>,
    pub topic: Option<String>,
    pub invite: Vec<OwnedUserId>,
    pub is_direct: bool,
    /// `(type, state_key, content)` sent after the preset's events (overriding them).
    pub initial_state: Vec<(String, String, Value)>,
    pub power_level_override: Option<Value>,
    pub version: Option<String>,
    pub creation_content: Option<Value>,
}

/// `createRoom`: makes the room for `creator` (a local user), publishes it if asked,
/// invites other servers' users through their servers and gives it its alias.
pub async fn create_room(
    services: &Arc<Services>,
    creator: &UserId,
    mut req: CreateRoomRequest,
) -> Result<OwnedRoomId> {
    let localpart = services
        .accounts
        .local_part(creator.as_str())
        .ok_or_else(|| Error::forbidden("Only this server's users can create rooms here"))?
        .to_owned();
    if services.accounts.shadow_banned(&localpart)? {
        // The room is made; nobody is invited to it.
        req.invite.clear();
    }
    // The alias is checked before anything is created, and claimed right after.
    let alias = match &req.alias_name {
        Some(name) => {
            let alias =
                services.aliases.local_alias(&format!("#{name}:{}", services.server_name()))?;
            if !services.aliases.is_free(&alias)? {
                return Err(Error::new(
                    ErrorKind::BadRequest,
                    "M_ROOM_IN_USE",
                    "This room alias is already in use",
                ));
            }
            Some(alias)
        }
        None => None,
    };
    // Under `rooms.publish = "admins"` only a server admin may publish, so asking for a
    // public room is refused before anything is created.
    if req.public
        && services.config.rooms.publish == RoomPublishing::Admins
        && !services.accounts.user(&localpart)?.is_some_and(|u| u.admin)
    {
        return Err(Error::forbidden("Only server admins may publish rooms in the directory"));
    }
    let text = |field: &str| -> Result<Option<String>> {
        Ok(services.profiles.get(&localpart, field)?.and_then(|v| v.as_str().map(str::to_owned)))
    };
    // Other servers' users are invited once the room exists: their servers must
    // countersign each invite.
    let federated = services.federation.enabled();
    let (local_invites, remote_invites): (Vec<String>, Vec<String>) = req
        .invite
        .iter()
        .map(|u| u.to_string())
        .partition(|u| !federated || u.ends_with(&format!(":{}", services.server_name())));
    let (public, is_direct) = (req.public, req.is_direct);
    let options = CreateRoom {
        request: req,
        invite: local_invites,
        invite_after: remote_invites.clone(),
        creator_displayname: text("displayname")?,
        creator_avatar_url: text("avatar_url")?,
        room_id: None,
    };
    let creator = creator.as_str();
    let default_version = &services.config.rooms.default_room_version;
    let room_id = services.timeline.create_room_with(creator, default_version, options).await?;
    if public {
        services.public_rooms.publish(&room_id, true).await?;
    }
    for invitee in &remote_invites {
        let mut content = json!({"membership": "invite"});
        if is_direct {
            content["is_direct"] = json!(true);
        }
        let invited = invite_remote(services, &room_id, creator, invitee, content).await;
        // The room exists; an invitee whose server cannot be reached is left out.
        if let Err(e) = invited {
            tracing::warn!(room_id, invitee, error = %e, "inviting another server's user failed");
        }
    }
    if let Some(alias) = alias {
        services.aliases.set(&alias, &room_id, &localpart).await?;
        let event = state("m.room.canonical_alias", creator, "", json!({"alias": alias}));
        services.timeline.append(&room_id, event).await?;
    }
    OwnedRoomId::try_from(room_id).map_err(|e| Error::internal("room id", e))
}
