//! Rooms: creating them, sending events, reading state and history, and membership.

use axum::Router;
use ruma::{
    OwnedEventId, OwnedRoomId, OwnedUserId,
    api::{
        Direction,
        client::{
            context::get_context,
            membership::{
                ban_user, forget_room, get_member_events, invite_user, join_room_by_id,
                join_room_by_id_or_alias, joined_members, joined_rooms, kick_user, leave_room,
                unban_user,
            },
            message::{get_message_events, send_message_event},
            redact::redact_event,
            room::{create_room, get_room_event},
            state::{get_state_event_for_key, get_state_events, send_state_event},
        },
    },
    serde::Raw,
};
use serde_json::{Value, json};
use trellis_core::{Error, Result};
use trellis_service::rooms::{Pdu, append::NewEvent, create::CreateRoom};

use crate::{
    AppState,
    ruma_route::{self, Ctx},
};

/// The most events one `/messages` page returns.
const MAX_PAGE: usize = 1000;

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = ruma_route::add::<create_room::v3::Request, _, _>(router, create);
    let router = ruma_route::add::<send_message_event::v3::Request, _, _>(router, send);
    let router = ruma_route::add::<send_state_event::v3::Request, _, _>(router, put_state);
    let router =
        ruma_route::add::<get_state_event_for_key::v3::Request, _, _>(router, get_state_key);
    let router = ruma_route::add::<get_state_events::v3::Request, _, _>(router, get_state);
    let router = ruma_route::add::<get_room_event::v3::Request, _, _>(router, get_event);
    let router = ruma_route::add::<get_message_events::v3::Request, _, _>(router, messages);
    let router = ruma_route::add::<joined_rooms::v3::Request, _, _>(router, joined);
    let router = ruma_route::add::<joined_members::v3::Request, _, _>(router, members);
    let router = ruma_route::add::<join_room_by_id::v3::Request, _, _>(router, join);
    let router = ruma_route::add::<leave_room::v3::Request, _, _>(router, leave);
    let router = ruma_route::add::<invite_user::v3::Request, _, _>(router, invite);
    let router = ruma_route::add::<kick_user::v3::Request, _, _>(router, kick);
    let router = ruma_route::add::<ban_user::v3::Request, _, _>(router, ban);
    let router = ruma_route::add::<unban_user::v3::Request, _, _>(router, unban);
    let router = ruma_route::add::<join_room_by_id_or_alias::v3::Request, _, _>(router, join_any);
    let router = ruma_route::add::<get_member_events::v3::Request, _, _>(router, member_events);
    let router = ruma_route::add::<forget_room::v3::Request, _, _>(router, forget);
    let router = ruma_route::add::<get_context::v3::Request, _, _>(router, context);
    ruma_route::add::<redact_event::v3::Request, _, _>(router, redact)
}

/// `/context`: an event with the events around it, for jumping into history.
async fn context(ctx: Ctx, req: get_context::v3::Request) -> Result<get_context::v3::Response> {
    let room_id = req.room_id.as_str();
    require_joined(&ctx, room_id)?;
    let rooms = &ctx.services.rooms;
    let not_found = || Error::not_found("Event not found");
    let stored = rooms.event(req.event_id.as_str())?.ok_or_else(not_found)?;
    let json =
        serde_json::from_value(stored.json).map_err(|e| Error::internal("stored event", e))?;
    let pdu = Pdu::from_json(req.event_id.clone(), json)?;
    if pdu.room_id.as_ref().is_some_and(|r| r != &req.room_id) {
        return Err(not_found());
    }
    let limit = usize::try_from(u64::from(req.limit)).unwrap_or(MAX_PAGE).min(MAX_PAGE);
    let before_count = limit / 2;
    let after_count = limit - before_count;
    let before = rooms.timeline_backwards(room_id, Some(stored.position), before_count)?;
    let mut after = rooms.timeline_forwards(room_id, stored.position, after_count)?;
    after.retain(|(pos, _)| *pos <= rooms.stream.visible());
    let mut resp = get_context::v3::Response::new();
    resp.start = Some(format!("t{}", before.last().map_or(stored.position, |(p, _)| *p)));
    resp.end = Some(format!("t{}", after.last().map_or(stored.position, |(p, _)| *p) + 1));
    resp.event = Some(to_raw(&client_event(&pdu, room_id))?);
    resp.events_before =
        before.iter().map(|(_, p)| to_raw(&client_event(p, room_id))).collect::<Result<_>>()?;
    resp.events_after =
        after.iter().map(|(_, p)| to_raw(&client_event(p, room_id))).collect::<Result<_>>()?;
    resp.state = rooms
        .current_state(room_id)?
        .iter()
        .map(|p| to_raw(&client_event(p, room_id)))
        .collect::<Result<_>>()?;
    Ok(resp)
}

