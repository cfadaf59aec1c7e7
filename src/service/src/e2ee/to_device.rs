//! To-device messages: sent to one device or all of a user's devices, queued per device
//! at a stream position, delivered by sync and deleted once the client acknowledges
//! them by syncing from a later token.

use std::{
    collections::{BTreeMap, HashMap},
    ops::Bound::{Excluded, Included},
    sync::{Arc, Mutex},
};

use serde_json::{Value, json};
use trellis_core::Result;
use trellis_store::{Batch, Direction, Json, Table, catalog};

use super::{E2ee, TO_DEVICE};
use crate::{Services, commit, federation::edus, rooms::stream::user_key, tables::DEVICES};

/// (localpart, device id, "m.to_device <txn id>") -> (): idempotent sends per device
const TXN_IDS: Table<(String, String, String), String> = Table::new(&catalog::TXN_IDS);

/// Messages a device may have waiting; beyond this new ones are dropped (a device that
/// never syncs must not fill the disk).
pub const MAX_PENDING_PER_DEVICE: usize = 10_000;
/// Messages per sync response.
pub const DEFAULT_BATCH: usize = 100;

/// How many messages each device has waiting: counted from storage when first needed,
/// then kept up to date as messages arrive and are acknowledged. A count is never below
/// what the inbox holds, as syncs skip reading an inbox counted empty.
#[derive(Default)]
pub struct InboxSizes(Mutex<HashMap<(String, String), usize>>);

/// Messages for other servers' users: `[server][user id][device id or "*"] = content`.
pub type RemoteMessages = BTreeMap<String, BTreeMap<String, BTreeMap<String, Value>>>;

/// One send: `messages[user id][device id or "*"] = content`.
pub struct Send<'a> {
    /// The sending user's id.
    pub sender: &'a str,
    /// Who the transaction id is unique for: the sender's localpart and device, or
    /// (for messages from another server) that server's name and an empty device.
    pub sender_localpart: &'a str,
    pub sender_device: &'a str,
    pub txn_id: &'a str,
    pub event_type: &'a str,
    pub messages: BTreeMap<String, BTreeMap<String, Value>>,
}

impl E2ee {
    /// Queues the messages of one `sendToDevice` request for this server's users; a
    /// repeated transaction id of the same device does nothing. Returns the messages
    /// for other servers' users, by server, for the caller to send over federation.
    pub async fn send_to_device(&self, send: Send<'_>) -> Result<RemoteMessages> {
        let txn = (
            send.sender_localpart.to_owned(),
            send.sender_device.to_owned(),
            format!("m.to_device {}", send.txn_id),
        );
        let mut remote = RemoteMessages::new();
        if TXN_IDS.contains(&*self.db, &txn)? {
            return Ok(remote);
        }
        let sender = send.sender;
        let ticket = self.rooms.stream.dispatch();
        let mut batch = Batch::new();
        let mut recipients = Vec::new();
        let mut added: Vec<(String, String)> = Vec::new();
        for (user_id, devices) in &send.messages {
            let Some(localpart) = self.local_part(user_id) else {
                if let Some(server) = crate::federation::server_of(user_id) {
                    remote
                        .entry(server.to_owned())
                        .or_default()
                        .insert(user_id.clone(), devices.clone());
                }
                continue;
            };
            let mut targets: Vec<(String, &Value)> = Vec::new();
            for (device, content) in devices {
                if device == "*" {
                    for row in
                        DEVICES.scan_prefix(&*self.db, &localpart.to_owned(), Direction::Forward)?
                    {
                        let ((_, id), _) = row?;
                        targets.push((id, content));
                    }
                } else if DEVICES.contains(&*self.db, &(localpart.to_owned(), device.clone()))? {
                    targets.push((device.clone(), content));
                }
            }
            for (device, content) in targets {
                if !self.inbox_has_room(localpart, &device)? {
                    tracing::warn!(user = %user_id, device, "to-device inbox full; message dropped");
                    continue;
                }
                let message =
                    json!({"type": send.event_type, "sender": sender, "content": content});
                let row = (localpart.to_owned(), device.clone(), ticket.position);
                TO_DEVICE.put(&mut batch, &row, &Json(message));
                added.push((localpart.to_owned(), device));
            }
            recipients.push(localpart.to_owned());
        }
        TXN_IDS.put(&mut batch, &txn, &String::new());
        let result = commit(&self.db, batch).await;
        // Counted before the position is retired, whether or not the sync succeeded (the
        // rows may be written all the same): a sync that can see a message must not find
        // its inbox counted empty (see `to_device_batch`); counting too many is harmless.
        self.count_added(&added);
        let retired = self.rooms.stream.retire(ticket);
        for localpart in recipients {
            self.rooms.stream.wake_for(retired, &user_key(&localpart));
        }
        result.map(|()| remote)
    }

