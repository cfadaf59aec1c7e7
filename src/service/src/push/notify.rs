//! Push rule evaluation: every stored event is evaluated against the push rules of each
//! member it may concern (ruma's evaluator), before it becomes visible on the stream.
//! What notifies is recorded, which gives the unread counts (per room and per thread)
//! and the `/notifications` history: one row per event for the members who all get the
//! same from the server-default rules (most of them, most of the time), and rows per
//! user for the others.

use std::{
    collections::{BTreeMap, HashMap},
    ops::Bound::{Excluded, Included},
    sync::{Arc, Mutex},
};

use ruma::{
    Int, OwnedRoomId, OwnedUserId, RoomVersionId, UInt,
    power_levels::NotificationPowerLevels,
    push::{Action, HighlightTweakValue, PushConditionPowerLevelsCtx, PushConditionRoomCtx, Tweak},
    room_version_rules::RoomPowerLevelsRules,
    serde::Raw,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use trellis_core::{Result, now_millis};
use trellis_store::{Batch, Db, Direction, Json, Table, catalog};

use crate::{
    Services,
    pipeline::{Appended, Consumer},
    push::rules::PushRules,
    rooms::{Pdu, Rooms},
};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Unread {
    highlight: bool,
    /// The thread root for events in a thread.
    thread: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Notification {
    pub room_id: String,
    pub event_id: String,
    pub highlight: bool,
    pub ts: u64,
    pub actions: Value,
}

/// (user id, room id, position) -> what the event there counts as
const UNREAD: Table<(String, String, u64), Json<Unread>> = Table::new(&catalog::NOTIFY_UNREAD);
/// (user id, position) -> the notification, for `/notifications`
const HISTORY: Table<(String, u64), Json<Notification>> = Table::new(&catalog::NOTIFY_HISTORY);
/// (room id, position) -> the notification of every member joined at that position but
/// its sender and the excluded
const SHARED: Table<(String, u64), Json<Shared>> = Table::new(&catalog::NOTIFY_SHARED);
/// (room id, position, user id) -> (): members evaluated on their own, whatever their
/// rules gave; kept apart from the shared row, which every member's count reads, so that
/// row stays small in a large room where many members have rules of their own
const EXCLUDED: Table<(String, u64, String), ()> = Table::new(&catalog::NOTIFY_EXCLUDED);

/// An event's notification for the members it does not single out and whose rules are
/// the server defaults: written once instead of twice per member, which was most of
/// the cost of storing a message in a room of many members.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Shared {
    unread: Unread,
    sender: String,
    event_id: String,
    ts: u64,
    actions: Value,
}

impl Shared {
    /// Whether the shared row of `room_id` at `position` is `user`'s, given their
    /// memberships in the room.
    fn concerns(
        &self,
        db: &dyn trellis_store::Engine,
        room_id: &str,
        position: u64,
        user: &str,
        memberships: &[(u64, String)],
    ) -> Result<bool> {
        Ok(self.sender != user
            && crate::rooms::visibility::at(memberships, position) == Some("join")
            && !EXCLUDED.contains(db, &(room_id.to_owned(), position, user.to_owned()))?)
    }

    fn notification(&self, room_id: &str) -> Notification {
        Notification {
            room_id: room_id.to_owned(),
            event_id: self.event_id.clone(),
            highlight: self.unread.highlight,
            ts: self.ts,
            actions: self.actions.clone(),
        }
    }
}

/// Unread counts of one room: `(notifications, highlights)` and the same per thread.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Counts {
    pub room: (u64, u64),
    pub threads: BTreeMap<String, (u64, u64)>,
}

/// Counts of one user's room as last computed: valid while the receipts they were
/// computed against stand, and extended by the rows after `upto`.
struct Counted {
    receipts: Vec<(String, String)>,
    counts: Counts,
    upto: u64,
}

/// In the receipts counts are computed against, the join position of a member without
/// any receipt (so that the memo of counts notices a rejoin).
const JOINED_MARK: &str = "\u{0}joined";

