//! Inbound transactions (`PUT /send/{txnId}`): each PDU is checked (format, signatures,
//! hashes, then the rooms' checks on receipt) in per-room depth order, with missing
//! `prev_events` fetched from the origin (`get_missing_events`), missing auth events
//! fetched (`event_auth`), and the state fetched (`state`) when a gap cannot be filled.
//! EDUs: typing, receipts, presence, to-device messages and device list changes. A
//! retried transaction gets the first answer again.

use ruma::events::room::member::MembershipState;
use std::{
    collections::{BTreeMap, HashSet},
    sync::Arc,
    time::Duration,
};

use http::Method;
use ruma::{OwnedEventId, room_version_rules::RoomVersionRules};
use serde_json::{Value, json};
use trellis_core::{Error, Result};
use trellis_store::{Batch, Json, Table, catalog};

use super::{encode, pdus::pdus_in, server_of};
use crate::{
    Services,
    rooms::{
        Pdu,
        intake::{Deferred, Intake},
    },
};

const TXNS: Table<(String, String), Json<Value>> = Table::new(&catalog::FEDERATION_TXNS);

/// The spec's limits on one transaction.
pub const MAX_PDUS: usize = 50;
pub const MAX_EDUS: usize = 100;
/// Events asked for when filling a gap.
const MISSING_EVENTS_LIMIT: usize = 20;
/// How long a remote user's typing notification lasts without renewal.
const REMOTE_TYPING: Duration = Duration::from_secs(30);

/// What became of each PDU of a transaction: accepted (or kept), or why not.
pub type PduResults = BTreeMap<OwnedEventId, std::result::Result<(), String>>;

/// Handles one inbound transaction; the per-PDU results.
pub async fn receive(
    services: &Arc<Services>,
    origin: &str,
    txn_id: &str,
    pdus: Vec<Value>,
    edus: Vec<Value>,
) -> Result<PduResults> {
    if pdus.len() > MAX_PDUS || edus.len() > MAX_EDUS {
        return Err(Error::bad_json(format!(
            "A transaction holds at most {MAX_PDUS} PDUs and {MAX_EDUS} EDUs"
        )));
    }
    let lock = services.federation.inbound_lock(origin);
    let _guard = lock.lock().await;
    let key = (origin.to_owned(), txn_id.to_owned());
    if let Some(Json(answer)) = TXNS.get(&*services.db, &key)? {
        return Ok(pdu_results(&answer));
    }
    let mut results = serde_json::Map::new();
    let mut by_room: BTreeMap<String, Vec<(Pdu, String)>> = BTreeMap::new();
    for value in pdus {
        let Some(room_id) = value.get("room_id").and_then(Value::as_str).map(str::to_owned) else {
            tracing::info!(origin, "dropping a PDU without room_id");
            continue;
        };
        let Some((_, room)) = services.rooms.room(&room_id)? else {
            tracing::info!(origin, room_id, "dropping a PDU for a room this server is not in");
            continue;
        };
        let (_, rules) = room.rules()?;
        if !super::acl::allows(services, &room_id, origin)? {
            if let Some(id) = event_id_of(&rules, &value) {
                results.insert(id, json!({"error": "Server is banned from the room by ACL"}));
            }
            continue;
        }
        match services.federation.verify_pdu(&rules, &value).await {
            Ok(checked) => by_room.entry(room_id).or_default().push(checked),
            Err(e) => {
                tracing::info!(origin, error = %e.message, "refusing a PDU");
                if let Some(id) = event_id_of(&rules, &value) {
                    results.insert(id, json!({"error": e.message}));
                }
            }
        }
    }
    // Accepted events become durable together, with one sync, before the answer.
    let mut deferred = Vec::new();
    for (room_id, mut events) in by_room {
        events.sort_by_key(|(pdu, _)| pdu.depth);
        for (pdu, hash) in events {
            let id = pdu.event_id.to_string();
            let outcome = handle_pdu_deferred(services, origin, &room_id, pdu, hash).await;
            let result = match outcome {
                Ok((Intake::Rejected(reason), _)) => json!({"error": reason}),
                Ok((_, pending)) => {
                    deferred.extend(pending);
                    json!({})
                }
                Err(e) => json!({"error": e.message}),
            };
            results.insert(id, result);
        }
    }
    services.timeline.finish_all(deferred).await?;
    for edu in edus {
        if let Err(e) = handle_edu(services, origin, edu).await {
            tracing::info!(origin, error = %e.message, "ignoring an EDU");
        }
    }
    let answer = json!({ "pdus": results });
    let mut batch = Batch::new();
    TXNS.put(&mut batch, &key, &Json(answer.clone()));
    crate::commit(&services.db, batch).await?;
    Ok(pdu_results(&answer))
}

