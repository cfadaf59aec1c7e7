//! Shared foundations: configuration, the error type, metrics and small helpers.

pub mod config;
pub mod error;
pub mod metrics;

pub use config::Config;
pub use error::{Error, ErrorKind, Result};

/// Milliseconds since the Unix epoch, as Matrix timestamps are expressed.
pub fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The version reported by `--version`, the key server and `/federation/v1/version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
