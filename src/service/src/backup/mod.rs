//! Backups while the server runs (docs/operations.md). A backup is a RocksDB checkpoint
//! of the database (consistent: every write acknowledged before it, nothing after), the
//! media files the database refers to, and the signing key, copied into a [`Repository`]
//! where each file's contents are kept once: a backup copies only what no earlier backup
//! holds. Media deletions wait while a backup copies, so every file the checkpoint refers
//! to is still there to copy. The search index is left out: it is rebuilt from the
//! database.

mod manifest;
mod repo;

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, UNIX_EPOCH},
};

use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tracing::Instrument;
use trellis_core::{Config, Error, ErrorKind, Result, error::code, now_millis};
use trellis_store::Db;

pub use manifest::{FORMAT, FileEntry, Manifest, Place};
pub use repo::Repository;

use crate::{Services, audit::Client, media::Media};

/// A failure of a backup, with its cause in the message: only admins and the operator
/// read these, and a backup that fails must say why.
pub(crate) fn failure(context: &'static str) -> impl Fn(&dyn std::fmt::Display) -> Error {
    move |e| {
        tracing::error!(error = %e, "{context}");
        Error::new(ErrorKind::Internal, code::UNKNOWN, format!("{context}: {e}"))
    }
}

fn io_failure(context: &'static str) -> impl Fn(std::io::Error) -> Error {
    move |e| {
        if e.kind() == std::io::ErrorKind::StorageFull {
            return Error::io(context, e);
        }
        failure(context)(&e)
    }
}

/// What a backup is taken of.
pub struct Sources<'a> {
    pub config: &'a Config,
    pub db: &'a Db,
    pub media: &'a Media,
}

/// The backups of the running server: one at a time, with what is running and how the
/// last one ended readable meanwhile.
#[derive(Default)]
pub struct Backups {
    status: Mutex<Status>,
    /// A prune is removing files: no backup starts meanwhile (it could count on a file
    /// the prune is about to remove).
    pruning: std::sync::atomic::AtomicBool,
}

#[derive(Debug, Clone, Default)]
pub struct Status {
    /// The backup being taken: its id and when it started (ms).
    pub running: Option<(String, u64)>,
    /// The last backup taken by this process that failed (its id and why), if none has
    /// succeeded since.
    pub last_error: Option<(String, String)>,
}

/// Where one backup stands.
#[derive(Debug, Clone)]
pub enum State {
    Running { started_at_ms: u64 },
    Failed { error: String },
    Done(Box<Manifest>),
}

