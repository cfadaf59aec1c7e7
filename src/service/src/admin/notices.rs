//! Server notices: messages from the server to one of its users, in a room of their own
//! with the notices account (`admin.notices_localpart`), tagged `m.server_notice` so that
//! clients can show it apart.

use std::sync::Arc;

use ruma::{
    OwnedEventId, OwnedRoomId, RoomId, TransactionId, UserId, events::room::member::MembershipState,
};
use serde_json::{Value, json};
use trellis_core::{Error, Result};

use crate::{
    Services,
    rooms::{create, send},
};

const NOTICE_TAG: &str = "m.server_notice";

/// A notice's event: a message, or state when `state_key` is set.
#[derive(Debug, Clone)]
pub struct Notice {
    pub kind: String,
    pub state_key: Option<String>,
    pub content: Value,
}

/// Sends `notice` to the local user `target` (the admin's `txn_id` makes a retry send
/// nothing new); returns the event's id.
pub async fn send_notice(
    services: &Arc<Services>,
    target: &UserId,
    notice: Notice,
    txn_id: &TransactionId,
) -> Result<OwnedEventId> {
    let localpart = services
        .accounts
        .local_part(target.as_str())
        .ok_or_else(|| Error::invalid_param("Server notices can only be sent to local users"))?;
    match services.accounts.user(localpart)? {
        Some(user) if !user.deactivated => {}
        _ => return Err(Error::not_found("User not found")),
    }
    let notices = notices_user(services).await?;
    let room = room_for(services, &notices, target).await?;
    match notice.state_key {
        Some(key) => {
            send::state(services, &notices, None, &room, notice.kind, key, notice.content).await
        }
        None => {
            let device: &ruma::DeviceId = "".into();
            let sender = send::Sender { user: &notices, device, ts: None };
            send::message(services, sender, &room, notice.kind, notice.content, txn_id).await
        }
    }
}

/// Whether `room_id` is the server notices room of `user`, a live account (tagged so
/// for them, with the notices account in it).
pub fn is_notice_room(services: &Services, user: &UserId, room_id: &RoomId) -> Result<bool> {
    // A deactivated account leaves every room, this one too.
    match services.accounts.local_part(user.as_str()) {
        Some(localpart) if services.accounts.user(localpart)?.is_some_and(|u| !u.deactivated) => {}
        _ => return Ok(false),
    }
    let tagged = services
        .account_data
        .tags(user.localpart(), room_id)?
        .keys()
        .any(|tag| tag.as_ref() == NOTICE_TAG);
    if !tagged {
        return Ok(false);
    }
    let notices = services.accounts.user_id(&services.config.admin.notices_localpart);
    Ok(services.rooms.membership(room_id.as_str(), &notices)? == Some(MembershipState::Join))
}

/// The notices account, made (with its display name) when first needed.
async fn notices_user(services: &Services) -> Result<ruma::OwnedUserId> {
    let config = &services.config.admin;
    let localpart = config.notices_localpart.as_str();
    if services.accounts.user(localpart)?.is_none() {
        services.accounts.ensure_service_user(localpart).await?;
        let name = Value::from(config.notices_display_name.as_str());
        services.profiles.set(localpart, "displayname", name).await?;
    }
    UserId::parse(services.accounts.user_id(localpart)).map_err(|e| Error::internal("user id", e))
}

/// The room `target` gets notices in: one the notices account is joined to and the user
/// is joined or invited to, else a new one.
async fn room_for(
    services: &Arc<Services>,
    notices: &UserId,
    target: &UserId,
) -> Result<OwnedRoomId> {
    let rooms = &services.rooms;
    for state in [MembershipState::Join, MembershipState::Invite] {
        for room in rooms.rooms_of(target.as_str(), &state)? {
            if rooms.membership(&room, notices.as_str())? == Some(MembershipState::Join)
                && let Ok(room) = RoomId::parse(room)
            {
                return Ok(room);
            }
        }
    }
    let request = create::CreateRoomRequest {
        preset: Some("private_chat".to_owned()),
        name: Some(services.config.admin.notices_room_name.clone()),
        invite: vec![target.to_owned()],
        // The user reads; only the server speaks.
        power_level_override: Some(json!({"users_default": -10})),
        ..Default::default()
    };
    let room = create::create_room(services, notices, request).await?;
    services.account_data.put_tag(target.localpart(), &room, NOTICE_TAG, None).await?;
    Ok(room)
}
