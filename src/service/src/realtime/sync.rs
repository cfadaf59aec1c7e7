//! `/sync` (v3): what changed for one user between two stream positions, per room
//! (timeline, state, ephemeral events, account data) and globally. Everything is read
//! at positions up to `now` (the stream's visible position when the sync started), so
//! the next sync starting at `now` neither misses nor repeats anything.

use ruma::events::room::member::MembershipState;
use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    ops::Bound,
    sync::Arc,
    time::Duration,
};

use ruma::{
    api::client::filter::{FilterDefinition, RoomEventFilter, RoomFilter},
    events::TimelineEventType,
    presence::PresenceState,
};
use serde_json::{Map, Value, json};
use tracing::Instrument;
use trellis_core::Result;

use crate::{
    Services,
    accounts::Session,
    realtime::{
        live,
        out::{ClientEvent, EventView, Key, Out, Unsigned},
    },
    rooms::{Pdu, filter, members::UserRoom, state::StateSet, viewer::Viewer},
};

/// Timeline events per room when the filter sets no limit.
const DEFAULT_TIMELINE_LIMIT: usize = 10;
const MAX_TIMELINE_LIMIT: usize = 100;

/// State event types an invitee or knocker sees of a room they are not in.
pub const STRIPPED_STATE: &[&str] = &[
    "m.room.create",
    "m.room.join_rules",
    "m.room.name",
    "m.room.avatar",
    "m.room.canonical_alias",
    "m.room.encryption",
    "m.room.topic",
];

/// A sync token: `s<position>`, or `s<position>_<to-device position>` when a response
/// carried only part of the waiting to-device messages (those after the second
/// position are still to come).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncToken {
    pub position: u64,
    pub to_device: u64,
}

impl SyncToken {
    pub fn parse(token: &str) -> Option<Self> {
        let rest = token.strip_prefix('s')?;
        let (position, to_device) = match rest.split_once('_') {
            Some((p, td)) => (p.parse().ok()?, td.parse().ok()?),
            None => {
                let p = rest.parse().ok()?;
                (p, p)
            }
        };
        (to_device <= position).then_some(Self { position, to_device })
    }

    pub fn render(&self) -> String {
        if self.to_device >= self.position {
            format!("s{}", self.position)
        } else {
            format!("s{}_{}", self.position, self.to_device)
        }
    }
}

pub struct SyncRequest<'a> {
    pub user_id: &'a str,
    pub localpart: &'a str,
    pub device_id: &'a str,
    /// `None` for an initial sync.
    pub since: Option<u64>,
    /// To-device messages up to here were delivered (and acknowledged).
    pub to_device_since: u64,
    pub full_state: bool,
    pub filter: &'a FilterDefinition,
    pub use_state_after: bool,
}

/// A built response and whether it carries anything (an empty incremental sync waits).
pub struct SyncResponse {
    pub body: Out,
    pub next_batch: String,
    /// `next_batch` as the client will send it back.
    pub token: SyncToken,
    /// The body carries to-device messages.
    pub has_to_device: bool,
    pub has_updates: bool,
    /// The user's rooms as this build read them, for the next wait's subscription
    /// ([`subscribe_rooms`]).
    pub rooms: Vec<UserRoom>,
}

/// An event as clients see it in a sync (no `room_id`: the room is the map key).
pub fn sync_event(pdu: &Pdu) -> Value {
    EventView { pdu, unsigned: &Unsigned::default() }.to_value()
}

/// An event as a reader (`user_id` on `device_id`) gets it outside a sync answer: with
/// its `age` and, for the device that sent it, its transaction id.
pub fn reader_event(pdu: &Pdu, user_id: &str, device_id: &str) -> Value {
    let now_ms = trellis_core::now_millis();
    EventView { pdu, unsigned: &Unsigned::for_reader(pdu, user_id, device_id, now_ms) }.to_value()
}

