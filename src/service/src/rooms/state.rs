//! Room state snapshots, stored as layers of changes against a parent snapshot.
//!
//! A state is a sorted map from short state key (an interned `(type, state_key)`) to
//! short event id. Saving a state that differs little from its parent writes only the
//! difference; chains are capped at `MAX_DEPTH` layers (and a diff larger than half the
//! state is stored whole), so loading a snapshot reads a bounded number of rows.

use std::{
    collections::BTreeMap,
    sync::atomic::{AtomicU64, Ordering},
};

use serde::{Deserialize, Serialize};
use trellis_core::{Error, Result};
use trellis_store::{Batch, Db, Direction, Json, Table, catalog};

pub type StateSet = BTreeMap<u64, u64>;

/// Layers a snapshot may stand on, at most.
pub const MAX_DEPTH: u32 = 8;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Layer {
    parent: Option<u64>,
    /// Layers below this one (0 for a full snapshot).
    depth: u32,
    /// Entries set (added or replaced) against the parent.
    set: Vec<(u64, u64)>,
    /// State keys removed against the parent.
    removed: Vec<u64>,
}

const SNAPSHOTS: Table<u64, Json<Layer>> = Table::new(&catalog::STATE_SNAPSHOTS);

pub struct StateSnapshots {
    db: Db,
    next_id: AtomicU64,
}

impl StateSnapshots {
    /// Allocation resumes after the highest snapshot stored.
    pub fn new(db: Db) -> Result<Self> {
        let last = SNAPSHOTS
            .scan_range(
                &*db,
                std::ops::Bound::Unbounded,
                std::ops::Bound::Unbounded,
                Direction::Backward,
            )?
            .next()
            .transpose()?;
        let next = last.map_or(1, |(id, _)| id + 1);
        Ok(Self { db, next_id: AtomicU64::new(next) })
    }

    fn layer(&self, id: u64) -> Result<Layer> {
        SNAPSHOTS
            .get(&*self.db, &id)?
            .map(|j| j.0)
            .ok_or_else(|| Error::internal("state snapshots", format!("snapshot {id} is missing")))
    }

    /// The full state of snapshot `id`.
    pub fn load(&self, id: u64) -> Result<StateSet> {
        let mut chain = vec![self.layer(id)?];
        while let Some(parent) = chain.last().and_then(|l| l.parent) {
            if chain.len() > MAX_DEPTH as usize + 1 {
                return Err(Error::internal(
                    "state snapshots",
                    format!("chain under {id} is too deep"),
                ));
            }
            chain.push(self.layer(parent)?);
        }
        let mut state = StateSet::new();
        for layer in chain.iter().rev() {
            for key in &layer.removed {
                state.remove(key);
            }
            state.extend(layer.set.iter().copied());
        }
        Ok(state)
    }

    /// Adds `state` as a new snapshot to `batch`, as changes against `parent` when that
    /// is cheaper; returns its id. `parent_state` must be the state of `parent`.
    pub fn save(
        &self,
        batch: &mut Batch,
        parent: Option<(u64, &StateSet)>,
        state: &StateSet,
    ) -> Result<u64> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let full = Layer {
            parent: None,
            depth: 0,
            set: state.iter().map(|(k, v)| (*k, *v)).collect(),
            removed: Vec::new(),
        };
        // A parent saved in the same uncommitted batch is not readable yet: such a state
        // (made when a fork is resolved) is stored whole.
        let parent = match parent {
            Some((id, state)) => SNAPSHOTS.get(&*self.db, &id)?.map(|Json(l)| (id, state, l.depth)),
            None => None,
        };
        let layer = match parent {
            Some((parent_id, parent_state, parent_depth)) => {
                let set: Vec<(u64, u64)> = state
                    .iter()
                    .filter(|(k, v)| parent_state.get(k) != Some(v))
                    .map(|(k, v)| (*k, *v))
                    .collect();
                let removed: Vec<u64> =
                    parent_state.keys().filter(|k| !state.contains_key(k)).copied().collect();
                let small = (set.len() + removed.len()) * 2 <= state.len().max(1);
                if parent_depth < MAX_DEPTH && small {
                    Layer { parent: Some(parent_id), depth: parent_depth + 1, set, removed }
                } else {
                    full
                }
            }
            None => full,
        };
        SNAPSHOTS.put(batch, &id, &Json(layer));
        Ok(id)
    }

    /// Layers under snapshot `id` (0 for a full one), for tests and diagnostics.
    pub fn depth(&self, id: u64) -> Result<u32> {
        Ok(self.layer(id)?.depth)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_core::config::StorageConfig;

    fn db() -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().unwrap();
        let cfg = StorageConfig { block_cache_mb: 8, sync_writes: false, ..Default::default() };
        let db = trellis_store::open(dir.path(), &cfg).unwrap();
        (dir, db)
    }

    #[test]
    fn chains_of_changes_load_back_exactly() {
        let (_d, db) = db();
        let snaps = StateSnapshots::new(db.clone()).unwrap();
        let mut state: StateSet = (1..=50).map(|k| (k, k * 100)).collect();
        let mut batch = Batch::new();
        let mut prev = snaps.save(&mut batch, None, &state).unwrap();
        db.write(batch).unwrap();
        let mut history = vec![(prev, state.clone())];
        for step in 0..40u64 {
            let parent_state = state.clone();
            state.insert(1 + step % 50, 10_000 + step); // a member changes
            if step % 7 == 0 {
                state.remove(&(50 - step % 50));
            }
            if step % 5 == 0 {
                state.insert(1000 + step, 42); // a new key
            }
            let mut batch = Batch::new();
            prev = snaps.save(&mut batch, Some((prev, &parent_state)), &state).unwrap();
            db.write(batch).unwrap();
            assert!(snaps.depth(prev).unwrap() <= MAX_DEPTH);
            history.push((prev, state.clone()));
        }
        for (id, expected) in &history {
            assert_eq!(&snaps.load(*id).unwrap(), expected, "snapshot {id}");
        }
        // Ids survive a restart of the allocator.
        let again = StateSnapshots::new(db).unwrap();
        assert!(again.next_id.load(Ordering::Relaxed) > prev);
    }

    #[test]
    fn large_changes_are_stored_whole() {
        let (_d, db) = db();
        let snaps = StateSnapshots::new(db.clone()).unwrap();
        let a: StateSet = (1..=10).map(|k| (k, k)).collect();
        let b: StateSet = (1..=10).map(|k| (k, k + 1)).collect();
        let mut batch = Batch::new();
        let ida = snaps.save(&mut batch, None, &a).unwrap();
        db.write(batch).unwrap();
        let mut batch = Batch::new();
        let idb = snaps.save(&mut batch, Some((ida, &a)), &b).unwrap();
        db.write(batch).unwrap();
        assert_eq!(snaps.depth(idb).unwrap(), 0);
        assert_eq!(snaps.load(idb).unwrap(), b);
        assert!(snaps.load(9999).is_err());
    }
}
