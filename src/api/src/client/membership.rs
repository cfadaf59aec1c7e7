//! Membership: joining (by id or alias), knocking, leaving, forgetting, invites, kicks
//! and bans, and who is in a room.

use axum::Router;
use ruma::{
    OwnedEventId, OwnedRoomId, OwnedUserId,
    api::client::{
        knock::knock_room,
        membership::{
            ban_user, forget_room, invite_user, join_room_by_id, join_room_by_id_or_alias,
            joined_members, joined_rooms, kick_user, leave_room, unban_user,
        },
    },
};
use serde_json::{Value, json};
use trellis_core::{Error, Result};
use trellis_service::{
    federation::{
        invites,
        membership::{join_remote, knock_remote},
        sender::room_servers,
        server_of,
    },
    rooms::append::NewEvent,
};

use super::events::{me, require_joined};
use crate::{
    AppState,
    ruma_route::{self, Ctx},
};

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = ruma_route::add::<joined_rooms::v3::Request, _, _>(router, joined);
    let router = ruma_route::add::<joined_members::v3::Request, _, _>(router, members);
    let router = ruma_route::add::<join_room_by_id::v3::Request, _, _>(router, join);
    let router = ruma_route::add::<join_room_by_id_or_alias::v3::Request, _, _>(router, join_any);
    let router = ruma_route::add::<knock_room::v3::Request, _, _>(router, knock);
    let router = ruma_route::add::<leave_room::v3::Request, _, _>(router, leave);
    let router = ruma_route::add::<invite_user::v3::Request, _, _>(router, invite);
    let router = ruma_route::add::<kick_user::v3::Request, _, _>(router, kick);
    let router = ruma_route::add::<ban_user::v3::Request, _, _>(router, ban);
    let router = ruma_route::add::<unban_user::v3::Request, _, _>(router, unban);
    ruma_route::add::<forget_room::v3::Request, _, _>(router, forget)
}

