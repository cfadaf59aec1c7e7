//! Outbound EDUs: what this server's users do that other servers in their rooms must
//! hear of without it being part of the room DAG: typing, read receipts, presence,
//! to-device messages, and device list changes.

use ruma::events::room::member::MembershipState;
use std::{collections::BTreeSet, sync::Arc};

use serde_json::{Value, json};
use trellis_core::{Result, now_millis};

use super::sender::{room_servers, send_edu};
use crate::{Services, e2ee::to_device::RemoteMessages};

fn edu(kind: &str, content: Value) -> Value {
    json!({ "edu_type": kind, "content": content })
}

/// The other servers sharing at least one room with `user_id`.
fn servers_sharing(services: &Services, user_id: &str) -> Result<Vec<String>> {
    let mut servers = BTreeSet::new();
    for room in services.rooms.rooms_of(user_id, &MembershipState::Join)? {
        servers.extend(room_servers(&services.federation, &services.rooms, &room)?.iter().cloned());
    }
    Ok(servers.into_iter().collect())
}

pub async fn typing(
    services: &Arc<Services>,
    room_id: &str,
    user_id: &str,
    typing: bool,
) -> Result<()> {
    let servers = room_servers(&services.federation, &services.rooms, room_id)?;
    let content = json!({ "room_id": room_id, "user_id": user_id, "typing": typing });
    send_edu(&services.federation, &servers, edu("m.typing", content)).await
}

/// A public read receipt (private ones never leave the server).
pub async fn read_receipt(
    services: &Arc<Services>,
    room_id: &str,
    user_id: &str,
    event_id: &str,
    thread: Option<&str>,
) -> Result<()> {
    let servers = room_servers(&services.federation, &services.rooms, room_id)?;
    let mut data = json!({ "ts": now_millis() });
    if let Some(thread) = thread {
        data["thread_id"] = json!(thread);
    }
    let content = json!({
        room_id: { "m.read": { user_id: { "event_ids": [event_id], "data": data } } }
    });
    send_edu(&services.federation, &servers, edu("m.receipt", content)).await
}

/// A user's presence, to every server sharing a room with them.
pub async fn presence(services: &Arc<Services>, user_id: &str) -> Result<()> {
    let Some(mut content) = services.presence.presence_content(user_id) else { return Ok(()) };
    content["user_id"] = json!(user_id);
    let servers = servers_sharing(services, user_id)?;
    send_edu(&services.federation, &servers, edu("m.presence", json!({ "push": [content] }))).await
}

/// To-device messages for other servers' users, one EDU per server.
pub async fn to_device(
    services: &Arc<Services>,
    sender: &str,
    event_type: &str,
    message_id: &str,
    remote: RemoteMessages,
) -> Result<()> {
    for (server, messages) in remote {
        let content = json!({
            "sender": sender,
            "type": event_type,
            "message_id": message_id,
            "messages": messages,
        });
        send_edu(&services.federation, &[server], edu("m.direct_to_device", content)).await?;
    }
    Ok(())
}

/// A user's devices or keys changed: other servers re-fetch them (`prev_id` is left
/// empty, which tells them to resynchronise the whole list from `/user/devices`).
pub async fn device_list_update(
    services: &Arc<Services>,
    user_id: &str,
    device_id: &str,
    deleted: bool,
) -> Result<()> {
    let servers = servers_sharing(services, user_id)?;
    let content = json!({
        "user_id": user_id,
        "device_id": device_id,
        "stream_id": now_millis(),
        "prev_id": [],
        "deleted": deleted,
    });
    send_edu(&services.federation, &servers, edu("m.device_list_update", content)).await
}

/// Logs a failure to queue something for other servers: the local action it follows
/// has succeeded and must not fail because of it.
pub fn logged(result: Result<()>) {
    if let Err(e) = result {
        tracing::warn!(error = %e, "queueing an EDU for federation failed");
    }
}

/// Tells the servers sharing a room with `user_id` that their devices or keys changed
/// (best effort: see [`logged`]).
pub async fn device_changed(
    services: &Arc<Services>,
    user_id: &str,
    device_id: &str,
    deleted: bool,
) {
    logged(device_list_update(services, user_id, device_id, deleted).await);
}
