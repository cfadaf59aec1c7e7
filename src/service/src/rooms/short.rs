//! Short ids: event ids, room ids and `(event type, state key)` pairs interned as u64,
//! so the hot tables (state snapshots, timelines) hold small fixed-size keys.

use std::{
    collections::HashMap,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use trellis_core::Result;
use trellis_store::{Batch, Db, Direction, Table, catalog};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    Event = 1,
    Room = 2,
    StateKey = 3,
}

const FORWARD: Table<(u8, String), u64> = Table::new(&catalog::SHORT_IDS);
const REVERSE: Table<(u8, u64), String> = Table::new(&catalog::SHORT_IDS_REV);
/// Mappings kept in memory (an event id's is ~150 bytes with its table slot).
const CACHE_MAX: usize = 50_000;

/// `(type, state_key)` as one string; the separator cannot occur in an event type.
pub fn state_key_text(event_type: &str, state_key: &str) -> String {
    format!("{event_type}\u{0}{state_key}")
}

pub struct ShortIds {
    db: Db,
    next: AtomicU64,
    /// Recently used mappings, including ones allocated but maybe not yet committed:
    /// a second caller gets the same id (and writes the same mapping again, which is
    /// harmless) instead of allocating another.
    cache: Mutex<HashMap<(Kind, String), u64>>,
}

impl ShortIds {
    /// Allocation resumes after the highest id stored. (A counter written with each
    /// batch could go backwards when concurrent batches commit out of order.)
    pub fn new(db: Db) -> Result<Self> {
        let mut max = 0;
        for kind in [Kind::Event, Kind::Room, Kind::StateKey] {
            let last = REVERSE
                .scan_prefix(&*db, &(kind as u8), Direction::Backward)?
                .next()
                .transpose()?;
            if let Some(((_, id), _)) = last {
                max = max.max(id);
            }
        }
        Ok(Self { db, next: AtomicU64::new(max + 1), cache: Mutex::default() })
    }

    /// The short id of `text`, if it has one.
    pub fn get(&self, kind: Kind, text: &str) -> Result<Option<u64>> {
        if let Some(&id) =
            self.cache.lock().unwrap_or_else(|p| p.into_inner()).get(&(kind, text.to_owned()))
        {
            return Ok(Some(id));
        }
        Ok(FORWARD.get(&*self.db, &(kind as u8, text.to_owned()))?)
    }

    /// The short id of `text`, allocating one (written in `batch`) if needed.
    pub fn get_or_create(&self, batch: &mut Batch, kind: Kind, text: &str) -> Result<u64> {
        let key = (kind, text.to_owned());
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let (id, write) = match cache.get(&key) {
            Some(&id) => (id, true),
            None => match FORWARD.get(&*self.db, &(kind as u8, text.to_owned()))? {
                Some(id) => (id, false),
                None => (self.next.fetch_add(1, Ordering::Relaxed), true),
            },
        };
        if cache.len() >= CACHE_MAX {
            // A new table: `clear` would keep the old one's memory for good.
            *cache = HashMap::new();
        }
        cache.insert(key, id);
        drop(cache);
        if write {
            FORWARD.put(batch, &(kind as u8, text.to_owned()), &id);
            REVERSE.put(batch, &(kind as u8, id), &text.to_owned());
        }
        Ok(id)
    }

    /// The text a short id stands for.
    pub fn text(&self, kind: Kind, id: u64) -> Result<Option<String>> {
        Ok(REVERSE.get(&*self.db, &(kind as u8, id))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_core::config::StorageConfig;

    #[test]
    fn ids_are_stable_unique_and_persist() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = StorageConfig { block_cache_mb: 8, sync_writes: false, ..Default::default() };
        let db = trellis_store::open(dir.path(), &cfg).unwrap();
        let short = ShortIds::new(db.clone()).unwrap();
        let mut batch = Batch::new();
        let a = short.get_or_create(&mut batch, Kind::Event, "$a").unwrap();
        let a_again = short.get_or_create(&mut batch, Kind::Event, "$a").unwrap();
        let room = short.get_or_create(&mut batch, Kind::Room, "$a").unwrap();
        let member = short
            .get_or_create(&mut batch, Kind::StateKey, &state_key_text("m.room.member", "@x:y"))
            .unwrap();
        assert_eq!(a, a_again, "one text, one id, even before the batch commits");
        assert_ne!(a, room, "kinds are separate namespaces");
        assert_ne!(room, member);
        db.write(batch).unwrap();

        let reopened = ShortIds::new(db).unwrap();
        assert_eq!(reopened.get(Kind::Event, "$a").unwrap(), Some(a));
        assert_eq!(reopened.text(Kind::Room, room).unwrap().as_deref(), Some("$a"));
        assert_eq!(reopened.get(Kind::Event, "$missing").unwrap(), None);
        let mut batch = Batch::new();
        let fresh = reopened.get_or_create(&mut batch, Kind::Event, "$b").unwrap();
        assert!(fresh > member, "allocation resumes after the persisted counter");
    }
}