/// The room a join targets (aliases of other servers asked over federation) and the
/// servers that may help join it if this server is not in it.
async fn join_target(
    ctx: &Ctx,
    target: &str,
    via: &[ruma::OwnedServerName],
) -> Result<(OwnedRoomId, Vec<String>)> {
    let mut servers: Vec<String> = via.iter().map(ToString::to_string).collect();
    let room_id = if target.starts_with('#') {
        match ctx.services.aliases.resolve(target)? {
            Some(record) => record.room_id,
            None if server_of(target).is_some_and(|s| s != ctx.services.server_name()) => {
                let answer = ctx.services.federation.remote_alias(target).await?;
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

/// Joins the requester to a room: locally when this server is in it, else through one
/// of `servers` over federation.
async fn join_room(
    ctx: &Ctx,
    room_id: &OwnedRoomId,
    mut servers: Vec<String>,
    reason: Option<String>,
) -> Result<()> {
    let services = &ctx.services;
    let user = me(ctx)?;
    // An invite to a room this server is not in names the server to join through.
    if let Some(invite) = invites::pending(services, &user, room_id.as_str())?
        && let Some(server) = invite.event["sender"].as_str().and_then(server_of)
    {
        servers.insert(0, server.to_owned());
    }
    let known = services.rooms.room(room_id.as_str())?.is_some();
    if known {
        let resident =
            services.rooms.has_member_from(room_id.as_str(), services.server_name(), &["join"])?;
        servers.extend(
            room_servers(&services.federation, &services.rooms, room_id.as_str())?.iter().cloned(),
        );
        servers.retain(|s| s != services.server_name());
        if resident || servers.is_empty() {
            membership(ctx, room_id.as_str(), &user, "join", reason).await?;
            return Ok(());
        }
    }
    servers.retain(|s| s != services.server_name());
    if servers.is_empty() {
        return Err(Error::not_found("Unknown room; no server to join it through"));
    }
    let content = member_content(ctx, "join", reason)?;
    join_remote(services, &user, room_id.as_str(), &servers, content).await
}

/// Knocks: locally when this server is in the room, else through the servers the
/// request, the alias or the room id name.
async fn knock(ctx: Ctx, req: knock_room::v3::Request) -> Result<knock_room::v3::Response> {
    ctx.rate_limit(trellis_service::ratelimit::Class::Join)?;
    let services = &ctx.services;
    let (room_id, mut servers) = join_target(&ctx, req.room_id_or_alias.as_str(), &req.via).await?;
    let user = me(&ctx)?;
    let known = services.rooms.room(room_id.as_str())?.is_some();
    let resident = known
        && services.rooms.has_member_from(room_id.as_str(), services.server_name(), &["join"])?;
    if known && !resident {
        // A room this server left: the servers still in it can take the knock.
        servers.extend(
            room_servers(&services.federation, &services.rooms, room_id.as_str())?.iter().cloned(),
        );
    }
    servers.retain(|s| s != services.server_name());
    if resident || (!known && servers.is_empty()) {
        membership(&ctx, room_id.as_str(), &user, "knock", req.reason).await?;
    } else {
        let content = member_content(&ctx, "knock", req.reason)?;
        knock_remote(services, &user, room_id.as_str(), &servers, content).await?;
    }
    Ok(knock_room::v3::Response::new(room_id))
}

async fn join_any(
    ctx: Ctx,
    req: join_room_by_id_or_alias::v3::Request,
) -> Result<join_room_by_id_or_alias::v3::Response> {
    ctx.rate_limit(trellis_service::ratelimit::Class::Join)?;
    let (room_id, servers) = join_target(&ctx, req.room_id_or_alias.as_str(), &req.via).await?;
    join_room(&ctx, &room_id, servers, req.reason).await?;
    Ok(join_room_by_id_or_alias::v3::Response::new(room_id))
}

async fn forget(ctx: Ctx, req: forget_room::v3::Request) -> Result<forget_room::v3::Response> {
    ctx.services.timeline.forget(req.room_id.as_str(), &me(&ctx)?).await?;
    Ok(forget_room::v3::Response::new())
}

async fn joined(ctx: Ctx, _: joined_rooms::v3::Request) -> Result<joined_rooms::v3::Response> {
    let rooms = ctx.services.rooms.rooms_of(&me(&ctx)?, "join")?;
    let rooms = rooms.into_iter().filter_map(|r| OwnedRoomId::try_from(r).ok()).collect();
    Ok(joined_rooms::v3::Response::new(rooms))
}

async fn members(
    ctx: Ctx,
    req: joined_members::v3::Request,
) -> Result<joined_members::v3::Response> {
    require_joined(&ctx, req.room_id.as_str())?;
    let mut joined = std::collections::BTreeMap::new();
    for user in ctx.services.rooms.members(req.room_id.as_str(), "join")? {
        let Ok(user_id) = OwnedUserId::try_from(user.as_str()) else { continue };
        let mut member = joined_members::v3::RoomMember::new();
        if let Some(pdu) =
            ctx.services.rooms.state_of(req.room_id.as_str(), "m.room.member", &user)?
        {
            let content: Value = serde_json::from_str(pdu.content.get()).unwrap_or(Value::Null);
            member.display_name = content["displayname"].as_str().map(str::to_owned);
            member.avatar_url = content["avatar_url"].as_str().map(|s| s.to_owned().into());
        }
        joined.insert(user_id, member);
    }
    Ok(joined_members::v3::Response::new(joined))
}

/// A membership event's content: the reason and, for a join, the requester's profile.
fn member_content(ctx: &Ctx, membership: &str, reason: Option<String>) -> Result<Value> {
    let mut content = json!({"membership": membership});
    if let Some(reason) = reason {
        content["reason"] = json!(reason);
    }
    if membership == "join" {
        let localpart = &ctx.session()?.localpart;
        for field in ["displayname", "avatar_url"] {
            if let Some(v) = ctx.services.profiles.get(localpart, field)? {
                content[field] = v;
            }
        }
    }
    Ok(content)
}

/// Appends a membership event for `target` sent by the requester.
async fn membership(
    ctx: &Ctx,
    room_id: &str,
    target: &str,
    membership: &str,
    reason: Option<String>,
) -> Result<OwnedEventId> {
    let sender = me(ctx)?;
    let content = member_content(ctx, membership, reason)?;
    let event = NewEvent {
        kind: "m.room.member".into(),
        sender,
        state_key: Some(target.to_owned()),
        content,
        txn: None,
        redacts: None,
    };
    Ok(ctx.services.timeline.append(room_id, event).await?.event_id)
}

async fn join(
    ctx: Ctx,
    req: join_room_by_id::v3::Request,
) -> Result<join_room_by_id::v3::Response> {
    ctx.rate_limit(trellis_service::ratelimit::Class::Join)?;
    let (room_id, servers) = join_target(&ctx, req.room_id.as_str(), &[]).await?;
    join_room(&ctx, &room_id, servers, req.reason).await?;
    Ok(join_room_by_id::v3::Response::new(room_id))
}

async fn leave(ctx: Ctx, req: leave_room::v3::Request) -> Result<leave_room::v3::Response> {
    let user = me(&ctx)?;
    if ctx.services.rooms.membership(req.room_id.as_str(), &user)?.is_none() {
        // Rejecting an invite to a room on another server.
        invites::reject(&ctx.services, &user, req.room_id.as_str()).await?;
        return Ok(leave_room::v3::Response::new());
    }
    membership(&ctx, req.room_id.as_str(), &user, "leave", req.reason).await?;
    Ok(leave_room::v3::Response::new())
}

async fn invite(ctx: Ctx, req: invite_user::v3::Request) -> Result<invite_user::v3::Response> {
    let invite_user::v3::InvitationRecipient::UserId(recipient) = &req.recipient else {
        return Err(Error::new(
            http::StatusCode::BAD_REQUEST,
            trellis_core::error::code::UNRECOGNIZED,
            "Third-party invites are not supported",
        ));
    };
    let target = recipient.user_id.as_str();
    if recipient.user_id.server_name().as_str() != ctx.services.server_name()
        && ctx.services.federation.enabled()
    {
        // The invitee's server must countersign the invite before it enters the room.
        let content = member_content(&ctx, "invite", recipient.reason.clone())?;
        let sender = me(&ctx)?;
        invites::invite_remote(&ctx.services, req.room_id.as_str(), &sender, target, content)
            .await?;
        return Ok(invite_user::v3::Response::new());
    }
    membership(&ctx, req.room_id.as_str(), target, "invite", recipient.reason.clone()).await?;
    Ok(invite_user::v3::Response::new())
}

async fn kick(ctx: Ctx, req: kick_user::v3::Request) -> Result<kick_user::v3::Response> {
    membership(&ctx, req.room_id.as_str(), req.user_id.as_str(), "leave", req.reason).await?;
    Ok(kick_user::v3::Response::new())
}

async fn ban(ctx: Ctx, req: ban_user::v3::Request) -> Result<ban_user::v3::Response> {
    membership(&ctx, req.room_id.as_str(), req.user_id.as_str(), "ban", req.reason).await?;
    Ok(ban_user::v3::Response::new())
}

async fn unban(ctx: Ctx, req: unban_user::v3::Request) -> Result<unban_user::v3::Response> {
    membership(&ctx, req.room_id.as_str(), req.user_id.as_str(), "leave", req.reason).await?;
    Ok(unban_user::v3::Response::new())
}
