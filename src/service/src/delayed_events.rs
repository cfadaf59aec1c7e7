//! Delayed events (MSC4140): an event a client hands over now, posted by the server when
//! its delay runs out unless it is cancelled, restarted or sent first. Element Call
//! schedules its member's "left the call" state this way and keeps restarting it, so a
//! member whose client vanishes leaves the call by itself.
//!
//! Each delayed event is a record in RocksDB (it survives restarts; one overdue at
//! start-up is posted at once); the waiting ones are also held in memory, ordered by
//! due time, for the scheduler task. A state event that lands in a room cancels the
//! delayed state events other users have waiting for the same type and state key (a
//! user's own state events do not: Element Call sets its member state and then keeps a
//! delayed "left" waiting for that same key).

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use ruma::{DeviceId, OwnedDeviceId, OwnedUserId, RoomId, TransactionId, UserId};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::Notify;
use tracing::Instrument;
use trellis_core::{Error, ErrorKind, Result, now_millis};
use trellis_store::{Batch, Db, Direction, Json, Table, catalog};

use crate::{
    Services,
    call_leaves::SfuSeat,
    pipeline::{Appended, Consumer},
    rooms::send::{self, Sender},
};

/// delay id -> the delayed event
const DELAYED_EVENTS: Table<String, Json<Delayed>> = Table::new(&catalog::DELAYED_EVENTS);
/// (user id, delay id) -> (): a user's delayed events, for listing them
const DELAYED_BY_USER: Table<(String, String), ()> = Table::new(&catalog::DELAYED_BY_USER);

/// Finished delayed events kept per user for `GET /delayed_events`; older ones go.
const FINISHED_KEPT: usize = 50;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Delayed {
    pub user_id: String,
    pub device_id: String,
    pub room_id: String,
    pub kind: String,
    /// Present for a state event.
    pub state_key: Option<String>,
    pub content: Value,
    pub delay_ms: u64,
    /// When the delay started (scheduling, or the last restart).
    pub running_since: u64,
    /// The client's transaction id of a message event, so that a retried `PUT` answers
    /// the same delay id.
    pub txn_id: Option<String>,
    /// Absent while it waits.
    pub outcome: Option<Outcome>,
    /// The SFU participant whose departure sends it, when its user handed it over
    /// ([`crate::call_leaves`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leave_with: Option<SfuSeat>,
}

impl Delayed {
    pub fn due_at(&self) -> u64 {
        self.running_since.saturating_add(self.delay_ms)
    }
}

/// How a delayed event finished.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Outcome {
    pub finished_ts: u64,
    /// The event posted, if it was.
    pub event_id: Option<String>,
    /// Why posting failed: (errcode, message).
    pub error: Option<(String, String)>,
    pub cancelled: bool,
}

impl Outcome {
    fn cancelled() -> Self {
        Self { finished_ts: now_millis(), event_id: None, error: None, cancelled: true }
    }
}

/// What a client asks of a waiting delayed event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Cancel,
    Restart,
    Send,
}

/// The waiting delayed events, in memory.
#[derive(Default)]
struct Schedule {
    /// (due time, delay id), earliest first.
    due: BTreeSet<(u64, String)>,
    waiting: HashMap<String, Waiting>,
    /// (room, type, state key) -> delay ids of the state events waiting for that slot.
    slots: HashMap<(String, String, String), Vec<String>>,
    per_user: HashMap<String, usize>,
}

struct Waiting {
    due_at: u64,
    user_id: String,
    slot: Option<(String, String, String)>,
}

impl Schedule {
    fn insert(&mut self, id: &str, record: &Delayed) {
        let slot = record
            .state_key
            .as_ref()
            .map(|key| (record.room_id.clone(), record.kind.clone(), key.clone()));
        if let Some(slot) = &slot {
            self.slots.entry(slot.clone()).or_default().push(id.to_owned());
        }
        *self.per_user.entry(record.user_id.clone()).or_default() += 1;
        self.due.insert((record.due_at(), id.to_owned()));
        let waiting = Waiting { due_at: record.due_at(), user_id: record.user_id.clone(), slot };
        self.waiting.insert(id.to_owned(), waiting);
    }

