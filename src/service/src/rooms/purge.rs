//! Purging a room from this server (an admin's room deletion): its timeline, events,
//! indexes, memberships, receipts, notifications and search entries go, so that no
//! read path can serve anything of it again. The room must be shut down first (no user
//! of this server joined); state snapshots and interned ids stay behind unreferenced,
//! as do events fetched only to authorise others (outliers), which no read path serves
//! without the room.

use std::sync::Arc;

use ruma::{RoomId, events::room::member::MembershipState};
use trellis_core::{Error, Result};
use trellis_store::{Batch, Direction};

use super::{
    members::{ROOM_MEMBERS, USER_ROOMS},
    public::PUBLIC_ROOMS,
    reads::{EVENTS, ROOMS, TIMELINE},
    relations::{ANNOTATIONS, RELATED, RELATIONS, THREAD_LATEST, THREADS},
    short::Kind,
    visibility::{EVENT_TIMES, MEMBER_CHANGES, MEMBERSHIP_LOG, VISIBILITY_LOG},
};
use crate::Services;

/// Deletes written per batch, so that a big room never builds one huge write.
const BATCH_DELETES: usize = 10_000;

/// What a purge removed.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Purged {
    pub events: u64,
}

struct Writer<'a> {
    services: &'a Services,
    batch: Batch,
    pending: usize,
}

impl Writer<'_> {
    async fn counted(&mut self, n: usize) -> Result<()> {
        self.pending += n;
        if self.pending >= BATCH_DELETES {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<()> {
        self.pending = 0;
        crate::commit(&self.services.db, std::mem::take(&mut self.batch)).await
    }
}

/// Removes everything this server keeps of `room_id`; 400 while one of its users is
/// joined, unless `force`.
pub async fn purge(services: &Arc<Services>, room_id: &RoomId, force: bool) -> Result<Purged> {
    let rooms = &services.rooms;
    let room_id = room_id.as_str();
    let lock = services.timeline.room_lock(room_id);
    let _room = lock.lock().await;
    let Some(short) = rooms.short.get(Kind::Room, room_id)? else {
        return Ok(Purged::default());
    };
    let suffix = format!(":{}", services.server_name());
    let mut users = Vec::new();
    for row in ROOM_MEMBERS.scan_prefix(&*rooms.db, &short, Direction::Forward)? {
        let ((_, user), membership) = row?;
        if !force && user.ends_with(&suffix) && membership == MembershipState::Join.as_str() {
            return Err(Error::invalid_param("Users are still joined to this room"));
        }
        users.push(user);
    }
    let mut w = Writer { services, batch: Batch::new(), pending: 0 };
    let mut purged = Purged::default();
    if let Some(index) = services.search.index() {
        index.remove_room(room_id);
    }
    for row in TIMELINE.scan_prefix(&*rooms.db, &short, Direction::Forward)? {
        let ((_, position), event) = row?;
        TIMELINE.delete(&mut w.batch, &(short, position));
        EVENTS.delete(&mut w.batch, &event);
        RELATED.delete(&mut w.batch, &event);
        THREAD_LATEST.delete(&mut w.batch, &event);
        let mut n = 4;
        for rel in RELATIONS.scan_prefix(&*rooms.db, &event, Direction::Forward)? {
            RELATIONS.delete(&mut w.batch, &rel?.0);
            n += 1;
        }
        for ann in ANNOTATIONS.scan_prefix(&*rooms.db, &event, Direction::Forward)? {
            ANNOTATIONS.delete(&mut w.batch, &ann?.0);
            n += 1;
        }
        purged.events += 1;
        w.counted(n).await?;
    }
    for row in MEMBERSHIP_LOG.scan_prefix(&*rooms.db, &short, Direction::Forward)? {
        let (key, _) = row?;
        // The membership changes are keyed by position first: each log row names one.
        MEMBER_CHANGES.delete(&mut w.batch, &(key.2, short));
        MEMBERSHIP_LOG.delete(&mut w.batch, &key);
        w.counted(2).await?;
    }
    for row in VISIBILITY_LOG.scan_prefix(&*rooms.db, &short, Direction::Forward)? {
        VISIBILITY_LOG.delete(&mut w.batch, &row?.0);
        w.counted(1).await?;
    }
    for row in EVENT_TIMES.scan_prefix(&*rooms.db, &short, Direction::Forward)? {
        EVENT_TIMES.delete(&mut w.batch, &row?.0);
        w.counted(1).await?;
    }
    for row in THREADS.scan_prefix(&*rooms.db, &short, Direction::Forward)? {
        THREADS.delete(&mut w.batch, &row?.0);
        w.counted(1).await?;
    }
    crate::realtime::receipts::purge_room_into(&rooms.db, &mut w.batch, room_id)?;
    let local: Vec<String> = users.iter().filter(|u| u.ends_with(&suffix)).cloned().collect();
    services.notifier.purge_room_into(&mut w.batch, room_id, &local)?;
    for user in &users {
        ROOM_MEMBERS.delete(&mut w.batch, &(short, user.clone()));
        USER_ROOMS.delete(&mut w.batch, &(user.clone(), short));
    }
    PUBLIC_ROOMS.delete(&mut w.batch, &room_id.to_owned());
    ROOMS.delete(&mut w.batch, &short);
    w.flush().await?;
    // What readers hold in memory of the room, dropped once the rows are gone (a read
    // meanwhile may have cached them again).
    rooms.cache.clear();
    services.notifier.forget_room(room_id);
    rooms.records.invalidate(&short);
    rooms.joined.invalidate(&short);
    rooms.summaries.invalidate(&short);
    rooms.position_states.clear();
    rooms.memberships_written();
    tracing::info!(room = room_id, events = purged.events, "room purged");
    Ok(purged)
}