/// Adds the aggregations the spec bundles with `pdu` (for `viewer`) to `event`'s
/// `unsigned.m.relations`, rendering related events with `render`.
pub fn attach_bundle(
    services: &Services,
    pdu: &Pdu,
    viewer: &str,
    event: &mut Value,
    render: impl Fn(&Pdu) -> Value,
) -> Result<()> {
    let Some(relations) = bundled_relations(services, pdu, viewer, render)? else {
        return Ok(());
    };
    if !event["unsigned"].is_object() {
        event["unsigned"] = json!({});
    }
    event["unsigned"]["m.relations"] = relations;
    Ok(())
}

/// The `m.relations` object the spec bundles with `pdu` for `viewer`, if any.
fn bundled_relations(
    services: &Services,
    pdu: &Pdu,
    viewer: &str,
    render: impl Fn(&Pdu) -> Value,
) -> Result<Option<Value>> {
    let bundle = services.rooms.bundle(pdu, viewer)?;
    if bundle.is_empty() {
        return Ok(None);
    }
    let mut relations = Value::Object(Map::new());
    if let Some(edit) = &bundle.edit {
        relations["m.replace"] = render(edit);
    }
    if let Some((latest, count, participated)) = &bundle.thread {
        relations["m.thread"] = crate::object! {
            "latest_event": render(latest),
            "count": *count,
            "current_user_participated": *participated,
        };
    }
    if !bundle.references.is_empty() {
        let chunk: Vec<Value> =
            bundle.references.iter().map(|id| json!({"event_id": id})).collect();
        relations["m.reference"] = crate::object! {"chunk": chunk};
    }
    Ok(Some(relations))
}

/// An event as an invitee or knocker sees the room's state.
pub fn stripped(pdu: &Pdu) -> Value {
    let content: Value = serde_json::from_str(pdu.content.get()).unwrap_or(Value::Null);
    crate::object! {
        "type": pdu.kind.to_string(),
        "state_key": pdu.state_key.clone().unwrap_or_default(),
        "content": content,
        "sender": pdu.sender.as_str(),
    }
}

fn room_allowed(filter: &RoomFilter, room_id: &str) -> bool {
    !filter.not_rooms.iter().any(|r| r.as_str() == room_id)
        && filter.rooms.as_ref().is_none_or(|rs| rs.iter().any(|r| r.as_str() == room_id))
}

