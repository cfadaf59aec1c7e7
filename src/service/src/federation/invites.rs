//! Invites across servers (`PUT /v2/invite`). Inviting another server's user: the event
//! is built and checked here, countersigned by the invitee's server, then taken into the
//! room. Being invited to a room this server is not in: the invite is countersigned and
//! kept, with the stripped state the inviter sent, until the user joins or rejects it
//! (rejecting goes through `make_leave`/`send_leave` at the inviting server).

use std::sync::Arc;

use http::{Method, StatusCode};
use ruma::{OwnedEventId, RoomVersionId};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use trellis_core::{Error, Result, error::code};
use trellis_store::{Batch, Direction, Json, Table, catalog};

use super::{encode, membership::pdu_json, server_of};
use crate::{
    Services,
    rooms::{append::NewEvent, intake::Intake},
    sync::STRIPPED_STATE,
};

/// (invited user id, room id) -> an invite to a room this server is not in
const INVITES: Table<(String, String), Json<RemoteInvite>> = Table::new(&catalog::REMOTE_INVITES);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RemoteInvite {
    /// Stream position at which the invite arrived (sync shows it once).
    pub position: u64,
    /// The invite event, countersigned.
    pub event: Value,
    /// The room's state as the inviting server described it (stripped events).
    pub stripped: Vec<Value>,
}

/// Invites another server's user to a room of this server: returns the event id.
pub async fn invite_remote(
    services: &Arc<Services>,
    room_id: &str,
    sender: &str,
    target: &str,
    content: Value,
) -> Result<OwnedEventId> {
    let server = server_of(target).ok_or_else(|| Error::invalid_param("Invalid user id"))?;
    let rooms = &services.rooms;
    let event = NewEvent {
        kind: "m.room.member".into(),
        sender: sender.to_owned(),
        state_key: Some(target.to_owned()),
        content,
        txn: None,
        redacts: None,
    };
    let (pdu, hash) = rooms.prepare(room_id, event)?;
    let (_, room) = rooms.room(room_id)?.ok_or_else(|| Error::not_found("Unknown room"))?;
    let (_, rules) = room.rules()?;
    let mut invite_state = Vec::new();
    // Full PDUs, as Matrix 1.16 asks (the invitee's server can check them).
    for kind in STRIPPED_STATE {
        if let Some(p) = rooms.state_of(room_id, kind, "")? {
            invite_state.push(pdu_json(&p));
        }
    }
    if let Some(p) = rooms.state_of(room_id, "m.room.member", sender)? {
        invite_state.push(pdu_json(&p));
    }
    let body = json!({
        "room_version": room.version,
        "event": pdu_json(&pdu),
        "invite_room_state": invite_state,
    });
    let path = format!(
        "/_matrix/federation/v2/invite/{}/{}",
        encode(room_id),
        encode(pdu.event_id.as_str())
    );
    let answer = services.federation.request(server, Method::PUT, &path, Some(&body)).await?;
    let signed = answer.get("event").cloned().ok_or_else(|| {
        Error::new(
            StatusCode::BAD_GATEWAY,
            code::UNKNOWN,
            format!("{server} sent no signed invite"),
        )
    })?;
    let (signed, _) = services.federation.verify_pdu(&rules, &signed).await?;
    if signed.event_id != pdu.event_id {
        return Err(Error::new(
            StatusCode::BAD_GATEWAY,
            code::UNKNOWN,
            format!("{server} changed the invite event"),
        ));
    }
    let event_id = signed.event_id.clone();
    match rooms.accept_remote(room_id, signed, hash, None).await? {
        Intake::Accepted | Intake::Known => Ok(event_id),
        Intake::SoftFailed => Err(Error::forbidden("The invite fails the room's current rules")),
        Intake::Rejected(reason) => Err(Error::forbidden(reason)),
    }
}

