//! Typed tables: a key codec and a value codec bound to one catalog entry.

use std::{marker::PhantomData, ops::Bound};

use crate::{Batch, Direction, Engine, KeyCodec, KeyRange, StoreResult, TableDef, ValueCodec};

pub struct Table<K, V> {
    pub def: &'static TableDef,
    _types: PhantomData<fn() -> (K, V)>,
}

impl<K, V> Clone for Table<K, V> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<K, V> Copy for Table<K, V> {}

impl<K: KeyCodec + 'static, V: ValueCodec + 'static> Table<K, V> {
    pub const fn new(def: &'static TableDef) -> Self {
        Self { def, _types: PhantomData }
    }

    pub fn get(&self, db: &dyn Engine, key: &K) -> StoreResult<Option<V>> {
        db.get(self.def, &key.to_key())?.map(|bytes| V::from_value(&bytes)).transpose()
    }

    /// Compacts the keys of each `(start, end)` range (see [`Engine::compact`]).
    pub fn compact(&self, db: &dyn Engine, ranges: &[(K, K)]) -> StoreResult<()> {
        let ranges: Vec<_> = ranges.iter().map(|(a, b)| (a.to_key(), b.to_key())).collect();
        db.compact(self.def, &ranges)
    }

    pub fn contains(&self, db: &dyn Engine, key: &K) -> StoreResult<bool> {
        Ok(db.get(self.def, &key.to_key())?.is_some())
    }

    pub fn put(&self, batch: &mut Batch, key: &K, value: &V) {
        batch.put_raw(self.def, key.to_key(), value.to_value());
    }

    pub fn delete(&self, batch: &mut Batch, key: &K) {
        batch.delete_raw(self.def, key.to_key());
    }

    /// Entries whose key starts with `prefix` (a leading part of the key tuple).
    pub fn scan_prefix<'a, P: KeyCodec>(
        &self,
        db: &'a dyn Engine,
        prefix: &P,
        direction: Direction,
    ) -> StoreResult<impl Iterator<Item = StoreResult<(K, V)>> + 'a> {
        let iter = db.scan(self.def, KeyRange::prefix(prefix.to_prefix()), direction)?;
        Ok(iter.map(decode::<K, V>))
    }

    /// Entries with keys in `(start, end)`, in `direction`.
    pub fn scan_range<'a>(
        &self,
        db: &'a dyn Engine,
        start: Bound<&K>,
        end: Bound<&K>,
        direction: Direction,
    ) -> StoreResult<impl Iterator<Item = StoreResult<(K, V)>> + 'a> {
        let enc = |b: Bound<&K>| match b {
            Bound::Included(k) => Bound::Included(k.to_key()),
            Bound::Excluded(k) => Bound::Excluded(k.to_key()),
            Bound::Unbounded => Bound::Unbounded,
        };
        let range = KeyRange { start: enc(start), end: enc(end) };
        Ok(db.scan(self.def, range, direction)?.map(decode::<K, V>))
    }
}

fn decode<K: KeyCodec, V: ValueCodec>(
    item: StoreResult<(Vec<u8>, Vec<u8>)>,
) -> StoreResult<(K, V)> {
    let (k, v) = item?;
    Ok((K::from_key(&k)?, V::from_value(&v)?))
}
