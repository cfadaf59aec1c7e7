//! Password hashing with argon2id, on a dedicated pool of low-priority threads.
//!
//! argon2 is deliberately expensive in CPU and memory. Running it on tokio's blocking
//! pool lets a login storm start dozens of hashes at once (each holding its memory cost)
//! and compete with request handling for the cores. A fixed pool bounds both: at most
//! one hash per thread is in memory, and the threads run at a lower scheduling priority,
//! so light requests stay fast while logins use the remaining CPU.

use std::sync::{Mutex, mpsc};

use argon2::{
    Algorithm, Argon2, Params, Version,
    password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString},
};
use trellis_core::{Error, Result};

pub fn hash(password: &str, memory_kib: u32, iterations: u32) -> Result<String> {
    let params = Params::new(memory_kib, iterations, 1, None)
        .map_err(|e| Error::internal("argon2 parameters", e))?;
    let salt = SaltString::encode_b64(&crate::random::bytes::<16>())
        .map_err(|e| Error::internal("argon2 salt", e))?;
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| Error::internal("argon2 hashing", e))
}

/// Checks a password against a stored PHC string; the parameters come from the string,
/// so hashes made under older settings still verify.
pub fn verify(password: &str, phc: &str) -> bool {
    PasswordHash::new(phc)
        .map(|parsed| Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok())
        .unwrap_or(false)
}

type Job = Box<dyn FnOnce() + Send>;

/// Jobs that may wait for a hashing thread; beyond this, callers get 429.
const MAX_QUEUED: usize = 4096;
/// Scheduling niceness of hashing threads (0 is normal, 19 the lowest).
const NICENESS: i32 = 10;

pub struct HashPool {
    tx: mpsc::SyncSender<Job>,
}

impl HashPool {
    /// `threads == 0` means one per CPU core.
    pub fn new(threads: usize) -> Self {
        let threads = if threads == 0 {
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2)
        } else {
            threads
        };
        let (tx, rx) = mpsc::sync_channel::<Job>(MAX_QUEUED);
        let rx = std::sync::Arc::new(Mutex::new(rx));
        for i in 0..threads {
            let rx = rx.clone();
            let spawned =
                std::thread::Builder::new().name(format!("argon2-{i}")).spawn(move || {
                    lower_priority();
                    loop {
                        let job = match rx.lock() {
                            Ok(guard) => guard.recv(),
                            Err(_) => return,
                        };
                        match job {
                            Ok(job) => job(),
                            Err(_) => return,
                        }
                    }
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a password hashing thread");
            }
        }
        Self { tx }
    }

    /// Runs `f` on a hashing thread.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T> {
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = done_tx.send(f());
        });
        self.tx.try_send(job).map_err(|e| match e {
            mpsc::TrySendError::Full(_) => Error::limit_exceeded(1000),
            mpsc::TrySendError::Disconnected(_) => {
                Error::internal("password hashing pool", "stopped")
            }
        })?;
        done_rx.await.map_err(|e| Error::internal("password hashing pool", e))
    }
}

#[cfg(target_os = "linux")]
fn lower_priority() {
    // On Linux, PRIO_PROCESS with id 0 applies to the calling thread only.
    // SAFETY: setpriority has no memory-safety preconditions.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, NICENESS) };
    if rc != 0 {
        tracing::debug!("could not lower the priority of a hashing thread");
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_priority() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_then_verify() {
        let h = hash("correct horse", 64, 1).unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify("correct horse", &h));
        assert!(!verify("wrong", &h));
        assert!(!verify("x", "not a hash"));
    }

    #[tokio::test]
    async fn pool_runs_jobs() {
        let pool = HashPool::new(2);
        let h = pool.run(|| hash("pw", 64, 1)).await.unwrap().unwrap();
        assert!(pool.run(move || verify("pw", &h)).await.unwrap());
    }
}