/// `PUT /v2/invite` on the invitee's side: checks and countersigns the invite and, for a
/// room this server is not in, keeps it for the user's syncs.
pub async fn receive_invite(
    services: &Arc<Services>,
    origin: &str,
    room_id: &str,
    event_id: &str,
    room_version: &str,
    event: Value,
    invite_room_state: Vec<Value>,
) -> Result<Value> {
    let version = RoomVersionId::try_from(room_version)
        .ok()
        .filter(|v| v.rules().is_some())
        .ok_or_else(|| {
            Error::new(
                StatusCode::BAD_REQUEST,
                code::INCOMPATIBLE_ROOM_VERSION,
                format!("Room version {room_version} is not supported"),
            )
            .with_field("room_version", room_version)
        })?;
    let rules = version.rules().ok_or_else(|| Error::bad_json("unsupported room version"))?;
    let (pdu, _) = services.federation.verify_pdu(&rules, &event).await?;
    let content: Value = serde_json::from_str(pdu.content.get()).unwrap_or_default();
    let target = pdu.state_key.clone().unwrap_or_default();
    if pdu.event_id.as_str() != event_id
        || pdu.room_id.as_ref().is_none_or(|r| r.as_str() != room_id)
        || pdu.kind.to_string() != "m.room.member"
        || content["membership"] != "invite"
    {
        return Err(Error::bad_json("Not an invite for this room and event id"));
    }
    if server_of(pdu.sender.as_str()) != Some(origin) {
        return Err(Error::forbidden("The inviter does not belong to the requesting server"));
    }
    let localpart = services
        .accounts
        .local_part(&target)
        .ok_or_else(|| Error::not_found("The invitee is not a user of this server"))?;
    if services.accounts.user(localpart)?.is_none_or(|u| u.deactivated) {
        return Err(Error::not_found("No such user"));
    }
    let signed = super::membership::countersign(services, &rules, pdu)?;
    let resident = services.rooms.room(room_id)?.is_some()
        && services.rooms.has_member_from(room_id, services.server_name(), &["join"])?;
    // A room this server is in learns of the invite as any other event, from /send.
    if !resident {
        // Full PDUs (as Matrix 1.16 sends them) or stripped events; clients get the latter.
        let mut stripped_state: Vec<Value> = invite_room_state
            .iter()
            .filter(|s| s.is_object())
            .take(50)
            .map(|s| {
                json!({
                    "type": s["type"], "state_key": s["state_key"],
                    "content": s["content"], "sender": s["sender"],
                })
            })
            .collect();
        stripped_state.push(crate::sync::sync_event(&signed));
        let stream = &services.rooms.stream;
        let ticket = stream.dispatch();
        let mut batch = Batch::new();
        let invite = RemoteInvite {
            position: ticket.position,
            event: pdu_json(&signed),
            stripped: stripped_state,
        };
        INVITES.put(&mut batch, &(target.clone(), room_id.to_owned()), &Json(invite));
        let result = crate::commit(&services.db, batch).await;
        stream.retire(ticket);
        stream.wake(&crate::rooms::stream::user_key(&target));
        result?;
    }
    Ok(pdu_json(&signed))
}

/// A user's invites to rooms this server is not in.
pub fn pending_for(services: &Services, user_id: &str) -> Result<Vec<(String, RemoteInvite)>> {
    let mut out = Vec::new();
    for row in INVITES.scan_prefix(&*services.db, &user_id.to_owned(), Direction::Forward)? {
        let ((_, room), Json(invite)) = row?;
        out.push((room, invite));
    }
    Ok(out)
}

/// The pending invite of a user to a room, if any.
pub fn pending(services: &Services, user_id: &str, room_id: &str) -> Result<Option<RemoteInvite>> {
    Ok(INVITES.get(&*services.db, &(user_id.to_owned(), room_id.to_owned()))?.map(|j| j.0))
}

/// Drops a pending invite (the user joined or rejected it).
pub async fn forget(services: &Services, user_id: &str, room_id: &str) -> Result<()> {
    let mut batch = Batch::new();
    INVITES.delete(&mut batch, &(user_id.to_owned(), room_id.to_owned()));
    crate::commit(&services.db, batch).await
}

/// Rejects a pending invite: tells the inviting server (best effort), then forgets it.
pub async fn reject(services: &Arc<Services>, user_id: &str, room_id: &str) -> Result<()> {
    let Some(invite) = pending(services, user_id, room_id)? else {
        return Err(Error::not_found("You are not in this room"));
    };
    if let Some(server) = invite.event["sender"].as_str().and_then(server_of)
        && let Err(e) = super::membership::leave_remote(services, server, user_id, room_id).await
    {
        tracing::info!(server, room_id, error = %e.message, "rejecting an invite remotely failed");
    }
    forget(services, user_id, room_id).await
}