async fn join_any(
    ctx: Ctx,
    req: join_room_by_id_or_alias::v3::Request,
) -> Result<join_room_by_id_or_alias::v3::Response> {
    ctx.rate_limit(trellis_service::ratelimit::Class::Join)?;
    let target = req.room_id_or_alias.as_str();
    let room_id = if target.starts_with('#') {
        let record = ctx
            .services
            .aliases
            .resolve(target)?
            .ok_or_else(|| Error::not_found("Room alias not found"))?;
        OwnedRoomId::try_from(record.room_id).map_err(|e| Error::internal("room id", e))?
    } else {
        OwnedRoomId::try_from(target).map_err(|_| Error::invalid_param("Not a room id or alias"))?
    };
    if ctx.services.rooms.room(room_id.as_str())?.is_none() {
        return Err(Error::not_found("Unknown room"));
    }
    let user = me(&ctx)?;
    membership(&ctx, room_id.as_str(), &user, "join", req.reason).await?;
    Ok(join_room_by_id_or_alias::v3::Response::new(room_id))
}

async fn member_events(
    ctx: Ctx,
    req: get_member_events::v3::Request,
) -> Result<get_member_events::v3::Response> {
    let room_id = req.room_id.as_str();
    require_joined(&ctx, room_id)?;
    let wanted = req.membership.as_ref().map(|m| m.to_string());
    let unwanted = req.not_membership.as_ref().map(|m| m.to_string());
    let mut chunk = Vec::new();
    for pdu in ctx.services.rooms.current_state(room_id)? {
        if pdu.kind != ruma::events::TimelineEventType::RoomMember {
            continue;
        }
        let content: Value = serde_json::from_str(pdu.content.get()).unwrap_or(Value::Null);
        let membership = content["membership"].as_str().unwrap_or_default().to_owned();
        if wanted.as_ref().is_some_and(|w| *w != membership)
            || unwanted.as_ref().is_some_and(|u| *u == membership)
        {
            continue;
        }
        chunk.push(to_raw(&client_event(&pdu, room_id))?);
    }
    Ok(get_member_events::v3::Response::new(chunk))
}

async fn forget(ctx: Ctx, req: forget_room::v3::Request) -> Result<forget_room::v3::Response> {
    ctx.services.rooms.forget(req.room_id.as_str(), &me(&ctx)?).await?;
    Ok(forget_room::v3::Response::new())
}

async fn redact(ctx: Ctx, req: redact_event::v3::Request) -> Result<redact_event::v3::Response> {
    let sender = require_joined(&ctx, req.room_id.as_str())?;
    let session = ctx.session()?;
    let mut content = json!({});
    if let Some(reason) = &req.reason {
        content["reason"] = json!(reason);
    }
    let event = NewEvent {
        kind: "m.room.redaction".into(),
        sender,
        state_key: None,
        content,
        txn: Some((
            session.localpart.clone(),
            session.device_id.clone(),
            format!("redact:{}", req.txn_id),
        )),
        redacts: Some(req.event_id.to_string()),
    };
    let pdu = ctx.services.rooms.append(req.room_id.as_str(), event).await?;
    Ok(redact_event::v3::Response::new(pdu.event_id))
}

