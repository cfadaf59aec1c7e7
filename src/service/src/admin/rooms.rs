//! Rooms as a server admin sees them, whether or not the admin is in them: listings,
//! details, state, history, media, and the actions admin tools take (block, join a user,
//! make a user the room's admin, shut a room down).

use std::{collections::BTreeSet, sync::Arc};

use ruma::{
    OwnedRoomId, OwnedServerName, OwnedUserId, RoomId, RoomOrAliasId, UserId,
    events::room::member::MembershipState,
};
use serde::Serialize;
use serde_json::Value;
use trellis_core::{Error, Result};
use trellis_store::Batch;

use crate::{
    Services,
    audit::Client,
    rooms::{blocks, membership, pdu::Pdu, public::room_info, send},
};

/// One room in a listing.
#[derive(Debug, Clone, Serialize)]
pub struct RoomSummary {
    pub room_id: String,
    pub name: Option<String>,
    pub canonical_alias: Option<String>,
    pub joined_members: u64,
    pub joined_local_members: u64,
    pub version: String,
    pub creator: Option<String>,
    pub encryption: Option<String>,
    pub federatable: bool,
    pub public: bool,
    pub join_rules: Option<String>,
    pub guest_access: Option<String>,
    pub history_visibility: Option<String>,
    pub state_events: u64,
    pub room_type: Option<String>,
}

/// One room in full.
#[derive(Debug, Clone, Serialize)]
pub struct RoomDetails {
    #[serde(flatten)]
    pub summary: RoomSummary,
    pub avatar: Option<String>,
    pub topic: Option<String>,
    pub joined_local_devices: u64,
    pub forgotten: bool,
    pub tombstoned: bool,
    pub replacement_room: Option<String>,
    pub blocked: bool,
}

fn content(pdu: &Pdu) -> Value {
    serde_json::from_str(pdu.content.get()).unwrap_or(Value::Null)
}

fn local_members(services: &Services, room_id: &str) -> Result<Vec<String>> {
    let suffix = format!(":{}", services.server_name());
    Ok(services
        .rooms
        .joined_members(room_id)?
        .iter()
        .filter(|u| u.ends_with(&suffix))
        .cloned()
        .collect())
}

fn summary(services: &Services, room_id: &str) -> Result<Option<RoomSummary>> {
    let rooms = &services.rooms;
    let Some(info) = room_info(rooms, room_id)? else { return Ok(None) };
    let create = rooms.state_of(room_id, "m.room.create", "")?;
    let create_content = create.as_ref().map(content).unwrap_or(Value::Null);
    let creator = create_content["creator"]
        .as_str()
        .map(str::to_owned)
        .or_else(|| create.as_ref().map(|c| c.sender.to_string()));
    let state = |kind: &str, field: &str| rooms.state_text(room_id, kind, field);
    Ok(Some(RoomSummary {
        room_id: room_id.to_owned(),
        name: info.name,
        canonical_alias: info.canonical_alias,
        joined_members: info.num_joined_members,
        joined_local_members: local_members(services, room_id)?.len() as u64,
        version: info.room_version,
        creator,
        encryption: info.encryption,
        federatable: create_content["m.federate"].as_bool().unwrap_or(true),
        public: services.public_rooms.is_published(room_id)?,
        join_rules: state("m.room.join_rules", "join_rule")?,
        guest_access: state("m.room.guest_access", "guest_access")?,
        history_visibility: state("m.room.history_visibility", "history_visibility")?,
        state_events: rooms.current_state(room_id)?.len() as u64,
        room_type: info.room_type,
    }))
}

/// Every room this server knows that the filters keep: `search_term` is a part of the
/// name or the canonical alias (any case) or the room id; `public` and `empty` keep
/// published or memberless rooms (`Some(true)`), or the others (`Some(false)`).
pub fn list(
    services: &Services,
    search_term: Option<&str>,
    public: Option<bool>,
    empty: Option<bool>,
) -> Result<Vec<RoomSummary>> {
    let term = search_term.map(str::to_lowercase);
    let mut out = Vec::new();
    for (_, room_id) in services.rooms.rooms_with_events_after(0)? {
        let Some(room) = summary(services, &room_id)? else { continue };
        if public.is_some_and(|p| p != room.public)
            || empty.is_some_and(|e| e != (room.joined_members == 0))
        {
            continue;
        }
        if let Some(term) = &term {
            let lower = |s: &Option<String>| s.as_deref().unwrap_or_default().to_lowercase();
            if !lower(&room.name).contains(term)
                && !lower(&room.canonical_alias).contains(term)
                && !room.room_id.contains(search_term.unwrap_or_default())
            {
                continue;
            }
        }
        out.push(room);
    }
    Ok(out)
}

