//! What rooms show of themselves to people outside them, built from current state: the
//! published room directory (`/publicRooms` and its visibility setting), room summaries
//! and the space hierarchy.
//!
//! Who may see a room's summary (and find it in a space) follows the spec's room summary
//! rules: members (joined, invited or knocking), anyone when history is
//! `world_readable`, anyone when the join rule is `public`, `knock` or
//! `knock_restricted`, and for `restricted` rooms the members of one of the allowed
//! rooms. A banned user is refused.

use ruma::events::room::member::MembershipState;
use std::cmp::Reverse;

use base64::Engine as _;
use ruma::{
    EventEncryptionAlgorithm, OwnedMxcUri, OwnedRoomAliasId, OwnedRoomId, RoomVersionId, UInt,
    directory::{PublicRoomsChunk, PublicRoomsChunkInit},
    room::{JoinRuleKind, JoinRuleSummary, RestrictedSummary, RoomSummary, RoomType},
};
use serde_json::{Value, json};
use trellis_core::{Error, Result, config::RoomPublishing};
use trellis_store::{Batch, Db, Direction, Table, catalog};

use super::{Pdu, Rooms, aliases::Aliases};
use crate::commit;

pub(super) const PUBLIC_ROOMS: Table<String, ()> = Table::new(&catalog::PUBLIC_ROOMS);
/// (third-party instance id, room id) -> ()
const NETWORK_ROOMS: Table<(String, String), ()> = Table::new(&catalog::NETWORK_ROOMS);

/// Rooms one `/publicRooms` page returns when the client sets no limit, and at most.
pub const DIRECTORY_DEFAULT_LIMIT: u64 = 100;
pub const DIRECTORY_MAX_LIMIT: u64 = 500;
/// Rooms one `/hierarchy` page returns when the client sets no limit, and at most.
pub const HIERARCHY_DEFAULT_LIMIT: u64 = 50;
pub const HIERARCHY_MAX_LIMIT: u64 = 100;
/// How deep `/hierarchy` walks when the client does not say, and at most.
pub const HIERARCHY_MAX_DEPTH: u64 = 10;
/// Rooms one `/hierarchy` request looks at, at most (pages included), whatever the tree.
const HIERARCHY_MAX_VISITS: usize = 5_000;

/// A room as the directory, summaries and hierarchies show it.
#[derive(Debug, Clone, PartialEq)]
pub struct RoomInfo {
    pub room_id: String,
    pub room_version: String,
    pub name: Option<String>,
    pub topic: Option<String>,
    pub canonical_alias: Option<String>,
    pub alt_aliases: Vec<String>,
    pub avatar_url: Option<String>,
    pub num_joined_members: u64,
    pub world_readable: bool,
    pub guest_can_join: bool,
    /// `public`, `knock`, `invite`, `restricted`, `knock_restricted` or `private`;
    /// unknown or missing join rules count as `invite` (only invited users may join).
    pub join_rule: String,
    /// For `restricted` and `knock_restricted`: the rooms whose members may join.
    pub allowed_room_ids: Vec<String>,
    /// `type` from the create event (`m.space` for spaces).
    pub room_type: Option<String>,
    /// The `m.room.encryption` algorithm, if the room is encrypted.
    pub encryption: Option<String>,
}

impl RoomInfo {
    pub fn is_space(&self) -> bool {
        self.room_type.as_deref() == Some("m.space")
    }

    fn id(&self) -> Result<OwnedRoomId> {
        OwnedRoomId::try_from(self.room_id.as_str()).map_err(|e| Error::internal("room id", e))
    }

    fn members(&self) -> UInt {
        UInt::try_from(self.num_joined_members).unwrap_or(UInt::MAX)
    }

    fn alias(&self) -> Option<OwnedRoomAliasId> {
        self.canonical_alias.as_deref().and_then(|a| OwnedRoomAliasId::try_from(a).ok())
    }

    fn avatar(&self) -> Option<OwnedMxcUri> {
        self.avatar_url.clone().map(OwnedMxcUri::from)
    }

    /// The room as a `/publicRooms` chunk.
    pub fn to_chunk(&self) -> Result<PublicRoomsChunk> {
        let mut chunk = PublicRoomsChunk::from(PublicRoomsChunkInit {
            num_joined_members: self.members(),
            room_id: self.id()?,
            world_readable: self.world_readable,
            guest_can_join: self.guest_can_join,
        });
        chunk.name = self.name.clone();
        chunk.topic = self.topic.clone();
        chunk.canonical_alias = self.alias();
        chunk.avatar_url = self.avatar();
        chunk.join_rule = JoinRuleKind::from(self.join_rule.as_str());
        chunk.room_type = self.room_type.as_deref().map(RoomType::from);
        Ok(chunk)
    }

