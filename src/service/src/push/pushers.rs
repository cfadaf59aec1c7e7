//! Pushers: where a user's notifications go (an HTTP push gateway or email), one per
//! (app id, pushkey) per user. Kept in memory too: every notifying event asks whether
//! its recipients have any (`push::gateway` and `push::email` send to them).

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use trellis_core::{Error, ErrorKind, Result, error::code, now_millis};
use trellis_store::{Batch, Db, Direction, Json, Table, catalog};

use crate::{accounts::threepid, commit, tables::USER_THREEPIDS};

/// (user localpart, app id, pushkey) -> pusher
const PUSHERS: Table<(String, String, String), Json<PusherRecord>> = Table::new(&catalog::PUSHERS);
/// (app id, pushkey, user localpart) -> (): every user holding a pushkey
const PUSHER_KEYS: Table<(String, String, String), ()> = Table::new(&catalog::PUSHER_KEYS);

/// Spec limits on the identifiers.
pub const MAX_APP_ID_CHARS: usize = 64;
pub const MAX_PUSHKEY_BYTES: usize = 512;
/// Pushers one user may hold: each is a destination the server will call for every
/// notification, so an unbounded number would let one account multiply that work.
pub const MAX_PUSHERS_PER_USER: usize = 100;
/// The one path a push gateway URL may have (push gateway API).
pub const GATEWAY_PATH: &str = "/_matrix/push/v1/notify";

/// A pusher as `GET /pushers` lists it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Pusher {
    pub pushkey: String,
    /// `http` or `email`.
    pub kind: String,
    pub app_id: String,
    pub app_display_name: String,
    pub device_display_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile_tag: Option<String>,
    pub lang: String,
    pub data: Map<String, Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PusherRecord {
    pub pusher: Pusher,
    /// The device that set it, so a device's pushers can go when the device does.
    pub device_id: String,
    pub created_ms: u64,
}

/// What a `POST /pushers/set` body asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum PusherChange {
    /// Create or update; without `append`, others' pushers with the same app id and
    /// pushkey are removed.
    Set { pusher: Pusher, append: bool },
    /// `kind: null`.
    Delete { app_id: String, pushkey: String },
}

impl PusherChange {
    /// Validates a `POST /pushers/set` body.
    pub fn parse(body: &Value) -> Result<Self> {
        let obj = body.as_object().ok_or_else(|| Error::bad_json("The body must be an object"))?;
        let mut missing = Vec::new();
        let string = |name: &str, missing: &mut Vec<String>| -> Result<Option<String>> {
            match obj.get(name) {
                Some(Value::String(s)) => Ok(Some(s.clone())),
                None | Some(Value::Null) => {
                    missing.push(name.to_owned());
                    Ok(None)
                }
                Some(_) => Err(Error::bad_json(format!("{name} must be a string"))),
            }
        };
        let app_id = string("app_id", &mut missing)?;
        let pushkey = string("pushkey", &mut missing)?;
        // `kind` must be present; `null` is meaningful (delete).
        let kind = match obj.get("kind") {
            None => {
                missing.push("kind".to_owned());
                None
            }
            Some(Value::Null) => None,
            Some(Value::String(k)) => Some(k.clone()),
            Some(_) => return Err(Error::bad_json("kind must be a string or null")),
        };
        let (Some(app_id), Some(pushkey)) = (app_id, pushkey) else {
            return Err(missing_params(&missing));
        };
        if !missing.is_empty() {
            return Err(missing_params(&missing));
        }
        if app_id.is_empty() || app_id.chars().count() > MAX_APP_ID_CHARS {
            return Err(Error::invalid_param(format!(
                "app_id must be 1 to {MAX_APP_ID_CHARS} characters"
            )));
        }
        if pushkey.is_empty() || pushkey.len() > MAX_PUSHKEY_BYTES {
            return Err(Error::invalid_param(format!(
                "pushkey must be 1 to {MAX_PUSHKEY_BYTES} bytes"
            )));
        }
        let Some(kind) = kind else { return Ok(Self::Delete { app_id, pushkey }) };
        if kind != "http" && kind != "email" {
            return Err(Error::invalid_param(format!(
                "Unknown pusher kind {kind:?}: expected http, email or null"
            )));
        }

        let app_display_name = string("app_display_name", &mut missing)?;
        let device_display_name = string("device_display_name", &mut missing)?;
        let lang = string("lang", &mut missing)?;
        let data = match obj.get("data") {
            Some(Value::Object(d)) => Some(d.clone()),
            None | Some(Value::Null) => {
                missing.push("data".to_owned());
                None
            }
            Some(_) => return Err(Error::bad_json("data must be an object")),
        };
        let (Some(app_display_name), Some(device_display_name), Some(lang), Some(data)) =
            (app_display_name, device_display_name, lang, data)
        else {
            return Err(missing_params(&missing));
        };
        let profile_tag = match obj.get("profile_tag") {
            None | Some(Value::Null) => None,
            Some(Value::String(t)) => Some(t.clone()),
            Some(_) => return Err(Error::bad_json("profile_tag must be a string")),
        };
        let append = match obj.get("append") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(Error::bad_json("append must be a boolean")),
        };
        if kind == "http" {
            check_http_data(&data)?;
        } else if app_id != "m.email" {
            return Err(Error::invalid_param("Email pushers must have the app_id m.email"));
        }
        let pusher = Pusher {
            pushkey,
            kind,
            app_id,
            app_display_name,
            device_display_name,
            profile_tag,
            lang,
            data,
        };
        Ok(Self::Set { pusher, append })
    }
}

