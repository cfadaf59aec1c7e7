//! Parsed events by short id. Appending reads the same few auth events (create, power
//! levels, members) for every message, and parsing their stored JSON dominated the cost
//! of a send; events are immutable except for redaction, which invalidates its target.

use std::{
    collections::HashMap,
    hash::Hash,
    sync::{Arc, Mutex},
};

use super::Pdu;

/// What readers need of a stored event without parsing it again.
#[derive(Debug)]
pub struct CachedEvent {
    pub pdu: Arc<Pdu>,
    pub reference_hash: String,
    pub position: u64,
    pub room: u64,
    /// Snapshot id of the state before the event; 0 for events stored without it.
    pub state_before: u64,
    pub rejected: bool,
    pub soft_failed: bool,
}

impl CachedEvent {
    /// Roughly the memory an entry holds: the parsed signed event (a tree of small maps
    /// several times its JSON's size) and the parsed fields beside it.
    pub fn weight(&self) -> usize {
        EVENT_OVERHEAD_BYTES + 4 * self.pdu.content.get().len()
    }
}

/// What an event holds beyond its content: ids, hashes, signatures, prev and auth
/// events, parsed twice (a soak measured ~3.9 KB per cached message event).
const EVENT_OVERHEAD_BYTES: usize = 3_000;

struct Inner<K, V> {
    map: HashMap<K, Arc<V>>,
    /// The entries' weights summed (their count when entries are not weighed).
    weight: usize,
    /// Bumped by every invalidation: a reader that loaded an event before an
    /// invalidation must not put its (possibly stale) copy in afterwards.
    generation: u64,
}

/// Stored records by short id (or another key), kept parsed. Readers take the
/// generation with their lookup and pass it back with what they loaded after a miss; a
/// writer's change bumps it, so a copy read before the change is never kept after it.
pub struct ShortCache<V, K = u64> {
    inner: Mutex<Inner<K, V>>,
    /// The most the entries may weigh together.
    capacity: usize,
    weigh: fn(&V) -> usize,
}

/// Parsed events (see the module's note), bounded by their estimated bytes.
pub type EventCache = ShortCache<CachedEvent>;

impl EventCache {
    /// An event cache holding about `bytes` of parsed events.
    pub fn with_bytes(bytes: usize) -> Self {
        Self::weighted(bytes, CachedEvent::weight)
    }
}

impl<V, K: Hash + Eq> ShortCache<V, K> {
    /// A cache of at most `capacity` entries.
    pub fn new(capacity: usize) -> Self {
        Self::weighted(capacity, |_| 1)
    }

    /// A cache whose entries, weighed by `weigh`, sum to at most `capacity`.
    pub fn weighted(capacity: usize, weigh: fn(&V) -> usize) -> Self {
        let inner = Inner { map: HashMap::new(), weight: 0, generation: 0 };
        Self { inner: Mutex::new(inner), capacity: capacity.max(1), weigh }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<K, V>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cached value and the generation to pass to `insert` after a miss.
    pub fn get(&self, short: &K) -> (Option<Arc<V>>, u64) {
        let inner = self.lock();
        (inner.map.get(short).cloned(), inner.generation)
    }

    /// The cached value, or what `load` reads from storage, kept for the next reader
    /// unless an invalidation happened meanwhile.
    pub fn get_or_load<E>(&self, key: K, load: impl FnOnce() -> Result<V, E>) -> Result<Arc<V>, E> {
        let (hit, generation) = self.get(&key);
        if let Some(hit) = hit {
            return Ok(hit);
        }
        let value = Arc::new(load()?);
        self.insert(key, value.clone(), generation);
        Ok(value)
    }

    /// Keeps `value` unless an invalidation happened since `generation` was read.
    pub fn insert(&self, short: K, value: Arc<V>, generation: u64) {
        let mut inner = self.lock();
        if inner.generation != generation {
            return;
        }
        self.keep(&mut inner, short, value);
    }

    /// Adds an entry, first emptying the cache if it would go over its capacity:
    /// wholesale eviction keeps this simple and O(1) amortised; the hot entries come
    /// back on their next use. The emptied table's memory is given back.
    fn keep(&self, inner: &mut Inner<K, V>, short: K, value: Arc<V>) {
        let weight = (self.weigh)(&value);
        if inner.weight + weight > self.capacity {
            inner.map = HashMap::new();
            inner.weight = 0;
        }
        inner.weight += weight;
        if let Some(old) = inner.map.insert(short, value) {
            inner.weight -= (self.weigh)(&old);
        }
    }

    /// Replaces `short`'s entry with what a writer just stored for it.
    pub fn put(&self, short: K, value: Arc<V>) {
        let mut inner = self.lock();
        inner.generation += 1;
        self.keep(&mut inner, short, value);
    }

    /// Forgets `short` (after its stored copy changed).
    pub fn invalidate(&self, short: &K) {
        let mut inner = self.lock();
        inner.generation += 1;
        if let Some(old) = inner.map.remove(short) {
            inner.weight -= (self.weigh)(&old);
        }
    }

    /// Forgets everything (after a change whose extent the writer does not track).
    pub fn clear(&self) {
        let mut inner = self.lock();
        inner.generation += 1;
        inner.map = HashMap::new();
        inner.weight = 0;
    }
}

/// Loaded state snapshots by id. Snapshots never change once written, so entries are
/// never stale; the bound counts state entries, as one big room's state outweighs
/// thousands of small ones.
pub struct StateCache {
    inner: Mutex<(HashMap<u64, Arc<super::state::StateSet>>, usize)>,
    max_entries: usize,
}

impl StateCache {
    pub fn new(max_entries: usize) -> Self {
        Self { inner: Mutex::default(), max_entries }
    }

