//! Outbound federation: a persistent queue per destination. Whatever this server must
//! tell another (its users' events, receipts, typing, to-device messages) is written to
//! the queue first, then sent by that destination's worker in transactions of at most
//! 50 PDUs and 100 EDUs. A destination that fails is retried with exponential backoff
//! (capped), sooner when it shows up again by sending us a request; what it missed stays
//! queued, across restarts, until it is delivered. Each destination has its own worker,
//! so a dead server never holds up the others.

use ruma::events::room::member::MembershipState;
use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use http::Method;
use serde_json::{Value, json};
use tokio::sync::Notify;
use tracing::Instrument;
use trellis_core::{Result, now_millis};
use trellis_store::{Batch, Db, Direction, Json, Table, catalog};

use super::Federation;
use crate::{
    pipeline::{Appended, Consumer},
    rooms::{Pdu, Rooms},
};

const OUTBOX: Table<(String, u64), Json<Value>> = Table::new(&catalog::FEDERATION_OUTBOX);

/// The spec's limits on one transaction.
const MAX_PDUS: usize = 50;
const MAX_EDUS: usize = 100;
/// Items looked at per transaction (PDUs and EDUs interleave in the queue).
const MAX_SCAN: usize = MAX_PDUS + MAX_EDUS;
/// Backoff after failures: 2^n seconds, at most this.
const MAX_BACKOFF: Duration = Duration::from_secs(600);
/// A worker with nothing to send stops after this long.
const IDLE: Duration = Duration::from_secs(60);
/// Items kept for one destination at most; beyond that new ones are dropped (a server
/// that comes back catches up on room events through `get_missing_events`).
const MAX_QUEUED: usize = 50_000;

#[derive(Default)]
struct Worker {
    /// New items are queued.
    queued: Notify,
    /// The destination contacted us: retry now rather than after the backoff.
    alive: Notify,
}

pub struct Outbox {
    db: Db,
    next: AtomicU64,
    workers: Mutex<HashMap<String, Arc<Worker>>>,
    /// Destinations per room (servers of joined members), dropped on membership changes.
    room_servers: Mutex<HashMap<String, Arc<Vec<String>>>>,
    /// Items queued per destination, counted from storage on first use.
    sizes: Mutex<HashMap<String, usize>>,
    /// How sending to each destination went since start-up (for admins).
    health: Mutex<HashMap<String, Health>>,
}

/// How sending to one destination has gone since the server started.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Health {
    /// Failures in a row.
    pub failures: u32,
    /// When the current run of failures began.
    pub failure_ts: Option<u64>,
    /// When the last attempt failed, and how long the worker waits before the next.
    pub retry_last_ts: u64,
    pub retry_interval_ms: u64,
    pub last_success_ts: Option<u64>,
    pub last_error: Option<String>,
}

/// One destination as admins see it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Destination {
    pub destination: String,
    #[serde(flatten)]
    pub health: Health,
    /// Items waiting in its queue.
    pub queued: usize,
}

impl Outbox {
    pub fn new(db: Db) -> Result<Self> {
        // Sequence numbers only need to grow per destination; starting from the clock
        // keeps them above anything queued before a restart.
        let next = AtomicU64::new(now_millis() * 1000);
        Ok(Self {
            db,
            next,
            workers: Mutex::default(),
            room_servers: Mutex::default(),
            sizes: Mutex::default(),
            health: Mutex::default(),
        })
    }

    /// Every destination sent to since start-up or with items queued, with how it went.
    pub fn destinations(&self) -> Result<Vec<Destination>> {
        let mut names = self.pending_destinations()?;
        let health = self.health.lock().unwrap_or_else(|p| p.into_inner()).clone();
        names.extend(health.keys().cloned());
        names.sort();
        names.dedup();
        let sizes = self.sizes.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Ok(names
            .into_iter()
            .map(|name| Destination {
                health: health.get(&name).cloned().unwrap_or_default(),
                queued: sizes.get(&name).copied().unwrap_or_else(|| {
                    OUTBOX
                        .scan_prefix(&*self.db, &name, Direction::Forward)
                        .map(|rows| rows.count())
                        .unwrap_or(0)
                }),
                destination: name,
            })
            .collect())
    }

    /// Clears a destination's backoff and retries it now; false when it is not in one.
    pub fn reset_backoff(&self, dest: &str) -> bool {
        let backing_off = self
            .health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(dest)
            .filter(|h| h.failures > 0)
            .map(|h| {
                h.retry_interval_ms = 0;
            })
            .is_some();
        if backing_off {
            self.peer_alive(dest);
        }
        backing_off
    }

