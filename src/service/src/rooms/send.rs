//! Events a local user sends into a room they are in: messages, state and redactions.

use ruma::{DeviceId, EventId, OwnedEventId, OwnedRoomAliasId, RoomId, TransactionId, UserId};
use serde_json::{Value, json};
use trellis_core::{Error, ErrorKind, Result, error::code};

use super::{
    append::{NewEvent, Txn},
    viewer::require_joined,
};
use crate::Services;

/// The device that sent a request, so that a retried transaction returns its first event.
pub struct Sender<'a> {
    pub user: &'a UserId,
    pub device: &'a DeviceId,
    /// The event's `origin_server_ts` when an application service sets it (`ts`).
    pub ts: Option<u64>,
}

impl Sender<'_> {
    fn txn(&self, txn_id: String) -> Txn {
        let localpart = self.user.localpart().to_owned();
        Txn { localpart, device_id: self.device.to_string(), txn_id }
    }
}

/// What a shadow-banned user is told it sent: an id that no event has.
fn decoy_event_id() -> Result<OwnedEventId> {
    EventId::parse(format!("${}", crate::random::alphanumeric(43)))
        .map_err(|e| Error::internal("event id", e))
}

/// `PUT /rooms/{roomId}/send/{eventType}/{txnId}`: a message event of `kind`.
pub async fn message(
    services: &Services,
    sender: Sender<'_>,
    room_id: &RoomId,
    kind: String,
    content: Value,
    txn_id: &TransactionId,
) -> Result<OwnedEventId> {
    require_joined(services, room_id, sender.user)?;
    if services.accounts.shadow_banned(sender.user.localpart())? {
        return decoy_event_id();
    }
    // A redaction may be sent like any event (spec v1.18), naming its target in the
    // content whatever the room version; it takes effect as through `/redact`.
    let redacts = match kind.as_str() {
        "m.room.redaction" => Some(
            content["redacts"]
                .as_str()
                .and_then(|id| EventId::parse(id).ok())
                .ok_or_else(|| Error::bad_json("A redaction names an event id in `redacts`"))?
                .to_string(),
        ),
        _ => None,
    };
    let flagged = match kind.as_str() {
        "m.room.message" => crate::policy::check_message(services, room_id, &content)?,
        _ => None,
    };
    let event = NewEvent {
        kind,
        sender: sender.user.to_string(),
        state_key: None,
        content,
        txn: Some(sender.txn(txn_id.to_string())),
        redacts,
        origin_server_ts: sender.ts,
    };
    let event_id = services.timeline.append(room_id.as_str(), event).await?.event_id;
    if let Some(found) = flagged {
        crate::policy::flag_event(services, room_id, &event_id, &found).await;
    }
    Ok(event_id)
}

/// `PUT /rooms/{roomId}/state/{eventType}/{stateKey}`: a state event; the room's auth
/// rules decide whether `sender` may set it. Setting what `sender` already set changes
/// nothing and answers with the event that stands.
pub async fn state(
    services: &Services,
    sender: &UserId,
    ts: Option<u64>,
    room_id: &RoomId,
    kind: String,
    state_key: String,
    content: Value,
) -> Result<OwnedEventId> {
    if let Some(current) = services.rooms.state_of(room_id.as_str(), &kind, &state_key)?
        && current.sender == sender
        && serde_json::from_str::<Value>(current.content.get()).is_ok_and(|c| c == content)
    {
        return Ok(current.event_id);
    }
    if kind != "m.room.member" && services.accounts.shadow_banned(sender.localpart())? {
        return decoy_event_id();
    }
    if kind == "m.room.canonical_alias" {
        check_new_aliases(services, room_id, &content).await?;
    }
    // A guest's membership goes through `/join` and `/leave`, where guest access is
    // checked; the room's auth rules know nothing of guests.
    if kind == "m.room.member" && services.accounts.is_guest(sender.localpart())? {
        return Err(Error::guest_forbidden());
    }
    let event = NewEvent {
        kind,
        sender: sender.to_string(),
        state_key: Some(state_key),
        content,
        txn: None,
        redacts: None,
        origin_server_ts: ts,
    };
    Ok(services.timeline.append(room_id.as_str(), event).await?.event_id)
}

/// The aliases a new `m.room.canonical_alias` adds (those already in the room's event
/// are not checked again) must be aliases, and must point to the room.
async fn check_new_aliases(services: &Services, room_id: &RoomId, content: &Value) -> Result<()> {
    let listed = |content: &Value| -> Vec<Value> {
        let alt = content["alt_aliases"].as_array().cloned().unwrap_or_default();
        content
            .get("alias")
            .filter(|a| !a.is_null() && a.as_str() != Some(""))
            .cloned()
            .into_iter()
            .chain(alt)
            .collect()
    };
    let current = services
        .rooms
        .state_of(room_id.as_str(), "m.room.canonical_alias", "")?
        .and_then(|pdu| serde_json::from_str::<Value>(pdu.content.get()).ok())
        .map(|c| listed(&c))
        .unwrap_or_default();
    if !content["alt_aliases"].is_null() && !content["alt_aliases"].is_array() {
        return Err(Error::invalid_param("alt_aliases must be a list of aliases"));
    }
    for alias in listed(content) {
        if current.contains(&alias) {
            continue;
        }
        let alias = alias
            .as_str()
            .and_then(|a| OwnedRoomAliasId::try_from(a).ok())
            .ok_or_else(|| Error::invalid_param("Not a room alias"))?;
        let target = if alias.server_name().as_str() == services.server_name() {
            services.aliases.resolve(alias.as_str())?.map(|record| record.room_id)
        } else {
            let answer = services.federation.remote_alias(alias.as_str()).await.ok();
            answer.and_then(|a| a["room_id"].as_str().map(str::to_owned))
        };
        if target.as_deref() != Some(room_id.as_str()) {
            return Err(Error::new(
                ErrorKind::BadRequest,
                code::BAD_ALIAS,
                format!("{alias} does not point to this room"),
            ));
        }
    }
    Ok(())
}

/// `PUT /rooms/{roomId}/redact/{eventId}/{txnId}`: redacts `event_id`, with an optional
/// reason shown to the room.
pub async fn redact(
    services: &Services,
    sender: Sender<'_>,
    room_id: &RoomId,
    event_id: &EventId,
    reason: Option<String>,
    txn_id: &TransactionId,
) -> Result<OwnedEventId> {
    require_joined(services, room_id, sender.user)?;
    if services.accounts.shadow_banned(sender.user.localpart())? {
        return decoy_event_id();
    }
    // A suspended account may redact its own events only.
    if services.accounts.user(sender.user.localpart())?.is_some_and(|u| u.suspended)
        && services
            .rooms
            .cached_event(event_id.as_str())?
            .is_some_and(|e| e.pdu.sender.as_str() != sender.user.as_str())
    {
        return Err(trellis_core::Error::user_suspended());
    }
    let mut content = json!({});
    if let Some(reason) = reason {
        content["reason"] = json!(reason);
    }
    let event = NewEvent {
        kind: "m.room.redaction".into(),
        sender: sender.user.to_string(),
        state_key: None,
        content,
        // Its own namespace: a client may reuse a transaction id across send and redact.
        txn: Some(sender.txn(format!("redact:{txn_id}"))),
        redacts: Some(event_id.to_string()),
        origin_server_ts: None,
    };
    Ok(services.timeline.append(room_id.as_str(), event).await?.event_id)
}