/// One room in full (404 when this server does not know it).
pub fn details(services: &Services, room_id: &str) -> Result<RoomDetails> {
    let summary = summary(services, room_id)?.ok_or_else(|| Error::not_found("Room not found"))?;
    let rooms = &services.rooms;
    let tombstone = rooms.state_of(room_id, "m.room.tombstone", "")?.map(|p| content(&p));
    let mut devices = 0;
    for user in local_members(services, room_id)? {
        if let Some(localpart) = services.accounts.local_part(&user) {
            devices += services.accounts.devices(localpart)?.len() as u64;
        }
    }
    Ok(RoomDetails {
        avatar: rooms.state_text(room_id, "m.room.avatar", "url")?,
        topic: rooms.state_text(room_id, "m.room.topic", "topic")?,
        joined_local_devices: devices,
        forgotten: false,
        tombstoned: tombstone.is_some(),
        replacement_room: tombstone.and_then(|t| t["replacement_room"].as_str().map(str::to_owned)),
        blocked: blocks::blocked_by(services, room_id)?.is_some(),
        summary,
    })
}

/// The room's joined members (404 for an unknown room).
pub fn members(services: &Services, room_id: &str) -> Result<Vec<String>> {
    known(services, room_id)?;
    Ok(services.rooms.joined_members(room_id)?.as_ref().clone())
}

/// The room's current state, all of it or of one event type.
pub fn state(services: &Services, room_id: &str, kind: Option<&str>) -> Result<Vec<Pdu>> {
    known(services, room_id)?;
    let mut state = services.rooms.current_state(room_id)?;
    if let Some(kind) = kind {
        state.retain(|pdu| pdu.kind.to_string() == kind);
    }
    Ok(state)
}

fn known(services: &Services, room_id: &str) -> Result<()> {
    match services.rooms.room(room_id)? {
        Some(_) => Ok(()),
        None => Err(Error::not_found("Room not found")),
    }
}

/// The mxc URIs the room's unencrypted events name (files, images, thumbnails, avatars),
/// split into this server's and other servers'.
pub fn media(services: &Services, room_id: &str) -> Result<(Vec<String>, Vec<String>)> {
    known(services, room_id)?;
    let mut found = BTreeSet::new();
    let all = std::ops::Bound::Unbounded;
    services.rooms.scan_timeline(room_id, all, all, true, usize::MAX, |_, pdu| {
        let content = content(pdu);
        for uri in [&content["url"], &content["info"]["thumbnail_url"], &content["avatar_url"]] {
            if let Some(uri) = uri.as_str().filter(|u| u.starts_with("mxc://")) {
                found.insert(uri.to_owned());
            }
        }
        Ok(false)
    })?;
    let local_prefix = format!("mxc://{}/", services.server_name());
    Ok(found.into_iter().partition(|uri| uri.starts_with(&local_prefix)))
}

/// Blocks the room (by `admin`, a user id) or unblocks it; works for rooms this server
/// does not know yet.
pub async fn set_blocked(
    services: &Services,
    admin: &str,
    room_id: &RoomId,
    block: bool,
    client: &Client,
) -> Result<()> {
    let mut batch = Batch::new();
    let admin_id = services.accounts.user_id(admin);
    blocks::set_blocked(&mut batch, room_id.as_str(), block.then_some(admin_id.as_str()));
    let action = if block { "room_block" } else { "room_unblock" };
    services.audit.add(&mut batch, Some(admin), action, client, "ok", Some(room_id.to_string()));
    crate::commit(&services.db, batch).await
}

/// The local member with the highest power level in the room, and that level.
fn most_powerful_local(services: &Services, room_id: &str) -> Result<(OwnedUserId, i64)> {
    let mut best: Option<(OwnedUserId, i64)> = None;
    for user in local_members(services, room_id)? {
        let level = services.rooms.power(room_id, &user)?.level;
        if best.as_ref().is_none_or(|(_, b)| level > *b)
            && let Ok(id) = UserId::parse(user)
        {
            best = Some((id, level));
        }
    }
    best.ok_or_else(|| Error::invalid_param("No local user is joined to the room"))
}

