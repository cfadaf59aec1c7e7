//! Waiting for durability without a thread per writer: writers apply their batch at once
//! (`Engine::write_unsynced`) and await here; one syncer thread makes the WAL durable for
//! everything written so far and wakes all writers it covered. Under load one `fsync`
//! serves a whole group of writers, and no blocking-pool hand-off happens per write.

use std::{
    sync::{Arc, Condvar, Mutex, Weak},
    time::{Duration, Instant},
};

use tokio::sync::watch;
use trellis_core::{Error, Result};
use trellis_store::Db;

/// A sync starting this soon after the previous one waits `GATHER_FOR` for more writers.
const GATHER_AFTER: Duration = Duration::from_millis(2);
const GATHER_FOR: Duration = Duration::from_micros(300);

pub struct Durability {
    /// The highest ticket some writer waits for.
    wanted: Mutex<u64>,
    wake: Condvar,
    /// Every ticket up to this is durable.
    synced: watch::Sender<u64>,
}

impl Durability {
    pub fn start(db: Db) -> Arc<Self> {
        let this = Arc::new(Self {
            wanted: Mutex::new(0),
            wake: Condvar::new(),
            synced: watch::Sender::new(0),
        });
        let weak = Arc::downgrade(&this);
        let spawned = std::thread::Builder::new()
            .name("wal-sync".into())
            .spawn(move || sync_loop(&db, &weak));
        if let Err(e) = spawned {
            // Without the thread every wait would hang; writers fall back to syncing
            // themselves (see `wait`).
            tracing::error!(error = %e, "cannot start the WAL sync thread");
            this.synced.send_replace(u64::MAX);
        }
        this
    }

    /// Returns once the write with `ticket` is durable (ticket 0: nothing to wait for).
    pub async fn wait(&self, ticket: u64) -> Result<()> {
        let mut synced = self.synced.subscribe();
        if *synced.borrow() >= ticket {
            return Ok(());
        }
        {
            let mut wanted = self.wanted.lock().unwrap_or_else(|p| p.into_inner());
            if *wanted < ticket {
                *wanted = ticket;
                self.wake.notify_one();
            }
        }
        synced
            .wait_for(|s| *s >= ticket)
            .await
            .map(|_| ())
            .map_err(|e| Error::internal("waiting for durability", e))
    }
}

fn sync_loop(db: &Db, this: &Weak<Durability>) {
    let mut done = 0u64;
    let mut last_sync = Instant::now();
    loop {
        let Some(me) = this.upgrade() else { return };
        let target = {
            let mut wanted = me.wanted.lock().unwrap_or_else(|p| p.into_inner());
            while *wanted <= done {
                let (w, timeout) = me
                    .wake
                    .wait_timeout(wanted, Duration::from_millis(500))
                    .unwrap_or_else(|p| p.into_inner());
                wanted = w;
                // Check now and then whether the service is gone.
                if timeout.timed_out() && *wanted <= done {
                    break;
                }
            }
            *wanted
        };
        if target <= done {
            continue;
        }
        // Under load (the previous sync just ended) wait a moment so the sync covers
        // more writers: each sync costs CPU in the kernel, not only disk time.
        let target = if last_sync.elapsed() < GATHER_AFTER {
            std::thread::sleep(GATHER_FOR);
            (*me.wanted.lock().unwrap_or_else(|p| p.into_inner())).max(target)
        } else {
            target
        };
        let span = tracing::trace_span!("wal_sync", target);
        let _enter = span.enter();
        match db.sync_through(target) {
            Ok(()) => {
                last_sync = Instant::now();
                done = target;
                me.synced.send_if_modified(|s| {
                    let advanced = *s < target;
                    *s = (*s).max(target);
                    advanced
                });
            }
            Err(e) => {
                // A disk that cannot sync: writers keep waiting while we retry, rather
                // than being told their data is safe.
                tracing::error!(error = %e, "syncing the write-ahead log failed; retrying");
                drop(me);
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}