/// Shared notification rows one `/notifications` request reads per room at most.
const HISTORY_SCAN_PER_ROOM: usize = 2_000;

/// Rooms whose counts are kept; past this the memo starts over.
const COUNTED_MAX: usize = 100_000;

pub struct Notifier {
    db: Db,
    /// What evaluation reads: the room's state and members, and their push rules.
    rooms: Arc<Rooms>,
    push_rules: Arc<PushRules>,
    /// `:server`: other servers' users are notified by their own servers.
    own_suffix: String,
    /// (user, room) -> counts so far. A busy room nobody reads grows its unread rows
    /// with every message, and every sync of every member would count them again.
    counted: Mutex<HashMap<(String, String), Counted>>,
}

/// Notifications with their positions, and the position to continue from.
pub type HistoryPage = (Vec<(u64, Notification)>, Option<u64>);

fn content(pdu: &Pdu) -> Value {
    serde_json::from_str(pdu.content.get()).unwrap_or(Value::Null)
}

/// The power levels part of the push condition context (for `@room` permission).
fn power_levels_ctx(rooms: &Rooms, room_id: &str) -> Option<PushConditionPowerLevelsCtx> {
    let levels = rooms.state_of(room_id, "m.room.power_levels", "").ok()??;
    let levels = content(&levels);
    let create = rooms.state_of(room_id, "m.room.create", "").ok()??;
    let version = rooms.room(room_id).ok()??.1.version;
    let rules = RoomVersionId::try_from(version.as_str()).ok()?.rules()?;
    let mut creators = vec![create.sender.clone()];
    if let Some(extra) = content(&create)["additional_creators"].as_array() {
        creators.extend(extra.iter().filter_map(|u| u.as_str()?.try_into().ok()));
    }
    let users: BTreeMap<OwnedUserId, Int> = levels["users"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(u, l)| Some((u.as_str().try_into().ok()?, Int::new(l.as_i64()?)?)))
                .collect()
        })
        .unwrap_or_default();
    let users_default = levels["users_default"].as_i64().and_then(Int::new).unwrap_or_default();
    let notifications: NotificationPowerLevels =
        serde_json::from_value(levels["notifications"].clone())
            .unwrap_or_else(|_| NotificationPowerLevels::new());
    Some(PushConditionPowerLevelsCtx::new(
        users,
        users_default,
        notifications,
        RoomPowerLevelsRules::new(&rules.authorization, creators),
    ))
}

/// A user no event can single out: no state key or mention names it.
const NOBODY: &str = "@_trellis_push_nobody_7f3a9c_:trellis.invalid";
const NOBODY_NAME: &str = "_trellis_push_nobody_7f3a9c_";
static NOBODY_ID: std::sync::LazyLock<OwnedUserId> =
    std::sync::LazyLock::new(|| OwnedUserId::try_from(NOBODY).expect("a valid user id"));
static NOBODY_RULES: std::sync::LazyLock<ruma::push::Ruleset> =
    std::sync::LazyLock::new(|| crate::push::rules::server_default(&NOBODY_ID));

/// Whether the actions notify, and if so whether they highlight.
fn notifies(actions: &[Action]) -> Option<bool> {
    actions.iter().any(|a| matches!(a, Action::Notify)).then(|| {
        actions
            .iter()
            .any(|a| matches!(a, Action::SetTweak(Tweak::Highlight(HighlightTweakValue::Yes))))
    })
}

/// What in an event may single a user out for the server-default push rules: being its
/// state key (`.m.rule.invite_for_me`) or in `m.mentions.user_ids`
/// (`.m.rule.is_user_mention`). The default rule set has no rule reading the user's
/// display name or localpart any more (the legacy body-matching mention rules are gone
/// from it); the unit test below fails if that changes.
struct SinglesOut<'a> {
    state_key: Option<&'a str>,
    mentioned: Vec<&'a str>,
    body: Option<String>,
}