    /// The room as a summary (room summary API and hierarchy entries).
    pub fn to_summary(&self) -> Result<RoomSummary> {
        let allowed = || {
            RestrictedSummary::new(
                self.allowed_room_ids
                    .iter()
                    .filter_map(|r| OwnedRoomId::try_from(r.as_str()).ok())
                    .collect(),
            )
        };
        let join_rule = match self.join_rule.as_str() {
            "public" => JoinRuleSummary::Public,
            "knock" => JoinRuleSummary::Knock,
            "private" => JoinRuleSummary::Private,
            "restricted" => JoinRuleSummary::Restricted(allowed()),
            "knock_restricted" => JoinRuleSummary::KnockRestricted(allowed()),
            _ => JoinRuleSummary::Invite,
        };
        let mut summary = RoomSummary::new(
            self.id()?,
            join_rule,
            self.guest_can_join,
            self.members(),
            self.world_readable,
        );
        summary.name = self.name.clone();
        summary.topic = self.topic.clone();
        summary.canonical_alias = self.alias();
        summary.avatar_url = self.avatar();
        summary.room_type = self.room_type.as_deref().map(RoomType::from);
        summary.encryption = self.encryption.as_deref().map(EventEncryptionAlgorithm::from);
        summary.room_version = RoomVersionId::try_from(self.room_version.as_str()).ok();
        Ok(summary)
    }
}

impl RoomInfo {
    /// A room as another server summarised it (`/hierarchy`); `None` without a valid
    /// room id.
    pub fn from_summary(summary: &Value) -> Option<Self> {
        let room_id = summary["room_id"].as_str()?;
        OwnedRoomId::try_from(room_id).ok()?;
        let text = |field: &str| summary[field].as_str().map(str::to_owned);
        let join_rule = match summary["join_rule"].as_str() {
            // The field was optional before v1.15; such rooms were listed as public.
            None => "public".to_owned(),
            Some(
                rule @ ("public" | "knock" | "invite" | "restricted" | "knock_restricted"
                | "private"),
            ) => rule.to_owned(),
            Some(_) => "invite".to_owned(),
        };
        Some(Self {
            room_id: room_id.to_owned(),
            room_version: text("room_version").unwrap_or_default(),
            name: text("name"),
            topic: text("topic"),
            canonical_alias: text("canonical_alias"),
            alt_aliases: Vec::new(),
            avatar_url: text("avatar_url"),
            num_joined_members: summary["num_joined_members"].as_u64().unwrap_or(0),
            world_readable: summary["world_readable"].as_bool().unwrap_or(false),
            guest_can_join: summary["guest_can_join"].as_bool().unwrap_or(false),
            join_rule,
            allowed_room_ids: summary["allowed_room_ids"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| r.as_str().map(str::to_owned))
                .collect(),
            room_type: text("room_type"),
            encryption: text("encryption").or_else(|| text("im.nheko.summary.encryption")),
        })
    }
}

fn content(pdu: &Pdu) -> Value {
    serde_json::from_str(pdu.content.get()).unwrap_or(Value::Null)
}

/// A non-empty string field of a state event's content.
fn text(pdu: Option<&Pdu>, field: &str) -> Option<String> {
    let value = content(pdu?);
    value[field].as_str().filter(|s| !s.is_empty()).map(str::to_owned)
}

/// The room as others see it, from its current state; `None` for an unknown room.
pub fn room_info(rooms: &Rooms, room_id: &str) -> Result<Option<RoomInfo>> {
    let Some((_, record)) = rooms.room(room_id)? else { return Ok(None) };
    let state = |kind: &str| rooms.state_of(room_id, kind, "");
    let create = state("m.room.create")?;
    let join_rules = state("m.room.join_rules")?.map(|p| content(&p)).unwrap_or(Value::Null);
    let join_rule = match join_rules["join_rule"].as_str() {
        Some(
            rule @ ("public" | "knock" | "invite" | "restricted" | "knock_restricted" | "private"),
        ) => rule.to_owned(),
        _ => "invite".to_owned(),
    };
    let allowed_room_ids = if join_rule.ends_with("restricted") {
        join_rules["allow"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|rule| rule["type"] == "m.room_membership")
            .filter_map(|rule| rule["room_id"].as_str().map(str::to_owned))
            .collect()
    } else {
        Vec::new()
    };
    let canonical = state("m.room.canonical_alias")?.map(|p| content(&p)).unwrap_or(Value::Null);
    Ok(Some(RoomInfo {
        room_id: room_id.to_owned(),
        room_version: record.version,
        name: text(state("m.room.name")?.as_ref(), "name"),
        topic: text(state("m.room.topic")?.as_ref(), "topic"),
        canonical_alias: canonical["alias"].as_str().filter(|a| !a.is_empty()).map(str::to_owned),
        alt_aliases: canonical["alt_aliases"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str().map(str::to_owned))
            .collect(),
        avatar_url: text(state("m.room.avatar")?.as_ref(), "url"),
        num_joined_members: rooms.members(room_id, &MembershipState::Join)?.len() as u64,
        world_readable: text(state("m.room.history_visibility")?.as_ref(), "history_visibility")
            .is_some_and(|v| v == "world_readable"),
        guest_can_join: text(state("m.room.guest_access")?.as_ref(), "guest_access")
            .is_some_and(|v| v == "can_join"),
        join_rule,
        allowed_room_ids,
        room_type: text(create.as_ref(), "type"),
        encryption: text(state("m.room.encryption")?.as_ref(), "algorithm"),
    }))
}

