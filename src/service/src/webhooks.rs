//! Webhooks (a Trellis extension, for systems that only speak HTTP), managed by a room's
//! members with the power to change its state. Incoming: a hook's secret URL takes JSON
//! or a form and the webhook bot posts it in the room; each call is rate-limited per
//! hook and audited. Outgoing: an application service reduced to a URL, which receives
//! the room's events as the standard transactions (JSON), POSTed through the SSRF guard.

use std::sync::Arc;

use ruma::{RoomId, TransactionId, UserId};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use trellis_core::{Error, ErrorKind, Result, error::code, now_millis};
use trellis_store::{Batch, Direction, Json, Table, catalog};

use crate::{
    Services,
    accounts::sessions::hash_token,
    audit::Client,
    commit, random,
    ratelimit::Class,
    rooms::{membership, send},
};

/// (room id, hook id) -> the hook
const WEBHOOKS: Table<(String, String), Json<Webhook>> = Table::new(&catalog::WEBHOOKS);
/// hook id -> room id
const WEBHOOK_ROOMS: Table<String, String> = Table::new(&catalog::WEBHOOK_ROOMS);

/// The user that posts what webhooks receive.
/// Under the `_` prefix registration refuses, so nobody can take the name first.
pub const BOT_LOCALPART: &str = "_webhooks";
/// Longest message text a call may post.
const MAX_TEXT: usize = 32 * 1024;
/// Incoming and outgoing hooks a room may have: each is a standing credential or a
/// standing copy of the room's messages.
const MAX_PER_ROOM: usize = 20;
const MAX_OUTGOING_PER_ROOM: usize = 5;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Webhook {
    pub id: String,
    pub room_id: String,
    pub name: String,
    /// `m.text` or `m.notice`, unless a call says otherwise.
    pub msgtype: String,
    pub created_by: String,
    pub created_ms: u64,
    /// sha256 of the secret in the hook's URL.
    secret_hash: Vec<u8>,
}

/// A new hook and the one place its secret is ever shown.
pub struct Created {
    pub hook: Webhook,
    pub secret: String,
}

/// What one call posts.
#[derive(Debug, Default)]
pub struct Post {
    pub text: Option<String>,
    pub html: Option<String>,
    pub msgtype: Option<String>,
}

fn check_msgtype(msgtype: &str) -> Result<()> {
    match msgtype {
        "m.text" | "m.notice" => Ok(()),
        _ => Err(Error::invalid_param("msgtype must be m.text or m.notice")),
    }
}

/// The caller may manage the room's hooks: joined, with the power to send state.
fn require_manager(services: &Services, room_id: &RoomId, user: &UserId) -> Result<()> {
    crate::rooms::viewer::require_joined(services, room_id, user)?;
    let power = services.rooms.power(room_id.as_str(), user.as_str())?;
    let needed = power.levels["state_default"].as_i64().unwrap_or(50);
    if power.level < needed {
        return Err(Error::forbidden(
            "Managing webhooks needs the power to change the room's state",
        ));
    }
    Ok(())
}

/// Creates a hook for `room_id`; the webhook bot joins the room (invited by `user`).
pub async fn create(
    services: &Arc<Services>,
    user: &UserId,
    room_id: &RoomId,
    name: Option<String>,
    msgtype: Option<String>,
    client: &Client,
) -> Result<Created> {
    require_manager(services, room_id, user)?;
    let prefix = room_id.to_string();
    if WEBHOOKS.scan_prefix(&*services.db, &prefix, Direction::Forward)?.count() >= MAX_PER_ROOM {
        return Err(Error::forbidden(format!(
            "A room has at most {MAX_PER_ROOM} incoming webhooks"
        )));
    }
    let msgtype = msgtype.unwrap_or_else(|| "m.notice".to_owned());
    check_msgtype(&msgtype)?;
    bring_bot(services, user, room_id).await?;
    let secret = random::alphanumeric(40);
    let hook = Webhook {
        id: random::alphanumeric(24),
        room_id: room_id.to_string(),
        name: name.unwrap_or_else(|| "Webhook".to_owned()),
        msgtype,
        created_by: user.to_string(),
        created_ms: now_millis(),
        secret_hash: hash_token(&secret),
    };
    let mut batch = Batch::new();
    WEBHOOKS.put(&mut batch, &(hook.room_id.clone(), hook.id.clone()), &Json(hook.clone()));
    WEBHOOK_ROOMS.put(&mut batch, &hook.id, &hook.room_id);
    services.audit.add(
        &mut batch,
        Some(user.localpart()),
        "webhook_create",
        client,
        "ok",
        Some(hook.id.clone()),
    );
    commit(&services.db, batch).await?;
    Ok(Created { hook, secret })
}