impl<'a> SinglesOut<'a> {
    fn of(state_key: Option<&'a str>, content: &'a Value) -> Self {
        Self {
            state_key,
            mentioned: content["m.mentions"]["user_ids"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect(),
            body: content["body"].as_str().map(str::to_lowercase),
        }
    }

    /// Whether the event may be an `@room` mention (the only case where the default
    /// rules look at the sender's power).
    fn may_mention_room(&self, content: &Value) -> bool {
        content["m.mentions"]["room"] == true
            || self.body.as_deref().is_some_and(|b| b.contains("@room"))
    }

    /// By id: the state key or a mention.
    fn by_id(&self, user_id: &str) -> bool {
        self.state_key == Some(user_id) || self.mentioned.contains(&user_id)
    }
}

/// The actions of the first rule of `ruleset` that applies (none: do nothing).
async fn first_match(
    ruleset: &ruma::push::Ruleset,
    flat: &ruma::push::FlattenedJson,
    ctx: &PushConditionRoomCtx,
) -> Vec<Action> {
    for rule in ruleset.iter() {
        if rule.applies(flat, ctx).await {
            return rule.actions().to_vec();
        }
    }
    Vec::new()
}

impl Notifier {
    /// Adds to `batch` the removal of everything counted for `room_id`: its shared and
    /// excluded rows, and the unread and history rows of `users` (its local members).
    pub fn purge_room_into(
        &self,
        batch: &mut Batch,
        room_id: &str,
        users: &[String],
    ) -> Result<()> {
        let room = room_id.to_owned();
        for row in SHARED.scan_prefix(&*self.db, &room, Direction::Forward)? {
            SHARED.delete(batch, &row?.0);
        }
        for row in EXCLUDED.scan_prefix(&*self.db, &room, Direction::Forward)? {
            EXCLUDED.delete(batch, &row?.0);
        }
        for user in users {
            for row in
                UNREAD.scan_prefix(&*self.db, &(user.clone(), room.clone()), Direction::Forward)?
            {
                UNREAD.delete(batch, &row?.0);
            }
            for row in HISTORY.scan_prefix(&*self.db, user, Direction::Forward)? {
                let (key, Json(notification)) = row?;
                if notification.room_id == room_id {
                    HISTORY.delete(batch, &key);
                }
            }
        }
        Ok(())
    }

    /// Adds to `batch` the removal of what the event at `position` of `room_id` counts
    /// as, for everyone (an expired message): its shared row, and the rows of `members`
    /// (the room's local members; those evaluated on their own are found too). Call
    /// `forget_room` once the batch is written.
    pub fn forget_event_into(
        &self,
        batch: &mut Batch,
        room_id: &str,
        position: u64,
        members: &[String],
    ) -> Result<()> {
        let room = room_id.to_owned();
        SHARED.delete(batch, &(room.clone(), position));
        let mut users: Vec<String> =
            members.iter().filter(|u| u.ends_with(&self.own_suffix)).cloned().collect();
        for row in EXCLUDED.scan_prefix(&*self.db, &(room.clone(), position), Direction::Forward)? {
            let (key, ()) = row?;
            EXCLUDED.delete(batch, &key);
            users.push(key.2);
        }
        for user in users {
            UNREAD.delete(batch, &(user.clone(), room.clone(), position));
            HISTORY.delete(batch, &(user, position));
        }
        Ok(())
    }

    /// Drops the counts kept in memory for `room_id` (after its rows were purged).
    pub fn forget_room(&self, room_id: &str) {
        let mut counted = self.counted.lock().unwrap_or_else(|p| p.into_inner());
        counted.retain(|(_, room), _| room != room_id);
    }

    pub fn new(db: Db, rooms: Arc<Rooms>, push_rules: Arc<PushRules>, server_name: &str) -> Self {
        let own_suffix = format!(":{server_name}");
        Self { db, rooms, push_rules, own_suffix, counted: Mutex::default() }
    }

