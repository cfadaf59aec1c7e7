//! Simplified sliding sync (MSC4186), the sync Element X uses: the client names lists
//! of rooms (sorted by recent activity) with index ranges and room subscriptions, and
//! per room the state it wants and how much timeline. The server remembers per
//! connection which rooms the client already has, and up to which stream position, so
//! later responses carry only what is new.

use ruma::events::room::member::MembershipState;
use std::{
    cell::OnceCell,
    collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque},
    ops::Bound,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde_json::{Map, Value, json};
use trellis_core::{Error, ErrorKind, Result};

use crate::{
    Services,
    realtime::{
        live,
        sync::{STRIPPED_STATE, attach_bundle, reader_event, stripped, sync_event},
    },
    rooms::{Pdu, viewer::Viewer},
};

/// Positions handed out per connection that a client may still come back with.
const KEPT_POSITIONS: usize = 4;
/// Connections remembered at most (least recently used go first).
const MAX_CONNECTIONS: usize = 10_000;
const MAX_TIMELINE: usize = 100;

/// What the client asked about one room.
#[derive(Debug, Clone, Default)]
pub struct RoomWants {
    pub required_state: Vec<(String, String)>,
    pub timeline_limit: usize,
}

impl RoomWants {
    fn merge(&mut self, other: &RoomWants) {
        for pair in &other.required_state {
            if !self.required_state.contains(pair) {
                self.required_state.push(pair.clone());
            }
        }
        self.timeline_limit = self.timeline_limit.max(other.timeline_limit);
    }
}

#[derive(Debug, Clone, Default)]
pub struct ListFilters {
    pub is_dm: Option<bool>,
    pub is_encrypted: Option<bool>,
    pub is_invite: Option<bool>,
    /// Room types to keep (`None` is a room without a type); empty keeps all.
    pub room_types: Vec<Option<String>>,
    pub not_room_types: Vec<Option<String>>,
}

#[derive(Debug, Clone, Default)]
pub struct ListRequest {
    pub ranges: Vec<(usize, usize)>,
    pub wants: RoomWants,
    pub filters: ListFilters,
}

#[derive(Debug, Clone, Default)]
pub struct Extensions {
    pub to_device: bool,
    /// The to-device extension's `since`: messages up to it were received.
    pub to_device_since: u64,
    pub to_device_limit: usize,
    pub e2ee: bool,
    pub account_data: bool,
    pub receipts: bool,
    pub typing: bool,
}

pub struct SlidingRequest<'a> {
    pub user_id: &'a str,
    pub localpart: &'a str,
    pub device_id: &'a str,
    pub conn_id: &'a str,
    pub pos: Option<&'a str>,
    pub lists: BTreeMap<String, ListRequest>,
    pub subscriptions: BTreeMap<String, RoomWants>,
    pub extensions: Extensions,
}

pub struct SlidingResponse {
    body: Value,
    pub has_updates: bool,
    key: (String, String, String),
    snapshot: Snapshot,
}

#[derive(Debug, Clone, Default)]
struct Snapshot {
    /// Stream position the client is up to for connection-wide data.
    stream: u64,
    /// Rooms the client has, and the stream position each is up to.
    rooms: HashMap<String, u64>,
    /// List counts last sent.
    counts: BTreeMap<String, usize>,
    /// Each room's unread counts (notifications, highlights) last sent.
    unread: HashMap<String, (u64, u64)>,
}

#[derive(Default)]
struct Connection {
    snapshots: VecDeque<(String, Snapshot)>,
    last_used: u64,
}

/// A connection is named by (user, device, `conn_id`).
type ConnKey = (String, String, String);

/// Per-connection memory of what each client has, with a use counter for eviction.
#[derive(Default)]
pub struct Connections {
    inner: Mutex<(HashMap<ConnKey, Connection>, u64)>,
}