/// Builds one sync response up to position `now`.
pub fn build(services: &Services, req: &SyncRequest<'_>, now: u64) -> Result<SyncResponse> {
    // Read after `now` was taken: every event at or before it has already moved its
    // room's `last_position`, so a room whose position is not past `since` really is
    // quiet.
    let rooms = services.rooms.user_rooms(req.user_id)?;
    let since = req.since.unwrap_or(0);
    let viewer = Viewer::load(services, req.localpart)?;
    let now_ms = trellis_core::now_millis();
    let builder = Builder { services, req, since, now, now_ms, viewer };
    let account_changes = services.account_data.changed_since(req.localpart, since)?;

    let mut join: Vec<(Key, Out)> = Vec::new();
    let mut invite = Map::new();
    let mut leave: Vec<(Key, Out)> = Vec::new();
    let mut knock = Map::new();
    // Rooms joined since `since`: their members' presence is news to the user.
    let mut newly_joined: Vec<String> = Vec::new();
    let room_filter = &req.filter.room;
    for room in &rooms {
        let (room_id, membership) = (room.room_id.clone(), &room.membership);
        if !room_allowed(room_filter, &room_id) {
            continue;
        }
        let quiet = req.since.is_some() && room.last_position <= since;
        let changed_at = if quiet {
            // Nothing happened in the room, so neither did the membership: it stands as
            // of `since` (only ephemeral events and account data can be new).
            since
        } else {
            let changed_at = services.rooms.last_membership_position(&room_id, req.user_id)?;
            // Membership changes not yet visible belong to a later sync.
            let Some(changed_at) = changed_at.filter(|p| *p <= now) else { continue };
            changed_at
        };
        let room_account_data: Vec<Value> = account_changes
            .iter()
            .filter(|(room, kind, _)| {
                room.as_deref() == Some(room_id.as_str())
                    && room_account_data_allowed(&req.filter.room.account_data, kind)
            })
            .map(|(_, kind, content)| json!({"type": kind, "content": content}))
            .collect();
        match membership.as_str() {
            "join" => {
                if req.since.is_some()
                    && changed_at > since
                    && !builder.was_joined_at_since(&room_id)?
                {
                    newly_joined.push(room_id.clone());
                }
                let joined = builder.joined_room(room, changed_at, quiet, room_account_data)?;
                if let Some(section) = joined {
                    join.push((room_id.into(), section));
                }
            }
            "invite" | "knock" if changed_at > since => {
                let Some(pdu) = services.rooms.state_of(&room_id, "m.room.member", req.user_id)?
                else {
                    continue;
                };
                if *membership == MembershipState::Invite
                    && builder.viewer.ignores(pdu.sender.as_str())
                {
                    continue;
                }
                let mut events = Vec::new();
                for kind in STRIPPED_STATE {
                    if let Some(p) = services.rooms.state_of(&room_id, kind, "")? {
                        events.push(stripped(&p));
                    }
                }
                if let Some(inviter) =
                    services.rooms.state_of(&room_id, "m.room.member", pdu.sender.as_str())?
                {
                    events.push(stripped(&inviter));
                }
                events.push(sync_event(&pdu));
                if *membership == MembershipState::Invite {
                    let section = crate::object! {"events": events};
                    invite.insert(room_id, crate::object! {"invite_state": section});
                } else {
                    let section = crate::object! {"events": events};
                    knock.insert(room_id, crate::object! {"knock_state": section});
                }
            }
            "leave" | "ban"
                if changed_at > since && (req.since.is_some() || room_filter.include_leave) =>
            {
                if let Some(room) = builder.left_room(&room_id, changed_at, room_account_data)? {
                    leave.push((room_id.into(), room));
                }
            }
            _ => {}
        }
    }
    for (room_id, pending) in
        crate::federation::invites::pending_since(services, req.user_id, since)?
    {
        if pending.position <= since
            || pending.position > now
            || invite.contains_key(&room_id)
            || !room_allowed(room_filter, &room_id)
        {
            continue;
        }
        // Once this server is in the room, the user's membership there says it all.
        if services.rooms.membership(&room_id, req.user_id)?.is_some() {
            continue;
        }
        match pending.membership.as_str() {
            "knock" if !knock.contains_key(&room_id) => {
                knock.insert(room_id, json!({"knock_state": {"events": pending.stripped}}));
            }
            "leave"
                if (req.since.is_some() || room_filter.include_leave)
                    && !leave.iter().any(|(id, _)| *id == room_id) =>
            {
                let section =
                    json!({"timeline": {"events": pending.stripped}, "state": {"events": []}});
                leave.push((room_id.into(), section.into()));
            }
            "invite" => {
                let sender = pending.event["sender"].as_str().unwrap_or_default();
                if !builder.viewer.ignores(sender) {
                    invite.insert(room_id, json!({"invite_state": {"events": pending.stripped}}));
                }
            }
            _ => {}
        }
    }

    let presence = presence_events(services, req.user_id, &rooms, since, &newly_joined)?;
    let global: Vec<Value> = account_changes
        .iter()
        .filter(|(room, kind, _)| {
            room.is_none() && filter_account_data(&req.filter.account_data, kind)
        })
        .map(|(_, kind, content)| json!({"type": kind, "content": content}))
        .collect();
    let e2ee = E2eeSection::build(services, req, now)?;
    let has_updates = !join.is_empty()
        || !invite.is_empty()
        || !leave.is_empty()
        || !knock.is_empty()
        || !global.is_empty()
        || !presence.is_empty()
        || !e2ee.to_device.is_empty()
        || !e2ee.device_lists.is_empty();
    let token = SyncToken { position: now, to_device: e2ee.to_device_upto };
    let next_batch = token.render();
    let has_to_device = !e2ee.to_device.is_empty();
    let mut body = crate::out_object! {
        "rooms": crate::out_object! {
            "join": Out::Object(join),
            "invite": Value::Object(invite),
            "leave": Out::Object(leave),
            "knock": Value::Object(knock),
        },
        "account_data": crate::object! {"events": global},
        "presence": crate::object! {"events": presence},
        "to_device": crate::object! {"events": e2ee.to_device},
        "device_lists": crate::object! {
            "changed": e2ee.device_lists.changed,
            "left": e2ee.device_lists.left,
        },
    };
    body.drop_empty_sections();
    body.insert("next_batch", next_batch.as_str());
    // Always present: clients read a missing count as "unknown", and the fallback list's
    // presence says the server supports fallback keys.
    body.insert("device_one_time_keys_count", json!(e2ee.one_time_keys_count));
    body.insert("device_unused_fallback_key_types", json!(e2ee.unused_fallback_key_types));
    Ok(SyncResponse { body, next_batch, token, has_to_device, has_updates, rooms })
}

