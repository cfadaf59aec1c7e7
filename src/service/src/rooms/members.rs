//! Memberships as the rooms store them: both directions of the member index (room ->
//! users, user -> rooms), and what read paths ask of it (a user's room list, joined
//! members, member summaries, display names), through the shared caches that writers
//! of the index clear (`memberships_written`).

use std::{
    collections::{BTreeMap, HashSet},
    sync::Arc,
};

use ruma::{
    OwnedMxcUri, OwnedRoomId, OwnedUserId, RoomId, UserId,
    events::{StateEventType, room::member::MembershipState},
};
use serde_json::Value;
use trellis_core::Result;
use trellis_store::{Batch, Table, catalog};

use super::{Rooms, short::Kind, stream::Retired};

pub(super) const ROOM_MEMBERS: Table<(u64, String), String> = Table::new(&catalog::ROOM_MEMBERS);
pub(super) const USER_ROOMS: Table<(String, u64), String> = Table::new(&catalog::USER_ROOMS);

/// Members a summary keeps by name: five heroes, and one more in case the reader is
/// among them.
const SUMMARY_FIRST_MEMBERS: usize = 6;

/// A room in a user's list (see [`Rooms::user_rooms`]).
#[derive(Debug, Clone)]
pub struct UserRoom {
    pub room_id: String,
    /// The user's current membership.
    pub membership: MembershipState,
    /// Stream position of the room's newest event: nothing in the room, the user's
    /// membership included, changed after it.
    pub last_position: u64,
    /// See [`RoomRecord::bump`].
    pub bump_position: u64,
}

/// Joined and invited members of a room: how many, and the first by user id.
#[derive(Debug, Clone, Default)]
pub struct MemberSummary {
    pub joined: usize,
    pub invited: usize,
    pub first: Vec<String>,
}

impl Rooms {
    /// Wakes the user and everyone sharing a room with them (through the rooms' keys),
    /// once the write `retired` ended is visible: presence and device-list changes.
    pub fn wake_co_members(&self, retired: Retired, user: &str) {
        self.stream.wake_for(retired, &super::stream::user_key(user));
        self.stream.wake_for(retired, crate::appservice::extensions::CO_MEMBER_CHANGES_KEY);
        match self.rooms_of(user, &MembershipState::Join) {
            Ok(rooms) => {
                for room in rooms {
                    self.stream.wake_for(retired, &room);
                }
            }
            Err(e) => tracing::warn!(user, error = %e, "reading a user's rooms failed"),
        }
    }

    /// Records a user's membership in both directions (room -> users, user -> rooms).
    /// Whoever writes the batch calls [`Self::memberships_written`] after it.
    pub(super) fn index_membership(
        &self,
        batch: &mut Batch,
        room_short: u64,
        user: &str,
        membership: &str,
    ) {
        ROOM_MEMBERS.put(batch, &(room_short, user.to_owned()), &membership.to_owned());
        USER_ROOMS.put(batch, &(user.to_owned(), room_short), &membership.to_owned());
    }

    /// Drops the cached room lists once a batch changing memberships is written: a
    /// list read before the write is then never kept. Membership changes are rare next
    /// to syncs, so all lists go rather than tracking whose changed.
    pub(super) fn memberships_written(&self) {
        self.user_rooms.clear();
        self.logs.clear();
    }

    /// The membership of `user_id` in the room, if any.
    pub fn membership(&self, room_id: &str, user_id: &str) -> Result<Option<MembershipState>> {
        let Some(room) = self.short.get(Kind::Room, room_id)? else { return Ok(None) };
        let stored = ROOM_MEMBERS.get(&*self.db, &(room, user_id.to_owned()))?;
        Ok(stored.map(MembershipState::from))
    }

    /// Every room in `user_id`'s list (any membership, forgotten rooms excepted), with
    /// what a sync needs to skip the rooms where nothing happened: one scan of the
    /// user's index and one record read per room.
    pub fn user_rooms(&self, user_id: &str) -> Result<Vec<UserRoom>> {
        let user = user_id.to_owned();
        let memberships = self.user_rooms.get_or_load(user.clone(), || {
            USER_ROOMS
                .scan_prefix(&*self.db, &user, trellis_store::Direction::Forward)?
                .map(|entry| entry.map(|((_, room), membership)| (room, membership)))
                .collect::<Result<Vec<_>, _>>()
        })?;
        let mut out = Vec::with_capacity(memberships.len());
        for (room, membership) in memberships.iter() {
            if let Some(r) = self.record(*room)? {
                out.push(UserRoom {
                    room_id: r.room_id.clone(),
                    membership: MembershipState::from(membership.as_str()),
                    last_position: r.last_position,
                    bump_position: r.bump(),
                });
            }
        }
        Ok(out)
    }