impl Backups {
    pub fn status(&self) -> Status {
        self.status.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// A new backup id: the time, so that ids sort as the backups were taken, and a random
/// part, so that two never collide.
pub fn new_id() -> String {
    let secs = now_millis() / 1000;
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(i64::try_from(days).unwrap_or(0));
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}-{}",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60,
        crate::random::alphanumeric(6).to_ascii_lowercase()
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's
/// algorithm), to name backups without a date crate.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Starts a backup of the running server into its configured repository and answers its
/// id; a backup already running is answered instead of starting another. `by`: the admin
/// who asked, for the audit log.
pub fn start(
    services: &Arc<Services>,
    kind: &'static str,
    by: Option<(String, Client)>,
) -> Result<String> {
    let repo = configured(&services.config)?;
    let id = {
        let mut status = services.backups.status.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((id, _)) = &status.running {
            return Ok(id.clone());
        }
        if services.backups.pruning.load(std::sync::atomic::Ordering::Acquire) {
            return Err(Error::invalid_param("Backups are being pruned; try again shortly"));
        }
        let id = new_id();
        status.running = Some((id.clone(), now_millis()));
        id
    };
    let services = services.clone();
    let span = tracing::info_span!("backup", id = %id, kind);
    let task_id = id.clone();
    tokio::spawn(
        async move {
            let sources =
                Sources { config: &services.config, db: &services.db, media: &services.media };
            let outcome = create(&sources, &repo, &task_id, kind).await;
            let metrics = &services.metrics.backups;
            let (result, detail) = match &outcome {
                Ok(m) => {
                    metrics.outcome("ok");
                    metrics.last_success.set(i64::try_from(m.created_at_ms / 1000).unwrap_or(0));
                    metrics.last_duration_seconds.set(m.duration_ms as f64 / 1000.0);
                    metrics
                        .last_copied_bytes
                        .set(i64::try_from(m.copied_bytes).unwrap_or(i64::MAX));
                    metrics.last_total_bytes.set(i64::try_from(m.total_bytes).unwrap_or(i64::MAX));
                    ("ok", format!("{} to {}", m.id, repo.describe()))
                }
                Err(e) => {
                    metrics.outcome("failed");
                    tracing::error!(error = %e, "backup failed");
                    ("failed", format!("{task_id} to {}: {e}", repo.describe()))
                }
            };
            let (actor, client) = by.unzip();
            let client = client.unwrap_or_default();
            services
                .audit
                .log(actor.as_deref(), "backup_create", &client, result, Some(detail))
                .await;
            let mut status = services.backups.status.lock().unwrap_or_else(|p| p.into_inner());
            status.running = None;
            status.last_error = outcome.err().map(|e| (task_id, e.to_string()));
        }
        .instrument(span),
    );
    Ok(id)
}

/// The backups in the configured repository (oldest first) and what is running.
pub async fn overview(services: &Services) -> Result<(Status, Vec<Manifest>)> {
    let repo = configured(&services.config)?;
    Ok((services.backups.status(), repo.manifests().await?))
}

/// Where backup `id` stands: running, failed in this process, or done.
pub async fn state(services: &Services, id: &str) -> Result<State> {
    let status = services.backups.status();
    if let Some((_, started_at_ms)) = status.running.filter(|(r, _)| r == id) {
        return Ok(State::Running { started_at_ms });
    }
    if let Some((_, error)) = status.last_error.filter(|(failed, _)| failed == id) {
        return Ok(State::Failed { error });
    }
    let repo = configured(&services.config)?;
    Ok(State::Done(Box::new(repo.manifest(id).await?)))
}

/// `verify` of a backup in the configured repository, with a scratch directory under the
/// data directory; audited.
pub async fn verify_configured(
    services: &Services,
    id: &str,
    admin: &str,
    client: &Client,
) -> Result<Verified> {
    let repo = configured(&services.config)?;
    let verified = verify(&repo, id, &services.config.server.data_dir).await?;
    let outcome = if verified.ok() { "ok" } else { "damaged" };
    services
        .audit
        .log(Some(admin), "backup_verify", client, outcome, Some(verified.id.clone()))
        .await;
    Ok(verified)
}

/// `prune` of the configured repository; audited.
pub async fn prune_configured(
    services: &Services,
    keep: usize,
    admin: &str,
    client: &Client,
) -> Result<Pruned> {
    let repo = configured(&services.config)?;
    let pruned = prune_guarded(services, &repo, keep).await;
    let pruned = pruned?;
    let detail = format!("kept {keep}, removed {}", pruned.removed_backups.join(" "));
    services.audit.log(Some(admin), "backup_prune", client, "ok", Some(detail)).await;
    Ok(pruned)
}

/// `prune`, with no backup of this server starting meanwhile; refused while one runs.
async fn prune_guarded(services: &Services, repo: &Repository, keep: usize) -> Result<Pruned> {
    use std::sync::atomic::Ordering;
    {
        // Under the status lock, so that no backup starts between the check and the flag.
        let status = services.backups.status.lock().unwrap_or_else(|p| p.into_inner());
        if status.running.is_some() {
            return Err(Error::invalid_param("A backup is being taken; prune after it"));
        }
        if services.backups.pruning.swap(true, Ordering::AcqRel) {
            return Err(Error::invalid_param("A prune is running already"));
        }
    }
    let pruned = prune(repo, keep).await;
    services.backups.pruning.store(false, Ordering::Release);
    pruned
}

/// The repository `backup.destination` names.
pub fn configured(config: &Config) -> Result<Repository> {
    Repository::open(&config.backup.destination, &config.backup)
        .map_err(|e| Error::invalid_param(format!("Backups are not configured: {e}")))
}

/// Takes a backup with `id` into `repo`.
pub async fn create(
    src: &Sources<'_>,
    repo: &Repository,
    id: &str,
    kind: &str,
) -> Result<Manifest> {
    let started = Instant::now();
    let staging = src.config.server.data_dir.join(format!("backup-{id}"));
    repo.mark_pending(id).await?;
    let hold = src.media.hold_deletions();
    let result = take(src, repo, id, kind, &staging, started).await;
    drop(hold);
    if let Err(e) = tokio::fs::remove_dir_all(&staging).await {
        tracing::warn!(error = %e, dir = %staging.display(), "removing a backup's staging directory");
    }
    if let Err(e) = repo.clear_pending(id).await {
        tracing::warn!(error = %e, "clearing a backup's pending marker");
    }
    result
}

async fn take(
    src: &Sources<'_>,
    repo: &Repository,
    id: &str,
    kind: &str,
    staging: &Path,
    started: Instant,
) -> Result<Manifest> {
    std::fs::create_dir_all(staging).map_err(io_failure("creating a staging directory"))?;
    let checkpoint = staging.join("db");
    let created_at_ms = now_millis();
    {
        let (db, dir) = (src.db.clone(), checkpoint.clone());
        tokio::task::spawn_blocking(move || db.checkpoint(&dir))
            .await
            .map_err(|e| Error::internal("backup task", e))?
            .map_err(|e| failure("checkpointing the database")(&e))?;
    }
    tracing::info!("database checkpointed");
    // Hashes of table files the last backup saw, by name, size and time: RocksDB never
    // changes a table file once written, so these need no second read.
    let last = repo.latest().await?.map(|m| m.files).unwrap_or_default();
    let known: HashMap<(String, u64, i64), String> = last
        .iter()
        .filter(|f| f.path.ends_with(".sst"))
        .filter_map(|f| Some(((f.path.clone(), f.size, f.mtime?), f.sha256.clone())))
        .collect();
    // Sealed media files by path and sealing: one is rewritten only when resealed.
    let known_sealed: HashMap<(String, String), (String, u64)> =
        last.into_iter().filter_map(|f| Some(((f.path, f.sealing?), (f.sha256, f.size)))).collect();
    let mut copy = Copier { repo, files: Vec::new(), copied_bytes: 0, copied_files: 0 };
    let mut names: Vec<PathBuf> = std::fs::read_dir(&checkpoint)
        .map_err(io_failure("reading the checkpoint"))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .map_err(io_failure("reading the checkpoint"))?;
    names.sort();
    for file in names {
        let Some(name) = file.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
            continue;
        };
        let meta = std::fs::metadata(&file).map_err(io_failure("reading the checkpoint"))?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .and_then(|d| i64::try_from(d.as_secs()).ok());
        let path = format!("db/{name}");
        let sha = match mtime.and_then(|t| known.get(&(path.clone(), meta.len(), t))) {
            Some(sha) => sha.clone(),
            None => sha256_file(&file).await?,
        };
        copy.file(FileEntry { path, sha256: sha, size: meta.len(), mtime, sealing: None }, &file)
            .await?;
    }
    let key = src.config.signing_key_path();
    let key_len = std::fs::metadata(&key).map_err(io_failure("reading the signing key"))?.len();
    let key_sha = sha256_file(&key).await?;
    let entry = FileEntry {
        path: "signing.key".into(),
        sha256: key_sha,
        size: key_len,
        mtime: None,
        sealing: None,
    };
    copy.file(entry, &key).await?;
    // The files the checkpoint refers to: those the database refers to now (and any
    // added since, which is harmless), and those whose references went since, whose
    // deletion waits in the hold. Deletions held while copying are looked at again.
    let spool = staging.join("media");
    std::fs::create_dir_all(&spool).map_err(io_failure("creating a staging directory"))?;
    let mut missing = 0u64;
    let mut wanted: Vec<String> = src.media.stored_hashes()?;
    wanted.extend(src.media.held_deletions());
    let mut seen: HashSet<String> = HashSet::new();
    while let Some(hash) = wanted.pop() {
        if wanted.is_empty() {
            wanted.extend(src.media.held_deletions().into_iter().filter(|h| !seen.contains(h)));
        }
        if !seen.insert(hash.clone()) {
            continue;
        }
        // Files encrypted at rest are backed up as they lie, so the backup is encrypted
        // too; a file the store cannot find reads as plaintext and is reported below.
        let sealing = src.media.sealing(&hash).await.ok().and_then(|s| s.tag());
        if let Some(tag) = &sealing {
            let path = format!("sealed-media/{hash}");
            if let Some((sha, size)) = known_sealed.get(&(path.clone(), tag.clone()))
                && repo.file_size(sha).await? == Some(*size)
            {
                let entry =
                    FileEntry { path, sha256: sha.clone(), size: *size, mtime: None, sealing };
                copy.files.push(entry);
                continue;
            }
        } else if let Some(size) = repo.file_size(&hash).await? {
            copy.files.push(FileEntry {
                path: format!("media/{hash}"),
                sha256: hash,
                size,
                mtime: None,
                sealing: None,
            });
            continue;
        }
        let tmp = spool.join(&hash);
        match src.media.copy_stored_bytes_to(&hash, &tmp).await? {
            Some((sha, size)) if sealing.is_some() => {
                let path = format!("sealed-media/{hash}");
                copy.file(FileEntry { path, sha256: sha, size, mtime: None, sealing }, &tmp)
                    .await?;
            }
            Some((sha, size)) if sha == hash => {
                let path = format!("media/{hash}");
                copy.file(FileEntry { path, sha256: sha, size, mtime: None, sealing }, &tmp)
                    .await?;
            }
            found => {
                missing += 1;
                tracing::warn!(
                    hash,
                    ?found,
                    "a media file is missing or damaged; left out of the backup"
                );
            }
        }
        let _ = tokio::fs::remove_file(&tmp).await;
    }
    let total_bytes = copy.files.iter().map(|f| f.size).sum();
    let manifest = Manifest {
        format: FORMAT.into(),
        id: id.to_owned(),
        server_name: src.config.server.server_name.clone(),
        trellis_version: env!("CARGO_PKG_VERSION").into(),
        schema_version: trellis_store::SCHEMA_VERSION,
        created_at_ms,
        kind: kind.to_owned(),
        total_bytes,
        copied_bytes: copy.copied_bytes,
        copied_files: copy.copied_files,
        files: copy.files,
        duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    };
    repo.put_manifest(&manifest).await?;
    tracing::info!(
        files = manifest.files.len(),
        total_bytes,
        copied_bytes = manifest.copied_bytes,
        missing_media = missing,
        "backup written"
    );
    Ok(manifest)
}

/// Adds files to a backup, copying those the repository lacks.
struct Copier<'a> {
    repo: &'a Repository,
    files: Vec<FileEntry>,
    copied_bytes: u64,
    copied_files: u64,
}

