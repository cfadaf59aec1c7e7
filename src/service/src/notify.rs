//! Push rule evaluation: every stored event is evaluated against the push rules of each
//! member it may concern (ruma's evaluator), before it becomes visible on the stream.
//! What notifies is recorded per user and room, which gives the unread counts (per room
//! and per thread) and the `/notifications` history.

use std::{
    collections::{BTreeMap, HashMap},
    ops::Bound::{Excluded, Included},
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

use crate::{Services, commit, rooms::Pdu};

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

/// Unread counts of one room: `(notifications, highlights)` and the same per thread.
#[derive(Debug, Default, PartialEq)]
pub struct Counts {
    pub room: (u64, u64),
    pub threads: BTreeMap<String, (u64, u64)>,
}

pub struct Notifier {
    db: Db,
}

/// Notifications with their positions, and the position to continue from.
pub type HistoryPage = (Vec<(u64, Notification)>, Option<u64>);

fn content(pdu: &Pdu) -> Value {
    serde_json::from_str(pdu.content.get()).unwrap_or(Value::Null)
}

/// The power levels part of the push condition context (for `@room` permission).
fn power_levels_ctx(services: &Services, room_id: &str) -> Option<PushConditionPowerLevelsCtx> {
    let rooms = &services.rooms;
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

impl Notifier {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    /// Evaluates a stored event for the members it may notify and records the results.
    pub async fn evaluate(
        &self,
        services: &Services,
        room_id: &str,
        position: u64,
        pdu: &Pdu,
    ) -> Result<()> {
        let rooms = &services.rooms;
        let body = content(pdu);
        let joined = rooms.members(room_id, "join")?;
        let member_count = UInt::try_from(joined.len()).unwrap_or_default();
        let mut targets = joined;
        // An invite concerns the invitee, who is not a member yet.
        if pdu.kind.to_string() == "m.room.member"
            && body["membership"] == "invite"
            && let Some(invitee) = &pdu.state_key
            && !targets.contains(invitee)
        {
            targets.push(invitee.clone());
        }
        // Other servers' users are notified by their own servers.
        let own = format!(":{}", services.server_name());
        targets.retain(|u| u.as_str() != pdu.sender.as_str() && u.ends_with(&own));
        if targets.is_empty() {
            return Ok(());
        }
        let Ok(room) = OwnedRoomId::try_from(room_id) else { return Ok(()) };
        let power_levels = power_levels_ctx(services, room_id);
        let mut event = crate::sync::sync_event(pdu);
        event["room_id"] = json!(room_id);
        let raw: Raw<Value> = match serde_json::value::to_raw_value(&event) {
            Ok(r) => Raw::from_json(r),
            Err(_) => return Ok(()),
        };
        // Flattened once for all members (ruma's `get_actions` would per member).
        let flat = ruma::push::FlattenedJson::from_raw(&raw);
        let thread = (body["m.relates_to"]["rel_type"] == "m.thread")
            .then(|| body["m.relates_to"]["event_id"].as_str().map(str::to_owned))
            .flatten();
        let mut batch = Batch::new();
        let mut any = false;
        for user in targets {
            let Ok(user_id) = OwnedUserId::try_from(user.as_str()) else { continue };
            let display_name = rooms
                .state_of(room_id, "m.room.member", &user)?
                .and_then(|m| content(&m)["displayname"].as_str().map(str::to_owned))
                .unwrap_or_else(|| user_id.localpart().to_owned());
            let mut ctx =
                PushConditionRoomCtx::new(room.clone(), member_count, user_id, display_name);
            ctx.power_levels = power_levels.clone();
            let ruleset = services.push_rules.cached_ruleset(&user)?;
            let mut actions: &[Action] = &[];
            for rule in ruleset.iter() {
                if rule.applies(&flat, &ctx).await {
                    actions = rule.actions();
                    break;
                }
            }
            if !actions.iter().any(|a| matches!(a, Action::Notify)) {
                continue;
            }
            let highlight = actions
                .iter()
                .any(|a| matches!(a, Action::SetTweak(Tweak::Highlight(HighlightTweakValue::Yes))));
            let unread = Unread { highlight, thread: thread.clone() };
            UNREAD.put(&mut batch, &(user.clone(), room_id.to_owned(), position), &Json(unread));
            let notification = Notification {
                room_id: room_id.to_owned(),
                event_id: pdu.event_id.to_string(),
                highlight,
                ts: now_millis(),
                actions: serde_json::to_value(actions).unwrap_or(Value::Null),
            };
            HISTORY.put(&mut batch, &(user, position), &Json(notification));
            any = true;
        }
        if any {
            commit(&self.db, batch).await?;
        }
        Ok(())
    }

    /// Unread counts of `user` in `room_id`: notifying events after the user's read
    /// receipts (an unthreaded receipt covers everything up to it; a `main` receipt the
    /// main timeline; a thread receipt that thread).
    pub fn counts(&self, services: &Services, user: &str, room_id: &str) -> Result<Counts> {
        let mut unthreaded = 0u64;
        let mut per_thread: HashMap<String, u64> = HashMap::new();
        for (thread, event_id) in services.receipts.latest(room_id, user)? {
            let Some(pos) = services.rooms.position_of(&event_id)? else { continue };
            if thread.is_empty() {
                unthreaded = unthreaded.max(pos);
            } else {
                let entry = per_thread.entry(thread).or_default();
                *entry = (*entry).max(pos);
            }
        }
        let main_read = unthreaded.max(per_thread.get("main").copied().unwrap_or(0));
        let lowest = per_thread.values().copied().chain([unthreaded, main_read]).min().unwrap_or(0);
        let lo = (user.to_owned(), room_id.to_owned(), lowest);
        let hi = (user.to_owned(), room_id.to_owned(), u64::MAX);
        let mut counts = Counts::default();
        for row in UNREAD.scan_range(&*self.db, Excluded(&lo), Included(&hi), Direction::Forward)? {
            let ((_, _, pos), Json(unread)) = row?;
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
        }
        counts.threads.retain(|_, c| c.0 > 0);
        Ok(counts)
    }

    /// The user's notifications, newest first, before position `from`.
    pub fn history(
        &self,
        user: &str,
        from: Option<u64>,
        limit: usize,
        only_highlight: bool,
    ) -> Result<HistoryPage> {
        let lo = (user.to_owned(), 0);
        let hi = (user.to_owned(), from.unwrap_or(u64::MAX));
        let hi = if from.is_some() { Excluded(&hi) } else { Included(&hi) };
        let mut out = Vec::new();
        let mut next = None;
        for row in HISTORY.scan_range(&*self.db, Included(&lo), hi, Direction::Backward)? {
            let ((_, pos), Json(n)) = row?;
            if only_highlight && !n.highlight {
                continue;
            }
            if out.len() == limit {
                next = out.last().map(|(p, _): &(u64, Notification)| *p);
                break;
            }
            out.push((pos, n));
        }
        Ok((out, next))
    }
}