fn me(ctx: &Ctx) -> Result<String> {
    Ok(ctx.services.accounts.user_id(&ctx.session()?.localpart))
}

fn raw_value<T>(raw: &Raw<T>) -> Result<Value> {
    serde_json::from_str(raw.json().get()).map_err(|e| Error::bad_json(e.to_string()))
}

fn to_raw<T>(value: &Value) -> Result<Raw<T>> {
    serde_json::value::to_raw_value(value)
        .map(Raw::from_json)
        .map_err(|e| Error::internal("event json", e))
}

/// An event as clients see it.
fn client_event(pdu: &Pdu, room_id: &str) -> Value {
    let content: Value = serde_json::from_str(pdu.content.get()).unwrap_or(Value::Null);
    let mut event = json!({
        "event_id": pdu.event_id,
        "room_id": room_id,
        "sender": pdu.sender,
        "type": pdu.kind.to_string(),
        "content": content,
        "origin_server_ts": pdu.origin_server_ts,
        "unsigned": {},
    });
    if let Some(key) = &pdu.state_key {
        event["state_key"] = json!(key);
    }
    // A redacted event carries `redacted_because` in its unsigned data.
    if let Some(unsigned) = pdu.json.get("unsigned")
        && let Ok(unsigned) = serde_json::to_value(unsigned)
    {
        event["unsigned"] = unsigned;
    }
    if let Some(redacts) = &pdu.redacts {
        event["redacts"] = json!(redacts);
    }
    event
}

/// Reading a room needs a current membership of `join` (earlier memberships and
/// history visibility come with the rest of the room work).
pub(super) fn require_joined(ctx: &Ctx, room_id: &str) -> Result<String> {
    let user = me(ctx)?;
    match ctx.services.rooms.membership(room_id, &user)?.as_deref() {
        Some("join") => Ok(user),
        _ => Err(Error::forbidden("You are not a member of this room")),
    }
}

async fn create(ctx: Ctx, req: create_room::v3::Request) -> Result<create_room::v3::Response> {
    let creator = me(&ctx)?;
    // The alias is checked before anything is created, and claimed right after.
    let alias = match &req.room_alias_name {
        Some(name) => {
            let alias = ctx
                .services
                .aliases
                .local_alias(&format!("#{name}:{}", ctx.services.server_name()))?;
            if !ctx.services.aliases.is_free(&alias)? {
                return Err(Error::new(
                    http::StatusCode::BAD_REQUEST,
                    "M_ROOM_IN_USE",
                    "This room alias is already in use",
                ));
            }
            Some(alias)
        }
        None => None,
    };
    let localpart = ctx.session()?.localpart.clone();
    let profile = &ctx.services.profiles;
    let text = |field: &str| -> Result<Option<String>> {
        Ok(profile.get(&localpart, field)?.and_then(|v| v.as_str().map(str::to_owned)))
    };
    let mut initial_state = Vec::new();
    for raw in &req.initial_state {
        let ev = raw_value(raw)?;
        let kind = ev["type"]
            .as_str()
            .ok_or_else(|| Error::bad_json("initial_state event lacks a type"))?;
        let key = ev["state_key"].as_str().unwrap_or("");
        initial_state.push((kind.to_owned(), key.to_owned(), ev["content"].clone()));
    }
    let options = CreateRoom {
        preset: req.preset.as_ref().map(|p| p.to_string()),
        public: req.visibility == ruma::api::client::room::Visibility::Public,
        name: req.name.clone(),
        topic: req.topic.clone(),
        invite: req.invite.iter().map(|u| u.to_string()).collect(),
        is_direct: req.is_direct,
        initial_state,
        power_level_override: req
            .power_level_content_override
            .as_ref()
            .map(raw_value)
            .transpose()?,
        version: req.room_version.as_ref().map(|v| v.to_string()),
        creation_content: req.creation_content.as_ref().map(raw_value).transpose()?,
        creator_displayname: text("displayname")?,
        creator_avatar_url: text("avatar_url")?,
    };
    let default_version = ctx.services.config.rooms.default_room_version.clone();
    let room_id = ctx.services.rooms.create_room_with(&creator, &default_version, options).await?;
    if let Some(alias) = alias {
        let localpart = ctx.session()?.localpart.clone();
        ctx.services.aliases.set(&alias, &room_id, &localpart).await?;
        let event = NewEvent {
            kind: "m.room.canonical_alias".into(),
            sender: creator.clone(),
            state_key: Some(String::new()),
            content: json!({"alias": alias}),
            txn: None,
            redacts: None,
        };
        ctx.services.rooms.append(&room_id, event).await?;
    }
    let room_id = OwnedRoomId::try_from(room_id).map_err(|e| Error::internal("room id", e))?;
    Ok(create_room::v3::Response::new(room_id))
}

