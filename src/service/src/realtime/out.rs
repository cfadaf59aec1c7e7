//! Response documents assembled without a `serde_json::Value` tree for their events.
//!
//! A sync answer is mostly events. As `Value`s each one was parsed from its stored JSON
//! into maps, serialised back and freed: most of an initial sync's time. Here an event
//! is kept as the stored event it is ([`ClientEvent`]) and written straight out, its
//! content copied as the raw JSON it was stored as.

use std::{borrow::Cow, sync::Arc};

use serde::{Serialize, Serializer, ser::SerializeMap};
use serde_json::Value;

use crate::rooms::Pdu;

/// A JSON document: parsed values, events written from storage, and the objects and
/// arrays holding them.
#[derive(Debug)]
pub enum Out {
    Value(Value),
    Event(ClientEvent),
    Array(Vec<Out>),
    /// Keys are unique by construction (the builders insert each once).
    Object(Vec<(Key, Out)>),
}

/// An object's key: mostly the spec's field names, which need no allocation.
pub type Key = Cow<'static, str>;

/// An object built from `key: value` pairs, each value moved in through `Out::from`.
#[macro_export]
macro_rules! out_object {
    ($($key:literal : $value:expr),* $(,)?) => {
        $crate::realtime::out::Out::Object(vec![
            $( (::std::borrow::Cow::Borrowed($key), $crate::realtime::out::Out::from($value)), )*
        ])
    };
}

impl Out {
    /// An object or array with nothing in it, at any depth: a sync leaves such sections
    /// out.
    pub fn is_empty_section(&self) -> bool {
        match self {
            Out::Object(fields) => fields.iter().all(|(_, v)| v.is_empty_section()),
            Out::Array(items) => items.is_empty(),
            Out::Value(v) => value_is_empty(v),
            Out::Event(_) => false,
        }
    }

    /// Leaves out the fields of an object that are empty sections.
    pub fn drop_empty_sections(&mut self) {
        if let Out::Object(fields) = self {
            fields.retain(|(_, v)| !v.is_empty_section());
        }
    }

    /// Sets `key` of an object (replacing an earlier value); no-op on anything else.
    pub fn insert(&mut self, key: &'static str, value: impl Into<Out>) {
        if let Out::Object(fields) = self {
            let value = value.into();
            match fields.iter_mut().find(|(k, _)| k == key) {
                Some((_, slot)) => *slot = value,
                None => fields.push((Cow::Borrowed(key), value)),
            }
        }
    }
}

fn value_is_empty(v: &Value) -> bool {
    match v {
        Value::Object(m) => m.values().all(value_is_empty),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

impl Serialize for Out {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Out::Value(v) => v.serialize(serializer),
            Out::Event(e) => e.serialize(serializer),
            Out::Array(items) => serializer.collect_seq(items),
            Out::Object(fields) => serializer.collect_map(fields.iter().map(|(k, v)| (k, v))),
        }
    }
}

impl From<Value> for Out {
    fn from(v: Value) -> Self {
        Out::Value(v)
    }
}

impl From<ClientEvent> for Out {
    fn from(e: ClientEvent) -> Self {
        Out::Event(e)
    }
}

impl<T: Into<Out>> From<Vec<T>> for Out {
    fn from(items: Vec<T>) -> Self {
        Out::Array(items.into_iter().map(Into::into).collect())
    }
}

macro_rules! out_from_scalar {
    ($($t:ty),*) => {$(
        impl From<$t> for Out {
            fn from(v: $t) -> Self {
                Out::Value(Value::from(v))
            }
        }
    )*};
}
out_from_scalar!(bool, u64, usize, String, &str);

/// An event in the client format (the federation fields left out), written from the
/// stored event, with the `unsigned` fields this answer adds for its reader.
#[derive(Debug, Clone)]
pub struct ClientEvent {
    pdu: Arc<Pdu>,
    pub unsigned: Unsigned,
}

/// The `unsigned` fields a [`ClientEvent`] gets besides those stored with the event.
#[derive(Debug, Clone, Default)]
pub struct Unsigned {
    /// Milliseconds since the event was sent, by this server's clock.
    pub age: Option<u64>,
    /// Bundled aggregations.
    pub relations: Option<Value>,
    /// The transaction id the reading device sent the event with.
    pub transaction_id: Option<String>,
}

impl Unsigned {
    /// The `unsigned` fields of `pdu` for a reader (`user_id` on `device_id`) at
    /// `now_ms`.
    pub fn for_reader(pdu: &Pdu, user_id: &str, device_id: &str, now_ms: u64) -> Self {
        let transaction_id = pdu
            .transaction
            .as_ref()
            .filter(|t| t.device_id == device_id && pdu.sender.as_str() == user_id)
            .map(|t| t.txn_id.clone());
        Self {
            age: Some(now_ms.saturating_sub(u64::from(pdu.origin_server_ts.get()))),
            relations: None,
            transaction_id,
        }
    }
}

impl ClientEvent {
    /// The sync form: no `room_id`, the room being the key the event is filed under.
    pub fn new(pdu: Arc<Pdu>, unsigned: Unsigned) -> Self {
        Self { pdu, unsigned }
    }

    fn view(&self) -> EventView<'_> {
        EventView { pdu: &self.pdu, unsigned: &self.unsigned }
    }
}

impl Serialize for ClientEvent {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.view().serialize(serializer)
    }
}

/// A borrowed event in the client format.
pub struct EventView<'a> {
    pub pdu: &'a Pdu,
    pub unsigned: &'a Unsigned,
}
impl EventView<'_> {
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

impl Serialize for EventView<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let pdu = self.pdu;
        let mut map = serializer.serialize_map(None)?;
        // The content is written as stored: already valid JSON.
        map.serialize_entry("content", &*pdu.content)?;
        map.serialize_entry("event_id", pdu.event_id.as_str())?;
        map.serialize_entry("origin_server_ts", &u64::from(pdu.origin_server_ts.get()))?;
        if let Some(redacts) = &pdu.redacts {
            map.serialize_entry("redacts", redacts.as_str())?;
        }
        map.serialize_entry("sender", pdu.sender.as_str())?;
        if let Some(key) = &pdu.state_key {
            map.serialize_entry("state_key", key)?;
        }
        map.serialize_entry("type", &pdu.kind)?;
        map.serialize_entry(
            "unsigned",
            &UnsignedView { stored: pdu.unsigned.as_deref(), added: self.unsigned },
        )?;
        map.end()
    }
}

/// The stored `unsigned` fields (a remote server's were dropped when the event came in,
/// so these are this server's own) with those added for the reader.
struct UnsignedView<'a> {
    stored: Option<&'a serde_json::Map<String, Value>>,
    added: &'a Unsigned,
}

impl Serialize for UnsignedView<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        let added = ["age", "m.relations", "transaction_id"];
        for (key, value) in self.stored.into_iter().flatten() {
            if !added.contains(&key.as_str()) {
                map.serialize_entry(key, value)?;
            }
        }
        if let Some(age) = self.added.age {
            map.serialize_entry("age", &age)?;
        }
        if let Some(relations) = &self.added.relations {
            map.serialize_entry("m.relations", relations)?;
        }
        if let Some(txn_id) = &self.added.transaction_id {
            map.serialize_entry("transaction_id", txn_id)?;
        }
        map.end()
    }
}
