//! Membership: joining (by id or alias), knocking, leaving, forgetting, invites, kicks
//! and bans, and who is in a room.

use axum::Router;
use ruma::{
    OwnedRoomId, OwnedUserId, RoomOrAliasId,
    api::client::{
        knock::knock_room,
        membership::{
            ban_user, forget_room, invite_user, join_room_by_id, join_room_by_id_or_alias,
            joined_members, joined_rooms, kick_user, leave_room, unban_user,
        },
    },
    events::room::member::MembershipState,
};
use serde_json::Value;
use trellis_core::{Error, ErrorKind, Result};
use trellis_service::rooms::membership;

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

/// POST /_matrix/client/v3/knock/{roomIdOrAlias}
async fn knock(ctx: Ctx, req: knock_room::v3::Request) -> Result<knock_room::v3::Response> {
    ctx.rate_limit(trellis_service::ratelimit::Class::Join)?;
    let user = user(&ctx)?;
    let room_id =
        membership::knock(&ctx.services, &user, &req.room_id_or_alias, &req.via, req.reason)
            .await?;
    Ok(knock_room::v3::Response::new(room_id))
}

/// POST /_matrix/client/v3/join/{roomIdOrAlias}
async fn join_any(
    ctx: Ctx,
    req: join_room_by_id_or_alias::v3::Request,
) -> Result<join_room_by_id_or_alias::v3::Response> {
    ctx.rate_limit(trellis_service::ratelimit::Class::Join)?;
    let user = user(&ctx)?;
    let room_id =
        membership::join(&ctx.services, &user, &req.room_id_or_alias, &req.via, req.reason).await?;
    Ok(join_room_by_id_or_alias::v3::Response::new(room_id))
}

/// POST /_matrix/client/v3/rooms/{roomId}/forget
async fn forget(ctx: Ctx, req: forget_room::v3::Request) -> Result<forget_room::v3::Response> {
    ctx.services.timeline.forget(req.room_id.as_str(), &me(&ctx)?).await?;
    Ok(forget_room::v3::Response::new())
}

/// GET /_matrix/client/v3/joined_rooms
async fn joined(ctx: Ctx, _: joined_rooms::v3::Request) -> Result<joined_rooms::v3::Response> {
    let rooms = ctx.services.rooms.rooms_of(&me(&ctx)?, &MembershipState::Join)?;
    let rooms = rooms.into_iter().filter_map(|r| OwnedRoomId::try_from(r).ok()).collect();
    Ok(joined_rooms::v3::Response::new(rooms))
}

/// GET /_matrix/client/v3/rooms/{roomId}/joined_members
async fn members(
    ctx: Ctx,
    req: joined_members::v3::Request,
) -> Result<joined_members::v3::Response> {
    require_joined(&ctx, req.room_id.as_str())?;
    let mut joined = std::collections::BTreeMap::new();
    for user in ctx.services.rooms.members(req.room_id.as_str(), &MembershipState::Join)? {
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

/// The requester's user id.
fn user(ctx: &Ctx) -> Result<OwnedUserId> {
    OwnedUserId::try_from(me(ctx)?).map_err(|e| Error::internal("user id", e))
}

/// POST /_matrix/client/v3/rooms/{roomId}/join
async fn join(
    ctx: Ctx,
    req: join_room_by_id::v3::Request,
) -> Result<join_room_by_id::v3::Response> {
    ctx.rate_limit(trellis_service::ratelimit::Class::Join)?;
    let user = user(&ctx)?;
    let target = <&RoomOrAliasId>::from(&*req.room_id);
    let room_id = membership::join(&ctx.services, &user, target, &[], req.reason).await?;
    Ok(join_room_by_id::v3::Response::new(room_id))
}

/// POST /_matrix/client/v3/rooms/{roomId}/leave
async fn leave(ctx: Ctx, req: leave_room::v3::Request) -> Result<leave_room::v3::Response> {
    membership::leave(&ctx.services, &user(&ctx)?, &req.room_id, req.reason).await?;
    Ok(leave_room::v3::Response::new())
}

/// POST /_matrix/client/v3/rooms/{roomId}/invite
async fn invite(ctx: Ctx, req: invite_user::v3::Request) -> Result<invite_user::v3::Response> {
    let invite_user::v3::InvitationRecipient::UserId(recipient) = req.recipient else {
        return Err(Error::new(
            ErrorKind::BadRequest,
            trellis_core::error::code::UNRECOGNIZED,
            "Third-party invites are not supported",
        ));
    };
    let sender = user(&ctx)?;
    membership::invite(&ctx.services, &sender, &req.room_id, &recipient.user_id, recipient.reason)
        .await?;
    Ok(invite_user::v3::Response::new())
}

/// POST /_matrix/client/v3/rooms/{roomId}/kick
async fn kick(ctx: Ctx, req: kick_user::v3::Request) -> Result<kick_user::v3::Response> {
    let (sender, leave) = (user(&ctx)?, MembershipState::Leave);
    membership::set_membership(
        &ctx.services,
        &sender,
        &req.room_id,
        &req.user_id,
        leave,
        req.reason,
    )
    .await?;
    Ok(kick_user::v3::Response::new())
}

/// POST /_matrix/client/v3/rooms/{roomId}/ban
async fn ban(ctx: Ctx, req: ban_user::v3::Request) -> Result<ban_user::v3::Response> {
    let (sender, ban) = (user(&ctx)?, MembershipState::Ban);
    membership::set_membership(&ctx.services, &sender, &req.room_id, &req.user_id, ban, req.reason)
        .await?;
    Ok(ban_user::v3::Response::new())
}

/// POST /_matrix/client/v3/rooms/{roomId}/unban
async fn unban(ctx: Ctx, req: unban_user::v3::Request) -> Result<unban_user::v3::Response> {
    let (sender, leave) = (user(&ctx)?, MembershipState::Leave);
    membership::set_membership(
        &ctx.services,
        &sender,
        &req.room_id,
        &req.user_id,
        leave,
        req.reason,
    )
    .await?;
    Ok(unban_user::v3::Response::new())
}