    /// Evaluates a stored event for the members it may notify and records the results,
    /// written unsynced: the answer is the WAL ticket the event's own sync must cover.
    pub async fn evaluate(
        &self,
        room_id: &str,
        position: u64,
        pdu: &Pdu,
        members: Option<Arc<Vec<String>>>,
    ) -> Result<Option<u64>> {
        let rooms = &self.rooms;
        let body = content(pdu);
        // The members as the event left them (read under the room's lock when it was
        // stored): by now a later event may have let someone in or out.
        let joined = match members {
            Some(members) => members,
            None => rooms.joined_members(room_id)?,
        };
        let member_count = UInt::try_from(joined.len()).unwrap_or_default();
        let mut targets = (*joined).clone();
        // An invite concerns the invitee, who is not a member yet.
        if pdu.kind.to_string() == "m.room.member"
            && body["membership"] == "invite"
            && let Some(invitee) = &pdu.state_key
            && !targets.contains(invitee)
        {
            targets.push(invitee.clone());
        }
        // Other servers' users are notified by their own servers.
        targets.retain(|u| u.as_str() != pdu.sender.as_str() && u.ends_with(&self.own_suffix));
        if targets.is_empty() {
            return Ok(None);
        }
        let Ok(room) = OwnedRoomId::try_from(room_id) else { return Ok(None) };
        let mut event = crate::realtime::sync::sync_event(pdu);
        event["room_id"] = json!(room_id);
        let raw: Raw<Value> = match serde_json::value::to_raw_value(&event) {
            Ok(r) => Raw::from_json(r),
            Err(_) => return Ok(None),
        };
        // Flattened once for all members (ruma's `get_actions` would per member).
        let flat = ruma::push::FlattenedJson::from_raw(&raw);
        let thread = (body["m.relates_to"]["rel_type"] == "m.thread")
            .then(|| body["m.relates_to"]["event_id"].as_str().map(str::to_owned))
            .flatten();
        let singles = SinglesOut::of(pdu.state_key.as_deref(), &body);
        let rulesets = targets
            .iter()
            .map(|user| self.push_rules.cached_ruleset(user))
            .collect::<Result<Vec<_>>>()?;
        // The default rules ask for the sender's power only about room mentions; other
        // rulesets may ask about anything.
        let power_levels =
            if singles.may_mention_room(&body) || rulesets.iter().any(|r| !r.is_default) {
                power_levels_ctx(rooms, room_id)
            } else {
                None
            };
        // Display names matter to users evaluated one by one only.
        // evaluated one by one.
        let names = if rulesets.iter().any(|r| !r.is_default) {
            rooms.display_names(room_id, &targets)?
        } else {
            vec![None; targets.len()]
        };
        let mut batch = Batch::new();
        let mut any = false;
        // What the default rules give a user the event does not single out, worked out
        // once (with a user nobody can mention) instead of once per member.
        let mut unsingled: Option<Vec<Action>> = None;
        let mut individual = Vec::new();
        let nobody_unsingled = !singles.by_id(NOBODY);
        let unread_of = |highlight| Unread { highlight, thread: thread.clone() };
        let notification_of = |highlight, actions: &[Action]| Notification {
            room_id: room_id.to_owned(),
            event_id: pdu.event_id.to_string(),
            highlight,
            ts: now_millis(),
            actions: serde_json::to_value(actions).unwrap_or(Value::Null),
        };
        for ((user, rules), name) in targets.into_iter().zip(rulesets).zip(names) {
            let Ok(user_id) = OwnedUserId::try_from(user.as_str()) else { continue };
            let shared = nobody_unsingled && rules.is_default && !singles.by_id(&user);
            if shared {
                if unsingled.is_none() {
                    let mut ctx = PushConditionRoomCtx::new(
                        room.clone(),
                        member_count,
                        NOBODY_ID.clone(),
                        NOBODY_NAME.to_owned(),
                    );
                    ctx.power_levels = power_levels.clone();
                    unsingled = Some(first_match(&NOBODY_RULES, &flat, &ctx).await);
                }
                continue;
            }
            individual.push(user.clone());
            let display_name = name.unwrap_or_else(|| user_id.localpart().to_owned());
            let mut ctx =
                PushConditionRoomCtx::new(room.clone(), member_count, user_id, display_name);
            ctx.power_levels = power_levels.clone();
            let actions = first_match(&rules.ruleset, &flat, &ctx).await;
            let Some(highlight) = notifies(&actions) else { continue };
            let unread = unread_of(highlight);
            UNREAD.put(&mut batch, &(user.clone(), room_id.to_owned(), position), &Json(unread));
            HISTORY.put(&mut batch, &(user, position), &Json(notification_of(highlight, &actions)));
            any = true;
        }
        if let Some(actions) = unsingled
            && let Some(highlight) = notifies(&actions)
        {
            for user in individual {
                EXCLUDED.put(&mut batch, &(room_id.to_owned(), position, user), &());
            }
            let shared = Shared {
                unread: unread_of(highlight),
                sender: pdu.sender.to_string(),
                event_id: pdu.event_id.to_string(),
                ts: now_millis(),
                actions: serde_json::to_value(&actions).unwrap_or(Value::Null),
            };
            SHARED.put(&mut batch, &(room_id.to_owned(), position), &Json(shared));
            any = true;
        }
        if !any {
            return Ok(None);
        }
        // Into the memtable and the WAL buffer only; no disk wait on this thread.
        Ok(Some(self.db.write_unsynced(batch)?))
    }