/// An HTTP pusher needs the gateway's URL: http(s) with the push gateway API's path. (The
/// spec asks for HTTPS; plain HTTP is accepted for gateways on a private network.)
fn check_http_data(data: &Map<String, Value>) -> Result<()> {
    let url = match data.get("url") {
        Some(Value::String(u)) => u,
        _ => return Err(Error::invalid_param("data.url is required for http pushers")),
    };
    let uri: http::Uri =
        url.parse().map_err(|_| Error::invalid_param("data.url is not a valid URL"))?;
    let scheme_ok = matches!(uri.scheme_str(), Some("https" | "http"));
    let host_ok = uri.host().is_some_and(|h| !h.is_empty());
    if !scheme_ok || !host_ok {
        return Err(Error::invalid_param("data.url must be an https URL"));
    }
    if uri.path() != GATEWAY_PATH {
        return Err(Error::invalid_param(format!("data.url must have the path {GATEWAY_PATH}")));
    }
    match data.get("format") {
        None | Some(Value::String(_)) => Ok(()),
        Some(_) => Err(Error::bad_json("data.format must be a string")),
    }
}

fn missing_params(names: &[String]) -> Error {
    Error::new(
        ErrorKind::BadRequest,
        code::MISSING_PARAM,
        format!("Missing parameters: {}", names.join(", ")),
    )
}

pub struct Pushers {
    db: Db,
    /// Setting a pusher reads other users' pushers with the same key and removes them;
    /// serialised so that two users setting the same key cannot both keep theirs.
    write_lock: tokio::sync::Mutex<()>,
    /// localpart -> the user's pushers (users without any are absent).
    cache: RwLock<HashMap<String, Arc<Vec<PusherRecord>>>>,
}

impl Pushers {
    pub fn new(db: Db) -> Result<Self> {
        let mut cache: HashMap<String, Vec<PusherRecord>> = HashMap::new();
        for row in PUSHERS.scan_prefix(&*db, &(), Direction::Forward)? {
            let ((localpart, _, _), Json(record)) = row?;
            cache.entry(localpart).or_default().push(record);
        }
        let cache = cache.into_iter().map(|(k, v)| (k, Arc::new(v))).collect();
        Ok(Self { db, write_lock: tokio::sync::Mutex::new(()), cache: RwLock::new(cache) })
    }

    /// The user's pushers, from memory.
    pub fn of(&self, localpart: &str) -> Option<Arc<Vec<PusherRecord>>> {
        self.cache.read().unwrap_or_else(|p| p.into_inner()).get(localpart).cloned()
    }

