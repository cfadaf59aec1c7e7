//! User profiles: `displayname`, `avatar_url` and extended fields (spec v1.16), each a
//! JSON value stored under (user, field).

use std::collections::BTreeMap;

use http::StatusCode;
use serde_json::Value;
use trellis_core::{Error, Result, error::code};
use trellis_store::{Batch, Db, Direction, Json};

use crate::{accounts::directory, commit, tables::PROFILES};

/// The spec caps a whole profile at 64 KiB of JSON.
pub const MAX_PROFILE_BYTES: usize = 64 * 1024;
/// Field names are at most 255 bytes.
pub const MAX_FIELD_NAME: usize = 255;

pub struct Profiles {
    db: Db,
}

impl Profiles {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    pub fn get_all(&self, localpart: &str) -> Result<BTreeMap<String, Value>> {
        PROFILES
            .scan_prefix(&*self.db, &localpart.to_owned(), Direction::Forward)?
            .map(|entry| entry.map(|((_, field), Json(v))| (field, v)).map_err(Into::into))
            .collect()
    }

    pub fn get(&self, localpart: &str, field: &str) -> Result<Option<Value>> {
        Ok(PROFILES.get(&*self.db, &(localpart.to_owned(), field.to_owned()))?.map(|j| j.0))
    }

    pub async fn set(&self, localpart: &str, field: &str, value: Value) -> Result<()> {
        if field.is_empty() || field.len() > MAX_FIELD_NAME {
            return Err(Error::new(
                StatusCode::BAD_REQUEST,
                code::INVALID_PARAM,
                "Invalid profile field name",
            ));
        }
        match field {
            "displayname" | "avatar_url" if !value.is_string() => {
                return Err(Error::bad_json(format!("{field} must be a string")));
            }
            _ => {}
        }
        let mut profile = self.get_all(localpart)?;
        profile.insert(field.to_owned(), value.clone());
        let size = serde_json::to_vec(&profile).map(|v| v.len()).unwrap_or(usize::MAX);
        if size > MAX_PROFILE_BYTES {
            return Err(Error::too_large("The profile would exceed 64 KiB"));
        }
        let mut batch = Batch::new();
        if field == "displayname" {
            let old = self.get(localpart, field)?;
            directory::rename(
                &mut batch,
                localpart,
                old.as_ref().and_then(|v| v.as_str()),
                value.as_str(),
            );
        }
        PROFILES.put(&mut batch, &(localpart.to_owned(), field.to_owned()), &Json(value));
        commit(&self.db, batch).await
    }

    pub async fn delete(&self, localpart: &str, field: &str) -> Result<()> {
        let mut batch = Batch::new();
        if field == "displayname" {
            let old = self.get(localpart, field)?;
            directory::rename(&mut batch, localpart, old.as_ref().and_then(|v| v.as_str()), None);
        }
        PROFILES.delete(&mut batch, &(localpart.to_owned(), field.to_owned()));
        commit(&self.db, batch).await
    }
}
