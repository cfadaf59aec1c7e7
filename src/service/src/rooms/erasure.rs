//! Erased users (`POST /account/deactivate` with `erase: true`). The spec's erasure: users
//! who join a room after the erasure are served redacted copies of the erased user's
//! events there, while those who could see the events before keep seeing them. The
//! events themselves stay whole (other servers and earlier readers hold them anyway);
//! the redaction is applied when an event is handed to a reader, by [`RoomViewer`].
//!
//! [`RoomViewer`]: super::viewer::RoomViewer

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use ruma::room_version_rules::RedactionRules;
use trellis_core::{Error, Result};
use trellis_store::{Batch, Db, Direction, Table, catalog};

use super::Pdu;
use crate::commit;

/// user id -> stream position of the erasure
const ERASED_USERS: Table<String, u64> = Table::new(&catalog::ERASED_USERS);

/// The erased users, all in memory: few, and every read path asks.
pub struct Erasures {
    db: Db,
    erased: RwLock<Arc<HashMap<String, u64>>>,
}

impl Erasures {
    pub fn load(db: Db) -> Result<Self> {
        let mut erased = HashMap::new();
        for row in ERASED_USERS.scan_prefix(&*db, &(), Direction::Forward)? {
            let (user, position) = row?;
            erased.insert(user, position);
        }
        Ok(Self { db, erased: RwLock::new(Arc::new(erased)) })
    }

    /// Who is erased, and since which stream position.
    pub fn snapshot(&self) -> Arc<HashMap<String, u64>> {
        self.erased.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Records that `user_id` is erased from stream position `position` on.
    pub async fn erase(&self, user_id: &str, position: u64) -> Result<()> {
        let mut batch = Batch::new();
        ERASED_USERS.put(&mut batch, &user_id.to_owned(), &position);
        commit(&self.db, batch).await?;
        let mut erased = self.erased.write().unwrap_or_else(|p| p.into_inner());
        let mut next = (**erased).clone();
        next.insert(user_id.to_owned(), position);
        *erased = Arc::new(next);
        Ok(())
    }
}

/// `pdu` as the room version's redaction algorithm leaves it (no `redacted_because`: the
/// erasure is not an event).
pub fn redacted_copy(pdu: &Pdu, rules: &RedactionRules) -> Result<Arc<Pdu>> {
    let redacted = ruma::canonical_json::redact((*pdu.json).clone(), rules, None)
        .map_err(|e| Error::internal("redacting an erased user's event", e))?;
    let mut copy = Pdu::from_json(pdu.event_id.clone(), redacted)?;
    copy.rejected = pdu.rejected;
    Ok(Arc::new(copy))
}