/// Whether `user` (a user id; `None` when unauthenticated) may see the room's summary
/// (see the module documentation).
pub fn may_preview(rooms: &Rooms, info: &RoomInfo, user: Option<&str>) -> Result<bool> {
    let membership = match user {
        Some(user) => rooms.membership(&info.room_id, user)?,
        None => None,
    };
    match membership {
        Some(MembershipState::Join | MembershipState::Invite | MembershipState::Knock) => {
            return Ok(true);
        }
        Some(MembershipState::Ban) => return Ok(false),
        _ => {}
    }
    if info.world_readable {
        return Ok(true);
    }
    match info.join_rule.as_str() {
        "public" | "knock" | "knock_restricted" => Ok(true),
        "restricted" => {
            let Some(user) = user else { return Ok(false) };
            for allowed in &info.allowed_room_ids {
                if rooms.membership(allowed, user)? == Some(MembershipState::Join) {
                    return Ok(true);
                }
            }
            Ok(false)
        }
        _ => Ok(false),
    }
}

/// The summary of a room (by id or local alias) for `user` (`None` when
/// unauthenticated), with the user's membership (`leave` when they have none). Rooms
/// the user may not preview are reported exactly like unknown ones: 404.
pub fn summary(
    rooms: &Rooms,
    aliases: &Aliases,
    room_or_alias: &str,
    user: Option<&str>,
) -> Result<(RoomInfo, Option<MembershipState>)> {
    let not_found = || Error::not_found("Room not found");
    let room_id = if room_or_alias.starts_with('#') {
        aliases.resolve(room_or_alias)?.ok_or_else(not_found)?.room_id
    } else {
        room_or_alias.to_owned()
    };
    let info = room_info(rooms, &room_id)?.ok_or_else(not_found)?;
    if !may_preview(rooms, &info, user)? {
        return Err(not_found());
    }
    let membership = match user {
        Some(user) => Some(rooms.membership(&room_id, user)?.unwrap_or(MembershipState::Leave)),
        None => None,
    };
    Ok((info, membership))
}

/// An `m.space.child` state event with a valid `via`.
#[derive(Debug, Clone, PartialEq)]
pub struct SpaceChild {
    /// The child room (the event's state key).
    pub room_id: String,
    pub sender: String,
    pub origin_server_ts: u64,
    pub content: Value,
    pub suggested: bool,
    /// A valid `order` (printable ASCII, at most 50 characters), if any.
    pub order: Option<String>,
}

impl SpaceChild {
    /// A child link from its event's parts; `None` when it is not one (the state key is
    /// not a room id, or `via` is missing, empty or not all strings).
    fn from_parts(
        room_id: String,
        sender: String,
        origin_server_ts: u64,
        content: Value,
    ) -> Option<Self> {
        OwnedRoomId::try_from(room_id.as_str()).ok()?;
        let via = content["via"].as_array()?;
        if via.is_empty() || !via.iter().all(Value::is_string) {
            return None;
        }
        let order = content["order"]
            .as_str()
            .filter(|o| o.len() <= 50 && o.bytes().all(|b| (0x20..=0x7E).contains(&b)))
            .map(str::to_owned);
        Some(SpaceChild {
            room_id,
            sender,
            origin_server_ts,
            suggested: content["suggested"].as_bool().unwrap_or(false),
            order,
            content,
        })
    }

    /// The servers the link says can be asked about the child.
    pub fn via(&self) -> Vec<String> {
        self.content["via"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect()
    }

    /// The event as a stripped state event with `origin_server_ts` (`children_state`).
    pub fn stripped(&self) -> Value {
        json!({
            "type": "m.space.child",
            "state_key": self.room_id,
            "content": self.content,
            "sender": self.sender,
            "origin_server_ts": self.origin_server_ts,
        })
    }
}

/// The children of a room, in the spec's order: valid `order` values first
/// (lexicographically), then by the child event's timestamp, then by room id. Events
/// without a non-empty `via` list are not links and are left out.
pub fn space_children(rooms: &Rooms, room_id: &str) -> Result<Vec<SpaceChild>> {
    let children = rooms
        .current_state(room_id)?
        .into_iter()
        .filter(|p| p.kind.to_string() == "m.space.child")
        .filter_map(|p| {
            SpaceChild::from_parts(
                p.state_key.clone()?,
                p.sender.to_string(),
                u64::from(p.origin_server_ts.0),
                content(&p),
            )
        })
        .collect();
    Ok(sorted(children))
}

/// Children as another server's `/hierarchy` gave them (`children_state`), in the spec's
/// order; malformed entries are left out.
fn remote_children(children_state: &Value) -> Vec<SpaceChild> {
    let children = children_state
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["type"] == "m.space.child")
        .filter_map(|e| {
            SpaceChild::from_parts(
                e["state_key"].as_str()?.to_owned(),
                e["sender"].as_str()?.to_owned(),
                e["origin_server_ts"].as_u64()?,
                e["content"].clone(),
            )
        })
        .collect();
    sorted(children)
}