    /// What the event at `position` of `room_id` (sent by `sender`) notifies `user` of,
    /// if anything, as evaluation recorded it: the user's own row, or the event's shared
    /// row when it is theirs.
    pub fn notification_for(
        &self,
        room_id: &str,
        position: u64,
        user: &str,
        sender: &str,
    ) -> Result<Option<Notification>> {
        if let Some(Json(own)) = HISTORY.get(&*self.db, &(user.to_owned(), position))? {
            return Ok((own.room_id == room_id).then_some(own));
        }
        if user == sender {
            return Ok(None);
        }
        let Some(Json(shared)) = SHARED.get(&*self.db, &(room_id.to_owned(), position))? else {
            return Ok(None);
        };
        if EXCLUDED.contains(&*self.db, &(room_id.to_owned(), position, user.to_owned()))? {
            return Ok(None);
        }
        Ok(Some(shared.notification(room_id)))
    }

    /// Unread counts of `user` in `room_id` up to stream position `upto` (a sync's
    /// visible position, so every row at or before it is written): notifying events
    /// after the user's read receipts (an unthreaded receipt covers everything up to
    /// it; a `main` receipt the main timeline; a thread receipt that thread).
    pub fn counts(
        &self,
        services: &Services,
        user: &str,
        room_id: &str,
        upto: u64,
    ) -> Result<Counts> {
        // A client's token may run ahead of what is visible (a restored database): rows
        // beyond the visible position may not be written yet.
        let upto = upto.min(services.rooms.stream.visible());
        let mut receipts = services.receipts.latest(room_id, user)?;
        if receipts.is_empty() {
            // A member who never read the room counts from their latest join, as other
            // servers count: the invite that brought them in is not unread.
            let log = services.rooms.membership_log(room_id, user)?;
            if let Some((joined, _)) = log.iter().rev().find(|(_, m)| m == "join") {
                receipts.push((JOINED_MARK.to_owned(), joined.to_string()));
            }
        }
        let key = (user.to_owned(), room_id.to_owned());
        let known = {
            let counted = self.counted.lock().unwrap_or_else(|p| p.into_inner());
            counted
                .get(&key)
                .filter(|c| c.receipts == receipts && c.upto <= upto)
                .map(|c| (c.counts.clone(), c.upto))
        };
        let mut unthreaded = 0u64;
        let mut per_thread: HashMap<String, u64> = HashMap::new();
        for (thread, event_id) in &receipts {
            let pos = match thread.as_str() {
                JOINED_MARK => event_id.parse().ok(),
                _ => services.rooms.position_of(event_id)?,
            };
            let Some(pos) = pos else { continue };
            if thread.is_empty() || thread == JOINED_MARK {
                unthreaded = unthreaded.max(pos);
            } else {
                let entry = per_thread.entry(thread.clone()).or_default();
                *entry = (*entry).max(pos);
            }
        }
        let main_read = unthreaded.max(per_thread.get("main").copied().unwrap_or(0));
        let lowest = per_thread.values().copied().chain([unthreaded, main_read]).min().unwrap_or(0);
        // Rows are counted alike whenever they are read, so counts so far plus those of
        // the rows since are the counts from scratch.
        let (mut counts, from) = known.unwrap_or((Counts::default(), lowest));
        let from = from.max(lowest);
        let mut tally = |pos: u64, unread: &Unread| {
            let (read, slot) = match &unread.thread {
                Some(root) => {
                    let read = unthreaded.max(per_thread.get(root).copied().unwrap_or(0));
                    (read, counts.threads.entry(root.clone()).or_default())
                }
                None => (main_read, &mut counts.room),
            };
            if pos > read {
                slot.0 += 1;
                slot.1 += u64::from(unread.highlight);
            }
        };
        let lo = (user.to_owned(), room_id.to_owned(), from);
        let hi = (user.to_owned(), room_id.to_owned(), upto);
        for row in UNREAD.scan_range(&*self.db, Excluded(&lo), Included(&hi), Direction::Forward)? {
            let ((_, _, pos), Json(unread)) = row?;
            tally(pos, &unread);
        }
        // The shared rows since `from`; the member's membership log is read at the first
        // one, and rows from before they first joined (a member without any receipt
        // counts from 0) are skipped over with one seek instead of read.
        let hi = (room_id.to_owned(), upto);
        let mut start = from;
        // The member's membership log and first join, read at the first row.
        let mut memberships: Option<std::sync::Arc<Vec<(u64, String)>>> = None;
        let mut first_join = None;
        'scan: loop {
            let lo = (room_id.to_owned(), start);
            let rows =
                SHARED.scan_range(&*self.db, Excluded(&lo), Included(&hi), Direction::Forward)?;
            for row in rows {
                let ((_, pos), Json(shared)) = row?;
                let log = match &memberships {
                    Some(log) => log,
                    None => {
                        let log = services.rooms.membership_log(room_id, user)?;
                        first_join = log.iter().find(|(_, m)| m == "join").map(|(p, _)| *p);
                        memberships.insert(log)
                    }
                };
                let Some(first_join) = first_join else { break 'scan };
                if pos < first_join && start < first_join {
                    start = first_join;
                    continue 'scan;
                }
                if shared.concerns(&*self.db, room_id, pos, user, log)? {
                    tally(pos, &shared.unread);
                }
            }
            break;
        }
        counts.threads.retain(|_, c| c.0 > 0);
        let mut counted = self.counted.lock().unwrap_or_else(|p| p.into_inner());
        if counted.get(&key).is_none_or(|c| c.upto <= upto) {
            if counted.len() >= COUNTED_MAX {
                counted.clear();
            }
            counted.insert(key, Counted { receipts, counts: counts.clone(), upto });
        }
        Ok(counts)
    }

