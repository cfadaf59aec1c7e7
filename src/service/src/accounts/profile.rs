//! User profiles: `displayname`, `avatar_url` and extended fields (spec v1.16), each a
//! JSON value stored under (user, field).

use ruma::{UserId, events::room::member::MembershipState};
use std::collections::BTreeMap;

use serde_json::Value;
use trellis_core::{Error, ErrorKind, Result, error::code};
use trellis_store::{Batch, Db, Direction, Json};

use crate::{Services, accounts::directory, commit, rooms::append::NewEvent, tables::PROFILES};

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
                ErrorKind::BadRequest,
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

/// Sets (`Some`) or removes (`None`) one of a local user's profile fields. The display
/// name and avatar live on in the user's membership event of every room they are joined
/// to, so an updated one is sent to each; a room that refuses it (a power level, say)
/// keeps the old one.
pub async fn update_field(
    services: &Services,
    user: &UserId,
    field: &str,
    value: Option<Value>,
) -> Result<()> {
    let localpart = user.localpart();
    match &value {
        Some(value) => services.profiles.set(localpart, field, value.clone()).await?,
        None => services.profiles.delete(localpart, field).await?,
    }
    if field != "displayname" && field != "avatar_url" {
        return Ok(());
    }
    let user = user.to_string();
    for room in services.rooms.rooms_of(&user, &MembershipState::Join)? {
        let Some(current) = services.rooms.state_of(&room, "m.room.member", &user)? else {
            continue;
        };
        let mut content: Value = serde_json::from_str(current.content.get())
            .unwrap_or_else(|_| Value::Object(Default::default()));
        match &value {
            Some(v) => content[field] = v.clone(),
            None => {
                if let Some(map) = content.as_object_mut() {
                    map.remove(field);
                }
            }
        }
        let event = NewEvent {
            kind: "m.room.member".into(),
            sender: user.clone(),
            state_key: Some(user.clone()),
            content,
            txn: None,
            redacts: None,
            origin_server_ts: None,
        };
        if let Err(e) = services.timeline.append(&room, event).await {
            tracing::info!(room, error = %e, "profile change not propagated to a room");
        }
    }
    Ok(())
}
