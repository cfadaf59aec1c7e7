//! Presence: whether users are online, idle (`unavailable`) or offline, with a status
//! message and the time of their last activity.
//!
//! The current state lives in memory; the state a user set and their last activity are
//! also written to the `presence` table, so a restart keeps them (activity at most once a
//! minute per user, since every request counts as activity). A user who set `online`
//! reads as `unavailable` once idle for `presence.idle_timeout_seconds`; that lapse takes
//! a stream position like every other visible change, so waiting syncs learn of it.

use std::{
    collections::HashMap,
    ops::Bound,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use ruma::{UserId, presence::PresenceState};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use trellis_core::{Error, Result, config::PresenceConfig, now_millis};
use trellis_store::{Batch, Db, Direction, Json, Table, catalog};

use crate::{
    Services, commit,
    rooms::{Rooms, stream::Ticket},
};

/// user id -> the state last set and the last activity
const PRESENCE: Table<String, Json<PresenceRecord>> = Table::new(&catalog::PRESENCE);

pub const ONLINE: &str = "online";
pub const UNAVAILABLE: &str = "unavailable";
pub const OFFLINE: &str = "offline";

/// A user counts as "currently active" this long after their last activity.
const CURRENTLY_ACTIVE_MS: u64 = 60_000;
/// Activity times reach the table at most this often per user.
const PERSIST_ACTIVITY_MS: u64 = 60_000;
/// Status messages are copied into every sync of everyone sharing a room with the user.
pub const MAX_STATUS_MSG_BYTES: usize = 4096;

/// What is stored per user.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PresenceRecord {
    /// The state the user (or their client) last set: online, unavailable or offline.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_msg: Option<String>,
    /// Last activity, milliseconds since the epoch; 0 when never active.
    pub last_active_ms: u64,
}

/// A user's presence as others see it now.
#[derive(Debug, Clone, PartialEq)]
pub struct PresenceStatus {
    pub presence: &'static str,
    pub status_msg: Option<String>,
    /// Milliseconds since the last activity, when known.
    pub last_active_ago: Option<u64>,
    /// Only for `online` users: active within the last minute.
    pub currently_active: Option<bool>,
}

impl PresenceStatus {
    pub fn offline() -> Self {
        Self { presence: OFFLINE, status_msg: None, last_active_ago: None, currently_active: None }
    }

    /// The content of an `m.presence` event.
    pub fn to_content(&self) -> Value {
        let mut content = json!({ "presence": self.presence });
        if let Some(msg) = &self.status_msg {
            content["status_msg"] = json!(msg);
        }
        if let Some(ago) = self.last_active_ago {
            content["last_active_ago"] = json!(ago);
        }
        if let Some(active) = self.currently_active {
            content["currently_active"] = json!(active);
        }
        content
    }
}

struct Entry {
    /// `None`: the user never set presence nor was active.
    record: Option<PresenceRecord>,
    /// Stream position of the last change others should see; 0 when none since start-up.
    changed_at: u64,
    /// `last_active_ms` as last written to the table.
    persisted_active_ms: u64,
    /// A task is waiting to mark this user idle.
    idle_timer: bool,
}

pub struct Presence {
    db: Db,
    /// A change wakes everyone sharing a room with the user.
    rooms: Arc<Rooms>,
    enabled: bool,
    idle_timeout_ms: u64,
    offline_timeout_ms: u64,
    users: Mutex<HashMap<String, Entry>>,
    /// Serialises table writes so that a late write of an activity time can never put
    /// back a state that a newer `set_state` replaced: each write stores the in-memory
    /// record as it is when the write takes this lock.
    write_lock: tokio::sync::Mutex<()>,
}

