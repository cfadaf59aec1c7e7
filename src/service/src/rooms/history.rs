//! Paging through a room's history: `/messages`, `/context` and `/members?at=`. Each
//! reads the stream around a position, keeps what the reader sees and what the client's
//! filter lets through, and `/messages` fetches older history from other servers when
//! this one has no more.

use std::{
    collections::BTreeSet,
    ops::Bound::{Excluded, Included, Unbounded},
    sync::Arc,
};

use ruma::{
    RoomId, UserId,
    api::client::filter::RoomEventFilter,
    events::{TimelineEventType, room::member::MembershipState},
};
use trellis_core::{Error, Result};

use crate::{
    Services,
    federation::backfill,
    realtime::sync::SyncToken,
    rooms::{Pdu, filter},
};

/// The most events one page returns.
pub const MAX_PAGE: usize = 1000;

/// The gap in a room's history that a client's token names, as the stream position
/// just after it. A pagination token `t<pos>` is the gap before `pos`. A sync token
/// `s<pos>` comes after everything that sync delivered, `pos` included, so it is the
/// gap before `pos + 1`: paging back from it starts with the sync's newest event, and
/// paging forward from it starts with the first event the sync did not deliver.
pub fn parse_token(token: &str) -> Result<u64> {
    token
        .strip_prefix('t')
        .and_then(|p| p.parse().ok())
        .or_else(|| SyncToken::parse(token).map(|t| t.position.saturating_add(1)))
        .ok_or_else(|| Error::invalid_param("Invalid pagination token"))
}

/// The pagination token of the gap before stream position `gap`.
pub fn token(gap: u64) -> String {
    format!("t{gap}")
}

/// What the reader gets of the room: history visibility and ignored users
/// (see [`crate::rooms::viewer`]).
pub type Sees<'a> = &'a (dyn Fn(u64, &Pdu) -> bool + Sync);

/// A `/messages` request, its tokens already parsed into gaps.
pub struct MessagesQuery<'a> {
    pub room_id: &'a str,
    pub backward: bool,
    pub from: Option<u64>,
    pub to: Option<u64>,
    pub limit: usize,
    pub filter: &'a RoomEventFilter,
}

pub struct MessagesPage {
    /// The gap the page starts from.
    pub start: u64,
    /// The gap to continue from, when there is more.
    pub end: Option<u64>,
    pub events: Vec<(u64, Arc<Pdu>)>,
    /// The member events of the page's senders, for a lazy-loading filter.
    pub members: Vec<Pdu>,
}

/// `/messages`: a page of the room's history from a gap, newest first going backward.
pub async fn messages(
    services: &Arc<Services>,
    q: MessagesQuery<'_>,
    sees: Sees<'_>,
) -> Result<MessagesPage> {
    let rooms = &services.rooms;
    let room_id = q.room_id;
    let limit = q.limit.clamp(1, MAX_PAGE);
    let accept = |pos: u64, pdu: &Pdu| -> Result<bool> {
        Ok(filter::passes(q.filter, room_id, pdu) && sees(pos, pdu))
    };
    let (start, page, end) = if q.backward {
        let from = q.from.unwrap_or_else(|| rooms.stream.visible() + 1);
        let lo = q.to.map_or(Unbounded, Included);
        let mut page = rooms.scan_timeline(room_id, lo, Excluded(from), false, limit, accept)?;
        // The start of what this server has is not the start of the room: ask another
        // server in it for the history before (once per page).
        if !page.more && page.events.len() < limit && q.to.is_none() {
            let wanted = limit - page.events.len();
            let fetched = backfill::backfill(services, room_id, wanted).await;
            if fetched.as_ref().is_ok_and(|n| *n > 0) {
                page = rooms.scan_timeline(room_id, lo, Excluded(from), false, limit, accept)?;
            }
        }
        // More may be had from other servers even when nothing more is here.
        let more = page.more
            || (q.to.is_none() && page.last.is_some() && backfill::more_remote(services, room_id)?);
        let end = page.last.filter(|_| more);
        (from, page, end)
    } else {
        let from = q.from.unwrap_or(0);
        let hi = q.to.map_or(Unbounded, Excluded);
        let page = rooms.scan_timeline(room_id, Included(from), hi, true, limit, accept)?;
        // An end whenever there is a chunk (clients page on from it as new events come)
        // or more to scan; none only when nothing came and nothing is left.
        let end = page.last.filter(|_| page.more || !page.events.is_empty()).map(|p| p + 1);
        (from, page, end)
    };
    let members = if filter::lazy_members(q.filter) {
        let senders: BTreeSet<&str> = page.events.iter().map(|(_, p)| p.sender.as_str()).collect();
        let mut members = Vec::new();
        for sender in senders {
            members.extend(rooms.state_of(room_id, "m.room.member", sender)?);
        }
        members
    } else {
        Vec::new()
    };
    Ok(MessagesPage { start, end, events: page.events, members })
}

/// One room as a user reads it at once (the deprecated `/initialSync` endpoints).
pub struct RoomSnapshot {
    pub membership: Option<MembershipState>,
    /// The state the user may read (see [`crate::rooms::viewer::readable_state`]).
    pub state: Vec<Pdu>,
    /// The newest `limit` events the user may see, newest first.
    pub messages: MessagesPage,
    /// Whether the room is published in the room directory.
    pub published: bool,
}

