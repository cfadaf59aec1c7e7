//! Rooms an admin blocked: no user of this server may join them or be invited to them,
//! whether or not this server knows the room yet.

use trellis_core::{Error, Result};
use trellis_store::{Batch, Table, catalog};

use crate::Services;

/// room id -> the admin who blocked it
const BLOCKED_ROOMS: Table<String, String> = Table::new(&catalog::BLOCKED_ROOMS);

/// Who blocked the room, if it is blocked.
pub fn blocked_by(services: &Services, room_id: &str) -> Result<Option<String>> {
    Ok(BLOCKED_ROOMS.get(&*services.db, &room_id.to_owned())?)
}

/// 403 when the room is blocked on this server.
pub fn refuse_blocked(services: &Services, room_id: &str) -> Result<()> {
    match blocked_by(services, room_id)? {
        Some(_) => Err(Error::forbidden("This room has been blocked on this server")),
        None => Ok(()),
    }
}

/// Adds to `batch` the blocking (by `admin`, a user id) or unblocking of a room.
pub fn set_blocked(batch: &mut Batch, room_id: &str, admin: Option<&str>) {
    match admin {
        Some(admin) => BLOCKED_ROOMS.put(batch, &room_id.to_owned(), &admin.to_owned()),
        None => BLOCKED_ROOMS.delete(batch, &room_id.to_owned()),
    }
}
