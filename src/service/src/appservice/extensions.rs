//! What a transaction carries besides the queued events, computed when it is built:
//! presence of the users a service's users share a room with (MSC2409, with
//! `receive_ephemeral`), and for encrypted bridges (MSC3202) device list changes,
//! one-time key counts and unused fallback key types of its users' devices.
//!
//! Presence and device lists are read as changes between two stream positions, like a
//! sync: the service's position is kept in memory and stored once a transaction that
//! carried it is acknowledged, so a restart recomputes from the last acknowledged one.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::{Map, Value, json};
use trellis_core::Result;
use trellis_store::{Batch, Table, catalog};

use super::Registration;
use crate::{
    Services,
    e2ee::device_lists::{self, DeviceLists, Viewer},
};

/// service id -> stream position sent up to
const CURSORS: Table<String, u64> = Table::new(&catalog::APPSERVICE_CURSORS);

/// The wake-up key under which presence and device key changes are announced (see
/// `Rooms::wake_co_members`): services that follow them wait on it too.
pub const CO_MEMBER_CHANGES_KEY: &str = "*co_member_changes";

/// Whether the service follows presence or device lists at all.
pub fn follows_changes(reg: &Registration) -> bool {
    reg.url.is_some() && (reg.receive_ephemeral || reg.msc3202)
}

/// A service's users, as the device list computation follows them: this server's users
/// in its namespaces, and the rooms they are joined to (read once per room).
struct ServiceUsers<'a> {
    reg: &'a Registration,
    server: &'a str,
    rooms: HashMap<String, bool>,
}

impl Viewer for ServiceUsers<'_> {
    fn is_me(&self, user: &str) -> bool {
        user.rsplit_once(':').is_some_and(|(_, server)| server == self.server)
            && self.reg.claims_user(user, self.server)
    }

    fn in_room(&mut self, services: &Services, room: &str) -> Result<bool> {
        if let Some(&known) = self.rooms.get(room) {
            return Ok(known);
        }
        let members = services.rooms.joined_members(room)?;
        let joined = members.iter().any(|m| self.is_me(m));
        self.rooms.insert(room.to_owned(), joined);
        Ok(joined)
    }
}

/// Presence and device list changes since the service's last transaction.
#[derive(Default)]
pub struct Changes {
    pub presence: Vec<Value>,
    pub device_lists: DeviceLists,
    /// The position they were read up to: the service's cursor once it takes them.
    pub upto: Option<u64>,
}

/// Reads the changes after the service's cursor. `cursor` is the position held in
/// memory, if any; a service seen for the first time starts from now.
pub fn changes(services: &Services, reg: &Registration, cursor: Option<u64>) -> Result<Changes> {
    if !follows_changes(reg) {
        return Ok(Changes::default());
    }
    let now = services.rooms.stream.visible();
    let since = match cursor {
        Some(position) => position,
        None => CURSORS.get(&*services.db, &reg.id)?.unwrap_or(now),
    };
    let mut out = Changes { upto: Some(now), ..Changes::default() };
    if since >= now {
        return Ok(out);
    }
    let mut users = ServiceUsers { reg, server: services.server_name(), rooms: HashMap::new() };
    if reg.receive_ephemeral && services.presence.enabled() {
        for user in services.presence.changed_since(since) {
            if !users.shares_a_room(services, &user)? {
                continue;
            }
            if let Some(content) = services.presence.presence_content(&user) {
                out.presence
                    .push(json!({"type": "m.presence", "sender": user, "content": content}));
            }
        }
    }
    if reg.msc3202 {
        out.device_lists = device_lists::changes_for(services, &mut users, since, now)?;
    }
    Ok(out)
}

/// Stores the position a service has taken the changes up to.
pub fn store_cursor(batch: &mut Batch, id: &str, position: u64) {
    CURSORS.put(batch, &id.to_owned(), &position);
}

/// Forgets a removed service's position.
pub fn forget_cursor(batch: &mut Batch, id: &str) {
    CURSORS.delete(batch, &id.to_owned());
}

/// MSC3202's key fields for the service's users named in a transaction (senders and
/// subjects of its events, recipients of its to-device messages, and its users whose
/// device lists changed): every device of each, with its one-time key counts and the
/// algorithms of its unused fallback keys. A bridge encrypting as its users learns this
/// way when to upload more keys, as a client learns it from sync.
pub fn key_counts(
    services: &Services,
    reg: &Registration,
    events: &[Value],
    to_device: &[Value],
    device_lists: &DeviceLists,
) -> Result<Option<(Value, Value)>> {
    if !reg.msc3202 {
        return Ok(None);
    }
    let server = services.server_name();
    let named = events
        .iter()
        .flat_map(|e| [&e["sender"], &e["state_key"]])
        .chain(to_device.iter().map(|m| &m["to_user_id"]))
        .filter_map(Value::as_str)
        .chain(device_lists.changed.iter().map(String::as_str));
    let mine: BTreeSet<&str> = named
        .filter(|u| {
            u.starts_with('@')
                && u.rsplit_once(':').is_some_and(|(_, s)| s == server)
                && reg.claims_user(u, server)
        })
        .collect();
    let (mut counts, mut fallbacks) = (Map::new(), Map::new());
    for user in mine {
        let Some(localpart) = services.accounts.local_part(user) else { continue };
        let (mut user_counts, mut user_fallbacks) = (BTreeMap::new(), BTreeMap::new());
        for device in services.accounts.devices(localpart)? {
            let id = device.device_id;
            user_counts.insert(id.clone(), services.e2ee.one_time_key_counts(localpart, &id)?);
            user_fallbacks
                .insert(id.clone(), services.e2ee.unused_fallback_key_types(localpart, &id)?);
        }
        if !user_counts.is_empty() {
            counts.insert(user.to_owned(), json!(user_counts));
            fallbacks.insert(user.to_owned(), json!(user_fallbacks));
        }
    }
    if counts.is_empty() {
        return Ok(None);
    }
    Ok(Some((Value::Object(counts), Value::Object(fallbacks))))
}
