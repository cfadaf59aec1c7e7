//! Joining and leaving over federation, both sides. A server whose user wants into a
//! room it is not in asks a resident server for a join template (`make_join`), signs
//! it, and hands it back (`send_join`), receiving the room's state and auth chain, from
//! which it builds its own copy of the room. The resident side serves those requests,
//! and the same for leaving and knocking.

use std::sync::Arc;

use http::Method;
use ruma::{RoomVersionId, room_version_rules::RoomVersionRules};
use serde_json::{Value, json};
use trellis_core::{Error, ErrorKind, Result, error::code, now_millis};

use super::{encode, pdus::pdus_in, server_of, transactions::handle_pdu};
use crate::{
    Services,
    rooms::{EventRef, Pdu, PduTemplate, build_pdu, intake::Intake},
};

/// The room versions this server can join, as `make_join` query parameters.
fn supported_versions_query() -> String {
    (1..=12).map(|v| format!("ver={v}")).collect::<Vec<_>>().join("&")
}

/// `make_join` / `make_leave` / `make_knock` on the resident side.
pub fn make_membership(
    services: &Services,
    origin: &str,
    room_id: &str,
    user_id: &str,
    membership: &str,
    versions: &[String],
) -> Result<(RoomVersionId, Value)> {
    if server_of(user_id) != Some(origin) {
        return Err(Error::forbidden("The user does not belong to the requesting server"));
    }
    let Some((_, room)) = services.rooms.room(room_id)? else {
        return Err(Error::not_found("Unknown room"));
    };
    if !super::acl::allows(services, room_id, origin)? {
        return Err(Error::forbidden("Server is banned from the room by ACL"));
    }
    // Without `ver`, a server supports version 1 only.
    let understood =
        if versions.is_empty() { room.version == "1" } else { versions.contains(&room.version) };
    if membership != "leave" && !understood {
        return Err(Error::new(
            ErrorKind::BadRequest,
            code::INCOMPATIBLE_ROOM_VERSION,
            format!("The room has version {}, which your server does not support", room.version),
        )
        .with_field("room_version", room.version.clone()));
    }
    services.timeline.member_template(room_id, user_id, membership)
}

/// `send_join` / `send_leave` / `send_knock` on the resident side: checks the signed
/// membership event, takes it into the room and passes it on to the other servers.
pub async fn receive_membership(
    services: &Arc<Services>,
    origin: &str,
    room_id: &str,
    event_id: &str,
    membership: &str,
    value: Value,
) -> Result<Pdu> {
    let (_, room) =
        services.rooms.room(room_id)?.ok_or_else(|| Error::not_found("Unknown room"))?;
    if !super::acl::allows(services, room_id, origin)? {
        return Err(Error::forbidden("Server is banned from the room by ACL"));
    }
    let (_, rules) = room.rules()?;
    let (pdu, hash) = services.federation.verify_pdu(&rules, &value).await?;
    let content: Value = serde_json::from_str(pdu.content.get()).unwrap_or_default();
    let sender = pdu.sender.as_str();
    if pdu.event_id.as_str() != event_id
        || pdu.room_id.as_ref().is_none_or(|r| r.as_str() != room_id)
        || pdu.kind.to_string() != "m.room.member"
        || pdu.state_key.as_deref() != Some(sender)
        || content["membership"].as_str() != Some(membership)
    {
        return Err(Error::bad_json(format!(
            "Not a {membership} event of its sender for this room and event id"
        )));
    }
    if server_of(sender) != Some(origin) {
        return Err(Error::forbidden("The sender does not belong to the requesting server"));
    }
    let pdu =
        if vouched_by_us(services, &content) { countersign(services, &rules, pdu)? } else { pdu };
    match handle_pdu(services, origin, room_id, pdu.clone(), hash).await? {
        Intake::Accepted | Intake::Known => {}
        Intake::SoftFailed => return Err(Error::forbidden("The event fails the room's rules")),
        Intake::Rejected(reason) => return Err(Error::forbidden(reason)),
    }
    super::sender::send_pdu_except(
        &services.federation,
        &services.rooms,
        room_id,
        &pdu,
        Some(origin),
    )
    .await?;
    Ok(pdu)
}

fn vouched_by_us(services: &Services, content: &Value) -> bool {
    content["join_authorised_via_users_server"]
        .as_str()
        .and_then(server_of)
        .is_some_and(|s| s == services.server_name())
}