fn sorted(mut children: Vec<SpaceChild>) -> Vec<SpaceChild> {
    children.sort_by(|a, b| {
        // `None` sorts after every order value.
        (a.order.is_none(), &a.order, a.origin_server_ts, &a.room_id).cmp(&(
            b.order.is_none(),
            &b.order,
            b.origin_server_ts,
            &b.room_id,
        ))
    });
    children
}

/// One `/hierarchy` request's parameters, as the client gave them.
#[derive(Debug, Clone, Default)]
pub struct HierarchyQuery<'a> {
    pub from: Option<&'a str>,
    pub limit: Option<u64>,
    pub max_depth: Option<u64>,
    pub suggested_only: bool,
}

/// A room of a hierarchy page with its (possibly filtered) children.
#[derive(Debug, Clone)]
pub struct HierarchyRoom {
    pub info: RoomInfo,
    /// The space's child events (empty for rooms that are not spaces).
    pub children: Vec<SpaceChild>,
}

#[derive(Debug, Clone)]
pub struct HierarchyPage {
    pub rooms: Vec<HierarchyRoom>,
    pub next_batch: Option<String>,
}

fn encode_token(text: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text)
}

fn decode_token(token: &str) -> Option<String> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(token).ok()?;
    String::from_utf8(bytes).ok()
}

/// A hierarchy position: rooms already returned, under the walk's fixed parameters.
#[derive(Debug, PartialEq)]
struct HierarchyToken {
    skip: usize,
    max_depth: u64,
    suggested_only: bool,
    root: String,
}

impl HierarchyToken {
    fn encode(&self) -> String {
        encode_token(&format!(
            "h{}.{}.{}.{}",
            self.skip,
            self.max_depth,
            u8::from(self.suggested_only),
            self.root
        ))
    }

    fn decode(token: &str) -> Option<Self> {
        let text = decode_token(token)?;
        let mut parts = text.strip_prefix('h')?.splitn(4, '.');
        let skip = parts.next()?.parse().ok()?;
        let max_depth = parts.next()?.parse().ok()?;
        let suggested_only = match parts.next()? {
            "0" => false,
            "1" => true,
            _ => return None,
        };
        Some(Self { skip, max_depth, suggested_only, root: parts.next()?.to_owned() })
    }
}

/// Rooms of other servers one `/hierarchy` request asks about, at most.
const HIERARCHY_MAX_REMOTE: usize = 50;
/// How long one `/hierarchy` request spends asking other servers, at most; rooms not
/// known by then are left out.
const HIERARCHY_REMOTE_BUDGET: std::time::Duration = std::time::Duration::from_secs(10);
/// Children of a space another server describes that are looked at, at most.
const REMOTE_CHILDREN_MAX: usize = 50;

/// A room as the walk knows it: its summary, and its children once known (rooms that
/// are not spaces have none).
struct Node {
    info: RoomInfo,
    children: Option<Vec<SpaceChild>>,
}

/// What a walk has learnt from other servers' `/hierarchy` answers, by room id.
struct Remote<F> {
    fetch: F,
    known: std::collections::HashMap<String, Node>,
    /// Rooms a server said the asking server may not see: not asked about again.
    refused: std::collections::HashSet<String>,
    asked: usize,
    deadline: std::time::Instant,
}

impl<F, Fut> Remote<F>
where
    F: Fn(String, Vec<String>) -> Fut,
    Fut: std::future::Future<Output = Option<Value>>,
{
    /// A room this server is not in, from what other servers said; asking `via` when
    /// its summary or (for a space) its children are not known yet.
    async fn node(&mut self, room_id: &str, via: Vec<String>) -> Option<Node> {
        let complete = |n: &Node| n.children.is_some() || !n.info.is_space();
        if !self.known.get(room_id).is_some_and(complete)
            && !self.refused.contains(room_id)
            && self.asked < HIERARCHY_MAX_REMOTE
        {
            self.asked += 1;
            let left = self.deadline.saturating_duration_since(std::time::Instant::now());
            let asked = tokio::time::timeout(left, (self.fetch)(room_id.to_owned(), via));
            if let Ok(Some(answer)) = asked.await {
                self.learn(room_id, &answer);
            }
        }
        let node = self.known.get(room_id)?;
        Some(Node { info: node.info.clone(), children: node.children.clone() })
    }

    fn learn(&mut self, room_id: &str, answer: &Value) {
        // The answer is about the room asked for, or it is ignored whole.
        let Some(info) = RoomInfo::from_summary(&answer["room"]) else { return };
        if info.room_id != room_id {
            return;
        }
        let mut children = remote_children(&answer["room"]["children_state"]);
        children.truncate(REMOTE_CHILDREN_MAX);
        for refused in answer["inaccessible_children"].as_array().into_iter().flatten() {
            if let Some(room) = refused.as_str() {
                self.refused.insert(room.to_owned());
            }
        }
        let described = answer["children"].as_array().into_iter().flatten();
        for child in described.take(REMOTE_CHILDREN_MAX) {
            if let Some(child) = RoomInfo::from_summary(child) {
                self.known
                    .entry(child.room_id.clone())
                    .or_insert(Node { info: child, children: None });
            }
        }
        self.known.insert(room_id.to_owned(), Node { info, children: Some(children) });
    }
}