    pub fn get(&self, id: u64) -> Option<Arc<super::state::StateSet>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).0.get(&id).cloned()
    }

    pub fn insert(&self, id: u64, state: Arc<super::state::StateSet>) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if inner.1 + state.len() > self.max_entries {
            inner.0.clear();
            inner.1 = 0;
        }
        inner.1 += state.len();
        if let Some(old) = inner.0.insert(id, state) {
            inner.1 -= old.len();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> Arc<CachedEvent> {
        let json: ruma::CanonicalJsonObject = serde_json::from_value(serde_json::json!({
            "room_id": "!r:x", "sender": "@a:x", "origin_server_ts": 1, "type": "m.room.message",
            "content": {}, "prev_events": [], "auth_events": [], "depth": 2,
        }))
        .unwrap();
        let id = ruma::OwnedEventId::try_from("$e").unwrap();
        Arc::new(CachedEvent {
            pdu: Arc::new(Pdu::from_json(id, json).unwrap()),
            reference_hash: String::new(),
            position: 1,
            room: 1,
            state_before: 0,
            rejected: false,
            soft_failed: false,
        })
    }

    #[test]
    fn a_load_racing_an_invalidation_is_not_kept() {
        let cache = EventCache::new(10);
        let (hit, generation) = cache.get(&7);
        assert!(hit.is_none());
        // A redaction rewrites event 7 while the reader still holds its old copy.
        cache.invalidate(&7);
        cache.insert(7, event(), generation);
        assert!(cache.get(&7).0.is_none());
        let (_, generation) = cache.get(&7);
        cache.insert(7, event(), generation);
        assert!(cache.get(&7).0.is_some());
    }

    #[test]
    fn a_load_racing_a_writers_put_does_not_replace_it() {
        let cache: ShortCache<u64> = ShortCache::new(10);
        let (_, generation) = cache.get(&3);
        // A writer stores version 2 while a reader still holds version 1 from disk.
        cache.put(3, Arc::new(2));
        cache.insert(3, Arc::new(1), generation);
        assert_eq!(cache.get(&3).0.as_deref(), Some(&2));
    }

    #[test]
    fn events_are_bounded_by_their_weight() {
        let one = event().weight();
        let cache = EventCache::with_bytes(one * 3);
        for short in 0..10 {
            let generation = cache.get(&short).1;
            cache.insert(short, event(), generation);
            let inner = cache.lock();
            assert!(inner.weight <= one * 3 && inner.weight == inner.map.len() * one);
        }
        cache.invalidate(&9);
        let inner = cache.lock();
        assert_eq!(inner.weight, inner.map.len() * one);
    }

    #[test]
    fn capacity_is_bounded() {
        let cache = EventCache::new(2);
        for short in 0..5 {
            let generation = cache.get(&short).1;
            cache.insert(short, event(), generation);
        }
        assert!(cache.lock().map.len() <= 2);
    }

    #[test]
    fn a_load_racing_a_clear_is_not_kept() {
        let cache: ShortCache<Vec<u64>, String> = ShortCache::new(10);
        let (_, generation) = cache.get(&"@a:x".to_owned());
        // A membership change is written while a reader holds the list from before it.
        cache.clear();
        cache.insert("@a:x".to_owned(), Arc::new(vec![1]), generation);
        assert!(cache.get(&"@a:x".to_owned()).0.is_none());
    }
}
