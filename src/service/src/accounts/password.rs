//! Password hashing with argon2id, on a dedicated pool of low-priority threads.
//!
//! argon2 is deliberately expensive in CPU and memory. Running it on tokio's blocking
//! pool lets a login storm start dozens of hashes at once (each holding its memory cost)
//! and compete with request handling for the cores. A fixed pool bounds both: at most
//! one hash per thread is in memory, and the threads run at a lower scheduling priority,
//! so light requests stay fast while logins use the remaining CPU.
//!
//! Each thread keeps its argon2 memory (19 MiB by default) from one hash to the next.
//! Allocating it per hash made the server's RSS climb by about that much per hash up to
//! ~400 MB: glibc raises its mmap threshold after the first large block is freed, serves
//! later ones from the thread's heap and keeps what they free (docs/performance.md).
//! A thread idle for [`RELEASE_AFTER`] gives the memory's pages back to the kernel (the
//! allocation stays, so the next hash faults them in again instead of growing a heap).

use std::{
    cell::RefCell,
    sync::{Mutex, mpsc},
    time::Duration,
};

use argon2::{
    Algorithm, Argon2, Block, Params, Version,
    password_hash::{Output, ParamsString, PasswordHash, Salt, SaltString},
};
use trellis_core::{Error, Result};

/// The largest argon2 memory a thread keeps for reuse (256 MiB); a hash with a larger
/// memory cost allocates its own and frees it.
const MAX_KEPT_BLOCKS: usize = 256 * 1024;

/// How long a hashing thread waits for work before releasing its memory's pages: long
/// enough to keep them through a burst of logins, short enough that a few registrations
/// do not leave the server holding 19 MiB per thread.
const RELEASE_AFTER: Duration = Duration::from_secs(2);

thread_local! {
    static MEMORY: RefCell<Vec<Block>> = const { RefCell::new(Vec::new()) };
}

/// Hands the pages of this thread's argon2 memory back to the kernel. Their contents
/// read as zeros afterwards, which is fine: argon2 writes every block before reading it.
#[cfg(target_os = "linux")]
fn release_memory() {
    MEMORY.with(|memory| {
        let mut memory = memory.borrow_mut();
        let bytes = std::mem::size_of_val(&memory[..]);
        let start = memory.as_mut_ptr() as usize;
        // Whole pages inside the buffer only: the allocator's bookkeeping around it stays.
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let Ok(page) = usize::try_from(page) else { return };
        if page == 0 {
            return;
        }
        let (lo, hi) = (start.next_multiple_of(page), (start + bytes) / page * page);
        if hi > lo {
            // SAFETY: [lo, hi) lies within the buffer this thread owns exclusively (the
            // RefCell is borrowed mutably), and zeroed pages are valid `Block`s.
            unsafe { libc::madvise(lo as *mut libc::c_void, hi - lo, libc::MADV_DONTNEED) };
        }
    });
}

#[cfg(not(target_os = "linux"))]
fn release_memory() {}

/// Runs `f` with `blocks` blocks of this thread's reusable argon2 memory.
fn with_memory<T>(blocks: usize, f: impl FnOnce(&mut [Block]) -> T) -> T {
    if blocks > MAX_KEPT_BLOCKS {
        return f(&mut vec![Block::default(); blocks]);
    }
    MEMORY.with(|memory| {
        let mut memory = memory.borrow_mut();
        if memory.len() < blocks {
            memory.resize(blocks, Block::default());
        }
        f(&mut memory[..blocks])
    })
}

/// Hashes `password` as `PasswordHasher::hash_password` does (same PHC string), in this
/// thread's reusable memory.
fn hash_with<'a>(
    algorithm: Algorithm,
    version: Version,
    params: Params,
    password: &[u8],
    salt: Salt<'a>,
) -> argon2::password_hash::Result<PasswordHash<'a>> {
    let mut salt_buf = [0u8; 64];
    let salt_bytes = salt.decode_b64(&mut salt_buf)?;
    let output_len = params.output_len().unwrap_or(Params::DEFAULT_OUTPUT_LEN);
    let params_string = ParamsString::try_from(&params)?;
    let blocks = params.block_count();
    let argon2 = Argon2::new(algorithm, version, params);
    let output = Output::init_with(output_len, |out| {
        with_memory(blocks, |memory| {
            argon2.hash_password_into_with_memory(password, salt_bytes, out, memory)
        })
        .map_err(Into::into)
    })?;
    Ok(PasswordHash {
        algorithm: algorithm.ident(),
        version: Some(version.into()),
        params: params_string,
        salt: Some(salt),
        hash: Some(output),
    })
}