/// The bot user exists and is joined to the room.
async fn bring_bot(services: &Arc<Services>, inviter: &UserId, room_id: &RoomId) -> Result<()> {
    services.accounts.ensure_service_user(BOT_LOCALPART).await?;
    let bot = UserId::parse(services.accounts.user_id(BOT_LOCALPART))
        .map_err(|e| Error::internal("webhook bot id", e))?;
    let current = services.rooms.membership(room_id.as_str(), bot.as_str())?;
    if current == Some(ruma::events::room::member::MembershipState::Join) {
        return Ok(());
    }
    if current != Some(ruma::events::room::member::MembershipState::Invite) {
        membership::invite(services, inviter, room_id, &bot, None).await?;
    }
    let target: &ruma::RoomOrAliasId = room_id.into();
    membership::join(services, &bot, target, &[], None).await?;
    Ok(())
}

/// The room's hooks (without their secrets).
pub fn list(services: &Services, user: &UserId, room_id: &RoomId) -> Result<Vec<Webhook>> {
    require_manager(services, room_id, user)?;
    WEBHOOKS
        .scan_prefix(&*services.db, &room_id.to_string(), Direction::Forward)?
        .map(|row| Ok(row?.1.0))
        .collect()
}

/// Revokes a hook: its URL stops working at once.
pub async fn revoke(
    services: &Services,
    user: &UserId,
    room_id: &RoomId,
    id: &str,
    client: &Client,
) -> Result<()> {
    require_manager(services, room_id, user)?;
    let key = (room_id.to_string(), id.to_owned());
    if !WEBHOOKS.contains(&*services.db, &key)? {
        return Err(Error::not_found("No such webhook in this room"));
    }
    let mut batch = Batch::new();
    WEBHOOKS.delete(&mut batch, &key);
    WEBHOOK_ROOMS.delete(&mut batch, &id.to_owned());
    services.audit.add(
        &mut batch,
        Some(user.localpart()),
        "webhook_revoke",
        client,
        "ok",
        Some(id.to_owned()),
    );
    commit(&services.db, batch).await
}

/// A call of hook `id` with `secret`: posts the message as the webhook bot. An unknown
/// hook and a wrong secret are the same 404, so that hooks cannot be probed.
pub async fn call(
    services: &Services,
    id: &str,
    secret: &str,
    post: Post,
    client: &Client,
) -> Result<String> {
    let not_found = || Error::not_found("No such webhook");
    // Per address first, so guessing secrets costs the guesser, not the audit log.
    let address = client.ip.as_deref().unwrap_or("-");
    services.rate_limits.check(Class::Default, &format!("webhook-ip:{address}"))?;
    let room_id = WEBHOOK_ROOMS.get(&*services.db, &id.to_owned())?.ok_or_else(not_found)?;
    let Json(hook) =
        WEBHOOKS.get(&*services.db, &(room_id.clone(), id.to_owned()))?.ok_or_else(not_found)?;
    if hash_token(secret) != hook.secret_hash {
        services.audit.log(None, "webhook_call", client, "bad_secret", Some(id.to_owned())).await;
        return Err(not_found());
    }
    services.rate_limits.check(Class::Message, &format!("webhook:{id}"))?;
    let text = post.text.filter(|t| !t.trim().is_empty());
    let html = post.html.filter(|h| !h.trim().is_empty()).map(|h| ammonia::clean(&h));
    let body = match (&text, &html) {
        (Some(text), _) => text.clone(),
        (None, Some(html)) => ammonia::Builder::empty().clean(html).to_string(),
        (None, None) => return Err(Error::bad_json("A webhook call needs `text` (or `html`)")),
    };
    if body.len() > MAX_TEXT {
        return Err(Error::too_large("The message is too long"));
    }
    let msgtype = post.msgtype.unwrap_or(hook.msgtype);
    check_msgtype(&msgtype)?;
    let mut content = json!({"msgtype": msgtype, "body": body});
    if let Some(html) = html {
        content["format"] = json!("org.matrix.custom.html");
        content["formatted_body"] = json!(html);
    }
    let bot = UserId::parse(services.accounts.user_id(BOT_LOCALPART))
        .map_err(|e| Error::internal("webhook bot id", e))?;
    let room = RoomId::parse(&room_id).map_err(|e| Error::internal("webhook room", e))?;
    let device: &ruma::DeviceId = "WEBHOOKS".into();
    let txn = TransactionId::new();
    let sender = send::Sender { user: &bot, device, ts: None };
    let sent = send::message(services, sender, &room, "m.room.message".into(), content, &txn).await;
    let outcome = if sent.is_ok() { "ok" } else { "failed" };
    services.audit.log(None, "webhook_call", client, outcome, Some(id.to_owned())).await;
    Ok(sent?.to_string())
}