    /// The user's notifications, newest first, before position `from`: their own rows
    /// merged with the shared rows of every room they have been in.
    pub fn history(
        &self,
        services: &Services,
        user: &str,
        from: Option<u64>,
        limit: usize,
        only_highlight: bool,
    ) -> Result<HistoryPage> {
        let before = from.unwrap_or(u64::MAX);
        let mut found: Vec<(u64, Notification)> = Vec::new();
        let lo = (user.to_owned(), 0);
        let hi = (user.to_owned(), before);
        for row in
            HISTORY.scan_range(&*self.db, Included(&lo), Excluded(&hi), Direction::Backward)?
        {
            let ((_, pos), Json(n)) = row?;
            if only_highlight && !n.highlight {
                continue;
            }
            found.push((pos, n));
            if found.len() > limit {
                break;
            }
        }
        // Rows at or below `floor` may be missing from this page: a room whose scan hit
        // its cap was not read below it, so the page stops there and the next starts
        // below it.
        let mut floor = 0;
        // Once a page and one are found, older rows cannot make it: later rooms are read
        // only above the oldest of those.
        let oldest_needed = |found: &mut Vec<(u64, Notification)>| {
            if found.len() > limit {
                found.sort_by_key(|(p, _)| std::cmp::Reverse(*p));
                found.truncate(limit + 1);
                found.last().map_or(0, |(p, _)| *p)
            } else {
                0
            }
        };
        let mut above = oldest_needed(&mut found);
        for room in services.rooms.user_rooms(user)? {
            let room_id = room.room_id.as_str();
            let memberships = services.rooms.membership_log(room_id, user)?;
            let mut budget = HISTORY_SCAN_PER_ROOM;
            // Only the stretches the user was joined, newest first.
            for (first, last) in
                crate::rooms::visibility::joined_stretches(&memberships).into_iter().rev()
            {
                let top = last.min(before.saturating_sub(1));
                let bottom = first.max(above).max(floor);
                if top < bottom || budget == 0 {
                    continue;
                }
                let lo = (room_id.to_owned(), bottom);
                let hi = (room_id.to_owned(), top);
                let rows = SHARED.scan_range(
                    &*self.db,
                    Included(&lo),
                    Included(&hi),
                    Direction::Backward,
                )?;
                let mut taken = 0;
                for row in rows {
                    let ((_, pos), Json(shared)) = row?;
                    budget -= 1;
                    if (!only_highlight || shared.unread.highlight)
                        && shared.concerns(&*self.db, room_id, pos, user, &memberships)?
                    {
                        found.push((pos, shared.notification(room_id)));
                        taken += 1;
                    }
                    if budget == 0 {
                        // A muted room's rows are never the user's: how far one request
                        // reads in a room is bounded.
                        floor = floor.max(pos);
                        break;
                    }
                    if taken > limit {
                        break;
                    }
                }
            }
            above = oldest_needed(&mut found);
        }
        found.retain(|(p, _)| *p >= floor);
        found.sort_by_key(|(p, _)| std::cmp::Reverse(*p));
        let mut next = None;
        if found.len() > limit {
            found.truncate(limit);
            next = found.last().map(|(p, _)| *p);
        } else if floor > 0 {
            // The rows below the cut are still to be read.
            next = Some(floor);
        }
        Ok((found, next))
    }
}

/// First step of the event pipeline: push rules decide whom the event notifies, which
/// the unread counts and `/notifications` are read from.
#[async_trait::async_trait]
impl Consumer for Notifier {
    fn name(&self) -> &'static str {
        "push_rules"
    }