/// Gives `target` (a local user) the power of the room's most powerful local member,
/// which sends the change, and invites them unless they are in the room already.
pub async fn make_room_admin(
    services: &Arc<Services>,
    room_id: &RoomId,
    target: &UserId,
) -> Result<()> {
    known(services, room_id.as_str())?;
    let (granter, level) = most_powerful_local(services, room_id.as_str())?;
    let power = services.rooms.power(room_id.as_str(), granter.as_str())?;
    if !power.levels.is_object() {
        return Err(Error::invalid_param("The room has no power levels to change"));
    }
    let mut levels = power.levels.clone();
    // A creator of a v12 room stands above every level; the target gets 100 then.
    let grant = if level == i64::MAX { 100 } else { level };
    levels["users"][target.as_str()] = Value::from(grant);
    send::state(
        services,
        &granter,
        None,
        room_id,
        "m.room.power_levels".to_owned(),
        String::new(),
        levels,
    )
    .await
    .map_err(|e| {
        Error::invalid_param(format!("The room's admin cannot change power levels: {}", e.message))
    })?;
    let membership = services.rooms.membership(room_id.as_str(), target.as_str())?;
    if !matches!(membership, Some(MembershipState::Join | MembershipState::Invite)) {
        membership::invite(services, &granter, room_id, target, None).await?;
    }
    Ok(())
}

/// Joins `user` (local) to a room: an invite-only room needs `admin` in it with the
/// power to invite, and the admin invites the user first.
pub async fn force_join(
    services: &Arc<Services>,
    admin: &UserId,
    target: &RoomOrAliasId,
    via: &[OwnedServerName],
    user: &UserId,
) -> Result<OwnedRoomId> {
    if services.accounts.local_part(user.as_str()).is_none() {
        return Err(Error::invalid_param("Only users of this server can be joined"));
    }
    if services.accounts.user(user.localpart())?.is_none() {
        return Err(Error::not_found("User not found"));
    }
    let room_id = match RoomId::parse(target.as_str()) {
        Ok(id) => id,
        Err(_) => services
            .aliases
            .resolve(target.as_str())?
            .and_then(|a| RoomId::parse(a.room_id).ok())
            .ok_or_else(|| Error::not_found("Unknown room alias"))?,
    };
    let public =
        room_info(&services.rooms, room_id.as_str())?.is_some_and(|i| i.join_rule == "public");
    let membership = services.rooms.membership(room_id.as_str(), user.as_str())?;
    if !public && membership != Some(MembershipState::Join) {
        membership::invite(services, admin, &room_id, user, None).await?;
    }
    let target: ruma::OwnedRoomOrAliasId = room_id.into();
    membership::join(services, user, &target, via, None).await
}

/// What an admin's room shutdown asks for.
#[derive(Debug, Clone)]
pub struct Shutdown {
    /// A local user who makes a new room and in which the removed local members land.
    pub new_room_user_id: Option<OwnedUserId>,
    pub room_name: String,
    pub message: String,
    pub block: bool,
}

/// What a shutdown did.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct ShutdownResult {
    pub kicked_users: Vec<String>,
    pub failed_to_kick_users: Vec<String>,
    pub local_aliases: Vec<String>,
    pub new_room_id: Option<String>,
    /// Whether the room's stored history was removed (a deletion with `purge`).
    #[serde(default)]
    pub purged: bool,
}

