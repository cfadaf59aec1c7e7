//! Pushes to HTTP push gateways (the Push Gateway API), which wake phones through APNs,
//! FCM or web push. An event-pipeline step queues, per pusher, every event that notifies
//! the pusher's user (as push rule evaluation recorded it); a read queues a counts-only
//! update so the app badge follows. The queue is in RocksDB, so a restart loses nothing.
//! Each pusher with something queued has a task of its own that sends in order, one push
//! at a time, retrying with exponential backoff; pushers never wait on each other.

use std::{
    collections::{HashMap, HashSet},
    ops::Bound::Included,
    sync::{Arc, Mutex, OnceLock, Weak},
    time::Duration,
};

use async_trait::async_trait;
use ruma::events::room::member::MembershipState;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tracing::Instrument;
use trellis_core::{Error, Result, metrics::OutcomeLabels, now_millis};
use trellis_store::{Batch, Direction, Json, Table, catalog};

use super::pushers::{PusherChange, PusherRecord};
use crate::{
    Services,
    media::preview::{IpPolicy, guarded_client, literal_allowed},
    pipeline::{Appended, Consumer},
};

/// (localpart, app id, pushkey, sequence) -> a push. The sequence is twice the event's
/// stream position, or twice the visible position plus one for a counts-only update (so
/// it follows what was queued before it, and reads at the same position coalesce).
const QUEUE: Table<QueueKey, Json<Queued>> = Table::new(&catalog::PUSH_QUEUE);

/// (localpart, app id, pushkey, sequence)
type QueueKey = (String, String, String, u64);

/// (localpart, app id, pushkey)
type PusherKey = (String, String, String);

const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(600);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Queued {
    room_id: String,
    /// `None` for a counts-only update.
    event_id: Option<String>,
    /// The push rule actions (for the tweaks).
    actions: Value,
    queued_ms: u64,
}

/// What became of one attempt.
enum Outcome {
    Sent,
    /// Not worth retrying (the gateway refused the request, the event is gone).
    Dropped(String),
    /// The pusher is gone (deleted, or its key rejected): its queue goes too.
    PusherGone,
    Retry(String),
}

pub struct Gateway {
    services: OnceLock<Weak<Services>>,
    /// Pushers whose sender task runs, with the lowest sequence queued for them since
    /// the task last looked (it reads on from a cursor, and a push may be queued behind
    /// it when events of different rooms finish out of order).
    running: Mutex<HashMap<PusherKey, Option<u64>>>,
    /// The badge each running pusher was last sent: a read that leaves it unchanged
    /// (a receipt in a room with nothing unread) sends nothing.
    last_unread: Mutex<HashMap<PusherKey, u64>>,
    /// Connects only to addresses the SSRF policy allows (checked after DNS); follows
    /// no redirects: users choose gateway URLs.
    client: reqwest::Client,
    policy: Arc<IpPolicy>,
    max_age_ms: u64,
}

impl Gateway {
    pub fn new(config: &trellis_core::config::PushConfig) -> Result<Self> {
        let policy = Arc::new(IpPolicy::from_lists(&config.gateway_ip_allow, &[]));
        let client = guarded_client(policy.clone(), REQUEST_TIMEOUT)
            .map_err(|e| Error::internal("push gateway HTTP client", e))?;
        Ok(Self {
            services: OnceLock::new(),
            running: Mutex::default(),
            last_unread: Mutex::default(),
            client,
            policy,
            max_age_ms: config.max_push_age_seconds.saturating_mul(1000),
        })
    }

    pub fn attach(&self, services: &Arc<Services>) {
        let _ = self.services.set(Arc::downgrade(services));
    }

    /// Whether a gateway URL may be used: not a literal address the policy refuses
    /// (names are checked on every connection).
    pub fn url_allowed(&self, url: &str) -> bool {
        reqwest::Url::parse(url).is_ok_and(|u| literal_allowed(&self.policy, &u))
    }