impl Connections {
    fn lookup(&self, key: &(String, String, String), pos: Option<&str>) -> Result<Snapshot> {
        let Some(pos) = pos else { return Ok(Snapshot::default()) };
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner
            .0
            .get(key)
            .and_then(|c| c.snapshots.iter().find(|(p, _)| p == pos))
            .map(|(_, s)| s.clone())
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::BadRequest,
                    "M_UNKNOWN_POS",
                    "Unknown position; start the connection again without `pos`",
                )
            })
    }

    fn store(&self, key: (String, String, String), snapshot: Snapshot) -> String {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.1 += 1;
        let tick = inner.1;
        if inner.0.len() >= MAX_CONNECTIONS && !inner.0.contains_key(&key) {
            let oldest = inner.0.iter().min_by_key(|(_, c)| c.last_used).map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                inner.0.remove(&oldest);
            }
        }
        let conn = inner.0.entry(key).or_default();
        conn.last_used = tick;
        let pos = format!("{}_{tick}", snapshot.stream);
        conn.snapshots.push_back((pos.clone(), snapshot));
        while conn.snapshots.len() > KEPT_POSITIONS {
            conn.snapshots.pop_front();
        }
        pos
    }
}

/// Sliding sync for one connection: acknowledges the to-device messages the extension's
/// `since` covered, then answers as soon as there is something new for the connection,
/// or with an empty answer once `timeout` has passed.
pub async fn long_poll(
    services: &Services,
    request: &SlidingRequest<'_>,
    timeout: Duration,
) -> Result<Value> {
    let ext = &request.extensions;
    if ext.to_device && ext.to_device_since > 0 {
        // The extension's `since` acknowledges the messages it covered.
        let (localpart, device_id) = (request.localpart, request.device_id);
        services.e2ee.ack_to_device(localpart, device_id, ext.to_device_since).await?;
    }
    let deadline = tokio::time::Instant::now() + timeout;
    let mut query = LiveSliding { request, held: None };
    Ok(live::wait(services, &mut query, Some(deadline)).await?.send(services))
}

/// A sliding sync request for [`live::wait`]. It builds before each wait (a connection's
/// snapshots say per room how far the client is, which a position alone cannot), and
/// its `pos` never moves during a poll: an empty answer is kept as the one a timeout
/// sends.
struct LiveSliding<'r, 'a> {
    request: &'r SlidingRequest<'a>,
    held: Option<SlidingResponse>,
}

impl live::Query for LiveSliding<'_, '_> {
    type Answer = SlidingResponse;

    fn subscribe(&mut self, services: &Services) -> Result<crate::rooms::stream::Subscription> {
        crate::realtime::sync::subscribe(services, self.request.user_id)
    }

    fn may_wait(&self) -> bool {
        self.request.pos.is_some()
    }

    fn build(&mut self, services: &Services, now: u64) -> Result<SlidingResponse> {
        build(services, self.request, now)
    }

    fn has_updates(answer: &SlidingResponse) -> bool {
        answer.has_updates
    }

    fn pass(&mut self, answer: SlidingResponse, _now: u64) {
        self.held = Some(answer);
    }

    fn timed_out(&mut self, services: &Services, now: u64) -> Result<SlidingResponse> {
        match self.held.take() {
            Some(answer) => Ok(answer),
            None => build(services, self.request, now),
        }
    }
}

fn content(pdu: &Pdu) -> Value {
    serde_json::from_str(pdu.content.get()).unwrap_or(Value::Null)
}

/// Whether a state event is one the client asked for with `(type, state_key)` pairs,
/// where `*` matches anything, `$ME` the user and `$LAZY` the senders in `lazy`.
fn wanted(pdu: &Pdu, wants: &[(String, String)], user: &str, lazy: &BTreeSet<String>) -> bool {
    let kind = pdu.kind.to_string();
    let key = pdu.state_key.as_deref().unwrap_or("");
    wants.iter().any(|(t, k)| {
        (t == "*" || *t == kind)
            && (k == "*"
                || k == key
                || (k == "$ME" && key == user)
                || (k == "$LAZY" && kind == "m.room.member" && lazy.contains(key)))
    })
}

struct RoomInfo {
    room_id: String,
    membership: MembershipState,
    bump: u64,
}

