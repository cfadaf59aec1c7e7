//! The RocksDB engine: the catalog's column families (a table's own, or one shared by
//! tag), one shared block cache.

use std::{
    borrow::Cow,
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
    Batch, Direction, Engine, FamilyStat, KeyRange, KvIter, Op, StoreError, StoreResult, TableDef,
    WriteErrorCounts, WriteFault,
    catalog::{self, Access},
    fault::{FaultCause, WriteHealth},
};

pub struct RocksEngine {
    db: DB,
    cache: Cache,
    /// Writes go to the WAL without syncing it; durability comes from [`GroupSync`].
    write_opts: WriteOptions,
    sync: Option<GroupSync>,
    health: WriteHealth,
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
        let families = catalog::families();
        let mut descriptors: Vec<ColumnFamilyDescriptor> = families
            .iter()
            .map(|(name, access)| {
                ColumnFamilyDescriptor::new(*name, family_options(*access, cfg, &cache))
            })
            .collect();
        // Every existing family must be opened, or RocksDB refuses to open: those a newer
        // version created, and tables of an older layout until they are moved.
        for name in &existing {
            if name != "default" && !families.iter().any(|(f, _)| f == name) {
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
        Ok(Self { db, cache, write_opts, sync, health: WriteHealth::default() })
    }

    /// A failed write: counted, the fault recorded, and a full disk told apart.
    fn write_err(&self, e: rocksdb::Error) -> StoreError {
        let message = e.into_string();
        match self.health.failed(&message) {
            FaultCause::OutOfSpace => StoreError::OutOfSpace(message),
            FaultCause::Io => StoreError::Engine(message),
        }
    }

    /// Passes a write's outcome through the fault tracking.
    fn written<T>(&self, r: Result<T, rocksdb::Error>) -> StoreResult<T> {
        match r {
            Ok(v) => {
                self.health.succeeded();
                Ok(v)
            }
            Err(e) => Err(self.write_err(e)),
        }
    }

    fn cf(&self, table: &'static TableDef) -> StoreResult<&rocksdb::ColumnFamily> {
        self.db.cf_handle(table.family).ok_or(StoreError::UnknownTable(table.name))
    }

    /// Moves the rows of tables that had a column family of their own in an older layout
    /// into their shared family, then drops the old family. Safe to run again after an
    /// interruption: rows are copied as they are, and a family is dropped only once all
    /// of its rows are written and synced.
    pub(crate) fn move_tables_to_shared_families(&mut self) -> StoreResult<()> {
        const BATCH_BYTES: usize = 4 * 1024 * 1024;
        for table in catalog::ALL.iter().copied().filter(|t| t.tag.is_some()) {
            let Some(old) = self.db.cf_handle(table.name) else { continue };
            let mut raw = self.db.raw_iterator_cf(old);
            raw.seek_to_first();
            let (mut batch, mut bytes, mut rows) = (Batch::new(), 0, 0u64);
            while let (Some(k), Some(v)) = (raw.key(), raw.value()) {
                bytes += k.len() + v.len();
                batch.put_raw(table, k.to_vec(), v.to_vec());
                rows += 1;
                if bytes >= BATCH_BYTES {
                    self.write(std::mem::take(&mut batch))?;
                    bytes = 0;
                }
                raw.next();
            }
            raw.status().map_err(engine_err)?;
            drop(raw);
            if !batch.is_empty() {
                self.write(batch)?;
            }
            // The copies must be on disk before the originals go, even without
            // `sync_writes`.
            self.db.flush_wal(true).map_err(engine_err)?;
            self.db.drop_cf(table.name).map_err(engine_err)?;
            tracing::info!(table = table.name, family = table.family, rows, "moved table");
        }
        Ok(())
    }
}

/// Opens the database at `path` read-only (never changing a file) and reads every key of
/// every column family, checksums checked: a check that a copy (a backup) is whole.
/// Answers the schema version and the number of keys.
pub fn verify_read_only(path: &Path) -> StoreResult<(u64, u64)> {
    let opts = Options::default();
    let families = DB::list_cf(&opts, path).map_err(engine_err)?;
    let db = DB::open_cf_for_read_only(&opts, path, &families, false).map_err(engine_err)?;
    let mut keys = 0u64;
    for family in &families {
        let cf = db
            .cf_handle(family)
            .ok_or_else(|| StoreError::Engine(format!("column family {family} did not open")))?;
        let mut read = ReadOptions::default();
        read.set_verify_checksums(true);
        read.fill_cache(false);
        let mut raw = db.raw_iterator_cf_opt(cf, read);
        raw.seek_to_first();
        while raw.valid() {
            keys += 1;
            raw.next();
        }
        raw.status().map_err(engine_err)?;
    }
    let meta = catalog::META.family;
    let cf = db
        .cf_handle(meta)
        .ok_or_else(|| StoreError::Schema("no schema version: not a Trellis database".into()))?;
    let mut raw_key = Vec::new();
    crate::KeyCodec::encode_key(&crate::schema::VERSION_KEY.to_owned(), &mut raw_key, true);
    let key = stored_key(&catalog::META, &raw_key);
    let version = db
        .get_cf(cf, key)
        .map_err(engine_err)?
        .ok_or_else(|| StoreError::Schema("no schema version: not a Trellis database".into()))?;
    let version = <u64 as crate::ValueCodec>::from_value(&version)?;
    Ok((version, keys))
}

/// The key as stored: behind the table's tag in a shared family.
fn stored_key(table: &TableDef, key: &[u8]) -> Vec<u8> {
    match table.tag {
        Some(tag) => {
            let mut k = Vec::with_capacity(key.len() + 1);
            k.push(tag);
            k.extend_from_slice(key);
            k
        }
        None => key.to_vec(),
    }
}

fn stored_key_ref<'k>(table: &TableDef, key: &'k [u8]) -> Cow<'k, [u8]> {
    match table.tag {
        Some(_) => Cow::Owned(stored_key(table, key)),
        None => Cow::Borrowed(key),
    }
}

