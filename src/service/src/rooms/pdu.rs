//! A PDU as stored and authorized: its canonical JSON plus the fields auth reads,
//! parsed once.

use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, MilliSecondsSinceUnixEpoch, OwnedEventId, OwnedRoomId,
    OwnedUserId, RoomId, UInt, UserId, events::TimelineEventType,
};
use serde_json::value::RawValue;
use trellis_core::{Error, Result};

/// The device and transaction id a local event was sent with, which the sending device
/// gets back in `unsigned.transaction_id` to match the event with its local echo.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LocalTransaction {
    pub device_id: String,
    pub txn_id: String,
}

#[derive(Debug, Clone)]
pub struct Pdu {
    pub event_id: OwnedEventId,
    pub room_id: Option<OwnedRoomId>,
    pub sender: OwnedUserId,
    pub origin_server_ts: MilliSecondsSinceUnixEpoch,
    pub kind: TimelineEventType,
    pub content: Box<RawValue>,
    pub state_key: Option<String>,
    pub prev_events: Vec<OwnedEventId>,
    pub auth_events: Vec<OwnedEventId>,
    pub redacts: Option<OwnedEventId>,
    pub depth: u64,
    pub rejected: bool,
    /// What the server itself keeps in the event's `unsigned` (`redacted_because`), for
    /// clients; converted once, because reading it out of `json` for every event a sync
    /// sends cost more than writing the event.
    pub unsigned: Option<std::sync::Arc<serde_json::Map<String, serde_json::Value>>>,
    /// Set for events sent by a local client with a transaction id.
    pub transaction: Option<std::sync::Arc<LocalTransaction>>,
    /// The full signed event as it is sent to other servers; shared, because events
    /// are copied out of the cache for every reader and the JSON never changes.
    pub json: std::sync::Arc<CanonicalJsonObject>,
}

fn field<'a>(obj: &'a CanonicalJsonObject, name: &str) -> Result<&'a CanonicalJsonValue> {
    obj.get(name).ok_or_else(|| Error::bad_json(format!("event lacks `{name}`")))
}

fn string(obj: &CanonicalJsonObject, name: &str) -> Result<String> {
    match field(obj, name)? {
        CanonicalJsonValue::String(s) => Ok(s.clone()),
        _ => Err(Error::bad_json(format!("event `{name}` is not a string"))),
    }
}

/// Event ids in `prev_events`/`auth_events`: plain strings, or `[id, hashes]` pairs in
/// room versions 1 and 2.
fn event_refs(obj: &CanonicalJsonObject, name: &str) -> Result<Vec<OwnedEventId>> {
    let CanonicalJsonValue::Array(items) = field(obj, name)? else {
        return Err(Error::bad_json(format!("event `{name}` is not an array")));
    };
    items
        .iter()
        .map(|item| {
            let id = match item {
                CanonicalJsonValue::String(s) => s,
                CanonicalJsonValue::Array(pair) => match pair.first() {
                    Some(CanonicalJsonValue::String(s)) => s,
                    _ => return Err(Error::bad_json(format!("bad entry in `{name}`"))),
                },
                _ => return Err(Error::bad_json(format!("bad entry in `{name}`"))),
            };
            OwnedEventId::try_from(id.as_str())
                .map_err(|e| Error::bad_json(format!("bad event id in `{name}`: {e}")))
        })
        .collect()
}

impl Pdu {
    /// Parses a signed event whose id is already known (computed or received).
    pub fn from_json(event_id: OwnedEventId, json: CanonicalJsonObject) -> Result<Self> {
        let room_id = match json.get("room_id") {
            Some(CanonicalJsonValue::String(s)) => Some(
                OwnedRoomId::try_from(s.as_str())
                    .map_err(|e| Error::bad_json(format!("bad room id: {e}")))?,
            ),
            Some(_) => return Err(Error::bad_json("event `room_id` is not a string")),
            None => None,
        };
        let sender = OwnedUserId::try_from(string(&json, "sender")?)
            .map_err(|e| Error::bad_json(format!("bad sender: {e}")))?;
        let ts = match field(&json, "origin_server_ts")? {
            CanonicalJsonValue::Integer(i) => u64::try_from(i64::from(*i))
                .ok()
                .and_then(UInt::new)
                .ok_or_else(|| Error::bad_json("negative origin_server_ts"))?,
            _ => return Err(Error::bad_json("event `origin_server_ts` is not an integer")),
        };
        let depth = match field(&json, "depth")? {
            CanonicalJsonValue::Integer(i) => {
                u64::try_from(i64::from(*i)).map_err(|_| Error::bad_json("negative depth"))?
            }
            _ => return Err(Error::bad_json("event `depth` is not an integer")),
        };
        let content = serde_json::value::to_raw_value(field(&json, "content")?)
            .map_err(|e| Error::bad_json(format!("bad content: {e}")))?;
        let state_key = match json.get("state_key") {
            Some(CanonicalJsonValue::String(s)) => Some(s.clone()),
            Some(_) => return Err(Error::bad_json("event `state_key` is not a string")),
            None => None,
        };
        let redacts = match json.get("redacts") {
            Some(CanonicalJsonValue::String(s)) => Some(
                OwnedEventId::try_from(s.as_str())
                    .map_err(|e| Error::bad_json(format!("bad redacts: {e}")))?,
            ),
            _ => None,
        };
        Ok(Self {
            event_id,
            room_id,
            sender,
            origin_server_ts: MilliSecondsSinceUnixEpoch(ts),
            kind: TimelineEventType::from(string(&json, "type")?),
            content,
            state_key,
            prev_events: event_refs(&json, "prev_events")?,
            auth_events: event_refs(&json, "auth_events")?,
            redacts,
            depth,
            rejected: false,
            unsigned: match json.get("unsigned").map(serde_json::to_value) {
                Some(Ok(serde_json::Value::Object(m))) => Some(std::sync::Arc::new(m)),
                _ => None,
            },
            transaction: None,
            json: std::sync::Arc::new(json),
        })
    }
}

impl ruma::state_res::Event for Pdu {
    type Id = OwnedEventId;

    fn event_id(&self) -> &Self::Id {
        &self.event_id
    }
    fn room_id(&self) -> Option<&RoomId> {
        self.room_id.as_deref()
    }
    fn sender(&self) -> &UserId {
        &self.sender
    }
    fn origin_server_ts(&self) -> MilliSecondsSinceUnixEpoch {
        self.origin_server_ts
    }
    fn event_type(&self) -> &TimelineEventType {
        &self.kind
    }
    fn content(&self) -> &RawValue {
        &self.content
    }
    fn state_key(&self) -> Option<&str> {
        self.state_key.as_deref()
    }
    fn prev_events(&self) -> Box<dyn DoubleEndedIterator<Item = &Self::Id> + '_> {
        Box::new(self.prev_events.iter())
    }
    fn auth_events(&self) -> Box<dyn DoubleEndedIterator<Item = &Self::Id> + '_> {
        Box::new(self.auth_events.iter())
    }
    fn redacts(&self) -> Option<&Self::Id> {
        self.redacts.as_ref()
    }
    fn rejected(&self) -> bool {
        self.rejected
    }
}