    fn inbox_has_room(&self, localpart: &str, device: &str) -> Result<bool> {
        let key = (localpart.to_owned(), device.to_owned());
        if self.inbox_size(key.clone())? < MAX_PENDING_PER_DEVICE {
            return Ok(true);
        }
        // Counts may run high (a deleted device's inbox is emptied without them): count
        // again before turning a message away.
        self.inbox_sizes.0.lock().unwrap_or_else(|p| p.into_inner()).remove(&key);
        Ok(self.inbox_size(key)? < MAX_PENDING_PER_DEVICE)
    }

    /// Messages waiting for the device, counted once and then kept up to date.
    fn inbox_size(&self, key: (String, String)) -> Result<usize> {
        let mut sizes = self.inbox_sizes.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(&n) = sizes.get(&key) {
            return Ok(n);
        }
        let n = TO_DEVICE.scan_prefix(&*self.db, &key, Direction::Forward)?.count();
        sizes.insert(key, n);
        Ok(n)
    }

    fn count_added(&self, added: &[(String, String)]) {
        let mut sizes = self.inbox_sizes.0.lock().unwrap_or_else(|p| p.into_inner());
        for key in added {
            *sizes.entry(key.clone()).or_insert(0) += 1;
        }
    }

    /// Messages for the device queued in `(after, now]`, oldest first, at most `limit`,
    /// and the position they cover: `now`, or the last one's when the batch is full
    /// (more may be behind it, for the next request).
    pub fn to_device_batch(
        &self,
        localpart: &str,
        device_id: &str,
        after: u64,
        now: u64,
        limit: usize,
    ) -> Result<(Vec<Value>, u64)> {
        let mut events = Vec::new();
        // Most devices have nothing waiting, which the counted size says without a scan.
        if self.inbox_size((localpart.to_owned(), device_id.to_owned()))? == 0 {
            return Ok((events, now));
        }
        let start = (localpart.to_owned(), device_id.to_owned(), after);
        let end = (localpart.to_owned(), device_id.to_owned(), now);
        let mut last = now;
        for row in TO_DEVICE
            .scan_range(&*self.db, Excluded(&start), Included(&end), Direction::Forward)?
            .take(limit)
        {
            let ((_, _, pos), Json(event)) = row?;
            last = pos;
            events.push(event);
        }
        let upto = if events.len() == limit { last } else { now };
        Ok((events, upto))
    }

    /// Deletes the device's messages up to `upto`: the client has them.
    pub async fn ack_to_device(&self, localpart: &str, device_id: &str, upto: u64) -> Result<()> {
        let key = (localpart.to_owned(), device_id.to_owned());
        // Most syncs find the inbox empty: its counted size says so without a scan.
        if self.inbox_size(key.clone())? == 0 {
            return Ok(());
        }
        // One acknowledgement of a user's at a time: two syncs of a device acknowledging
        // the same messages at once would both subtract them, and an inbox counted empty
        // while holding messages would never deliver them.
        let _serial = self.lock_user(localpart).await;
        let start = (localpart.to_owned(), device_id.to_owned(), 0);
        let end = (localpart.to_owned(), device_id.to_owned(), upto);
        let mut batch = Batch::new();
        let mut removed = 0;
        for row in
            TO_DEVICE.scan_range(&*self.db, Included(&start), Included(&end), Direction::Forward)?
        {
            TO_DEVICE.delete(&mut batch, &row?.0);
            removed += 1;
        }
        if removed == 0 {
            return Ok(());
        }
        commit(&self.db, batch).await?;
        let mut sizes = self.inbox_sizes.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = sizes.get_mut(&key) {
            *n = n.saturating_sub(removed);
        }
        Ok(())
    }
}

/// `sendToDevice`: delivers to this server's devices and queues one EDU per other
/// server for the rest. The message id other servers see is the sending device's
/// transaction, so one device's retries stay recognisable there.
pub async fn send(services: &Arc<Services>, send: Send<'_>) -> Result<()> {
    let sender = send.sender.to_owned();
    let event_type = send.event_type.to_owned();
    let message_id = format!("{}_{}", send.sender_device, send.txn_id);
    let delivery = &services.appservice_delivery;
    if let Err(e) = delivery.to_device(services, &sender, &event_type, &send.messages) {
        tracing::warn!(error = %e, "handing to-device messages to application services failed");
    }
    let remote = services.e2ee.send_to_device(send).await?;
    edus::logged(edus::to_device(services, &sender, &event_type, &message_id, remote).await);
    Ok(())
}
