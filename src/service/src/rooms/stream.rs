//! The global stream position that orders everything a client can sync.
//!
//! Positions are drawn ("dispatched") before a write and "retired" once its batch has
//! committed. Readers only see positions below the lowest one still in flight, so a
//! sync never skips over a write that commits late. Waiters subscribe before reading
//! the position, so a wake-up between the two cannot be lost.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex},
};

use tokio::sync::{Notify, watch};
use trellis_store::{Batch, Db, Table, catalog};

/// Positions are reserved in the database this many at a time, so that after a restart
/// numbering resumes above anything handed out before, whatever table it went to.
const RESERVE_BLOCK: u64 = 10_000;
const META: Table<String, u64> = Table::new(&catalog::META);
const RESERVED_KEY: &str = "stream_reserved";

/// Stream positions below this are for backfilled history (see [`StreamPositions::persistent`]).
pub const BACKFILL_SPACE: u64 = 1 << 32;

pub struct StreamPositions {
    inner: Mutex<Inner>,
    visible_tx: watch::Sender<u64>,
    db: Option<Db>,
    /// Who waits for what: syncs register under their user's key (`@localpart`) and
    /// their rooms' ids, and writers wake the keys their change concerns, so a message
    /// wakes the room's members, not every waiting sync on the server.
    waiters: Mutex<Registry>,
    /// Where noted keys last changed (see [`Self::changed_after`]).
    changes: Mutex<Changes>,
}

/// Changes noted since `from`: a key missing from `latest` did not change after it.
struct Changes {
    from: u64,
    latest: HashMap<String, u64>,
}

/// Keys noted at most; beyond this the notes start over from the current position.
const MAX_NOTED_KEYS: usize = 100_000;

#[derive(Default)]
struct Registry {
    next_id: u64,
    by_key: HashMap<String, HashMap<u64, Arc<Notify>>>,
}

/// A registration of one waiter under some keys; dropping it unregisters.
pub struct Subscription {
    stream: Arc<StreamPositions>,
    id: u64,
    keys: Vec<String>,
    notify: Arc<Notify>,
}

impl Subscription {
    /// Completes once one of the keys was woken after the subscription was made (a
    /// wake-up in between is kept as a permit, never lost).
    pub async fn woken(&self) {
        self.notify.notified().await;
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut registry = self.stream.waiters.lock().unwrap_or_else(|p| p.into_inner());
        for key in &self.keys {
            if let Some(waiters) = registry.by_key.get_mut(key) {
                waiters.remove(&self.id);
                if waiters.is_empty() {
                    registry.by_key.remove(key);
                }
            }
        }
    }
}

/// The wake-up key of a user: their localpart (user ids of this server).
pub fn user_key(user: &str) -> String {
    let localpart = user.trim_start_matches('@').split(':').next().unwrap_or(user);
    format!("@{localpart}")
}

struct Inner {
    /// The last position handed out.
    last_dispatched: u64,
    /// Positions up to this are reserved in the database.
    reserved: u64,
    /// Dispatched and not yet retired.
    in_flight: BTreeSet<u64>,
    /// Wake-ups for retired writes still behind an earlier one in flight: `(position,
    /// key)`, fired once the visible position reaches them.
    deferred: Vec<(u64, String)>,
}

/// A retired write's position, to wake its waiters by (see [`StreamPositions::wake_for`]).
#[derive(Debug, Clone, Copy)]
pub struct Retired(u64);

/// A drawn position; retire it after the write commits (or fails).
#[must_use = "a dispatched position must be retired or readers stall"]
pub struct Ticket {
    pub position: u64,
}

impl StreamPositions {
    /// Starts after `persisted`, the highest position already stored.
    pub fn new(persisted: u64) -> Self {
        let (visible_tx, _) = watch::channel(persisted);
        Self {
            inner: Mutex::new(Inner {
                last_dispatched: persisted,
                reserved: u64::MAX,
                in_flight: BTreeSet::new(),
                deferred: Vec::new(),
            }),
            visible_tx,
            db: None,
            waiters: Mutex::default(),
            changes: Mutex::new(Changes { from: persisted, latest: HashMap::new() }),
        }
    }