pub fn hash(password: &str, memory_kib: u32, iterations: u32) -> Result<String> {
    let params = Params::new(memory_kib, iterations, 1, None)
        .map_err(|e| Error::internal("argon2 parameters", e))?;
    let salt = SaltString::encode_b64(&crate::random::bytes::<16>())
        .map_err(|e| Error::internal("argon2 salt", e))?;
    hash_with(Algorithm::Argon2id, Version::V0x13, params, password.as_bytes(), salt.as_salt())
        .map(|h| h.to_string())
        .map_err(|e| Error::internal("argon2 hashing", e))
}

/// Checks a password against a stored PHC string; the parameters come from the string,
/// so hashes made under older settings still verify.
pub fn verify(password: &str, phc: &str) -> bool {
    let Ok(stored) = PasswordHash::new(phc) else { return false };
    let (Some(salt), Some(expected)) = (stored.salt, &stored.hash) else { return false };
    let algorithm = Algorithm::try_from(stored.algorithm);
    let version = stored.version.map_or(Ok(Version::default()), Version::try_from);
    let params = Params::try_from(&stored);
    let (Ok(algorithm), Ok(version), Ok(params)) = (algorithm, version, params) else {
        return false;
    };
    // `Output`'s equality is constant-time.
    hash_with(algorithm, version, params, password.as_bytes(), salt)
        .is_ok_and(|computed| computed.hash.as_ref() == Some(expected))
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
                    // The thread waiting for work holds the receiver's lock, so every wait
                    // is bounded: the others queue on the lock and must get their turn to
                    // release their memory.
                    let mut holding = false;
                    loop {
                        let job = match rx.lock() {
                            Ok(guard) => guard.recv_timeout(RELEASE_AFTER),
                            Err(_) => return,
                        };
                        match job {
                            Ok(job) => {
                                job();
                                holding = true;
                            }
                            Err(mpsc::RecvTimeoutError::Timeout) if holding => {
                                release_memory();
                                holding = false;
                            }
                            Err(mpsc::RecvTimeoutError::Timeout) => {}
                            Err(mpsc::RecvTimeoutError::Disconnected) => return,
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
    fn phc_strings_match_the_crates_own_and_verify_both_ways() {
        use argon2::password_hash::{PasswordHasher, PasswordVerifier};
        let salt = SaltString::encode_b64(b"sixteen byte slt").unwrap();
        let params = Params::new(256, 2, 1, None).unwrap();
        let reference = Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone())
            .hash_password(b"pw", &salt)
            .unwrap()
            .to_string();
        let ours = hash_with(Algorithm::Argon2id, Version::V0x13, params, b"pw", salt.as_salt())
            .unwrap()
            .to_string();
        assert_eq!(ours, reference);
        // A hash made with other parameters (and the crate's own allocation) verifies here,
        // and one made here verifies with the crate; the reused memory grows as needed.
        let bigger = Params::new(1024, 1, 1, None).unwrap();
        let other = Argon2::new(Algorithm::Argon2id, Version::V0x13, bigger)
            .hash_password(b"pw", &salt)
            .unwrap()
            .to_string();
        assert!(verify("pw", &other) && !verify("pW", &other));
        let mine = hash("pw", 128, 1).unwrap();
        let parsed = PasswordHash::new(&mine).unwrap();
        assert!(Argon2::default().verify_password(b"pw", &parsed).is_ok());
    }

    #[test]
    fn hashes_after_the_memory_was_released_are_unchanged() {
        let salt = SaltString::encode_b64(b"sixteen byte slt").unwrap();
        let params = Params::new(4096, 1, 1, None).unwrap();
        let hash_here = || {
            hash_with(Algorithm::Argon2id, Version::V0x13, params.clone(), b"pw", salt.as_salt())
                .unwrap()
                .to_string()
        };
        let before = hash_here();
        release_memory();
        assert_eq!(hash_here(), before);
    }

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
