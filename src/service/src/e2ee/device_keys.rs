//! Device identity keys, one-time keys and fallback keys: `keys/upload`, `keys/query`,
//! `keys/claim`.

use std::{
    collections::{BTreeMap, HashSet, btree_map::Entry},
    sync::Arc,
};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use trellis_core::{Error, ErrorKind, Result, error::code};
use trellis_store::{Batch, Direction, Json};

use super::{
    DEVICE_KEYS, E2ee, FALLBACK_KEYS, ONE_TIME_KEY_COUNTS, ONE_TIME_KEY_ORDER, ONE_TIME_KEYS,
    object, signing,
};
use crate::{Services, federation::edus, tables::DEVICES};

/// A device's fallback key for one algorithm.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FallbackKey {
    pub key_id: String,
    pub key: Value,
    /// Handed out by a claim since it was uploaded.
    pub used: bool,
}

/// One-time keys a device may hold on the server; more is a client bug or abuse.
const MAX_ONE_TIME_KEYS: u64 = 10_000;

/// What `keys/upload` brings.
#[derive(Debug, Default)]
pub struct Upload {
    pub device_keys: Option<Value>,
    /// `algorithm:key_id` -> key
    pub one_time_keys: BTreeMap<String, Value>,
    pub fallback_keys: BTreeMap<String, Value>,
}

/// `algorithm:key_id`, both parts non-empty.
fn split_key_id(id: &str) -> Result<(&str, &str)> {
    match id.split_once(':') {
        Some((alg, key)) if !alg.is_empty() && !key.is_empty() => Ok((alg, key)),
        _ => Err(Error::invalid_param(format!("Invalid key id {id:?}: expected algorithm:id"))),
    }
}

impl E2ee {
    /// Stores what a device publishes and returns its unclaimed one-time key counts.
    pub async fn upload(
        &self,
        localpart: &str,
        device_id: &str,
        upload: Upload,
    ) -> Result<BTreeMap<String, u64>> {
        let user_id = self.user_id(localpart);
        let device = (localpart.to_owned(), device_id.to_owned());
        let _guard = self.lock_user(localpart).await;
        if !DEVICES.contains(&*self.db, &device)? {
            return Err(Error::not_found("Unknown device"));
        }
        let mut batch = Batch::new();
        let mut changed = Vec::new();
        let stored = DEVICE_KEYS.get(&*self.db, &device)?.map(|j| j.0);
        let mut signing_key = stored.as_ref().and_then(|k| device_ed25519(k, device_id));

        if let Some(keys) = upload.device_keys {
            let keys = check_device_keys(keys, &user_id, device_id)?;
            signing_key = device_ed25519(&keys, device_id);
            if stored.as_ref() != Some(&keys) {
                DEVICE_KEYS.put(&mut batch, &device, &Json(keys));
                changed.push(user_id.clone());
            }
        }

        let mut counts = self.stored_key_counts(localpart, device_id)?;
        let mut touched = HashSet::new();
        // Where each algorithm's keys of this upload go in the claim order (keys of one
        // upload, a JSON object, have no order of their own: they take their ids').
        let mut next_seq: BTreeMap<String, u64> = BTreeMap::new();
        for (id, key) in &upload.one_time_keys {
            let (alg, key_id) = split_key_id(id)?;
            check_signed_key(key, id, &user_id, device_id, signing_key.as_deref())?;
            let row =
                (localpart.to_owned(), device_id.to_owned(), alg.to_owned(), key_id.to_owned());
            match ONE_TIME_KEYS.get(&*self.db, &row)? {
                Some(Json(existing)) if existing == *key => continue,
                Some(_) => {
                    return Err(Error::invalid_param(format!(
                        "One-time key {id} already exists with different content"
                    )));
                }
                None => {}
            }
            let count = counts.entry(alg.to_owned()).or_insert(0);
            if *count >= MAX_ONE_TIME_KEYS {
                return Err(Error::new(
                    ErrorKind::BadRequest,
                    code::LIMIT_EXCEEDED,
                    "Too many unclaimed one-time keys for this device",
                ));
            }
            *count += 1;
            let seq = match next_seq.entry(alg.to_owned()) {
                Entry::Occupied(seq) => seq.into_mut(),
                Entry::Vacant(seq) => seq.insert(self.next_key_seq(&row)?),
            };
            let order = (row.0.clone(), row.1.clone(), row.2.clone(), *seq);
            *seq += 1;
            ONE_TIME_KEY_ORDER.put(&mut batch, &order, &row.3);
            ONE_TIME_KEYS.put(&mut batch, &row, &Json(key.clone()));
            touched.insert(alg.to_owned());
        }
        for alg in touched {
            let count = counts.get(&alg).copied().unwrap_or(0);
            ONE_TIME_KEY_COUNTS.put(
                &mut batch,
                &(localpart.to_owned(), device_id.to_owned(), alg),
                &count,
            );
        }

        let mut fallback_algs = HashSet::new();
        for (id, key) in &upload.fallback_keys {
            let (alg, key_id) = split_key_id(id)?;
            if !fallback_algs.insert(alg.to_owned()) {
                return Err(Error::invalid_param(format!("More than one fallback key for {alg}")));
            }
            check_signed_key(key, id, &user_id, device_id, signing_key.as_deref())?;
            let row = (localpart.to_owned(), device_id.to_owned(), alg.to_owned());
            let existing = FALLBACK_KEYS.get(&*self.db, &row)?.map(|j| j.0);
            // Re-uploading the same key keeps its used flag; a new key replaces it.
            if existing.as_ref().is_some_and(|e| e.key_id == key_id && e.key == *key) {
                continue;
            }
            let record = FallbackKey { key_id: key_id.to_owned(), key: key.clone(), used: false };
            FALLBACK_KEYS.put(&mut batch, &row, &Json(record));
        }

        if !batch.is_empty() {
            self.commit_with_changes(batch, &changed).await?;
        }
        counts.retain(|_, n| *n > 0);
        Ok(with_signed_curve25519(counts))
    }

