//! Guests in rooms (the spec's guest access module): a guest joins only a room whose
//! `m.room.guest_access` is `can_join`, and leaves every room that stops allowing it.

use std::sync::{Arc, OnceLock, Weak};

use async_trait::async_trait;
use ruma::{OwnedRoomId, UserId, events::TimelineEventType};
use tracing::Instrument;
use trellis_core::Result;

use super::{Rooms, membership};
use crate::{
    Services,
    pipeline::{Appended, Consumer},
};

/// Whether the room's current state admits guests.
pub fn admitted(rooms: &Rooms, room_id: &str) -> Result<bool> {
    let Some(event) = rooms.state_of(room_id, "m.room.guest_access", "")? else {
        return Ok(false);
    };
    let content: serde_json::Value = serde_json::from_str(event.content.get()).unwrap_or_default();
    Ok(content["guest_access"] == "can_join")
}

/// The pipeline step that has this server's guests leave a room once its guest access
/// is withdrawn. The leaves are events of their own, so they are sent from a task of
/// their own, after the event that caused them.
#[derive(Default)]
pub struct GuestEviction {
    services: OnceLock<Weak<Services>>,
}

impl GuestEviction {
    /// Connects the step to the services it sends through, once they exist.
    pub fn attach(&self, services: &Arc<Services>) {
        let _ = self.services.set(Arc::downgrade(services));
    }
}

#[async_trait]
impl Consumer for GuestEviction {
    fn name(&self) -> &'static str {
        "guest_eviction"
    }

    async fn on_event(&self, event: &Appended<'_>) -> Result<Option<u64>> {
        let pdu = event.pdu;
        if pdu.kind != TimelineEventType::RoomGuestAccess
            || pdu.state_key.as_deref() != Some("")
            || pdu.rejected
        {
            return Ok(None);
        }
        let Some(services) = self.services.get().and_then(Weak::upgrade) else { return Ok(None) };
        let room_id = event.room_id.to_owned();
        let span = tracing::info_span!("guest_eviction", %room_id);
        tokio::spawn(
            async move {
                if let Err(e) = evict(&services, room_id).await {
                    tracing::warn!(error = %e, "guests could not be made to leave");
                }
            }
            .instrument(span),
        );
        Ok(None)
    }
}

/// Has every joined guest of this server leave `room_id`, unless the room (by now)
/// admits guests.
async fn evict(services: &Arc<Services>, room_id: OwnedRoomId) -> Result<()> {
    if admitted(&services.rooms, room_id.as_str())? {
        return Ok(());
    }
    let members = services.rooms.joined_members(room_id.as_str())?;
    for member in members.iter() {
        let Some(localpart) = services.accounts.local_part(member) else { continue };
        if !services.accounts.is_guest(localpart)? {
            continue;
        }
        let Ok(user) = UserId::parse(member.as_str()) else { continue };
        membership::leave(services, &user, &room_id, None).await?;
        tracing::info!(user = %user, "guest left a room that no longer admits guests");
    }
    Ok(())
}