    /// Takes `id` out; false if it was not waiting (already taken by someone else).
    fn remove(&mut self, id: &str) -> bool {
        let Some(waiting) = self.waiting.remove(id) else { return false };
        self.due.remove(&(waiting.due_at, id.to_owned()));
        if let Some(slot) = waiting.slot
            && let Some(ids) = self.slots.get_mut(&slot)
        {
            ids.retain(|other| other != id);
            if ids.is_empty() {
                self.slots.remove(&slot);
            }
        }
        if let Some(count) = self.per_user.get_mut(&waiting.user_id) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.per_user.remove(&waiting.user_id);
            }
        }
        true
    }

    fn reschedule(&mut self, id: &str, due_at: u64) {
        if let Some(waiting) = self.waiting.get_mut(id) {
            self.due.remove(&(waiting.due_at, id.to_owned()));
            waiting.due_at = due_at;
            self.due.insert((due_at, id.to_owned()));
        }
    }
}

pub struct DelayedEvents {
    db: Db,
    max_delay_ms: u64,
    max_per_user: usize,
    schedule: Mutex<Schedule>,
    /// Held across a restart's check and write, and across every finishing write: a
    /// restart that checked an event still waiting cannot then overwrite the outcome a
    /// cancel, send or post wrote meanwhile (the finishing write always comes last).
    writes: tokio::sync::Mutex<()>,
    /// Wakes the scheduler when something is due earlier than it thought.
    wake: Notify,
}

/// A new delayed event, as the client sent it.
pub struct NewDelayed<'a> {
    pub user: &'a UserId,
    pub device: &'a DeviceId,
    pub room_id: &'a RoomId,
    pub kind: String,
    pub state_key: Option<String>,
    pub content: Value,
    pub delay_ms: u64,
    pub txn_id: Option<&'a TransactionId>,
}

impl DelayedEvents {
    /// Loads the waiting delayed events.
    pub fn open(db: Db, max_delay_ms: u64, max_per_user: usize) -> Result<Self> {
        let mut schedule = Schedule::default();
        for row in DELAYED_EVENTS.scan_prefix(&*db, &(), Direction::Forward)? {
            let (id, Json(record)) = row?;
            if record.outcome.is_none() {
                schedule.insert(&id, &record);
            }
        }
        Ok(Self {
            db,
            max_delay_ms,
            max_per_user,
            schedule: Mutex::new(schedule),
            writes: tokio::sync::Mutex::new(()),
            wake: Notify::new(),
        })
    }

    fn schedule(&self) -> MutexGuard<'_, Schedule> {
        self.schedule.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many delayed events are waiting.
    pub fn waiting(&self) -> usize {
        self.schedule().waiting.len()
    }

    fn load(&self, id: &str) -> Result<Option<Delayed>> {
        Ok(DELAYED_EVENTS.get(&*self.db, &id.to_owned())?.map(|Json(r)| r))
    }

    /// A user's delayed events, waiting and finished, oldest first.
    pub fn list(&self, user: &UserId) -> Result<Vec<(String, Delayed)>> {
        let mut out = Vec::new();
        for row in DELAYED_BY_USER.scan_prefix(&*self.db, &user.to_string(), Direction::Forward)? {
            let ((_, id), ()) = row?;
            if let Some(record) = self.load(&id)? {
                out.push((id, record));
            }
        }
        out.sort_by_key(|(_, r)| r.running_since);
        Ok(out)
    }

    /// A user's delayed events still waiting, oldest first.
    pub fn waiting_of(&self, user: &UserId) -> Result<Vec<(String, Delayed)>> {
        Ok(self.list(user)?.into_iter().filter(|(_, r)| r.outcome.is_none()).collect())
    }