/// Adds this server's signature to another server's event (a restricted join it vouched
/// for).
pub(super) fn countersign(services: &Services, rules: &RoomVersionRules, pdu: Pdu) -> Result<Pdu> {
    let mut json = (*pdu.json).clone();
    ruma::signatures::hash_and_sign_event(
        services.server_name(),
        services.keys.key_pair(),
        &mut json,
        &rules.redaction,
    )
    .map_err(|e| Error::internal("signing an event", e))?;
    Pdu::from_json(pdu.event_id, json)
}

pub fn pdu_json(pdu: &Pdu) -> Value {
    serde_json::to_value(&*pdu.json).unwrap_or(Value::Null)
}

/// Joins `user_id` (local) to a room this server is not in, through the first of
/// `servers` that helps. `content` is the membership content to add (profile, reason).
pub async fn join_remote(
    services: &Arc<Services>,
    user_id: &str,
    room_id: &str,
    servers: &[String],
    content: Value,
) -> Result<()> {
    through_first(services, servers, room_id, "join", |server| {
        join_through(services, server, user_id, room_id, &content)
    })
    .await
}

/// Tries `attempt` with each of `servers` (other than this one, each once) until one
/// succeeds; the last error otherwise.
async fn through_first<'a, F, Fut>(
    services: &Services,
    servers: &'a [String],
    room_id: &str,
    what: &str,
    attempt: F,
) -> Result<()>
where
    F: Fn(&'a str) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let mut last = Error::not_found(format!("No server in the room could be reached to {what} it"));
    let mut tried: Vec<&str> = Vec::new();
    for server in servers {
        if server == services.server_name() || tried.contains(&server.as_str()) {
            continue;
        }
        tried.push(server);
        match attempt(server).await {
            Ok(()) => return Ok(()),
            Err(e) => {
                tracing::info!(server, room_id, what, error = %e.message, "through a server failed");
                last = e;
            }
        }
    }
    Err(last)
}

/// Asks `server` for a membership template (`make_join`, `make_leave`) and signs it:
/// the room version and our event.
async fn make_and_sign(
    services: &Services,
    server: &str,
    user_id: &str,
    room_id: &str,
    membership: &str,
    extra: &Value,
) -> Result<(RoomVersionId, Pdu, String)> {
    let query = if membership == "leave" { String::new() } else { supported_versions_query() };
    let path = format!(
        "/_matrix/federation/v1/make_{membership}/{}/{}?{query}",
        encode(room_id),
        encode(user_id),
    );
    let answer = services.federation.request(server, Method::GET, &path, None).await?;
    let version = answer["room_version"].as_str().unwrap_or("1");
    let version = RoomVersionId::try_from(version)
        .ok()
        .filter(|v| v.rules().is_some())
        .ok_or_else(|| Error::bad_json(format!("{server} offered an unsupported room version")))?;
    let template = signed_template(&answer["event"], user_id, room_id, membership, extra)?;
    let own: &ruma::ServerName =
        services.server_name().try_into().map_err(|e| Error::internal("own server name", e))?;
    let (pdu, hash) = build_pdu(&services.keys, own, &version, template)?;
    Ok((version, pdu, hash))
}

/// Leaves a room this server is not in (rejecting an invite, withdrawing a knock)
/// through `server`: the leave event sent.
pub async fn leave_remote(
    services: &Services,
    server: &str,
    user_id: &str,
    room_id: &str,
) -> Result<Pdu> {
    let (_, leave, _) =
        make_and_sign(services, server, user_id, room_id, "leave", &json!({})).await?;
    let path = format!(
        "/_matrix/federation/v2/send_leave/{}/{}",
        encode(room_id),
        encode(leave.event_id.as_str())
    );
    services.federation.request(server, Method::PUT, &path, Some(&pdu_json(&leave))).await?;
    Ok(leave)
}

/// Knocks on a room this server is not in, through the first of `servers` that takes
/// the knock; it is kept for the user's syncs with the state the server answered with.
pub async fn knock_remote(
    services: &Arc<Services>,
    user_id: &str,
    room_id: &str,
    servers: &[String],
    content: Value,
) -> Result<()> {
    through_first(services, servers, room_id, "knock on", |server| {
        knock_through(services, server, user_id, room_id, &content)
    })
    .await
}

