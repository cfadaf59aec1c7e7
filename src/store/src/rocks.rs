//! The RocksDB engine: one column family per catalog table, one shared block cache.

use std::{
    collections::HashSet,
    ops::Bound,
    path::Path,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, DB, DBCompressionType, Options, ReadOptions,
    WriteBatch, WriteOptions,
};
use trellis_core::config::{Compression, StorageConfig};

use crate::{
    Batch, Direction, Engine, KeyRange, KvIter, Op, StoreError, StoreResult, TableDef, TableStat,
    catalog::{self, Access},
};

pub struct RocksEngine {
    db: DB,
    cache: Cache,
    /// Writes go to the WAL without syncing it; durability comes from [`GroupSync`].
    write_opts: WriteOptions,
    sync: Option<GroupSync>,
}

/// Group commit: writers append to the WAL (in the OS at once, so a process crash loses
/// nothing) and then wait until one `fsync` covers their write. Concurrent writers share
/// that `fsync`, so the cost of durability is paid per group, not per write.
struct GroupSync {
    /// Writes completed so far; a write's ticket is this count just after it.
    written: AtomicU64,
    /// Every write with a ticket up to this is synced.
    synced: AtomicU64,
    /// Held by the one writer syncing on behalf of the others.
    lock: Mutex<()>,
}

fn engine_err(e: rocksdb::Error) -> StoreError {
    StoreError::Engine(e.into_string())
}

fn compression(c: Compression) -> DBCompressionType {
    match c {
        Compression::None => DBCompressionType::None,
        Compression::Lz4 => DBCompressionType::Lz4,
        Compression::Zstd => DBCompressionType::Zstd,
    }
}

impl RocksEngine {
    pub fn open(path: &Path, cfg: &StorageConfig) -> StoreResult<Self> {
        let cache = Cache::new_lru_cache(cfg.block_cache_mb as usize * 1024 * 1024);

        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        let cores = std::thread::available_parallelism().map(|n| n.get() as i32).unwrap_or(2);
        db_opts.increase_parallelism(cores);
        db_opts.set_max_background_jobs(cores.clamp(2, 8));
        db_opts.set_max_open_files(cfg.max_open_files);
        db_opts.set_keep_log_file_num(5);
        db_opts.set_max_total_wal_size(256 * 1024 * 1024);
        // All memtables together stay within twice one table's write buffer; the busy
        // tables flush earlier rather than the process growing with the table count.
        db_opts.set_db_write_buffer_size(cfg.write_buffer_mb as usize * 2 * 1024 * 1024);
        // Several column families share one WAL; flushing all of them atomically keeps
        // cross-table batches consistent after recovery.
        db_opts.set_atomic_flush(true);

        let existing: HashSet<String> =
            DB::list_cf(&db_opts, path).map(|v| v.into_iter().collect()).unwrap_or_default();
        let mut descriptors: Vec<ColumnFamilyDescriptor> = catalog::ALL
            .iter()
            .map(|t| ColumnFamilyDescriptor::new(t.name, table_options(t, cfg, &cache)))
            .collect();
        // Tables a newer version created must still be opened, or RocksDB refuses to open.
        for name in &existing {
            if name != "default" && catalog::by_name(name).is_none() {
                descriptors.push(ColumnFamilyDescriptor::new(name, Options::default()));
            }
        }

        let db = DB::open_cf_descriptors(&db_opts, path, descriptors).map_err(engine_err)?;
        let mut write_opts = WriteOptions::default();
        write_opts.set_sync(false);
        let sync = cfg.sync_writes.then(|| GroupSync {
            written: AtomicU64::new(0),
            synced: AtomicU64::new(0),
            lock: Mutex::new(()),
        });
        Ok(Self { db, cache, write_opts, sync })
    }

    fn cf(&self, table: &'static TableDef) -> StoreResult<&rocksdb::ColumnFamily> {
        self.db.cf_handle(table.name).ok_or(StoreError::UnknownTable(table.name))
    }
}

fn table_options(table: &TableDef, cfg: &StorageConfig, cache: &Cache) -> Options {
    let mut block = BlockBasedOptions::default();
    block.set_block_cache(cache);
    block.set_block_size(16 * 1024);
    block.set_cache_index_and_filter_blocks(true);
    block.set_pin_l0_filter_and_index_blocks_in_cache(true);
    block.set_format_version(6);
    if table.access == Access::Point {
        block.set_bloom_filter(10.0, false);
    }

    let mut opts = Options::default();
    opts.set_block_based_table_factory(&block);
    opts.set_write_buffer_size(cfg.write_buffer_mb as usize * 1024 * 1024);
    // A memtable grabs arena blocks of write_buffer/8 by default: with one table per
    // kind of record, dozens of barely used memtables held 4 MB each of resident memory.
    opts.set_arena_block_size(256 * 1024);
    opts.set_compression_type(compression(cfg.compression));
    opts.set_bottommost_compression_type(compression(cfg.bottommost_compression));
    opts.set_level_compaction_dynamic_level_bytes(true);
    opts
}