/// The encryption parts of a sync for one device.
pub struct E2eeSection {
    pub to_device: Vec<Value>,
    /// To-device messages up to this position are in this response.
    pub to_device_upto: u64,
    pub device_lists: crate::e2ee::device_lists::DeviceLists,
    pub one_time_keys_count: BTreeMap<String, u64>,
    pub unused_fallback_key_types: Vec<String>,
}

impl E2eeSection {
    pub fn build(services: &Services, req: &SyncRequest<'_>, now: u64) -> Result<Self> {
        let e2ee = &services.e2ee;
        let limit = crate::e2ee::to_device::DEFAULT_BATCH;
        // A full batch may have more behind it: the token then says how far it got.
        let (to_device, to_device_upto) =
            e2ee.to_device_batch(req.localpart, req.device_id, req.to_device_since, now, limit)?;
        let device_lists = match req.since {
            Some(since) => crate::e2ee::device_lists::changes(services, req.user_id, since, now)?,
            None => Default::default(),
        };
        let one_time_keys_count = e2ee.one_time_key_counts(req.localpart, req.device_id)?;
        Ok(Self {
            to_device,
            to_device_upto,
            device_lists,
            one_time_keys_count,
            unused_fallback_key_types: e2ee
                .unused_fallback_key_types(req.localpart, req.device_id)?,
        })
    }
}

/// Presence changes since `since` of the user and of users sharing a room with them,
/// and the presence of everyone in a room the user joined since then.
pub(crate) fn presence_events(
    services: &Services,
    user_id: &str,
    rooms: &[UserRoom],
    since: u64,
    newly_joined: &[String],
) -> Result<Vec<Value>> {
    let changed = services.presence.changed_since(since);
    if changed.is_empty() && newly_joined.is_empty() {
        return Ok(Vec::new());
    }
    let mine: HashSet<&str> = rooms
        .iter()
        .filter(|r| r.membership == MembershipState::Join)
        .map(|r| r.room_id.as_str())
        .collect();
    let mut users = BTreeSet::new();
    for other in changed {
        let shares = other == user_id
            || services
                .rooms
                .rooms_of(&other, &MembershipState::Join)?
                .iter()
                .any(|r| mine.contains(r.as_str()));
        if shares {
            users.insert(other);
        }
    }
    for room in newly_joined {
        users.extend(services.rooms.joined_members(room)?.iter().cloned());
    }
    Ok(users
        .into_iter()
        .filter_map(|other| {
            let content = services.presence.presence_content(&other)?;
            Some(json!({"type": "m.presence", "sender": other, "content": content}))
        })
        .collect())
}

/// What a waiting sync of `user_id` must be woken for: their own key and their rooms.
pub fn subscribe(services: &Services, user_id: &str) -> Result<crate::rooms::stream::Subscription> {
    Ok(subscribe_rooms(services, user_id, &services.rooms.user_rooms(user_id)?))
}

/// [`subscribe`] with the user's rooms as read before it (a previous build's): a room
/// joined since then also woke the user's own key, and a join made visible before the
/// position is read is in the build that follows.
pub fn subscribe_rooms(
    services: &Services,
    user_id: &str,
    rooms: &[UserRoom],
) -> crate::rooms::stream::Subscription {
    let mut keys = vec![crate::rooms::stream::user_key(user_id)];
    for room in rooms {
        if matches!(room.membership.as_str(), "join" | "invite" | "knock") {
            keys.push(room.room_id.clone());
        }
    }
    services.rooms.stream.subscribe_keys(keys)
}

