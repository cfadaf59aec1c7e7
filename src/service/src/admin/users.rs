//! Accounts as a server admin sees them: listing, details and changes in one call
//! (the shapes of Synapse's admin API, which admin tools speak).

use std::sync::Arc;

use ruma::UserId;
use serde::Serialize;
use trellis_core::{Error, Result};
use trellis_store::{Direction, Json};

use crate::{
    Services,
    accounts::{admin::Flag, moderation::Restriction},
    audit::Client,
    tables::{DEVICES, USERS, UserRecord},
};

/// One account in a listing.
#[derive(Debug, Clone, Serialize)]
pub struct UserSummary {
    pub name: String,
    pub user_type: Option<&'static str>,
    pub is_guest: bool,
    pub admin: bool,
    pub deactivated: bool,
    pub erased: bool,
    pub shadow_banned: bool,
    pub displayname: Option<String>,
    pub avatar_url: Option<String>,
    pub creation_ts: u64,
    pub last_seen_ts: Option<u64>,
    pub locked: bool,
    pub suspended: bool,
    /// Trellis approves every account it creates.
    pub approved: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Threepid {
    pub medium: String,
    pub address: String,
    pub added_at: u64,
    pub validated_at: u64,
}

/// One account in full.
#[derive(Debug, Clone, Serialize)]
pub struct UserDetails {
    #[serde(flatten)]
    pub summary: UserSummary,
    pub threepids: Vec<Threepid>,
    /// Trellis links no accounts of other identity providers.
    pub external_ids: Vec<serde_json::Value>,
    pub appservice_id: Option<String>,
    pub consent_server_notice_sent: Option<String>,
    pub consent_version: Option<String>,
    pub consent_ts: Option<u64>,
}

/// Which accounts a listing shows.
#[derive(Debug, Clone, Default)]
pub struct UserFilter {
    /// A part of the full user id.
    pub user_id: Option<String>,
    /// A part of the localpart or the display name (case-insensitive).
    pub name: Option<String>,
    pub guests: Option<bool>,
    pub admins: Option<bool>,
    pub deactivated: Option<bool>,
    pub locked: Option<bool>,
    pub suspended: Option<bool>,
    pub shadow_banned: Option<bool>,
    /// Account types left out ("bot", or "" for accounts of no type).
    pub not_user_types: Vec<String>,
}

fn keep(filter: Option<bool>, value: bool) -> bool {
    filter.is_none_or(|f| f == value)
}

fn text(value: Option<serde_json::Value>) -> Option<String> {
    value.and_then(|v| v.as_str().map(str::to_owned))
}

/// The local part of `user_id`, for a user of this server.
pub fn local(services: &Services, user_id: &str) -> Result<String> {
    services
        .accounts
        .local_part(user_id)
        .map(str::to_owned)
        .ok_or_else(|| Error::invalid_param("Only users of this server can be managed here"))
}

/// The record of a local user that exists (404 otherwise).
pub fn existing(services: &Services, user_id: &str) -> Result<(String, UserRecord)> {
    let localpart = local(services, user_id)?;
    let user =
        services.accounts.user(&localpart)?.ok_or_else(|| Error::not_found("User not found"))?;
    Ok((localpart, user))
}

fn summary(
    services: &Services,
    erased: &std::collections::HashMap<String, u64>,
    localpart: &str,
    user: &UserRecord,
) -> Result<UserSummary> {
    let name = services.accounts.user_id(localpart);
    let last_seen_ts = DEVICES
        .scan_prefix(&*services.db, &localpart.to_owned(), Direction::Forward)?
        .filter_map(|row| row.ok().and_then(|(_, Json(d))| d.last_seen_ms))
        .max();
    Ok(UserSummary {
        erased: erased.contains_key(&name),
        name,
        user_type: user.bot.then_some("bot"),
        is_guest: user.guest,
        admin: user.admin,
        deactivated: user.deactivated,
        shadow_banned: user.shadow_banned,
        displayname: text(services.profiles.get(localpart, "displayname")?),
        avatar_url: text(services.profiles.get(localpart, "avatar_url")?),
        creation_ts: user.created_ms,
        last_seen_ts,
        locked: user.locked,
        suspended: user.suspended,
        approved: true,
    })
}

/// Every local account `filter` keeps, in user id order.
pub fn list(services: &Services, filter: &UserFilter) -> Result<Vec<UserSummary>> {
    let erased = services.rooms.erasures.snapshot();
    let user_id_part = filter.user_id.as_deref().map(str::to_lowercase);
    let name_part = filter.name.as_deref().map(str::to_lowercase);
    let mut out = Vec::new();
    for row in USERS.scan_prefix(&*services.db, &(), Direction::Forward)? {
        let (localpart, Json(user)) = row?;
        if !(keep(filter.guests, user.guest)
            && keep(filter.admins, user.admin)
            && keep(filter.deactivated, user.deactivated)
            && keep(filter.locked, user.locked)
            && keep(filter.suspended, user.suspended)
            && keep(filter.shadow_banned, user.shadow_banned))
        {
            continue;
        }
        let kind = if user.bot { "bot" } else { "" };
        if filter.not_user_types.iter().any(|t| t == kind) {
            continue;
        }
        let summary = summary(services, &erased, &localpart, &user)?;
        if let Some(part) = &name_part {
            let display = summary.displayname.as_deref().unwrap_or_default().to_lowercase();
            if !localpart.to_lowercase().contains(part) && !display.contains(part) {
                continue;
            }
        } else if let Some(part) = &user_id_part
            && !summary.name.to_lowercase().contains(part)
        {
            continue;
        }
        out.push(summary);
    }
    Ok(out)
}

/// One local account in full (404 when there is none).
pub fn details(services: &Services, user_id: &str) -> Result<UserDetails> {
    let (localpart, user) = existing(services, user_id)?;
    let erased = services.rooms.erasures.snapshot();
    let threepids = services
        .accounts
        .threepids(&localpart)?
        .into_iter()
        .map(|(medium, address, t)| Threepid {
            medium,
            address,
            added_at: t.added_ms,
            validated_at: t.validated_ms,
        })
        .collect();
    let name = services.accounts.user_id(&localpart);
    let appservice_id = services
        .appservices
        .all()
        .iter()
        .find(|reg| reg.claims_user(&name, services.server_name()))
        .map(|reg| reg.id.clone());
    Ok(UserDetails {
        summary: summary(services, &erased, &localpart, &user)?,
        threepids,
        external_ids: Vec::new(),
        appservice_id,
        consent_server_notice_sent: None,
        consent_version: None,
        consent_ts: None,
    })
}

/// What `PUT /_synapse/admin/v2/users/{userId}` changes; absent fields stay as they are.
#[derive(Debug, Clone, Default)]
pub struct UserChange {
    pub password: Option<String>,
    pub logout_devices: bool,
    /// An empty string removes the field.
    pub displayname: Option<String>,
    pub avatar_url: Option<String>,
    /// Replaces every address: (medium, address).
    pub threepids: Option<Vec<(String, String)>>,
    pub admin: Option<bool>,
    pub deactivated: Option<bool>,
    pub locked: Option<bool>,
    /// `Some(None)` clears the type; "bot" is the one type Trellis knows.
    pub user_type: Option<Option<String>>,
}

/// Creates the local account `user_id` or changes it; `true` when it was created.
pub async fn create_or_modify(
    services: &Arc<Services>,
    admin: &str,
    user_id: &UserId,
    change: UserChange,
    client: &Client,
) -> Result<bool> {
    let accounts = &services.accounts;
    let localpart = local(services, user_id.as_str())?;
    if change.deactivated == Some(true) && change.locked == Some(true) {
        return Err(Error::invalid_param("A user cannot be deactivated and locked at once"));
    }
    let bot = match &change.user_type {
        None => None,
        Some(None) => Some(false),
        Some(Some(t)) if t == "bot" => Some(true),
        Some(Some(_)) => return Err(Error::invalid_param("Invalid user type")),
    };
    let emails = match &change.threepids {
        None => None,
        Some(list) => Some(
            list.iter()
                .map(|(medium, address)| match medium.as_str() {
                    "email" => Ok(address.clone()),
                    _ => Err(Error::invalid_param("Only email addresses are supported")),
                })
                .collect::<Result<Vec<_>>>()?,
        ),
    };
    let existing = accounts.user(&localpart)?;
    let created = existing.is_none();
    match &existing {
        None => {
            accounts
                .create_user(
                    &localpart,
                    change.password.clone(),
                    change.admin == Some(true),
                    client,
                )
                .await?;
        }
        Some(user) => {
            let reactivate = user.deactivated && change.deactivated == Some(false);
            if reactivate && change.password.is_none() {
                return Err(Error::invalid_param("A reactivated user needs a password"));
            }
            // The password first: one the policy refuses leaves the account as it was.
            if let Some(password) = change.password.clone() {
                accounts
                    .set_password(&localpart, password, change.logout_devices, None, client)
                    .await?;
            }
            if reactivate {
                accounts.reactivate(admin, &localpart, client).await?;
            }
            if let Some(on) = change.admin
                && on != user.admin
            {
                accounts.set_flag(admin, &localpart, Flag::Admin, on, client).await?;
            }
        }
    }
    if let Some(on) = bot {
        accounts.set_flag(admin, &localpart, Flag::Bot, on, client).await?;
    }
    for (field, value) in [("displayname", &change.displayname), ("avatar_url", &change.avatar_url)]
    {
        if let Some(value) = value {
            let value = (!value.is_empty()).then(|| serde_json::Value::from(value.as_str()));
            crate::accounts::profile::update_field(services, user_id, field, value).await?;
        }
    }
    if let Some(emails) = emails {
        accounts.replace_emails(admin, &localpart, &emails, client).await?;
    }
    if let Some(on) = change.locked {
        let current = accounts.user(&localpart)?.is_some_and(|u| u.locked);
        if on != current {
            accounts.restrict(admin, user_id.as_str(), Restriction::Lock, on, client).await?;
        }
    }
    if change.deactivated == Some(true) && existing.is_none_or(|u| !u.deactivated) {
        crate::accounts::deactivation::deactivate(services, &localpart, false, client).await?;
    }
    Ok(created)
}

/// All of a user's account data: global, and per room.
pub fn account_data(
    services: &Services,
    localpart: &str,
) -> Result<(serde_json::Map<String, serde_json::Value>, serde_json::Map<String, serde_json::Value>)>
{
    let (mut global, mut rooms) = (serde_json::Map::new(), serde_json::Map::new());
    let rows = crate::tables::ACCOUNT_DATA.scan_prefix(
        &*services.db,
        &localpart.to_owned(),
        Direction::Forward,
    )?;
    for row in rows {
        let ((_, room, kind), Json(content)) = row?;
        if room.is_empty() {
            global.insert(kind, content);
        } else if let serde_json::Value::Object(of_room) =
            rooms.entry(room).or_insert_with(|| serde_json::Value::Object(serde_json::Map::new()))
        {
            of_room.insert(kind, content);
        }
    }
    Ok((global, rooms))
}

/// The user's membership of every room they have one in (join, invite, leave, ban,
/// knock).
pub fn memberships(services: &Services, user_id: &str) -> Result<Vec<(String, String)>> {
    Ok(services
        .rooms
        .user_rooms(user_id)?
        .into_iter()
        .map(|r| (r.room_id, r.membership.to_string()))
        .collect())
}
