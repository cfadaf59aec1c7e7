//! Events to application services: an event-pipeline step queues every event a service is
//! interested in (RocksDB, so a restart loses nothing), and one sender task per service
//! sends its queue as `PUT /_matrix/app/v1/transactions/{txnId}`, in stream order,
//! batched, retrying with exponential backoff. A transaction is kept until the service
//! acknowledges it and is resent as it was (same id, same events), so a service that
//! answered but whose answer was lost sees a repeat it can recognise, never a gap.
//! Services do not wait on each other: each has its own queue and task.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, OnceLock, Weak},
    time::Duration,
};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::{sync::Notify, task::JoinHandle};
use tracing::Instrument;
use trellis_core::{Error, ErrorKind, Result};
use trellis_store::{Batch, Direction, Json, Table, catalog};

use super::{Registration, extensions};
use crate::media::preview::{IpPolicy, guarded_client, literal_allowed};
use crate::{
    Services,
    pipeline::{Appended, Consumer},
    realtime::sync::sync_event,
};

/// (service id, stream position) -> the event in the client format
const QUEUE: Table<(String, u64), Json<Value>> = Table::new(&catalog::APPSERVICE_QUEUE);
/// service id -> the transaction being sent
const INFLIGHT: Table<String, Json<InFlight>> = Table::new(&catalog::APPSERVICE_INFLIGHT);

/// Events per transaction at most.
const BATCH: usize = 100;
/// Ephemeral events kept for a service at most.
const MAX_EPHEMERAL: usize = 1000;
/// The longest wait between two attempts at an unreachable service.
const MAX_BACKOFF: Duration = Duration::from_secs(300);
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// How long one transaction may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Serialize, Deserialize)]
struct InFlight {
    txn_id: String,
    /// The queue positions the transaction carries.
    positions: Vec<u64>,
    /// The stream position its presence and device list changes were read up to.
    #[serde(default)]
    changes_upto: Option<u64>,
    body: Value,
}

/// The pipeline step and the senders.
pub struct Delivery {
    services: OnceLock<Weak<Services>>,
    wakers: Mutex<HashMap<String, Arc<Notify>>>,
    /// Ephemeral events (typing, receipts) waiting for each service's next transaction:
    /// in memory, as they are worthless after a restart.
    ephemeral: Mutex<HashMap<String, Vec<Value>>>,
    /// To-device messages for the services' users (MSC2409), likewise; they also stay
    /// in the devices' own inboxes.
    to_device: Mutex<HashMap<String, Vec<Value>>>,
    /// Per service, the stream position its presence and device list changes were read
    /// up to (see `extensions`).
    change_cursors: Mutex<HashMap<String, u64>>,
    /// service id -> its sender task
    senders: Mutex<HashMap<String, JoinHandle<()>>>,
    http: reqwest::Client,
    /// For outgoing webhooks, whose URLs room members choose: connects only to addresses
    /// the SSRF policy allows (checked after DNS), follows no redirects.
    guarded: reqwest::Client,
    policy: Arc<IpPolicy>,
    /// How long an outgoing webhook may fail before it is removed.
    webhook_give_up: Duration,
}

