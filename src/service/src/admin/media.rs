//! Media as a server admin manages it: per user and per room, quarantine and protection,
//! clean-ups by age and size, and who stores how much.

use std::collections::BTreeMap;

use serde::Serialize;
use trellis_core::{Error, Result};
use trellis_store::{Direction, Json};

use crate::{
    Services,
    tables::{MEDIA, MediaRecord},
};

/// A media item as admin tools show it.
#[derive(Debug, Clone, Serialize)]
pub struct MediaSummary {
    pub media_id: String,
    pub media_type: Option<String>,
    pub media_length: u64,
    pub upload_name: Option<String>,
    pub created_ts: u64,
    /// Trellis does not track downloads.
    pub last_access_ts: Option<u64>,
    pub quarantined_by: Option<String>,
    pub safe_from_quarantine: bool,
    pub user_id: Option<String>,
    pub sha256: Option<String>,
}

impl MediaSummary {
    fn new(services: &Services, media_id: String, record: MediaRecord) -> Self {
        let user_id = (!record.owner.is_empty()).then(|| services.accounts.user_id(&record.owner));
        Self {
            media_id,
            media_type: record.content_type,
            media_length: record.size,
            upload_name: record.filename,
            created_ts: record.created_ms,
            last_access_ts: None,
            quarantined_by: record.quarantined.then(|| {
                record.quarantined_by.unwrap_or_else(|| services.server_name().to_owned())
            }),
            safe_from_quarantine: record.protected,
            user_id,
            sha256: record.sha256,
        }
    }
}

/// Every media item stored under `server` (this server's uploads, or another server's
/// cached copies) that `keep` keeps.
fn scan(
    services: &Services,
    server: &str,
    mut keep: impl FnMut(&MediaRecord) -> bool,
) -> Result<Vec<(String, MediaRecord)>> {
    let mut out = Vec::new();
    for row in MEDIA.scan_prefix(&*services.db, &server.to_owned(), Direction::Forward)? {
        let ((_, id), Json(record)) = row?;
        if record.sha256.is_some() && keep(&record) {
            out.push((id, record));
        }
    }
    Ok(out)
}

/// The media a local user uploaded.
pub fn of_user(services: &Services, localpart: &str) -> Result<Vec<MediaSummary>> {
    Ok(scan(services, services.server_name(), |r| r.owner == localpart)?
        .into_iter()
        .map(|(id, record)| MediaSummary::new(services, id, record))
        .collect())
}

/// One item's details (404 when there is none).
pub fn info(services: &Services, server: &str, id: &str) -> Result<MediaSummary> {
    let record = services.media.info(server, id)?;
    if record.sha256.is_none() {
        return Err(Error::not_found("Unknown media"));
    }
    Ok(MediaSummary::new(services, id.to_owned(), record))
}

/// Deletes the given local items; returns those deleted.
pub async fn delete(services: &Services, ids: Vec<String>) -> Result<Vec<String>> {
    let mut deleted = Vec::new();
    for id in ids {
        services.media.delete(services.server_name(), &id).await?;
        deleted.push(id);
    }
    Ok(deleted)
}

/// Deletes local media created before `before_ms` and larger than `size_gt` bytes;
/// with `keep_profiles`, media used as a local user's avatar is kept.
pub async fn delete_old(
    services: &Services,
    before_ms: u64,
    size_gt: u64,
    keep_profiles: bool,
) -> Result<Vec<String>> {
    let avatars = if keep_profiles { avatars(services)? } else { Default::default() };
    let ids = scan(services, services.server_name(), |r| {
        r.created_ms < before_ms && r.size > size_gt && !r.protected
    })?
    .into_iter()
    .map(|(id, _)| id)
    .filter(|id| !avatars.contains(&format!("mxc://{}/{id}", services.server_name())))
    .collect();
    delete(services, ids).await
}

/// Every avatar URI of this server's users' profiles.
pub(crate) fn avatars(services: &Services) -> Result<std::collections::HashSet<String>> {
    let mut out = std::collections::HashSet::new();
    for row in crate::tables::PROFILES.scan_prefix(&*services.db, &(), Direction::Forward)? {
        let ((_, field), Json(value)) = row?;
        if field == "avatar_url"
            && let Some(uri) = value.as_str()
        {
            out.insert(uri.to_owned());
        }
    }
    Ok(out)
}

/// Removes cached copies of other servers' media made before `before_ms`; returns how
/// many went.
pub async fn purge_remote_cache(services: &Services, before_ms: u64) -> Result<usize> {
    let mut servers = Vec::new();
    for row in MEDIA.scan_prefix(&*services.db, &(), Direction::Forward)? {
        let ((server, id), Json(record)) = row?;
        if server != services.server_name() && record.created_ms < before_ms {
            servers.push((server, id));
        }
    }
    for (server, id) in &servers {
        services.media.delete(server, id).await?;
    }
    Ok(servers.len())
}

/// Quarantines (by `admin`, a user id) every unprotected media item in `uris`
/// (`mxc://server/id`) that this server holds; returns how many it quarantined.
pub async fn quarantine_uris(services: &Services, admin: &str, uris: &[String]) -> Result<usize> {
    let mut count = 0;
    for uri in uris {
        let Some((server, id)) = uri.strip_prefix("mxc://").and_then(|r| r.split_once('/')) else {
            continue;
        };
        match services.media.info(server, id) {
            Ok(record) if !record.protected && !record.quarantined => {
                services.media.quarantine(server, id, Some(admin)).await?;
                count += 1;
            }
            _ => {}
        }
    }
    Ok(count)
}

/// Quarantines every unprotected item a local user uploaded.
pub async fn quarantine_user(services: &Services, admin: &str, localpart: &str) -> Result<usize> {
    let uris: Vec<String> = scan(services, services.server_name(), |r| r.owner == localpart)?
        .into_iter()
        .map(|(id, _)| format!("mxc://{}/{id}", services.server_name()))
        .collect();
    quarantine_uris(services, admin, &uris).await
}

/// How much media one local user stores.
#[derive(Debug, Clone, Serialize)]
pub struct UserMediaStats {
    pub user_id: String,
    pub displayname: Option<String>,
    pub media_count: u64,
    pub media_length: u64,
}

/// Media per local user for items made in `[from_ms, until_ms]`; users with none are
/// left out.
pub fn user_stats(
    services: &Services,
    from_ms: u64,
    until_ms: Option<u64>,
) -> Result<Vec<UserMediaStats>> {
    let mut per_user: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for (_, record) in scan(services, services.server_name(), |r| {
        !r.owner.is_empty() && r.created_ms >= from_ms && until_ms.is_none_or(|u| r.created_ms <= u)
    })? {
        let entry = per_user.entry(record.owner).or_default();
        entry.0 += 1;
        entry.1 += record.size;
    }
    per_user
        .into_iter()
        .map(|(localpart, (count, length))| {
            Ok(UserMediaStats {
                user_id: services.accounts.user_id(&localpart),
                displayname: services
                    .profiles
                    .get(&localpart, "displayname")?
                    .and_then(|v| v.as_str().map(str::to_owned)),
                media_count: count,
                media_length: length,
            })
        })
        .collect()
}
