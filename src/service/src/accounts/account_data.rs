//! Per-user account data, global or per room: arbitrary JSON objects by event type.

use std::sync::Arc;

use serde_json::Value;
use trellis_core::{Error, Result};
use trellis_store::{Batch, Db, Direction, Json, Table, catalog};

use crate::{commit, rooms::stream::StreamPositions, tables::ACCOUNT_DATA};

const POSITIONS: Table<(String, String, String), u64> =
    Table::new(&catalog::ACCOUNT_DATA_POSITIONS);

/// One account data event that changed: `(room id or None, type, content)`.
pub type Change = (Option<String>, String, Value);

/// Types the server manages itself; clients may not set them through account data.
const SERVER_MANAGED: &[&str] = &["m.fully_read", "m.push_rules"];

pub struct AccountData {
    db: Db,
    stream: Arc<StreamPositions>,
}

impl AccountData {
    pub fn new(db: Db, stream: Arc<StreamPositions>) -> Self {
        Self { db, stream }
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
                http::StatusCode::METHOD_NOT_ALLOWED,
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

/// The stream's note for a user's account data (see `StreamPositions::note_change`).
fn change_key(localpart: &str) -> String {
    format!("account_data {localpart}")
}
