//! Dehydrated devices (MSC3814, which Element X uses): a device a client leaves on the
//! server, with its keys and an encrypted pickle of its secrets (`device_data`, opaque
//! here), so that messages encrypted to it while the user has no device signed in can be
//! read later. One per user; a new one replaces the old. The device receives to-device
//! messages like any other, and the client that rehydrates it fetches them in batches.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use trellis_core::{Error, Result};
use trellis_store::{Batch, Json, Table, catalog};

use super::device_keys::{Upload, upload_keys};
use crate::{Services, audit::Client, commit};

/// user localpart -> the user's dehydrated device
const DEHYDRATED_DEVICES: Table<String, Json<Dehydrated>> =
    Table::new(&catalog::DEHYDRATED_DEVICES);

/// A user's dehydrated device as the client described it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Dehydrated {
    pub device_id: String,
    /// The client's own data (algorithm and pickle), handed back as given.
    pub device_data: Value,
}

/// The device to create and what it publishes.
pub struct NewDehydrated {
    pub device_id: String,
    pub display_name: Option<String>,
    pub device_data: Value,
    pub keys: Upload,
}

/// `PUT /dehydrated_device`: stores the user's dehydrated device, replacing (deleting)
/// the one before, and publishes its keys.
pub async fn put(
    services: &Arc<Services>,
    localpart: &str,
    new: NewDehydrated,
    client: &Client,
) -> Result<()> {
    if !new.device_data.is_object() {
        return Err(Error::bad_json("device_data must be an object"));
    }
    let old = get(services, localpart)?;
    let accounts = &services.accounts;
    // The new device first: a refused one leaves the old in place.
    accounts.add_sessionless_device(localpart, &new.device_id, new.display_name).await?;
    if let Some(old) = old
        && old.device_id != new.device_id
    {
        remove_device(services, localpart, &old.device_id, client).await?;
    }
    let record = Dehydrated { device_id: new.device_id.clone(), device_data: new.device_data };
    let mut batch = Batch::new();
    DEHYDRATED_DEVICES.put(&mut batch, &localpart.to_owned(), &Json(record));
    commit(&services.db, batch).await?;
    upload_keys(services, localpart, &new.device_id, new.keys).await?;
    Ok(())
}

/// `GET /dehydrated_device`: the user's dehydrated device, if any (and not deleted
/// since as a device through `/devices`).
pub fn get(services: &Services, localpart: &str) -> Result<Option<Dehydrated>> {
    let Some(Json(record)) = DEHYDRATED_DEVICES.get(&*services.db, &localpart.to_owned())? else {
        return Ok(None);
    };
    let exists =
        services.accounts.devices(localpart)?.iter().any(|d| d.device_id == record.device_id);
    Ok(exists.then_some(record))
}

/// `DELETE /dehydrated_device`: deletes the user's dehydrated device; answers its id.
pub async fn delete(services: &Arc<Services>, localpart: &str, client: &Client) -> Result<String> {
    let old = get(services, localpart)?.ok_or_else(no_device)?;
    remove_device(services, localpart, &old.device_id, client).await?;
    Ok(old.device_id)
}

/// To-device messages for the dehydrated device after `next_batch` (a token of this
/// endpoint; none: from the start), oldest first; those up to `next_batch` are
/// acknowledged (deleted). Answers the messages and the token for the next batch.
pub async fn events(
    services: &Services,
    localpart: &str,
    device_id: &str,
    next_batch: Option<&str>,
) -> Result<(Vec<Value>, String)> {
    let current = get(services, localpart)?.ok_or_else(no_device)?;
    if current.device_id != device_id {
        return Err(no_device());
    }
    let after = match next_batch {
        Some(token) => token.parse::<u64>().map_err(|_| Error::invalid_param("Bad next_batch"))?,
        None => 0,
    };
    let e2ee = &services.e2ee;
    if after > 0 {
        e2ee.ack_to_device(localpart, device_id, after).await?;
    }
    let now = services.rooms.stream.visible();
    let limit = super::to_device::DEFAULT_BATCH;
    let (events, upto) =
        e2ee.to_device_batch(localpart, device_id, after, now.max(after), limit)?;
    Ok((events, upto.to_string()))
}

fn no_device() -> Error {
    Error::not_found("No dehydrated device")
}

/// Deletes a dehydrated device the way any device is deleted, and its record.
async fn remove_device(
    services: &Arc<Services>,
    localpart: &str,
    device_id: &str,
    client: &Client,
) -> Result<()> {
    crate::accounts::devices::delete_devices(services, localpart, &[device_id.to_owned()], client)
        .await?;
    let mut batch = Batch::new();
    DEHYDRATED_DEVICES.delete(&mut batch, &localpart.to_owned());
    commit(&services.db, batch).await
}
