//! A user's devices: listing, renaming, deleting (which signs them out).

use trellis_core::{Error, Result};
use trellis_store::{Batch, Direction, Json};

use super::{Accounts, Session};
use std::sync::Arc;

use ruma::UserId;

use crate::{
    Services,
    audit::Client,
    federation::edus,
    tables::{ACCESS_TOKENS, DEVICES, DeviceRecord, REFRESH_TOKENS},
};

#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub device_id: String,
    pub display_name: Option<String>,
    pub last_seen_ms: Option<u64>,
    pub last_seen_ip: Option<String>,
    pub last_seen_user_agent: Option<String>,
}

impl Accounts {
    pub fn devices(&self, localpart: &str) -> Result<Vec<DeviceInfo>> {
        DEVICES
            .scan_prefix(&*self.db, &localpart.to_owned(), Direction::Forward)?
            .map(|entry| {
                let ((_, device_id), Json(d)) = entry?;
                Ok(DeviceInfo {
                    device_id,
                    display_name: d.display_name,
                    last_seen_ms: d.last_seen_ms,
                    last_seen_ip: d.last_seen_ip,
                    last_seen_user_agent: d.last_seen_user_agent,
                })
            })
            .collect()
    }

    pub fn device(&self, localpart: &str, device_id: &str) -> Result<DeviceInfo> {
        let key = (localpart.to_owned(), device_id.to_owned());
        let Json(d) =
            DEVICES.get(&*self.db, &key)?.ok_or_else(|| Error::not_found("Device not found"))?;
        Ok(DeviceInfo {
            device_id: device_id.to_owned(),
            display_name: d.display_name,
            last_seen_ms: d.last_seen_ms,
            last_seen_ip: d.last_seen_ip,
            last_seen_user_agent: d.last_seen_user_agent,
        })
    }

    pub(super) fn device_ids(&self, localpart: &str) -> Result<Vec<String>> {
        DEVICES
            .scan_prefix(&*self.db, &localpart.to_owned(), Direction::Forward)?
            .map(|entry| entry.map(|((_, id), _)| id).map_err(Into::into))
            .collect()
    }

    /// Renames a device. `PUT /devices/{id}` on an unknown device is 404.
    pub async fn rename_device(
        &self,
        localpart: &str,
        device_id: &str,
        name: Option<String>,
    ) -> Result<()> {
        let key = (localpart.to_owned(), device_id.to_owned());
        let Json(mut d) =
            DEVICES.get(&*self.db, &key)?.ok_or_else(|| Error::not_found("Device not found"))?;
        d.display_name = name;
        let mut batch = Batch::new();
        DEVICES.put(&mut batch, &key, &Json(d));
        // The name is part of what co-members' clients show for the device.
        self.commit_device_change(batch, localpart).await
    }

    /// Adds a device that has no session (a dehydrated device, MSC3814): it holds keys
    /// and receives to-device messages until a client rehydrates it. An id in use by a
    /// device with a session is refused.
    pub async fn add_sessionless_device(
        &self,
        localpart: &str,
        device_id: &str,
        display_name: Option<String>,
    ) -> Result<()> {
        let key = (localpart.to_owned(), device_id.to_owned());
        let existing = DEVICES.get(&*self.db, &key)?.map(|j| j.0);
        if existing.as_ref().is_some_and(|d| d.token_hash.is_some()) {
            return Err(Error::invalid_param("That device id belongs to a signed-in device"));
        }
        let record = DeviceRecord {
            display_name: display_name
                .or_else(|| existing.as_ref().and_then(|d| d.display_name.clone())),
            created_ms: existing.as_ref().map_or_else(trellis_core::now_millis, |d| d.created_ms),
            token_hash: None,
            refresh_hash: None,
            last_seen_ms: None,
            last_seen_ip: None,
            last_seen_user_agent: None,
        };
        let mut batch = Batch::new();
        DEVICES.put(&mut batch, &key, &Json(record));
        self.commit_device_change(batch, localpart).await
    }

