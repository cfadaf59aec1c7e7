//! Cross-signing: a user's master, self-signing and user-signing keys
//! (`keys/device_signing/upload`), and the signatures users add to devices and to each
//! other's master keys (`keys/signatures/upload`).

use std::{collections::BTreeMap, sync::Arc};

use serde_json::{Map, Value, json};
use trellis_core::{Error, ErrorKind, Result, error::code};
use trellis_store::{Batch, Direction, Json, Table, catalog};

use super::{E2ee, device_keys::device_ed25519, object, signing};
use crate::{Services, federation::edus};

/// (localpart, usage) -> key object
const CROSS_SIGNING_KEYS: Table<(String, String), Json<Value>> =
    Table::new(&catalog::CROSS_SIGNING_KEYS);
/// (target user id, target key id, signer user id, signer key id) -> signature. The target
/// key id is a device id or a master key's public key.
const KEY_SIGNATURES: Table<(String, String, String, String), String> =
    Table::new(&catalog::KEY_SIGNATURES);

const MASTER: &str = "master";
const SELF_SIGNING: &str = "self_signing";
const USER_SIGNING: &str = "user_signing";

/// A user's cross-signing keys as others see them.
#[derive(Debug, Default)]
pub struct Published {
    pub master: Option<Value>,
    pub self_signing: Option<Value>,
    pub user_signing: Option<Value>,
}

/// What `keys/device_signing/upload` brings.
#[derive(Debug, Default)]
pub struct SigningUpload {
    pub master: Option<Value>,
    pub self_signing: Option<Value>,
    pub user_signing: Option<Value>,
}

impl SigningUpload {
    fn keys(&self) -> [(&'static str, Option<&Value>); 3] {
        [
            (MASTER, self.master.as_ref()),
            (SELF_SIGNING, self.self_signing.as_ref()),
            (USER_SIGNING, self.user_signing.as_ref()),
        ]
    }
}

fn invalid_signature(message: impl Into<std::borrow::Cow<'static, str>>) -> Error {
    Error::new(ErrorKind::BadRequest, code::INVALID_SIGNATURE, message)
}

impl E2ee {
    fn stored_cross_signing(&self, localpart: &str, usage: &str) -> Result<Option<Value>> {
        Ok(CROSS_SIGNING_KEYS
            .get(&*self.db, &(localpart.to_owned(), usage.to_owned()))?
            .map(|j| j.0))
    }

    /// Adds the signatures others uploaded for `(target user, target key id)` to `object`.
    pub(super) fn merge_signatures(
        &self,
        object: &mut Value,
        target_user: &str,
        target_key: &str,
    ) -> Result<()> {
        let prefix = (target_user.to_owned(), target_key.to_owned());
        for row in KEY_SIGNATURES.scan_prefix(&*self.db, &prefix, Direction::Forward)? {
            let ((_, _, signer, key_id), sig) = row?;
            let Some(obj) = object.as_object_mut() else { break };
            let signatures = obj.entry("signatures").or_insert_with(|| json!({}));
            if !signatures.is_object() {
                *signatures = json!({});
            }
            let per_signer = &mut signatures[signer.as_str()];
            if !per_signer.is_object() {
                *per_signer = json!({});
            }
            per_signer[key_id.as_str()] = json!(sig);
        }
        Ok(())
    }

    pub(super) fn published_cross_signing(&self, localpart: &str) -> Result<Published> {
        let user_id = self.user_id(localpart);
        let mut out = Published {
            master: self.stored_cross_signing(localpart, MASTER)?,
            self_signing: self.stored_cross_signing(localpart, SELF_SIGNING)?,
            user_signing: self.stored_cross_signing(localpart, USER_SIGNING)?,
        };
        if let Some(master) = &mut out.master
            && let Some((_, public)) = signing::cross_signing_key(master)
        {
            self.merge_signatures(master, &user_id, &public)?;
        }
        Ok(out)
    }