    /// The delayed event `id` if it still waits.
    pub fn waiting_record(&self, id: &str) -> Result<Option<Delayed>> {
        Ok(self.load(id)?.filter(|r| r.outcome.is_none()))
    }

    /// Records that `id`, one of `user`'s delayed events waiting in `room_id`, goes out
    /// when `seat` leaves its call.
    pub async fn delegate(
        &self,
        user: &UserId,
        id: &str,
        room_id: &str,
        seat: &SfuSeat,
    ) -> Result<()> {
        self.set_leave_with(id, Some(seat), |r| r.user_id == user.as_str() && r.room_id == room_id)
            .await
    }

    /// `id` no longer goes out when a participant leaves (another leave replaced it).
    pub async fn undelegate(&self, id: &str) -> Result<()> {
        self.set_leave_with(id, None, |r| r.leave_with.is_some()).await
    }

    async fn set_leave_with(
        &self,
        id: &str,
        seat: Option<&SfuSeat>,
        allowed: impl Fn(&Delayed) -> bool,
    ) -> Result<()> {
        let _writing = self.writes.lock().await;
        let waiting = self.schedule().waiting.contains_key(id);
        let Some(mut record) = self.load(id)?.filter(|r| waiting && allowed(r)) else {
            return Err(Error::not_found("No such delayed event waiting"));
        };
        record.leave_with = seat.cloned();
        let mut batch = Batch::new();
        DELAYED_EVENTS.put(&mut batch, &id.to_owned(), &Json(record));
        crate::commit(&self.db, batch).await
    }

    /// The waiting delayed events handed over to an SFU participant, the most recently
    /// (re)started last.
    pub fn delegated(&self) -> Result<Vec<(String, SfuSeat)>> {
        let ids: Vec<String> = self.schedule().waiting.keys().cloned().collect();
        let mut out = Vec::new();
        for id in ids {
            if let Some(record) = self.waiting_record(&id)?
                && let Some(seat) = record.leave_with
            {
                out.push((record.running_since, id, seat));
            }
        }
        out.sort_by_key(|(since, _, _)| *since);
        Ok(out.into_iter().map(|(_, id, seat)| (id, seat)).collect())
    }

    /// One of `user`'s delayed events.
    pub fn get(&self, user: &UserId, id: &str) -> Result<Delayed> {
        self.load(id)?
            .filter(|r| r.user_id == user.as_str())
            .ok_or_else(|| Error::not_found("No such delayed event"))
    }