impl Presence {
    pub fn new(db: Db, rooms: Arc<Rooms>, config: &PresenceConfig) -> Arc<Self> {
        let presence = Arc::new(Self {
            db,
            rooms,
            enabled: config.enabled,
            idle_timeout_ms: config.idle_timeout_seconds.saturating_mul(1000),
            offline_timeout_ms: config.offline_timeout_seconds.saturating_mul(1000),
            users: Mutex::default(),
            write_lock: tokio::sync::Mutex::new(()),
        });
        if presence.enabled
            && let Ok(handle) = tokio::runtime::Handle::try_current()
        {
            // A scan of the table: off the async workers.
            let this = presence.clone();
            handle.spawn_blocking(move || this.resume_idle_timers());
        }
        presence
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        self.users.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes sure `user_id` has an entry, reading the table outside the lock.
    fn load(&self, user_id: &str) -> Result<()> {
        if self.lock().contains_key(user_id) {
            return Ok(());
        }
        let record = PRESENCE.get(&*self.db, &user_id.to_owned())?.map(|Json(r)| r);
        let persisted_active_ms = record.as_ref().map_or(0, |r| r.last_active_ms);
        self.lock().entry(user_id.to_owned()).or_insert(Entry {
            record,
            changed_at: 0,
            persisted_active_ms,
            idle_timer: false,
        });
        Ok(())
    }

    fn status_of(&self, record: Option<&PresenceRecord>, now: u64) -> PresenceStatus {
        let Some(record) = record else { return PresenceStatus::offline() };
        let last = record.last_active_ms;
        let since = now.saturating_sub(last);
        let presence = match record.state.as_str() {
            ONLINE if last > 0 && since >= self.offline_timeout_ms => OFFLINE,
            ONLINE if last == 0 || since >= self.idle_timeout_ms => UNAVAILABLE,
            ONLINE => ONLINE,
            UNAVAILABLE => UNAVAILABLE,
            _ => OFFLINE,
        };
        PresenceStatus {
            presence,
            status_msg: record.status_msg.clone(),
            last_active_ago: (last > 0).then_some(since),
            currently_active: (presence == ONLINE).then_some(since < CURRENTLY_ACTIVE_MS),
        }
    }

    /// The user's presence now; `offline` when unknown or when presence is disabled.
    pub fn status(&self, user_id: &str) -> Result<PresenceStatus> {
        if !self.enabled {
            return Ok(PresenceStatus::offline());
        }
        self.load(user_id)?;
        let users = self.lock();
        Ok(self.status_of(users.get(user_id).and_then(|e| e.record.as_ref()), now_millis()))
    }

    /// The content of the user's `m.presence` event, for sync; `None` when the user has
    /// no presence yet or presence is disabled.
    pub fn presence_content(&self, user_id: &str) -> Option<Value> {
        if !self.enabled {
            return None;
        }
        if let Err(e) = self.load(user_id) {
            tracing::warn!(error = %e, user = user_id, "reading presence failed");
            return None;
        }
        let users = self.lock();
        let record = users.get(user_id)?.record.as_ref()?;
        Some(self.status_of(Some(record), now_millis()).to_content())
    }

    /// Users whose presence changed visibly after stream position `since` (while this
    /// process runs); their current content comes from `presence_content`.
    pub fn changed_since(&self, since: u64) -> Vec<String> {
        self.lock().iter().filter(|(_, e)| e.changed_at > since).map(|(u, _)| u.clone()).collect()
    }

    /// Records activity (a request, a sync): refreshes `last_active_ago`, brings an idle
    /// `online` user back, and makes a user with no presence yet `online`. A state the
    /// user set to `unavailable` or `offline` stays: changing it is `set_state`'s job.
    pub fn note_activity(self: &Arc<Self>, user_id: &str) {
        if !self.enabled {
            return;
        }
        if let Err(e) = self.load(user_id) {
            tracing::warn!(error = %e, user = user_id, "reading presence failed");
            return;
        }
        let now = now_millis();
        let (ticket, persist, start_timer) = {
            let mut users = self.lock();
            let Some(entry) = users.get_mut(user_id) else { return };
            let before = self.status_of(entry.record.as_ref(), now).presence;
            let record = entry.record.get_or_insert_with(|| PresenceRecord {
                state: ONLINE.to_owned(),
                status_msg: None,
                last_active_ms: 0,
            });
            record.last_active_ms = now;
            let online = record.state == ONLINE;
            let after = self.status_of(entry.record.as_ref(), now).presence;
            let ticket = (before != after).then(|| {
                let ticket = self.rooms.stream.dispatch();
                entry.changed_at = ticket.position;
                ticket
            });
            let persist = now.saturating_sub(entry.persisted_active_ms) >= PERSIST_ACTIVITY_MS;
            if persist {
                entry.persisted_active_ms = now;
            }
            let start_timer = online && !entry.idle_timer;
            if start_timer {
                entry.idle_timer = true;
            }
            (ticket, persist, start_timer)
        };
        if let Some(ticket) = ticket {
            let retired = self.rooms.stream.retire(ticket);
            self.rooms.wake_co_members(retired, user_id);
        }
        if start_timer {
            self.start_idle_timer(user_id);
        }
        if persist && let Ok(handle) = tokio::runtime::Handle::try_current() {
            let (this, user) = (self.clone(), user_id.to_owned());
            handle.spawn(async move {
                if let Err(e) = this.persist(&user).await {
                    tracing::warn!(error = %e, user, "storing presence activity failed");
                }
            });
        }
    }

    /// Sets the user's presence (`PUT /presence/{userId}/status`, or a sync's
    /// `set_presence`). Setting `online` counts as activity. Accepted and ignored when
    /// presence is disabled.
    pub async fn set_state(
        self: &Arc<Self>,
        user_id: &str,
        state: &str,
        status_msg: Option<String>,
    ) -> Result<()> {
        if ![ONLINE, UNAVAILABLE, OFFLINE].contains(&state) {
            return Err(Error::invalid_param(format!(
                "Unknown presence {state:?}: expected online, unavailable or offline"
            )));
        }
        if status_msg.as_ref().is_some_and(|m| m.len() > MAX_STATUS_MSG_BYTES) {
            return Err(Error::invalid_param(format!(
                "status_msg is longer than {MAX_STATUS_MSG_BYTES} bytes"
            )));
        }
        if !self.enabled {
            return Ok(());
        }
        let _write = self.write_lock.lock().await;
        self.load(user_id)?;
        let now = now_millis();
        let (ticket, record, start_timer): (Ticket, PresenceRecord, bool) = {
            let mut users = self.lock();
            let entry = users
                .get_mut(user_id)
                .ok_or_else(|| Error::internal("presence", "entry vanished after loading"))?;
            let last_active_ms = match state {
                ONLINE => now,
                _ => entry.record.as_ref().map_or(0, |r| r.last_active_ms),
            };
            let record = PresenceRecord { state: state.to_owned(), status_msg, last_active_ms };
            entry.record = Some(record.clone());
            entry.persisted_active_ms = last_active_ms;
            let ticket = self.rooms.stream.dispatch();
            entry.changed_at = ticket.position;
            let start_timer = state == ONLINE && !entry.idle_timer;
            if start_timer {
                entry.idle_timer = true;
            }
            (ticket, record, start_timer)
        };
        if start_timer {
            self.start_idle_timer(user_id);
        }
        let mut batch = Batch::new();
        PRESENCE.put(&mut batch, &user_id.to_owned(), &Json(record));
        let result = commit(&self.db, batch).await;
        let retired = self.rooms.stream.retire(ticket);
        self.rooms.wake_co_members(retired, user_id);
        tracing::debug!(user = user_id, state, "presence set");
        result
    }

    /// Writes the in-memory record of `user_id` to the table.
    async fn persist(&self, user_id: &str) -> Result<()> {
        let _write = self.write_lock.lock().await;
        let record = self.lock().get(user_id).and_then(|e| e.record.clone());
        let Some(record) = record else { return Ok(()) };
        let mut batch = Batch::new();
        PRESENCE.put(&mut batch, &user_id.to_owned(), &Json(record));
        commit(&self.db, batch).await
    }

    /// Starts the task that marks `user_id` idle once their activity lapses; the caller
    /// has set the entry's `idle_timer`.
    fn start_idle_timer(self: &Arc<Self>, user_id: &str) {
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                let (this, user) = (self.clone(), user_id.to_owned());
                handle.spawn(async move { this.watch_idle(user).await });
            }
            Err(_) => {
                if let Some(entry) = self.lock().get_mut(user_id) {
                    entry.idle_timer = false;
                }
            }
        }
    }

    /// Sleeps until the user's idle deadline (pushed back by any activity meanwhile),
    /// records the lapse to `unavailable` as a change, then does the same for the lapse
    /// to `offline`.
    async fn watch_idle(self: Arc<Self>, user_id: String) {
        // The last activity whose lapses were recorded, and how far (1 idle, 2 offline).
        let mut recorded: (u64, u8) = (0, 0);
        loop {
            let now = now_millis();
            // `Ok((ticket, done))` once a lapse is due, else `Err(deadline)`.
            let lapsed = {
                let mut users = self.lock();
                let Some(entry) = users.get_mut(&user_id) else { return };
                let last = match &entry.record {
                    Some(r) if r.state == ONLINE => r.last_active_ms,
                    // No longer online: nothing can lapse.
                    _ => {
                        entry.idle_timer = false;
                        return;
                    }
                };
                if recorded.0 != last {
                    // Activity since: start over.
                    recorded = (last, 0);
                }
                let idle = last.saturating_add(self.idle_timeout_ms);
                let offline = last.saturating_add(self.offline_timeout_ms);
                let (stage, deadline) = if recorded.1 == 0 { (1, idle) } else { (2, offline) };
                if now < deadline {
                    Err(deadline)
                } else {
                    // Past both deadlines at once (a restart): one change says it all.
                    let stage = if now >= offline { 2 } else { stage };
                    recorded.1 = stage;
                    if stage == 2 {
                        entry.idle_timer = false;
                    }
                    let ticket = self.rooms.stream.dispatch();
                    entry.changed_at = ticket.position;
                    Ok((ticket, stage == 2))
                }
            };
            match lapsed {
                Ok((ticket, done)) => {
                    let retired = self.rooms.stream.retire(ticket);
                    self.rooms.wake_co_members(retired, &user_id);
                    let to = if done { OFFLINE } else { UNAVAILABLE };
                    tracing::debug!(user = user_id, to, "presence lapsed");
                    if done {
                        return;
                    }
                }
                Err(deadline) => {
                    // A few milliseconds late, so the deadline has surely passed on waking.
                    let wait = deadline.saturating_sub(now).saturating_add(5);
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                }
            }
        }
    }

    /// After a restart, users stored as `online` get their idle timers back, so that
    /// syncs learn when they lapse (at once for those idle across the restart).
    fn resume_idle_timers(self: &Arc<Self>) {
        let rows = match PRESENCE.scan_range(
            &*self.db,
            Bound::Unbounded,
            Bound::Unbounded,
            Direction::Forward,
        ) {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "reading stored presence failed");
                return;
            }
        };
        let mut online = Vec::new();
        for row in rows {
            match row {
                Ok((user, Json(record))) if record.state == ONLINE => online.push((user, record)),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "skipping an unreadable presence row"),
            }
        }
        for (user, record) in online {
            let start = {
                let mut users = self.lock();
                let entry = users.entry(user.clone()).or_insert(Entry {
                    persisted_active_ms: record.last_active_ms,
                    record: Some(record),
                    changed_at: 0,
                    idle_timer: false,
                });
                !std::mem::replace(&mut entry.idle_timer, true)
            };
            if start {
                self.start_idle_timer(&user);
            }
        }
    }
}

