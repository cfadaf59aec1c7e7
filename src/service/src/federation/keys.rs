//! Other servers' signing keys: fetched from their key server, checked against their own
//! signatures, cached with their validity in the database and in memory, and served
//! again to third servers as a notary.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Mutex,
};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use trellis_core::{Result, now_millis};
use trellis_store::{Batch, Json, Table, catalog};

use super::Federation;
use crate::e2ee::signing;

/// One verify key of a remote server.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RemoteKey {
    pub key: String,
    /// Until when the key may be used for new signatures (ms).
    pub valid_until_ts: u64,
    /// Set for old verify keys: when they stopped being used.
    pub expired_ts: Option<u64>,
}

/// (server name, key id) -> key
const REMOTE_KEYS: Table<(String, String), Json<RemoteKey>> = Table::new(&catalog::REMOTE_KEYS);
/// server name -> the last key server response as received (for notary answers)
const KEY_RESPONSES: Table<String, Json<Value>> = Table::new(&catalog::REMOTE_KEY_RESPONSES);

/// A server's key server response must not be trusted beyond a week from now, whatever
/// it claims (the spec caps `valid_until_ts` use at 7 days).
const MAX_VALIDITY_MS: u64 = 7 * 24 * 3600 * 1000;

#[derive(Default)]
pub struct KeyCache {
    memory: Mutex<HashMap<(String, String), RemoteKey>>,
}

/// Checks a key server response for `server`: it names the server and carries a valid
/// self-signature by each of its current verify keys. Returns its keys.
pub fn check_key_response(server: &str, response: &Value) -> Option<BTreeMap<String, RemoteKey>> {
    if response.get("server_name")?.as_str()? != server {
        return None;
    }
    let valid_until = response.get("valid_until_ts")?.as_u64()?;
    let valid_until = valid_until.min(now_millis().saturating_add(MAX_VALIDITY_MS));
    let mut keys = BTreeMap::new();
    for (id, key) in response.get("verify_keys")?.as_object()? {
        let public = key.get("key")?.as_str()?;
        if !id.starts_with("ed25519:") || !signing::verify(response, server, id, public) {
            return None;
        }
        keys.insert(
            id.clone(),
            RemoteKey { key: public.to_owned(), valid_until_ts: valid_until, expired_ts: None },
        );
    }
    if keys.is_empty() {
        return None;
    }
    if let Some(old) = response.get("old_verify_keys").and_then(Value::as_object) {
        for (id, key) in old {
            let (Some(public), Some(expired)) = (
                key.get("key").and_then(Value::as_str),
                key.get("expired_ts").and_then(Value::as_u64),
            ) else {
                continue;
            };
            keys.entry(id.clone()).or_insert(RemoteKey {
                key: public.to_owned(),
                valid_until_ts: expired,
                expired_ts: Some(expired),
            });
        }
    }
    Some(keys)
}

impl Federation {
    fn cached_key(&self, server: &str, key_id: &str) -> Result<Option<RemoteKey>> {
        let id = (server.to_owned(), key_id.to_owned());
        {
            let memory = self.key_cache.memory.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(k) = memory.get(&id) {
                return Ok(Some(k.clone()));
            }
        }
        let stored = REMOTE_KEYS.get(&*self.db, &id)?.map(|j| j.0);
        if let Some(k) = &stored {
            let mut memory = self.key_cache.memory.lock().unwrap_or_else(|p| p.into_inner());
            memory.insert(id, k.clone());
        }
        Ok(stored)
    }

    /// The public key `key_id` of `server` valid at `at_ms`, fetching the server's keys
    /// when the cache has none that is.
    pub async fn verify_key(
        &self,
        server: &str,
        key_id: &str,
        at_ms: u64,
    ) -> Result<Option<String>> {
        if server == self.server_name {
            return Ok(self.keys.public_key_at(key_id, at_ms));
        }
        if let Some(k) = self.cached_key(server, key_id)?
            && k.valid_until_ts >= at_ms
        {
            return Ok(Some(k.key));
        }
        self.fetch_keys(server).await?;
        Ok(self.cached_key(server, key_id)?.filter(|k| k.valid_until_ts >= at_ms).map(|k| k.key))
    }

    /// Fetches `server`'s keys from its own key server and stores them.
    async fn fetch_keys(&self, server: &str) -> Result<()> {
        let response = match self.get_unsigned(server, "/_matrix/key/v2/server").await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(server, error = %e, "fetching server keys failed");
                return Ok(());
            }
        };
        self.store_key_response(server, &response).await
    }

    /// Stores a checked key response (ignored when it does not check out).
    pub async fn store_key_response(&self, server: &str, response: &Value) -> Result<()> {
        let Some(keys) = check_key_response(server, response) else {
            tracing::warn!(server, "a key server response failed its checks");
            return Ok(());
        };
        let mut batch = Batch::new();
        let mut memory_updates = Vec::new();
        for (id, key) in keys {
            let row = (server.to_owned(), id);
            REMOTE_KEYS.put(&mut batch, &row, &Json(key.clone()));
            memory_updates.push((row, key));
        }
        KEY_RESPONSES.put(&mut batch, &server.to_owned(), &Json(response.clone()));
        crate::commit(&self.db, batch).await?;
        let mut memory = self.key_cache.memory.lock().unwrap_or_else(|p| p.into_inner());
        memory.extend(memory_updates);
        Ok(())
    }

    /// Notary: the key responses of `servers` (fetched if not known or expiring before
    /// `minimum_valid_until`), each with this server's signature added.
    pub async fn notary(&self, servers: &BTreeMap<String, u64>) -> Result<Vec<Value>> {
        let mut out = Vec::new();
        for (server, minimum_valid_until) in servers {
            if *server == self.server_name {
                let doc = self.keys.server_keys_document()?;
                out.push(serde_json::to_value(doc).unwrap_or(Value::Null));
                continue;
            }
            let mut stored = KEY_RESPONSES.get(&*self.db, server)?.map(|j| j.0);
            let fresh_enough = stored.as_ref().is_some_and(|r| {
                r.get("valid_until_ts").and_then(Value::as_u64).unwrap_or(0) >= *minimum_valid_until
            });
            if !fresh_enough && self.config.enabled {
                self.fetch_keys(server).await?;
                stored = KEY_RESPONSES.get(&*self.db, server)?.map(|j| j.0);
            }
            let Some(response) = stored else { continue };
            out.push(self.countersign(response)?);
        }
        Ok(out)
    }

    fn countersign(&self, response: Value) -> Result<Value> {
        let Ok(ruma::CanonicalJsonValue::Object(mut object)) =
            ruma::CanonicalJsonValue::try_from(response)
        else {
            return Ok(Value::Null);
        };
        self.keys.sign_json(&mut object)?;
        Ok(serde_json::to_value(object).unwrap_or(Value::Null))
    }
}