    /// Deletes devices (unknown ids are ignored, as the spec asks for bulk deletion).
    pub async fn delete_devices(
        &self,
        localpart: &str,
        device_ids: &[String],
        client: &Client,
    ) -> Result<()> {
        let mut batch = Batch::new();
        for id in device_ids {
            self.delete_device_into(&mut batch, localpart, id)?;
        }
        self.audit.add(
            &mut batch,
            Some(localpart),
            "delete_devices",
            client,
            "ok",
            Some(device_ids.join(",")),
        );
        self.commit_device_change(batch, localpart).await
    }

    /// Adds the removal of a device and its tokens to `batch`.
    pub(super) fn delete_device_into(
        &self,
        batch: &mut Batch,
        localpart: &str,
        device_id: &str,
    ) -> Result<()> {
        let key = (localpart.to_owned(), device_id.to_owned());
        if let Some(Json(d)) = DEVICES.get(&*self.db, &key)? {
            if let Some(h) = &d.token_hash {
                ACCESS_TOKENS.delete(batch, h);
            }
            if let Some(h) = &d.refresh_hash {
                REFRESH_TOKENS.delete(batch, h);
            }
            DEVICES.delete(batch, &key);
            crate::e2ee::delete_device_rows(&self.db, batch, localpart, device_id)?;
        }
        Ok(())
    }
}

/// `PUT /devices/{deviceId}`: renames one of the user's devices, or, for an application
/// service acting as one of its users, creates it when it does not exist (spec v1.17:
/// bridges give their users' devices the ids they choose). True when it was created.
pub async fn put_device(
    services: &Arc<Services>,
    session: &Session,
    device_id: &str,
    display_name: Option<String>,
) -> Result<bool> {
    let accounts = &services.accounts;
    let localpart = session.localpart.as_str();
    if accounts.device(localpart, device_id).is_ok() {
        accounts.rename_device(localpart, device_id, display_name).await?;
        return Ok(false);
    }
    if session.appservice.is_none() {
        return Err(Error::not_found("Device not found"));
    }
    if device_id.is_empty()
        || device_id.len() > MAX_DEVICE_ID_LEN
        || device_id.chars().any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(Error::invalid_param("Invalid device id"));
    }
    accounts.add_sessionless_device(localpart, device_id, display_name).await?;
    let user_id = accounts.user_id(localpart);
    edus::device_changed(services, &user_id, device_id, false).await;
    Ok(true)
}

/// The longest device id a service may choose.
const MAX_DEVICE_ID_LEN: usize = 255;

/// Deletes devices of `localpart` (after the caller re-authenticated them): their
/// tokens and keys go, their pushers stop, other servers hear of it, and the user's
/// open sync streams wake to re-check their token.
pub async fn delete_devices(
    services: &Arc<Services>,
    localpart: &str,
    device_ids: &[String],
    client: &Client,
) -> Result<()> {
    services.accounts.delete_devices(localpart, device_ids, client).await?;
    let user_id = services.accounts.user_id(localpart);
    for id in device_ids {
        services.pushers.remove_for_device(localpart, id).await?;
        edus::device_changed(services, &user_id, id, true).await;
    }
    services.rooms.stream.wake(&crate::rooms::stream::user_key(&user_id));
    Ok(())
}

/// `GET /admin/whois/{userId}`: `target`'s devices with where and when each was last
/// seen, for a server admin or the user themself.
pub fn whois(services: &Services, requester: &UserId, target: &UserId) -> Result<Vec<DeviceInfo>> {
    let accounts = &services.accounts;
    if requester != target {
        let admin = accounts.user(requester.localpart())?.is_some_and(|u| u.admin);
        if !admin {
            return Err(Error::forbidden("Only server admins may look up other users"));
        }
    }
    let localpart = accounts
        .local_part(target.as_str())
        .filter(|lp| accounts.user(lp).is_ok_and(|u| u.is_some()))
        .ok_or_else(|| Error::not_found("No such user on this server"))?;
    accounts.devices(localpart)
}
