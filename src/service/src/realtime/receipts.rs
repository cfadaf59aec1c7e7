//! Read receipts (`m.read`, `m.read.private`, threaded): the latest receipt per user,
//! type and thread, plus a log by stream position holding one row per live receipt, so
//! a sync reads only what changed and an initial sync reads each receipt once.

use std::sync::Arc;

use ruma::{
    EventId, RoomId, UserId, api::client::receipt::create_receipt::v3::ReceiptType,
    events::receipt::ReceiptThread,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use trellis_core::{Error, Result, now_millis};
use trellis_store::{Batch, Db, Direction, Json, Table, catalog};

use crate::{
    Services, commit,
    federation::edus,
    rooms::{
        stream::StreamPositions,
        viewer::{Viewer, require_joined},
    },
};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Receipt {
    event_id: String,
    ts: u64,
    position: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct LogEntry {
    user: String,
    kind: String,
    thread: String,
}

/// (room id, user id, receipt type, thread id or "") -> receipt
const RECEIPTS: Table<(String, String, String, String), Json<Receipt>> =
    Table::new(&catalog::RECEIPTS);
/// (room id, position) -> which receipt changed there
const RECEIPT_LOG: Table<(String, u64), Json<LogEntry>> = Table::new(&catalog::RECEIPT_LOG);

pub const READ: &str = "m.read";
pub const READ_PRIVATE: &str = "m.read.private";
/// Not a receipt but the user's `m.fully_read` marker (room account data), which clients
/// may set through the receipt endpoint.
pub const FULLY_READ: &str = "m.fully_read";

pub struct Receipts {
    db: Db,
    stream: Arc<StreamPositions>,
    /// Position of each room's newest receipt, once known: most syncs ask about rooms
    /// where no receipt changed, and this answers them without opening an iterator.
    newest: std::sync::Mutex<std::collections::HashMap<String, u64>>,
}

impl Receipts {
    pub fn new(db: Db, stream: Arc<StreamPositions>) -> Self {
        Self { db, stream, newest: std::sync::Mutex::default() }
    }

    /// The stream position of the room's newest receipt (0 when none).
    pub fn newest(&self, room_id: &str) -> Result<u64> {
        if let Some(p) = self.newest.lock().unwrap_or_else(|p| p.into_inner()).get(room_id) {
            return Ok(*p);
        }
        let newest = RECEIPT_LOG
            .scan_prefix(&*self.db, &room_id.to_owned(), Direction::Backward)?
            .next()
            .transpose()?
            .map_or(0, |((_, p), _)| p);
        let mut map = self.newest.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() > 100_000 {
            map.clear();
        }
        let entry = map.entry(room_id.to_owned()).or_insert(newest);
        *entry = (*entry).max(newest);
        Ok(*entry)
    }

    /// Records `user`'s receipt of `kind` at `event_id` (an event of the room, checked
    /// by the caller); `thread` is `None` for an unthreaded receipt.
    pub async fn set(
        &self,
        room_id: &str,
        user: &str,
        kind: &str,
        event_id: &str,
        thread: Option<&str>,
    ) -> Result<()> {
        if kind != READ && kind != READ_PRIVATE {
            return Err(Error::invalid_param(format!("Unknown receipt type {kind}")));
        }
        let thread = thread.unwrap_or("").to_owned();
        let key = (room_id.to_owned(), user.to_owned(), kind.to_owned(), thread.clone());
        let ticket = self.stream.dispatch();
        let mut batch = Batch::new();
        let old = RECEIPTS.get(&*self.db, &key);
        let old = match old {
            Ok(old) => old,
            Err(e) => {
                self.stream.retire(ticket);
                return Err(e.into());
            }
        };
        if let Some(Json(old)) = old {
            // One log row per live receipt: the replaced one's row goes.
            RECEIPT_LOG.delete(&mut batch, &(room_id.to_owned(), old.position));
        }
        let receipt =
            Receipt { event_id: event_id.to_owned(), ts: now_millis(), position: ticket.position };
        RECEIPTS.put(&mut batch, &key, &Json(receipt));
        let entry = LogEntry { user: user.to_owned(), kind: kind.to_owned(), thread };
        RECEIPT_LOG.put(&mut batch, &(room_id.to_owned(), ticket.position), &Json(entry));
        let result = commit(&self.db, batch).await;
        if result.is_ok() {
            let mut map = self.newest.lock().unwrap_or_else(|p| p.into_inner());
            let entry = map.entry(room_id.to_owned()).or_insert(0);
            *entry = (*entry).max(ticket.position);
        }
        let retired = self.stream.retire(ticket);
        self.stream.wake_for(retired, room_id);
        result
    }

    /// The `m.receipt` content of receipts in `room_id` that changed after `since`, as
    /// `viewer` may see them (private receipts only their own); `None` when nothing did.
    pub fn changed_since(&self, room_id: &str, since: u64, viewer: &str) -> Result<Option<Value>> {
        use std::ops::Bound::{Excluded, Included};
        if self.newest(room_id)? <= since {
            return Ok(None);
        }
        let lo = (room_id.to_owned(), since);
        let hi = (room_id.to_owned(), u64::MAX);
        let mut content = json!({});
        let mut any = false;
        for row in
            RECEIPT_LOG.scan_range(&*self.db, Excluded(&lo), Included(&hi), Direction::Forward)?
        {
            let ((_, position), Json(entry)) = row?;
            if entry.kind == READ_PRIVATE && entry.user != viewer {
                continue;
            }
            let key = (room_id.to_owned(), entry.user.clone(), entry.kind.clone(), entry.thread);
            let Some(Json(receipt)) = RECEIPTS.get(&*self.db, &key)? else { continue };
            if receipt.position != position {
                continue;
            }
            let mut data = json!({"ts": receipt.ts});
            if !key.3.is_empty() {
                data["thread_id"] = json!(key.3);
            }
            content[&receipt.event_id][&entry.kind][&entry.user] = data;
            any = true;
        }
        Ok(any.then_some(content))
    }

    /// The user's latest receipt event id in a room (any thread, either type), for
    /// unread counts.
    pub fn latest(&self, room_id: &str, user: &str) -> Result<Vec<(String, String)>> {
        let mut out = Vec::new();
        for row in RECEIPTS.scan_prefix(
            &*self.db,
            &(room_id.to_owned(), user.to_owned()),
            Direction::Forward,
        )? {
            let ((_, _, _, thread), Json(receipt)) = row?;
            out.push((thread, receipt.event_id));
        }
        Ok(out)
    }
}

/// Adds to `batch` the removal of every receipt of `room_id` (a purged room).
pub fn purge_room_into(db: &Db, batch: &mut Batch, room_id: &str) -> Result<()> {
    let room = room_id.to_owned();
    for row in RECEIPTS.scan_prefix(&**db, &room, Direction::Forward)? {
        RECEIPTS.delete(batch, &row?.0);
    }
    for row in RECEIPT_LOG.scan_prefix(&**db, &room, Direction::Forward)? {
        RECEIPT_LOG.delete(batch, &row?.0);
    }
    Ok(())
}

/// `user` marks `event_id` of `room_id` (a room they are in, an event they may see)
/// read: a public or private receipt, in `thread` if given, or the fully read marker.
/// Public receipts go to the other servers in the room too.
pub async fn set_receipt(
    services: &Arc<Services>,
    user: &UserId,
    room_id: &RoomId,
    kind: &ReceiptType,
    event_id: &EventId,
    thread: &ReceiptThread,
) -> Result<()> {
    require_joined(services, room_id, user)?;
    let (localpart, room_id, event_id) = (user.localpart(), room_id.as_str(), event_id.as_str());
    let user_id = user.as_str();
    let viewer = Viewer::load(services, localpart)?;
    viewer.reader(services, room_id, user_id)?.event(services, room_id, event_id)?;
    let thread = match thread {
        ReceiptThread::Unthreaded => None,
        thread => Some(thread.as_str().ok_or_else(|| Error::invalid_param("Unknown thread"))?),
    };
    match kind {
        ReceiptType::FullyRead if thread.is_some() => {
            Err(Error::invalid_param("m.fully_read cannot be threaded"))
        }
        ReceiptType::FullyRead => set_fully_read(services, localpart, room_id, event_id).await,
        ReceiptType::Read | ReceiptType::ReadPrivate => {
            let kind = kind.as_str();
            services.receipts.set(room_id, user_id, kind, event_id, thread).await?;
            services.analytics.note_read();
            services.push_gateway.counts_changed(services, localpart);
            if kind == READ {
                let sent = edus::read_receipt(services, room_id, user_id, event_id, thread);
                queued(sent.await);
                let delivery = &services.appservice_delivery;
                delivery.read_receipt(services, room_id, user_id, event_id, thread);
            }
            Ok(())
        }
        _ => Err(Error::invalid_param("Unknown receipt type")),
    }
}

/// `user` moves their markers in `room_id` (a room they are in) to events they may see:
/// the fully read marker, the public and the private read receipt, each if given, in
/// that order.
pub async fn set_read_markers(
    services: &Arc<Services>,
    user: &UserId,
    room_id: &RoomId,
    fully_read: Option<&EventId>,
    read: Option<&EventId>,
    read_private: Option<&EventId>,
) -> Result<()> {
    require_joined(services, room_id, user)?;
    let (localpart, room_id, user_id) = (user.localpart(), room_id.as_str(), user.as_str());
    let viewer = Viewer::load(services, localpart)?;
    let room = viewer.reader(services, room_id, user_id)?;
    if let Some(event_id) = fully_read {
        room.event(services, room_id, event_id.as_str())?;
        set_fully_read(services, localpart, room_id, event_id.as_str()).await?;
    }
    for (kind, event_id) in [(READ, read), (READ_PRIVATE, read_private)] {
        if let Some(event_id) = event_id.map(EventId::as_str) {
            room.event(services, room_id, event_id)?;
            services.receipts.set(room_id, user_id, kind, event_id, None).await?;
            services.analytics.note_read();
            if kind == READ {
                queued(edus::read_receipt(services, room_id, user_id, event_id, None).await);
            }
        }
    }
    if read.is_some() || read_private.is_some() {
        services.push_gateway.counts_changed(services, localpart);
    }
    Ok(())
}

async fn set_fully_read(
    services: &Services,
    localpart: &str,
    room_id: &str,
    event_id: &str,
) -> Result<()> {
    let content = json!({"event_id": event_id});
    services.account_data.put(localpart, Some(room_id), FULLY_READ, content).await
}

/// A receipt stands whether or not the other servers can be told.
fn queued(sent: Result<()>) {
    if let Err(e) = sent {
        tracing::warn!(error = %e, "queueing an EDU for federation failed");
    }
}
