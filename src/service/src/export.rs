//! "Download my data": an archive of what a user stored here (docs/operations.md). A
//! zip of JSON files (profile, account data, devices, rooms and the messages the user
//! sent in them) and the media the user uploaded, built in the background into
//! `<data_dir>/exports/`, downloadable once, by a link with a secret, for
//! [`LINK_LIFETIME`]. Nothing of other users is in it but the ids of rooms the user was
//! in. Exports are kept in memory: a restart drops them (and their files), and the user
//! asks again.

use std::{
    collections::HashMap,
    io::Write,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use ruma::events::room::member::MembershipState;
use serde_json::{Value, json};
use tracing::Instrument;
use trellis_core::{Error, ErrorKind, Result, error::code, now_millis};

use crate::{Services, audit::Client, random};

/// How long a finished export can be downloaded.
pub const LINK_LIFETIME: Duration = Duration::from_secs(3600);
/// A finished export's record (its state) is kept this long.
const FORGET_AFTER_MS: u64 = 24 * 3600 * 1000;
/// Events read from a room's timeline at a time.
const PAGE: usize = 1000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    Running,
    /// Ready to download with the secret `token` until `expires_ms`.
    Ready {
        token: String,
        size: u64,
        expires_ms: u64,
    },
    Failed(String),
    /// Downloaded (once) or expired: the file is gone.
    Gone,
}

#[derive(Debug, Clone)]
pub struct Export {
    pub id: String,
    /// The user's localpart.
    pub user: String,
    pub created_ms: u64,
    pub state: State,
}

/// The exports of this process.
#[derive(Default)]
pub struct Exports {
    jobs: Mutex<HashMap<String, Export>>,
}

impl Exports {
    fn jobs(&self) -> std::sync::MutexGuard<'_, HashMap<String, Export>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets exports whose link expired, and removes their files; what is left of
    /// finished exports goes after a day.
    fn expire(&self, dir: &Path) {
        let now = now_millis();
        let mut jobs = self.jobs();
        for job in jobs.values_mut() {
            if let State::Ready { expires_ms, .. } = job.state
                && expires_ms <= now
            {
                job.state = State::Gone;
                let _ = std::fs::remove_file(file_of(dir, &job.id));
            }
        }
        jobs.retain(|_, j| {
            matches!(j.state, State::Running | State::Ready { .. })
                || now.saturating_sub(j.created_ms) < FORGET_AFTER_MS
        });
    }
}

fn dir_of(services: &Services) -> PathBuf {
    services.config.server.data_dir.join("exports")
}

fn file_of(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.zip"))
}

/// Removes what exports of an earlier run left (their links died with it).
pub fn clear_leftovers(services: &Services) {
    let _ = std::fs::remove_dir_all(dir_of(services));
}

/// Starts an export of `localpart`'s data, or answers the one running for them.
/// `by`: who asked (the user, or an admin), for the audit log.
pub async fn start(
    services: &Arc<Services>,
    localpart: &str,
    by: (&str, &Client),
) -> Result<Export> {
    let dir = dir_of(services);
    services.exports.expire(&dir);
    let export = {
        let mut jobs = services.exports.jobs();
        // One export per user at a time, and a ready one is answered until it is taken
        // or expires, so that nobody fills the disk with copies.
        let current = |j: &&Export| {
            j.user == localpart && matches!(j.state, State::Running | State::Ready { .. })
        };
        if let Some(current) = jobs.values().find(current) {
            return Ok(current.clone());
        }
        let export = Export {
            id: random::alphanumeric(24),
            user: localpart.to_owned(),
            created_ms: now_millis(),
            state: State::Running,
        };
        jobs.insert(export.id.clone(), export.clone());
        export
    };
    let (actor, client) = by;
    let detail = Some(format!("{} for {localpart}", export.id));
    services.audit.log(Some(actor), "export_requested", client, "ok", detail).await;
    let (services, id, user) = (services.clone(), export.id.clone(), localpart.to_owned());
    let span = tracing::info_span!("export", id = %id, user = %user);
    tokio::spawn(
        async move {
            let outcome = build(&services, &user, &dir, &id).await;
            let state = match outcome {
                Ok(size) => {
                    tracing::info!(size, "export ready");
                    State::Ready {
                        token: random::alphanumeric(32),
                        size,
                        expires_ms: now_millis() + LINK_LIFETIME.as_millis() as u64,
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "export failed");
                    let _ = std::fs::remove_file(file_of(&dir, &id));
                    let _ = std::fs::remove_file(file_of(&dir, &id).with_extension("part"));
                    State::Failed(e.to_string())
                }
            };
            if let Some(job) = services.exports.jobs().get_mut(&id) {
                job.state = state;
            }
        }
        .instrument(span),
    );
    Ok(export)
}