    /// Starts the senders of the pushers with pushes left from before a restart.
    pub fn start(&self, services: &Arc<Services>) -> Result<()> {
        let mut keys: HashSet<PusherKey> = HashSet::new();
        let mut depth = 0;
        for row in QUEUE.scan_prefix(&*services.db, &(), Direction::Forward)? {
            let ((localpart, app_id, pushkey, _), _) = row?;
            keys.insert((localpart, app_id, pushkey));
            depth += 1;
        }
        services.metrics.push_queue.set(depth);
        for key in keys {
            self.kick(services, key, 0);
        }
        Ok(())
    }

    /// Makes sure the pusher's sender runs and sees the push queued at `seq`.
    fn kick(&self, services: &Arc<Services>, key: PusherKey, seq: u64) {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        match running.get_mut(&key) {
            Some(lowest) => *lowest = Some(lowest.map_or(seq, |l| l.min(seq))),
            None => {
                running.insert(key.clone(), None);
                let span = tracing::info_span!("pusher", user = %key.0, app_id = %key.1);
                tokio::spawn(drain(services.clone(), key).instrument(span));
            }
        }
    }

    /// The lowest sequence queued for the pusher since the last call (`None`: nothing).
    fn queued_behind(&self, key: &PusherKey) -> Option<u64> {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        running.get_mut(key).and_then(Option::take)
    }

    /// The user read something: their pushers get the new counts (for the app badge).
    pub fn counts_changed(&self, services: &Arc<Services>, localpart: &str) {
        let Some(pushers) = services.pushers.of(localpart) else { return };
        let http: Vec<_> = pushers.iter().filter(|p| p.pusher.kind == "http").collect();
        if http.is_empty() {
            return;
        }
        let seq = services.rooms.stream.visible() * 2 + 1;
        let mut batch = Batch::new();
        let item = Queued {
            room_id: String::new(),
            event_id: None,
            actions: json!([]),
            queued_ms: now_millis(),
        };
        let mut added = 0;
        for p in &http {
            let key =
                (localpart.to_owned(), p.pusher.app_id.clone(), p.pusher.pushkey.clone(), seq);
            // A read at the same position replaces the update still queued.
            if !QUEUE.contains(&*services.db, &key).unwrap_or(false) {
                added += 1;
            }
            QUEUE.put(&mut batch, &key, &Json(item.clone()));
        }
        // Not synced: a badge update lost in a crash is made good by the next one.
        if let Err(e) = services.db.write_unsynced(batch) {
            tracing::warn!(error = %e, "queueing a badge update failed");
            return;
        }
        services.metrics.push_queue.inc_by(added);
        for p in http {
            let key = (localpart.to_owned(), p.pusher.app_id.clone(), p.pusher.pushkey.clone());
            self.kick(services, key, seq);
        }
    }
}

/// `POST /pushers/set`: also refuses a gateway at a literal address the SSRF policy
/// refuses (`push.gateway_ip_allow`).
pub async fn set_pusher(
    services: &Services,
    localpart: &str,
    device_id: &str,
    change: PusherChange,
) -> Result<()> {
    if let PusherChange::Set { pusher, .. } = &change
        && pusher.kind == "http"
        && let Some(url) = pusher.data.get("url").and_then(Value::as_str)
        && !services.push_gateway.url_allowed(url)
    {
        return Err(Error::invalid_param(
            "data.url must not be a private, loopback or other special address",
        ));
    }
    services.pushers.apply(localpart, device_id, change).await
}