/// A page of the space tree under `root` as `user` may see it: a depth-first walk in
/// the spec's child order, each room once (loops are cut), rooms the user may not
/// preview and rooms nobody could tell us about left out together with what is below
/// them. Rooms this server is not in are asked of the servers in their `m.space.child`
/// event's `via` through `fetch(room_id, via)`, which gives the other server's
/// `/hierarchy` answer. Spaces carry their child events even at `max_depth`; only rooms
/// deeper than it are left out. With `suggested_only`, only suggested children are
/// followed and listed.
pub async fn hierarchy<F, Fut>(
    rooms: &Rooms,
    root: &str,
    user: &str,
    query: &HierarchyQuery<'_>,
    fetch: F,
) -> Result<HierarchyPage>
where
    F: Fn(String, Vec<String>) -> Fut,
    Fut: std::future::Future<Output = Option<Value>>,
{
    let limit = match query.limit {
        Some(0) => return Err(Error::invalid_param("limit must be greater than zero")),
        Some(n) => n.min(HIERARCHY_MAX_LIMIT),
        None => HIERARCHY_DEFAULT_LIMIT,
    } as usize;
    let max_depth = query.max_depth.unwrap_or(HIERARCHY_MAX_DEPTH).min(HIERARCHY_MAX_DEPTH);
    let skip = match query.from {
        None => 0,
        Some(from) => {
            let token = HierarchyToken::decode(from)
                .ok_or_else(|| Error::invalid_param("Unknown pagination token"))?;
            if token.root != root {
                return Err(Error::invalid_param("The pagination token is for another room"));
            }
            if token.max_depth != max_depth || token.suggested_only != query.suggested_only {
                return Err(Error::invalid_param(
                    "suggested_only and max_depth cannot change on paginated requests",
                ));
            }
            token.skip
        }
    };
    let mut remote = Remote {
        fetch,
        known: Default::default(),
        refused: Default::default(),
        asked: 0,
        deadline: std::time::Instant::now() + HIERARCHY_REMOTE_BUDGET,
    };
    // A root this server is not in can only be asked of the server in its id (rooms
    // before version 12 have one).
    let root_via = crate::federation::server_of(root).map(str::to_owned).into_iter().collect();

    let mut seen = std::collections::HashSet::new();
    // (room, depth, servers to ask about it); popped from the end.
    let mut stack: Vec<(String, u64, Vec<String>)> = vec![(root.to_owned(), 0, root_via)];
    let mut emitted = 0usize;
    let mut out = Vec::new();
    let mut more = false;
    while let Some((room_id, depth, via)) = stack.pop() {
        if seen.contains(&room_id) {
            continue;
        }
        if seen.len() >= HIERARCHY_MAX_VISITS {
            break;
        }
        seen.insert(room_id.clone());
        let local = room_info(rooms, &room_id)?;
        let is_local = local.is_some();
        let node = match local {
            Some(info) => Some(Node { info, children: None }),
            None => remote.node(&room_id, via).await,
        };
        let node = match node {
            Some(node) if may_preview(rooms, &node.info, Some(user))? => node,
            _ if depth == 0 => {
                return Err(Error::forbidden("You are not allowed to view this room"));
            }
            _ => continue,
        };
        if emitted >= skip + limit {
            more = true;
            break;
        }
        // A space of another server whose children nobody told us about shows
        // without them.
        let mut children = match node.children {
            Some(children) => children,
            None if is_local && node.info.is_space() => space_children(rooms, &room_id)?,
            None => Vec::new(),
        };
        if query.suggested_only {
            children.retain(|c| c.suggested);
        }
        if depth < max_depth {
            for child in children.iter().rev() {
                if !seen.contains(&child.room_id) {
                    stack.push((child.room_id.clone(), depth + 1, child.via()));
                }
            }
        }
        if emitted >= skip {
            out.push(HierarchyRoom { info: node.info, children });
        }
        emitted += 1;
    }
    let next_batch = more.then(|| {
        HierarchyToken {
            skip: skip + out.len(),
            max_depth,
            suggested_only: query.suggested_only,
            root: root.to_owned(),
        }
        .encode()
    });
    Ok(HierarchyPage { rooms: out, next_batch })
}