    /// Whether uploading these keys needs the user to re-authenticate: only when it
    /// would replace a master key already there (re-sending the same keys is free).
    pub fn signing_upload_needs_auth(
        &self,
        localpart: &str,
        upload: &SigningUpload,
    ) -> Result<bool> {
        if self.stored_cross_signing(localpart, MASTER)?.is_none() {
            return Ok(false);
        }
        for (usage, key) in upload.keys() {
            if let Some(key) = key
                && self.stored_cross_signing(localpart, usage)?.as_ref() != Some(key)
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Stores the user's cross-signing keys after checking each one.
    pub async fn upload_signing_keys(&self, localpart: &str, upload: SigningUpload) -> Result<()> {
        let user_id = self.user_id(localpart);
        let _guard = self.lock_user(localpart).await;
        let devices = self.devices_with_keys(localpart)?;
        for (usage, key) in upload.keys() {
            let Some(key) = key else { continue };
            check_cross_signing_key(key, &user_id, usage)?;
            if let Some((_, public)) = signing::cross_signing_key(key)
                && devices.contains(&public)
            {
                return Err(Error::forbidden("A key's public key is one of your device ids"));
            }
        }
        let master = match &upload.master {
            Some(m) => Some(m.clone()),
            None => self.stored_cross_signing(localpart, MASTER)?,
        };
        let needs_master = upload.self_signing.is_some() || upload.user_signing.is_some();
        if needs_master {
            let Some(master) = master else {
                return Err(Error::new(
                    ErrorKind::BadRequest,
                    code::MISSING_PARAM,
                    "No master signing key is available",
                ));
            };
            let Some((master_id, master_public)) = signing::cross_signing_key(&master) else {
                return Err(Error::bad_json("The master key is malformed"));
            };
            for (usage, key) in
                [(SELF_SIGNING, &upload.self_signing), (USER_SIGNING, &upload.user_signing)]
            {
                if let Some(key) = key
                    && !signing::verify(key, &user_id, &master_id, &master_public)
                {
                    return Err(invalid_signature(format!(
                        "The {usage} key is not signed by the master key"
                    )));
                }
            }
        }
        let mut batch = Batch::new();
        let mut changed = false;
        for (usage, key) in upload.keys() {
            let Some(key) = key else { continue };
            let mut key = key.clone();
            if let Some(obj) = key.as_object_mut() {
                obj.remove("unsigned");
            }
            if self.stored_cross_signing(localpart, usage)?.as_ref() != Some(&key) {
                CROSS_SIGNING_KEYS.put(
                    &mut batch,
                    &(localpart.to_owned(), usage.to_owned()),
                    &Json(key),
                );
                changed = true;
            }
        }
        if changed {
            self.commit_with_changes(batch, &[user_id]).await?;
        }
        Ok(())
    }

    /// `keys/signatures/upload`: for each `(user, key id, signed object)` keeps the
    /// requester's valid signatures and reports the rest in `failures`.
    pub async fn upload_signatures(
        &self,
        localpart: &str,
        signed: BTreeMap<String, BTreeMap<String, Value>>,
    ) -> Result<Value> {
        let me = self.user_id(localpart);
        let _guard = self.lock_user(localpart).await;
        let own = self.published_cross_signing(localpart)?;
        let mut failures = Map::new();
        let mut batch = Batch::new();
        let mut changed = Vec::new();
        for (user_id, keys) in signed {
            for (key_id, object) in keys {
                match self.check_signature_upload(&me, localpart, &own, &user_id, &key_id, &object)
                {
                    Ok(accepted) => {
                        for (signer_key, sig) in accepted {
                            let row = (user_id.clone(), key_id.clone(), me.clone(), signer_key);
                            KEY_SIGNATURES.put(&mut batch, &row, &sig);
                        }
                        if !changed.contains(&user_id) {
                            changed.push(user_id.clone());
                        }
                    }
                    Err(e) => {
                        let entry = failures.entry(user_id.clone()).or_insert_with(|| json!({}));
                        entry[key_id.as_str()] = json!({"errcode": e.errcode, "error": e.message});
                    }
                }
            }
        }
        if !batch.is_empty() {
            self.commit_with_changes(batch, &changed).await?;
        }
        Ok(Value::Object(failures))
    }

    /// Checks one signed object; returns the signatures to store as (signer key id, sig).
    fn check_signature_upload(
        &self,
        me: &str,
        localpart: &str,
        own: &Published,
        user_id: &str,
        key_id: &str,
        object: &Value,
    ) -> Result<Vec<(String, String)>> {
        let unknown = || Error::not_found(format!("Unknown key {key_id} of {user_id}"));
        if self::object(object, key_id).is_err() {
            return Err(Error::bad_json("A signed key must be a JSON object"));
        }
        let Some(target_local) = self.local_part(user_id) else {
            return Err(Error::new(
                ErrorKind::BadRequest,
                "M_UNAVAILABLE",
                "Keys of other servers cannot be signed yet",
            ));
        };
        // What the signature must cover is what we store, not what the client sent.
        let (stored, signer): (Value, Vec<(String, String)>) = if user_id == me {
            if let Some(device) = self.stored_device_keys(target_local, key_id)? {
                // One of my devices, signed by my self-signing key.
                let ssk = own.self_signing.as_ref().and_then(signing::cross_signing_key);
                let Some(ssk) = ssk else {
                    return Err(invalid_signature("You have no self-signing key"));
                };
                (device, vec![ssk])
            } else if own
                .master
                .as_ref()
                .and_then(signing::cross_signing_key)
                .is_some_and(|(_, public)| public == key_id)
            {
                // My master key, signed by one of my devices.
                let master = self.stored_cross_signing(localpart, MASTER)?.ok_or_else(unknown)?;
                let mut signers = Vec::new();
                for device in self.devices_with_keys(localpart)? {
                    if let Some(keys) = self.stored_device_keys(localpart, &device)?
                        && let Some(public) = device_ed25519(&keys, &device)
                    {
                        signers.push((format!("ed25519:{device}"), public));
                    }
                }
                (master, signers)
            } else {
                return Err(unknown());
            }
        } else {
            // Someone else's master key, signed by my user-signing key.
            let master = self.stored_cross_signing(target_local, MASTER)?.ok_or_else(unknown)?;
            if signing::cross_signing_key(&master).is_none_or(|(_, public)| public != key_id) {
                return Err(unknown());
            }
            let usk = own.user_signing.as_ref().and_then(signing::cross_signing_key);
            let Some(usk) = usk else {
                return Err(invalid_signature("You have no user-signing key"));
            };
            (master, vec![usk])
        };
        let mut accepted = Vec::new();
        for (signer_key, public) in signer {
            if let Some(sig) = signing::signature(object, me, &signer_key) {
                if !signing::verify_signature(&stored, sig, &public) {
                    return Err(invalid_signature("Invalid signature"));
                }
                accepted.push((signer_key, sig.to_owned()));
            }
        }
        if accepted.is_empty() {
            return Err(invalid_signature("No signature by a key that may sign this"));
        }
        Ok(accepted)
    }
}

/// A cross-signing key of `usage` for `user_id`, with exactly one ed25519 key.
fn check_cross_signing_key(key: &Value, user_id: &str, usage: &str) -> Result<()> {
    let obj = object(key, usage)?;
    if obj.get("user_id").and_then(Value::as_str) != Some(user_id) {
        return Err(Error::invalid_param(format!("The {usage} key's user_id must be yours")));
    }
    let usages = obj.get("usage").and_then(Value::as_array);
    if !usages.is_some_and(|u| u.iter().any(|x| x.as_str() == Some(usage))) {
        return Err(Error::invalid_param(format!("The {usage} key must have usage {usage}")));
    }
    if signing::cross_signing_key(key).is_none() {
        return Err(Error::invalid_param(format!(
            "The {usage} key must hold exactly one ed25519 key named after itself"
        )));
    }
    Ok(())
}

/// `keys/device_signing/upload`: stores the user's cross-signing keys and tells the
/// other servers sharing a room with them.
pub async fn upload_signing_keys(
    services: &Arc<Services>,
    localpart: &str,
    upload: SigningUpload,
) -> Result<()> {
    services.e2ee.upload_signing_keys(localpart, upload).await?;
    let user_id = services.accounts.user_id(localpart);
    edus::device_changed(services, &user_id, "", false).await;
    Ok(())
}

/// `keys/signatures/upload`: stores the signatures that check out and tells the other
/// servers sharing a room with the user; answers the failures.
pub async fn upload_signatures(
    services: &Arc<Services>,
    localpart: &str,
    signed: BTreeMap<String, BTreeMap<String, Value>>,
) -> Result<Value> {
    let failures = services.e2ee.upload_signatures(localpart, signed).await?;
    let user_id = services.accounts.user_id(localpart);
    edus::device_changed(services, &user_id, "", false).await;
    Ok(failures)
}