    /// Rooms in which `user_id` has `membership`.
    pub fn rooms_of(&self, user_id: &str, membership: &MembershipState) -> Result<Vec<String>> {
        let rooms = self.user_rooms(user_id)?.into_iter();
        Ok(rooms.filter(|r| r.membership == *membership).map(|r| r.room_id).collect())
    }

    /// `GET /joined_rooms`: the rooms `user_id` is joined to.
    pub fn joined_rooms(&self, user_id: &UserId) -> Result<Vec<OwnedRoomId>> {
        let rooms = self.rooms_of(user_id.as_str(), &MembershipState::Join)?;
        Ok(rooms.into_iter().filter_map(|r| OwnedRoomId::try_from(r).ok()).collect())
    }

    /// Whether `a` and `b` are both joined to at least one room (or are the same user):
    /// `GET /mutual_rooms` (v1.19): a page of the rooms both `user` and `other` are
    /// joined to (sorted, so pages are stable), their count and the next page's token.
    pub fn mutual_rooms(
        &self,
        user: &str,
        other: &str,
        from: Option<&str>,
    ) -> Result<(Vec<String>, usize, Option<String>)> {
        const PAGE: usize = 100;
        if user == other {
            return Err(trellis_core::Error::invalid_param("That is your own user id"));
        }
        let start = match from {
            None => 0,
            Some(token) => token
                .strip_prefix('m')
                .and_then(|n| n.parse::<usize>().ok())
                .ok_or_else(|| trellis_core::Error::invalid_param("Invalid from token"))?,
        };
        let mut shared = self.shared_rooms(user, other)?;
        shared.sort();
        let count = shared.len();
        let end = start.saturating_add(PAGE).min(count);
        let page = shared.get(start.min(count)..end).map(<[String]>::to_vec).unwrap_or_default();
        let next = (end < count).then(|| format!("m{end}"));
        Ok((page, count, next))
    }

    /// what lets one see the other's presence.
    pub fn share_a_room(&self, a: &str, b: &str) -> Result<bool> {
        if a == b {
            return Ok(true);
        }
        Ok(!self.shared_rooms(a, b)?.is_empty())
    }

    /// The rooms both `a` and `b` are joined to.
    fn shared_rooms(&self, a: &str, b: &str) -> Result<Vec<String>> {
        let mine: HashSet<String> = self.rooms_of(a, &MembershipState::Join)?.into_iter().collect();
        let theirs = self.rooms_of(b, &MembershipState::Join)?;
        Ok(theirs.into_iter().filter(|room| mine.contains(room)).collect())
    }

    /// Joined members of a room as of its current state. Kept per state snapshot, which
    /// changes with every membership change (the member index is written in the same
    /// batch as the room's new snapshot), so an entry is never stale for its snapshot.
    pub fn joined_members(&self, room_id: &str) -> Result<Arc<Vec<String>>> {
        let Some(short) = self.short.get(Kind::Room, room_id)? else { return Ok(Arc::default()) };
        let Some(record) = self.record(short)? else { return Ok(Arc::default()) };
        let (hit, generation) = self.joined.get(&short);
        if let Some(hit) = hit
            && hit.0 == record.state
        {
            return Ok(hit.1.clone());
        }
        let members = Arc::new(self.members(room_id, &MembershipState::Join)?);
        self.joined.insert(short, Arc::new((record.state, members.clone())), generation);
        Ok(members)
    }

    /// What a sync's room summary says of the members, as of the room's current state.
    pub fn member_summary(&self, room_id: &str) -> Result<MemberSummary> {
        let Some(short) = self.short.get(Kind::Room, room_id)? else {
            return Ok(Default::default());
        };
        let Some(record) = self.record(short)? else { return Ok(Default::default()) };
        let (hit, generation) = self.summaries.get(&short);
        if let Some(hit) = hit
            && hit.0 == record.state
        {
            return Ok(hit.1.clone());
        }
        let (joined, invited) = self.joined_and_invited(room_id)?;
        let mut first: Vec<String> = joined.iter().chain(invited.iter()).cloned().collect();
        first.sort();
        first.truncate(SUMMARY_FIRST_MEMBERS);
        let summary = MemberSummary { joined: joined.len(), invited: invited.len(), first };
        self.summaries.insert(short, Arc::new((record.state, summary.clone())), generation);
        Ok(summary)
    }