impl Delivery {
    pub fn new(config: &trellis_core::config::AppserviceConfig) -> Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|e| Error::internal("application service HTTP client", e))?;
        let policy = Arc::new(IpPolicy::from_lists(&config.outgoing_webhook_ip_allow, &[]));
        let guarded = guarded_client(policy.clone(), REQUEST_TIMEOUT)
            .map_err(|e| Error::internal("outgoing webhook HTTP client", e))?;
        Ok(Self {
            services: OnceLock::new(),
            wakers: Mutex::default(),
            ephemeral: Mutex::default(),
            to_device: Mutex::default(),
            change_cursors: Mutex::default(),
            senders: Mutex::default(),
            http,
            guarded,
            policy,
            webhook_give_up: Duration::from_secs(config.outgoing_webhook_give_up_seconds),
        })
    }

    /// Whether a URL a room member gives may be used for an outgoing webhook: http(s),
    /// and not a literal address the policy refuses (names are checked on every
    /// connection).
    pub fn webhook_url_allowed(&self, url: &str) -> bool {
        reqwest::Url::parse(url).is_ok_and(|u| {
            matches!(u.scheme(), "http" | "https") && literal_allowed(&self.policy, &u)
        })
    }

    /// Connects the step to the services, once they exist.
    pub fn attach(&self, services: &Arc<Services>) {
        let _ = self.services.set(Arc::downgrade(services));
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    fn waker(&self, id: &str) -> Arc<Notify> {
        let mut wakers = self.wakers.lock().unwrap_or_else(|p| p.into_inner());
        wakers.entry(id.to_owned()).or_default().clone()
    }

    /// Hands an ephemeral event of `room_id` (`m.typing`, `m.receipt`) to the services
    /// that asked for them (`receive_ephemeral`) and have a user in the room (or the room
    /// in their namespace).
    pub fn ephemeral(&self, services: &Services, room_id: &str, event: Value) -> Result<()> {
        let registered = services.appservices.all();
        let wanting: Vec<_> =
            registered.iter().filter(|r| r.receive_ephemeral && r.url.is_some()).collect();
        if wanting.is_empty() {
            return Ok(());
        }
        let members = services.rooms.joined_members(room_id)?;
        let server = services.server_name();
        for reg in wanting {
            if !reg.claims_room(room_id) && !members.iter().any(|m| reg.claims_user(m, server)) {
                continue;
            }
            {
                let mut pending = self.ephemeral.lock().unwrap_or_else(|p| p.into_inner());
                let queue = pending.entry(reg.id.clone()).or_default();
                // A service that is down misses the oldest first.
                if queue.len() >= MAX_EPHEMERAL {
                    queue.remove(0);
                }
                queue.push(event.clone());
            }
            self.waker(&reg.id).notify_one();
        }
        Ok(())
    }

    /// The room's typing users changed (here or on another server).
    pub fn typing_changed(&self, services: &Services, room_id: &str) {
        let typing = services.typing.changed_since(room_id, 0).unwrap_or_default();
        let event =
            json!({"type": "m.typing", "room_id": room_id, "content": {"user_ids": typing}});
        if let Err(e) = self.ephemeral(services, room_id, event) {
            tracing::warn!(error = %e, "handing typing to application services failed");
        }
    }

    /// `user` sent a public read receipt (here or on another server).
    pub fn read_receipt(
        &self,
        services: &Services,
        room_id: &str,
        user: &str,
        event_id: &str,
        thread: Option<&str>,
    ) {
        let mut read = json!({"ts": trellis_core::now_millis()});
        if let Some(thread) = thread {
            read["thread_id"] = thread.into();
        }
        let event = json!({"type": "m.receipt", "room_id": room_id,
                           "content": {event_id: {"m.read": {user: read}}}});
        if let Err(e) = self.ephemeral(services, room_id, event) {
            tracing::warn!(error = %e, "handing a receipt to application services failed");
        }
    }

    /// To-device messages for this server's users (`messages[user][device or "*"]`):
    /// each service that receives ephemeral events gets those for its users' devices,
    /// with `to_user_id` and `to_device_id` (MSC2409).
    pub fn to_device(
        &self,
        services: &Services,
        sender: &str,
        event_type: &str,
        messages: &std::collections::BTreeMap<String, std::collections::BTreeMap<String, Value>>,
    ) -> Result<()> {
        let registered = services.appservices.all();
        let server = services.server_name();
        for reg in registered.iter().filter(|r| r.receive_ephemeral && r.url.is_some()) {
            let mut found = Vec::new();
            for (user_id, devices) in messages.iter().filter(|(u, _)| reg.claims_user(u, server)) {
                let Some(localpart) = services.accounts.local_part(user_id) else { continue };
                for (device, content) in devices {
                    let targets = match device.as_str() {
                        "*" => services
                            .accounts
                            .devices(localpart)?
                            .into_iter()
                            .map(|d| d.device_id)
                            .collect(),
                        _ => vec![device.clone()],
                    };
                    for target in targets {
                        found
                            .push(json!({"type": event_type, "sender": sender, "content": content,
                                          "to_user_id": user_id, "to_device_id": target}));
                    }
                }
            }
            if found.is_empty() {
                continue;
            }
            {
                let mut pending = self.to_device.lock().unwrap_or_else(|p| p.into_inner());
                let queue = pending.entry(reg.id.clone()).or_default();
                queue.extend(found);
                let excess = queue.len().saturating_sub(MAX_EPHEMERAL);
                queue.drain(..excess);
            }
            self.waker(&reg.id).notify_one();
        }
        Ok(())
    }

    /// The service has the presence and device list changes up to `upto`.
    fn changes_read(&self, id: &str, upto: Option<u64>) {
        if let Some(upto) = upto {
            let mut cursors = self.change_cursors.lock().unwrap_or_else(|p| p.into_inner());
            cursors.insert(id.to_owned(), upto);
        }
    }

    fn take_ephemeral(&self, id: &str) -> (Vec<Value>, Vec<Value>) {
        let ephemeral = self.ephemeral.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
        let to_device = self.to_device.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
        (ephemeral.unwrap_or_default(), to_device.unwrap_or_default())
    }

    /// (Re)starts one sender per registered service with a URL; those of services no
    /// longer registered stop (their queues stay, for when they come back).
    pub fn start(&self, services: &Arc<Services>) {
        let mut senders = self.senders.lock().unwrap_or_else(|p| p.into_inner());
        let mut previous = std::mem::take(&mut *senders);
        for reg in services.appservices.all().iter().filter(|r| r.url.is_some()) {
            let span = tracing::info_span!("appservice_sender", appservice = %reg.id);
            // The previous sender may be in the middle of a transaction: the new one
            // starts once it has stopped, so the two never send at once.
            let before = previous.remove(&reg.id);
            let task = send_loop(services.clone(), reg.clone(), self.waker(&reg.id));
            let task = async move {
                if let Some(before) = before {
                    before.abort();
                    let _ = before.await;
                }
                task.await;
            };
            senders.insert(reg.id.clone(), tokio::spawn(task.instrument(span)));
        }
        for (_, sender) in previous {
            sender.abort();
        }
    }
}

