//! Where file contents live. Files are named by the hex SHA-256 of their bytes, so one
//! file serves every media item (and thumbnail) with the same content; who uses a file
//! is tracked in the database, and a file goes only when nobody does.

use std::{ops::Range, path::Path, pin::Pin};

use bytes::Bytes;
use futures_util::Stream;
use trellis_core::Result;

/// A file's bytes, read in chunks as the client takes them.
pub type BlobStream = Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>;

#[async_trait::async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// Stores the complete file at `file` under `hash`. The store may move the file away;
    /// storing a hash that is already present is a no-op.
    async fn put_file(&self, hash: &str, file: &Path, len: u64) -> Result<()>;
    /// Stores `file` under `hash` even when the hash is present, atomically for readers
    /// (re-encryption rewrites files in place).
    async fn replace_file(&self, hash: &str, file: &Path, len: u64) -> Result<()>;
    /// Streams `range` (all when `None`) of a stored file.
    async fn open(&self, hash: &str, range: Option<Range<u64>>) -> Result<BlobStream>;
    /// The whole file in memory; callers bound `len` first.
    async fn read(&self, hash: &str) -> Result<Vec<u8>>;
    /// Removes a file; a missing file is not an error.
    async fn delete(&self, hash: &str) -> Result<()>;
    /// Whether a file is stored (for tests and repair tools).
    async fn contains(&self, hash: &str) -> Result<bool>;
    /// The store beneath any encryption: backups copy its bytes as they are, so that a
    /// backup of encrypted media is encrypted too.
    fn raw(&self) -> &dyn BlobStore;
    /// How a stored file is sealed; a store without encryption stores plaintext.
    async fn sealing(&self, _hash: &str) -> Result<super::store_crypt::Sealing> {
        Ok(super::store_crypt::Sealing::Plain)
    }
    /// The id of the key new files are sealed with, when files are encrypted.
    fn current_key(&self) -> Option<[u8; 8]> {
        None
    }
}

/// Hex of a SHA-256 digest.
pub fn hex(digest: &[u8]) -> String {
    use std::fmt::Write;
    digest.iter().fold(String::with_capacity(digest.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Hashes name files on disk and in buckets: only ever our own 64 hex digits.
pub(crate) fn valid_hash(hash: &str) -> bool {
    hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}