    /// Every pusher of a kind, with its user's localpart.
    pub fn of_kind(&self, kind: &str) -> Vec<(String, PusherRecord)> {
        let cache = self.cache.read().unwrap_or_else(|p| p.into_inner());
        cache
            .iter()
            .flat_map(|(user, records)| records.iter().map(move |r| (user, r)))
            .filter(|(_, r)| r.pusher.kind == kind)
            .map(|(user, r)| (user.clone(), r.clone()))
            .collect()
    }

    /// Whether anyone has a pusher (most events then need no look at their recipients).
    pub fn any(&self) -> bool {
        !self.cache.read().unwrap_or_else(|p| p.into_inner()).is_empty()
    }

    /// Re-reads the users' pushers into memory after a write.
    fn refresh(&self, localparts: &[String]) -> Result<()> {
        for localpart in localparts {
            let records: Vec<PusherRecord> = PUSHERS
                .scan_prefix(&*self.db, localpart, Direction::Forward)?
                .map(|row| row.map(|(_, Json(r))| r).map_err(Into::into))
                .collect::<Result<_>>()?;
            let mut cache = self.cache.write().unwrap_or_else(|p| p.into_inner());
            if records.is_empty() {
                cache.remove(localpart);
            } else {
                cache.insert(localpart.clone(), Arc::new(records));
            }
        }
        Ok(())
    }

    /// Removes one pusher (a key the gateway rejected, an unsubscribed mail address);
    /// false when there was none.
    pub async fn remove(&self, localpart: &str, app_id: &str, pushkey: &str) -> Result<bool> {
        let _guard = self.write_lock.lock().await;
        let key = (localpart.to_owned(), app_id.to_owned(), pushkey.to_owned());
        if !PUSHERS.contains(&*self.db, &key)? {
            return Ok(false);
        }
        let mut batch = Batch::new();
        PUSHERS.delete(&mut batch, &key);
        PUSHER_KEYS.delete(&mut batch, &(key.1, key.2, key.0));
        commit(&self.db, batch).await?;
        self.refresh(&[localpart.to_owned()])?;
        Ok(true)
    }

    /// The user's pushers, by app id and pushkey.
    pub fn list(&self, localpart: &str) -> Result<Vec<Pusher>> {
        PUSHERS
            .scan_prefix(&*self.db, &localpart.to_owned(), Direction::Forward)?
            .map(|row| row.map(|(_, Json(r))| r.pusher).map_err(Into::into))
            .collect()
    }

    /// Applies a `POST /pushers/set` from `device_id` of `localpart`.
    pub async fn apply(
        &self,
        localpart: &str,
        device_id: &str,
        change: PusherChange,
    ) -> Result<()> {
        let _guard = self.write_lock.lock().await;
        let mut batch = Batch::new();
        let mut touched = vec![localpart.to_owned()];
        match change {
            PusherChange::Delete { app_id, pushkey } => {
                // Deleting a pusher that does not exist is not an error: the outcome the
                // client wants holds either way.
                let key = (localpart.to_owned(), app_id.clone(), pushkey.clone());
                if !PUSHERS.contains(&*self.db, &key)? {
                    return Ok(());
                }
                PUSHERS.delete(&mut batch, &key);
                PUSHER_KEYS.delete(&mut batch, &(app_id, pushkey, localpart.to_owned()));
                tracing::info!(user = localpart, "pusher deleted");
            }
            PusherChange::Set { pusher, append } => {
                if pusher.kind == "email" {
                    self.check_own_email(localpart, &pusher.pushkey)?;
                }
                let key = (localpart.to_owned(), pusher.app_id.clone(), pusher.pushkey.clone());
                let existing = PUSHERS.get(&*self.db, &key)?;
                if existing.is_none() && self.list(localpart)?.len() >= MAX_PUSHERS_PER_USER {
                    return Err(Error::invalid_param(format!(
                        "A user may have at most {MAX_PUSHERS_PER_USER} pushers"
                    )));
                }
                if !append {
                    // The pushkey identifies a device's push channel: without `append`, the
                    // newest user registering it takes it over from every other user.
                    let prefix = (pusher.app_id.clone(), pusher.pushkey.clone());
                    for row in PUSHER_KEYS.scan_prefix(&*self.db, &prefix, Direction::Forward)? {
                        let ((app_id, pushkey, owner), ()) = row?;
                        if owner != localpart {
                            touched.push(owner.clone());
                            PUSHERS.delete(
                                &mut batch,
                                &(owner.clone(), app_id.clone(), pushkey.clone()),
                            );
                            PUSHER_KEYS.delete(&mut batch, &(app_id, pushkey, owner.clone()));
                            tracing::info!(user = owner, "pusher taken over by another user");
                        }
                    }
                }
                let created_ms = existing.map(|Json(r)| r.created_ms).unwrap_or_else(now_millis);
                PUSHER_KEYS.put(
                    &mut batch,
                    &(pusher.app_id.clone(), pusher.pushkey.clone(), localpart.to_owned()),
                    &(),
                );
                let record = PusherRecord { pusher, device_id: device_id.to_owned(), created_ms };
                PUSHERS.put(&mut batch, &key, &Json(record));
                tracing::info!(user = localpart, "pusher set");
            }
        }
        commit(&self.db, batch).await?;
        self.refresh(&touched)
    }