/// Export `id`, if it is `localpart`'s (or any user's, for `None`: an admin).
pub fn get(services: &Services, id: &str, localpart: Option<&str>) -> Result<Export> {
    services.exports.expire(&dir_of(services));
    services
        .exports
        .jobs()
        .get(id)
        .filter(|j| localpart.is_none_or(|l| l == j.user))
        .cloned()
        .ok_or_else(|| Error::not_found("No such export"))
}

/// Takes export `id` for download with its link's `token`: the file, opened, and its
/// size. The link works once: the file is unlinked once open.
pub async fn take(services: &Services, id: &str, token: &str) -> Result<(tokio::fs::File, u64)> {
    let dir = dir_of(services);
    services.exports.expire(&dir);
    let size = {
        let mut jobs = services.exports.jobs();
        let job = jobs.get_mut(id).ok_or_else(|| Error::not_found("No such export"))?;
        match &job.state {
            State::Ready { token: secret, size, .. } if same(secret, token) => {
                let size = *size;
                job.state = State::Gone;
                size
            }
            State::Ready { .. } => return Err(Error::forbidden("Wrong download token")),
            State::Running => {
                return Err(Error::new(ErrorKind::NotFound, code::NOT_FOUND, "Not ready yet"));
            }
            State::Failed(_) | State::Gone => {
                return Err(Error::not_found("This export is no longer available"));
            }
        }
    };
    let path = file_of(&dir, id);
    let file = tokio::fs::File::open(&path).await.map_err(|e| Error::io("opening an export", e))?;
    let _ = tokio::fs::remove_file(&path).await;
    Ok((file, size))
}

/// Compares secrets in time independent of where they differ.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// One file of the archive: JSON, or a media file to copy in.
enum Entry {
    Json(String, Value),
    File(String, PathBuf),
}

/// Gathers the user's data and writes the archive; answers its size.
async fn build(services: &Services, localpart: &str, dir: &Path, id: &str) -> Result<u64> {
    let io = |e| Error::io("writing an export", e);
    tokio::fs::create_dir_all(dir).await.map_err(io)?;
    let spool = tempfile::tempdir_in(dir).map_err(io)?;
    let user_id = services.accounts.user_id(localpart);
    let mut entries = vec![
        Entry::Json(
            "account.json".into(),
            json!({"user_id": user_id, "exported_at": now_millis(), "server_name": services.server_name()}),
        ),
        Entry::Json("profile.json".into(), json!(services.profiles.get_all(localpart)?)),
    ];
    let devices: Vec<Value> = services
        .accounts
        .devices(localpart)?
        .into_iter()
        .map(|d| {
            json!({"device_id": d.device_id, "display_name": d.display_name,
                   "last_seen_ts": d.last_seen_ms, "last_seen_ip": d.last_seen_ip,
                   "last_seen_user_agent": d.last_seen_user_agent})
        })
        .collect();
    entries.push(Entry::Json("devices.json".into(), json!(devices)));
    let mut global = serde_json::Map::new();
    let mut per_room: HashMap<String, serde_json::Map<String, Value>> = HashMap::new();
    for (room, kind, content) in services.account_data.changed_since(localpart, 0)? {
        match room {
            Some(room) => {
                per_room.entry(room).or_default().insert(kind, content);
            }
            None => {
                global.insert(kind, content);
            }
        }
    }
    entries.push(Entry::Json(
        "account_data.json".into(),
        json!({"global": global, "rooms": per_room}),
    ));
    let mut rooms = Vec::new();
    for state in [
        MembershipState::Join,
        MembershipState::Leave,
        MembershipState::Invite,
        MembershipState::Knock,
        MembershipState::Ban,
    ] {
        for room_id in services.rooms.rooms_of(&user_id, &state)? {
            // Numbered: two room ids may sanitize alike.
            let name = format!("rooms/{}-{}.json", rooms.len() + 1, sanitize(&room_id));
            rooms.push(json!({"room_id": room_id, "membership": state.as_str(), "file": name}));
            let messages = sent_in(services, &room_id, &user_id)?;
            entries.push(Entry::Json(name, json!({"room_id": room_id, "events": messages})));
        }
    }
    entries.push(Entry::Json("rooms.json".into(), json!(rooms)));
    let mut media = Vec::new();
    for (id, record) in services.media.uploads_of(localpart)? {
        let Some(hash) = record.sha256.clone() else { continue };
        let tmp = spool.path().join(&id);
        if services.media.copy_file_to(&hash, &tmp).await?.is_none() {
            continue;
        }
        let name = format!("media/{}", sanitize(&id));
        media.push(json!({"media_id": id, "mxc": format!("mxc://{}/{id}", services.server_name()),
                          "file": name, "content_type": record.content_type,
                          "filename": record.filename, "size": record.size,
                          "created_ts": record.created_ms}));
        entries.push(Entry::File(name, tmp));
    }
    entries.push(Entry::Json("media.json".into(), json!(media)));
    let path = file_of(dir, id);
    let size = tokio::task::spawn_blocking(move || write_zip(&path, entries))
        .await
        .map_err(|e| Error::internal("export task", e))??;
    drop(spool);
    Ok(size)
}

