//! Device list tracking: which users' devices or keys changed between two stream
//! positions, as seen by one user (`device_lists` in sync, `keys/changes`). A user must
//! hear about everyone they share a room with whose keys changed, about everyone who
//! newly shares a room with them, and about those who no longer share any.

use ruma::events::room::member::MembershipState;
use std::collections::{BTreeSet, HashMap, HashSet};

use trellis_core::Result;
use trellis_store::{Batch, Direction, Table, catalog};

use crate::Services;

/// position -> user id whose devices or keys changed
const KEY_CHANGES: Table<u64, String> = Table::new(&catalog::KEY_CHANGES);

/// The stream's note for key changes of anyone (see `StreamPositions::note_change`).
const KEY_CHANGES_NOTE: &str = "key_changes";

/// Commits `batch` with a key-change entry for each of `changed` (user ids) at new
/// stream positions, then wakes everyone sharing a room with them, so that they learn
/// to re-query those users' keys. Without `changed` it is a plain commit.
pub(crate) async fn commit_with_changes(
    db: &trellis_store::Db,
    rooms: &crate::rooms::Rooms,
    mut batch: Batch,
    changed: &[String],
) -> Result<()> {
    let stream = &rooms.stream;
    let tickets: Vec<_> = changed
        .iter()
        .map(|user| {
            let ticket = stream.dispatch();
            KEY_CHANGES.put(&mut batch, &ticket.position, user);
            stream.note_change(KEY_CHANGES_NOTE, ticket.position);
            ticket
        })
        .collect();
    let result = crate::commit(db, batch).await;
    let retired: Vec<_> = tickets.into_iter().map(|ticket| stream.retire(ticket)).collect();
    for (user, retired) in changed.iter().zip(retired) {
        rooms.wake_co_members(retired, user);
    }
    result
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct DeviceLists {
    pub changed: Vec<String>,
    pub left: Vec<String>,
}

impl DeviceLists {
    pub fn is_empty(&self) -> bool {
        self.changed.is_empty() && self.left.is_empty()
    }
}

/// Whose device lists are being followed: one user (sync, `keys/changes`), or every
/// user of an application service at once (its transactions, MSC3202).
pub trait Viewer {
    /// One of the users followed.
    fn is_me(&self, user: &str) -> bool;
    /// Whether one of them is joined to `room`.
    fn in_room(&mut self, services: &Services, room: &str) -> Result<bool>;

    /// Whether `user` is one of them or joined to a room one of them is in.
    fn shares_a_room(&mut self, services: &Services, user: &str) -> Result<bool> {
        if self.is_me(user) {
            return Ok(true);
        }
        for room in services.rooms.rooms_of(user, &MembershipState::Join)? {
            if self.in_room(services, &room)? {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// One user and the rooms they are joined to.
struct OneUser<'a> {
    user_id: &'a str,
    rooms: HashSet<String>,
}

impl Viewer for OneUser<'_> {
    fn is_me(&self, user: &str) -> bool {
        user == self.user_id
    }

    fn in_room(&mut self, _: &Services, room: &str) -> Result<bool> {
        Ok(self.rooms.contains(room))
    }
}

/// What changed for `user_id` in `(since, now]`.
pub fn changes(services: &Services, user_id: &str, since: u64, now: u64) -> Result<DeviceLists> {
    if nothing_changed(services, since, now) {
        return Ok(DeviceLists::default());
    }
    let rooms = services.rooms.rooms_of(user_id, &MembershipState::Join)?.into_iter().collect();
    changes_for(services, &mut OneUser { user_id, rooms }, since, now)
}

/// Most syncs follow a message: neither a key nor a membership changed anywhere since
/// the token, and the scans of [`changes_for`] would find nothing.
pub fn nothing_changed(services: &Services, since: u64, now: u64) -> bool {
    let stream = &services.rooms.stream;
    since >= now
        || (!stream.changed_after(KEY_CHANGES_NOTE, since)
            && !stream.changed_after(crate::rooms::visibility::MEMBER_CHANGES_NOTE, since))
}

/// What changed in `(since, now]` for the users `viewer` follows.
pub fn changes_for(
    services: &Services,
    viewer: &mut dyn Viewer,
    since: u64,
    now: u64,
) -> Result<DeviceLists> {
    if nothing_changed(services, since, now) {
        return Ok(DeviceLists::default());
    }
    let rooms = &services.rooms;
    let keys_changed = rooms.stream.changed_after(KEY_CHANGES_NOTE, since);
    let mut shared_cache: HashMap<String, bool> = HashMap::new();
    let mut shares = |viewer: &mut dyn Viewer, other: &str| -> Result<bool> {
        if let Some(&known) = shared_cache.get(other) {
            return Ok(known);
        }
        let any = viewer.shares_a_room(services, other)?;
        shared_cache.insert(other.to_owned(), any);
        Ok(any)
    };

    let mut changed = BTreeSet::new();
    let mut maybe_left = BTreeSet::new();
    let range = (std::ops::Bound::Excluded(&since), std::ops::Bound::Included(&now));
    if keys_changed {
        for row in KEY_CHANGES.scan_range(&*services.db, range.0, range.1, Direction::Forward)? {
            let (_, other) = row?;
            if shares(viewer, &other)? {
                changed.insert(other);
            }
        }
    }

    // Membership changes in the rooms the user is in, and in those they left: one scan
    // of every room's changes in the window, which is short for incremental syncs.
    let mut joined_cache: HashMap<String, HashSet<String>> = HashMap::new();
    for (room, mover) in rooms.member_changes(since, now)? {
        let is_me = viewer.is_me(&mover);
        let joined_here = viewer.in_room(services, &room)?;
        if !is_me && !joined_here {
            continue;
        }
        if !joined_cache.contains_key(&room) {
            let members: HashSet<String> =
                rooms.members(&room, &MembershipState::Join)?.into_iter().collect();
            joined_cache.insert(room.clone(), members);
        }
        let joined = &joined_cache[&room];
        if is_me {
            // The user joined (everyone there is new to them) or left (everyone there
            // may now share nothing with them).
            let target = if joined_here { &mut changed } else { &mut maybe_left };
            target.extend(joined.iter().filter(|m| !viewer.is_me(m)).cloned());
        } else if joined.contains(&mover) {
            changed.insert(mover);
        } else {
            maybe_left.insert(mover);
        }
    }
    let mut left = Vec::new();
    for other in maybe_left {
        if !shares(viewer, &other)? {
            changed.remove(&other);
            left.push(other);
        }
    }
    Ok(DeviceLists { changed: changed.into_iter().collect(), left })
}