    fn note(&self, dest: &str, outcome: std::result::Result<(), (String, Duration)>) {
        let mut all = self.health.lock().unwrap_or_else(|p| p.into_inner());
        let h = all.entry(dest.to_owned()).or_default();
        let now = now_millis();
        match outcome {
            Ok(()) => {
                h.failures = 0;
                h.failure_ts = None;
                h.retry_interval_ms = 0;
                h.last_success_ts = Some(now);
                h.last_error = None;
            }
            Err((error, delay)) => {
                h.failures = h.failures.saturating_add(1);
                h.failure_ts.get_or_insert(now);
                h.retry_last_ts = now;
                h.retry_interval_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
                h.last_error = Some(error);
            }
        }
    }

    /// Takes a place in `dest`'s queue; false when it is full.
    fn reserve(&self, dest: &str) -> bool {
        let mut sizes = self.sizes.lock().unwrap_or_else(|p| p.into_inner());
        let size = sizes.entry(dest.to_owned()).or_insert_with(|| {
            OUTBOX
                .scan_prefix(&*self.db, &dest.to_owned(), Direction::Forward)
                .map(|rows| rows.count())
                .unwrap_or(0)
        });
        if *size >= MAX_QUEUED {
            return false;
        }
        *size += 1;
        true
    }

    /// Gives back `n` places of `dest`'s queue (sent or dropped items).
    fn release(&self, dest: &str, n: usize) {
        let mut sizes = self.sizes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(size) = sizes.get_mut(dest) {
            *size = size.saturating_sub(n);
        }
    }

