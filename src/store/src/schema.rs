//! Opening the store: the schema version kept in the database and the migrations that
//! bring an older database up to it.

use std::{path::Path, sync::Arc};

use trellis_core::config::StorageConfig;

use crate::{Batch, Db, Engine, RocksEngine, StoreError, StoreResult, Table, catalog};

/// The layout this binary reads and writes. Bump it together with a migration.
pub const SCHEMA_VERSION: u64 = 3;

// `meta` keeps a column family of its own in every layout, so that an older binary finds
// the version where it looks and refuses a newer database.
const META: Table<String, u64> = Table::new(&catalog::META);
pub(crate) const VERSION_KEY: &str = "schema_version";

/// A migration from `version - 1` to `version`, run inside `open` before serving.
struct Migration {
    version: u64,
    run: fn(&mut RocksEngine) -> StoreResult<()>,
}

/// Version 1 is the first layout; later versions append here.
const MIGRATIONS: &[Migration] = &[
    // Small tables share two column families, told apart by a key tag.
    Migration { version: 2, run: RocksEngine::move_tables_to_shared_families },
    // One-time keys are claimed in upload order.
    Migration { version: 3, run: order_one_time_keys },
];

/// Gives every stored one-time key a place in `one_time_key_order`. Their upload order
/// was not kept, so the keys of each device take the order of their key ids (the order
/// claims used before).
fn order_one_time_keys(db: &mut RocksEngine) -> StoreResult<()> {
    type KeyRow = (String, String, String, String);
    let keys: Table<KeyRow, Vec<u8>> = Table::new(&catalog::ONE_TIME_KEYS);
    let order: Table<(String, String, String, u64), String> =
        Table::new(&catalog::ONE_TIME_KEY_ORDER);
    let mut batch = Batch::new();
    let mut last: Option<(String, String, String)> = None;
    let mut seq = 0;
    for row in keys.scan_prefix(&*db, &(), crate::Direction::Forward)? {
        let ((localpart, device, alg, key_id), _) = row?;
        let prefix = (localpart, device, alg);
        seq = if last.as_ref() == Some(&prefix) { seq + 1 } else { 0 };
        order.put(
            &mut batch,
            &(prefix.0.clone(), prefix.1.clone(), prefix.2.clone(), seq),
            &key_id,
        );
        last = Some(prefix);
    }
    db.write(batch)
}

/// Opens (creating if needed) the RocksDB store at `path` and migrates it.
pub fn open(path: &Path, cfg: &StorageConfig) -> StoreResult<Db> {
    std::fs::create_dir_all(path)
        .map_err(|e| StoreError::Engine(format!("cannot create {}: {e}", path.display())))?;
    let mut engine = RocksEngine::open(path, cfg)?;
    migrate(&mut engine, MIGRATIONS)?;
    Ok(Arc::new(engine))
}