    /// Schedules `new`; answers its delay id.
    pub async fn schedule_event(&self, services: &Services, new: NewDelayed<'_>) -> Result<String> {
        if new.delay_ms > self.max_delay_ms {
            // The MSC's unstable form, which matrix-js-sdk reads to retry with the
            // longest delay allowed.
            return Err(Error::new(
                ErrorKind::BadRequest,
                trellis_core::error::code::UNKNOWN,
                format!(
                    "The requested delay exceeds the allowed maximum of {} ms",
                    self.max_delay_ms
                ),
            )
            .with_field("org.matrix.msc4140.errcode", "M_MAX_DELAY_EXCEEDED")
            .with_field("org.matrix.msc4140.max_delay", self.max_delay_ms));
        }
        crate::rooms::viewer::require_joined(services, new.room_id, new.user)?;
        if let Some(txn) = new.txn_id {
            let retried = self.list(new.user)?.into_iter().find(|(_, r)| {
                r.device_id == new.device.as_str() && r.txn_id.as_deref() == Some(txn.as_str())
            });
            if let Some((id, _)) = retried {
                return Ok(id);
            }
        }
        let id = format!("syd_{}", crate::random::alphanumeric(24));
        let record = Delayed {
            user_id: new.user.to_string(),
            device_id: new.device.to_string(),
            room_id: new.room_id.to_string(),
            kind: new.kind,
            state_key: new.state_key,
            content: new.content,
            delay_ms: new.delay_ms,
            running_since: now_millis(),
            txn_id: new.txn_id.map(|t| t.to_string()),
            outcome: None,
            leave_with: None,
        };
        {
            let schedule = self.schedule();
            let held = schedule.per_user.get(new.user.as_str()).copied().unwrap_or(0);
            if held >= self.max_per_user {
                // Retry once the user's next delayed event is due.
                let now = now_millis();
                let next = schedule
                    .waiting
                    .values()
                    .filter(|w| w.user_id == new.user.as_str())
                    .map(|w| w.due_at.saturating_sub(now))
                    .min()
                    .unwrap_or(1000);
                let mut refused = Error::limit_exceeded(next.max(1));
                refused.message =
                    format!("At most {} delayed events may wait at once", self.max_per_user).into();
                return Err(refused);
            }
        }
        // Stored before the scheduler can see it, so that it is never taken and then not
        // found. (Concurrent requests of one user may pass the count together: a few over
        // the limit at most.)
        let mut batch = Batch::new();
        DELAYED_EVENTS.put(&mut batch, &id, &Json(record.clone()));
        DELAYED_BY_USER.put(&mut batch, &(record.user_id.clone(), id.clone()), &());
        crate::commit(&self.db, batch).await?;
        self.schedule().insert(&id, &record);
        self.wake.notify_one();
        Ok(id)
    }

    /// Cancels, restarts or sends the waiting delayed event `id`. `caller` is the user
    /// asking, when the request was authenticated; otherwise the delay id alone, a
    /// secret only its owner was given, is the authority.
    pub async fn update(
        &self,
        services: &Services,
        id: &str,
        action: Action,
        caller: Option<&UserId>,
    ) -> Result<()> {
        let not_found = || Error::not_found("No such delayed event waiting");
        let record = self.load(id)?.ok_or_else(not_found)?;
        if record.outcome.is_some() || caller.is_some_and(|c| c.as_str() != record.user_id) {
            return Err(not_found());
        }
        match action {
            Action::Restart => {
                let _writing = self.writes.lock().await;
                if !self.schedule().waiting.contains_key(id) {
                    return Err(not_found());
                }
                // Read again under the lock: a hand-over may have been written meanwhile.
                let mut record = self.load(id)?.ok_or_else(not_found)?;
                record.running_since = now_millis();
                let mut batch = Batch::new();
                DELAYED_EVENTS.put(&mut batch, &id.to_owned(), &Json(record.clone()));
                crate::commit(&self.db, batch).await?;
                self.schedule().reschedule(id, record.due_at());
                self.wake.notify_one();
                Ok(())
            }
            Action::Cancel => {
                if !self.schedule().remove(id) {
                    return Err(not_found());
                }
                let outcome = Outcome::cancelled();
                let finished = self.finish(id, record.clone(), outcome).await;
                if finished.is_err() {
                    // Not recorded as cancelled: it waits again rather than firing after
                    // a restart while the client was told it failed.
                    self.schedule().insert(id, &record);
                }
                finished
            }
            Action::Send => {
                if !self.schedule().remove(id) {
                    return Err(not_found());
                }
                self.post(services, id, record).await
            }
        }
    }

    /// Posts a delayed event that was taken out of the schedule, and records how that
    /// went. A refusal by the room (the user left, lost the power) is the event's
    /// outcome, not the caller's error.
    async fn post(&self, services: &Services, id: &str, record: Delayed) -> Result<()> {
        let posted = post_event(services, id, &record).await;
        let outcome = Outcome {
            finished_ts: now_millis(),
            event_id: posted.as_ref().ok().cloned(),
            error: posted.as_ref().err().map(|e| (e.errcode.to_owned(), e.message.to_string())),
            cancelled: false,
        };
        if let Err(e) = &posted {
            tracing::info!(delay_id = id, error = %e, "a delayed event could not be posted");
        }
        self.finish(id, record, outcome).await
    }