    fn seq(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// Destinations with queued items (to start their workers after a restart).
    fn pending_destinations(&self) -> Result<Vec<String>> {
        let mut out: Vec<String> = Vec::new();
        for row in OUTBOX.scan_range(
            &*self.db,
            std::ops::Bound::Unbounded,
            std::ops::Bound::Unbounded,
            Direction::Forward,
        )? {
            let ((dest, _), _) = row?;
            if out.last() != Some(&dest) {
                out.push(dest);
            }
        }
        Ok(out)
    }

    fn has_items(&self, dest: &str) -> bool {
        OUTBOX
            .scan_prefix(&*self.db, &dest.to_owned(), Direction::Forward)
            .ok()
            .and_then(|mut rows| rows.next())
            .is_some()
    }

    /// Forgets the cached destinations of a room (its membership or ACL changed).
    pub fn membership_changed(&self, room_id: &str) {
        self.room_servers.lock().unwrap_or_else(|p| p.into_inner()).remove(room_id);
    }

    /// The destination has shown it is up: a worker in backoff retries now.
    pub fn peer_alive(&self, dest: &str) {
        if let Some(w) = self.workers.lock().unwrap_or_else(|p| p.into_inner()).get(dest) {
            w.alive.notify_one();
        }
    }
}

/// Other servers with members joined to a room, as far as its server ACL allows.
pub fn room_servers(
    federation: &Federation,
    rooms: &Rooms,
    room_id: &str,
) -> Result<Arc<Vec<String>>> {
    let outbox = &federation.outbox;
    if let Some(s) = outbox.room_servers.lock().unwrap_or_else(|p| p.into_inner()).get(room_id) {
        return Ok(s.clone());
    }
    let own = federation.server_name.as_str();
    let mut servers: Vec<String> = rooms
        .members(room_id, &MembershipState::Join)?
        .iter()
        .filter_map(|u| super::server_of(u))
        .filter(|s| *s != own)
        .map(str::to_owned)
        .collect();
    servers.sort();
    servers.dedup();
    // Servers the room's ACL bans get nothing of it.
    if let Some(acl) = super::acl::room_acl(rooms, room_id)? {
        servers.retain(|server| super::acl::acl_allows(&acl, server));
    }
    let servers = Arc::new(servers);
    let mut cache = outbox.room_servers.lock().unwrap_or_else(|p| p.into_inner());
    if cache.len() > 10_000 {
        cache.clear();
    }
    cache.insert(room_id.to_owned(), servers.clone());
    Ok(servers)
}

/// Sends a local event to every other server in its room (and, for a membership event,
/// to the server of the user it is about), leaving out `except` (the server the event
/// came from, if any).
pub async fn send_pdu_except(
    federation: &Arc<Federation>,
    rooms: &Rooms,
    room_id: &str,
    pdu: &Pdu,
    except: Option<&str>,
) -> Result<()> {
    if !federation.enabled() {
        return Ok(());
    }
    let mut destinations: Vec<String> = room_servers(federation, rooms, room_id)?.to_vec();
    if let Some(target) =
        pdu.state_key.as_deref().filter(|_| pdu.kind == ruma::events::TimelineEventType::RoomMember)
        && let Some(server) = super::server_of(target)
        && server != federation.server_name
        && !destinations.iter().any(|d| d == server)
    {
        destinations.push(server.to_owned());
    }
    destinations.retain(|d| Some(d.as_str()) != except);
    let item = json!({ "pdu": serde_json::to_value(&*pdu.json).unwrap_or(Value::Null) });
    enqueue(federation, &destinations, item).await
}

/// Sends an EDU (`{"edu_type": ..., "content": ...}`) to `destinations`.
pub async fn send_edu(
    federation: &Arc<Federation>,
    destinations: &[String],
    edu: Value,
) -> Result<()> {
    if !federation.enabled() {
        return Ok(());
    }
    enqueue(federation, destinations, json!({ "edu": edu })).await
}

async fn enqueue(federation: &Arc<Federation>, destinations: &[String], item: Value) -> Result<()> {
    if destinations.is_empty() {
        return Ok(());
    }
    let outbox = &federation.outbox;
    let mut batch = Batch::new();
    for dest in destinations {
        if !outbox.reserve(dest) {
            tracing::warn!(destination = dest, "federation queue full; item dropped");
            continue;
        }
        OUTBOX.put(&mut batch, &(dest.clone(), outbox.seq()), &Json(item.clone()));
    }
    crate::commit(&federation.db, batch).await?;
    for dest in destinations {
        wake(federation, dest);
    }
    Ok(())
}

/// Starts the workers of destinations with items queued before a restart.
pub fn resume(federation: &Arc<Federation>) -> Result<()> {
    for dest in federation.outbox.pending_destinations()? {
        wake(federation, &dest);
    }
    Ok(())
}

/// Tells `dest`'s worker there is work, starting it if needed.
fn wake(federation: &Arc<Federation>, dest: &str) {
    let mut workers = federation.outbox.workers.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(w) = workers.get(dest) {
        w.queued.notify_one();
        return;
    }
    let worker = Arc::new(Worker::default());
    workers.insert(dest.to_owned(), worker.clone());
    // Detached from whatever request queued the first item: the worker outlives it.
    let span = tracing::info_span!(parent: None, "federation_sender", destination = dest);
    tokio::spawn(run(Arc::downgrade(federation), dest.to_owned(), worker).instrument(span));
}

/// The event pipeline's federation step: this server's events go to the other servers
/// in their rooms, and the cached destinations of a room are dropped when its members
/// or ACL change.
pub struct FanOut {
    federation: Arc<Federation>,
    rooms: Arc<Rooms>,
}

impl FanOut {
    pub fn new(federation: Arc<Federation>, rooms: Arc<Rooms>) -> Self {
        Self { federation, rooms }
    }
}

#[async_trait::async_trait]
impl Consumer for FanOut {
    fn name(&self) -> &'static str {
        "federation"
    }

    async fn on_event(&self, event: &Appended<'_>) -> Result<Option<u64>> {
        let (room_id, pdu) = (event.room_id.as_str(), event.pdu);
        if matches!(
            pdu.kind,
            ruma::events::TimelineEventType::RoomMember
                | ruma::events::TimelineEventType::RoomServerAcl
        ) {
            self.federation.outbox.membership_changed(room_id);
        }
        if pdu.sender.server_name().as_str() == self.federation.server_name {
            send_pdu_except(&self.federation, &self.rooms, room_id, pdu, None).await?;
        }
        Ok(None)
    }
}

/// One transaction's worth of queued items.
#[derive(Default)]
struct Batched {
    keys: Vec<(String, u64)>,
    pdus: Vec<Value>,
    edus: Vec<Value>,
}