    async fn on_event(&self, event: &Appended<'_>) -> Result<Option<u64>> {
        let members = event.members.cloned();
        self.evaluate(event.room_id.as_str(), event.position, event.pdu, members).await
    }
}

#[cfg(test)]
mod tests {
    use ruma::push::FlattenedJson;

    use super::*;

    fn event(kind: &str, state_key: Option<&str>, content: Value) -> (Value, Option<String>) {
        let mut event = json!({
            "type": kind, "content": content, "sender": "@carol:example.org",
            "event_id": "$e", "room_id": "!r:example.org", "origin_server_ts": 1,
        });
        if let Some(key) = state_key {
            event["state_key"] = json!(key);
        }
        (event, state_key.map(str::to_owned))
    }

    async fn actions_for(user: &str, name: &str, event: &Value, members: u32) -> Vec<Action> {
        let user_id = OwnedUserId::try_from(user).unwrap();
        let ruleset = crate::push::rules::server_default(&user_id);
        let raw: Raw<Value> = Raw::from_json(serde_json::value::to_raw_value(event).unwrap());
        let flat = FlattenedJson::from_raw(&raw);
        let room = OwnedRoomId::try_from("!r:example.org").unwrap();
        let ctx = PushConditionRoomCtx::new(room, UInt::from(members), user_id, name.to_owned());
        first_match(&ruleset, &flat, &ctx).await
    }