/// The results of a transaction's answer as stored (`{"pdus": {id: {} or {"error":
/// reason}}}`, the wire format, kept so a retry gets the same answer).
fn pdu_results(answer: &Value) -> PduResults {
    let Some(results) = answer["pdus"].as_object() else { return PduResults::new() };
    results
        .iter()
        .filter_map(|(id, result)| {
            let id = OwnedEventId::try_from(id.as_str()).ok()?;
            let outcome = match result.get("error").and_then(Value::as_str) {
                Some(error) => Err(error.to_owned()),
                None => Ok(()),
            };
            Some((id, outcome))
        })
        .collect()
}

/// The id of a received event as far as it can be told before any check (to report
/// on events that fail them).
fn event_id_of(rules: &RoomVersionRules, value: &Value) -> Option<String> {
    if let Some(id) = value.get("event_id").and_then(Value::as_str) {
        return Some(id.to_owned());
    }
    let mut object: ruma::CanonicalJsonObject = serde_json::from_value(value.clone()).ok()?;
    object.remove("unsigned");
    let hash = ruma::signatures::reference_hash(&object, rules).ok()?;
    Some(format!("${hash}"))
}

/// One received PDU of a room this server is in, gaps filled from `origin` first.
pub async fn handle_pdu(
    services: &Arc<Services>,
    origin: &str,
    room_id: &str,
    pdu: Pdu,
    hash: String,
) -> Result<Intake> {
    let (intake, deferred) = handle_pdu_deferred(services, origin, room_id, pdu, hash).await?;
    services.timeline.finish_all(deferred.into_iter().collect()).await?;
    Ok(intake)
}

/// [`handle_pdu`], leaving the accepted event's durability to the caller.
async fn handle_pdu_deferred(
    services: &Arc<Services>,
    origin: &str,
    room_id: &str,
    pdu: Pdu,
    hash: String,
) -> Result<(Intake, Option<Deferred>)> {
    let rooms = &services.rooms;
    if rooms.is_known(pdu.event_id.as_str())? {
        return Ok((Intake::Known, None));
    }
    let (_, room) = rooms.room(room_id)?.ok_or_else(|| Error::not_found("Unknown room"))?;
    let (version, rules) = room.rules()?;
    if pdu.room_id.as_ref().is_none_or(|r| r.as_str() != room_id) {
        return Ok((Intake::Rejected("The event belongs to another room".into()), None));
    }
    if missing_auth(services, &pdu)? {
        let path = format!(
            "/_matrix/federation/v1/event_auth/{}/{}",
            encode(room_id),
            encode(pdu.event_id.as_str())
        );
        if let Ok(answer) = services.federation.request(origin, Method::GET, &path, None).await {
            let chain = pdus_in(&answer, "auth_chain");
            let events = services.federation.verify_pdus(&rules, chain).await;
            services.timeline.store_outliers(room_id, &version, events).await?;
        }
    }
    let mut state_before = None;
    if !rooms.missing_prev_events(&pdu)?.is_empty() {
        fill_gap(services, origin, room_id, &rules, &pdu).await?;
        if !rooms.missing_prev_events(&pdu)?.is_empty() {
            state_before = Some(fetch_state(services, origin, room_id, &pdu.event_id).await?);
        }
    }
    services.timeline.accept_remote_deferred(room_id, pdu, hash, state_before).await
}

