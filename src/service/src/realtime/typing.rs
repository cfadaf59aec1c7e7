//! Typing notifications: in memory only (they are worthless after a restart), each
//! change taking a stream position so that waiting syncs wake and deliver it, expiry
//! included.

use ruma::{RoomId, UserId};
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use trellis_core::Result;

use crate::{Services, federation::edus, rooms::stream::StreamPositions};

/// Clients ask for timeouts; none lasts longer than this.
const MAX_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Default)]
struct Room {
    /// Typing users and when their notification lapses.
    users: HashMap<String, Instant>,
    /// Stream position of the last change.
    changed_at: u64,
}

pub struct Typing {
    rooms: Mutex<HashMap<String, Room>>,
    stream: Arc<StreamPositions>,
}

impl Typing {
    pub fn new(stream: Arc<StreamPositions>) -> Arc<Self> {
        Arc::new(Self { rooms: Mutex::default(), stream })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Room>> {
        self.rooms.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts (with a timeout) or stops `user` typing in `room_id`.
    pub fn set(self: &Arc<Self>, room_id: &str, user: &str, timeout: Option<Duration>) {
        let ticket = self.stream.dispatch();
        {
            let mut rooms = self.lock();
            let room = rooms.entry(room_id.to_owned()).or_default();
            match timeout {
                Some(t) => {
                    room.users.insert(user.to_owned(), Instant::now() + t.min(MAX_TIMEOUT));
                }
                None => {
                    room.users.remove(user);
                }
            }
            room.changed_at = ticket.position;
        }
        self.publish(ticket, room_id);
        if let Some(t) = timeout {
            // Lapsing is a change too: syncs must learn that the user stopped.
            let this = self.clone();
            let (room_id, user) = (room_id.to_owned(), user.to_owned());
            tokio::spawn(async move {
                tokio::time::sleep(t.min(MAX_TIMEOUT) + Duration::from_millis(10)).await;
                this.expire(&room_id, &user);
            });
        }
    }

    fn expire(&self, room_id: &str, user: &str) {
        let now = Instant::now();
        let lapsed = {
            let rooms = self.lock();
            rooms.get(room_id).and_then(|r| r.users.get(user)).is_some_and(|until| *until <= now)
        };
        if !lapsed {
            return;
        }
        let ticket = self.stream.dispatch();
        {
            let mut rooms = self.lock();
            if let Some(room) = rooms.get_mut(room_id) {
                room.users.retain(|_, until| *until > now);
                // The record stays even when empty: syncs must see the empty list once.
                room.changed_at = ticket.position;
            }
        }
        self.publish(ticket, room_id);
    }

    /// Retires a change's position and wakes the room's syncs once it is visible: a sync
    /// woken while an earlier write is in flight would find nothing below it and wait
    /// again with the wake-up spent.
    fn publish(&self, ticket: crate::rooms::stream::Ticket, room_id: &str) {
        let retired = self.stream.retire(ticket);
        self.stream.wake_for(retired, room_id);
    }

    /// Who is typing in `room_id`, if that changed after position `since`.
    pub fn changed_since(&self, room_id: &str, since: u64) -> Option<Vec<String>> {
        let rooms = self.lock();
        let room = rooms.get(room_id)?;
        if room.changed_at <= since {
            return None;
        }
        let now = Instant::now();
        let mut users: Vec<String> =
            room.users.iter().filter(|(_, until)| **until > now).map(|(u, _)| u.clone()).collect();
        users.sort();
        Some(users)
    }
}

/// `user_id` starts (for `timeout`) or stops (`None`) typing in `room_id`, which they
/// must be in: the room's syncs here learn it at once, the other servers in the room by
/// an EDU.
pub async fn set_typing(
    services: &Arc<Services>,
    room_id: &RoomId,
    user_id: &UserId,
    timeout: Option<Duration>,
) -> Result<()> {
    crate::rooms::viewer::require_joined(services, room_id, user_id)?;
    if services.accounts.shadow_banned(user_id.localpart())? {
        return Ok(());
    }
    let (room_id, user_id) = (room_id.as_str(), user_id.as_str());
    services.typing.set(room_id, user_id, timeout);
    services.appservice_delivery.typing_changed(services, room_id);
    // The local change stands whether or not the other servers can be told.
    if let Err(e) = edus::typing(services, room_id, user_id, timeout.is_some()).await {
        tracing::warn!(error = %e, "queueing an EDU for federation failed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn typing_starts_stops_and_lapses() {
        let stream = Arc::new(StreamPositions::new(0));
        let typing = Typing::new(stream.clone());
        typing.set("!r:x", "@a:x", Some(Duration::from_millis(50)));
        let after_start = stream.visible();
        assert_eq!(typing.changed_since("!r:x", 0), Some(vec!["@a:x".to_owned()]));
        assert_eq!(typing.changed_since("!r:x", after_start), None);
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(stream.visible() > after_start, "lapsing moves the stream");
        assert_eq!(typing.changed_since("!r:x", after_start), Some(vec![]));
        typing.set("!r:x", "@b:x", Some(Duration::from_secs(30)));
        typing.set("!r:x", "@b:x", None);
        assert_eq!(typing.changed_since("!r:x", 0), Some(vec![]));
    }
}
