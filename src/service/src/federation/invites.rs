//! Invites across servers (`PUT /v2/invite`). Inviting another server's user: the event
//! is built and checked here, countersigned by the invitee's server, then taken into the
//! room. Being invited to a room this server is not in: the invite is countersigned and
//! kept, with the stripped state the inviter sent, until the user joins or rejects it
//! (rejecting goes through `make_leave`/`send_leave` at the inviting server). Knocks on
//! rooms this server is not in are kept the same way, until an invite replaces them or
//! the user takes them back; a rejected invite or withdrawn knock stays as a leave so
//! that syncs tell clients the room is gone.

use ruma::events::room::member::MembershipState;
use std::sync::Arc;

use http::Method;
use ruma::{OwnedEventId, RoomVersionId};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use trellis_core::{Error, ErrorKind, Result, error::code};
use trellis_store::{Batch, Direction, Json, Table, catalog};

use super::{encode, membership::pdu_json, server_of};
use crate::{
    Services,
    realtime::sync::STRIPPED_STATE,
    rooms::{append::NewEvent, intake::Intake},
};

/// (invited user id, room id) -> an invite to a room this server is not in
const INVITES: Table<(String, String), Json<RemoteInvite>> = Table::new(&catalog::REMOTE_INVITES);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RemoteInvite {
    /// Stream position at which the invite arrived (sync shows it once).
    pub position: u64,
    /// The invite event, countersigned (for a knock, the knock; for a leave, the leave).
    pub event: Value,
    /// The room's state as the inviting server described it (stripped events), ending
    /// with the membership event in the client format.
    pub stripped: Vec<Value>,
    /// `invite`, `knock`, or `leave` once the user rejected or withdrew it.
    #[serde(default = "invite_membership")]
    pub membership: String,
    /// The server to leave through (the inviter's, or the one knocked through).
    #[serde(default)]
    pub server: Option<String>,
}

fn invite_membership() -> String {
    "invite".to_owned()
}

impl RemoteInvite {
    /// An invite or a knock still waiting for an answer.
    pub fn is_pending(&self) -> bool {
        self.membership != "leave"
    }
}

/// State events (full PDUs or stripped ones) in the stripped form clients get, at most
/// 50 of them.
fn stripped(events: &[Value]) -> Vec<Value> {
    events
        .iter()
        .filter(|s| s.is_object())
        .take(50)
        .map(|s| {
            json!({
                "type": s["type"], "state_key": s["state_key"],
                "content": s["content"], "sender": s["sender"],
            })
        })
        .collect()
}

/// Writes the user's membership of a room this server is not in at a new stream
/// position, and wakes the user's syncs.
async fn keep(
    services: &Services,
    user_id: &str,
    room_id: &str,
    make: impl FnOnce(u64) -> RemoteInvite,
) -> Result<()> {
    let stream = &services.rooms.stream;
    let ticket = stream.dispatch();
    let mut batch = Batch::new();
    INVITES.put(
        &mut batch,
        &(user_id.to_owned(), room_id.to_owned()),
        &Json(make(ticket.position)),
    );
    let result = crate::commit(&services.db, batch).await;
    stream.note_change(&change_key(user_id), ticket.position);
    let retired = stream.retire(ticket);
    stream.wake_for(retired, &crate::rooms::stream::user_key(user_id));
    result
}

/// The stream's note for a user's invites and knocks of other servers' rooms.
fn change_key(user_id: &str) -> String {
    format!("remote_invites {user_id}")
}

