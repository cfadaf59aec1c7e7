//! Relations between events (edits, reactions, references, threads): indexed as each
//! event is stored, so that `/relations`, `/threads` and the `unsigned.m.relations`
//! bundles the spec puts on served events are prefix scans rather than timeline walks.

use std::ops::Bound::{self, Excluded, Included, Unbounded};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use trellis_core::{Error, ErrorKind, Result};
use trellis_store::{Batch, Direction, Json, Table, catalog};

use super::{
    Pdu, Rooms,
    reads::{EVENTS, StoredEvent},
    short::Kind,
};

/// Rows are written twice: under their `rel_type` and under `""`, the all-types index,
/// so both kinds of listing stay in position order without merging.
pub(super) const RELATIONS: Table<(u64, String, u64), Json<RelationRow>> =
    Table::new(&catalog::RELATIONS);
pub(super) const ANNOTATIONS: Table<(u64, String, String), u64> = Table::new(&catalog::ANNOTATIONS);
pub(super) const RELATED: Table<u64, ()> = Table::new(&catalog::RELATED);
pub(super) const THREAD_LATEST: Table<u64, u64> = Table::new(&catalog::THREAD_LATEST);
pub(super) const THREADS: Table<(u64, u64), u64> = Table::new(&catalog::THREADS);

/// Threads and reference chunks are summarised from at most this many rows.
const SCAN_CAP: usize = 10_000;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct RelationRow {
    event: u64,
    sender: String,
    kind: String,
    rel_type: String,
}

/// The relation an event's content declares (`m.relates_to` with `rel_type` and
/// `event_id`); without both the event has no relation.
#[derive(Debug, Clone, PartialEq)]
pub struct Relation {
    pub rel_type: String,
    pub parent: String,
    /// The reaction key of an `m.annotation`.
    pub key: Option<String>,
}

pub fn relation_of(content: &Value) -> Option<Relation> {
    let rel = content.get("m.relates_to")?;
    Some(Relation {
        rel_type: rel.get("rel_type")?.as_str()?.to_owned(),
        parent: rel.get("event_id")?.as_str()?.to_owned(),
        key: rel.get("key").and_then(Value::as_str).map(str::to_owned),
    })
}

/// What the server aggregates for an event, per the spec's bundling rules.
#[derive(Debug, Default)]
pub struct Bundle {
    /// The most recent valid replacement (same sender and type as the original).
    pub edit: Option<Pdu>,
    /// Latest reply, number of replies, whether the viewer took part.
    pub thread: Option<(Pdu, u64, bool)>,
    pub references: Vec<String>,
}

impl Bundle {
    pub fn is_empty(&self) -> bool {
        self.edit.is_none() && self.thread.is_none() && self.references.is_empty()
    }
}

/// A page of related events with the position to continue from.
pub struct RelationsPage {
    pub events: Vec<(u64, Pdu)>,
    pub next: Option<u64>,
}

impl Rooms {
    /// The parent of a relation when it is an event of the same room.
    fn relation_parent(&self, room_short: u64, parent: &str) -> Result<Option<(u64, StoredEvent)>> {
        let Some(short) = self.short.get(Kind::Event, parent)? else { return Ok(None) };
        Ok(EVENTS
            .get(&*self.db, &short)?
            .map(|Json(e)| e)
            .filter(|e| e.room == room_short)
            .map(|e| (short, e)))
    }

