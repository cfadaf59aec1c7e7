//! Server-side key backup (`room_keys`): versions holding encrypted room keys that
//! only the user's clients can decrypt. Writes go to the current (newest live) version
//! only; when a session is stored twice the "better" copy is kept.

use std::{cmp::Ordering, collections::BTreeMap};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use trellis_core::{Error, ErrorKind, Result, error::code};
use trellis_store::{Batch, Direction, Json, Table, catalog};

use super::{E2ee, object};
use crate::commit;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BackupVersion {
    pub algorithm: String,
    pub auth_data: Value,
    /// Changes whenever the stored keys change, so clients notice new keys.
    pub etag: u64,
    pub count: u64,
    pub deleted: bool,
}

const VERSIONS: Table<(String, u64), Json<BackupVersion>> = Table::new(&catalog::BACKUP_VERSIONS);
/// (localpart, version, room id, session id) -> key backup data
const KEYS: Table<(String, u64, String, String), Json<Value>> = Table::new(&catalog::BACKUP_KEYS);

/// `rooms[room id][session id] = key backup data`
pub type Sessions = BTreeMap<String, BTreeMap<String, Value>>;

fn no_backup() -> Error {
    Error::not_found("No current backup version")
}

fn unknown_version() -> Error {
    Error::not_found("Unknown backup version")
}

/// The key data a client stores: these fields decide which copy of a session wins.
fn check_key_data(data: &Value) -> Result<()> {
    let obj = object(data, "key backup data")?;
    let ok = obj.get("first_message_index").is_some_and(Value::is_u64)
        && obj.get("forwarded_count").is_some_and(Value::is_u64)
        && obj.get("is_verified").is_some_and(Value::is_boolean)
        && obj.get("session_data").is_some_and(Value::is_object);
    if ok {
        Ok(())
    } else {
        Err(Error::bad_json(
            "Key backup data needs first_message_index, forwarded_count, is_verified and \
             session_data",
        ))
    }
}

/// The spec's rule: a verified copy beats an unverified one, then the lower first
/// message index, then the lower forwarded count. On a tie the stored copy stays.
fn better(new: &Value, old: &Value) -> bool {
    let verified = |v: &Value| v["is_verified"].as_bool().unwrap_or(false);
    let index = |v: &Value| v["first_message_index"].as_u64().unwrap_or(u64::MAX);
    let forwarded = |v: &Value| v["forwarded_count"].as_u64().unwrap_or(u64::MAX);
    match verified(new).cmp(&verified(old)) {
        Ordering::Greater => return true,
        Ordering::Less => return false,
        Ordering::Equal => {}
    }
    match index(new).cmp(&index(old)) {
        Ordering::Less => true,
        Ordering::Greater => false,
        Ordering::Equal => forwarded(new) < forwarded(old),
    }
}

impl E2ee {
    fn backup_versions(&self, localpart: &str) -> Result<Vec<(u64, BackupVersion)>> {
        VERSIONS
            .scan_prefix(&*self.db, &localpart.to_owned(), Direction::Forward)?
            .map(|row| row.map(|((_, v), Json(b))| (v, b)).map_err(Into::into))
            .collect()
    }

    fn current_backup(&self, localpart: &str) -> Result<Option<(u64, BackupVersion)>> {
        Ok(self.backup_versions(localpart)?.into_iter().rev().find(|(_, b)| !b.deleted))
    }

    /// A live version by its id (ids are decimal numbers).
    fn live_version(&self, localpart: &str, version: &str) -> Result<(u64, BackupVersion)> {
        let number: u64 = version.parse().map_err(|_| unknown_version())?;
        match VERSIONS.get(&*self.db, &(localpart.to_owned(), number))? {
            Some(Json(b)) if !b.deleted => Ok((number, b)),
            _ => Err(unknown_version()),
        }
    }

    /// The version writes may go to: it must be the current one.
    fn writable_version(&self, localpart: &str, version: &str) -> Result<(u64, BackupVersion)> {
        let Some((current, info)) = self.current_backup(localpart)? else {
            return Err(no_backup());
        };
        if version.parse::<u64>().ok() != Some(current) {
            return Err(Error::new(
                ErrorKind::Forbidden,
                code::WRONG_ROOM_KEYS_VERSION,
                "Wrong backup version",
            )
            .with_field("current_version", current.to_string()));
        }
        Ok((current, info))
    }