impl Copier<'_> {
    /// Puts `local`, described by `entry`, into the repository unless it holds the
    /// content already.
    async fn file(&mut self, entry: FileEntry, local: &Path) -> Result<()> {
        if self.repo.file_size(&entry.sha256).await? != Some(entry.size) {
            self.repo.put_file(&entry.sha256, local, entry.size).await?;
            self.copied_bytes += entry.size;
            self.copied_files += 1;
        }
        self.files.push(entry);
        Ok(())
    }
}

async fn sha256_file(path: &Path) -> Result<String> {
    let mut file =
        tokio::fs::File::open(path).await.map_err(io_failure("reading a file to back up"))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1024 * 1024];
    loop {
        let n = file.read(&mut buf).await.map_err(io_failure("reading a file to back up"))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(crate::media::hex(&hasher.finalize()))
}

/// `latest` or an id.
pub async fn find(repo: &Repository, id: &str) -> Result<Manifest> {
    if id == "latest" {
        return repo.latest().await?.ok_or_else(|| Error::not_found("No backups yet"));
    }
    repo.manifest(id).await
}

/// What `verify` found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Verified {
    pub id: String,
    pub files: usize,
    pub bytes: u64,
    /// Files whose contents are missing or differ from the manifest.
    pub damaged: Vec<String>,
    pub schema_version: Option<u64>,
    pub database_keys: Option<u64>,
    /// Why the database did not open, if it did not.
    pub database_error: Option<String>,
}