/// Shuts a room down on this server: blocked if asked, taken out of the directory, its
/// local aliases removed (or moved to the new room), and every local member made to
/// leave (and put into a new room that explains why, when `new_room_user_id` is set).
pub async fn shutdown(
    services: &Arc<Services>,
    admin: &str,
    room_id: &RoomId,
    req: &Shutdown,
    client: &Client,
) -> Result<ShutdownResult> {
    if req.block {
        set_blocked(services, admin, room_id, true, client).await?;
    }
    let mut result = ShutdownResult::default();
    if services.rooms.room(room_id.as_str())?.is_none() {
        return Ok(result);
    }
    let new_room = match &req.new_room_user_id {
        Some(owner) => Some(replacement_room(services, owner, req).await?),
        None => None,
    };
    services.public_rooms.publish(room_id.as_str(), false).await?;
    for alias in services.aliases.of_room(room_id.as_str())? {
        services.aliases.delete(&alias).await?;
        if let (Some(new_room), Some(owner)) = (&new_room, &req.new_room_user_id) {
            services.aliases.set(&alias, new_room.as_str(), owner.localpart()).await?;
        }
        result.local_aliases.push(alias);
    }
    let (joined, invited) = services.rooms.joined_and_invited(room_id.as_str())?;
    let suffix = format!(":{}", services.server_name());
    for user in joined.iter().chain(invited.iter()).filter(|u| u.ends_with(&suffix)) {
        let Ok(user_id) = UserId::parse(user.as_str()) else { continue };
        if Some(&user_id) == req.new_room_user_id.as_ref() {
            // The new room's owner leaves too; it is already in the new room.
            let _ = membership::leave(services, &user_id, room_id, None).await;
            continue;
        }
        match move_user(services, &user_id, room_id, new_room.as_ref(), req).await {
            Ok(()) => result.kicked_users.push(user.clone()),
            Err(e) => {
                tracing::warn!(user, room = %room_id, error = %e, "removing a user from a shut down room");
                result.failed_to_kick_users.push(user.clone());
            }
        }
    }
    result.new_room_id = new_room.map(|r| r.to_string());
    let detail = Some(room_id.to_string());
    services.audit.log(Some(admin), "room_shutdown", client, "ok", detail).await;
    tracing::info!(room = %room_id, kicked = result.kicked_users.len(), "room shut down");
    Ok(result)
}

async fn replacement_room(
    services: &Arc<Services>,
    owner: &UserId,
    req: &Shutdown,
) -> Result<OwnedRoomId> {
    if services.accounts.local_part(owner.as_str()).is_none() {
        return Err(Error::invalid_param("new_room_user_id must be a user of this server"));
    }
    if services.accounts.user(owner.localpart())?.is_none() {
        services.accounts.ensure_service_user(owner.localpart()).await?;
    }
    let request = crate::rooms::create::CreateRoomRequest {
        preset: Some("public_chat".to_owned()),
        name: Some(req.room_name.clone()),
        power_level_override: Some(serde_json::json!({"users_default": -10})),
        ..Default::default()
    };
    let room = crate::rooms::create::create_room(services, owner, request).await?;
    let content = serde_json::json!({"msgtype": "m.text", "body": req.message});
    let device: &ruma::DeviceId = "".into();
    let sender = send::Sender { user: owner, device, ts: None };
    let txn = ruma::OwnedTransactionId::from(crate::random::alphanumeric(16));
    send::message(services, sender, &room, "m.room.message".to_owned(), content, &txn).await?;
    Ok(room)
}

/// Takes `user` out of the room (their own leave, which the room's rules always allow)
/// and into `new_room`, if there is one.
async fn move_user(
    services: &Arc<Services>,
    user: &UserId,
    room_id: &RoomId,
    new_room: Option<&OwnedRoomId>,
    req: &Shutdown,
) -> Result<()> {
    membership::leave(services, user, room_id, None).await?;
    if let (Some(new_room), Some(owner)) = (new_room, &req.new_room_user_id) {
        membership::invite(services, owner, new_room, user, None).await?;
        let target: ruma::OwnedRoomOrAliasId = new_room.clone().into();
        membership::join(services, user, &target, &[], None).await?;
    }
    Ok(())
}

/// A room deletion an admin asked for, and how far it got.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Deletion {
    pub delete_id: String,
    pub room_id: String,
    /// `scheduled`, `active`, `complete` or `failed`.
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub shutdown_room: Option<ShutdownResult>,
    pub started_ts: u64,
}

/// delete id -> the deletion
const ROOM_DELETIONS: trellis_store::Table<String, trellis_store::Json<Deletion>> =
    trellis_store::Table::new(&trellis_store::catalog::ROOM_DELETIONS);

async fn record(services: &Services, deletion: &Deletion) -> Result<()> {
    let mut batch = Batch::new();
    ROOM_DELETIONS.put(&mut batch, &deletion.delete_id, &trellis_store::Json(deletion.clone()));
    crate::commit(&services.db, batch).await
}

/// Deletes a room for this server: shuts it down (see [`shutdown`]) and, with `purge`,
/// removes everything stored of it (see [`crate::rooms::purge`]). With `purge` and no
/// `force_purge`, a local user who could not be removed fails the deletion.
pub async fn delete(
    services: &Arc<Services>,
    admin: &str,
    room_id: &RoomId,
    req: &Shutdown,
    purge: bool,
    force_purge: bool,
    client: &Client,
) -> Result<ShutdownResult> {
    let mut result = shutdown(services, admin, room_id, req, client).await?;
    if purge {
        if !force_purge && !result.failed_to_kick_users.is_empty() {
            return Err(Error::invalid_param("Users are still joined to this room"));
        }
        let purged = crate::rooms::purge::purge(services, room_id, force_purge).await?;
        result.purged = true;
        let detail = Some(format!("{room_id}: {} events", purged.events));
        services.audit.log(Some(admin), "room_purge", client, "ok", detail).await;
    }
    Ok(result)
}

