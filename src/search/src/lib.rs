//! Full-text search of room messages. The index is derived data: the rooms in RocksDB
//! are the truth, and an index that is lost, corrupt or of an older format is rebuilt
//! from them. This crate knows nothing of rooms or users; the service decides what is
//! indexed and who may see a hit.

pub mod analysis;
pub mod index;

pub use analysis::Language;
pub use index::{CatchUp, Entry, Has, Hit, Key, OrderBy, Page, Progress, Query, SearchIndex};

#[cfg(test)]
mod tests;