async fn send(
    ctx: Ctx,
    req: send_message_event::v3::Request,
) -> Result<send_message_event::v3::Response> {
    ctx.rate_limit(trellis_service::ratelimit::Class::Message)?;
    let sender = require_joined(&ctx, req.room_id.as_str())?;
    let session = ctx.session()?;
    let event = NewEvent {
        kind: req.event_type.to_string(),
        sender,
        state_key: None,
        content: raw_value(&req.body)?,
        txn: Some((session.localpart.clone(), session.device_id.clone(), req.txn_id.to_string())),
        redacts: None,
    };
    let pdu = ctx.services.rooms.append(req.room_id.as_str(), event).await?;
    Ok(send_message_event::v3::Response::new(pdu.event_id))
}

async fn put_state(
    ctx: Ctx,
    req: send_state_event::v3::Request,
) -> Result<send_state_event::v3::Response> {
    let sender = me(&ctx)?;
    let event = NewEvent {
        kind: req.event_type.to_string(),
        sender,
        state_key: Some(req.state_key.clone()),
        content: raw_value(&req.body)?,
        txn: None,
        redacts: None,
    };
    let pdu = ctx.services.rooms.append(req.room_id.as_str(), event).await?;
    Ok(send_state_event::v3::Response::new(pdu.event_id))
}

async fn get_state_key(
    ctx: Ctx,
    req: get_state_event_for_key::v3::Request,
) -> Result<get_state_event_for_key::v3::Response> {
    require_joined(&ctx, req.room_id.as_str())?;
    let pdu = ctx
        .services
        .rooms
        .state_of(req.room_id.as_str(), &req.event_type.to_string(), &req.state_key)?
        .ok_or_else(|| Error::not_found("No such state event"))?;
    let body = match req.format {
        get_state_event_for_key::v3::StateEventFormat::Event => {
            serde_json::value::to_raw_value(&client_event(&pdu, req.room_id.as_str()))
                .map_err(|e| Error::internal("state event", e))?
        }
        _ => pdu.content.clone(),
    };
    Ok(get_state_event_for_key::v3::Response::new(body))
}

async fn get_state(
    ctx: Ctx,
    req: get_state_events::v3::Request,
) -> Result<get_state_events::v3::Response> {
    require_joined(&ctx, req.room_id.as_str())?;
    let state = ctx.services.rooms.current_state(req.room_id.as_str())?;
    let events = state
        .iter()
        .map(|p| to_raw(&client_event(p, req.room_id.as_str())))
        .collect::<Result<_>>()?;
    Ok(get_state_events::v3::Response::new(events))
}

async fn get_event(
    ctx: Ctx,
    req: get_room_event::v3::Request,
) -> Result<get_room_event::v3::Response> {
    require_joined(&ctx, req.room_id.as_str())?;
    let not_found = || Error::not_found("Event not found");
    let stored = ctx.services.rooms.event(req.event_id.as_str())?.ok_or_else(not_found)?;
    let json =
        serde_json::from_value(stored.json).map_err(|e| Error::internal("stored event", e))?;
    let pdu = Pdu::from_json(req.event_id.clone(), json)?;
    let in_room = pdu.room_id.as_ref().is_none_or(|r| r == &req.room_id);
    if !in_room {
        return Err(not_found());
    }
    Ok(get_room_event::v3::Response::new(to_raw(&client_event(&pdu, req.room_id.as_str()))?))
}