    /// Stores `outcome`, dropping the user's oldest finished records beyond the number
    /// kept.
    async fn finish(&self, id: &str, mut record: Delayed, outcome: Outcome) -> Result<()> {
        let _writing = self.writes.lock().await;
        let user = record.user_id.clone();
        record.outcome = Some(outcome);
        let mut batch = Batch::new();
        DELAYED_EVENTS.put(&mut batch, &id.to_owned(), &Json(record));
        if let Ok(user_id) = UserId::parse(user.as_str()) {
            let mut finished: Vec<(u64, String)> = self
                .list(&user_id)?
                .into_iter()
                .filter(|(other, r)| other != id && r.outcome.is_some())
                .map(|(other, r)| (r.outcome.map_or(0, |o| o.finished_ts), other))
                .collect();
            finished.sort();
            let excess = (finished.len() + 1).saturating_sub(FINISHED_KEPT);
            for (_, old) in finished.into_iter().take(excess) {
                DELAYED_EVENTS.delete(&mut batch, &old);
                DELAYED_BY_USER.delete(&mut batch, &(user.clone(), old));
            }
        }
        crate::commit(&self.db, batch).await
    }

    /// Cancels the delayed state events of users other than `sender` waiting for a slot
    /// a state event of `sender` just filled.
    async fn cancel_slot(&self, room_id: &str, kind: &str, key: &str, sender: &str) -> Result<()> {
        let slot = (room_id.to_owned(), kind.to_owned(), key.to_owned());
        let taken: Vec<String> = {
            let mut schedule = self.schedule();
            let ids = schedule.slots.get(&slot).cloned().unwrap_or_default();
            let others: Vec<String> = ids
                .into_iter()
                .filter(|id| schedule.waiting.get(id).is_some_and(|w| w.user_id != sender))
                .collect();
            others.into_iter().filter(|id| schedule.remove(id)).collect()
        };
        for id in taken {
            if let Some(record) = self.load(&id)? {
                let outcome = Outcome::cancelled();
                self.finish(&id, record, outcome).await?;
            }
        }
        Ok(())
    }

    /// The delayed events due by `now`, taken out of the schedule, and how long until the
    /// next one is due.
    fn take_due(&self, now: u64) -> (Vec<String>, Option<Duration>) {
        let mut schedule = self.schedule();
        let due: Vec<String> = schedule
            .due
            .iter()
            .take_while(|(at, _)| *at <= now)
            .map(|(_, id)| id.clone())
            .collect();
        let taken = due.into_iter().filter(|id| schedule.remove(id)).collect();
        let next =
            schedule.due.first().map(|(at, _)| Duration::from_millis(at.saturating_sub(now)));
        (taken, next)
    }
}

/// Posts `record` as its user.
async fn post_event(services: &Services, id: &str, record: &Delayed) -> Result<String> {
    let user: OwnedUserId = UserId::parse(record.user_id.as_str())
        .map_err(|e| Error::internal("delayed event's user", e))?;
    let room_id =
        RoomId::parse(record.room_id.as_str()).map_err(|e| Error::internal("delayed room", e))?;
    // Suspended or deactivated since it was scheduled: it is not posted.
    match services.accounts.user(user.localpart())? {
        Some(account) if account.deactivated => return Err(Error::user_deactivated()),
        Some(account) if account.suspended => return Err(Error::user_suspended()),
        _ => {}
    }
    let event_id = match &record.state_key {
        Some(key) => {
            let (kind, content) = (record.kind.clone(), record.content.clone());
            send::state(services, &user, None, &room_id, kind, key.clone(), content).await?
        }
        None => {
            let device: OwnedDeviceId = record.device_id.as_str().into();
            let sender = Sender { user: &user, device: &device, ts: None };
            // The delay id stands for the transaction: posted once whatever happens.
            let txn: ruma::OwnedTransactionId = format!("delayed-{id}").into();
            let (kind, content) = (record.kind.clone(), record.content.clone());
            send::message(services, sender, &room_id, kind, content, &txn).await?
        }
    };
    Ok(event_id.to_string())
}