#[async_trait]
impl Consumer for Gateway {
    fn name(&self) -> &'static str {
        "push_gateways"
    }

    async fn on_event(&self, event: &Appended<'_>) -> Result<Option<u64>> {
        let Some(services) = self.services.get().and_then(Weak::upgrade) else { return Ok(None) };
        if !services.pushers.any() || event.pdu.rejected {
            return Ok(None);
        }
        let pdu = event.pdu;
        let (room_id, sender) = (event.room_id.as_str(), pdu.sender.as_str());
        let mut targets: Vec<&str> =
            event.members.into_iter().flat_map(|m| m.iter()).map(String::as_str).collect();
        // An invite concerns the invitee, who is not a member yet.
        if pdu.kind.to_string() == "m.room.member"
            && let Some(invitee) = pdu.state_key.as_deref()
            && !targets.contains(&invitee)
        {
            targets.push(invitee);
        }
        let mut batch = Batch::new();
        let mut woken = Vec::new();
        for user in targets {
            if user == sender {
                continue;
            }
            let Some(localpart) = services.accounts.local_part(user) else { continue };
            let Some(pushers) = services.pushers.of(localpart) else { continue };
            let http: Vec<&PusherRecord> =
                pushers.iter().filter(|p| p.pusher.kind == "http").collect();
            if http.is_empty() {
                continue;
            }
            let notifier = &services.notifier;
            let Some(n) = notifier.notification_for(room_id, event.position, user, sender)? else {
                continue;
            };
            let item = Queued {
                room_id: room_id.to_owned(),
                event_id: Some(n.event_id),
                actions: n.actions,
                queued_ms: now_millis(),
            };
            for p in http {
                let key = (localpart.to_owned(), p.pusher.app_id.clone(), p.pusher.pushkey.clone());
                QUEUE.put(
                    &mut batch,
                    &(key.0.clone(), key.1.clone(), key.2.clone(), event.position * 2),
                    &Json(item.clone()),
                );
                woken.push((key, event.position * 2));
            }
        }
        if woken.is_empty() {
            return Ok(None);
        }
        // Durable with the event (its WAL sync covers this write).
        let ticket = services.db.write_unsynced(batch)?;
        services.metrics.push_queue.inc_by(woken.len() as i64);
        for (key, seq) in woken {
            self.kick(&services, key, seq);
        }
        Ok(Some(ticket))
    }
}

/// The pusher's queue rows from sequence `from` on.
fn span(key: &PusherKey, from: u64) -> (QueueKey, QueueKey) {
    let row = |seq| (key.0.clone(), key.1.clone(), key.2.clone(), seq);
    (row(from), row(u64::MAX))
}

/// Pushes read from the queue at once.
const BATCH: usize = 64;

/// The pusher's pushes from sequence `from` on, oldest first. Read from a cursor, not
/// from the start of the pusher's range: sent pushes leave deletion markers there that
/// every read from the start would step over again.
fn queued_from(services: &Services, key: &PusherKey, from: u64) -> Result<Vec<(u64, Queued)>> {
    let (lo, hi) = span(key, from);
    let rows = QUEUE.scan_range(&*services.db, Included(&lo), Included(&hi), Direction::Forward)?;
    rows.take(BATCH)
        .map(|row| row.map(|((_, _, _, seq), Json(item))| (seq, item)).map_err(Into::into))
        .collect()
}

/// What to do with a push after an attempt.
enum Next {
    /// Sent, or given up on: off the queue.
    Done,
    Again,
    /// The push failed for longer than pushes are kept: it and every other push as old
    /// go, at once (a gateway that swallows requests would otherwise take 30 s for each).
    Expired,
    /// The pusher is gone.
    Gone,
}

/// Removes the pusher's entry from the running set if its task dies by a panic, so
/// that the next push starts a new one.
struct RunningGuard<'a> {
    gateway: &'a Gateway,
    key: &'a PusherKey,
}

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.gateway.running.lock().unwrap_or_else(|p| p.into_inner()).remove(self.key);
        }
    }
}