/// What a `/sync` request asks for, taken out of it by the caller: a held poll keeps its
/// future's whole state for as long as it waits, and the parsed request (with its inline
/// filter) is some kilobytes.
pub struct Params {
    pub filter: Box<FilterDefinition>,
    pub token: Option<SyncToken>,
    pub timeout: Duration,
    pub full_state: bool,
    pub use_state_after: bool,
    pub set_presence: PresenceState,
}

/// `/sync` for `session`'s device: acknowledges the to-device messages its token covered,
/// notes the user's presence, then answers as soon as there is something new, or with
/// an empty answer moving the token on once `timeout` has passed.
pub async fn long_poll(services: &Services, session: &Session, params: Params) -> Result<Out> {
    let Params { filter, token, timeout, full_state, use_state_after, set_presence } = params;
    let (localpart, device_id) = (session.localpart.as_str(), session.device_id.as_str());
    let user_id = services.accounts.user_id(localpart);
    let since = token.map(|t| t.position);
    if let Some(token) = token {
        // Syncing from a token acknowledges the to-device messages it covered.
        Box::pin(services.e2ee.ack_to_device(localpart, device_id, token.to_device)).await?;
    }
    // Syncing is activity, unless the client says it is offline or away.
    match set_presence {
        PresenceState::Offline => {}
        PresenceState::Unavailable => {
            let current = services.presence.status(&user_id)?;
            if current.presence != "unavailable" {
                let status_msg = current.status_msg;
                Box::pin(services.presence.set_state(&user_id, "unavailable", status_msg)).await?;
            }
        }
        _ => services.presence.note_activity(&user_id),
    }
    let deadline = tokio::time::Instant::now() + timeout;
    let request = SyncRequest {
        user_id: &user_id,
        localpart,
        device_id,
        since,
        to_device_since: token.map_or(0, |t| t.to_device),
        full_state,
        filter: &filter,
        use_state_after,
    };
    let span = tracing::debug_span!("sync", since = ?since, timeout_ms = timeout.as_millis());
    async {
        let mut query = LiveSync::new(services, request)?;
        Ok(live::wait(services, &mut query, Some(deadline)).await?.body)
    }
    .instrument(span)
    .await
}

/// A client's place in the sync stream, for [`live::wait`]: `/sync` has one per request,
/// the WebSocket stream one for its whole life.
pub struct LiveSync<'a> {
    pub request: SyncRequest<'a>,
    /// The user's rooms as last read, for the next wait's subscription.
    rooms: Vec<UserRoom>,
}

impl<'a> LiveSync<'a> {
    pub fn new(services: &Services, request: SyncRequest<'a>) -> Result<Self> {
        let rooms = services.rooms.user_rooms(request.user_id)?;
        Ok(Self { request, rooms })
    }

    /// `answer` reached the client: the next one continues from its token.
    pub fn answered(&mut self, answer: SyncResponse) {
        self.request.since = Some(answer.token.position);
        self.request.to_device_since = answer.token.to_device;
        self.request.full_state = false;
        self.rooms = answer.rooms;
    }
}

impl live::Query for LiveSync<'_> {
    type Answer = SyncResponse;

    fn subscribe(&mut self, services: &Services) -> Result<crate::rooms::stream::Subscription> {
        Ok(subscribe_rooms(services, self.request.user_id, &self.rooms))
    }

    fn floor(&self) -> u64 {
        self.request.since.unwrap_or(0)
    }

    fn may_wait(&self) -> bool {
        self.request.since.is_some() && !self.request.full_state
    }

    /// Every part of a sync answer is written at a stream position: a token at `now`
    /// with all its to-device messages has nothing to fetch.
    fn caught_up(&self, now: u64) -> bool {
        self.request.since.is_some_and(|s| s >= now) && self.request.to_device_since >= now
    }

    fn build(&mut self, services: &Services, now: u64) -> Result<SyncResponse> {
        build(services, &self.request, now)
    }

    fn has_updates(answer: &SyncResponse) -> bool {
        answer.has_updates
    }

    /// Nothing for this user up to `now`, to-device messages included: the token moves
    /// there and the answer goes (a timeout builds the empty one it answers with).
    fn pass(&mut self, answer: SyncResponse, now: u64) {
        self.rooms = answer.rooms;
        self.request.since = Some(now);
        self.request.to_device_since = now;
    }
}