impl Verified {
    pub fn ok(&self) -> bool {
        self.damaged.is_empty() && self.database_error.is_none()
    }
}

/// Reads every file of backup `id` back and checks it against the manifest, then opens
/// its database read-only and reads every key. The database is put in a directory made
/// under `scratch` meanwhile.
pub async fn verify(repo: &Repository, id: &str, scratch: &Path) -> Result<Verified> {
    let manifest = find(repo, id).await?;
    let scratch = tempfile::Builder::new()
        .prefix("backup-verify-")
        .tempdir_in(scratch)
        .map_err(io_failure("creating a scratch directory"))?;
    let scratch = scratch.path();
    let db_dir = scratch.join("db");
    std::fs::create_dir_all(&db_dir).map_err(io_failure("creating a scratch directory"))?;
    let mut damaged = Vec::new();
    let mut bytes = 0;
    for file in &manifest.files {
        let to = match file.place() {
            Some(Place::Database(name)) => db_dir.join(name),
            _ => scratch.join("file"),
        };
        match repo.get_file(&file.sha256, &to).await {
            Ok((sha, len)) if sha == file.sha256 && len == file.size => bytes += len,
            Ok(_) => damaged.push(file.path.clone()),
            Err(e) => {
                tracing::warn!(path = file.path, error = %e, "a backed-up file cannot be read");
                damaged.push(file.path.clone());
            }
        }
    }
    let _ = std::fs::remove_file(scratch.join("file"));
    let opened = tokio::task::spawn_blocking(move || trellis_store::verify_read_only(&db_dir))
        .await
        .map_err(|e| Error::internal("backup task", e))?;
    let (schema_version, database_keys, database_error) = match opened {
        Ok((version, keys)) => (Some(version), Some(keys), None),
        Err(e) => (None, None, Some(e.to_string())),
    };
    Ok(Verified {
        id: manifest.id,
        files: manifest.files.len(),
        bytes,
        damaged,
        schema_version,
        database_keys,
        database_error,
    })
}