impl Engine for RocksEngine {
    fn get(&self, table: &'static TableDef, key: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        let cf = self.cf(table)?;
        Ok(self.db.get_pinned_cf(cf, key).map_err(engine_err)?.map(|v| v.to_vec()))
    }

    fn scan<'a>(
        &'a self,
        table: &'static TableDef,
        range: KeyRange,
        direction: Direction,
    ) -> StoreResult<KvIter<'a>> {
        let cf = self.cf(table)?;
        let mut ro = ReadOptions::default();
        match range.start {
            Bound::Included(k) => ro.set_iterate_lower_bound(k),
            Bound::Excluded(mut k) => {
                k.push(0);
                ro.set_iterate_lower_bound(k)
            }
            Bound::Unbounded => {}
        }
        match range.end {
            Bound::Excluded(k) => ro.set_iterate_upper_bound(k),
            Bound::Included(mut k) => {
                k.push(0);
                ro.set_iterate_upper_bound(k)
            }
            Bound::Unbounded => {}
        }
        let mut raw = self.db.raw_iterator_cf_opt(cf, ro);
        match direction {
            Direction::Forward => raw.seek_to_first(),
            Direction::Backward => raw.seek_to_last(),
        }
        Ok(Box::new(RawIter { raw, direction, done: false }))
    }

    fn write(&self, batch: Batch) -> StoreResult<()> {
        let ticket = self.write_unsynced(batch)?;
        self.sync_through(ticket)
    }

    fn write_unsynced(&self, batch: Batch) -> StoreResult<u64> {
        let mut wb = WriteBatch::default();
        for op in batch.ops {
            match op {
                Op::Put { table, key, value } => wb.put_cf(self.cf(table)?, key, value),
                Op::Delete { table, key } => wb.delete_cf(self.cf(table)?, key),
            }
        }
        self.db.write_opt(wb, &self.write_opts).map_err(engine_err)?;
        Ok(self.sync.as_ref().map_or(0, |s| s.written.fetch_add(1, Ordering::AcqRel) + 1))
    }

    fn sync_through(&self, ticket: u64) -> StoreResult<()> {
        let Some(sync) = &self.sync else { return Ok(()) };
        if sync.synced.load(Ordering::Acquire) >= ticket {
            return Ok(());
        }
        let _leader = sync.lock.lock().unwrap_or_else(|p| p.into_inner());
        // Whoever held the lock before may have synced past this write already.
        if sync.synced.load(Ordering::Acquire) >= ticket {
            return Ok(());
        }
        // Every write counted by now is in the WAL, so one sync covers them all.
        let target = sync.written.load(Ordering::Acquire);
        self.db.flush_wal(true).map_err(engine_err)?;
        sync.synced.fetch_max(target, Ordering::AcqRel);
        Ok(())
    }

    fn flush(&self) -> StoreResult<()> {
        self.db.flush_wal(true).map_err(engine_err)?;
        let cfs: Vec<_> = catalog::ALL.iter().filter_map(|t| self.db.cf_handle(t.name)).collect();
        self.db.flush_cfs_opt(&cfs, &rocksdb::FlushOptions::default()).map_err(engine_err)
    }

    fn stats(&self) -> Vec<TableStat> {
        let mut out = Vec::new();
        for table in catalog::ALL {
            let Some(cf) = self.db.cf_handle(table.name) else { continue };
            for (stat, prop) in [
                ("estimated_keys", "rocksdb.estimate-num-keys"),
                ("sst_bytes", "rocksdb.total-sst-files-size"),
                ("memtable_bytes", "rocksdb.cur-size-all-mem-tables"),
            ] {
                if let Ok(Some(v)) = self.db.property_int_value_cf(cf, prop) {
                    out.push(TableStat { table: table.name.into(), stat, value: v as f64 });
                }
            }
        }
        out.push(TableStat {
            table: "_all".into(),
            stat: "block_cache_bytes",
            value: self.cache.get_usage() as f64,
        });
        out
    }
}

struct RawIter<'a> {
    raw: rocksdb::DBRawIteratorWithThreadMode<'a, DB>,
    direction: Direction,
    done: bool,
}

// SAFETY-free note: the raw iterator is Send in rust-rocksdb only when the DB is; a plain
// `DB` (single-threaded column family mode) is Send + Sync, so this holds.
impl Iterator for RawIter<'_> {
    type Item = StoreResult<(Vec<u8>, Vec<u8>)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        if !self.raw.valid() {
            self.done = true;
            return self.raw.status().err().map(|e| Err(engine_err(e)));
        }
        let item = match (self.raw.key(), self.raw.value()) {
            (Some(k), Some(v)) => (k.to_vec(), v.to_vec()),
            _ => {
                self.done = true;
                return None;
            }
        };
        match self.direction {
            Direction::Forward => self.raw.next(),
            Direction::Backward => self.raw.prev(),
        }
        Some(Ok(item))
    }
}