/// Starts [`delete`] in the background; returns the id its progress is read by.
pub async fn start_delete(
    services: Arc<Services>,
    admin: String,
    room_id: OwnedRoomId,
    req: Shutdown,
    purge: bool,
    force_purge: bool,
    client: Client,
) -> Result<String> {
    let mut deletion = Deletion {
        delete_id: crate::random::alphanumeric(16),
        room_id: room_id.to_string(),
        status: "active".to_owned(),
        error: None,
        shutdown_room: None,
        started_ts: trellis_core::now_millis(),
    };
    record(&services, &deletion).await?;
    let delete_id = deletion.delete_id.clone();
    let span = tracing::info_span!("room_delete", room = %room_id, delete_id);
    tokio::spawn(tracing::Instrument::instrument(
        async move {
            match delete(&services, &admin, &room_id, &req, purge, force_purge, &client).await {
                Ok(result) => {
                    deletion.status = "complete".to_owned();
                    deletion.shutdown_room = Some(result);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "room deletion failed");
                    deletion.status = "failed".to_owned();
                    deletion.error = Some(e.message.to_string());
                }
            }
            if let Err(e) = record(&services, &deletion).await {
                tracing::error!(error = %e, "recording a room deletion");
            }
        },
        span,
    ));
    Ok(delete_id)
}

/// Marks deletions a stop interrupted as failed (called at start-up).
pub async fn fail_interrupted(services: &Services) -> Result<()> {
    let mut stale = Vec::new();
    for row in ROOM_DELETIONS.scan_prefix(&*services.db, &(), trellis_store::Direction::Forward)? {
        let (_, trellis_store::Json(d)) = row?;
        if d.status == "active" {
            stale.push(d);
        }
    }
    for mut deletion in stale {
        deletion.status = "failed".to_owned();
        deletion.error = Some("The server stopped during the deletion; start it again".to_owned());
        record(services, &deletion).await?;
    }
    Ok(())
}

/// One deletion by its id (404 when unknown).
pub fn deletion(services: &Services, delete_id: &str) -> Result<Deletion> {
    ROOM_DELETIONS
        .get(&*services.db, &delete_id.to_owned())?
        .map(|j| j.0)
        .ok_or_else(|| Error::not_found("No such deletion"))
}

/// The deletions of a room, oldest first.
pub fn deletions_of(services: &Services, room_id: &str) -> Result<Vec<Deletion>> {
    let mut out = Vec::new();
    for row in ROOM_DELETIONS.scan_prefix(&*services.db, &(), trellis_store::Direction::Forward)? {
        let (_, trellis_store::Json(d)) = row?;
        if d.room_id == room_id {
            out.push(d);
        }
    }
    out.sort_by_key(|d| d.started_ts);
    Ok(out)
}

/// A room and the room's estimated share of storage.
#[derive(Debug, Clone, Serialize)]
pub struct RoomSize {
    pub room_id: String,
    /// The room's events times the average stored event (on disk and in memory).
    pub estimated_size: u64,
}

/// The `top` rooms taking the most storage, largest first. Counts every room's events:
/// for an admin now and then, not for requests.
pub fn largest(services: &Services, top: usize) -> Result<Vec<RoomSize>> {
    let stat = |name: &str| -> f64 {
        services
            .db
            .stats()
            .into_iter()
            .filter(|s| s.family == "events" && s.stat == name)
            .map(|s| s.value)
            .sum()
    };
    let bytes = stat("sst_bytes") + stat("memtable_bytes");
    let average = bytes / stat("estimated_keys").max(1.0);
    let mut sizes = Vec::new();
    for (_, room_id) in services.rooms.rooms_with_events_after(0)? {
        let events = services.rooms.event_count(&room_id)?;
        sizes.push(RoomSize { room_id, estimated_size: (events as f64 * average) as u64 });
    }
    sizes.sort_by(|a, b| b.estimated_size.cmp(&a.estimated_size).then(a.room_id.cmp(&b.room_id)));
    sizes.truncate(top);
    Ok(sizes)
}