fn next_batch(db: &Db, dest: &str) -> Result<Batched> {
    let Batched { mut keys, mut pdus, mut edus } = Batched::default();
    for row in OUTBOX.scan_prefix(&**db, &dest.to_owned(), Direction::Forward)?.take(MAX_SCAN) {
        let (key, Json(mut item)) = row?;
        if let Some(pdu) = item.get_mut("pdu").map(Value::take) {
            if pdus.len() == MAX_PDUS {
                break;
            }
            pdus.push(pdu);
        } else if let Some(edu) = item.get_mut("edu").map(Value::take) {
            if edus.len() == MAX_EDUS {
                break;
            }
            edus.push(edu);
        }
        keys.push(key);
    }
    Ok(Batched { keys, pdus, edus })
}

async fn run(federation: Weak<Federation>, dest: String, worker: Arc<Worker>) {
    let mut failures: u32 = 0;
    loop {
        let Some(s) = federation.upgrade() else { return };
        let Batched { keys, pdus, edus } = match next_batch(&s.db, &dest) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "reading the federation queue failed");
                Batched::default()
            }
        };
        if keys.is_empty() {
            drop(s);
            if tokio::time::timeout(IDLE, worker.queued.notified()).await.is_ok() {
                continue;
            }
            let Some(s) = federation.upgrade() else { return };
            let outbox = &s.outbox;
            let mut workers = outbox.workers.lock().unwrap_or_else(|p| p.into_inner());
            // Enqueuers commit before they look for a worker: with the lock held, no
            // items means none can be missed.
            if !outbox.has_items(&dest) {
                workers.remove(&dest);
                return;
            }
            continue;
        }
        let txn_id = format!("{}", keys[0].1);
        let body = json!({
            "origin": s.server_name,
            "origin_server_ts": now_millis(),
            "pdus": pdus,
            "edus": edus,
        });
        let path = format!("/_matrix/federation/v1/send/{txn_id}");
        match s.request(&dest, Method::PUT, &path, Some(&body)).await {
            Ok(answer) => {
                failures = 0;
                s.outbox.note(&dest, Ok(()));
                if let Some(results) = answer.get("pdus").and_then(Value::as_object) {
                    for (id, r) in results {
                        if let Some(error) = r.get("error") {
                            tracing::info!(event_id = id, %error, "destination refused an event");
                        }
                    }
                }
                clear(&s, &dest, &keys).await;
            }
            Err(e) if refused(&e) => {
                // The destination understood and refused the transaction: sending it
                // again would get the same answer.
                tracing::warn!(error = %e, "destination refused a transaction; dropping it");
                clear(&s, &dest, &keys).await;
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                let delay = Duration::from_secs(1u64 << failures.min(10)).min(MAX_BACKOFF);
                s.outbox.note(&dest, Err((e.message.to_string(), delay)));
                tracing::info!(error = %e, retry_in = ?delay, "sending a transaction failed");
                drop(s);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = worker.alive.notified() => {}
                }
            }
        }
    }
}

/// Removes sent (or refused) items from `dest`'s queue.
async fn clear(federation: &Federation, dest: &str, keys: &[(String, u64)]) {
    let mut batch = Batch::new();
    for key in keys {
        OUTBOX.delete(&mut batch, key);
    }
    match crate::commit(&federation.db, batch).await {
        Ok(()) => federation.outbox.release(dest, keys.len()),
        Err(e) => tracing::warn!(error = %e, "clearing sent items failed"),
    }
}

/// The other server refused the request itself, where rate limiting, authentication
/// and failures of its own may pass later.
fn refused(e: &trellis_core::Error) -> bool {
    use trellis_core::ErrorKind::*;
    matches!(
        e.kind,
        BadRequest
            | Forbidden
            | NotFound
            | MethodNotAllowed
            | Conflict
            | TooLarge
            | RangeNotSatisfiable
    )
}

#[cfg(test)]
mod tests {
    use trellis_core::config::StorageConfig;

    use super::*;

    #[test]
    fn a_destinations_queue_is_bounded_and_places_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = StorageConfig { block_cache_mb: 8, sync_writes: false, ..Default::default() };
        let db = trellis_store::open(dir.path(), &cfg).unwrap();
        // Items left from before a restart count.
        let mut batch = Batch::new();
        OUTBOX.put(&mut batch, &("b.example".to_owned(), 1), &Json(json!({"edu": {}})));
        db.write(batch).unwrap();
        let outbox = Outbox::new(db).unwrap();
        for _ in 1..MAX_QUEUED {
            assert!(outbox.reserve("b.example"));
        }
        assert!(!outbox.reserve("b.example"), "full");
        assert!(outbox.reserve("c.example"), "other destinations are not held up");
        outbox.release("b.example", 10);
        assert!(outbox.reserve("b.example"));
    }
}
