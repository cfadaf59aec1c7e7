//! The storage engine: a small ordered key-value trait, typed tables over it, and the
//! RocksDB implementation. Nothing here knows Matrix; tables are bytes in key order.

pub mod catalog;
pub mod codec;
mod fault;
mod rocks;
mod schema;
mod table;

use std::{ops::Bound, sync::Arc};

pub use catalog::TableDef;
pub use codec::{Json, KeyCodec, ValueCodec};
pub use fault::{FaultCause, WriteErrorCounts, WriteFault};
pub use rocks::{RocksEngine, verify_read_only};
pub use schema::{SCHEMA_VERSION, open};
pub use table::Table;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage engine: {0}")]
    Engine(String),
    /// A write failed because the disk is full.
    #[error("storage engine out of space: {0}")]
    OutOfSpace(String),
    #[error("codec: {0}")]
    Codec(String),
    #[error("schema: {0}")]
    Schema(String),
    #[error("unknown table {0}")]
    UnknownTable(&'static str),
}

impl From<StoreError> for trellis_core::Error {
    fn from(e: StoreError) -> Self {
        match e {
            // Logged once per run of failures where the engine sees it, not per request.
            StoreError::OutOfSpace(_) => trellis_core::Error::out_of_space(),
            e => trellis_core::Error::internal("storage failure", e),
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Forward,
    Backward,
}

/// A range of raw keys; the start bound is the low end whatever the direction.
#[derive(Debug, Clone)]
pub struct KeyRange {
    pub start: Bound<Vec<u8>>,
    pub end: Bound<Vec<u8>>,
}

impl KeyRange {
    pub fn all() -> Self {
        Self { start: Bound::Unbounded, end: Bound::Unbounded }
    }

    /// Every key that starts with `prefix`.
    pub fn prefix(prefix: Vec<u8>) -> Self {
        let end = match prefix_successor(&prefix) {
            Some(s) => Bound::Excluded(s),
            None => Bound::Unbounded,
        };
        Self { start: Bound::Included(prefix), end }
    }
}

/// The smallest key greater than every key with this prefix, if any.
fn prefix_successor(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut s = prefix.to_vec();
    while let Some(last) = s.pop() {
        if last < 0xFF {
            s.push(last + 1);
            return Some(s);
        }
    }
    None
}

#[derive(Debug, Clone)]
pub enum Op {
    Put { table: &'static TableDef, key: Vec<u8>, value: Vec<u8> },
    Delete { table: &'static TableDef, key: Vec<u8> },
}

/// One logical change: applied atomically, all or nothing.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub ops: Vec<Op>,
}

impl Batch {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn put_raw(&mut self, table: &'static TableDef, key: Vec<u8>, value: Vec<u8>) {
        self.ops.push(Op::Put { table, key, value });
    }
    pub fn delete_raw(&mut self, table: &'static TableDef, key: Vec<u8>) {
        self.ops.push(Op::Delete { table, key });
    }
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

pub type KvIter<'a> = Box<dyn Iterator<Item = StoreResult<(Vec<u8>, Vec<u8>)>> + Send + 'a>;

/// One statistic of one column family (tables sharing a family are counted together),
/// for `/metrics`.
#[derive(Debug, Clone)]
pub struct FamilyStat {
    pub family: String,
    pub stat: &'static str,
    pub value: f64,
}

/// The ordered key-value engine every service writes through. Implementations must make
/// `write` atomic and, once it returns, durable across a process crash.
pub trait Engine: Send + Sync + 'static {
    fn get(&self, table: &'static TableDef, key: &[u8]) -> StoreResult<Option<Vec<u8>>>;
    fn scan<'a>(
        &'a self,
        table: &'static TableDef,
        range: KeyRange,
        direction: Direction,
    ) -> StoreResult<KvIter<'a>>;
    fn write(&self, batch: Batch) -> StoreResult<()>;
    /// Applies `batch` atomically and makes it visible to readers, surviving a process
    /// crash but not yet a power loss; returns the ticket to pass to `sync_through`.
    fn write_unsynced(&self, batch: Batch) -> StoreResult<u64>;
    /// Returns once the write with `ticket` (and every earlier one) is durable.
    fn sync_through(&self, ticket: u64) -> StoreResult<()>;
    /// Persists memtables and the WAL; called on shutdown.
    fn flush(&self) -> StoreResult<()>;
    fn stats(&self) -> Vec<FamilyStat>;
    /// Why writes are failing, or `None` when the last write went through.
    fn write_fault(&self) -> Option<WriteFault>;
    /// Write failures so far, by cause.
    fn write_errors(&self) -> WriteErrorCounts;
    /// Whether a write would go through now (an empty write: nothing is stored); ends a
    /// fault once the engine has recovered, even when nothing else writes.
    fn probe_write(&self) -> StoreResult<()>;
    /// Writes a consistent copy of the database into `dir` (which must not exist): every
    /// write made before the call, none after. Table files are hard-linked where `dir` is
    /// on the same file system, so this is quick and takes little space.
    fn checkpoint(&self, dir: &std::path::Path) -> StoreResult<()>;
    /// Writes memtables out, then rewrites `table`'s keys in each `(start, end)` range
    /// (both included) down to the last level, so that values deleted or overwritten
    /// there leave the disk (expired messages), the write-ahead log holding them included.
    fn compact(&self, table: &'static TableDef, ranges: &[(Vec<u8>, Vec<u8>)]) -> StoreResult<()>;

    fn put(&self, table: &'static TableDef, key: &[u8], value: &[u8]) -> StoreResult<()> {
        let mut b = Batch::new();
        b.put_raw(table, key.to_vec(), value.to_vec());
        self.write(b)
    }
    fn delete(&self, table: &'static TableDef, key: &[u8]) -> StoreResult<()> {
        let mut b = Batch::new();
        b.delete_raw(table, key.to_vec());
        self.write(b)
    }
}

pub type Db = Arc<dyn Engine>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn successor_of_prefix() {
        assert_eq!(prefix_successor(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_successor(&[1, 0xFF]), Some(vec![2]));
        assert_eq!(prefix_successor(&[0xFF, 0xFF]), None);
        assert_eq!(prefix_successor(&[]), None);
    }
}
