//! Serving a room's DAG to other servers: single events, the state at an event, auth
//! chains, missing events between two points and backfill. Only servers with a user in
//! the room (and allowed by its ACL) are served.

use ruma::events::room::member::MembershipState;
use std::collections::{HashSet, VecDeque};

use ruma::OwnedEventId;
use trellis_core::{Error, Result};

use crate::{Services, rooms::Pdu};

/// The most events one answer walks over.
pub const MAX_EVENTS: usize = 100;

/// 403 unless `origin` has a member in the room and its ACL lets it in.
pub fn require_in_room(services: &Services, room_id: &str, origin: &str) -> Result<()> {
    if services.rooms.room(room_id)?.is_none() {
        return Err(Error::not_found("Unknown room"));
    }
    if !super::acl::allows(services, room_id, origin)? {
        return Err(Error::forbidden("Server is banned from the room by ACL"));
    }
    let memberships = [
        MembershipState::Join,
        MembershipState::Invite,
        MembershipState::Leave,
        MembershipState::Knock,
        MembershipState::Ban,
    ];
    if !services.rooms.has_member_from(room_id, origin, &memberships)? {
        return Err(Error::forbidden("Your server has no user in this room"));
    }
    Ok(())
}

/// A stored event of any room for `origin`, if that server may see its room.
pub fn event_for(services: &Services, origin: &str, event_id: &str) -> Result<Pdu> {
    let not_found = || Error::not_found("Event not found");
    let event = services.rooms.cached_event(event_id)?.ok_or_else(not_found)?;
    let room_id = event.pdu.room_id.as_ref().map(|r| r.to_string()).ok_or_else(not_found)?;
    require_in_room(services, &room_id, origin)?;
    services.rooms.pdu_for_federation(&room_id, event_id)?.ok_or_else(not_found)
}

/// Events reached backwards through `prev_events` from `from` (included when
/// `include_start`), stopping at `stop` and below `min_depth`; newest (deepest) first.
pub fn walk_back(
    services: &Services,
    room_id: &str,
    from: &[OwnedEventId],
    stop: &[OwnedEventId],
    include_start: bool,
    limit: usize,
    min_depth: u64,
) -> Result<Vec<Pdu>> {
    let limit = limit.min(MAX_EVENTS);
    let stop: HashSet<&OwnedEventId> = stop.iter().collect();
    let mut seen: HashSet<OwnedEventId> = HashSet::new();
    let mut queue: VecDeque<OwnedEventId> = VecDeque::new();
    for id in from {
        if include_start {
            queue.push_back(id.clone());
        } else if let Some(pdu) = services.rooms.pdu_for_federation(room_id, id.as_str())? {
            queue.extend(pdu.prev_events.iter().cloned());
        }
    }
    let mut found: Vec<Pdu> = Vec::new();
    while let Some(id) = queue.pop_front() {
        if found.len() >= limit {
            break;
        }
        if stop.contains(&id) || !seen.insert(id.clone()) {
            continue;
        }
        let Some(pdu) = services.rooms.pdu_for_federation(room_id, id.as_str())? else { continue };
        if pdu.depth < min_depth {
            continue;
        }
        queue.extend(pdu.prev_events.iter().cloned());
        found.push(pdu);
    }
    found.sort_by_key(|p| std::cmp::Reverse(p.depth));
    Ok(found)
}

/// The state before `event_id` and the auth chain of it, as events.
pub fn state_at(
    services: &Services,
    room_id: &str,
    event_id: &str,
) -> Result<(Vec<Pdu>, Vec<Pdu>)> {
    let rooms = &services.rooms;
    let ids = rooms
        .state_ids_before(event_id)?
        .ok_or_else(|| Error::not_found("No state known at that event"))?;
    let mut state = Vec::with_capacity(ids.len());
    for id in &ids {
        if let Some(pdu) = rooms.pdu_for_federation(room_id, id.as_str())? {
            state.push(pdu);
        }
    }
    let chain = rooms.auth_chain(&ids)?;
    Ok((state, chain))
}