    /// Unclaimed one-time keys of a device by algorithm, as clients are told them.
    pub fn one_time_key_counts(
        &self,
        localpart: &str,
        device_id: &str,
    ) -> Result<BTreeMap<String, u64>> {
        Ok(with_signed_curve25519(self.stored_key_counts(localpart, device_id)?))
    }

    /// Unclaimed one-time keys of a device, by algorithm (only those with some).
    fn stored_key_counts(&self, localpart: &str, device_id: &str) -> Result<BTreeMap<String, u64>> {
        let device = (localpart.to_owned(), device_id.to_owned());
        let mut counts = BTreeMap::new();
        for row in ONE_TIME_KEY_COUNTS.scan_prefix(&*self.db, &device, Direction::Forward)? {
            let ((_, _, alg), count) = row?;
            if count > 0 {
                counts.insert(alg, count);
            }
        }
        Ok(counts)
    }

    /// Algorithms for which the device has a fallback key that no claim has used yet.
    pub fn unused_fallback_key_types(
        &self,
        localpart: &str,
        device_id: &str,
    ) -> Result<Vec<String>> {
        let device = (localpart.to_owned(), device_id.to_owned());
        let mut out = Vec::new();
        for row in FALLBACK_KEYS.scan_prefix(&*self.db, &device, Direction::Forward)? {
            let ((_, _, alg), Json(key)) = row?;
            if !key.used {
                out.push(alg);
            }
        }
        Ok(out)
    }

    /// The keys of one device as others see them: with the signatures others added and
    /// the device's display name.
    fn published_device_keys(&self, localpart: &str, device_id: &str) -> Result<Option<Value>> {
        let device = (localpart.to_owned(), device_id.to_owned());
        let Some(Json(mut keys)) = DEVICE_KEYS.get(&*self.db, &device)? else { return Ok(None) };
        let Some(Json(record)) = DEVICES.get(&*self.db, &device)? else { return Ok(None) };
        self.merge_signatures(&mut keys, &self.user_id(localpart), device_id)?;
        let mut unsigned = Map::new();
        if let Some(name) = record.display_name {
            unsigned.insert("device_display_name".into(), json!(name));
        }
        if let Some(obj) = keys.as_object_mut() {
            obj.insert("unsigned".into(), Value::Object(unsigned));
        }
        Ok(Some(keys))
    }

    /// `keys/query`: `requested` maps user ids to device ids (empty for all devices).
    /// `requester` is the local user asking (who alone sees their user-signing key);
    /// `None` for another server.
    pub fn query(
        &self,
        requester: Option<&str>,
        requested: &BTreeMap<String, Vec<String>>,
    ) -> Result<Value> {
        let mut device_keys = Map::new();
        let mut master_keys = Map::new();
        let mut self_signing_keys = Map::new();
        let mut user_signing_keys = Map::new();
        for (user_id, devices) in requested {
            // Other servers' users are asked over federation by the caller.
            let Some(localpart) = self.local_part(user_id) else { continue };
            let mut found = Map::new();
            let wanted: Vec<String> = if devices.is_empty() {
                DEVICE_KEYS
                    .scan_prefix(&*self.db, &localpart.to_owned(), Direction::Forward)?
                    .map(|row| row.map(|((_, d), _)| d))
                    .collect::<Result<_, _>>()?
            } else {
                devices.clone()
            };
            for device_id in wanted {
                if let Some(keys) = self.published_device_keys(localpart, &device_id)? {
                    found.insert(device_id, keys);
                }
            }
            device_keys.insert(user_id.clone(), Value::Object(found));
            let cross = self.published_cross_signing(localpart)?;
            if let Some(k) = cross.master {
                master_keys.insert(user_id.clone(), k);
            }
            if let Some(k) = cross.self_signing {
                self_signing_keys.insert(user_id.clone(), k);
            }
            if requester == Some(user_id.as_str())
                && let Some(k) = cross.user_signing
            {
                user_signing_keys.insert(user_id.clone(), k);
            }
        }
        Ok(json!({
            "device_keys": device_keys,
            "master_keys": master_keys,
            "self_signing_keys": self_signing_keys,
            "user_signing_keys": user_signing_keys,
            "failures": {},
        }))
    }