    pub async fn create_backup(
        &self,
        localpart: &str,
        algorithm: String,
        auth_data: Value,
    ) -> Result<String> {
        object(&auth_data, "auth_data")?;
        let _guard = self.lock_user(localpart).await;
        let next = self.backup_versions(localpart)?.last().map_or(1, |(v, _)| v + 1);
        let record = BackupVersion { algorithm, auth_data, etag: 0, count: 0, deleted: false };
        let mut batch = Batch::new();
        VERSIONS.put(&mut batch, &(localpart.to_owned(), next), &Json(record));
        commit(&self.db, batch).await?;
        Ok(next.to_string())
    }

    /// `GET room_keys/version[/{version}]`: the current version when none is named.
    pub fn backup_info(&self, localpart: &str, version: Option<&str>) -> Result<Value> {
        let (number, info) = match version {
            Some(v) => self.live_version(localpart, v)?,
            None => self.current_backup(localpart)?.ok_or_else(no_backup)?,
        };
        Ok(json!({
            "algorithm": info.algorithm,
            "auth_data": info.auth_data,
            "count": info.count,
            "etag": info.etag.to_string(),
            "version": number.to_string(),
        }))
    }

    /// `PUT room_keys/version/{version}`: only `auth_data` may change.
    pub async fn update_backup(
        &self,
        localpart: &str,
        version: &str,
        algorithm: &str,
        auth_data: Value,
        body_version: Option<&str>,
    ) -> Result<()> {
        object(&auth_data, "auth_data")?;
        if body_version.is_some_and(|v| v != version) {
            return Err(Error::invalid_param("The version in the body does not match the path"));
        }
        let _guard = self.lock_user(localpart).await;
        let (number, mut info) = self.live_version(localpart, version)?;
        if info.algorithm != algorithm {
            return Err(Error::invalid_param("A backup's algorithm cannot change"));
        }
        info.auth_data = auth_data;
        let mut batch = Batch::new();
        VERSIONS.put(&mut batch, &(localpart.to_owned(), number), &Json(info));
        commit(&self.db, batch).await
    }

    /// `DELETE room_keys/version/{version}`: the version and all its keys go.
    pub async fn delete_backup(&self, localpart: &str, version: &str) -> Result<()> {
        let _guard = self.lock_user(localpart).await;
        let (number, mut info) = self.live_version(localpart, version)?;
        let mut batch = Batch::new();
        for row in
            KEYS.scan_prefix(&*self.db, &(localpart.to_owned(), number), Direction::Forward)?
        {
            KEYS.delete(&mut batch, &row?.0);
        }
        info.deleted = true;
        info.count = 0;
        VERSIONS.put(&mut batch, &(localpart.to_owned(), number), &Json(info));
        commit(&self.db, batch).await
    }

    /// Stores sessions in the current version; returns `(etag, count)`.
    pub async fn put_backup_keys(
        &self,
        localpart: &str,
        version: &str,
        rooms: Sessions,
    ) -> Result<(String, u64)> {
        for sessions in rooms.values() {
            for data in sessions.values() {
                check_key_data(data)?;
            }
        }
        let _guard = self.lock_user(localpart).await;
        let (number, mut info) = self.writable_version(localpart, version)?;
        let mut batch = Batch::new();
        let mut changed = false;
        for (room, sessions) in rooms {
            for (session, data) in sessions {
                let key = (localpart.to_owned(), number, room.clone(), session);
                match KEYS.get(&*self.db, &key)? {
                    Some(Json(old)) if !better(&data, &old) => continue,
                    Some(_) => {}
                    None => info.count += 1,
                }
                KEYS.put(&mut batch, &key, &Json(data));
                changed = true;
            }
        }
        if changed {
            info.etag += 1;
            VERSIONS.put(&mut batch, &(localpart.to_owned(), number), &Json(info.clone()));
            commit(&self.db, batch).await?;
        }
        Ok((info.etag.to_string(), info.count))
    }