/// Whether another server may see a room's summary: when anyone may preview it, for
/// restricted rooms (the asking server checks its own users against the allowed rooms,
/// as the spec has it), and when one of its users is in the room or invited.
pub fn server_may_preview(rooms: &Rooms, info: &RoomInfo, server: &str) -> Result<bool> {
    if info.world_readable
        || matches!(info.join_rule.as_str(), "public" | "knock" | "knock_restricted" | "restricted")
    {
        return Ok(true);
    }
    rooms.has_member_from(&info.room_id, server, &[MembershipState::Join, MembershipState::Invite])
}

/// A space as `/_matrix/federation/v1/hierarchy` shows it to another server.
#[derive(Debug, Clone)]
pub struct ServerHierarchy {
    pub room: HierarchyRoom,
    /// Children this server knows and the asking server may see.
    pub children: Vec<RoomInfo>,
    /// Children this server knows that the asking server may not see.
    pub inaccessible: Vec<String>,
}

/// The room and its direct children for `server`; 404 when the room is unknown here or
/// the server may not see it. Children this server is not in are left out: it cannot
/// tell anything about them.
pub fn server_hierarchy(
    rooms: &Rooms,
    room_id: &str,
    server: &str,
    suggested_only: bool,
) -> Result<ServerHierarchy> {
    let not_found = || Error::not_found("Room not found");
    let info = room_info(rooms, room_id)?.ok_or_else(not_found)?;
    if !server_may_preview(rooms, &info, server)? {
        return Err(not_found());
    }
    let mut children = if info.is_space() { space_children(rooms, room_id)? } else { Vec::new() };
    if suggested_only {
        children.retain(|c| c.suggested);
    }
    let mut visible = Vec::new();
    let mut inaccessible = Vec::new();
    for child in &children {
        match room_info(rooms, &child.room_id)? {
            Some(child) if server_may_preview(rooms, &child, server)? => visible.push(child),
            Some(child) => inaccessible.push(child.room_id),
            None => {}
        }
    }
    Ok(ServerHierarchy { room: HierarchyRoom { info, children }, children: visible, inaccessible })
}

/// One `/publicRooms` request's parameters, as the client gave them.
#[derive(Debug, Clone, Default)]
pub struct DirectoryQuery<'a> {
    /// Which room list: this server's (the Matrix network), a bridged network's, or all.
    pub network: Network,
    pub limit: Option<u64>,
    pub since: Option<&'a str>,
    /// Matched case-insensitively against name, topic, aliases and room id.
    pub search_term: Option<&'a str>,
    /// Room types to list (`None` in the list: rooms without a type); empty lists all.
    pub room_types: Vec<Option<String>>,
}

/// The room lists of the directory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Network {
    /// Rooms published on this server.
    #[default]
    Matrix,
    /// Every list: this server's and every bridged network's.
    All,
    /// A bridged network's list, by its third-party instance id.
    ThirdParty(String),
}

#[derive(Debug, Clone)]
pub struct DirectoryPage {
    pub rooms: Vec<RoomInfo>,
    pub next_batch: Option<String>,
    pub prev_batch: Option<String>,
    /// Rooms matching the filter, over all pages.
    pub total: u64,
}

/// The position of a room in the directory order: most joined members first, then by
/// room id.
type DirectoryKey = (Reverse<u64>, String);

fn directory_key(info: &RoomInfo) -> DirectoryKey {
    (Reverse(info.num_joined_members), info.room_id.clone())
}

/// A directory page boundary: rooms after (`n`) or before (`p`) a position.
fn encode_directory_token(forward: bool, key: &DirectoryKey) -> String {
    encode_token(&format!("{}{}_{}", if forward { 'n' } else { 'p' }, key.0.0, key.1))
}

fn decode_directory_token(token: &str) -> Result<(bool, DirectoryKey)> {
    let bad = || Error::invalid_param("Unknown pagination token");
    let text = decode_token(token).ok_or_else(bad)?;
    let forward = match text.chars().next() {
        Some('n') => true,
        Some('p') => false,
        _ => return Err(bad()),
    };
    let (members, room) = text[1..].split_once('_').ok_or_else(bad)?;
    let members = members.parse().map_err(|_| bad())?;
    Ok((forward, (Reverse(members), room.to_owned())))
}

fn matches(info: &RoomInfo, query: &DirectoryQuery<'_>) -> bool {
    if !query.room_types.is_empty() && !query.room_types.contains(&info.room_type) {
        return false;
    }
    let Some(term) = query.search_term.map(str::trim).filter(|t| !t.is_empty()) else {
        return true;
    };
    let term = term.to_lowercase();
    let hit = |s: &str| s.to_lowercase().contains(&term);
    info.name.as_deref().is_some_and(hit)
        || info.topic.as_deref().is_some_and(hit)
        || info.canonical_alias.as_deref().is_some_and(hit)
        || info.alt_aliases.iter().any(|a| hit(a))
        || info.room_id.to_lowercase() == term
}

