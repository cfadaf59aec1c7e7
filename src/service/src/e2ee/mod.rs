//! End-to-end encryption support. The server never sees plaintext: it stores and routes
//! what crypto clients publish (device identity keys, one-time and fallback keys,
//! cross-signing keys and signatures, encrypted key backups, to-device messages) and
//! tells clients whose keys changed.

pub mod backup;
pub mod cross_signing;
pub mod dehydrated;
pub mod device_keys;
pub mod device_lists;
pub mod signing;
pub mod to_device;

use std::sync::Arc;

use trellis_core::{Error, Result};
use trellis_store::{Batch, Db, Direction, Json, Table, catalog};

use crate::rooms::Rooms;

/// (localpart, device id) -> the device keys object as uploaded (signatures included)
pub(crate) const DEVICE_KEYS: Table<(String, String), Json<serde_json::Value>> =
    Table::new(&catalog::DEVICE_KEYS);
/// (localpart, device id, algorithm, key id) -> one-time key
pub(crate) const ONE_TIME_KEYS: Table<(String, String, String, String), Json<serde_json::Value>> =
    Table::new(&catalog::ONE_TIME_KEYS);
/// (localpart, device id, algorithm, upload sequence) -> key id: claim order
pub(crate) const ONE_TIME_KEY_ORDER: Table<(String, String, String, u64), String> =
    Table::new(&catalog::ONE_TIME_KEY_ORDER);
/// (localpart, device id, algorithm) -> unclaimed one-time keys
pub(crate) const ONE_TIME_KEY_COUNTS: Table<(String, String, String), u64> =
    Table::new(&catalog::ONE_TIME_KEY_COUNTS);
/// (localpart, device id, algorithm) -> fallback key
pub(crate) const FALLBACK_KEYS: Table<(String, String, String), Json<device_keys::FallbackKey>> =
    Table::new(&catalog::FALLBACK_KEYS);
/// (localpart, device id, position) -> to-device message
pub(crate) const TO_DEVICE: Table<(String, String, u64), Json<serde_json::Value>> =
    Table::new(&catalog::TO_DEVICE);

pub struct E2ee {
    db: Db,
    /// Key changes wake everyone sharing a room with the user.
    rooms: Arc<Rooms>,
    server_name: String,
    /// Uploads and claims of one user's keys run one at a time, so that each one-time
    /// key is handed out exactly once and counts stay exact.
    key_locks: crate::locks::UserLocks,
    inbox_sizes: to_device::InboxSizes,
}

impl E2ee {
    pub fn new(db: Db, rooms: Arc<Rooms>, server_name: String) -> Self {
        Self {
            db,
            rooms,
            server_name,
            key_locks: Default::default(),
            inbox_sizes: Default::default(),
        }
    }

    fn user_id(&self, localpart: &str) -> String {
        format!("@{localpart}:{}", self.server_name)
    }

    /// The localpart of a user id of this server.
    fn local_part<'a>(&self, user_id: &'a str) -> Option<&'a str> {
        let (lp, server) = user_id.strip_prefix('@')?.split_once(':')?;
        (server == self.server_name).then_some(lp)
    }

    async fn lock_user(&self, localpart: &str) -> tokio::sync::MutexGuard<'_, ()> {
        self.key_locks.lock(localpart).await
    }

    /// Commits `batch` with a key-change entry for each of `changed` (user ids).
    async fn commit_with_changes(&self, batch: Batch, changed: &[String]) -> Result<()> {
        device_lists::commit_with_changes(&self.db, &self.rooms, batch, changed).await
    }
}

/// Adds the removal of everything the device published or was sent to `batch` (the
/// device itself is being deleted in the same batch).
pub(crate) fn delete_device_rows(
    db: &Db,
    batch: &mut Batch,
    localpart: &str,
    device_id: &str,
) -> Result<()> {
    let device = (localpart.to_owned(), device_id.to_owned());
    DEVICE_KEYS.delete(batch, &device);
    for row in ONE_TIME_KEYS.scan_prefix(&**db, &device, Direction::Forward)? {
        ONE_TIME_KEYS.delete(batch, &row?.0);
    }
    for row in ONE_TIME_KEY_ORDER.scan_prefix(&**db, &device, Direction::Forward)? {
        ONE_TIME_KEY_ORDER.delete(batch, &row?.0);
    }
    for row in ONE_TIME_KEY_COUNTS.scan_prefix(&**db, &device, Direction::Forward)? {
        ONE_TIME_KEY_COUNTS.delete(batch, &row?.0);
    }
    for row in FALLBACK_KEYS.scan_prefix(&**db, &device, Direction::Forward)? {
        FALLBACK_KEYS.delete(batch, &row?.0);
    }
    for row in TO_DEVICE.scan_prefix(&**db, &device, Direction::Forward)? {
        TO_DEVICE.delete(batch, &row?.0);
    }
    Ok(())
}

/// A JSON object from a request, or 400 `M_BAD_JSON` naming `what`.
fn object<'a>(
    value: &'a serde_json::Value,
    what: &str,
) -> Result<&'a serde_json::Map<String, serde_json::Value>> {
    value.as_object().ok_or_else(|| Error::bad_json(format!("{what} must be a JSON object")))
}