    /// Joined and invited members of a room, in one scan.
    pub fn joined_and_invited(&self, room_id: &str) -> Result<(Vec<String>, Vec<String>)> {
        let Some(room) = self.short.get(Kind::Room, room_id)? else {
            return Ok(Default::default());
        };
        let (mut joined, mut invited) = (Vec::new(), Vec::new());
        for entry in
            ROOM_MEMBERS.scan_prefix(&*self.db, &room, trellis_store::Direction::Forward)?
        {
            let ((_, user), m) = entry?;
            match m.as_str() {
                "join" => joined.push(user),
                "invite" => invited.push(user),
                _ => {}
            }
        }
        Ok((joined, invited))
    }

    /// Members of a room with `membership`.
    pub fn members(&self, room_id: &str, membership: &MembershipState) -> Result<Vec<String>> {
        let Some(room) = self.short.get(Kind::Room, room_id)? else { return Ok(Vec::new()) };
        let mut out = Vec::new();
        for entry in
            ROOM_MEMBERS.scan_prefix(&*self.db, &room, trellis_store::Direction::Forward)?
        {
            let ((_, user), m) = entry?;
            if m == membership.as_str() {
                out.push(user);
            }
        }
        Ok(out)
    }

    /// Whether a user of `server` has one of `memberships` in the room (one scan).
    pub fn has_member_from(
        &self,
        room_id: &str,
        server: &str,
        memberships: &[MembershipState],
    ) -> Result<bool> {
        let Some(room) = self.short.get(Kind::Room, room_id)? else { return Ok(false) };
        for entry in
            ROOM_MEMBERS.scan_prefix(&*self.db, &room, trellis_store::Direction::Forward)?
        {
            let ((_, user), m) = entry?;
            if memberships.iter().any(|wanted| wanted.as_str() == m)
                && user.split_once(':').is_some_and(|(_, s)| s == server)
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The display names in the room's current state of `users` (`None`: no member
    /// event or no name), read from one state snapshot.
    pub fn display_names(&self, room_id: &str, users: &[String]) -> Result<Vec<Option<String>>> {
        #[derive(serde::Deserialize)]
        struct Named {
            displayname: Option<String>,
        }
        let Some((_, room)) = self.room(room_id)? else { return Ok(vec![None; users.len()]) };
        let state = self.state_at(room.state)?;
        let kind = StateEventType::RoomMember;
        Ok(users
            .iter()
            .map(|user| {
                let event = self.state_event_cached(&state, &kind, user)?;
                serde_json::from_str::<Named>(event.pdu.content.get()).ok()?.displayname
            })
            .collect())
    }
}

/// A joined member as the room shows them: the profile in their membership event.
pub struct MemberProfile {
    pub displayname: Option<String>,
    pub avatar_url: Option<OwnedMxcUri>,
}

/// `GET /rooms/{roomId}/joined_members`: the joined members of a room `viewer` is joined
/// to, each with the profile the room shows.
pub fn joined_profiles(
    services: &crate::Services,
    viewer: &UserId,
    room_id: &RoomId,
) -> Result<BTreeMap<OwnedUserId, MemberProfile>> {
    // Members read it; anyone may for a world-readable room, as its state (previews).
    if super::viewer::require_joined(services, room_id, viewer).is_err() {
        let visibility =
            services.rooms.state_of(room_id.as_str(), "m.room.history_visibility", "")?;
        let content: Value =
            visibility.and_then(|p| serde_json::from_str(p.content.get()).ok()).unwrap_or_default();
        if content["history_visibility"] != "world_readable" {
            return Err(trellis_core::Error::forbidden("You are not a member of this room"));
        }
    }
    let (rooms, room) = (&services.rooms, room_id.as_str());
    let mut joined = BTreeMap::new();
    for user in rooms.members(room, &MembershipState::Join)? {
        let Ok(user_id) = OwnedUserId::try_from(user.as_str()) else { continue };
        let content = rooms
            .state_of(room, "m.room.member", &user)?
            .and_then(|pdu| serde_json::from_str::<Value>(pdu.content.get()).ok())
            .unwrap_or(Value::Null);
        let profile = MemberProfile {
            displayname: content["displayname"].as_str().map(str::to_owned),
            avatar_url: content["avatar_url"].as_str().map(OwnedMxcUri::from),
        };
        joined.insert(user_id, profile);
    }
    Ok(joined)
}
