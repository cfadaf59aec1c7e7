//! Per-user account data, global or per room: arbitrary JSON objects by event type.

use serde_json::Value;
use trellis_core::{Error, Result};
use trellis_store::{Batch, Db, Json};

use crate::{commit, tables::ACCOUNT_DATA};

/// Types the server manages itself; clients may not set them through account data.
const SERVER_MANAGED: &[&str] = &["m.fully_read", "m.push_rules"];

pub struct AccountData {
    db: Db,
}

impl AccountData {
    pub fn new(db: Db) -> Self {
        Self { db }
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
        if !content.is_object() {
            return Err(Error::bad_json("Account data content must be a JSON object"));
        }
        let key = (localpart.to_owned(), room.unwrap_or("").to_owned(), kind.to_owned());
        let mut batch = Batch::new();
        ACCOUNT_DATA.put(&mut batch, &key, &Json(content));
        commit(&self.db, batch).await
    }
}