async fn knock_through(
    services: &Arc<Services>,
    server: &str,
    user_id: &str,
    room_id: &str,
    extra: &Value,
) -> Result<()> {
    let (_, knock, _) = make_and_sign(services, server, user_id, room_id, "knock", extra).await?;
    let path = format!(
        "/_matrix/federation/v1/send_knock/{}/{}",
        encode(room_id),
        encode(knock.event_id.as_str())
    );
    let answer =
        services.federation.request(server, Method::PUT, &path, Some(&pdu_json(&knock))).await?;
    let state = answer["knock_room_state"].as_array().cloned().unwrap_or_default();
    super::invites::keep_knock(services, user_id, room_id, server, &knock, &state).await
}

async fn join_through(
    services: &Arc<Services>,
    server: &str,
    user_id: &str,
    room_id: &str,
    extra: &Value,
) -> Result<()> {
    let fed = &services.federation;
    let (version, join, hash) =
        make_and_sign(services, server, user_id, room_id, "join", extra).await?;
    let rules = version.rules().ok_or_else(|| Error::bad_json("unsupported room version"))?;
    let path = format!(
        "/_matrix/federation/v2/send_join/{}/{}",
        encode(room_id),
        encode(join.event_id.as_str())
    );
    let answer = fed.request(server, Method::PUT, &path, Some(&pdu_json(&join))).await?;
    // A resident that vouched for a restricted join returns the event with its signature.
    let (join, hash) = match answer.get("event").filter(|e| e.is_object()) {
        Some(event) => match fed.verify_pdu(&rules, event).await {
            Ok((signed, h)) if signed.event_id == join.event_id => (signed, h),
            _ => (join, hash),
        },
        None => (join, hash),
    };
    let state = fed.verify_pdus(&rules, pdus_in(&answer, "state")).await;
    let chain = fed.verify_pdus(&rules, pdus_in(&answer, "auth_chain")).await;
    let state_ids = state.iter().map(|(p, _)| p.event_id.clone()).collect();
    let mut all = chain;
    all.extend(state);
    services.timeline.store_outliers(room_id, &version, all).await?;
    match services.timeline.import_room(room_id, &version, state_ids, join, hash).await? {
        Intake::Accepted | Intake::Known => {
            super::invites::forget(services, user_id, room_id).await
        }
        Intake::SoftFailed => Err(Error::forbidden("The join fails the room's current rules")),
        Intake::Rejected(reason) => Err(Error::forbidden(reason)),
    }
}

/// A resident server's membership template made into ours: its `prev_events`,
/// `auth_events` and depth, our content, our timestamp.
fn signed_template(
    event: &Value,
    user_id: &str,
    room_id: &str,
    membership: &str,
    extra: &Value,
) -> Result<PduTemplate> {
    let bad = |what: &str| Error::bad_json(format!("Bad membership template: {what}"));
    if event["room_id"].as_str() != Some(room_id)
        || event["state_key"].as_str() != Some(user_id)
        || event["sender"].as_str() != Some(user_id)
        || event["type"].as_str() != Some("m.room.member")
    {
        return Err(bad("it is not this user's membership in this room"));
    }
    let refs = |field: &str| -> Result<Vec<EventRef>> {
        let items = event[field].as_array().ok_or_else(|| bad(field))?;
        items
            .iter()
            .map(|item| match item {
                Value::String(id) => Ok(EventRef { event_id: id.clone(), sha256: String::new() }),
                Value::Array(pair) => Ok(EventRef {
                    event_id: pair
                        .first()
                        .and_then(Value::as_str)
                        .ok_or_else(|| bad(field))?
                        .into(),
                    sha256: pair.get(1).and_then(|h| h["sha256"].as_str()).unwrap_or("").into(),
                }),
                _ => Err(bad(field)),
            })
            .collect()
    };
    let mut content = json!({ "membership": membership });
    if let Some(via) = event["content"]["join_authorised_via_users_server"].as_str() {
        content["join_authorised_via_users_server"] = json!(via);
    }
    if let Value::Object(extra) = extra {
        for (k, v) in extra {
            content[k] = v.clone();
        }
    }
    Ok(PduTemplate {
        room_id: Some(room_id.to_owned()),
        sender: user_id.to_owned(),
        kind: "m.room.member".into(),
        state_key: Some(user_id.to_owned()),
        content,
        redacts: None,
        prev_events: refs("prev_events")?,
        auth_events: refs("auth_events")?,
        depth: event["depth"].as_u64().ok_or_else(|| bad("depth"))?,
        origin_server_ts: now_millis(),
    })
}