#[async_trait]
impl Consumer for Delivery {
    fn name(&self) -> &'static str {
        "appservices"
    }

    async fn on_event(&self, event: &Appended<'_>) -> Result<Option<u64>> {
        let Some(services) = self.services.get().and_then(Weak::upgrade) else { return Ok(None) };
        let registered = services.appservices.all();
        if registered.is_empty() || event.pdu.rejected {
            return Ok(None);
        }
        let mut batch = Batch::new();
        let mut woken = Vec::new();
        let mut client_event = None;
        for reg in registered.iter().filter(|r| r.url.is_some()) {
            if !interested(&services, reg, event)? {
                continue;
            }
            let value = client_event.get_or_insert_with(|| {
                let mut value = sync_event(event.pdu);
                value["room_id"] = json!(event.room_id);
                value
            });
            QUEUE.put(&mut batch, &(reg.id.clone(), event.position), &Json(value.clone()));
            woken.push(reg.id.clone());
        }
        if woken.is_empty() {
            return Ok(None);
        }
        // The event's own WAL sync makes the queue rows durable with it.
        let ticket = services.db.write_unsynced(batch)?;
        for id in woken {
            self.waker(&id).notify_one();
        }
        Ok(Some(ticket))
    }
}

/// The spec's interest: the sender or the member a membership event is about is one of
/// the service's users, the room is in its room namespace or has an alias in its alias
/// namespace, or one of its users is in the room.
fn interested(services: &Services, reg: &Registration, event: &Appended<'_>) -> Result<bool> {
    let server = services.server_name();
    let pdu = event.pdu;
    // An outgoing webhook passes the room on for the member who created it: only while
    // they are in the room.
    if let Some(creator) = &reg.outgoing_webhook_creator
        && !event.members.is_some_and(|m| m.iter().any(|u| u == creator))
    {
        return Ok(false);
    }
    if reg.claims_user(pdu.sender.as_str(), server)
        || pdu
            .state_key
            .as_deref()
            .is_some_and(|k| k.starts_with('@') && reg.claims_user(k, server))
        || reg.claims_room(event.room_id.as_str())
    {
        return Ok(true);
    }
    if let Some(members) = event.members
        && members.iter().any(|m| reg.claims_user(m, server))
    {
        return Ok(true);
    }
    if !reg.aliases.is_empty()
        && let Some(aliases) =
            services.rooms.state_of(event.room_id.as_str(), "m.room.canonical_alias", "")?
    {
        let content: Value = serde_json::from_str(aliases.content.get()).unwrap_or_default();
        let alt = content["alt_aliases"].as_array().cloned().unwrap_or_default();
        let listed = content.get("alias").into_iter().chain(alt.iter());
        if listed.filter_map(Value::as_str).any(|a| reg.claims_alias(a)) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Sends one service's queue for as long as the service stays registered.
async fn send_loop(services: Arc<Services>, reg: Arc<Registration>, wake: Arc<Notify>) {
    let mut backoff = FIRST_BACKOFF;
    let mut failing_since: Option<std::time::Instant> = None;
    // Presence and device key changes are announced on the stream, not the pipeline.
    let changes = extensions::follows_changes(&reg).then(|| {
        services.rooms.stream.subscribe_keys(vec![extensions::CO_MEMBER_CHANGES_KEY.to_owned()])
    });
    loop {
        let next = match next_transaction(&services, &reg) {
            Ok(next) => next,
            Err(e) => {
                tracing::error!(error = %e, "reading the application service queue failed");
                None
            }
        };
        let Some(txn) = next else {
            // Woken by the pipeline or the stream; the timeout is a safety net, not the
            // mechanism.
            let changed = async {
                match &changes {
                    Some(subscription) => subscription.woken().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = wake.notified() => {}
                () = changed => {}
                () = tokio::time::sleep(Duration::from_secs(30)) => {}
            }
            continue;
        };
        match send(&services, &reg, &txn).await {
            Ok(()) => {
                backoff = FIRST_BACKOFF;
                failing_since = None;
                if let Err(e) = acknowledge(&services, &reg.id, &txn) {
                    tracing::error!(error = %e, "clearing a sent transaction failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
            Err(e) => {
                tracing::warn!(txn_id = %txn.txn_id, error = %e, retry_in = ?backoff,
                               "application service transaction failed");
                let since = *failing_since.get_or_insert_with(std::time::Instant::now);
                if reg.outgoing_webhook_room.is_some()
                    && since.elapsed() >= services.appservice_delivery.webhook_give_up
                {
                    give_up_webhook(&services, &reg.id);
                    return;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Removes an outgoing webhook whose URL keeps failing. From a task of its own: the
/// removal restarts the senders, this one among them.
fn give_up_webhook(services: &Arc<Services>, id: &str) {
    tracing::warn!(webhook = id, "an outgoing webhook failed for too long and is removed");
    let (services, id) = (services.clone(), id.to_owned());
    tokio::spawn(async move {
        if let Err(e) = super::remove(&services, &id).await {
            tracing::error!(webhook = %id, error = %e, "removing a failing outgoing webhook failed");
            return;
        }
        let client = crate::audit::Client::default();
        services.audit.log(None, "webhook_outgoing_give_up", &client, "ok", Some(id)).await;
    });
}

/// The transaction being sent, or a new one from the queue's oldest events, the
/// ephemeral events waiting and the changes the service follows.
fn next_transaction(services: &Services, reg: &Registration) -> Result<Option<InFlight>> {
    let id = reg.id.as_str();
    if let Some(Json(txn)) = INFLIGHT.get(&*services.db, &id.to_owned())? {
        return Ok(Some(txn));
    }
    let mut positions = Vec::new();
    let mut events = Vec::new();
    for row in QUEUE.scan_prefix(&*services.db, &id.to_owned(), Direction::Forward)?.take(BATCH) {
        let ((_, position), Json(event)) = row?;
        positions.push(position);
        events.push(event);
    }
    let delivery = &services.appservice_delivery;
    let (mut ephemeral, to_device) = delivery.take_ephemeral(id);
    let cursor = delivery.change_cursors.lock().unwrap_or_else(|p| p.into_inner()).get(id).copied();
    let changes = extensions::changes(services, reg, cursor)?;
    ephemeral.extend(changes.presence);
    let keys = extensions::key_counts(services, reg, &events, &to_device, &changes.device_lists)?;
    let txn_id = match positions.first() {
        Some(first) => format!("{first}.{}", positions.len()),
        None if ephemeral.is_empty()
            && to_device.is_empty()
            && changes.device_lists.is_empty()
            && keys.is_none() =>
        {
            // Nothing in the window concerned the service: it need not be read again.
            delivery.changes_read(id, changes.upto);
            return Ok(None);
        }
        None => format!("e{}.{}", trellis_core::now_millis(), crate::random::alphanumeric(6)),
    };
    // Both names of MSC2409's field: frameworks read one or the other.
    let mut body = json!({"events": events, "ephemeral": ephemeral,
                          "de.sorunome.msc2409.ephemeral": ephemeral,
                          "de.sorunome.msc2409.to_device": to_device});
    if !changes.device_lists.is_empty() {
        let lists = &changes.device_lists;
        body["org.matrix.msc3202.device_lists"] =
            json!({"changed": lists.changed, "left": lists.left});
    }
    if let Some((counts, fallbacks)) = keys {
        body["org.matrix.msc3202.device_one_time_keys_count"] = counts;
        body["org.matrix.msc3202.device_unused_fallback_key_types"] = fallbacks;
    }
    let txn = InFlight { txn_id, positions, changes_upto: changes.upto, body };
    // Written before it is sent, so that a restart resends this very transaction (not
    // synced: a process crash keeps what the WAL was handed; only a power loss could
    // cost it, and then the same events go out under a new id).
    let mut batch = Batch::new();
    INFLIGHT.put(&mut batch, &id.to_owned(), &Json(txn.clone()));
    services.db.write_unsynced(batch)?;
    // Only once the transaction is kept: a failed write reads the same changes again.
    delivery.changes_read(id, txn.changes_upto);
    Ok(Some(txn))
}

async fn send(services: &Services, reg: &Registration, txn: &InFlight) -> Result<()> {
    let Some(url) = &reg.url else { return Ok(()) };
    let delivery = &services.appservice_delivery;
    let (target, client) = match &reg.outgoing_webhook_room {
        // An outgoing webhook posts to its URL as it is, through the guard.
        Some(_) if !delivery.webhook_url_allowed(url) => {
            return Err(unreachable_service("the webhook's address is not allowed".into()));
        }
        Some(_) => (url.clone(), &delivery.guarded),
        None => (format!("{url}/_matrix/app/v1/transactions/{}", txn.txn_id), &delivery.http),
    };
    // Outgoing webhooks are POSTed to, as plain HTTP endpoints expect.
    let method = if reg.outgoing_webhook_room.is_some() {
        reqwest::Method::POST
    } else {
        reqwest::Method::PUT
    };
    let response = client
        .request(method, &target)
        .header("x-trellis-transaction-id", &txn.txn_id)
        .bearer_auth(&reg.hs_token)
        .json(&txn.body)
        .send()
        .await
        .map_err(|e| unreachable_service(format!("cannot reach the service: {e}")))?;
    let status = response.status();
    if !status.is_success() {
        return Err(unreachable_service(format!("the service answered {status}")));
    }
    Ok(())
}

/// A service that is down or refuses: retried, and logged once per attempt as a warning.
fn unreachable_service(message: String) -> Error {
    Error::new(ErrorKind::Upstream, trellis_core::error::code::UNKNOWN, message)
}

/// Clears a transaction the service took. Not synced: if it were lost, the transaction
/// would go again under its id, which the service recognises.
fn acknowledge(services: &Services, id: &str, txn: &InFlight) -> Result<()> {
    let mut batch = Batch::new();
    for position in &txn.positions {
        QUEUE.delete(&mut batch, &(id.to_owned(), *position));
    }
    INFLIGHT.delete(&mut batch, &id.to_owned());
    if let Some(upto) = txn.changes_upto {
        extensions::store_cursor(&mut batch, id, upto);
    }
    services.db.write_unsynced(batch)?;
    Ok(())
}

/// Drops a removed service's queue and in-flight transaction.
pub async fn forget(db: &trellis_store::Db, id: &str) -> Result<()> {
    let mut batch = Batch::new();
    for row in QUEUE.scan_prefix(&**db, &id.to_owned(), Direction::Forward)? {
        QUEUE.delete(&mut batch, &row?.0);
    }
    INFLIGHT.delete(&mut batch, &id.to_owned());
    extensions::forget_cursor(&mut batch, id);
    crate::commit(db, batch).await
}