/// `GET /rooms/{roomId}/initialSync` and each room of `GET /initialSync`: the room's
/// state, its latest events and the user's membership, for a user who may read it.
pub async fn snapshot(
    services: &Arc<Services>,
    user: &UserId,
    room_id: &RoomId,
    limit: usize,
    sees: Sees<'_>,
) -> Result<RoomSnapshot> {
    let state = crate::rooms::viewer::readable_state(services, user, room_id)?;
    let room = room_id.as_str();
    let membership = services.rooms.membership(room, user.as_str())?;
    let filter = RoomEventFilter::default();
    let query = MessagesQuery {
        room_id: room,
        backward: true,
        from: None,
        to: None,
        limit,
        filter: &filter,
    };
    let messages = messages(services, query, sees).await?;
    let published = services.public_rooms.visibility(&services.rooms, room)?;
    Ok(RoomSnapshot { membership, state, messages, published })
}

pub struct Context {
    /// The gap before the earliest event returned.
    pub start: u64,
    /// The gap after the latest event returned.
    pub end: u64,
    pub before: Vec<(u64, Arc<Pdu>)>,
    pub after: Vec<(u64, Arc<Pdu>)>,
    /// The room's state at the last event returned (only the members the events need,
    /// for a lazy-loading filter).
    pub state: Vec<Pdu>,
}

/// `/context`: up to `limit` events around `event` (at stream position `position`),
/// half before it and half after.
pub fn context(
    services: &Services,
    room_id: &str,
    (position, event): (u64, &Pdu),
    limit: usize,
    filter: &RoomEventFilter,
    sees: Sees<'_>,
) -> Result<Context> {
    let rooms = &services.rooms;
    let limit = limit.min(MAX_PAGE);
    let accept = |pos: u64, pdu: &Pdu| -> Result<bool> {
        Ok(filter::passes(filter, room_id, pdu) && sees(pos, pdu))
    };
    let before_count = limit / 2;
    let after_count = limit - before_count;
    let before =
        rooms.scan_timeline(room_id, Unbounded, Excluded(position), false, before_count, accept)?;
    let after =
        rooms.scan_timeline(room_id, Excluded(position), Unbounded, true, after_count, accept)?;
    let lazy = filter::lazy_members(filter);
    let mut senders: BTreeSet<&str> = BTreeSet::new();
    if lazy {
        senders.insert(event.sender.as_str());
        senders.extend(before.events.iter().chain(&after.events).map(|(_, p)| p.sender.as_str()));
    }
    // The spec's `state` is the room's state at the last event returned.
    let last = after.events.last().map_or(event, |(_, p)| p);
    let state = rooms
        .state_events(&rooms.state_after_event(last)?)?
        .into_iter()
        .filter(|p| {
            !lazy
                || p.kind != TimelineEventType::RoomMember
                || p.state_key.as_deref().is_some_and(|k| senders.contains(k))
        })
        .collect();
    Ok(Context {
        start: before.last.unwrap_or(position),
        end: after.last.unwrap_or(position) + 1,
        before: before.events,
        after: after.events,
        state,
    })
}

/// A `/members` request: the member events now, or just before the gap `at`, of the
/// members whose membership is `membership` and not `not_membership`.
pub struct MembersQuery<'a> {
    pub room_id: &'a str,
    pub user_id: &'a str,
    pub at: Option<u64>,
    pub membership: Option<&'a MembershipState>,
    pub not_membership: Option<&'a MembershipState>,
}

/// `/members`. A user who left sees the members as they were when they left.
pub fn member_events(services: &Services, q: MembersQuery<'_>) -> Result<Vec<Pdu>> {
    let rooms = &services.rooms;
    let joined = rooms.membership(q.room_id, q.user_id)? == Some(MembershipState::Join);
    let mut events = if q.at.is_none() && joined {
        let mut state = rooms.current_state(q.room_id)?;
        state.retain(|p| p.kind == TimelineEventType::RoomMember);
        state
    } else {
        let left_at = rooms.last_membership_position(q.room_id, q.user_id)?.filter(|_| !joined);
        let position = match (q.at, left_at) {
            (Some(a), Some(l)) => a.saturating_sub(1).min(l),
            (Some(a), None) => a.saturating_sub(1),
            (None, Some(l)) => l,
            (None, None) => rooms.stream.visible(),
        };
        rooms.members_at(q.room_id, position)?.into_iter().map(|(_, p)| p).collect()
    };
    if q.membership.is_some() || q.not_membership.is_some() {
        events.retain(|pdu| {
            let membership = membership_of(pdu);
            q.membership.is_none_or(|w| Some(w.as_str()) == membership.as_deref())
                && q.not_membership.is_none_or(|u| Some(u.as_str()) != membership.as_deref())
        });
    }
    Ok(events)
}

fn membership_of(pdu: &Pdu) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Content {
        membership: Option<String>,
    }
    serde_json::from_str::<Content>(pdu.content.get()).ok()?.membership
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_and_pagination_tokens_name_the_same_gaps() {
        // A sync that delivered up to position 41 leaves off before 42, as does `t42`.
        assert_eq!(parse_token("s41").unwrap(), 42);
        assert_eq!(parse_token("t42").unwrap(), 42);
        assert_eq!(parse_token("s41_40").unwrap(), 42);
        assert_eq!(parse_token(&token(42)).unwrap(), 42);
        assert!(parse_token("x1").is_err());
        assert!(parse_token("t").is_err());
        assert_eq!(parse_token(&format!("s{}", u64::MAX)).unwrap(), u64::MAX);
    }
}