    /// Refuses relations the spec rules out before the event is built: the same
    /// reaction twice, and threads rooted at an event that itself has a relation.
    pub(super) fn check_relation(
        &self,
        room_short: u64,
        sender: &str,
        content: &Value,
    ) -> Result<()> {
        let Some(rel) = relation_of(content) else { return Ok(()) };
        let Some((parent_short, parent)) = self.relation_parent(room_short, &rel.parent)? else {
            return Ok(());
        };
        match rel.rel_type.as_str() {
            "m.annotation" => {
                let key = rel.key.unwrap_or_default();
                if ANNOTATIONS.get(&*self.db, &(parent_short, sender.to_owned(), key))?.is_some() {
                    return Err(Error::new(
                        ErrorKind::BadRequest,
                        "M_DUPLICATE_ANNOTATION",
                        "You already reacted with this key",
                    ));
                }
            }
            "m.thread" => {
                let parent_rel = relation_of(&parent.json["content"]);
                if parent_rel.is_some_and(|r| r.rel_type != "m.thread" || r.parent != rel.parent) {
                    return Err(Error::invalid_param(
                        "A thread cannot start from an event that has a relation",
                    ));
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Writes the index rows of a newly stored event's relation.
    pub(super) fn index_relation(
        &self,
        batch: &mut Batch,
        room_short: u64,
        event_short: u64,
        position: u64,
        pdu: &Pdu,
        content: &Value,
    ) -> Result<()> {
        let Some(rel) = relation_of(content) else { return Ok(()) };
        let Some((parent, _)) = self.relation_parent(room_short, &rel.parent)? else {
            return Ok(());
        };
        let row = Json(RelationRow {
            event: event_short,
            sender: pdu.sender.to_string(),
            kind: pdu.kind.to_string(),
            rel_type: rel.rel_type.clone(),
        });
        RELATIONS.put(batch, &(parent, rel.rel_type.clone(), position), &row);
        RELATIONS.put(batch, &(parent, String::new(), position), &row);
        RELATED.put(batch, &parent, &());
        match rel.rel_type.as_str() {
            "m.annotation" => {
                let key = (parent, pdu.sender.to_string(), rel.key.unwrap_or_default());
                ANNOTATIONS.put(batch, &key, &event_short);
            }
            "m.thread" => {
                if let Some(old) = THREAD_LATEST.get(&*self.db, &parent)? {
                    THREADS.delete(batch, &(room_short, old));
                }
                THREADS.put(batch, &(room_short, position), &parent);
                THREAD_LATEST.put(batch, &parent, &position);
            }
            _ => {}
        }
        Ok(())
    }

    /// Drops the index rows of a redacted event: a redacted relation no longer counts.
    pub(super) fn unindex_relation(
        &self,
        batch: &mut Batch,
        stored: &StoredEvent,
        sender: &str,
        content: &Value,
    ) -> Result<()> {
        let Some(rel) = relation_of(content) else { return Ok(()) };
        let Some((parent, _)) = self.relation_parent(stored.room, &rel.parent)? else {
            return Ok(());
        };
        RELATIONS.delete(batch, &(parent, rel.rel_type.clone(), stored.position));
        RELATIONS.delete(batch, &(parent, String::new(), stored.position));
        match rel.rel_type.as_str() {
            "m.annotation" => {
                let key = (parent, sender.to_owned(), rel.key.unwrap_or_default());
                if ANNOTATIONS.get(&*self.db, &key)? == Some(self.event_short(&stored.event_id)?) {
                    ANNOTATIONS.delete(batch, &key);
                }
            }
            "m.thread" if THREAD_LATEST.get(&*self.db, &parent)? == Some(stored.position) => {
                THREADS.delete(batch, &(stored.room, stored.position));
                // The thread's activity falls back to its previous reply, if any.
                let previous = RELATIONS
                    .scan_prefix(&*self.db, &(parent, "m.thread".to_owned()), Direction::Backward)?
                    .filter_map(|r| r.ok())
                    .map(|((_, _, pos), _)| pos)
                    .find(|pos| *pos != stored.position);
                match previous {
                    Some(pos) => {
                        THREADS.put(batch, &(stored.room, pos), &parent);
                        THREAD_LATEST.put(batch, &parent, &pos);
                    }
                    None => THREAD_LATEST.delete(batch, &parent),
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn event_short(&self, event_id: &str) -> Result<u64> {
        self.short.get(Kind::Event, event_id)?.ok_or_else(|| Error::not_found("Event not found"))
    }

    /// Events relating to `parent` with positions within `(lo, hi)`, oldest first when
    /// `forward`, up to `limit` of those `visible` lets through.
    #[allow(clippy::too_many_arguments)]
    pub fn relations(
        &self,
        parent: &str,
        rel_type: Option<&str>,
        event_type: Option<&str>,
        lo: Bound<u64>,
        hi: Bound<u64>,
        forward: bool,
        limit: usize,
        mut visible: impl FnMut(u64, &Pdu) -> Result<bool>,
    ) -> Result<RelationsPage> {
        let parent = self.event_short(parent)?;
        let rel = rel_type.unwrap_or_default().to_owned();
        let key = |b: Bound<u64>, edge: u64| match b {
            Included(p) => Included((parent, rel.clone(), p)),
            Excluded(p) => Excluded((parent, rel.clone(), p)),
            Unbounded => Included((parent, rel.clone(), edge)),
        };
        let (lo, hi) = (key(lo, 0), key(hi, u64::MAX));
        let direction = if forward { Direction::Forward } else { Direction::Backward };
        let mut events = Vec::new();
        let mut last = None;
        let mut more = false;
        for (scanned, row) in
            RELATIONS.scan_range(&*self.db, lo.as_ref(), hi.as_ref(), direction)?.enumerate()
        {
            if events.len() == limit || scanned >= SCAN_CAP {
                more = true;
                break;
            }
            let ((_, _, pos), Json(row)) = row?;
            last = Some(pos);
            if event_type.is_some_and(|t| t != row.kind) {
                continue;
            }
            if let Some(pdu) = self.pdu_by_short(row.event)?
                && visible(pos, &pdu)?
            {
                events.push((pos, pdu));
            }
        }
        Ok(RelationsPage { events, next: if more { last } else { None } })
    }

    /// The aggregations the spec bundles with `pdu` for `viewer`.
    pub fn bundle(&self, pdu: &Pdu, viewer: &str) -> Result<Bundle> {
        let Some(short) = self.short.get(Kind::Event, pdu.event_id.as_str())? else {
            return Ok(Bundle::default());
        };
        let mut bundle = Bundle::default();
        // Most events never had a relation: a bloom-filtered point lookup says so.
        if !RELATED.contains(&*self.db, &short)? {
            return Ok(bundle);
        }
        // Only the original sender may edit, only with the same event type, and state
        // events are not edited.
        if pdu.state_key.is_none() {
            for row in RELATIONS.scan_prefix(
                &*self.db,
                &(short, "m.replace".to_owned()),
                Direction::Backward,
            )? {
                let (_, Json(row)) = row?;
                if row.sender == pdu.sender.as_str() && row.kind == pdu.kind.to_string() {
                    bundle.edit = self.pdu_by_short(row.event)?;
                    break;
                }
            }
        }
        if THREAD_LATEST.get(&*self.db, &short)?.is_some() {
            let mut count = 0;
            let mut latest = None;
            let mut participated = pdu.sender.as_str() == viewer;
            for row in RELATIONS
                .scan_prefix(&*self.db, &(short, "m.thread".to_owned()), Direction::Backward)?
                .take(SCAN_CAP)
            {
                let (_, Json(row)) = row?;
                count += 1;
                participated |= row.sender == viewer;
                if latest.is_none() {
                    latest = Some(row.event);
                }
            }
            if let Some(latest) = latest
                && let Some(latest) = self.pdu_by_short(latest)?
            {
                bundle.thread = Some((latest, count, participated));
            }
        }
        for row in RELATIONS
            .scan_prefix(&*self.db, &(short, "m.reference".to_owned()), Direction::Forward)?
            .take(SCAN_CAP)
        {
            let (_, Json(row)) = row?;
            if let Some(id) = self.short.text(Kind::Event, row.event)? {
                bundle.references.push(id);
            }
        }
        Ok(bundle)
    }

    /// Thread roots of a room by latest activity, newest first, before position `from`
    /// (exclusive); `participant` keeps only threads that user started or replied in.
    pub fn threads(
        &self,
        room_id: &str,
        from: Option<u64>,
        limit: usize,
        participant: Option<&str>,
        mut visible: impl FnMut(u64, &Pdu) -> Result<bool>,
    ) -> Result<RelationsPage> {
        let Some(room) = self.short.get(Kind::Room, room_id)? else {
            return Ok(RelationsPage { events: Vec::new(), next: None });
        };
        let hi = from.map_or(Included((room, u64::MAX)), |f| Excluded((room, f)));
        let lo = Included((room, 0));
        let mut events = Vec::new();
        let mut last = None;
        let mut more = false;
        for (scanned, row) in THREADS
            .scan_range(&*self.db, lo.as_ref(), hi.as_ref(), Direction::Backward)?
            .enumerate()
        {
            if events.len() == limit || scanned >= SCAN_CAP {
                more = true;
                break;
            }
            let ((_, pos), root) = row?;
            last = Some(pos);
            let Some(Json(stored)) = EVENTS.get(&*self.db, &root)? else { continue };
            let Some(pdu) = self.pdu_by_short(root)? else { continue };
            if let Some(user) = participant
                && pdu.sender.as_str() != user
                && !self.replied_in_thread(root, user)?
            {
                continue;
            }
            if visible(stored.position, &pdu)? {
                events.push((stored.position, pdu));
            }
        }
        Ok(RelationsPage { events, next: if more { last } else { None } })
    }

    fn replied_in_thread(&self, root: u64, user: &str) -> Result<bool> {
        for row in RELATIONS
            .scan_prefix(&*self.db, &(root, "m.thread".to_owned()), Direction::Forward)?
            .take(SCAN_CAP)
        {
            if row?.1.0.sender == user {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_relation_needs_both_type_and_target() {
        let rel = relation_of(&json!({"m.relates_to": {"rel_type": "m.annotation",
            "event_id": "$a", "key": "👍"}}))
        .unwrap();
        assert_eq!(rel.rel_type, "m.annotation");
        assert_eq!(rel.parent, "$a");
        assert_eq!(rel.key.as_deref(), Some("👍"));
        // A plain reply has no rel_type: not a relation for aggregation.
        assert!(
            relation_of(&json!({"m.relates_to": {"m.in_reply_to": {"event_id": "$a"}}})).is_none()
        );
        assert!(relation_of(&json!({"m.relates_to": {"rel_type": "m.thread"}})).is_none());
        assert!(relation_of(&json!({"m.relates_to": "nonsense"})).is_none());
    }
}