/// Posts delayed events when they are due. Runs until the process ends.
pub async fn run(services: Arc<Services>) {
    let delayed = &services.delayed_events;
    loop {
        let (due, next) = delayed.take_due(now_millis());
        for id in due {
            let span = tracing::info_span!("delayed_event", delay_id = %id);
            let posted = async {
                match delayed.load(&id)? {
                    Some(record) if record.outcome.is_none() => {
                        delayed.post(&services, &id, record).await
                    }
                    _ => Ok(()),
                }
            };
            if let Err(e) = posted.instrument(span).await {
                tracing::warn!(delay_id = %id, error = %e, "posting a delayed event failed");
            }
        }
        // A bound on the sleep: clocks may jump, and a restart's due time is rechecked.
        let sleep = next.unwrap_or(Duration::from_secs(60)).min(Duration::from_secs(60));
        tokio::select! {
            () = tokio::time::sleep(sleep) => {}
            () = delayed.wake.notified() => {}
        }
    }
}

#[async_trait::async_trait]
impl Consumer for DelayedEvents {
    fn name(&self) -> &'static str {
        "delayed_events"
    }

    async fn on_event(&self, event: &Appended<'_>) -> Result<Option<u64>> {
        let Some(key) = event.pdu.state_key.as_deref() else { return Ok(None) };
        if self.schedule().slots.is_empty() {
            return Ok(None);
        }
        let (room, kind) = (event.room_id.as_str(), event.pdu.kind.to_string());
        self.cancel_slot(room, &kind, key, event.pdu.sender.as_str()).await?;
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(user: &str, room: &str, key: Option<&str>, since: u64, delay: u64) -> Delayed {
        Delayed {
            user_id: user.into(),
            device_id: "DEV".into(),
            room_id: room.into(),
            kind: "org.matrix.msc3401.call.member".into(),
            state_key: key.map(Into::into),
            content: Value::Null,
            delay_ms: delay,
            running_since: since,
            txn_id: None,
            outcome: None,
            leave_with: None,
        }
    }

    #[test]
    fn the_schedule_orders_by_due_time_and_tracks_slots_and_users() {
        let mut s = Schedule::default();
        s.insert("a", &record("@u:x", "!r:x", Some("k"), 1000, 500));
        s.insert("b", &record("@u:x", "!r:x", None, 1000, 100));
        s.insert("c", &record("@v:x", "!r:x", Some("k"), 1000, 50));
        assert_eq!(s.due.iter().map(|(_, id)| id.as_str()).collect::<Vec<_>>(), ["c", "b", "a"]);
        assert_eq!(s.per_user["@u:x"], 2);
        let slot = ("!r:x".to_owned(), "org.matrix.msc3401.call.member".to_owned(), "k".to_owned());
        assert_eq!(s.slots[&slot], ["a", "c"]);
        // A restart moves it to the back.
        s.reschedule("c", 5000);
        assert_eq!(s.due.iter().map(|(_, id)| id.as_str()).collect::<Vec<_>>(), ["b", "a", "c"]);
        assert!(s.remove("a"));
        assert!(!s.remove("a"), "taken once only");
        assert_eq!(s.slots[&slot], ["c"]);
        assert_eq!(s.per_user["@u:x"], 1);
        assert!(s.remove("c"));
        assert!(!s.slots.contains_key(&slot));
        assert!(!s.per_user.contains_key("@v:x"));
    }

    #[test]
    fn a_due_time_never_overflows() {
        assert_eq!(record("@u:x", "!r:x", None, u64::MAX - 1, 10).due_at(), u64::MAX);
    }
}