    /// Positions backed by reservations in `db`: resumes above both `floor` (the highest
    /// position found in the data) and the last reservation.
    /// Positions start above this, leaving the room below for history fetched from
    /// other servers (backfill), which is placed before a room's first local event.
    pub fn persistent(db: Db, floor: u64) -> trellis_core::Result<Self> {
        let reserved = META.get(&*db, &RESERVED_KEY.to_owned())?.unwrap_or(0);
        let start = floor.max(reserved).max(BACKFILL_SPACE);
        let (visible_tx, _) = watch::channel(start);
        Ok(Self {
            inner: Mutex::new(Inner {
                last_dispatched: start,
                reserved: start,
                in_flight: BTreeSet::new(),
                deferred: Vec::new(),
            }),
            visible_tx,
            db: Some(db),
            waiters: Mutex::default(),
            changes: Mutex::new(Changes { from: start, latest: HashMap::new() }),
        })
    }

    pub fn dispatch(&self) -> Ticket {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if inner.last_dispatched >= inner.reserved
            && let Some(db) = &self.db
        {
            // Once per block: a small synchronous write, so that no position is handed
            // out that a restart could hand out again.
            let next = inner.last_dispatched + RESERVE_BLOCK;
            let mut batch = Batch::new();
            META.put(&mut batch, &RESERVED_KEY.to_owned(), &next);
            match db.write(batch) {
                Ok(()) => inner.reserved = next,
                Err(e) => tracing::error!(error = %e, "reserving stream positions failed"),
            }
        }
        inner.last_dispatched += 1;
        let position = inner.last_dispatched;
        inner.in_flight.insert(position);
        Ticket { position }
    }

    /// Marks the write at `ticket` as finished and wakes readers if the visible position
    /// moved (with the wake-ups that were waiting for it).
    pub fn retire(&self, ticket: Ticket) -> Retired {
        let (visible, due) = {
            let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            inner.in_flight.remove(&ticket.position);
            let visible = Self::visible_of(&inner);
            let due: Vec<String> = if inner.deferred.iter().any(|(p, _)| *p <= visible) {
                let (due, later) = std::mem::take(&mut inner.deferred)
                    .into_iter()
                    .partition(|(p, _)| *p <= visible);
                inner.deferred = later;
                due.into_iter().map(|(_, key)| key).collect()
            } else {
                Vec::new()
            };
            (visible, due)
        };
        self.visible_tx.send_if_modified(|v| {
            if visible > *v {
                *v = visible;
                true
            } else {
                false
            }
        });
        for key in due {
            self.wake(&key);
        }
        Retired(ticket.position)
    }

    /// Wakes those waiting on `key` for the write that `retired` ended, once it is
    /// visible: woken while an earlier write is still in flight, a sync would read below
    /// it, find nothing, and wait again with the wake-up spent.
    pub fn wake_for(&self, retired: Retired, key: &str) {
        {
            let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            if Self::visible_of(&inner) < retired.0 {
                inner.deferred.push((retired.0, key.to_owned()));
                return;
            }
        }
        self.wake(key);
    }

    fn visible_of(inner: &Inner) -> u64 {
        match inner.in_flight.first() {
            Some(&lowest) => lowest - 1,
            None => inner.last_dispatched,
        }
    }

    /// Registers a waiter under `keys` (room ids, [`user_key`]s).
    pub fn subscribe_keys(self: &Arc<Self>, keys: Vec<String>) -> Subscription {
        let notify = Arc::new(Notify::new());
        let mut registry = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        registry.next_id += 1;
        let id = registry.next_id;
        for key in &keys {
            registry.by_key.entry(key.clone()).or_default().insert(id, notify.clone());
        }
        drop(registry);
        Subscription { stream: self.clone(), id, keys, notify }
    }

    /// Wakes everyone waiting on `key`; call after the change is retired (visible).
    pub fn wake(&self, key: &str) {
        let registry = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(waiters) = registry.by_key.get(key) {
            for notify in waiters.values() {
                notify.notify_one();
            }
        }
    }