/// A call's body: JSON (`text` or `body`, `html` or `formatted_body`, `msgtype`) or a
/// form with the same fields.
pub fn parse_post(content_type: Option<&str>, body: &[u8]) -> Result<Post> {
    let form = content_type.is_some_and(|t| t.starts_with("application/x-www-form-urlencoded"));
    let fields: Value = if form {
        let pairs: serde_json::Map<String, Value> = url::form_urlencoded::parse(body)
            .map(|(k, v)| (k.into_owned(), Value::String(v.into_owned())))
            .collect();
        Value::Object(pairs)
    } else {
        serde_json::from_slice(body).map_err(|_| Error::not_json("The body is not JSON"))?
    };
    let field = |names: &[&str]| {
        names.iter().find_map(|n| fields.get(*n).and_then(Value::as_str).map(str::to_owned))
    };
    if !fields.is_object() {
        return Err(Error::new(
            ErrorKind::BadRequest,
            code::BAD_JSON,
            "The body must be an object",
        ));
    }
    Ok(Post {
        text: field(&["text", "body"]),
        html: field(&["html", "formatted_body"]),
        msgtype: field(&["msgtype"]),
    })
}

/// An outgoing webhook as its room's members see it.
pub struct Outgoing {
    pub id: String,
    pub url: String,
    /// Sent as `Authorization: Bearer` with every delivery, so the receiver can check it.
    pub token: String,
}

/// Creates an outgoing webhook of `room_id` posting to `url`.
pub async fn create_outgoing(
    services: &Arc<Services>,
    user: &UserId,
    room_id: &RoomId,
    url: &str,
    client: &Client,
) -> Result<Outgoing> {
    require_manager(services, room_id, user)?;
    let existing = services
        .appservices
        .all()
        .iter()
        .filter(|r| r.outgoing_webhook_room.as_deref() == Some(room_id.as_str()))
        .count();
    if existing >= MAX_OUTGOING_PER_ROOM {
        return Err(Error::forbidden(format!(
            "A room has at most {MAX_OUTGOING_PER_ROOM} outgoing webhooks"
        )));
    }
    if !services.appservice_delivery.webhook_url_allowed(url) {
        return Err(Error::invalid_param(
            "The URL must be http(s) and not a private, loopback or other special address",
        ));
    }
    let id = format!("hook_{}", random::alphanumeric(16).to_lowercase());
    let token = random::alphanumeric(40);
    let registration = json!({
        "id": id,
        "url": url,
        "as_token": random::alphanumeric(40),
        "hs_token": token,
        "sender_localpart": format!("_{id}"),
        "rate_limited": true,
        "namespaces": {"users": [], "aliases": [],
                       "rooms": [{"exclusive": false, "regex": regex::escape(room_id.as_str())}]},
        "org.trellis.outgoing_webhook_room": room_id,
        "org.trellis.outgoing_webhook_creator": user,
    });
    // JSON is YAML: the registration is stored and reloaded like any other.
    crate::appservice::add(services, &registration.to_string()).await?;
    services
        .audit
        .log(Some(user.localpart()), "webhook_outgoing_create", client, "ok", Some(id.clone()))
        .await;
    Ok(Outgoing { id, url: url.to_owned(), token })
}

/// The room's outgoing webhooks, as (id, URL): their tokens are shown only at creation.
pub fn list_outgoing(
    services: &Services,
    user: &UserId,
    room_id: &RoomId,
) -> Result<Vec<(String, String)>> {
    require_manager(services, room_id, user)?;
    let all = services.appservices.all();
    Ok(all
        .iter()
        .filter(|r| r.outgoing_webhook_room.as_deref() == Some(room_id.as_str()))
        .map(|r| (r.id.clone(), r.url.clone().unwrap_or_default()))
        .collect())
}

/// Removes an outgoing webhook of the room.
pub async fn revoke_outgoing(
    services: &Arc<Services>,
    user: &UserId,
    room_id: &RoomId,
    id: &str,
    client: &Client,
) -> Result<()> {
    require_manager(services, room_id, user)?;
    let of_room = services
        .appservices
        .by_id(id)
        .is_some_and(|r| r.outgoing_webhook_room.as_deref() == Some(room_id.as_str()));
    if !of_room {
        return Err(Error::not_found("No such outgoing webhook in this room"));
    }
    crate::appservice::remove(services, id).await?;
    services
        .audit
        .log(Some(user.localpart()), "webhook_outgoing_revoke", client, "ok", Some(id.to_owned()))
        .await;
    Ok(())
}