fn family_options(access: Access, cfg: &StorageConfig, cache: &Cache) -> Options {
    let mut block = BlockBasedOptions::default();
    block.set_block_cache(cache);
    block.set_block_size(16 * 1024);
    block.set_cache_index_and_filter_blocks(true);
    block.set_pin_l0_filter_and_index_blocks_in_cache(true);
    block.set_format_version(6);
    if access == Access::Point {
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
        Ok(self
            .db
            .get_pinned_cf(cf, stored_key_ref(table, key))
            .map_err(engine_err)?
            .map(|v| v.to_vec()))
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
            Bound::Included(k) => ro.set_iterate_lower_bound(stored_key(table, &k)),
            Bound::Excluded(k) => {
                let mut k = stored_key(table, &k);
                k.push(0);
                ro.set_iterate_lower_bound(k)
            }
            Bound::Unbounded => {
                if let Some(tag) = table.tag {
                    ro.set_iterate_lower_bound(vec![tag]);
                }
            }
        }
        match range.end {
            Bound::Excluded(k) => ro.set_iterate_upper_bound(stored_key(table, &k)),
            Bound::Included(k) => {
                let mut k = stored_key(table, &k);
                k.push(0);
                ro.set_iterate_upper_bound(k)
            }
            Bound::Unbounded => {
                // The catalog keeps tags below 255, so `tag + 1` exists.
                if let Some(tag) = table.tag {
                    ro.set_iterate_upper_bound(vec![tag + 1]);
                }
            }
        }
        let mut raw = self.db.raw_iterator_cf_opt(cf, ro);
        match direction {
            Direction::Forward => raw.seek_to_first(),
            Direction::Backward => raw.seek_to_last(),
        }
        let skip = usize::from(table.tag.is_some());
        Ok(Box::new(RawIter { raw, direction, skip, done: false }))
    }

    fn write(&self, batch: Batch) -> StoreResult<()> {
        let ticket = self.write_unsynced(batch)?;
        self.sync_through(ticket)
    }

    fn write_unsynced(&self, batch: Batch) -> StoreResult<u64> {
        let mut wb = WriteBatch::default();
        for op in batch.ops {
            match op {
                Op::Put { table, key, value } => {
                    wb.put_cf(self.cf(table)?, stored_key_ref(table, &key), value)
                }
                Op::Delete { table, key } => {
                    wb.delete_cf(self.cf(table)?, stored_key_ref(table, &key))
                }
            }
        }
        self.written(self.db.write_opt(wb, &self.write_opts))?;
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
        self.written(self.db.flush_wal(true))?;
        sync.synced.fetch_max(target, Ordering::AcqRel);
        Ok(())
    }

    fn flush(&self) -> StoreResult<()> {
        self.db.flush_wal(true).map_err(engine_err)?;
        let cfs: Vec<_> =
            catalog::families().iter().filter_map(|(f, _)| self.db.cf_handle(f)).collect();
        self.db.flush_cfs_opt(&cfs, &rocksdb::FlushOptions::default()).map_err(engine_err)
    }

    fn compact(&self, table: &'static TableDef, ranges: &[(Vec<u8>, Vec<u8>)]) -> StoreResult<()> {
        // After a flush of every family the log files holding the old values are
        // obsolete, and RocksDB deletes them.
        self.flush()?;
        let mut options = rocksdb::CompactOptions::default();
        options.set_bottommost_level_compaction(rocksdb::BottommostLevelCompaction::Force);
        for (start, end) in ranges {
            let (start, end) = (stored_key(table, start), stored_key(table, end));
            self.db.compact_range_cf_opt(self.cf(table)?, Some(start), Some(end), &options);
        }
        Ok(())
    }

    fn checkpoint(&self, dir: &Path) -> StoreResult<()> {
        let checkpoint = rocksdb::checkpoint::Checkpoint::new(&self.db).map_err(engine_err)?;
        checkpoint.create_checkpoint(dir).map_err(engine_err)
    }

    fn stats(&self) -> Vec<FamilyStat> {
        let mut out = Vec::new();
        // Per column family: a shared family's tables are not told apart by RocksDB.
        for (family, _) in catalog::families() {
            let Some(cf) = self.db.cf_handle(family) else { continue };
            for (stat, prop) in [
                ("estimated_keys", "rocksdb.estimate-num-keys"),
                ("sst_bytes", "rocksdb.total-sst-files-size"),
                ("memtable_bytes", "rocksdb.cur-size-all-mem-tables"),
            ] {
                if let Ok(Some(v)) = self.db.property_int_value_cf(cf, prop) {
                    out.push(FamilyStat { family: family.into(), stat, value: v as f64 });
                }
            }
        }
        out.push(FamilyStat {
            family: "_all".into(),
            stat: "block_cache_bytes",
            value: self.cache.get_usage() as f64,
        });
        out
    }

    fn write_fault(&self) -> Option<WriteFault> {
        self.health.fault()
    }

    fn write_errors(&self) -> WriteErrorCounts {
        self.health.counts()
    }

    fn probe_write(&self) -> StoreResult<()> {
        // RocksDB answers even an empty batch with its background error while stopped.
        self.written(self.db.write_opt(WriteBatch::default(), &self.write_opts))
    }
}

struct RawIter<'a> {
    raw: rocksdb::DBRawIteratorWithThreadMode<'a, DB>,
    direction: Direction,
    /// Bytes of tag before each stored key.
    skip: usize,
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
            (Some(k), Some(v)) if k.len() >= self.skip => (k[self.skip..].to_vec(), v.to_vec()),
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