    /// `keys/claim`: one key per (user, device, algorithm): an unclaimed one-time key
    /// if any is left, else the fallback key.
    pub async fn claim(
        &self,
        requested: &BTreeMap<String, BTreeMap<String, String>>,
    ) -> Result<Value> {
        let mut claimed = Map::new();
        for (user_id, devices) in requested {
            // Other servers' users are asked over federation by the caller.
            let Some(localpart) = self.local_part(user_id) else { continue };
            let mut per_device = Map::new();
            let _guard = self.lock_user(localpart).await;
            let mut batch = Batch::new();
            for (device_id, alg) in devices {
                if let Some((id, key)) = self.take_key(&mut batch, localpart, device_id, alg)? {
                    per_device.insert(device_id.clone(), json!({ id: key }));
                }
            }
            if !batch.is_empty() {
                crate::commit(&self.db, batch).await?;
            }
            if !per_device.is_empty() {
                claimed.insert(user_id.clone(), Value::Object(per_device));
            }
        }
        Ok(Value::Object(claimed))
    }

    /// The claim-order place after the device's newest unclaimed key of the algorithm
    /// of `row` (with the user's lock held).
    fn next_key_seq(&self, row: &(String, String, String, String)) -> Result<u64> {
        let prefix = (row.0.clone(), row.1.clone(), row.2.clone());
        let newest =
            ONE_TIME_KEY_ORDER.scan_prefix(&*self.db, &prefix, Direction::Backward)?.next();
        Ok(match newest {
            Some(entry) => entry?.0.3 + 1,
            None => 0,
        })
    }

    /// Takes one key of `alg` from the device (with the user's lock held).
    fn take_key(
        &self,
        batch: &mut Batch,
        localpart: &str,
        device_id: &str,
        alg: &str,
    ) -> Result<Option<(String, Value)>> {
        let prefix = (localpart.to_owned(), device_id.to_owned(), alg.to_owned());
        // The oldest upload first (spec v1.13): a client forgets its oldest unpublished
        // keys first, so handing out a newer one would strand the older ones.
        for row in ONE_TIME_KEY_ORDER.scan_prefix(&*self.db, &prefix, Direction::Forward)? {
            let (order, key_id) = row?;
            ONE_TIME_KEY_ORDER.delete(batch, &order);
            let key = (prefix.0.clone(), prefix.1.clone(), prefix.2.clone(), key_id);
            let Some(Json(value)) = ONE_TIME_KEYS.get(&*self.db, &key)? else { continue };
            ONE_TIME_KEYS.delete(batch, &key);
            let count = ONE_TIME_KEY_COUNTS.get(&*self.db, &prefix)?.unwrap_or(1);
            ONE_TIME_KEY_COUNTS.put(batch, &prefix, &count.saturating_sub(1));
            return Ok(Some((format!("{alg}:{}", key.3), value)));
        }
        if let Some(Json(mut fallback)) = FALLBACK_KEYS.get(&*self.db, &prefix)? {
            let out = (format!("{alg}:{}", fallback.key_id), fallback.key.clone());
            if !fallback.used {
                fallback.used = true;
                FALLBACK_KEYS.put(batch, &prefix, &Json(fallback));
            }
            return Ok(Some(out));
        }
        Ok(None)
    }

    /// A user's devices as another server asks for them (`/user/devices`): every device,
    /// with its keys when it published some, and the cross-signing keys.
    pub fn user_devices(&self, localpart: &str) -> Result<Value> {
        let mut devices = Vec::new();
        for row in DEVICES.scan_prefix(&*self.db, &localpart.to_owned(), Direction::Forward)? {
            let ((_, device_id), Json(record)) = row?;
            let Some(keys) = self.published_device_keys(localpart, &device_id)? else { continue };
            let mut device = json!({"device_id": device_id, "keys": keys});
            if let Some(name) = record.display_name {
                device["device_display_name"] = json!(name);
            }
            devices.push(device);
        }
        let cross = self.published_cross_signing(localpart)?;
        let mut out = json!({"devices": devices, "stream_id": self.rooms.stream.visible()});
        if let Some(k) = cross.master {
            out["master_key"] = k;
        }
        if let Some(k) = cross.self_signing {
            out["self_signing_key"] = k;
        }
        Ok(out)
    }