fn missing_auth(services: &Services, pdu: &Pdu) -> Result<bool> {
    for id in &pdu.auth_events {
        if !services.rooms.is_known(id.as_str())? {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Fetches the events between the room's forward extremities and `pdu` from `origin`
/// and takes in those that connect, oldest first.
async fn fill_gap(
    services: &Arc<Services>,
    origin: &str,
    room_id: &str,
    rules: &RoomVersionRules,
    pdu: &Pdu,
) -> Result<()> {
    let rooms = &services.rooms;
    let body = json!({
        "earliest_events": rooms.extremities(room_id)?,
        "latest_events": [pdu.event_id],
        "limit": MISSING_EVENTS_LIMIT,
        "min_depth": 0,
    });
    let path = format!("/_matrix/federation/v1/get_missing_events/{}", encode(room_id));
    let answer = match services.federation.request(origin, Method::POST, &path, Some(&body)).await {
        Ok(a) => a,
        Err(e) => {
            tracing::info!(origin, error = %e.message, "get_missing_events failed");
            return Ok(());
        }
    };
    let mut events = services.federation.verify_pdus(rules, pdus_in(&answer, "events")).await;
    events.sort_by_key(|(p, _)| p.depth);
    for (event, hash) in events {
        if event.room_id.as_ref().is_none_or(|r| r.as_str() != room_id)
            || rooms.is_known(event.event_id.as_str())?
            || !rooms.missing_prev_events(&event)?.is_empty()
            || missing_auth(services, &event)?
        {
            continue;
        }
        let id = event.event_id.clone();
        if let Err(e) = services.timeline.accept_remote(room_id, event, hash, None).await {
            tracing::info!(event_id = %id, error = %e.message, "a missing event was not taken in");
        }
    }
    Ok(())
}

/// The state before `event_id` as `origin` reports it, its events checked and stored.
async fn fetch_state(
    services: &Arc<Services>,
    origin: &str,
    room_id: &str,
    event_id: &OwnedEventId,
) -> Result<Vec<OwnedEventId>> {
    let (_, room) =
        services.rooms.room(room_id)?.ok_or_else(|| Error::not_found("Unknown room"))?;
    let (version, rules) = room.rules()?;
    let path = format!(
        "/_matrix/federation/v1/state/{}?event_id={}",
        encode(room_id),
        encode(event_id.as_str())
    );
    let answer = services.federation.request(origin, Method::GET, &path, None).await?;
    let state = services.federation.verify_pdus(&rules, pdus_in(&answer, "pdus")).await;
    let chain = services.federation.verify_pdus(&rules, pdus_in(&answer, "auth_chain")).await;
    let ids: Vec<OwnedEventId> = state.iter().map(|(p, _)| p.event_id.clone()).collect();
    let mut all = chain;
    all.extend(state);
    services.timeline.store_outliers(room_id, &version, all).await?;
    Ok(ids)
}

/// Typing and read receipts of `origin`'s users, in rooms they are joined to.
async fn handle_edu(services: &Arc<Services>, origin: &str, edu: Value) -> Result<()> {
    let kind = edu.get("edu_type").and_then(Value::as_str).unwrap_or_default();
    let content = edu.get("content").cloned().unwrap_or(Value::Null);
    let joined_from_origin = |room_id: &str, user: &str| -> Result<bool> {
        Ok(server_of(user) == Some(origin)
            && services.rooms.membership(room_id, user)? == Some(MembershipState::Join))
    };
    match kind {
        "m.typing" => {
            let room_id = content["room_id"].as_str().unwrap_or_default();
            let user = content["user_id"].as_str().unwrap_or_default();
            if joined_from_origin(room_id, user)? {
                let typing = content["typing"].as_bool().unwrap_or(false);
                services.typing.set(room_id, user, typing.then_some(REMOTE_TYPING));
                services.appservice_delivery.typing_changed(services, room_id);
            }
        }
        "m.receipt" => {
            let Some(rooms) = content.as_object() else { return Ok(()) };
            for (room_id, kinds) in rooms {
                let Some(read) = kinds.get("m.read").and_then(Value::as_object) else { continue };
                for (user, receipt) in read {
                    if !joined_from_origin(room_id, user)? {
                        continue;
                    }
                    let thread = receipt["data"]["thread_id"].as_str();
                    let ids = receipt["event_ids"].as_array().cloned().unwrap_or_default();
                    let seen: HashSet<&str> = ids.iter().filter_map(Value::as_str).collect();
                    for event_id in seen {
                        let in_room = services
                            .rooms
                            .cached_event(event_id)?
                            .is_some_and(|e| e.pdu.room_id.as_ref().is_some_and(|r| r == room_id));
                        if in_room {
                            services
                                .receipts
                                .set(room_id, user, "m.read", event_id, thread)
                                .await?;
                            let delivery = &services.appservice_delivery;
                            delivery.read_receipt(services, room_id, user, event_id, thread);
                        }
                    }
                }
            }
        }
        "m.presence" => {
            for update in content["push"].as_array().into_iter().flatten() {
                let user = update["user_id"].as_str().unwrap_or_default();
                let state = update["presence"].as_str().unwrap_or_default();
                if server_of(user) == Some(origin) {
                    let status = update["status_msg"].as_str().map(str::to_owned);
                    services.presence.set_state(user, state, status).await?;
                }
            }
        }
        "m.direct_to_device" => {
            let sender = content["sender"].as_str().unwrap_or_default();
            if server_of(sender) != Some(origin) {
                return Ok(());
            }
            let messages: BTreeMap<String, BTreeMap<String, Value>> =
                serde_json::from_value(content["messages"].clone()).unwrap_or_default();
            let own = services.server_name();
            let messages =
                messages.into_iter().filter(|(u, _)| server_of(u) == Some(own)).collect();
            let event_type = content["type"].as_str().unwrap_or_default();
            let delivery = &services.appservice_delivery;
            if let Err(e) = delivery.to_device(services, sender, event_type, &messages) {
                tracing::warn!(error = %e, "handing to-device messages to application services failed");
            }
            services
                .e2ee
                .send_to_device(crate::e2ee::to_device::Send {
                    sender,
                    sender_localpart: origin,
                    sender_device: "",
                    txn_id: content["message_id"].as_str().unwrap_or_default(),
                    event_type: content["type"].as_str().unwrap_or_default(),
                    messages,
                })
                .await?;
        }
        "m.device_list_update" | "m.signing_key_update" => {
            let user = content["user_id"].as_str().unwrap_or_default();
            if server_of(user) == Some(origin) {
                crate::e2ee::device_lists::commit_with_changes(
                    &services.db,
                    &services.rooms,
                    trellis_store::Batch::new(),
                    &[user.to_owned()],
                )
                .await?;
            }
        }
        _ => tracing::debug!(origin, kind, "EDU type not handled"),
    }
    Ok(())
}