/// Sends the pusher's queue until it is empty.
async fn drain(services: Arc<Services>, key: PusherKey) {
    let gateway = &services.push_gateway;
    let _guard = RunningGuard { gateway, key: &key };
    let mut backoff = FIRST_BACKOFF;
    let mut from = 0;
    'read: loop {
        if let Some(behind) = gateway.queued_behind(&key) {
            from = from.min(behind);
        }
        let batch = match queued_from(&services, &key, from) {
            Ok(batch) => batch,
            Err(e) => {
                tracing::error!(error = %e, "reading the push queue failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        if batch.is_empty() {
            if still_queued(gateway, &key, &mut from) {
                continue;
            }
            return;
        }
        // A push leaves once its event is visible: the phone's client syncs on it, and
        // the badge counts it.
        let newest = batch.iter().map(|(seq, _)| seq / 2).max().unwrap_or(0);
        until_visible(&services, newest).await;
        let user_id = services.accounts.user_id(&key.0);
        // The badge is the same for every push of a batch: read once, at send time.
        let mut unread = match unread_total(&services, &user_id) {
            Ok(unread) => unread,
            Err(e) => {
                tracing::error!(error = %e, "counting unread notifications failed");
                tokio::time::sleep(backoff).await;
                continue;
            }
        };
        for (seq, item) in batch {
            let unchanged_badge = item.event_id.is_none()
                && gateway.last_unread.lock().unwrap_or_else(|p| p.into_inner()).get(&key)
                    == Some(&unread);
            loop {
                if unchanged_badge {
                    break;
                }
                match attempt(&services, &key, &item, unread, &mut backoff).await {
                    Next::Done => {
                        let mut last =
                            gateway.last_unread.lock().unwrap_or_else(|p| p.into_inner());
                        last.insert(key.clone(), unread);
                        break;
                    }
                    Next::Again => {
                        if let Ok(now) = unread_total(&services, &user_id) {
                            unread = now;
                        }
                    }
                    Next::Expired => {
                        let cutoff = now_millis().saturating_sub(gateway.max_age_ms);
                        let dropped = drop_queued(&services, &key, from, cutoff).await;
                        let failed = OutcomeLabels { outcome: "failed".into() };
                        services.metrics.pushes.get_or_create(&failed).inc_by(dropped);
                        continue 'read;
                    }
                    Next::Gone => {
                        // Set again meanwhile (the same app and key): carry on.
                        if pusher_of(&services, &key).is_some() {
                            continue 'read;
                        }
                        drop_queued(&services, &key, 0, u64::MAX).await;
                        if still_queued(gateway, &key, &mut from) {
                            continue 'read;
                        }
                        return;
                    }
                }
            }
            clear(&services, &key, seq, &item);
            from = seq + 1;
        }
    }
}

/// Whether the task must go on after finding its queue empty: under the lock, a push
/// queued after the read either has left its sequence (then `from` moves back to it)
/// or finds the task gone and starts another.
fn still_queued(gateway: &Gateway, key: &PusherKey, from: &mut u64) -> bool {
    let mut running = gateway.running.lock().unwrap_or_else(|p| p.into_inner());
    match running.get_mut(key).and_then(Option::take) {
        Some(behind) => {
            *from = (*from).min(behind);
            true
        }
        None => {
            running.remove(key);
            gateway.last_unread.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
            false
        }
    }
}

/// Waits (a few seconds at most) until stream position `position` is visible.
async fn until_visible(services: &Services, position: u64) {
    let mut visible = services.rooms.stream.subscribe();
    let wait = async {
        while *visible.borrow_and_update() < position {
            if visible.changed().await.is_err() {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), wait).await;
}

/// Takes a handled push off the queue. A badge update is overwritten in place when the
/// user reads again at the same position: that newer one stays.
fn clear(services: &Services, key: &PusherKey, seq: u64, item: &Queued) {
    let row = (key.0.clone(), key.1.clone(), key.2.clone(), seq);
    if item.event_id.is_none() {
        match QUEUE.get(&*services.db, &row) {
            Ok(Some(Json(now))) if now.queued_ms != item.queued_ms => return,
            _ => {}
        }
    }
    let mut batch = Batch::new();
    QUEUE.delete(&mut batch, &row);
    if let Err(e) = services.db.write_unsynced(batch) {
        tracing::error!(error = %e, "clearing a sent push failed");
    }
    services.metrics.push_queue.dec();
}

/// One attempt at one push, with its metrics and, before a retry, the backoff.
async fn attempt(
    services: &Arc<Services>,
    key: &PusherKey,
    item: &Queued,
    unread: u64,
    backoff: &mut Duration,
) -> Next {
    let max_age_ms = services.push_gateway.max_age_ms;
    match send(services, key, item, unread).await {
        Outcome::Sent => {
            services.metrics.push("sent");
            *backoff = FIRST_BACKOFF;
            Next::Done
        }
        Outcome::Dropped(why) => {
            tracing::warn!(reason = %why, "push dropped");
            services.metrics.push("failed");
            Next::Done
        }
        Outcome::PusherGone => Next::Gone,
        Outcome::Retry(why) if now_millis().saturating_sub(item.queued_ms) > max_age_ms => {
            tracing::warn!(reason = %why, "pushes dropped after failing for too long");
            Next::Expired
        }
        Outcome::Retry(why) => {
            tracing::warn!(reason = %why, retry_in = ?*backoff, "push gateway failed");
            services.metrics.push("retried");
            tokio::time::sleep(*backoff).await;
            *backoff = (*backoff * 2).min(MAX_BACKOFF);
            Next::Again
        }
    }
}

/// Drops the pusher's pushes from sequence `from` on that were queued before `before`
/// (milliseconds; they are in queueing order); answers how many went.
async fn drop_queued(services: &Services, key: &PusherKey, from: u64, before: u64) -> u64 {
    let (lo, hi) = span(key, from);
    let mut batch = Batch::new();
    let mut dropped = 0;
    if let Ok(rows) =
        QUEUE.scan_range(&*services.db, Included(&lo), Included(&hi), Direction::Forward)
    {
        for (row, Json(item)) in rows.flatten() {
            if item.queued_ms >= before {
                break;
            }
            QUEUE.delete(&mut batch, &row);
            dropped += 1;
        }
    }
    if let Err(e) = crate::commit(&services.db, batch).await {
        tracing::error!(error = %e, "dropping queued pushes failed");
        return 0;
    }
    services.metrics.push_queue.dec_by(i64::try_from(dropped).unwrap_or(i64::MAX));
    dropped
}

/// The pusher behind a queue key, if it (still) exists.
fn pusher_of(services: &Services, key: &PusherKey) -> Option<PusherRecord> {
    let (localpart, app_id, pushkey) = key;
    let pushers = services.pushers.of(localpart)?;
    pushers
        .iter()
        .find(|p| {
            p.pusher.kind == "http" && &p.pusher.app_id == app_id && &p.pusher.pushkey == pushkey
        })
        .cloned()
}

/// The most of a gateway's answer that is read.
const MAX_ANSWER: usize = 64 * 1024;

/// One push, in the Push Gateway API's format.
async fn send(services: &Arc<Services>, key: &PusherKey, item: &Queued, unread: u64) -> Outcome {
    let (localpart, app_id, pushkey) = key;
    let Some(record) = pusher_of(services, key) else { return Outcome::PusherGone };
    let record = &record;
    let Some(url) = record.pusher.data.get("url").and_then(Value::as_str) else {
        return Outcome::PusherGone;
    };
    if !services.push_gateway.url_allowed(url) {
        return Outcome::Dropped("the gateway's address is not allowed".into());
    }
    let body = match notification(services, localpart, record, item, unread) {
        Ok(Some(body)) => body,
        Ok(None) => return Outcome::Dropped("the event is gone".into()),
        Err(e) => return Outcome::Retry(e.to_string()),
    };
    let response = match services.push_gateway.client.post(url).json(&body).send().await {
        Ok(response) => response,
        Err(e) => return Outcome::Retry(format!("cannot reach the gateway: {e}")),
    };
    let status = response.status();
    if status.is_success() {
        let answer = read_answer(response).await;
        let rejected = answer["rejected"].as_array().into_iter().flatten();
        if rejected.filter_map(Value::as_str).any(|k| k == pushkey) {
            // The gateway no longer knows the key (the app was uninstalled).
            tracing::info!(user = %localpart, "push gateway rejected a pushkey: pusher removed");
            services.metrics.push("rejected");
            if let Err(e) = services.pushers.remove(localpart, app_id, pushkey).await {
                tracing::error!(error = %e, "removing a rejected pusher failed");
            }
            return Outcome::PusherGone;
        }
        return Outcome::Sent;
    }
    if status.is_client_error() && status != 429 && status != 408 {
        return Outcome::Dropped(format!("the gateway answered {status}"));
    }
    Outcome::Retry(format!("the gateway answered {status}"))
}

/// A gateway's JSON answer, read up to [`MAX_ANSWER`] bytes (anything longer or
/// unreadable counts as an answer without `rejected`).
async fn read_answer(mut response: reqwest::Response) -> Value {
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        if body.len() + chunk.len() > MAX_ANSWER {
            return Value::Null;
        }
        body.extend_from_slice(&chunk);
    }
    serde_json::from_slice(&body).unwrap_or(Value::Null)
}

/// The tweaks the push rule actions set (`highlight` without a value is true).
fn tweaks(actions: &Value) -> Map<String, Value> {
    let mut out = Map::new();
    for action in actions.as_array().into_iter().flatten() {
        if let Some(name) = action["set_tweak"].as_str() {
            let value = action.get("value").cloned().unwrap_or(Value::Bool(true));
            out.insert(name.to_owned(), value);
        }
    }
    out
}

/// The request body for one push; `None` when its event is gone.
fn notification(
    services: &Services,
    localpart: &str,
    record: &PusherRecord,
    item: &Queued,
    unread: u64,
) -> Result<Option<Value>> {
    let pusher = &record.pusher;
    let user_id = services.accounts.user_id(localpart);
    let tweaks = tweaks(&item.actions);
    let mut data = pusher.data.clone();
    data.remove("url");
    let device = json!({"app_id": pusher.app_id, "pushkey": pusher.pushkey,
                        "pushkey_ts": record.created_ms / 1000, "data": data,
                        "tweaks": tweaks});
    let mut n = json!({"devices": [device], "counts": {"unread": unread}, "prio": "low"});
    let Some(event_id) = &item.event_id else { return Ok(Some(json!({"notification": n}))) };
    let Some(cached) = services.rooms.cached_event(event_id)? else { return Ok(None) };
    let pdu = &cached.pdu;
    let kind = pdu.kind.to_string();
    let urgent = kind == "m.room.encrypted"
        || tweaks.get("highlight") == Some(&Value::Bool(true))
        || tweaks.contains_key("sound");
    n["prio"] = json!(if urgent { "high" } else { "low" });
    n["event_id"] = json!(event_id);
    n["room_id"] = json!(item.room_id);
    if data.get("format").and_then(Value::as_str) == Some("event_id_only") {
        return Ok(Some(json!({"notification": n})));
    }
    let room_id = item.room_id.as_str();
    let sender = pdu.sender.as_str();
    n["type"] = json!(kind);
    n["sender"] = json!(sender);
    let content: Value = serde_json::from_str(pdu.content.get()).unwrap_or(Value::Null);
    if let Some(name) = services.rooms.display_names(room_id, &[sender.to_owned()])?.pop().flatten()
    {
        n["sender_display_name"] = json!(name);
    }
    let rooms = &services.rooms;
    if let Some(name) = rooms.state_text(room_id, "m.room.name", "name")? {
        n["room_name"] = json!(name);
    }
    if let Some(alias) = rooms.state_text(room_id, "m.room.canonical_alias", "alias")? {
        n["room_alias"] = json!(alias);
    }
    if kind == "m.room.member" {
        n["user_is_target"] = json!(pdu.state_key.as_deref() == Some(user_id.as_str()));
        if let Some(membership) = content["membership"].as_str() {
            n["membership"] = json!(membership);
        }
    }
    n["content"] = content;
    Ok(Some(json!({"notification": n})))
}

/// The user's unread notifications over all their rooms (the app badge).
fn unread_total(services: &Services, user_id: &str) -> Result<u64> {
    let upto = services.rooms.stream.visible();
    let mut total = 0;
    for room in services.rooms.rooms_of(user_id, &MembershipState::Join)? {
        let counts = services.notifier.counts(services, user_id, &room, upto)?;
        total += counts.room.0 + counts.threads.values().map(|c| c.0).sum::<u64>();
    }
    Ok(total)
}
