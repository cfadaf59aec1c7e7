//! Membership: joining (by id or alias), knocking, leaving, forgetting, invites, kicks
//! and bans, and who is in a room.

use axum::Router;
use ruma::{
    RoomOrAliasId,
    api::client::{
        knock::knock_room,
        membership::{
            ban_user, forget_room, get_mutual_rooms, invite_user, join_room_by_id,
            join_room_by_id_or_alias, joined_members, joined_rooms, kick_user, leave_room,
            unban_user,
        },
    },
    events::room::member::MembershipState,
};
use trellis_core::{Error, ErrorKind, Result};
use trellis_service::rooms::{members, membership};

use super::events::user;
use crate::{
    AppState,
    ruma_route::{self, Ctx},
};

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = ruma_route::add::<joined_rooms::v3::Request, _, _>(router, joined);
    let router = ruma_route::add::<get_mutual_rooms::v1::Request, _, _>(router, mutual);
    let router =
        ruma_route::add::<get_mutual_rooms::unstable::Request, _, _>(router, mutual_msc2666);
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
    ctx.services.timeline.forget(&req.room_id, &user(&ctx)?).await?;
    Ok(forget_room::v3::Response::new())
}

/// GET /_matrix/client/v3/joined_rooms
async fn joined(ctx: Ctx, _: joined_rooms::v3::Request) -> Result<joined_rooms::v3::Response> {
    Ok(joined_rooms::v3::Response::new(ctx.services.rooms.joined_rooms(&user(&ctx)?)?))
}

/// The page of rooms the caller shares with `other` (both `mutual_rooms` paths).
fn mutual_page(
    ctx: &Ctx,
    other: &ruma::UserId,
    from: Option<&str>,
) -> Result<(Vec<ruma::OwnedRoomId>, usize, Option<String>)> {
    ctx.rate_limit(trellis_service::ratelimit::Class::Default)?;
    let (page, count, next) =
        ctx.services.rooms.mutual_rooms(user(ctx)?.as_str(), other.as_str(), from)?;
    Ok((page.into_iter().filter_map(|r| r.try_into().ok()).collect(), count, next))
}

/// GET /_matrix/client/v1/mutual_rooms
async fn mutual(
    ctx: Ctx,
    req: get_mutual_rooms::v1::Request,
) -> Result<get_mutual_rooms::v1::Response> {
    let (joined, count, next) = mutual_page(&ctx, &req.user_id, req.from.as_deref())?;
    let count = ruma::UInt::try_from(count).unwrap_or_default();
    let mut resp = get_mutual_rooms::v1::Response::new(count, joined);
    resp.next_batch = next;
    Ok(resp)
}

/// GET /_matrix/client/unstable/uk.half-shot.msc2666/user/mutual_rooms
async fn mutual_msc2666(
    ctx: Ctx,
    req: get_mutual_rooms::unstable::Request,
) -> Result<get_mutual_rooms::unstable::Response> {
    let (joined, _, next) = mutual_page(&ctx, &req.user_id, req.from.as_deref())?;
    let mut resp = get_mutual_rooms::unstable::Response::new(joined);
    resp.next_batch = next;
    Ok(resp)
}

/// GET /_matrix/client/v3/rooms/{roomId}/joined_members
async fn members(
    ctx: Ctx,
    req: joined_members::v3::Request,
) -> Result<joined_members::v3::Response> {
    let profiles = members::joined_profiles(&ctx.services, &user(&ctx)?, &req.room_id)?;
    let joined = profiles
        .into_iter()
        .map(|(user, profile)| {
            let mut member = joined_members::v3::RoomMember::new();
            member.display_name = profile.displayname;
            member.avatar_url = profile.avatar_url;
            (user, member)
        })
        .collect();
    Ok(joined_members::v3::Response::new(joined))
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
    let (room, target) = (&req.room_id, &req.user_id);
    membership::kick(&ctx.services, &user(&ctx)?, room, target, req.reason).await?;
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
    let (room, target) = (&req.room_id, &req.user_id);
    let leave = MembershipState::Leave;
    membership::set_membership(&ctx.services, &user(&ctx)?, room, target, leave, req.reason)
        .await?;
    Ok(unban_user::v3::Response::new())
}