    /// The shortcut's premise: with the server-default rules, a user an event does not
    /// single out gets exactly what the user nobody can mention gets.
    #[tokio::test]
    async fn users_not_singled_out_get_what_nobody_gets() {
        let alice = ("@alice:example.org", "Alice Liddell");
        let events = [
            event("m.room.message", None, json!({"msgtype": "m.text", "body": "hello all"})),
            event("m.room.message", None, json!({"msgtype": "m.notice", "body": "a bot"})),
            event("m.room.message", None, json!({"msgtype": "m.text", "body": "@room look"})),
            event(
                "m.room.message",
                None,
                json!({"msgtype": "m.text", "body": "hey Alice Liddell"}),
            ),
            event("m.room.message", None, json!({"msgtype": "m.text", "body": "hey ALICE"})),
            event(
                "m.room.message",
                None,
                json!({"msgtype": "m.text", "body": "hi", "m.mentions": {"user_ids": ["@bob:example.org"]}}),
            ),
            event(
                "m.room.message",
                None,
                json!({"msgtype": "m.text", "body": "hi", "m.mentions": {"user_ids": [alice.0]}}),
            ),
            event("m.room.encrypted", None, json!({"algorithm": "m.megolm.v1.aes-sha2"})),
            event(
                "m.reaction",
                None,
                json!({"m.relates_to": {"rel_type": "m.annotation", "event_id": "$x", "key": "+1"}}),
            ),
            event("m.room.member", Some(alice.0), json!({"membership": "invite"})),
            event("m.room.member", Some("@bob:example.org"), json!({"membership": "invite"})),
            event(
                "m.room.tombstone",
                Some(""),
                json!({"body": "gone", "replacement_room": "!n:x"}),
            ),
            event("m.call.invite", None, json!({"call_id": "c", "version": 1})),
            event("m.rtc.notification", None, json!({"notification_type": "ring"})),
        ];
        let mut singled = 0;
        for (event, key) in &events {
            let content = event["content"].clone();
            let pdu_like = SinglesOut::of(key.as_deref(), &content);
            assert!(!pdu_like.by_id(NOBODY));
            for members in [2, 20] {
                let mine = actions_for(alice.0, alice.1, event, members).await;
                let nobodys = actions_for(NOBODY, NOBODY_NAME, event, members).await;
                if pdu_like.by_id(alice.0) {
                    singled += 1;
                } else {
                    let json = |a: &[Action]| serde_json::to_value(a).unwrap();
                    assert_eq!(json(&mine), json(&nobodys), "{event}");
                }
            }
        }
        // The mention and the invite single Alice out; her name in a body does not.
        assert_eq!(singled, 4);
        // And they matter: the mention highlights for Alice, not for nobody.
        let (mention, _) = &events[6];
        let highlight = |a: &[Action]| {
            a.iter()
                .any(|a| matches!(a, Action::SetTweak(Tweak::Highlight(HighlightTweakValue::Yes))))
        };
        assert!(highlight(&actions_for(alice.0, alice.1, mention, 20).await));
        // A MatrixRTC ring rings, in a room of any size.
        let (ring, _) = events.last().unwrap();
        let rings = serde_json::to_value(actions_for(alice.0, alice.1, ring, 20).await).unwrap();
        assert_eq!(rings, json!(["notify", {"set_tweak": "sound", "value": "ring"}]));
        assert!(!highlight(&actions_for(NOBODY, NOBODY_NAME, mention, 20).await));
    }
}
