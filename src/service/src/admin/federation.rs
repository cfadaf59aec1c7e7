//! Other servers as admins see them: how sending to each goes, and the rooms shared.

use ruma::events::room::member::MembershipState;
use trellis_core::{Error, Result};

use crate::{Services, federation::sender::Destination};

/// Every destination this server sent to since start-up or has items queued for.
pub fn destinations(services: &Services) -> Result<Vec<Destination>> {
    services.federation.outbox.destinations()
}

/// One destination (404 when this server has had nothing to do with it).
pub fn destination(services: &Services, name: &str) -> Result<Destination> {
    destinations(services)?
        .into_iter()
        .find(|d| d.destination == name)
        .ok_or_else(|| Error::not_found("Unknown destination"))
}

/// The rooms where one of `server`'s users is joined, by room id.
pub fn shared_rooms(services: &Services, server: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for (_, room_id) in services.rooms.rooms_with_events_after(0)? {
        if services.rooms.has_member_from(&room_id, server, &[MembershipState::Join])? {
            out.push(room_id);
        }
    }
    out.sort();
    Ok(out)
}

/// Ends a destination's backoff so that its queue is retried now (400 when it is not
/// backing off).
pub fn reset_connection(services: &Services, name: &str) -> Result<()> {
    destination(services, name)?;
    if services.federation.outbox.reset_backoff(name) {
        Ok(())
    } else {
        Err(Error::invalid_param("The retry timing does not need to be reset for this destination"))
    }
}