/// The rooms published in the directory.
pub struct PublicRooms {
    db: Db,
}

impl PublicRooms {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    pub fn is_published(&self, room_id: &str) -> Result<bool> {
        Ok(PUBLIC_ROOMS.contains(&*self.db, &room_id.to_owned())?)
    }

    /// Publishes (`true`) or unpublishes (`false`) a room in the directory, atomically;
    /// repeating either is harmless. No permission check: `set_visibility` is the
    /// checked way; this is for callers that already decided (`createRoom`).
    pub async fn publish(&self, room_id: &str, public: bool) -> Result<()> {
        let mut batch = Batch::new();
        if public {
            PUBLIC_ROOMS.put(&mut batch, &room_id.to_owned(), &());
        } else {
            PUBLIC_ROOMS.delete(&mut batch, &room_id.to_owned());
        }
        commit(&self.db, batch).await
    }

    /// Publishes (`true`) or removes a room in a bridged network's list (an application
    /// service's `PUT /directory/list/appservice/{networkId}/{roomId}`).
    pub async fn publish_in_network(
        &self,
        instance: &str,
        room_id: &str,
        public: bool,
    ) -> Result<()> {
        let key = (instance.to_owned(), room_id.to_owned());
        let mut batch = Batch::new();
        if public {
            NETWORK_ROOMS.put(&mut batch, &key, &());
        } else {
            NETWORK_ROOMS.delete(&mut batch, &key);
        }
        commit(&self.db, batch).await
    }

    /// The rooms of one bridged network's list, or of them all.
    fn in_network(&self, instance: Option<&String>) -> Result<Vec<String>> {
        let room = |r: trellis_store::StoreResult<((String, String), ())>| {
            r.map(|((_, room), ())| room).map_err(Into::into)
        };
        match instance {
            Some(instance) => NETWORK_ROOMS
                .scan_prefix(&*self.db, instance, Direction::Forward)?
                .map(room)
                .collect(),
            None => {
                NETWORK_ROOMS.scan_prefix(&*self.db, &(), Direction::Forward)?.map(room).collect()
            }
        }
    }

    /// Every published room id, in id order.
    pub fn published(&self) -> Result<Vec<String>> {
        PUBLIC_ROOMS
            .scan_range(
                &*self.db,
                std::ops::Bound::Unbounded,
                std::ops::Bound::Unbounded,
                Direction::Forward,
            )?
            .map(|e| e.map(|(room, ())| room).map_err(Into::into))
            .collect()
    }

    /// Whether `user` may change the room's visibility in the directory under `policy`:
    /// server admins always; otherwise, with `anyone_with_power`, joined members with
    /// the power to send `m.room.canonical_alias`.
    pub fn may_publish(
        &self,
        rooms: &Rooms,
        room_id: &str,
        user: &str,
        server_admin: bool,
        policy: RoomPublishing,
    ) -> Result<bool> {
        if server_admin {
            return Ok(true);
        }
        match policy {
            RoomPublishing::Admins => Ok(false),
            RoomPublishing::AnyoneWithPower => {
                if rooms.membership(room_id, user)? != Some(MembershipState::Join) {
                    return Ok(false);
                }
                let power = rooms.power(room_id, user)?;
                let needed = power.levels["events"]["m.room.canonical_alias"]
                    .as_i64()
                    .or_else(|| power.levels["state_default"].as_i64())
                    .unwrap_or(50);
                Ok(power.level >= needed)
            }
        }
    }

    /// `PUT /directory/list/room/{roomId}`: 404 for an unknown room, 403 without
    /// permission (see `may_publish`).
    pub async fn set_visibility(
        &self,
        rooms: &Rooms,
        room_id: &str,
        user: &str,
        server_admin: bool,
        policy: RoomPublishing,
        public: bool,
    ) -> Result<()> {
        if rooms.room(room_id)?.is_none() {
            return Err(Error::not_found("Room not found"));
        }
        if !self.may_publish(rooms, room_id, user, server_admin, policy)? {
            return Err(Error::forbidden(match policy {
                RoomPublishing::Admins => {
                    "Only server admins may change the room directory on this server"
                }
                RoomPublishing::AnyoneWithPower => {
                    "You need the power to set the room's canonical alias to publish it"
                }
            }));
        }
        self.publish(room_id, public).await
    }

    /// `GET /directory/list/room/{roomId}`: whether the room is published; 404 for an
    /// unknown room.
    pub fn visibility(&self, rooms: &Rooms, room_id: &str) -> Result<bool> {
        if rooms.room(room_id)?.is_none() {
            return Err(Error::not_found("Room not found"));
        }
        self.is_published(room_id)
    }

