//! Membership changes this server's users ask for: joining, knocking, inviting, leaving,
//! kicking and banning. Each decides whether the change is made here (this server is in
//! the room) or through another server over federation.

use std::sync::Arc;

use ruma::{
    OwnedEventId, OwnedRoomId, OwnedServerName, RoomId, RoomOrAliasId, UserId,
    events::room::member::MembershipState,
};
use serde_json::{Value, json};
use trellis_core::{Error, ErrorKind, Result, error::code};

use super::append::NewEvent;
use crate::{
    Services,
    federation::{
        invites,
        membership::{join_remote, knock_remote},
        sender::room_servers,
        server_of,
    },
};

/// Joins `user` (of this server) to a room by id or alias: locally when this server is
/// in the room, else through one of the servers that may help (`via`, the alias's
/// servers, the room id's server, the inviter's).
pub async fn join(
    services: &Arc<Services>,
    user: &UserId,
    target: &RoomOrAliasId,
    via: &[OwnedServerName],
    reason: Option<String>,
) -> Result<OwnedRoomId> {
    let (room_id, mut servers) = resolve_target(services, target, via).await?;
    super::blocks::refuse_blocked(services, room_id.as_str())?;
    let user = user.as_str();
    // An invite to a room this server is not in names the server to join through.
    if let Some(invite) = invites::pending(services, user, room_id.as_str())?
        && let Some(server) = invite.event["sender"].as_str().and_then(server_of)
    {
        servers.insert(0, server.to_owned());
    }
    let (known, resident) = standing(services, &room_id)?;
    if known
        && !resident
        && servers.iter().all(|s| s == services.server_name())
        && room_servers(&services.federation, &services.rooms, room_id.as_str())?
            .iter()
            .all(|s| s == services.server_name())
    {
        // Everyone left: no server is in the room any more to let anyone back in.
        return Err(Error::not_found("No one is in this room any more"));
    }
    if is_guest(services, user)?
        && !(resident && super::guests::admitted(&services.rooms, room_id.as_str())?)
    {
        return Err(Error::forbidden("This room does not admit guests"));
    }
    if known {
        servers.extend(
            room_servers(&services.federation, &services.rooms, room_id.as_str())?.iter().cloned(),
        );
        servers.retain(|s| s != services.server_name());
        if resident || servers.is_empty() {
            append_membership(services, user, &room_id, user, "join", reason).await?;
            return Ok(room_id);
        }
    }
    servers.retain(|s| s != services.server_name());
    if servers.is_empty() {
        return Err(Error::not_found("Unknown room; no server to join it through"));
    }
    let content = member_content(services, user, "join", reason)?;
    join_remote(services, user, room_id.as_str(), &servers, content).await?;
    Ok(room_id)
}

/// Whether `user` is a guest account of this server.
fn is_guest(services: &Services, user: &str) -> Result<bool> {
    match services.accounts.local_part(user) {
        Some(localpart) => services.accounts.is_guest(localpart),
        None => Ok(false),
    }
}

/// Whether this server knows the room, and whether one of its users is joined to it
/// (then the change can be made here).
fn standing(services: &Services, room_id: &RoomId) -> Result<(bool, bool)> {
    let known = services.rooms.room(room_id.as_str())?.is_some();
    let resident = known
        && services.rooms.has_member_from(
            room_id.as_str(),
            services.server_name(),
            &[MembershipState::Join],
        )?;
    Ok((known, resident))
}

/// Knocks on a room by id or alias for `user`: locally when this server is in the room,
/// else through the servers the request, the alias or the room id name.
pub async fn knock(
    services: &Arc<Services>,
    user: &UserId,
    target: &RoomOrAliasId,
    via: &[OwnedServerName],
    reason: Option<String>,
) -> Result<OwnedRoomId> {
    let (room_id, mut servers) = resolve_target(services, target, via).await?;
    let user = user.as_str();
    let (known, resident) = standing(services, &room_id)?;
    if known && !resident {
        // A room this server left: the servers still in it can take the knock.
        servers.extend(
            room_servers(&services.federation, &services.rooms, room_id.as_str())?.iter().cloned(),
        );
    }
    servers.retain(|s| s != services.server_name());
    if resident || (!known && servers.is_empty()) {
        append_membership(services, user, &room_id, user, "knock", reason).await?;
    } else {
        let content = member_content(services, user, "knock", reason)?;
        knock_remote(services, user, room_id.as_str(), &servers, content).await?;
    }
    Ok(room_id)
}

/// `sender` invites `invitee`; another server's user is invited through their server,
/// which must countersign the invite before it enters the room.
pub async fn invite(
    services: &Arc<Services>,
    sender: &UserId,
    room_id: &RoomId,
    invitee: &UserId,
    reason: Option<String>,
) -> Result<()> {
    super::blocks::refuse_blocked(services, room_id.as_str())?;
    if services.accounts.shadow_banned(sender.localpart())? {
        // Told it worked; nobody is invited.
        return Ok(());
    }
    let (sender, target) = (sender.as_str(), invitee.as_str());
    if invitee.server_name().as_str() != services.server_name() && services.federation.enabled() {
        let content = member_content(services, sender, "invite", reason)?;
        invites::invite_remote(services, room_id.as_str(), sender, target, content).await?;
        return Ok(());
    }
    append_membership(services, sender, room_id, target, "invite", reason).await?;
    Ok(())
}