fn filter_account_data(filter: &ruma::api::client::filter::Filter, kind: &str) -> bool {
    !filter.not_types.iter().any(|t| filter::type_matches(t, kind))
        && filter.types.as_ref().is_none_or(|ts| ts.iter().any(|t| filter::type_matches(t, kind)))
}

fn room_account_data_allowed(filter: &RoomEventFilter, kind: &str) -> bool {
    !filter.not_types.iter().any(|t| filter::type_matches(t, kind))
        && filter.types.as_ref().is_none_or(|ts| ts.iter().any(|t| filter::type_matches(t, kind)))
}

struct Builder<'a> {
    services: &'a Services,
    req: &'a SyncRequest<'a>,
    since: u64,
    now: u64,
    /// The clock when the build started, for the events' `age`.
    now_ms: u64,
    viewer: Viewer,
}

/// A room's timeline section: events in order, whether it was cut, and the token
/// before its first event.
struct Timeline {
    events: Vec<(u64, Arc<Pdu>)>,
    limited: bool,
    prev_batch: String,
}

impl Builder<'_> {
    fn timeline_filter(&self) -> &RoomEventFilter {
        &self.req.filter.room.timeline
    }

    fn timeline_limit(&self) -> usize {
        self.timeline_filter()
            .limit
            .and_then(|l| usize::try_from(u64::from(l)).ok())
            .unwrap_or(DEFAULT_TIMELINE_LIMIT)
            .min(MAX_TIMELINE_LIMIT)
    }

    /// The newest events of `(from, to]` the user may see, up to the filter's limit.
    fn timeline(&self, room_id: &str, from: u64, to: u64) -> Result<Timeline> {
        let viewer = self.viewer.room(self.services, room_id, self.req.user_id)?;
        let filter = self.timeline_filter();
        let limit = self.timeline_limit();
        let page = self.services.rooms.scan_timeline(
            room_id,
            Bound::Excluded(from),
            Bound::Included(to),
            false,
            // A limit of 0 asks for no events, only whether there were any.
            limit.max(1),
            |pos, pdu| Ok(filter::passes(filter, room_id, pdu) && viewer.sees(pos, pdu)),
        )?;
        if limit == 0 {
            let limited = page.more || !page.events.is_empty();
            return Ok(Timeline {
                limited,
                events: Vec::new(),
                prev_batch: format!("t{}", to + 1),
            });
        }
        let mut events = page.events;
        events.reverse();
        for (_, pdu) in &mut events {
            *pdu = viewer.shown(self.services, pdu)?;
        }
        let first = events.first().map_or(to + 1, |(p, _)| *p);
        Ok(Timeline { limited: page.more, events, prev_batch: format!("t{first}") })
    }

    /// State to send with a timeline: everything up to its start for a new view of the
    /// room (initial sync, fresh join, `full_state`), else what changed between `since`
    /// and its start.
    fn state_section(&self, room_id: &str, timeline: &Timeline, fresh: bool) -> Result<Vec<Out>> {
        let rooms = &self.services.rooms;
        let at_start: StateSet = match timeline.events.first() {
            Some((_, first)) => rooms.state_before_event(first)?,
            None => rooms.state_at_position(room_id, self.now)?,
        };
        let base = if fresh || self.req.use_state_after {
            Arc::new(StateSet::new())
        } else {
            rooms.shared_state_at_position(room_id, self.since)?
        };
        let target = if self.req.use_state_after {
            match timeline.events.last() {
                Some((_, last)) => rooms.state_after_event(last)?,
                None => at_start,
            }
        } else {
            at_start
        };
        let mut events = rooms.state_diff(&base, &target)?;
        let in_timeline: HashSet<&str> =
            timeline.events.iter().map(|(_, p)| p.event_id.as_str()).collect();
        let state_filter = &self.req.filter.room.state;
        let lazy = filter::lazy_members(state_filter);
        let senders: BTreeSet<&str> =
            timeline.events.iter().map(|(_, p)| p.sender.as_str()).collect();
        events.retain(|p| {
            (self.req.use_state_after || !in_timeline.contains(p.event_id.as_str()))
                && filter::passes(state_filter, room_id, p)
                && (!lazy
                    || p.kind != TimelineEventType::RoomMember
                    || p.state_key
                        .as_deref()
                        .is_some_and(|k| senders.contains(k) || k == self.req.user_id))
        });
        // A lazy-loading client on an incremental sync still needs the members behind
        // new timeline events it may not know yet.
        if lazy && !fresh {
            let have: HashSet<String> = events.iter().filter_map(|p| p.state_key.clone()).collect();
            for sender in senders {
                if !have.contains(sender)
                    && let Some(member) = rooms.state_of(room_id, "m.room.member", sender)?
                    && !in_timeline.contains(member.event_id.as_str())
                {
                    events.push(Arc::new(member));
                }
            }
        }
        Ok(events.into_iter().map(|p| self.client_event(p).into()).collect())
    }

    /// `pdu` in the client format for this device, its `age` as of this build.
    fn client_event(&self, pdu: Arc<Pdu>) -> ClientEvent {
        let unsigned =
            Unsigned::for_reader(&pdu, self.req.user_id, self.req.device_id, self.now_ms);
        ClientEvent::new(pdu, unsigned)
    }

    fn render(&self, pdu: &Arc<Pdu>) -> Result<Out> {
        let mut event = self.client_event(pdu.clone());
        if let Some(relations) =
            bundled_relations(self.services, pdu, self.req.user_id, sync_event)?
        {
            event.unsigned.relations = Some(relations);
        }
        Ok(event.into())
    }

    fn timeline_section(&self, timeline: &Timeline) -> Result<Out> {
        let events: Vec<Out> =
            timeline.events.iter().map(|(_, p)| self.render(p)).collect::<Result<_>>()?;
        Ok(crate::out_object! {
            "events": events,
            "limited": timeline.limited,
            "prev_batch": timeline.prev_batch.as_str(),
        })
    }

    fn joined_room(
        &self,
        room: &UserRoom,
        joined_at: u64,
        quiet: bool,
        account_data: Vec<Value>,
    ) -> Result<Option<Out>> {
        let services = self.services;
        let room_id = room.room_id.as_str();
        let fresh = self.req.since.is_none() || self.req.full_state || joined_at > self.since;
        let typing = services.typing.changed_since(room_id, self.since);
        let receipts = services.receipts.changed_since(room_id, self.since, self.req.user_id)?;
        let changed = room.last_position > self.since;
        if !fresh && !changed && typing.is_none() && receipts.is_none() && account_data.is_empty() {
            return Ok(None);
        }
        if quiet {
            // The room's record is replaced just after its new events are written, so a
            // join written a moment ago (not visible yet) can show with the old record:
            // only a membership from before `since` makes this a joined room already.
            let joined = services.rooms.last_membership_position(room_id, self.req.user_id)?;
            if joined.is_none_or(|p| p > self.since) {
                return Ok(None);
            }
        }
        // A room joined since the last sync shows its latest events (as far as history
        // visibility lets the joiner see them), not only those after `since`.
        let newly_joined = joined_at > self.since && !self.was_joined_at_since(room_id)?;
        let timeline = if newly_joined {
            self.timeline(room_id, 0, self.now)?
        } else if fresh || changed {
            self.timeline(room_id, self.since, self.now)?
        } else {
            Timeline {
                events: Vec::new(),
                limited: false,
                prev_batch: format!("t{}", self.now + 1),
            }
        };
        // A fresh view (a join since the last sync) gets the whole state at the start of
        // its timeline.
        let state = self.state_section(room_id, &timeline, fresh)?;
        let mut ephemeral = Vec::new();
        if let Some(users) = typing {
            ephemeral.push(json!({"type": "m.typing", "content": {"user_ids": users}}));
        }
        if let Some(content) = receipts {
            ephemeral.push(json!({"type": "m.receipt", "content": content}));
        }
        let mut section = crate::out_object! {
            "timeline": self.timeline_section(&timeline)?,
            "ephemeral": crate::object! {"events": ephemeral},
            "account_data": crate::object! {"events": account_data},
        };
        self.unread(room_id, &mut section)?;
        let key = if self.req.use_state_after { "state_after" } else { "state" };
        section.insert(key, crate::out_object! {"events": state});
        if fresh || changed {
            section.insert("summary", self.summary(room_id)?);
        }
        Ok(Some(section))
    }

    fn left_room(
        &self,
        room_id: &str,
        left_at: u64,
        account_data: Vec<Value>,
    ) -> Result<Option<Out>> {
        // What happened up to (and including) the departure.
        let timeline = self.timeline(room_id, self.since, left_at)?;
        let fresh = self.req.since.is_none() || self.req.full_state;
        let state = self.state_section(room_id, &timeline, fresh)?;
        Ok(Some(crate::out_object! {
            "timeline": self.timeline_section(&timeline)?,
            "state": crate::out_object! {"events": state},
            "account_data": crate::object! {"events": account_data},
        }))
    }

    /// Whether the user was already joined at `since` (a membership change since then is
    /// a profile change, not a join): an initial sync never was.
    fn was_joined_at_since(&self, room_id: &str) -> Result<bool> {
        if self.req.since.is_none() {
            return Ok(false);
        }
        let log = self.services.rooms.membership_log(room_id, self.req.user_id)?;
        Ok(crate::rooms::visibility::at(&log, self.since) == Some("join"))
    }

    /// Member counts, and for a room without a name or canonical alias the heroes that
    /// clients name it after.
    fn summary(&self, room_id: &str) -> Result<Value> {
        let members = self.services.rooms.member_summary(room_id)?;
        let mut summary = json!({
            "m.joined_member_count": members.joined,
            "m.invited_member_count": members.invited,
        });
        if !self.named(room_id)? {
            let heroes: Vec<&String> =
                members.first.iter().filter(|u| u.as_str() != self.req.user_id).take(5).collect();
            summary["m.heroes"] = json!(heroes);
        }
        Ok(summary)
    }

    /// Whether the room has a non-empty name or canonical alias to be shown by.
    fn named(&self, room_id: &str) -> Result<bool> {
        let rooms = &self.services.rooms;
        for (kind, field) in [("m.room.name", "name"), ("m.room.canonical_alias", "alias")] {
            if let Some(pdu) = rooms.state_of(room_id, kind, "")?
                && serde_json::from_str::<Value>(pdu.content.get())
                    .is_ok_and(|c| c[field].as_str().is_some_and(|v| !v.is_empty()))
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn unread(&self, room_id: &str, room: &mut Out) -> Result<()> {
        let separate = self.req.filter.room.timeline.unread_thread_notifications;
        let user = self.req.user_id;
        let ((n, h), threads) = unread_counts(self.services, user, room_id, separate, self.now)?;
        room.insert("unread_notifications", json!({"notification_count": n, "highlight_count": h}));
        if separate && !threads.is_empty() {
            let per_thread: Map<String, Value> = threads
                .into_iter()
                .map(|(root, (n, h))| {
                    (root, json!({"notification_count": n, "highlight_count": h}))
                })
                .collect();
            room.insert("unread_thread_notifications", Value::Object(per_thread));
        }
        Ok(())
    }
}

/// `(notifications, highlights)` of a room, and per thread root.
pub type UnreadCounts = ((u64, u64), BTreeMap<String, (u64, u64)>);

/// Unread `(notifications, highlights)` of a room by push rules, and per thread; without
/// `separate_threads` thread counts are folded into the room's. Counted up to stream
/// position `upto`.
pub fn unread_counts(
    services: &Services,
    user_id: &str,
    room_id: &str,
    separate_threads: bool,
    upto: u64,
) -> Result<UnreadCounts> {
    let counts = services.notifier.counts(services, user_id, room_id, upto)?;
    if separate_threads {
        return Ok((counts.room, counts.threads));
    }
    let mut room = counts.room;
    for (n, h) in counts.threads.values() {
        room.0 += n;
        room.1 += h;
    }
    Ok((room, BTreeMap::new()))
}