    /// Notes that `key` changed at `position`. Call it before retiring the position, so
    /// that a reader who can see the change also sees the note.
    pub fn note_change(&self, key: &str, position: u64) {
        let mut changes = self.changes.lock().unwrap_or_else(|p| p.into_inner());
        if changes.latest.len() >= MAX_NOTED_KEYS && !changes.latest.contains_key(key) {
            // Every position dispatched so far may be unnoted from here on; changes
            // after them all will be noted.
            let dispatched = self.inner.lock().unwrap_or_else(|p| p.into_inner()).last_dispatched;
            changes.from = dispatched;
            changes.latest.clear();
        }
        let latest = changes.latest.entry(key.to_owned()).or_insert(0);
        *latest = (*latest).max(position);
    }

    /// Whether `key` may have changed after `since`: false only when it is known not
    /// to have (every change of it since `from` is noted, and none is later), so a
    /// reader can skip looking.
    pub fn changed_after(&self, key: &str, since: u64) -> bool {
        let changes = self.changes.lock().unwrap_or_else(|p| p.into_inner());
        since < changes.from || changes.latest.get(key).is_some_and(|p| *p > since)
    }

    /// The highest position below which every write has committed.
    pub fn visible(&self) -> u64 {
        *self.visible_tx.borrow()
    }

    /// A receiver that changes whenever the visible position grows. Subscribe first,
    /// then read, then wait: no wake-up falls in between.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.visible_tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_never_see_past_an_in_flight_write() {
        let s = StreamPositions::new(10);
        let a = s.dispatch();
        let b = s.dispatch();
        assert_eq!((a.position, b.position), (11, 12));
        assert_eq!(s.visible(), 10);
        // The later write commits first: still hidden behind the earlier one.
        s.retire(b);
        assert_eq!(s.visible(), 10);
        s.retire(a);
        assert_eq!(s.visible(), 12);
    }

    #[tokio::test]
    async fn subscribers_are_woken_by_retirement() {
        let s = std::sync::Arc::new(StreamPositions::new(0));
        let mut rx = s.subscribe();
        let seen = *rx.borrow_and_update();
        assert_eq!(seen, 0);
        let writer = s.clone();
        tokio::spawn(async move {
            let t = writer.dispatch();
            writer.retire(t);
        });
        rx.changed().await.unwrap();
        assert_eq!(*rx.borrow(), 1);
    }

    #[tokio::test]
    async fn a_wake_up_behind_an_earlier_write_waits_until_it_is_visible() {
        let s = std::sync::Arc::new(StreamPositions::new(0));
        let slow = s.dispatch();
        let fast = s.dispatch();
        let waiting = s.subscribe_keys(vec!["!room".into()]);
        let retired = s.retire(fast);
        s.wake_for(retired, "!room");
        // Position 2 is not visible yet: a reader woken now would not see it.
        let early = tokio::time::timeout(std::time::Duration::from_millis(50), waiting.woken());
        assert!(early.await.is_err());
        s.retire(slow);
        assert_eq!(s.visible(), 2);
        tokio::time::timeout(std::time::Duration::from_secs(1), waiting.woken())
            .await
            .expect("woken once the earlier write retired");
    }

    #[test]
    fn concurrent_dispatch_gives_unique_positions() {
        let s = std::sync::Arc::new(StreamPositions::new(0));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let s = s.clone();
                std::thread::spawn(move || {
                    (0..1000)
                        .map(|_| {
                            let t = s.dispatch();
                            let p = t.position;
                            s.retire(t);
                            p
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all: Vec<u64> = handles.into_iter().flat_map(|h| h.join().unwrap()).collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 4000);
        assert_eq!(s.visible(), 4000);
    }

    #[test]
    fn noted_changes_say_when_nothing_changed() {
        let s = StreamPositions::new(100);
        // Before start-up nothing is noted: it may have changed.
        assert!(s.changed_after("k", 99));
        assert!(!s.changed_after("k", 100));
        let t = s.dispatch();
        s.note_change("k", t.position);
        s.retire(t);
        assert!(s.changed_after("k", 100));
        assert!(!s.changed_after("k", 101));
        assert!(!s.changed_after("other", 100));
    }
}