    /// The user's device ids that have published keys.
    pub(super) fn devices_with_keys(&self, localpart: &str) -> Result<Vec<String>> {
        Ok(DEVICE_KEYS
            .scan_prefix(&*self.db, &localpart.to_owned(), Direction::Forward)?
            .map(|row| row.map(|((_, d), _)| d))
            .collect::<Result<_, _>>()?)
    }

    pub(super) fn stored_device_keys(
        &self,
        localpart: &str,
        device_id: &str,
    ) -> Result<Option<Value>> {
        Ok(DEVICE_KEYS.get(&*self.db, &(localpart.to_owned(), device_id.to_owned()))?.map(|j| j.0))
    }
}

/// Clients top up one-time keys on seeing the count, and some read an absent count as
/// "unknown": the usual algorithm is always listed.
fn with_signed_curve25519(mut counts: BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    counts.entry("signed_curve25519".into()).or_insert(0);
    counts
}

/// The device's own ed25519 key from its keys object.
pub(super) fn device_ed25519(keys: &Value, device_id: &str) -> Option<String> {
    keys.get("keys")?.get(format!("ed25519:{device_id}"))?.as_str().map(str::to_owned)
}

/// Checks an uploaded device keys object: it belongs to this user and device, names its
/// algorithms and keys, and is signed by its own ed25519 key. Returns it without
/// `unsigned` (the server adds its own there).
fn check_device_keys(mut keys: Value, user_id: &str, device_id: &str) -> Result<Value> {
    let obj = object(&keys, "device_keys")?;
    if obj.get("user_id").and_then(Value::as_str) != Some(user_id) {
        return Err(Error::invalid_param("device_keys.user_id must be your user id"));
    }
    if obj.get("device_id").and_then(Value::as_str) != Some(device_id) {
        return Err(Error::invalid_param("device_keys.device_id must be this device's id"));
    }
    let algorithms = obj.get("algorithms").and_then(Value::as_array);
    if !algorithms.is_some_and(|a| !a.is_empty() && a.iter().all(Value::is_string)) {
        return Err(Error::bad_json("device_keys.algorithms must be a list of algorithm names"));
    }
    let key_map = obj.get("keys").and_then(Value::as_object);
    let Some(key_map) = key_map else {
        return Err(Error::bad_json("device_keys.keys must be an object"));
    };
    if !key_map.values().all(Value::is_string) {
        return Err(Error::bad_json("device_keys.keys values must be strings"));
    }
    let Some(ed25519) = device_ed25519(&keys, device_id) else {
        return Err(Error::invalid_param(format!(
            "device_keys.keys must contain ed25519:{device_id}"
        )));
    };
    if !signing::verify(&keys, user_id, &format!("ed25519:{device_id}"), &ed25519) {
        return Err(Error::new(
            ErrorKind::BadRequest,
            code::INVALID_SIGNATURE,
            "device_keys must be signed by the device's ed25519 key",
        ));
    }
    if let Some(obj) = keys.as_object_mut() {
        obj.remove("unsigned");
    }
    Ok(keys)
}

/// A one-time or fallback key: plain (a string) for the old `curve25519` algorithm,
/// else an object with `key`, which for `signed_*` algorithms must carry the device's
/// signature.
fn check_signed_key(
    key: &Value,
    id: &str,
    user_id: &str,
    device_id: &str,
    device_key: Option<&str>,
) -> Result<()> {
    if key.is_string() {
        return Ok(());
    }
    let obj = object(key, id)?;
    if !obj.get("key").is_some_and(Value::is_string) {
        return Err(Error::bad_json(format!("Key {id} has no key")));
    }
    if id.starts_with("signed_") {
        let Some(device_key) = device_key else {
            // Nothing to check against until the device publishes its identity keys.
            return Ok(());
        };
        if !signing::verify(key, user_id, &format!("ed25519:{device_id}"), device_key) {
            return Err(Error::new(
                ErrorKind::BadRequest,
                code::INVALID_SIGNATURE,
                format!("Key {id} is not signed by the device"),
            ));
        }
    }
    Ok(())
}

/// `keys/upload` for `localpart`'s device: stores the keys and, when the device's
/// identity keys changed, tells the other servers sharing a room with the user.
pub async fn upload_keys(
    services: &Arc<Services>,
    localpart: &str,
    device_id: &str,
    upload: Upload,
) -> Result<BTreeMap<String, u64>> {
    let announce = upload.device_keys.is_some();
    let counts = services.e2ee.upload(localpart, device_id, upload).await?;
    if announce {
        let user_id = services.accounts.user_id(localpart);
        edus::device_changed(services, &user_id, device_id, false).await;
    }
    Ok(counts)
}