/// What `restore` did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Restored {
    pub id: String,
    pub data_dir: PathBuf,
    pub files: usize,
    pub bytes: u64,
    pub database_keys: u64,
}

/// Puts backup `id` back into the data directory `config` names, which must hold no
/// database and no signing key: a restore never overwrites a server's data.
pub async fn restore(repo: &Repository, id: &str, config: &Config) -> Result<Restored> {
    let manifest = find(repo, id).await?;
    if manifest.format != FORMAT {
        return Err(Error::invalid_param(format!(
            "backup {} is in format {:?}, which this version does not read",
            manifest.id, manifest.format
        )));
    }
    if manifest.server_name != config.server.server_name {
        return Err(Error::invalid_param(format!(
            "backup {} is of server {}, not {}: a server's name cannot change",
            manifest.id, manifest.server_name, config.server.server_name
        )));
    }
    let db_dir = config.database_path();
    let key_path = config.signing_key_path();
    let occupied = std::fs::read_dir(&db_dir).is_ok_and(|mut d| d.next().is_some());
    if occupied || key_path.exists() {
        return Err(Error::invalid_param(format!(
            "{} already holds a server's data: restore into an empty data directory",
            config.server.data_dir.display()
        )));
    }
    let staging = config.server.data_dir.join("db.restoring");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(io_failure("creating the data directory"))?;
    let media_tmp = config.media_path().join("tmp");
    std::fs::create_dir_all(&media_tmp).map_err(io_failure("creating the media directory"))?;
    let store = crate::media::open_store(config).map_err(|e| failure("the media store")(&e))?;
    let sealed = manifest.files.iter().any(|f| matches!(f.place(), Some(Place::SealedMedia(_))));
    if sealed && store.current_key().is_none() {
        let why = "the backup's media are encrypted: set media.encryption_keys (or \
                   media.encryption_key_file) to the keys they were sealed with";
        return Err(failure("restoring")(&why));
    }
    let mut bytes = 0;
    for file in &manifest.files {
        let place = file
            .place()
            .ok_or_else(|| failure("restoring")(&format!("unknown path {}", file.path)))?;
        let to = match place {
            Place::Database(name) => staging.join(name),
            Place::SigningKey => config.server.data_dir.join("signing.key.restoring"),
            Place::Media(hash) | Place::SealedMedia(hash) => media_tmp.join(hash),
        };
        let (sha, len) = repo.get_file(&file.sha256, &to).await?;
        if sha != file.sha256 || len != file.size {
            let why = format!("{} does not match its manifest (run verify)", file.path);
            return Err(failure("restoring")(&why));
        }
        bytes += len;
        match place {
            Place::Database(_) => {}
            // Put in place last (below): its presence marks a data directory as taken.
            Place::SigningKey => set_owner_only(&to)?,
            // Plaintext files are sealed on the way in when the restored server encrypts.
            Place::Media(hash) => {
                store.put_file(hash, &to, len).await?;
                let _ = tokio::fs::remove_file(&to).await;
            }
            // Sealed files go back as they were: they need the keys they were sealed with.
            Place::SealedMedia(hash) => {
                store.raw().put_file(hash, &to, len).await?;
                let _ = tokio::fs::remove_file(&to).await;
            }
        }
    }
    if db_dir.exists() {
        std::fs::remove_dir(&db_dir)
            .map_err(io_failure("replacing the empty database directory"))?;
    }
    std::fs::rename(&staging, &db_dir).map_err(io_failure("restoring the database"))?;
    let key = config.server.data_dir.join("signing.key.restoring");
    std::fs::rename(&key, &key_path).map_err(io_failure("restoring the signing key"))?;
    let check = db_dir.clone();
    let (_, database_keys) =
        tokio::task::spawn_blocking(move || trellis_store::verify_read_only(&check))
            .await
            .map_err(|e| Error::internal("backup task", e))?
            .map_err(|e| failure("opening the restored database")(&e))?;
    Ok(Restored {
        id: manifest.id,
        data_dir: config.server.data_dir.clone(),
        files: manifest.files.len(),
        bytes,
        database_keys,
    })
}