/// The user's invites, knocks and recent leaves of rooms this server is not in, written
/// after `since` (every one of them when `since` is 0).
pub fn pending_since(
    services: &Services,
    user_id: &str,
    since: u64,
) -> Result<Vec<(String, RemoteInvite)>> {
    if !services.rooms.stream.changed_after(&change_key(user_id), since) {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for row in INVITES.scan_prefix(&*services.db, &user_id.to_owned(), Direction::Forward)? {
        let ((_, room), Json(invite)) = row?;
        if invite.position > since {
            out.push((room, invite));
        }
    }
    Ok(out)
}

/// Keeps a knock sent to another server's room, with the state it answered with.
pub async fn keep_knock(
    services: &Services,
    user_id: &str,
    room_id: &str,
    server: &str,
    knock: &crate::rooms::Pdu,
    knock_room_state: &[Value],
) -> Result<()> {
    let mut state = stripped(knock_room_state);
    state.push(crate::realtime::sync::sync_event(knock));
    keep(services, user_id, room_id, |position| RemoteInvite {
        position,
        event: pdu_json(knock),
        stripped: state,
        membership: "knock".into(),
        server: Some(server.to_owned()),
    })
    .await
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
        origin_server_ts: None,
    };
    let (pdu, hash) = services.timeline.prepare(room_id, event)?;
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
        Error::new(ErrorKind::Upstream, code::UNKNOWN, format!("{server} sent no signed invite"))
    })?;
    let (signed, _) = services.federation.verify_pdu(&rules, &signed).await?;
    if signed.event_id != pdu.event_id {
        return Err(Error::new(
            ErrorKind::Upstream,
            code::UNKNOWN,
            format!("{server} changed the invite event"),
        ));
    }
    let event_id = signed.event_id.clone();
    match services.timeline.accept_remote(room_id, signed, hash, None).await? {
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
    crate::rooms::blocks::refuse_blocked(services, room_id)?;
    let version = RoomVersionId::try_from(room_version)
        .ok()
        .filter(|v| v.rules().is_some())
        .ok_or_else(|| {
            Error::new(
                ErrorKind::BadRequest,
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
        && services.rooms.has_member_from(
            room_id,
            services.server_name(),
            &[MembershipState::Join],
        )?;
    // A room this server is in learns of the invite as any other event, from /send.
    if !resident {
        // Full PDUs (as Matrix 1.16 sends them) or stripped events; clients get the latter.
        let mut state = stripped(&invite_room_state);
        state.push(crate::realtime::sync::sync_event(&signed));
        let event = pdu_json(&signed);
        keep(services, &target, room_id, |position| RemoteInvite {
            position,
            event,
            stripped: state,
            membership: "invite".into(),
            server: Some(origin.to_owned()),
        })
        .await?;
    }
    Ok(pdu_json(&signed))
}

/// The pending invite or knock of a user to a room, if any.
pub fn pending(services: &Services, user_id: &str, room_id: &str) -> Result<Option<RemoteInvite>> {
    let row = INVITES.get(&*services.db, &(user_id.to_owned(), room_id.to_owned()))?;
    Ok(row.map(|j| j.0).filter(RemoteInvite::is_pending))
}

/// Drops a pending invite (the user joined or rejected it).
pub async fn forget(services: &Services, user_id: &str, room_id: &str) -> Result<()> {
    let mut batch = Batch::new();
    INVITES.delete(&mut batch, &(user_id.to_owned(), room_id.to_owned()));
    crate::commit(&services.db, batch).await
}

/// Rejects a pending invite or withdraws a knock: tells the server it came through (best
/// effort), then keeps the leave for the user's syncs.
pub async fn reject(services: &Arc<Services>, user_id: &str, room_id: &str) -> Result<()> {
    let Some(invite) = pending(services, user_id, room_id)? else {
        return Err(Error::not_found("You are not in this room"));
    };
    let server = invite
        .server
        .clone()
        .or_else(|| invite.event["sender"].as_str().and_then(server_of).map(str::to_owned));
    let mut leave = None;
    if let Some(server) = &server {
        match super::membership::leave_remote(services, server, user_id, room_id).await {
            Ok(pdu) => leave = Some(pdu),
            Err(e) => {
                tracing::info!(server, room_id, error = %e.message, "leaving remotely failed");
            }
        }
    }
    // Without the other server's word, the user's clients still learn the room is gone
    // from an event of this server's own making.
    let client_event = match &leave {
        Some(pdu) => crate::realtime::sync::sync_event(pdu),
        None => json!({
            "type": "m.room.member",
            "state_key": user_id,
            "sender": user_id,
            "content": {"membership": "leave"},
            "event_id": format!("${}", crate::random::alphanumeric(43)),
            "origin_server_ts": trellis_core::now_millis(),
            "room_id": room_id,
        }),
    };
    let event = leave.as_ref().map_or_else(|| client_event.clone(), pdu_json);
    keep(services, user_id, room_id, |position| RemoteInvite {
        position,
        event,
        stripped: vec![client_event],
        membership: "leave".into(),
        server,
    })
    .await
}
