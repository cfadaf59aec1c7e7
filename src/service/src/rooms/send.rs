//! Events a local user sends into a room they are in: messages, state and redactions.

use ruma::{DeviceId, EventId, OwnedEventId, RoomId, TransactionId, UserId};
use serde_json::{Value, json};
use trellis_core::Result;

use super::{
    append::{NewEvent, Txn},
    viewer::require_joined,
};
use crate::Services;

/// The device that sent a request, so that a retried transaction returns its first event.
pub struct Sender<'a> {
    pub user: &'a UserId,
    pub device: &'a DeviceId,
}

impl Sender<'_> {
    fn txn(&self, txn_id: String) -> Txn {
        let localpart = self.user.localpart().to_owned();
        Txn { localpart, device_id: self.device.to_string(), txn_id }
    }
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
    let event = NewEvent {
        kind,
        sender: sender.user.to_string(),
        state_key: None,
        content,
        txn: Some(sender.txn(txn_id.to_string())),
        redacts: None,
    };
    Ok(services.timeline.append(room_id.as_str(), event).await?.event_id)
}

/// `PUT /rooms/{roomId}/state/{eventType}/{stateKey}`: a state event; the room's auth
/// rules decide whether `sender` may set it.
pub async fn state(
    services: &Services,
    sender: &UserId,
    room_id: &RoomId,
    kind: String,
    state_key: String,
    content: Value,
) -> Result<OwnedEventId> {
    let event = NewEvent {
        kind,
        sender: sender.to_string(),
        state_key: Some(state_key),
        content,
        txn: None,
        redacts: None,
    };
    Ok(services.timeline.append(room_id.as_str(), event).await?.event_id)
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
    };
    Ok(services.timeline.append(room_id.as_str(), event).await?.event_id)
}