#[cfg(unix)]
fn set_owner_only(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io_failure("restoring the signing key"))
}

#[cfg(not(unix))]
fn set_owner_only(_: &Path) -> Result<()> {
    Ok(())
}

/// What `prune` removed.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Pruned {
    pub removed_backups: Vec<String>,
    pub removed_files: u64,
    /// Unused files were kept because a backup is being taken into the repository.
    pub files_kept_for_running_backup: bool,
}

/// Keeps the newest `keep` backups, and removes the files no remaining backup holds.
pub async fn prune(repo: &Repository, keep: usize) -> Result<Pruned> {
    if keep == 0 {
        return Err(Error::invalid_param("keep must be at least 1"));
    }
    // Whether a backup is being written is asked first: one that finishes after the
    // manifests are listed would have its new files taken for unused.
    let pending = repo.pending().await?;
    let manifests = repo.manifests().await?;
    let cut = manifests.len().saturating_sub(keep);
    let mut pruned = Pruned::default();
    for old in &manifests[..cut] {
        repo.delete_manifest(&old.id).await?;
        pruned.removed_backups.push(old.id.clone());
    }
    if pending {
        pruned.files_kept_for_running_backup = true;
        return Ok(pruned);
    }
    let used: HashSet<&str> =
        manifests[cut..].iter().flat_map(|m| m.files.iter().map(|f| f.sha256.as_str())).collect();
    for sha in repo.files().await? {
        if !used.contains(sha.as_str()) {
            repo.delete_file(&sha).await?;
            pruned.removed_files += 1;
        }
    }
    Ok(pruned)
}

/// Takes scheduled backups (`backup.interval_hours`), then prunes to `backup.keep`. Runs
/// until the process ends; a backup is due when the newest in the repository is older
/// than the interval, so restarts neither skip nor repeat one.
pub async fn run_schedule(services: Arc<Services>) {
    remove_staging(&services.config.server.data_dir);
    let hours = services.config.backup.interval_hours;
    if hours == 0 || services.config.backup.destination.is_empty() {
        return;
    }
    let interval = Duration::from_secs(hours * 3600);
    let mut ticker = tokio::time::interval(Duration::from_secs(60).min(interval));
    loop {
        ticker.tick().await;
        if let Err(e) =
            scheduled(&services, interval).instrument(tracing::info_span!("backup_schedule")).await
        {
            tracing::warn!(error = %e, "scheduled backup");
        }
    }
}

/// Removes what backups cut short by a stop left in the data directory.
fn remove_staging(data_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(data_dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("backup-") && entry.path().is_dir() {
            tracing::info!(dir = %entry.path().display(), "removing an unfinished backup's files");
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

async fn scheduled(services: &Arc<Services>, interval: Duration) -> Result<()> {
    let repo = configured(&services.config)?;
    let newest = repo.latest().await?.map(|m| m.created_at_ms);
    let due =
        newest.is_none_or(|at| now_millis().saturating_sub(at) >= interval.as_millis() as u64);
    if !due || services.backups.status().running.is_some() {
        return Ok(());
    }
    let id = start(services, "scheduled", None)?;
    while services.backups.status().running.as_ref().is_some_and(|(r, _)| *r == id) {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let keep = services.config.backup.keep;
    if keep > 0 {
        let pruned = prune_guarded(services, &repo, keep).await?;
        tracing::info!(
            backups = pruned.removed_backups.len(),
            files = pruned.removed_files,
            "pruned backups"
        );
    }
    Ok(())
}
