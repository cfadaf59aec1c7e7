//! Whether writes are going through, and why not when they are not. RocksDB stops taking
//! writes after a write-ahead-log or flush error and resumes by itself (for a full disk,
//! once its space manager sees enough free space); this keeps what the server tells
//! clients, `/health` and the metrics in step with that.

use std::{
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::SystemTime,
};

/// Why writes fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultCause {
    /// The disk holding the database is full.
    OutOfSpace,
    /// Any other write error.
    Io,
}

impl FaultCause {
    /// The label used in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OutOfSpace => "out_of_space",
            Self::Io => "io",
        }
    }

    /// Classifies an engine error message. RocksDB spells a full disk as an IO error with
    /// the `NoSpace` subcode, whose message carries the OS's "No space left on device".
    pub fn of_message(message: &str) -> Self {
        if message.contains("No space left on device")
            || message.contains("NoSpace")
            || message.contains("Max allowed space was reached")
        {
            Self::OutOfSpace
        } else {
            Self::Io
        }
    }
}

/// The current write failure.
#[derive(Debug, Clone)]
pub struct WriteFault {
    pub cause: FaultCause,
    /// The engine's own message (it names files, so it is for logs and operators only).
    pub message: String,
    pub since: SystemTime,
}

/// Write failures seen so far, by cause, for `/metrics`.
#[derive(Debug, Clone, Copy, Default)]
pub struct WriteErrorCounts {
    pub out_of_space: u64,
    pub io: u64,
}

#[derive(Default)]
pub(crate) struct WriteHealth {
    faulted: AtomicBool,
    fault: Mutex<Option<WriteFault>>,
    out_of_space: AtomicU64,
    io: AtomicU64,
}

impl WriteHealth {
    /// Records a failed write; the first failure of a run is logged at error level.
    pub(crate) fn failed(&self, message: &str) -> FaultCause {
        let cause = FaultCause::of_message(message);
        match cause {
            FaultCause::OutOfSpace => self.out_of_space.fetch_add(1, Ordering::Relaxed),
            FaultCause::Io => self.io.fetch_add(1, Ordering::Relaxed),
        };
        let mut fault = self.fault.lock().unwrap_or_else(|p| p.into_inner());
        if fault.is_none() {
            match cause {
                FaultCause::OutOfSpace => tracing::error!(
                    error = message,
                    "storage is out of disk space: writes are refused until space is freed"
                ),
                FaultCause::Io => {
                    tracing::error!(error = message, "storage writes are failing")
                }
            }
            *fault =
                Some(WriteFault { cause, message: message.to_owned(), since: SystemTime::now() });
            self.faulted.store(true, Ordering::Release);
        }
        cause
    }

    /// Records a write that went through, ending a fault if there was one.
    pub(crate) fn succeeded(&self) {
        if !self.faulted.load(Ordering::Acquire) {
            return;
        }
        let mut fault = self.fault.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = fault.take() {
            let secs = f.since.elapsed().map(|d| d.as_secs()).unwrap_or(0);
            tracing::info!(
                cause = f.cause.as_str(),
                after_seconds = secs,
                "storage writes resumed"
            );
        }
        self.faulted.store(false, Ordering::Release);
    }

    pub(crate) fn fault(&self) -> Option<WriteFault> {
        if !self.faulted.load(Ordering::Acquire) {
            return None;
        }
        self.fault.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn counts(&self) -> WriteErrorCounts {
        WriteErrorCounts {
            out_of_space: self.out_of_space.load(Ordering::Relaxed),
            io: self.io.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_rocksdb_messages() {
        let full = "IO error: No space left on device: While appending to file: \
                    /data/db/000004.log: No space left on device";
        assert_eq!(FaultCause::of_message(full), FaultCause::OutOfSpace);
        assert_eq!(FaultCause::of_message("IO error: Writer has previous error."), FaultCause::Io);
    }

    #[test]
    fn a_fault_lasts_until_a_write_succeeds() {
        let h = WriteHealth::default();
        assert!(h.fault().is_none());
        h.failed("IO error: No space left on device");
        h.failed("IO error: No space left on device");
        let fault = h.fault().expect("faulted");
        assert_eq!(fault.cause, FaultCause::OutOfSpace);
        assert_eq!(h.counts().out_of_space, 2);
        h.succeeded();
        assert!(h.fault().is_none());
        assert_eq!(h.counts().out_of_space, 2, "counts are totals, not the current run");
    }
}