/// Builds one sliding sync response up to stream position `now`.
pub fn build(services: &Services, req: &SlidingRequest<'_>, now: u64) -> Result<SlidingResponse> {
    let key = (req.user_id.to_owned(), req.device_id.to_owned(), req.conn_id.to_owned());
    let previous = services.sliding.lookup(&key, req.pos)?;
    let rooms = &services.rooms;

    // Every room of the user, most recent activity first.
    let mut all: Vec<RoomInfo> = Vec::new();
    for room in rooms.user_rooms(req.user_id)? {
        let (room_id, membership) = (room.room_id, room.membership);
        if !matches!(
            membership,
            MembershipState::Join | MembershipState::Invite | MembershipState::Knock
        ) {
            continue;
        }
        let bump = match membership.as_str() {
            "join" => room.bump_position,
            _ => rooms.last_membership_position(&room_id, req.user_id)?.unwrap_or(0),
        };
        all.push(RoomInfo { room_id, membership, bump: bump.min(now) });
    }
    all.sort_by(|a, b| b.bump.cmp(&a.bump).then_with(|| a.room_id.cmp(&b.room_id)));
    let direct: HashSet<String> = services
        .account_data
        .get(req.localpart, None, "m.direct")?
        .and_then(|v| v.as_object().cloned())
        .map(|m| {
            m.values()
                .filter_map(Value::as_array)
                .flatten()
                .filter_map(|r| r.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();

    let mut selected: BTreeMap<String, (RoomWants, MembershipState, u64)> = BTreeMap::new();
    let mut lists = Map::new();
    let mut counts = BTreeMap::new();
    for (name, list) in &req.lists {
        let mut matching = Vec::new();
        for room in &all {
            let f = &list.filters;
            if f.is_invite.is_some_and(|want| want != (room.membership == MembershipState::Invite))
            {
                continue;
            }
            if f.is_dm.is_some_and(|want| want != direct.contains(&room.room_id)) {
                continue;
            }
            if !f.room_types.is_empty() || !f.not_room_types.is_empty() {
                let room_type = rooms
                    .state_of(&room.room_id, "m.room.create", "")?
                    .and_then(|c| content(&c)["type"].as_str().map(str::to_owned));
                if (!f.room_types.is_empty() && !f.room_types.contains(&room_type))
                    || f.not_room_types.contains(&room_type)
                {
                    continue;
                }
            }
            if let Some(want) = f.is_encrypted {
                let encrypted = rooms.state_of(&room.room_id, "m.room.encryption", "")?.is_some();
                if want != encrypted {
                    continue;
                }
            }
            matching.push(room);
        }
        for (start, end) in &list.ranges {
            for room in matching.iter().skip(*start).take(end.saturating_sub(*start) + 1) {
                let entry = selected
                    .entry(room.room_id.clone())
                    .or_insert_with(|| (RoomWants::default(), room.membership.clone(), room.bump));
                entry.0.merge(&list.wants);
            }
        }
        counts.insert(name.clone(), matching.len());
        lists.insert(name.clone(), json!({"count": matching.len()}));
    }
    for (room_id, wants) in &req.subscriptions {
        let Some(room) = all.iter().find(|r| r.room_id == *room_id) else { continue };
        let entry = selected
            .entry(room_id.clone())
            .or_insert_with(|| (RoomWants::default(), room.membership.clone(), room.bump));
        entry.0.merge(wants);
    }

    let mut next = Snapshot {
        stream: now,
        rooms: previous.rooms.clone(),
        counts: counts.clone(),
        unread: previous.unread.clone(),
    };
    // Account data changed since the client's position: read once, for the push-rule
    // check below and for the account data extension.
    let account_changes = services.account_data.changed_since(req.localpart, previous.stream)?;
    // A push-rule change can change any room's counts.
    let rules_changed =
        account_changes.iter().any(|(room, kind, _)| room.is_none() && kind == "m.push_rules");
    let mut out_rooms = Map::new();
    // Read with the first timeline read: an answer where no room changed reads none.
    let viewer = OnceCell::new();
    for (room_id, (wants, membership, bump)) in &selected {
        let known = previous.rooms.get(room_id).copied();
        let room = if *membership == MembershipState::Join {
            let timeline = Timeline { viewer: &viewer, known, now };
            joined_room(services, req, room_id, wants, timeline, *bump)?
        } else {
            invited_room(services, req.user_id, room_id, known, *bump)?
        };
        let room = match (room, known) {
            (None, Some(known)) if *membership == MembershipState::Join => {
                let last = previous.unread.get(room_id).copied();
                unread_update(services, req.user_id, room_id, known, last, rules_changed, now)?
            }
            (room, _) => room,
        };
        if let Some(room) = room {
            if let (Some(n), Some(h)) =
                (room["notification_count"].as_u64(), room["highlight_count"].as_u64())
            {
                next.unread.insert(room_id.clone(), (n, h));
            }
            out_rooms.insert(room_id.clone(), room);
        }
        next.rooms.insert(room_id.clone(), now);
    }

    let mut extensions = Map::new();
    let since = previous.stream;
    if req.extensions.account_data {
        let changes = &account_changes;
        let global: Vec<Value> = changes
            .iter()
            .filter(|(r, _, _)| r.is_none())
            .map(|(_, kind, c)| json!({"type": kind, "content": c}))
            .collect();
        let mut per_room = Map::new();
        for (room, kind, c) in changes {
            if let Some(room) = room
                && (selected.contains_key(room) || previous.rooms.contains_key(room))
            {
                let entry = per_room.entry(room.clone()).or_insert_with(|| json!([]));
                if let Some(list) = entry.as_array_mut() {
                    list.push(json!({"type": kind, "content": c}));
                }
            }
        }
        if !global.is_empty() || !per_room.is_empty() {
            extensions.insert("account_data".into(), json!({"global": global, "rooms": per_room}));
        }
    }
    let window: BTreeSet<&String> = selected.keys().chain(previous.rooms.keys()).collect();
    if req.extensions.receipts {
        let mut per_room = Map::new();
        for room_id in &window {
            let from = if previous.rooms.contains_key(*room_id) { since } else { 0 };
            if let Some(c) = services.receipts.changed_since(room_id, from, req.user_id)? {
                per_room.insert((*room_id).clone(), json!({"type": "m.receipt", "content": c}));
            }
        }
        if !per_room.is_empty() {
            extensions.insert("receipts".into(), json!({"rooms": per_room}));
        }
    }
    if req.extensions.typing {
        let mut per_room = Map::new();
        for room_id in &window {
            let from = if previous.rooms.contains_key(*room_id) { since } else { 0 };
            if let Some(users) = services.typing.changed_since(room_id, from) {
                per_room.insert(
                    (*room_id).clone(),
                    json!({"type": "m.typing", "content": {"user_ids": users}}),
                );
            }
        }
        if !per_room.is_empty() {
            extensions.insert("typing".into(), json!({"rooms": per_room}));
        }
    }
    let has_updates = !out_rooms.is_empty()
        || !extensions.is_empty()
        || counts != previous.counts
        || req.pos.is_none();
    let mut e2ee_updates = false;
    if req.extensions.to_device {
        let ext = &req.extensions;
        let since = ext.to_device_since.min(now);
        let limit = ext.to_device_limit.clamp(1, 1000);
        let (events, upto) =
            services.e2ee.to_device_batch(req.localpart, req.device_id, since, now, limit)?;
        e2ee_updates |= !events.is_empty();
        extensions
            .insert("to_device".into(), json!({"next_batch": upto.to_string(), "events": events}));
    }
    if req.extensions.e2ee {
        let lists = match req.pos {
            Some(_) => crate::e2ee::device_lists::changes(services, req.user_id, since, now)?,
            None => Default::default(),
        };
        e2ee_updates |= !lists.is_empty();
        let counts = services.e2ee.one_time_key_counts(req.localpart, req.device_id)?;
        let fallback = services.e2ee.unused_fallback_key_types(req.localpart, req.device_id)?;
        extensions.insert(
            "e2ee".into(),
            json!({
                "device_lists": {"changed": lists.changed, "left": lists.left},
                "device_one_time_keys_count": counts,
                "device_unused_fallback_key_types": fallback,
            }),
        );
    }
    let has_updates = has_updates || e2ee_updates;
    Ok(SlidingResponse {
        body: json!({"lists": lists, "rooms": out_rooms, "extensions": extensions}),
        has_updates,
        key,
        snapshot: next,
    })
}

impl SlidingResponse {
    /// Remembers what this response gives the client and returns it with its `pos`.
    /// Only responses actually sent are remembered, so a long-poll that rebuilds its
    /// answer does not push the client's own position out of the connection's memory.
    pub fn send(self, services: &Services) -> Value {
        let mut body = self.body;
        body["pos"] = json!(services.sliding.store(self.key, self.snapshot));
        body
    }
}

fn counts_and_name(services: &Services, user: &str, room_id: &str, room: &mut Value) -> Result<()> {
    let rooms = &services.rooms;
    let (joined, invited) = rooms.joined_and_invited(room_id)?;
    room["joined_count"] = json!(joined.len());
    room["invited_count"] = json!(invited.len());
    if let Some(name) = rooms.state_of(room_id, "m.room.name", "")?
        && let Some(n) = content(&name)["name"].as_str()
        && !n.is_empty()
    {
        room["name"] = json!(n);
    } else {
        // Unnamed rooms are named by clients after their heroes.
        let mut heroes = Vec::new();
        for member in joined.iter().chain(invited.iter()).filter(|u| u.as_str() != user).take(5) {
            let mut hero = json!({"user_id": member});
            if let Some(ev) = rooms.state_of(room_id, "m.room.member", member)? {
                let c = content(&ev);
                if let Some(name) = c["displayname"].as_str() {
                    hero["displayname"] = json!(name);
                }
                if let Some(avatar) = c["avatar_url"].as_str() {
                    hero["avatar_url"] = json!(avatar);
                }
            }
            heroes.push(hero);
        }
        room["heroes"] = json!(heroes);
    }
    if let Some(avatar) = rooms.state_of(room_id, "m.room.avatar", "")?
        && let Some(url) = content(&avatar)["url"].as_str()
    {
        room["avatar"] = json!(url);
    }
    Ok(())
}

/// Where a room's timeline in an answer starts and ends, and who reads it.
struct Timeline<'v> {
    viewer: &'v OnceCell<Viewer>,
    /// The position the client has the room up to, if it has it.
    known: Option<u64>,
    now: u64,
}

fn joined_room(
    services: &Services,
    req: &SlidingRequest<'_>,
    room_id: &str,
    wants: &RoomWants,
    timeline: Timeline<'_>,
    bump: u64,
) -> Result<Option<Value>> {
    let rooms = &services.rooms;
    let user = req.user_id;
    let Timeline { viewer, known, now } = timeline;
    if let Some(known) = known
        && !rooms.changed_after(room_id, known)?
    {
        return Ok(None);
    }
    let from = known.unwrap_or(0);
    let viewer = match viewer.get() {
        Some(viewer) => viewer,
        None => {
            let loaded = Viewer::load(services, req.localpart)?;
            viewer.get_or_init(|| loaded)
        }
    };
    let viewer = viewer.room(services, room_id, user)?;
    let limit = wants.timeline_limit.min(MAX_TIMELINE);
    let page = rooms.scan_timeline(
        room_id,
        Bound::Excluded(from),
        Bound::Included(now),
        false,
        limit,
        |pos, pdu| Ok(viewer.sees(pos, pdu)),
    )?;
    let mut events = page.events;
    events.reverse();
    for (_, pdu) in &mut events {
        *pdu = viewer.shown(services, pdu)?;
    }
    let initial = known.is_none();
    let lazy: BTreeSet<String> = events.iter().map(|(_, p)| p.sender.to_string()).collect();
    let required: Vec<Value> = if initial {
        rooms
            .current_state(room_id)?
            .iter()
            .filter(|p| wanted(p, &wants.required_state, user, &lazy))
            .map(sync_event)
            .collect()
    } else {
        // State that changed since the client's position, as far as it asked for it.
        let before = rooms.state_at_position(room_id, from)?;
        let after = rooms.current_state_ids(room_id)?;
        let mut changed: Vec<Arc<Pdu>> = rooms.state_diff(&before, &after)?;
        changed.retain(|p| wanted(p, &wants.required_state, user, &lazy));
        // New senders' member events, for a lazy-loading client.
        let want_lazy =
            wants.required_state.iter().any(|(t, k)| t == "m.room.member" && k == "$LAZY");
        if want_lazy {
            for sender in &lazy {
                if let Some(member) = rooms.state_of(room_id, "m.room.member", sender)?
                    && !changed.iter().any(|p| p.event_id == member.event_id)
                {
                    changed.push(Arc::new(member));
                }
            }
        }
        changed.iter().map(|p| sync_event(p)).collect()
    };
    let first = events.first().map_or(now + 1, |(p, _)| *p);
    let timeline: Vec<Value> = events
        .iter()
        .map(|(_, p)| {
            let mut event = reader_event(p, user, req.device_id);
            attach_bundle(services, p, user, &mut event, sync_event)?;
            Ok(event)
        })
        .collect::<Result<_>>()?;
    let mut room = json!({
        "timeline": timeline,
        "required_state": required,
        "prev_batch": format!("t{first}"),
        "limited": page.more,
        "bump_stamp": bump,
        "num_live": if initial { 0 } else { events.len() },
    });
    if initial {
        room["initial"] = json!(true);
    }
    counts_and_name(services, user, room_id, &mut room)?;
    let ((notifications, highlights), _) =
        crate::realtime::sync::unread_counts(services, user, room_id, false, now)?;
    // Flattened into the room object, as MSC4186 has it.
    room["notification_count"] = json!(notifications);
    room["highlight_count"] = json!(highlights);
    Ok(Some(room))
}

/// A room with nothing new since `known` whose unread counts may still have changed (the
/// user read it, or changed push rules): just the new counts, when they differ from the
/// ones last sent.
fn unread_update(
    services: &Services,
    user: &str,
    room_id: &str,
    known: u64,
    last: Option<(u64, u64)>,
    rules_changed: bool,
    now: u64,
) -> Result<Option<Value>> {
    if !rules_changed && services.receipts.newest(room_id)? <= known {
        return Ok(None);
    }
    let ((notifications, highlights), _) =
        crate::realtime::sync::unread_counts(services, user, room_id, false, now)?;
    if last == Some((notifications, highlights)) {
        return Ok(None);
    }
    Ok(Some(json!({"notification_count": notifications, "highlight_count": highlights})))
}

fn invited_room(
    services: &Services,
    user: &str,
    room_id: &str,
    known: Option<u64>,
    bump: u64,
) -> Result<Option<Value>> {
    if known.is_some() {
        return Ok(None);
    }
    let rooms = &services.rooms;
    let mut state = Vec::new();
    for kind in STRIPPED_STATE {
        if let Some(p) = rooms.state_of(room_id, kind, "")? {
            state.push(stripped(&p));
        }
    }
    if let Some(own) = rooms.state_of(room_id, "m.room.member", user)? {
        if let Some(inviter) = rooms.state_of(room_id, "m.room.member", own.sender.as_str())? {
            state.push(stripped(&inviter));
        }
        state.push(stripped(&own));
    }
    let mut room = json!({"invite_state": state, "initial": true, "bump_stamp": bump});
    counts_and_name(services, user, room_id, &mut room)?;
    // An invitee sees the room through its stripped state only: no member counts,
    // unread counts, timeline or state (as the MSC and matrix-rust-sdk expect).
    if let Some(fields) = room.as_object_mut() {
        for field in ["joined_count", "invited_count", "notification_count", "highlight_count"] {
            fields.remove(field);
        }
    }
    Ok(Some(room))
}
