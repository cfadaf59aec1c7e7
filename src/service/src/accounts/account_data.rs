//! Per-user account data, global or per room: arbitrary JSON objects by event type.

use std::sync::Arc;

use ruma::{
    RoomId,
    events::tag::{TagInfo, TagName, Tags},
};
use serde_json::{Map, Value, json};
use trellis_core::{Error, ErrorKind, Result};
use trellis_store::{Batch, Db, Direction, Json, Table, catalog};

use crate::{commit, rooms::stream::StreamPositions, tables::ACCOUNT_DATA};

const POSITIONS: Table<(String, String, String), u64> =
    Table::new(&catalog::ACCOUNT_DATA_POSITIONS);

/// One account data event that changed: `(room id or None, type, content)`.
pub type Change = (Option<String>, String, Value);

/// Types the server manages itself; clients may not set them through account data.
const SERVER_MANAGED: &[&str] = &["m.fully_read", "m.push_rules"];

/// Room tags live in the room's account data of this type: `{"tags": {name: {order?}}}`.
const TAG_EVENT_TYPE: &str = "m.tag";
/// The spec caps tag names at 255 bytes.
const MAX_TAG_BYTES: usize = 255;

pub struct AccountData {
    db: Db,
    stream: Arc<StreamPositions>,
    /// Tag changes rewrite the room's whole `m.tag` event: one user's changes run one at
    /// a time, so that two at once cannot both start from the same tags and lose one.
    tag_locks: crate::locks::UserLocks,
}

impl AccountData {
    pub fn new(db: Db, stream: Arc<StreamPositions>) -> Self {
        Self { db, stream, tag_locks: Default::default() }
    }

    /// `room` is `None` for global account data.
    pub fn get(&self, localpart: &str, room: Option<&str>, kind: &str) -> Result<Option<Value>> {
        let key = (localpart.to_owned(), room.unwrap_or("").to_owned(), kind.to_owned());
        Ok(ACCOUNT_DATA.get(&*self.db, &key)?.map(|j| j.0))
    }

    pub async fn set(
        &self,
        localpart: &str,
        room: Option<&str>,
        kind: &str,
        content: Value,
    ) -> Result<()> {
        if SERVER_MANAGED.contains(&kind) {
            return Err(Error::new(
                ErrorKind::MethodNotAllowed,
                trellis_core::error::code::BAD_JSON,
                format!("{kind} is managed by the server and cannot be set by clients"),
            ));
        }
        self.put(localpart, room, kind, content).await
    }

    /// Stores account data of any type (the server's own ones included) at a new
    /// stream position, so that syncs deliver it.
    pub async fn put(
        &self,
        localpart: &str,
        room: Option<&str>,
        kind: &str,
        content: Value,
    ) -> Result<()> {
        if !content.is_object() {
            return Err(Error::bad_json("Account data content must be a JSON object"));
        }
        let key = (localpart.to_owned(), room.unwrap_or("").to_owned(), kind.to_owned());
        let ticket = self.stream.dispatch();
        let mut batch = Batch::new();
        ACCOUNT_DATA.put(&mut batch, &key, &Json(content));
        POSITIONS.put(&mut batch, &key, &ticket.position);
        let result = commit(&self.db, batch).await;
        self.stream.note_change(&change_key(localpart), ticket.position);
        let retired = self.stream.retire(ticket);
        self.stream.wake_for(retired, &crate::rooms::stream::user_key(localpart));
        result
    }

    /// The user's account data changed after stream position `since` (all of it when
    /// `since` is 0), global and per room.
    pub fn changed_since(&self, localpart: &str, since: u64) -> Result<Vec<Change>> {
        let mut out = Vec::new();
        // Every sync asks; most find nothing new, and need not scan to know it.
        if !self.stream.changed_after(&change_key(localpart), since) {
            return Ok(out);
        }
        for row in POSITIONS.scan_prefix(&*self.db, &localpart.to_owned(), Direction::Forward)? {
            let ((_, room, kind), position) = row?;
            if position <= since {
                continue;
            }
            let room = (!room.is_empty()).then_some(room);
            if let Some(content) = self.get(localpart, room.as_deref(), &kind)? {
                out.push((room, kind, content));
            }
        }
        Ok(out)
    }
}

/// Room tags (`GET`, `PUT` and `DELETE` of `/user/{userId}/rooms/{roomId}/tags`).
impl AccountData {
    /// The user's tags on a room (none when the room has no `m.tag` event).
    pub fn tags(&self, localpart: &str, room_id: &RoomId) -> Result<Tags> {
        let mut tags = Tags::new();
        for (name, info) in self.stored_tags(localpart, room_id)? {
            // `m.tag` can also be written through the generic account data endpoint, so a
            // malformed entry is skipped rather than failing the whole listing.
            match serde_json::from_value::<TagInfo>(info) {
                Ok(info) => {
                    tags.insert(TagName::from(name), info);
                }
                Err(e) => tracing::debug!(error = %e, "skipping a malformed tag"),
            }
        }
        Ok(tags)
    }

    /// Adds or replaces one tag; `order` (0 to 1) places the room among others so tagged.
    pub async fn put_tag(
        &self,
        localpart: &str,
        room_id: &RoomId,
        tag: &str,
        order: Option<f64>,
    ) -> Result<()> {
        if tag.is_empty() || tag.len() > MAX_TAG_BYTES {
            return Err(Error::invalid_param(format!("Tag names are 1 to {MAX_TAG_BYTES} bytes")));
        }
        let mut info = json!({});
        if let Some(order) = order {
            if !(0.0..=1.0).contains(&order) {
                return Err(Error::invalid_param("order must be a number between 0 and 1"));
            }
            info["order"] = json!(order);
        }
        let _guard = self.tag_locks.lock(localpart).await;
        let mut tags = self.stored_tags(localpart, room_id)?;
        tags.insert(tag.to_owned(), info);
        self.put(localpart, Some(room_id.as_str()), TAG_EVENT_TYPE, json!({ "tags": tags })).await
    }

    /// Removes one tag; removing a tag the room does not have changes nothing and is not
    /// an error.
    pub async fn delete_tag(&self, localpart: &str, room_id: &RoomId, tag: &str) -> Result<()> {
        let _guard = self.tag_locks.lock(localpart).await;
        let mut tags = self.stored_tags(localpart, room_id)?;
        if tags.remove(tag).is_some() {
            self.put(localpart, Some(room_id.as_str()), TAG_EVENT_TYPE, json!({ "tags": tags }))
                .await?;
        }
        Ok(())
    }

    /// The stored tags as a JSON map (empty when none).
    fn stored_tags(&self, localpart: &str, room_id: &RoomId) -> Result<Map<String, Value>> {
        let content = self.get(localpart, Some(room_id.as_str()), TAG_EVENT_TYPE)?;
        Ok(match content.and_then(|mut c| c.get_mut("tags").map(Value::take)) {
            Some(Value::Object(tags)) => tags,
            _ => Map::new(),
        })
    }
}

/// The stream's note for a user's account data (see `StreamPositions::note_change`).
fn change_key(localpart: &str) -> String {
    format!("account_data {localpart}")
}