/// `PUT /presence/{userId}/status`: sets the whole state (a status message left out
/// clears the previous one) and tells the servers sharing a room with the user.
pub async fn set_presence(
    services: &Arc<Services>,
    user_id: &UserId,
    presence: &PresenceState,
    status_msg: Option<String>,
) -> Result<()> {
    let user_id = user_id.as_str();
    services.presence.set_state(user_id, presence.as_str(), status_msg).await?;
    crate::federation::edus::logged(crate::federation::edus::presence(services, user_id).await);
    Ok(())
}

/// `GET /presence/{userId}/status`: `target`'s presence, which `viewer` sees when they
/// share a joined room (or are the same user).
pub fn status_for(services: &Services, viewer: &UserId, target: &UserId) -> Result<PresenceStatus> {
    if let Some(localpart) = services.accounts.local_part(target.as_str())
        && services.accounts.user(localpart)?.is_none()
    {
        return Err(Error::not_found("No such user"));
    }
    if !services.rooms.share_a_room(viewer.as_str(), target.as_str())? {
        return Err(Error::forbidden("You do not share a room with this user"));
    }
    services.presence.status(target.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn presence(idle_timeout_seconds: u64) -> (tempfile::TempDir, Arc<Presence>) {
        let dir = tempfile::tempdir().unwrap();
        let db = trellis_store::open(dir.path(), &Default::default()).unwrap();
        let rooms = Arc::new(Rooms::open(db.clone(), "example.org").unwrap());
        let config = PresenceConfig {
            enabled: true,
            idle_timeout_seconds,
            offline_timeout_seconds: idle_timeout_seconds * 2,
        };
        (dir, Presence::new(db, rooms, &config))
    }

    #[tokio::test]
    async fn set_read_and_lapse() {
        let (_dir, p) = presence(300);
        assert_eq!(p.status("@a:x").unwrap(), PresenceStatus::offline());
        assert_eq!(p.presence_content("@a:x"), None);

        p.set_state("@a:x", ONLINE, Some("lunch".into())).await.unwrap();
        let status = p.status("@a:x").unwrap();
        assert_eq!((status.presence, status.currently_active), (ONLINE, Some(true)));
        assert_eq!(status.status_msg.as_deref(), Some("lunch"));
        assert_eq!(p.changed_since(0), vec!["@a:x".to_owned()]);

        // Idle for longer than the timeout: reads as unavailable.
        p.lock().get_mut("@a:x").unwrap().record.as_mut().unwrap().last_active_ms -= 301_000;
        let content = p.presence_content("@a:x").unwrap();
        assert_eq!(content["presence"], UNAVAILABLE);
        assert!(content["last_active_ago"].as_u64().unwrap() >= 301_000);
        assert!(content.get("currently_active").is_none());
        // Activity brings them back, as a change.
        let before = p.rooms.stream.visible();
        p.note_activity("@a:x");
        assert_eq!(p.status("@a:x").unwrap().presence, ONLINE);
        assert_eq!(p.changed_since(before), vec!["@a:x".to_owned()]);

        // An explicit state other than online survives activity.
        p.set_state("@a:x", OFFLINE, None).await.unwrap();
        p.note_activity("@a:x");
        assert_eq!(p.status("@a:x").unwrap().presence, OFFLINE);
        assert!(p.set_state("@a:x", "busy", None).await.is_err());
    }

    #[tokio::test]
    async fn the_idle_timer_records_the_lapse() {
        let (_dir, p) = presence(1);
        p.set_state("@b:x", ONLINE, None).await.unwrap();
        let before = p.rooms.stream.visible();
        tokio::time::sleep(Duration::from_millis(1300)).await;
        assert!(p.rooms.stream.visible() > before, "the lapse took no stream position");
        assert_eq!(p.changed_since(before), vec!["@b:x".to_owned()]);
        assert_eq!(p.status("@b:x").unwrap().presence, UNAVAILABLE);
        // Still nothing after the offline timeout: offline, again as a change.
        let idle_at = p.rooms.stream.visible();
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert!(p.rooms.stream.visible() > idle_at, "the offline lapse took no stream position");
        assert_eq!(p.status("@b:x").unwrap().presence, OFFLINE);
        assert!(p.status("@b:x").unwrap().last_active_ago.is_some());
    }

    #[tokio::test]
    async fn disabled_reads_offline_and_ignores_updates() {
        let dir = tempfile::tempdir().unwrap();
        let db = trellis_store::open(dir.path(), &Default::default()).unwrap();
        let config = PresenceConfig { enabled: false, ..Default::default() };
        let rooms = Arc::new(Rooms::open(db.clone(), "example.org").unwrap());
        let p = Presence::new(db, rooms, &config);
        p.set_state("@c:x", ONLINE, Some("hi".into())).await.unwrap();
        p.note_activity("@c:x");
        assert_eq!(p.status("@c:x").unwrap(), PresenceStatus::offline());
        assert_eq!(p.presence_content("@c:x"), None);
    }
}