/// The events `user_id` sent in `room_id` (redacted ones as they are now), oldest first.
fn sent_in(services: &Services, room_id: &str, user_id: &str) -> Result<Vec<Value>> {
    use std::ops::Bound::{Excluded, Unbounded};
    let mut out = Vec::new();
    let mut after = Unbounded;
    // Messages the room's retention policy expired are nobody's to read, the sender's too.
    let expired_before = services.rooms.expired_before(room_id)?;
    loop {
        let page =
            services.rooms.scan_timeline(room_id, after, Unbounded, true, PAGE, |_, pdu| {
                Ok(pdu.sender.as_str() == user_id
                    && !crate::rooms::Rooms::is_expired(pdu, expired_before))
            })?;
        for (_, pdu) in &page.events {
            let mut event = json!({"event_id": pdu.event_id, "type": pdu.kind.to_string(),
                                   "content": &pdu.content, "origin_server_ts": pdu.origin_server_ts});
            if let Some(key) = &pdu.state_key {
                event["state_key"] = json!(key);
            }
            out.push(event);
        }
        match page.last {
            Some(last) if page.more => after = Excluded(last),
            _ => return Ok(out),
        }
    }
}

/// A name safe as one path component inside the archive.
fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() || "!._-".contains(c) { c } else { '_' })
        .collect()
}

fn write_zip(path: &Path, entries: Vec<Entry>) -> Result<u64> {
    let zip_err = |e: zip::result::ZipError| Error::internal("writing an export", e);
    let io = |e| Error::io("writing an export", e);
    let tmp = path.with_extension("part");
    let file = std::fs::File::create(&tmp).map_err(io)?;
    let mut zip = zip::ZipWriter::new(std::io::BufWriter::new(file));
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    for entry in entries {
        match entry {
            Entry::Json(name, value) => {
                zip.start_file(name, options).map_err(zip_err)?;
                let text = serde_json::to_vec_pretty(&value)
                    .map_err(|e| Error::internal("writing an export", e))?;
                zip.write_all(&text).map_err(io)?;
            }
            Entry::File(name, from) => {
                // Media are mostly compressed already.
                let stored = options.compression_method(zip::CompressionMethod::Stored);
                zip.start_file(name, stored).map_err(zip_err)?;
                let mut source = std::fs::File::open(&from).map_err(io)?;
                std::io::copy(&mut source, &mut zip).map_err(io)?;
            }
        }
    }
    let mut out = zip.finish().map_err(zip_err)?;
    out.flush().map_err(io)?;
    drop(out);
    std::fs::rename(&tmp, path).map_err(io)?;
    Ok(std::fs::metadata(path).map_err(io)?.len())
}

/// An export as its requester reads it: the download link once it is ready.
pub fn describe(export: &Export) -> Value {
    let mut out = json!({"export_id": export.id, "created_ts": export.created_ms});
    let state = match &export.state {
        State::Running => "running",
        State::Ready { token, size, expires_ms } => {
            out["size"] = json!(size);
            out["expires_ts"] = json!(expires_ms);
            out["download_url"] =
                json!(format!("/_trellis/client/v1/export/{}/download?token={token}", export.id));
            "ready"
        }
        State::Failed(error) => {
            out["error"] = json!(error);
            "failed"
        }
        State::Gone => "gone",
    };
    out["state"] = json!(state);
    out
}
