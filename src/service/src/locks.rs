//! Serialising one user's read-modify-write changes without a lock table that grows:
//! a fixed set of async mutexes, the user's by a hash of their localpart. Users rarely
//! share a stripe, and one that does only waits a little longer.

use std::hash::{DefaultHasher, Hash, Hasher};

use tokio::sync::{Mutex, MutexGuard};

const STRIPES: usize = 64;

pub struct UserLocks(Vec<Mutex<()>>);

impl Default for UserLocks {
    fn default() -> Self {
        Self((0..STRIPES).map(|_| Mutex::new(())).collect())
    }
}

impl UserLocks {
    /// Waits for `localpart`'s turn; the turn lasts as long as the guard.
    pub async fn lock(&self, localpart: &str) -> MutexGuard<'_, ()> {
        let mut h = DefaultHasher::new();
        localpart.hash(&mut h);
        self.0[(h.finish() as usize) % STRIPES].lock().await
    }
}