fn migrate(db: &mut RocksEngine, migrations: &[Migration]) -> StoreResult<()> {
    let key = VERSION_KEY.to_string();
    let found = META.get(&*db, &key)?;
    let Some(mut current) = found else {
        // A fresh database starts at the current layout.
        let mut b = Batch::new();
        META.put(&mut b, &key, &SCHEMA_VERSION);
        return db.write(b);
    };
    if current > SCHEMA_VERSION {
        return Err(StoreError::Schema(format!(
            "database schema version {current} is newer than this binary's {SCHEMA_VERSION}; \
             refusing to open it (downgrades are not supported)"
        )));
    }
    while current < SCHEMA_VERSION {
        let next = current + 1;
        let step = migrations
            .iter()
            .find(|m| m.version == next)
            .ok_or_else(|| StoreError::Schema(format!("no migration to version {next}")))?;
        tracing::info!(from = current, to = next, "migrating database schema");
        (step.run)(db)?;
        let mut b = Batch::new();
        META.put(&mut b, &key, &next);
        db.write(b)?;
        current = next;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Direction, Json};

    fn cfg() -> StorageConfig {
        StorageConfig { block_cache_mb: 8, sync_writes: false, ..Default::default() }
    }

    #[test]
    fn fresh_db_gets_current_version_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = open(dir.path(), &cfg()).unwrap();
            assert_eq!(META.get(&*db, &VERSION_KEY.to_string()).unwrap(), Some(SCHEMA_VERSION));
        }
        let db = open(dir.path(), &cfg()).unwrap();
        assert_eq!(META.get(&*db, &VERSION_KEY.to_string()).unwrap(), Some(SCHEMA_VERSION));
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = open(dir.path(), &cfg()).unwrap();
            let mut b = Batch::new();
            META.put(&mut b, &VERSION_KEY.to_string(), &(SCHEMA_VERSION + 1));
            db.write(b).unwrap();
        }
        let err = open(dir.path(), &cfg()).err().unwrap();
        assert!(matches!(err, StoreError::Schema(_)));
    }

    #[test]
    fn stored_one_time_keys_get_a_claim_order_per_device() {
        let dir = tempfile::tempdir().unwrap();
        let mut engine = RocksEngine::open(dir.path(), &cfg()).unwrap();
        let keys: Table<(String, String, String, String), Vec<u8>> =
            Table::new(&catalog::ONE_TIME_KEYS);
        let mut b = Batch::new();
        for (device, id) in [("D1", "b"), ("D1", "a"), ("D2", "c")] {
            let row = ("alice".into(), device.into(), "signed_curve25519".into(), id.into());
            keys.put(&mut b, &row, &b"{}".to_vec());
        }
        engine.write(b).unwrap();
        order_one_time_keys(&mut engine).unwrap();
        let order: Table<(String, String, String, u64), String> =
            Table::new(&catalog::ONE_TIME_KEY_ORDER);
        let rows: Vec<_> = order
            .scan_prefix(&engine, &(), Direction::Forward)
            .unwrap()
            .map(|r| {
                let ((_, device, _, seq), id) = r.unwrap();
                (device, seq, id)
            })
            .collect();
        let expected = [("D1", 0, "a"), ("D1", 1, "b"), ("D2", 0, "c")]
            .map(|(d, n, id)| (d.to_owned(), n, id.to_owned()));
        assert_eq!(rows, expected);
    }

    #[test]
    fn migrations_run_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut engine = RocksEngine::open(dir.path(), &cfg()).unwrap();
        let mut b = Batch::new();
        META.put(&mut b, &VERSION_KEY.to_string(), &0);
        engine.write(b).unwrap();
        fn to_v1(db: &mut RocksEngine) -> StoreResult<()> {
            db.put(&catalog::META, b"migrated", b"yes")
        }
        fn to_v2(db: &mut RocksEngine) -> StoreResult<()> {
            assert_eq!(db.get(&catalog::META, b"migrated")?, Some(b"yes".to_vec()));
            db.put(&catalog::META, b"second", b"yes")
        }
        fn to_v3(db: &mut RocksEngine) -> StoreResult<()> {
            assert_eq!(db.get(&catalog::META, b"second")?, Some(b"yes".to_vec()));
            Ok(())
        }
        let steps = [
            Migration { version: 2, run: to_v2 },
            Migration { version: 3, run: to_v3 },
            Migration { version: 1, run: to_v1 },
        ];
        migrate(&mut engine, &steps).unwrap();
        assert_eq!(engine.get(&catalog::META, b"migrated").unwrap(), Some(b"yes".to_vec()));
        assert_eq!(engine.get(&catalog::META, b"second").unwrap(), Some(b"yes".to_vec()));
        assert_eq!(META.get(&engine, &VERSION_KEY.to_string()).unwrap(), Some(SCHEMA_VERSION));
    }

    #[test]
    fn scans_both_directions_with_prefix_and_range() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(dir.path(), &cfg()).unwrap();
        let t: Table<(String, u64), Json<String>> = Table::new(&catalog::DEVICES);
        let mut b = Batch::new();
        for (room, pos) in [("a", 1u64), ("a", 2), ("a", 10), ("ab", 1), ("b", 5)] {
            t.put(&mut b, &(room.to_string(), pos), &Json(format!("{room}{pos}")));
        }
        db.write(b).unwrap();

        let fwd: Vec<u64> = t
            .scan_prefix(&*db, &"a".to_string(), Direction::Forward)
            .unwrap()
            .map(|r| r.unwrap().0.1)
            .collect();
        assert_eq!(fwd, [1, 2, 10]);
        let back: Vec<u64> = t
            .scan_prefix(&*db, &"a".to_string(), Direction::Backward)
            .unwrap()
            .map(|r| r.unwrap().0.1)
            .collect();
        assert_eq!(back, [10, 2, 1]);

        use std::ops::Bound::*;
        let lo = ("a".to_string(), 2u64);
        let hi = ("ab".to_string(), 1u64);
        let mid: Vec<(String, u64)> = t
            .scan_range(&*db, Excluded(&lo), Included(&hi), Direction::Forward)
            .unwrap()
            .map(|r| r.unwrap().0)
            .collect();
        assert_eq!(mid, [("a".to_string(), 10), ("ab".to_string(), 1)]);
        let mid_back: Vec<(String, u64)> = t
            .scan_range(&*db, Included(&lo), Excluded(&hi), Direction::Backward)
            .unwrap()
            .map(|r| r.unwrap().0)
            .collect();
        assert_eq!(mid_back, [("a".to_string(), 10), ("a".to_string(), 2)]);
    }

    #[test]
    fn batch_is_atomic_across_tables() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(dir.path(), &cfg()).unwrap();
        let mut b = Batch::new();
        b.put_raw(&catalog::USERS, b"u".to_vec(), b"1".to_vec());
        b.put_raw(&catalog::DEVICES, b"d".to_vec(), b"2".to_vec());
        b.delete_raw(&catalog::USERS, b"u".to_vec());
        db.write(b).unwrap();
        assert_eq!(db.get(&catalog::USERS, b"u").unwrap(), None);
        assert_eq!(db.get(&catalog::DEVICES, b"d").unwrap(), Some(b"2".to_vec()));
        db.flush().unwrap();
        assert!(db.stats().iter().any(|s| s.family == catalog::SHARED_SCAN));
    }

    #[test]
    fn tables_sharing_a_family_stay_apart() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(dir.path(), &cfg()).unwrap();
        // Neighbouring tags in one family, and a table of the other family.
        let tables = [&catalog::USERS, &catalog::ACCESS_TOKENS, &catalog::DEVICES];
        let mut b = Batch::new();
        for (i, t) in tables.iter().enumerate() {
            assert!(t.tag.is_some());
            for key in [&b""[..], b"k", b"\xff\xff"] {
                b.put_raw(t, key.to_vec(), vec![i as u8]);
            }
        }
        db.write(b).unwrap();
        db.delete(&catalog::ACCESS_TOKENS, b"k").unwrap();
        for (i, t) in tables.iter().enumerate() {
            for direction in [Direction::Forward, Direction::Backward] {
                let rows: Vec<_> = db
                    .scan(t, crate::KeyRange::all(), direction)
                    .unwrap()
                    .map(|r| r.unwrap())
                    .collect();
                let mut keys: Vec<Vec<u8>> =
                    vec![b"".to_vec(), b"k".to_vec(), b"\xff\xff".to_vec()];
                if t.name == "access_tokens" {
                    keys.remove(1);
                }
                if direction == Direction::Backward {
                    keys.reverse();
                }
                assert_eq!(
                    rows.iter().map(|r| r.0.clone()).collect::<Vec<_>>(),
                    keys,
                    "{}",
                    t.name
                );
                assert!(rows.iter().all(|r| r.1 == [i as u8]), "{}", t.name);
            }
        }
        assert_eq!(db.get(&catalog::ACCESS_TOKENS, b"k").unwrap(), None);
        assert_eq!(db.get(&catalog::USERS, b"k").unwrap(), Some(vec![0]));
    }

    /// A database of the first layout, with each table in a column family of its own
    /// and, as if an earlier move was cut off, one row already copied.
    fn write_first_layout(path: &std::path::Path) {
        use crate::{KeyCodec, ValueCodec};
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        let names = ["meta", "users", "receipts", "events", catalog::SHARED_POINT];
        let raw = rocksdb::DB::open_cf(&opts, path, names).unwrap();
        let cf = |n: &str| raw.cf_handle(n).unwrap();
        raw.put_cf(cf("meta"), VERSION_KEY.to_string().to_key(), 1u64.to_value()).unwrap();
        raw.put_cf(cf("users"), b"alice", b"a").unwrap();
        raw.put_cf(cf("users"), b"bob", b"b").unwrap();
        raw.put_cf(cf("receipts"), b"r1", b"x").unwrap();
        raw.put_cf(cf("events"), b"e1", b"{}").unwrap();
        let mut copied = vec![catalog::USERS.tag.unwrap()];
        copied.extend_from_slice(b"alice");
        raw.put_cf(cf(catalog::SHARED_POINT), copied, b"a").unwrap();
    }

    #[test]
    fn first_layout_moves_into_shared_families() {
        let dir = tempfile::tempdir().unwrap();
        write_first_layout(dir.path());
        for _ in 0..2 {
            let db = open(dir.path(), &cfg()).unwrap();
            assert_eq!(META.get(&*db, &VERSION_KEY.to_string()).unwrap(), Some(SCHEMA_VERSION));
            let users: Vec<_> = db
                .scan(&catalog::USERS, crate::KeyRange::all(), Direction::Forward)
                .unwrap()
                .map(|r| r.unwrap())
                .collect();
            assert_eq!(
                users,
                [(b"alice".to_vec(), b"a".to_vec()), (b"bob".to_vec(), b"b".to_vec())]
            );
            assert_eq!(db.get(&catalog::RECEIPTS, b"r1").unwrap(), Some(b"x".to_vec()));
            assert_eq!(db.get(&catalog::EVENTS, b"e1").unwrap(), Some(b"{}".to_vec()));
            drop(db);
            let families = rocksdb::DB::list_cf(&rocksdb::Options::default(), dir.path()).unwrap();
            assert!(!families.iter().any(|f| f == "users" || f == "receipts"), "{families:?}");
            assert!(families.iter().any(|f| f == "events"));
        }
    }
}