fn parse_token(token: &str) -> Result<u64> {
    token
        .strip_prefix('t')
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| Error::invalid_param("Invalid pagination token"))
}

async fn messages(
    ctx: Ctx,
    req: get_message_events::v3::Request,
) -> Result<get_message_events::v3::Response> {
    let room_id = req.room_id.as_str();
    require_joined(&ctx, room_id)?;
    let rooms = &ctx.services.rooms;
    let limit = usize::try_from(u64::from(req.limit)).unwrap_or(MAX_PAGE).clamp(1, MAX_PAGE);
    let from = req.from.as_deref().map(parse_token).transpose()?;
    let to = req.to.as_deref().map(parse_token).transpose()?;
    let (start, events, end) = match req.dir {
        Direction::Backward => {
            let from = from.unwrap_or_else(|| rooms.stream.visible() + 1);
            let mut page = rooms.timeline_backwards(room_id, Some(from), limit)?;
            if let Some(to) = to {
                page.retain(|(pos, _)| *pos >= to);
            }
            let end =
                (page.len() == limit).then(|| page.last().map(|(p, _)| format!("t{p}"))).flatten();
            (from, page, end)
        }
        Direction::Forward => {
            let from = from.unwrap_or(0);
            let mut page = rooms.timeline_forwards(room_id, from.saturating_sub(1), limit)?;
            page.retain(|(pos, _)| *pos <= rooms.stream.visible() && to.is_none_or(|to| *pos < to));
            let end = (page.len() == limit)
                .then(|| page.last().map(|(p, _)| format!("t{}", p + 1)))
                .flatten();
            (from, page, end)
        }
    };
    let chunk = events
        .iter()
        .map(|(_, p)| to_raw(&client_event(p, room_id)))
        .collect::<Result<Vec<_>>>()?;
    let mut resp = get_message_events::v3::Response::new();
    resp.start = format!("t{start}");
    resp.end = end;
    resp.chunk = chunk;
    Ok(resp)
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

/// Appends a membership event for `target` sent by the requester.
async fn membership(
    ctx: &Ctx,
    room_id: &str,
    target: &str,
    membership: &str,
    reason: Option<String>,
) -> Result<OwnedEventId> {
    let sender = me(ctx)?;
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
    let event = NewEvent {
        kind: "m.room.member".into(),
        sender,
        state_key: Some(target.to_owned()),
        content,
        txn: None,
        redacts: None,
    };
    Ok(ctx.services.rooms.append(room_id, event).await?.event_id)
}

async fn join(
    ctx: Ctx,
    req: join_room_by_id::v3::Request,
) -> Result<join_room_by_id::v3::Response> {
    ctx.rate_limit(trellis_service::ratelimit::Class::Join)?;
    if ctx.services.rooms.room(req.room_id.as_str())?.is_none() {
        // Joining rooms on other servers arrives with federation.
        return Err(Error::not_found("Unknown room"));
    }
    let user = me(&ctx)?;
    membership(&ctx, req.room_id.as_str(), &user, "join", req.reason).await?;
    Ok(join_room_by_id::v3::Response::new(req.room_id))
}

async fn leave(ctx: Ctx, req: leave_room::v3::Request) -> Result<leave_room::v3::Response> {
    let user = me(&ctx)?;
    if ctx.services.rooms.membership(req.room_id.as_str(), &user)?.is_none() {
        return Err(Error::not_found("You are not in this room"));
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
    membership(
        &ctx,
        req.room_id.as_str(),
        recipient.user_id.as_str(),
        "invite",
        recipient.reason.clone(),
    )
    .await?;
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