    /// The stored sessions of a version, all of them or one room's.
    pub fn get_backup_keys(
        &self,
        localpart: &str,
        version: &str,
        room: Option<&str>,
    ) -> Result<Sessions> {
        let (number, _) = self.live_version(localpart, version)?;
        let mut out = Sessions::new();
        let rows: Vec<_> = match room {
            Some(room) => KEYS
                .scan_prefix(
                    &*self.db,
                    &(localpart.to_owned(), number, room.to_owned()),
                    Direction::Forward,
                )?
                .collect(),
            None => KEYS
                .scan_prefix(&*self.db, &(localpart.to_owned(), number), Direction::Forward)?
                .collect(),
        };
        for row in rows {
            let ((_, _, room, session), Json(data)) = row?;
            out.entry(room).or_default().insert(session, data);
        }
        Ok(out)
    }

    /// One stored session, or 404.
    pub fn get_backup_session(
        &self,
        localpart: &str,
        version: &str,
        room: &str,
        session: &str,
    ) -> Result<Value> {
        let (number, _) = self.live_version(localpart, version)?;
        let key = (localpart.to_owned(), number, room.to_owned(), session.to_owned());
        KEYS.get(&*self.db, &key)?
            .map(|j| j.0)
            .ok_or_else(|| Error::not_found("No such session in the backup"))
    }

    /// Deletes all sessions, a room's, or one; returns `(etag, count)`.
    pub async fn delete_backup_keys(
        &self,
        localpart: &str,
        version: &str,
        room: Option<&str>,
        session: Option<&str>,
    ) -> Result<(String, u64)> {
        let _guard = self.lock_user(localpart).await;
        let (number, mut info) = self.live_version(localpart, version)?;
        let mut batch = Batch::new();
        let mut removed = 0;
        let keys: Vec<(String, u64, String, String)> = match (room, session) {
            (Some(room), Some(session)) => {
                let key = (localpart.to_owned(), number, room.to_owned(), session.to_owned());
                if KEYS.contains(&*self.db, &key)? { vec![key] } else { Vec::new() }
            }
            (Some(room), None) => KEYS
                .scan_prefix(
                    &*self.db,
                    &(localpart.to_owned(), number, room.to_owned()),
                    Direction::Forward,
                )?
                .map(|r| r.map(|(k, _)| k))
                .collect::<Result<_, _>>()?,
            _ => KEYS
                .scan_prefix(&*self.db, &(localpart.to_owned(), number), Direction::Forward)?
                .map(|r| r.map(|(k, _)| k))
                .collect::<Result<_, _>>()?,
        };
        for key in keys {
            KEYS.delete(&mut batch, &key);
            removed += 1;
        }
        if removed > 0 {
            info.count = info.count.saturating_sub(removed);
            info.etag += 1;
            VERSIONS.put(&mut batch, &(localpart.to_owned(), number), &Json(info.clone()));
            commit(&self.db, batch).await?;
        }
        Ok((info.etag.to_string(), info.count))
    }
}

/// `{room id: {"sessions": {session id: data}}}` as the spec's responses shape it.
pub fn rooms_json(rooms: Sessions) -> Value {
    let mut out = Map::new();
    for (room, sessions) in rooms {
        out.insert(room, json!({ "sessions": sessions }));
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(verified: bool, index: u64, forwarded: u64) -> Value {
        json!({"is_verified": verified, "first_message_index": index,
               "forwarded_count": forwarded, "session_data": {}})
    }

    #[test]
    fn the_better_session_wins() {
        // Verification first, whatever the indexes say.
        assert!(better(&key(true, 9, 9), &key(false, 0, 0)));
        assert!(!better(&key(false, 0, 0), &key(true, 9, 9)));
        // Then the lower first message index, then the lower forwarded count.
        assert!(better(&key(false, 1, 5), &key(false, 2, 0)));
        assert!(!better(&key(false, 3, 0), &key(false, 2, 5)));
        assert!(better(&key(true, 2, 0), &key(true, 2, 1)));
        // A tie keeps what is stored.
        assert!(!better(&key(true, 2, 1), &key(true, 2, 1)));
    }

    #[test]
    fn key_data_needs_the_deciding_fields() {
        assert!(check_key_data(&key(true, 0, 0)).is_ok());
        assert!(check_key_data(&json!({"session_data": {}})).is_err());
        assert!(check_key_data(&json!("x")).is_err());
    }
}