    /// A page of the directory: published rooms matching the filter, most joined
    /// members first (then by room id), with keyset tokens so that a room moving in the
    /// order shifts a page by at most that room.
    pub fn list(&self, rooms: &Rooms, query: &DirectoryQuery<'_>) -> Result<DirectoryPage> {
        let limit =
            query.limit.unwrap_or(DIRECTORY_DEFAULT_LIMIT).clamp(1, DIRECTORY_MAX_LIMIT) as usize;
        let since = query.since.map(decode_directory_token).transpose()?;
        let mut all = Vec::new();
        let listed = match &query.network {
            Network::Matrix => self.published()?,
            Network::ThirdParty(instance) => self.in_network(Some(instance))?,
            Network::All => {
                let mut ids = self.published()?;
                ids.extend(self.in_network(None)?);
                ids.sort();
                ids.dedup();
                ids
            }
        };
        for room_id in listed {
            if let Some(info) = room_info(rooms, &room_id)?
                && matches(&info, query)
            {
                all.push(info);
            }
        }
        all.sort_by_cached_key(directory_key);
        let (start, end) = match &since {
            None => (0, limit.min(all.len())),
            Some((true, key)) => {
                let start = all.partition_point(|r| directory_key(r) <= *key);
                (start, (start + limit).min(all.len()))
            }
            Some((false, key)) => {
                let end = all.partition_point(|r| directory_key(r) < *key);
                (end.saturating_sub(limit), end)
            }
        };
        let page = &all[start..end];
        let next_batch = match page.last() {
            Some(last) if end < all.len() => {
                Some(encode_directory_token(true, &directory_key(last)))
            }
            _ => None,
        };
        let prev_batch = match page.first() {
            Some(first) if start > 0 => Some(encode_directory_token(false, &directory_key(first))),
            _ => None,
        };
        Ok(DirectoryPage { rooms: page.to_vec(), next_batch, prev_batch, total: all.len() as u64 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_reject_garbage() {
        let key = (Reverse(12), "!a_b:example.org".to_owned());
        let token = encode_directory_token(true, &key);
        assert_eq!(decode_directory_token(&token).unwrap(), (true, key.clone()));
        let token = encode_directory_token(false, &key);
        assert_eq!(decode_directory_token(&token).unwrap(), (false, key));
        for bad in ["", "garbage!", &encode_token("x1_!r:s"), &encode_token("nx_!r:s")] {
            assert_eq!(decode_directory_token(bad).unwrap_err().errcode, "M_INVALID_PARAM");
        }
        let h = HierarchyToken {
            skip: 3,
            max_depth: 2,
            suggested_only: true,
            root: "!r.x:example.org".into(),
        };
        assert_eq!(HierarchyToken::decode(&h.encode()), Some(h));
        assert_eq!(HierarchyToken::decode("nope"), None);
    }

    fn info(room_id: &str, members: u64) -> RoomInfo {
        RoomInfo {
            room_id: room_id.into(),
            room_version: "11".into(),
            name: Some("Cheese Lovers".into()),
            topic: None,
            canonical_alias: Some("#cheese:example.org".into()),
            alt_aliases: vec![],
            avatar_url: None,
            num_joined_members: members,
            world_readable: false,
            guest_can_join: false,
            join_rule: "public".into(),
            allowed_room_ids: vec![],
            room_type: None,
            encryption: None,
        }
    }

    #[test]
    fn filters_match_case_insensitively_and_by_type() {
        let room = info("!a:example.org", 1);
        let q =
            |term: &'static str| DirectoryQuery { search_term: Some(term), ..Default::default() };
        assert!(matches(&room, &q("cHEESE l")));
        assert!(matches(&room, &q("#CHEESE")));
        assert!(!matches(&room, &q("wine")));
        assert!(matches(&room, &q("  ")));
        let types = |t: Vec<Option<String>>| DirectoryQuery { room_types: t, ..Default::default() };
        assert!(matches(&room, &types(vec![None])));
        assert!(!matches(&room, &types(vec![Some("m.space".into())])));
        let mut space = room.clone();
        space.room_type = Some("m.space".into());
        assert!(matches(&space, &types(vec![None, Some("m.space".into())])));
    }

    #[test]
    fn summaries_and_chunks_carry_the_join_rule() {
        let mut room = info("!a:example.org", 3);
        room.join_rule = "restricted".into();
        room.allowed_room_ids = vec!["!b:example.org".into()];
        let summary = serde_json::to_value(room.to_summary().unwrap()).unwrap();
        assert_eq!(summary["join_rule"], "restricted");
        assert_eq!(summary["allowed_room_ids"], json!(["!b:example.org"]));
        assert_eq!(summary["room_version"], "11");
        let chunk = serde_json::to_value(room.to_chunk().unwrap()).unwrap();
        assert_eq!(chunk["join_rule"], "restricted");
        assert_eq!(chunk["num_joined_members"], 3);
        assert_eq!(chunk["canonical_alias"], "#cheese:example.org");
    }
}