/// `user` leaves a room; a room this server is not in can only be left by rejecting a
/// pending invite (or withdrawing a knock) through the server it came from.
pub async fn leave(
    services: &Arc<Services>,
    user: &UserId,
    room_id: &RoomId,
    reason: Option<String>,
) -> Result<()> {
    let membership = services.rooms.membership(room_id.as_str(), user.as_str())?;
    if membership == Some(MembershipState::Invite)
        && crate::admin::notices::is_notice_room(services, user, room_id)?
    {
        return Err(Error::new(
            ErrorKind::Forbidden,
            code::CANNOT_LEAVE_SERVER_NOTICE_ROOM,
            "You cannot reject the invite to your server notices room",
        ));
    }
    let user = user.as_str();
    if membership.is_none() {
        return invites::reject(services, user, room_id.as_str()).await;
    }
    append_membership(services, user, room_id, user, "leave", reason).await?;
    Ok(())
}

/// `sender` sets the membership of `target` in a room this server is in: kicks
/// (`leave`), bans and unbans (`leave`).
pub async fn set_membership(
    services: &Services,
    sender: &UserId,
    room_id: &RoomId,
    target: &UserId,
    membership: MembershipState,
    reason: Option<String>,
) -> Result<OwnedEventId> {
    let (sender, target) = (sender.as_str(), target.as_str());
    append_membership(services, sender, room_id, target, membership.as_str(), reason).await
}

/// `sender` kicks `target`, who must be in the room (joined, invited or knocking): a
/// kick is not the way to unban or to pre-empt a join.
pub async fn kick(
    services: &Services,
    sender: &UserId,
    room_id: &RoomId,
    target: &UserId,
    reason: Option<String>,
) -> Result<OwnedEventId> {
    match services.rooms.membership(room_id.as_str(), target.as_str())? {
        Some(MembershipState::Join | MembershipState::Invite | MembershipState::Knock) => {
            set_membership(services, sender, room_id, target, MembershipState::Leave, reason).await
        }
        _ => Err(Error::forbidden("The user is not in the room")),
    }
}

/// The room a join or knock targets (aliases of other servers asked over federation)
/// and the servers that may help reach it if this server is not in it.
async fn resolve_target(
    services: &Services,
    target: &RoomOrAliasId,
    via: &[OwnedServerName],
) -> Result<(OwnedRoomId, Vec<String>)> {
    let target = target.as_str();
    let mut servers: Vec<String> = via.iter().map(ToString::to_string).collect();
    let room_id = if target.starts_with('#') {
        let mut known = services.aliases.resolve(target)?;
        if known.is_none() && server_of(target) == Some(services.server_name()) {
            // An application service whose namespace holds it may create it now.
            crate::appservice::queries::query_alias(services, target).await?;
            known = services.aliases.resolve(target)?;
        }
        match known {
            Some(record) => record.room_id,
            None if server_of(target).is_some_and(|s| s != services.server_name()) => {
                let answer = services.federation.remote_alias(target).await?;
                let listed = answer["servers"].as_array().into_iter().flatten();
                servers.extend(listed.filter_map(Value::as_str).map(str::to_owned));
                answer["room_id"].as_str().unwrap_or_default().to_owned()
            }
            None => return Err(Error::not_found("Room alias not found")),
        }
    } else {
        target.to_owned()
    };
    let room_id = OwnedRoomId::try_from(room_id)
        .map_err(|_| Error::invalid_param("Not a room id or alias"))?;
    if let Some(server) = server_of(room_id.as_str()) {
        servers.push(server.to_owned());
    }
    Ok((room_id, servers))
}

/// A membership event's content: the reason and, for a join, the sender's profile.
fn member_content(
    services: &Services,
    sender: &str,
    membership: &str,
    reason: Option<String>,
) -> Result<Value> {
    let mut content = json!({"membership": membership});
    if let Some(reason) = reason {
        content["reason"] = json!(reason);
    }
    if membership == "join"
        && let Some(localpart) = services.accounts.local_part(sender)
    {
        for field in ["displayname", "avatar_url"] {
            if let Some(v) = services.profiles.get(localpart, field)? {
                content[field] = v;
            }
        }
    }
    Ok(content)
}

/// Appends a membership event for `target` sent by `sender`.
async fn append_membership(
    services: &Services,
    sender: &str,
    room_id: &RoomId,
    target: &str,
    membership: &str,
    reason: Option<String>,
) -> Result<OwnedEventId> {
    let event = NewEvent {
        kind: "m.room.member".into(),
        sender: sender.to_owned(),
        state_key: Some(target.to_owned()),
        content: member_content(services, sender, membership, reason)?,
        txn: None,
        redacts: None,
        origin_server_ts: None,
    };
    Ok(services.timeline.append(room_id.as_str(), event).await?.event_id)
}
