//! Room aliases on this server: `#name:server` -> room id, with the user who made each.

use serde::{Deserialize, Serialize};
use trellis_core::{Error, ErrorKind, Result, error::code};
use trellis_store::{Batch, Db, Direction, Json, Table, catalog};

use crate::commit;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AliasRecord {
    pub room_id: String,
    /// Localpart of the user who created the alias (who may delete it).
    pub creator: String,
}

const ALIASES: Table<String, Json<AliasRecord>> = Table::new(&catalog::ALIASES);
const ROOM_ALIASES: Table<(String, String), ()> = Table::new(&catalog::ROOM_ALIASES);

pub struct Aliases {
    db: Db,
    server_name: String,
    /// Serialises check-then-set so two clients cannot take one alias.
    lock: tokio::sync::Mutex<()>,
}

impl Aliases {
    pub fn new(db: Db, server_name: String) -> Self {
        Self { db, server_name, lock: tokio::sync::Mutex::new(()) }
    }

    /// Checks that an alias belongs to this server and returns it normalised.
    pub fn local_alias(&self, alias: &str) -> Result<String> {
        let Some((local, server)) = alias.strip_prefix('#').and_then(|a| a.split_once(':')) else {
            return Err(Error::invalid_param("Not a room alias"));
        };
        if server != self.server_name {
            return Err(Error::invalid_param("Room aliases must be on this server"));
        }
        if local.is_empty()
            || local.chars().any(|c| c.is_whitespace() || c == ':' || c == '#')
            || alias.len() > 255
        {
            return Err(Error::invalid_param("Invalid room alias"));
        }
        Ok(alias.to_owned())
    }

    pub fn resolve(&self, alias: &str) -> Result<Option<AliasRecord>> {
        Ok(ALIASES.get(&*self.db, &alias.to_owned())?.map(|j| j.0))
    }

    pub fn is_free(&self, alias: &str) -> Result<bool> {
        Ok(!ALIASES.contains(&*self.db, &alias.to_owned())?)
    }

    pub async fn set(&self, alias: &str, room_id: &str, creator: &str) -> Result<()> {
        let alias = self.local_alias(alias)?;
        let _guard = self.lock.lock().await;
        if !self.is_free(&alias)? {
            return Err(Error::new(
                ErrorKind::Conflict,
                code::UNKNOWN,
                "This room alias is already in use",
            ));
        }
        let mut batch = Batch::new();
        ALIASES.put(
            &mut batch,
            &alias,
            &Json(AliasRecord { room_id: room_id.to_owned(), creator: creator.to_owned() }),
        );
        ROOM_ALIASES.put(&mut batch, &(room_id.to_owned(), alias.clone()), &());
        commit(&self.db, batch).await
    }

    pub async fn delete(&self, alias: &str) -> Result<()> {
        let _guard = self.lock.lock().await;
        let record =
            self.resolve(alias)?.ok_or_else(|| Error::not_found("Room alias not found"))?;
        let mut batch = Batch::new();
        ALIASES.delete(&mut batch, &alias.to_owned());
        ROOM_ALIASES.delete(&mut batch, &(record.room_id, alias.to_owned()));
        commit(&self.db, batch).await
    }

    /// Points every alias of `from` at `to` (a room upgrade), in one batch.
    pub async fn move_room(&self, from: &str, to: &str) -> Result<()> {
        let _guard = self.lock.lock().await;
        let mut batch = Batch::new();
        for alias in self.of_room(from)? {
            let Some(mut record) = self.resolve(&alias)? else { continue };
            record.room_id = to.to_owned();
            ALIASES.put(&mut batch, &alias, &Json(record));
            ROOM_ALIASES.delete(&mut batch, &(from.to_owned(), alias.clone()));
            ROOM_ALIASES.put(&mut batch, &(to.to_owned(), alias), &());
        }
        commit(&self.db, batch).await
    }

    pub fn of_room(&self, room_id: &str) -> Result<Vec<String>> {
        ROOM_ALIASES
            .scan_prefix(&*self.db, &room_id.to_owned(), Direction::Forward)?
            .map(|e| e.map(|((_, alias), ())| alias).map_err(Into::into))
            .collect()
    }
}

/// `DELETE /directory/room/{roomAlias}` (permission checked by the caller): the alias
/// goes, and if the room's `m.room.canonical_alias` names it (as `alias` or among
/// `alt_aliases`), `user` sends it again without it, so that the room is no longer found
/// by it. Without the power to send that event, the alias still goes.
pub async fn delete_alias(
    services: &crate::Services,
    user: &ruma::UserId,
    alias: &str,
) -> Result<()> {
    let record =
        services.aliases.resolve(alias)?.ok_or_else(|| Error::not_found("Room alias not found"))?;
    services.aliases.delete(alias).await?;
    let Some(current) = services.rooms.state_of(&record.room_id, "m.room.canonical_alias", "")?
    else {
        return Ok(());
    };
    let mut content: serde_json::Value =
        serde_json::from_str(current.content.get()).unwrap_or_default();
    let mut changed = false;
    if content["alias"].as_str() == Some(alias) {
        if let Some(map) = content.as_object_mut() {
            map.remove("alias");
        }
        changed = true;
    }
    if let Some(alt) = content["alt_aliases"].as_array_mut() {
        let before = alt.len();
        alt.retain(|a| a.as_str() != Some(alias));
        changed |= alt.len() != before;
    }
    if !changed {
        return Ok(());
    }
    let Ok(room_id) = ruma::RoomId::parse(&record.room_id) else { return Ok(()) };
    let kind = "m.room.canonical_alias".to_owned();
    let sent = super::send::state(services, user, None, &room_id, kind, String::new(), content);
    if let Err(e) = sent.await {
        tracing::info!(alias, error = %e, "the room's canonical alias still names a deleted alias");
    }
    Ok(())
}

/// `GET /rooms/{roomId}/aliases`: the room's local aliases, for its members and for
/// server admins (whose tools list the rooms of the users they manage).
pub fn listed_for(
    services: &crate::Services,
    user: &str,
    room_id: &ruma::RoomId,
) -> Result<Vec<String>> {
    let admin = services
        .accounts
        .local_part(user)
        .and_then(|lp| services.accounts.user(lp).ok().flatten())
        .is_some_and(|u| u.admin);
    if !admin {
        let user = ruma::UserId::parse(user).map_err(|e| Error::internal("user id", e))?;
        super::viewer::require_joined(services, room_id, &user)?;
    }
    services.aliases.of_room(room_id.as_str())
}