    /// Removes the pushers a device set (for when the device is deleted or logs out).
    pub async fn remove_for_device(&self, localpart: &str, device_id: &str) -> Result<()> {
        let _guard = self.write_lock.lock().await;
        let mut batch = Batch::new();
        let mut removed = 0;
        for row in PUSHERS.scan_prefix(&*self.db, &localpart.to_owned(), Direction::Forward)? {
            let ((lp, app_id, pushkey), Json(record)) = row?;
            if record.device_id == device_id {
                PUSHERS.delete(&mut batch, &(lp.clone(), app_id.clone(), pushkey.clone()));
                PUSHER_KEYS.delete(&mut batch, &(app_id, pushkey, lp));
                removed += 1;
            }
        }
        if removed == 0 {
            return Ok(());
        }
        commit(&self.db, batch).await?;
        self.refresh(&[localpart.to_owned()])
    }

    /// Mail goes only to the user's own validated addresses: otherwise any account could
    /// make the server mail whoever it likes.
    fn check_own_email(&self, localpart: &str, address: &str) -> Result<()> {
        let address = threepid::normalize_email(address)?;
        let key = (localpart.to_owned(), threepid::EMAIL.to_owned(), address);
        if USER_THREEPIDS.contains(&*self.db, &key)? {
            Ok(())
        } else {
            Err(Error::invalid_param(
                "The pushkey of an email pusher must be one of your email addresses",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn http_body() -> Value {
        json!({"kind": "http", "app_id": "org.example.app", "pushkey": "abc",
               "app_display_name": "App", "device_display_name": "Phone", "lang": "en",
               "data": {"url": "https://push.example.org/_matrix/push/v1/notify"}})
    }

    #[test]
    fn parses_and_validates() {
        let Ok(PusherChange::Set { pusher, append: false }) = PusherChange::parse(&http_body())
        else {
            panic!("valid body refused");
        };
        assert_eq!(pusher.kind, "http");
        let mut body = http_body();
        body["kind"] = Value::Null;
        assert!(matches!(PusherChange::parse(&body), Ok(PusherChange::Delete { .. })));

        let errcode = |body: Value| PusherChange::parse(&body).err().map(|e| e.errcode);
        let mut body = http_body();
        body["data"] = json!({});
        assert_eq!(errcode(body), Some(code::INVALID_PARAM));
        let mut body = http_body();
        body["data"]["url"] = json!("https://push.example.org/elsewhere");
        assert_eq!(errcode(body), Some(code::INVALID_PARAM));
        let mut body = http_body();
        body.as_object_mut().map(|o| o.remove("lang"));
        assert_eq!(errcode(body), Some(code::MISSING_PARAM));
        let mut body = http_body();
        body["kind"] = json!("carrier-pigeon");
        assert_eq!(errcode(body), Some(code::INVALID_PARAM));
        let mut body = http_body();
        body["app_id"] = json!("x".repeat(65));
        assert_eq!(errcode(body), Some(code::INVALID_PARAM));
        let mut body = http_body();
        body["kind"] = json!("email");
        assert_eq!(errcode(body), Some(code::INVALID_PARAM));
    }
}
