//! The media repository: uploads (direct and async), downloads, thumbnails, URL previews
//! and the admin actions on media.
//!
//! Contents are stored once per distinct SHA-256 behind [`BlobStore`] (filesystem or
//! S3); everything else — media records, who references which file, thumbnails, quotas,
//! cached previews — is in the database. A file is deleted when its last reference goes.
//! Reference changes and the file operations they imply happen under a per-hash lock, so
//! an upload of the same bytes can never race a deletion into a dangling record.

pub mod multipart;
pub(crate) mod preview;
mod spool;
pub mod store;
pub mod store_crypt;
mod store_fs;
mod store_s3;
pub mod thumbnail;
pub mod uses;

use std::{
    ops::Range,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};
use trellis_core::ErrorKind;

use bytes::Bytes;
use futures_util::Stream;
use serde_json::{Map, Value};
use tokio::sync::{Mutex, Semaphore, watch};
use tracing::Instrument;
use trellis_core::{
    Error, Result,
    config::{MediaBackend, MediaConfig},
    error::code,
    now_millis,
};
use trellis_store::{Batch, Db, Direction, Json};

pub use preview::IpPolicy;
use spool::{Limit, Spooled};
pub use store::{BlobStore, BlobStream, hex};
pub(crate) use store_s3::upload_file;
pub use thumbnail::{Method, Spec};

use crate::tables::{
    MEDIA, MEDIA_BLOB_REFS, MEDIA_USAGE, MEDIA_VARIANTS, MediaRecord, MediaVariant, URL_PREVIEWS,
    UrlPreviewRecord,
};

/// Characters of a media id: 190 bits from the CSPRNG, unguessable.
const MEDIA_ID_LEN: usize = 32;
/// Per-hash locks, striped: contention only between uploads whose hashes share a stripe.
const LOCK_STRIPES: usize = 64;
/// Stored thumbnail sizes per file beyond which on-demand sizes are served uncached, so a
/// client cycling through sizes cannot fill the disk.
const MAX_VARIANTS: usize = 32;
/// Animated images up to this size are their own animated thumbnail.
const ANIMATED_PASSTHROUGH_BYTES: u64 = 4 * 1024 * 1024;
/// Preview fetches at once.
const PREVIEW_CONCURRENCY: usize = 8;
/// Media accesses are recorded to within this much (one write per item a day at most).
const ACCESS_RESOLUTION_MS: u64 = 24 * 3600 * 1000;
const RENDITION: &str = "rendition";

/// Something to send to a client: a stored file and how to present it.
#[derive(Debug, Clone)]
pub struct Content {
    pub sha256: String,
    pub size: u64,
    pub content_type: String,
    pub filename: Option<String>,
    /// Bytes served from memory rather than the store (thumbnails not worth keeping).
    pub inline: Option<Bytes>,
}

/// A thumbnail request.
#[derive(Debug, Clone, Copy)]
pub struct ThumbnailRequest {
    pub spec: Spec,
    /// `Some(true)`: animation preferred; `Some(false)`: animation forbidden.
    pub animated: Option<bool>,
}

/// What is known of an upload before its body arrives.
#[derive(Debug, Clone)]
pub struct UploadInfo {
    pub owner: String,
    pub content_type: Option<String>,
    pub filename: Option<String>,
    /// `Content-Length`, when the client sent one: checked before reading anything.
    pub declared_len: Option<u64>,
}

/// The upload being received.
pub struct Upload<S> {
    pub info: UploadInfo,
    pub body: S,
}

#[derive(Clone)]
pub struct Media(Arc<Inner>);

struct Inner {
    db: Db,
    config: MediaConfig,
    server_name: String,
    sync_writes: bool,
    store: Box<dyn BlobStore>,
    tmp_dir: PathBuf,
    stripes: Vec<Mutex<()>>,
    /// Serialises the read-check-write of records and usage counters.
    commit: Mutex<()>,
    /// Bumped whenever an upload completes; downloads waiting for an async upload watch it.
    uploaded: watch::Sender<u64>,
    thumbnails: Semaphore,
    previews: Semaphore,
    fetcher: preview::Fetcher,
    /// File deletions put off while a backup copies files (see [`Media::hold_deletions`]).
    held: std::sync::Mutex<Held>,
    /// See `uses_tracked_since`.
    uses_since: u64,
}

#[derive(Default)]
struct Held {
    holders: usize,
    deferred: Vec<String>,
}

/// While one of these lives, no media file is deleted: deletions wait until the last one
/// is dropped, and then go ahead if the file is still unused.
pub struct DeletionHold(Media);

impl Drop for DeletionHold {
    fn drop(&mut self) {
        let deferred = {
            let mut held = self.0.0.held.lock().unwrap_or_else(|p| p.into_inner());
            held.holders = held.holders.saturating_sub(1);
            if held.holders > 0 {
                return;
            }
            std::mem::take(&mut held.deferred)
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        if deferred.is_empty() {
            return;
        }
        let media = self.0.clone();
        runtime.spawn(async move {
            for hash in deferred {
                let _file = media.stripe(&hash).lock().await;
                if let Err(e) = media.release_if_unused(&hash).await {
                    tracing::warn!(hash, error = %e, "deleting a media file after a backup");
                }
            }
        });
    }
}

/// Copies stored file `hash` out of `store` into `to`, with the SHA-256 and length of what
/// it read; `None` when the store lacks the file.
async fn copy_from(store: &dyn BlobStore, hash: &str, to: &Path) -> Result<Option<(String, u64)>> {
    if !store.contains(hash).await? {
        return Ok(None);
    }
    let stream = store.open(hash, None).await?;
    let (_, sha, len) =
        write_hashed(stream, to).await.map_err(|e| Error::io("copying a media file", e))?;
    Ok(Some((sha, len)))
}

/// Writes `stream` into a new file `to`, answering the file (flushed, for a caller that
/// also wants it synced), the hex SHA-256 of the bytes and their count.
pub(crate) async fn write_hashed(
    mut stream: BlobStream,
    to: &Path,
) -> std::io::Result<(tokio::fs::File, String, u64)> {
    use futures_util::StreamExt;
    use sha2::Digest;
    use tokio::io::AsyncWriteExt;
    let mut out = tokio::fs::File::create(to).await?;
    let mut hasher = sha2::Sha256::new();
    let mut len = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        hasher.update(&chunk);
        len += chunk.len() as u64;
        out.write_all(&chunk).await?;
    }
    out.flush().await?;
    Ok((out, hex(&hasher.finalize()), len))
}

/// The configured file store (`media.backend`), encrypting when keys are configured.
pub fn open_store(config: &trellis_core::Config) -> Result<Box<dyn BlobStore>, String> {
    let root = config.media_path();
    let store: Box<dyn BlobStore> = match config.media.backend {
        MediaBackend::Filesystem => Box::new(
            store_fs::FsStore::new(root.join("blobs"), config.storage.sync_writes)
                .map_err(|e| format!("creating {}: {e}", root.display()))?,
        ),
        MediaBackend::S3 => Box::new(store_s3::S3Store::new(&config.media)?),
    };
    Ok(match store_crypt::MediaKeys::from_config(&config.media)? {
        Some(keys) => Box::new(store_crypt::EncryptedStore::new(store, keys, root.join("tmp"))),
        None => store,
    })
}

impl Media {
    pub fn new(
        config: &trellis_core::Config,
        db: Db,
        store_override: Option<Box<dyn BlobStore>>,
    ) -> Result<Self, String> {
        let media = config.media.clone();
        let root = config.media_path();
        let tmp_dir = root.join("tmp");
        std::fs::create_dir_all(&tmp_dir)
            .map_err(|e| format!("creating {}: {e}", tmp_dir.display()))?;
        // Temp files left by a crash were never referenced: clear them out.
        if let Ok(entries) = std::fs::read_dir(&tmp_dir) {
            for entry in entries.flatten() {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let store = match store_override {
            Some(store) => store,
            None => open_store(config)?,
        };
        let fetcher = preview::Fetcher::new(&media)?;
        let since_file = root.join("uses-since");
        let uses_since =
            match std::fs::read_to_string(&since_file).ok().and_then(|t| t.trim().parse().ok()) {
                Some(ms) => ms,
                None => {
                    let now = now_millis();
                    std::fs::write(&since_file, now.to_string())
                        .map_err(|e| format!("writing {}: {e}", since_file.display()))?;
                    now
                }
            };
        Ok(Self(Arc::new(Inner {
            db,
            server_name: config.server.server_name.clone(),
            sync_writes: config.storage.sync_writes,
            store,
            tmp_dir,
            stripes: (0..LOCK_STRIPES).map(|_| Mutex::new(())).collect(),
            commit: Mutex::new(()),
            uploaded: watch::channel(0).0,
            thumbnails: Semaphore::new(media.thumbnail_concurrency),
            previews: Semaphore::new(PREVIEW_CONCURRENCY),
            fetcher,
            held: Default::default(),
            uses_since,
            config: media,
        })))
    }

    pub fn config(&self) -> &MediaConfig {
        &self.0.config
    }

    /// Since when (ms) the events that use media are recorded (`uses.rs`): media older
    /// than that may be used by events the record lacks. Kept in `uses-since` beside the
    /// media; a data directory restored without it starts counting again (more is kept).
    pub fn uses_tracked_since(&self) -> u64 {
        self.0.uses_since
    }

    fn mxc(&self, id: &str) -> String {
        format!("mxc://{}/{id}", self.0.server_name)
    }

    fn stripe(&self, hash: &str) -> &Mutex<()> {
        let n = u8::from_str_radix(hash.get(0..2).unwrap_or("00"), 16).unwrap_or(0);
        &self.0.stripes[usize::from(n) % LOCK_STRIPES]
    }

    /// The record of a media item on this server; remote media is not fetched yet (it
    /// needs federation), so it is simply not found.
    fn record(&self, server: &str, id: &str) -> Result<Option<MediaRecord>> {
        // Other servers' media is here only as a cached copy, under its own server name.
        if !valid_media_id(id) {
            return Ok(None);
        }
        Ok(MEDIA.get(&*self.0.db, &(server.to_owned(), id.to_owned()))?.map(|j| j.0))
    }

    pub fn usage(&self, owner: &str) -> Result<u64> {
        Ok(MEDIA_USAGE.get(&*self.0.db, &owner.to_owned())?.unwrap_or(0))
    }

    /// Whether uploads of `content_type` are allowed (`image/*` matches a whole family).
    fn type_allowed(&self, content_type: &str) -> bool {
        let allowed = &self.0.config.allowed_content_types;
        let base = preview::base_type(content_type);
        allowed.is_empty()
            || allowed.iter().any(|a| {
                let a = a.to_ascii_lowercase();
                match a.strip_suffix("/*") {
                    Some(family) => base.split('/').next() == Some(family),
                    None => a == base,
                }
            })
    }

    /// Checks type, size and quota, then receives the body into a temp file.
    async fn receive<S, E>(&self, upload: &UploadInfo, body: &mut S) -> Result<Spooled>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let content_type = upload.content_type.as_deref().unwrap_or("application/octet-stream");
        if !self.type_allowed(content_type) {
            return Err(Error::forbidden(format!(
                "Uploads of type {content_type} are not allowed"
            )));
        }
        let config = &self.0.config;
        let mut limit = Limit::Size(config.max_upload_bytes);
        if config.user_quota_bytes > 0 && !upload.owner.is_empty() {
            let left = config.user_quota_bytes.saturating_sub(self.usage(&upload.owner)?);
            if left < config.max_upload_bytes {
                limit = Limit::Quota(left);
            }
        }
        if let Some(n) = upload.declared_len
            && n > config.max_upload_bytes.min(match limit {
                Limit::Quota(left) => left,
                Limit::Size(max) => max,
            })
        {
            return Err(if n > config.max_upload_bytes {
                Limit::Size(config.max_upload_bytes).error()
            } else {
                limit.error()
            });
        }
        spool::spool(&self.0.tmp_dir, body, limit, self.0.sync_writes).await
    }

    /// `POST /upload`: stores the body under a new id; returns its `mxc://` URI.
    pub async fn upload<S, E>(&self, upload: Upload<S>) -> Result<String>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let Upload { info, mut body } = upload;
        let spooled = self.receive(&info, &mut body).await?;
        drop(body);
        let id = crate::random::alphanumeric(MEDIA_ID_LEN);
        let server = self.0.server_name.clone();
        self.commit_upload(&info, &server, &id, spooled, false).await?;
        Ok(self.mxc(&id))
    }

    /// `POST /create`: reserves an id for a later upload; returns it and its expiry.
    pub async fn create(&self, owner: &str) -> Result<(String, u64)> {
        let id = crate::random::alphanumeric(MEDIA_ID_LEN);
        let now = now_millis();
        let expires = now + self.0.config.unused_id_lifetime_seconds * 1000;
        let record = MediaRecord {
            owner: owner.to_owned(),
            created_ms: now,
            sha256: None,
            size: 0,
            content_type: None,
            filename: None,
            expires_ms: Some(expires),
            quarantined: false,
            quarantined_by: None,
            protected: false,
            dimensions: None,
            last_access_ms: None,
        };
        let mut batch = Batch::new();
        MEDIA.put(&mut batch, &(self.0.server_name.clone(), id.clone()), &Json(record));
        crate::commit(&self.0.db, batch).await?;
        Ok((self.mxc(&id), expires))
    }

    /// `PUT /upload/{server}/{id}`: the content for an id from `/create`.
    pub async fn upload_to<S, E>(&self, server: &str, id: &str, upload: Upload<S>) -> Result<()>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let Upload { info, mut body } = upload;
        if server != self.0.server_name {
            return Err(Error::not_found("Unknown media id"));
        }
        // Checked before reading the body, and again at commit (a concurrent upload).
        self.pending_for(server, id, &info.owner)?;
        let spooled = self.receive(&info, &mut body).await?;
        drop(body);
        self.commit_upload(&info, server, id, spooled, true).await
    }

    /// Whether this server has a record of `(server, id)` (any state).
    pub fn known(&self, server: &str, id: &str) -> Result<bool> {
        Ok(self.record(server, id)?.is_some())
    }

    /// Caches media fetched from another server under its own `(server, id)`; it counts
    /// against nobody's quota.
    pub async fn store_remote(
        &self,
        server: &str,
        id: &str,
        content_type: Option<String>,
        filename: Option<String>,
        body: Bytes,
    ) -> Result<()> {
        if !valid_media_id(id) {
            return Err(Error::not_found("Media not found"));
        }
        let info = UploadInfo {
            owner: String::new(),
            content_type,
            filename,
            declared_len: Some(body.len() as u64),
        };
        let mut stream = futures_util::stream::iter([Ok::<_, std::convert::Infallible>(body)]);
        let spooled = self.receive(&info, &mut stream).await?;
        self.commit_upload(&info, server, id, spooled, false).await
    }

    fn pending_for(&self, server: &str, id: &str, owner: &str) -> Result<()> {
        let record =
            self.record(server, id)?.ok_or_else(|| Error::not_found("Unknown media id"))?;
        if record.owner != owner {
            return Err(Error::forbidden("This media id belongs to another user"));
        }
        if record.sha256.is_some() {
            return Err(Error::cannot_overwrite_media());
        }
        if record.expires_ms.is_some_and(|t| t < now_millis()) {
            return Err(Error::not_found("This media id has expired"));
        }
        Ok(())
    }

    async fn commit_upload(
        &self,
        upload: &UploadInfo,
        server: &str,
        id: &str,
        spooled: Spooled,
        pending: bool,
    ) -> Result<()> {
        let content_type =
            upload.content_type.clone().unwrap_or_else(|| "application/octet-stream".into());
        let dimensions = if thumbnail::can_thumbnail(&preview::base_type(&content_type)) {
            let path = spooled.path.to_path_buf();
            tokio::task::spawn_blocking(move || {
                let file = std::fs::File::open(path).ok()?;
                thumbnail::probe(std::io::BufReader::new(file))
            })
            .await
            .unwrap_or(None)
        } else {
            None
        };
        let hash = spooled.sha256.clone();
        let key = (server.to_owned(), id.to_owned());
        let referrer = media_ref(&key.0, id);
        let _file = self.stripe(&hash).lock().await;
        self.0.store.put_file(&hash, &spooled.path, spooled.size).await?;
        let committed = async {
            let _commit = self.0.commit.lock().await;
            let mut record = MediaRecord {
                owner: upload.owner.clone(),
                created_ms: now_millis(),
                sha256: Some(hash.clone()),
                size: spooled.size,
                content_type: Some(content_type.clone()),
                filename: upload.filename.clone(),
                expires_ms: None,
                quarantined: false,
                quarantined_by: None,
                protected: false,
                dimensions,
                last_access_ms: None,
            };
            if pending {
                self.pending_for(&key.0, id, &upload.owner)?;
                if let Some(existing) = self.record(&key.0, id)? {
                    record.created_ms = existing.created_ms;
                }
            }
            let mut batch = Batch::new();
            if !upload.owner.is_empty() {
                let used = self.usage(&upload.owner)? + spooled.size;
                let quota = self.0.config.user_quota_bytes;
                if quota > 0 && used > quota {
                    return Err(Error::resource_limit("This upload would exceed your media quota"));
                }
                MEDIA_USAGE.put(&mut batch, &upload.owner, &used);
            }
            MEDIA.put(&mut batch, &key, &Json(record));
            MEDIA_BLOB_REFS.put(&mut batch, &(hash.clone(), referrer), &());
            crate::commit(&self.0.db, batch).await
        }
        .await;
        if let Err(e) = committed {
            self.release_if_unused(&hash).await?;
            return Err(e);
        }
        drop(_file);
        self.0.uploaded.send_modify(|n| *n += 1);
        if let Some(dims) = dimensions {
            self.spawn_pregeneration(hash, content_type, spooled.size, dims);
        }
        Ok(())
    }

    /// Deletes the file of `hash` if nothing references it. Call under its stripe lock.
    async fn release_if_unused(&self, hash: &str) -> Result<()> {
        let mut refs =
            MEDIA_BLOB_REFS.scan_prefix(&*self.0.db, &hash.to_owned(), Direction::Forward)?;
        if refs.next().is_none() {
            drop(refs);
            self.delete_file(hash).await?;
        }
        Ok(())
    }

    /// Deletes an unreferenced file, or puts that off while a backup holds deletions.
    async fn delete_file(&self, hash: &str) -> Result<()> {
        {
            let mut held = self.0.held.lock().unwrap_or_else(|p| p.into_inner());
            if held.holders > 0 {
                held.deferred.push(hash.to_owned());
                return Ok(());
            }
        }
        self.0.store.delete(hash).await
    }

    /// Deletes every item `localpart` uploaded (an erasure); answers how many. Files
    /// others use too stay for them. One that cannot be deleted now is logged, and the
    /// others still go.
    pub async fn delete_uploads_of(&self, localpart: &str) -> Result<usize> {
        let mut deleted = 0;
        for (id, _) in self.uploads_of(localpart)? {
            match self.delete(&self.0.server_name, &id).await {
                Ok(()) => deleted += 1,
                Err(e) => {
                    tracing::warn!(media = %id, error = %e, "deleting an erased user's upload")
                }
            }
        }
        Ok(deleted)
    }

    /// The items `localpart` uploaded (with their ids), uploads still awaited included.
    pub fn uploads_of(&self, localpart: &str) -> Result<Vec<(String, MediaRecord)>> {
        let mut out = Vec::new();
        let server = self.0.server_name.clone();
        for row in MEDIA.scan_prefix(&*self.0.db, &server, Direction::Forward)? {
            let ((_, id), Json(record)) = row?;
            if record.owner == localpart {
                out.push((id, record));
            }
        }
        Ok(out)
    }

    /// The files whose deletion a hold puts off now.
    pub fn held_deletions(&self) -> Vec<String> {
        self.0.held.lock().unwrap_or_else(|p| p.into_inner()).deferred.clone()
    }

    /// Puts off every file deletion until the answer is dropped: a backup copying the
    /// files its database checkpoint refers to finds each of them.
    pub fn hold_deletions(&self) -> DeletionHold {
        self.0.held.lock().unwrap_or_else(|p| p.into_inner()).holders += 1;
        DeletionHold(self.clone())
    }

    /// The hash of every stored file (original, thumbnail or rendition) something refers
    /// to.
    pub fn stored_hashes(&self) -> Result<Vec<String>> {
        let mut out: Vec<String> = Vec::new();
        for row in MEDIA_BLOB_REFS.scan_prefix(&*self.0.db, &(), Direction::Forward)? {
            let ((hash, _), ()) = row?;
            if out.last() != Some(&hash) {
                out.push(hash);
            }
        }
        Ok(out)
    }

    /// Copies the content of stored file `hash` to `to`, answering the SHA-256 of what it
    /// read and its length, or `None` when the store lacks it.
    pub async fn copy_file_to(&self, hash: &str, to: &Path) -> Result<Option<(String, u64)>> {
        copy_from(&*self.0.store, hash, to).await
    }

    /// Copies stored file `hash` as it lies in the store (encrypted when media are), with
    /// the SHA-256 and length of those bytes; `None` when the store lacks it.
    pub async fn copy_stored_bytes_to(
        &self,
        hash: &str,
        to: &Path,
    ) -> Result<Option<(String, u64)>> {
        copy_from(self.0.store.raw(), hash, to).await
    }

    /// How stored file `hash` is sealed (plaintext without encryption at rest).
    pub async fn sealing(&self, hash: &str) -> Result<store_crypt::Sealing> {
        self.0.store.sealing(hash).await
    }

    /// Rewrites every stored file that is not sealed under the current key: files from
    /// before encryption was turned on and files under a retired key. Answers how many
    /// were rewritten. A marker file remembers a finished pass, so that later starts with
    /// the same key skip the scan (every file written since is sealed under it).
    pub async fn reseal(&self) -> Result<usize> {
        let marker = self.0.tmp_dir.with_file_name("sealed-under");
        let Some(current) = self.0.store.current_key() else {
            // Files stored now are plaintext: a later start with keys must look again.
            let _ = tokio::fs::remove_file(&marker).await;
            return Ok(0);
        };
        let current_hex = hex(&current);
        if tokio::fs::read_to_string(&marker).await.is_ok_and(|m| m.trim() == current_hex) {
            return Ok(0);
        }
        let (mut resealed, mut skipped) = (0, 0);
        for hash in self.stored_hashes()? {
            match self.reseal_one(&hash, current).await {
                Ok(true) => {
                    resealed += 1;
                    if resealed % 1000 == 0 {
                        tracing::info!(resealed, "resealing media files");
                    }
                }
                Ok(false) => {}
                Err(e) => {
                    // Missing, damaged or under a key no longer configured: left as it is
                    // (and unservable if it cannot be read), the others go on.
                    tracing::warn!(hash, error = %e, "a media file was not resealed");
                    skipped += 1;
                }
            }
        }
        if skipped == 0 {
            tokio::fs::write(&marker, &current_hex)
                .await
                .map_err(|e| Error::io("writing the media sealing marker", e))?;
        }
        Ok(resealed)
    }

    /// Seals file `hash` under key `current` unless it is already; `true` if it was
    /// rewritten. Under the file's lock, and only while something still refers to it,
    /// so a file deleted meanwhile is not brought back.
    async fn reseal_one(&self, hash: &str, current: [u8; 8]) -> Result<bool> {
        let _file = self.stripe(hash).lock().await;
        let referred =
            MEDIA_BLOB_REFS.scan_prefix(&*self.0.db, &hash.to_owned(), Direction::Forward)?.next();
        if referred.is_none() || self.0.store.sealing(hash).await?.key() == Some(current) {
            return Ok(false);
        }
        let tmp = self.0.tmp_dir.join(format!("{hash}.reseal"));
        let copied = self.copy_file_to(hash, &tmp).await;
        let result = match copied {
            Ok(Some((sha, len))) if sha == hash => {
                self.0.store.replace_file(hash, &tmp, len).await.map(|()| true)
            }
            Ok(other) => Err(Error::internal("resealing media", format!("content is {other:?}"))),
            Err(e) => Err(e),
        };
        let _ = tokio::fs::remove_file(&tmp).await;
        result
    }

    /// The content of a servable media item, waiting up to `wait` for an async upload.
    pub async fn content(&self, server: &str, id: &str, wait: Duration) -> Result<Content> {
        let record = self.ready_record(server, id, wait).await?;
        let content_type =
            record.content_type.unwrap_or_else(|| "application/octet-stream".to_owned());
        Ok(Content {
            sha256: record.sha256.unwrap_or_default(),
            size: record.size,
            content_type,
            filename: record.filename,
            inline: None,
        })
    }

    async fn ready_record(&self, server: &str, id: &str, wait: Duration) -> Result<MediaRecord> {
        let not_found = || Error::not_found("Media not found");
        let wait = wait.min(Duration::from_secs(self.0.config.max_download_wait_seconds));
        let deadline = tokio::time::Instant::now() + wait;
        // Subscribed before each check, so an upload landing in between is not missed.
        let mut uploads = self.0.uploaded.subscribe();
        loop {
            let record = self.record(server, id)?.ok_or_else(not_found)?;
            if record.quarantined {
                return Err(not_found());
            }
            if record.sha256.is_some() {
                self.touch(server, id, &record).await;
                return Ok(record);
            }
            if record.expires_ms.is_some_and(|t| t < now_millis()) {
                return Err(not_found());
            }
            match tokio::time::timeout_at(deadline, uploads.changed()).await {
                Ok(Ok(())) => continue,
                _ => return Err(Error::not_yet_uploaded()),
            }
        }
    }

    /// Notes that an item is served, at most once a day per item.
    async fn touch(&self, server: &str, id: &str, record: &MediaRecord) {
        let now = now_millis();
        if now.saturating_sub(record.last_access_ms.unwrap_or(0)) < ACCESS_RESOLUTION_MS {
            return;
        }
        let _commit = self.0.commit.lock().await;
        // Read again under the lock: an admin action may have changed the record.
        let Ok(Some(mut fresh)) = self.record(server, id) else { return };
        fresh.last_access_ms = Some(now);
        let mut batch = Batch::new();
        MEDIA.put(&mut batch, &(server.to_owned(), id.to_owned()), &Json(fresh));
        // Unsynced: a day's resolution survives losing the last second of writes.
        if let Err(e) = self.0.db.write_unsynced(batch) {
            tracing::debug!(error = %e, "recording a media access");
        }
    }

    /// Media retention at time `now` (ms): deletes local items not served for
    /// `local_days` and copies of remote ones not served for `remote_days` (0: never),
    /// sparing protected items and the URIs in `keep` (avatars in use). Items never
    /// served yet are given the time of the first sweep that sees them, so turning
    /// retention on deletes nothing at once. Answers how many went.
    pub async fn expire_unused(
        &self,
        now: u64,
        local_days: u64,
        remote_days: u64,
        keep: &std::collections::HashSet<String>,
    ) -> Result<usize> {
        if local_days == 0 && remote_days == 0 {
            return Ok(0);
        }
        let day = 24 * 3600 * 1000u64;
        let mut stale = Vec::new();
        {
            let _commit = self.0.commit.lock().await;
            let mut stamped = Batch::new();
            for row in MEDIA.scan_prefix(&*self.0.db, &(), Direction::Forward)? {
                let ((server, id), Json(mut record)) = row?;
                // Quarantined items are kept as evidence until an admin deletes them.
                if record.sha256.is_none() || record.protected || record.quarantined {
                    continue;
                }
                let Some(last) = record.last_access_ms else {
                    record.last_access_ms = Some(now);
                    MEDIA.put(&mut stamped, &(server, id), &Json(record));
                    continue;
                };
                let days = if server == self.0.server_name { local_days } else { remote_days };
                if days > 0
                    && now.saturating_sub(last) > days.saturating_mul(day)
                    && !keep.contains(&format!("mxc://{server}/{id}"))
                {
                    stale.push((server, id));
                }
            }
            crate::commit(&self.0.db, stamped).await?;
        }
        let mut deleted = 0;
        let cutoff = |server: &str| {
            let days = if server == self.0.server_name { local_days } else { remote_days };
            now.saturating_sub(days.saturating_mul(day))
        };
        for (server, id) in stale {
            // Served or protected since the scan: kept.
            let Ok(Some(record)) = self.record(&server, &id) else { continue };
            if record.protected || record.last_access_ms.is_none_or(|t| t >= cutoff(&server)) {
                continue;
            }
            match self.delete(&server, &id).await {
                Ok(()) => deleted += 1,
                Err(e) => tracing::warn!(media = %id, error = %e, "deleting unused media"),
            }
        }
        Ok(deleted)
    }

    /// Streams `range` of `content` (all of it when `None`).
    pub async fn open(&self, content: &Content, range: Option<Range<u64>>) -> Result<BlobStream> {
        self.0.store.open(&content.sha256, range).await
    }

    /// A thumbnail of an image: a stored one, or made now (and stored).
    pub async fn thumbnail(
        &self,
        server: &str,
        id: &str,
        request: ThumbnailRequest,
        wait: Duration,
    ) -> Result<Content> {
        let record = self.ready_record(server, id, wait).await?;
        let hash = record.sha256.clone().unwrap_or_default();
        let content_type = record.content_type.clone().unwrap_or_default();
        let base = preview::base_type(&content_type);
        let cannot = || {
            Error::new(
                ErrorKind::BadRequest,
                code::UNKNOWN,
                "Cannot generate a thumbnail of this content",
            )
        };
        if !thumbnail::can_thumbnail(&base) {
            return Err(cannot());
        }
        let original = Content {
            sha256: hash.clone(),
            size: record.size,
            content_type: base.clone(),
            filename: record.filename.clone(),
            inline: None,
        };
        let may_animate = matches!(base.as_str(), "image/gif" | "image/webp");
        if request.animated == Some(true)
            && may_animate
            && record.size <= ANIMATED_PASSTHROUGH_BYTES
        {
            return Ok(original);
        }
        let dims = record.dimensions.ok_or_else(cannot)?;
        if u64::from(dims.0) * u64::from(dims.1) > self.0.config.max_image_pixels {
            return Err(Error::too_large("The image is too large to thumbnail"));
        }
        let spec = request.spec;
        // The spec: content smaller than asked is returned as it is — unless it might be
        // animated and animation was ruled out.
        if dims.0 <= spec.width && dims.1 <= spec.height && !may_animate {
            return Ok(original);
        }
        let key = spec.key();
        if let Some(v) = MEDIA_VARIANTS.get(&*self.0.db, &(hash.clone(), key.clone()))? {
            return Ok(variant_content(v.0));
        }
        let rendition = MEDIA_VARIANTS.get(&*self.0.db, &(hash.clone(), RENDITION.to_owned()))?;
        let ((sw, sh), _) = thumbnail::target(dims, spec);
        let source = match rendition {
            Some(r) if r.0.width >= sw && r.0.height >= sh => r.0.sha256,
            _ => hash.clone(),
        };
        let lossless = base != "image/jpeg";
        let bytes = self.0.store.read(&source).await?;
        let max_pixels = self.0.config.max_image_pixels;
        let _permit =
            self.0.thumbnails.acquire().await.map_err(|e| Error::internal("thumbnailer", e))?;
        let span = tracing::debug_span!("thumbnail", key = %key);
        let encoded = tokio::task::spawn_blocking(move || {
            let _enter = span.enter();
            let image = thumbnail::decode(&bytes, max_pixels)?;
            thumbnail::encode(&thumbnail::render(&image, dims, spec), lossless)
        })
        .await
        .map_err(|e| Error::internal("thumbnail task", e))?
        .map_err(|e| match e {
            thumbnail::ThumbError::TooLarge => {
                Error::too_large("The image is too large to thumbnail")
            }
            thumbnail::ThumbError::Undecodable(_) => cannot(),
            thumbnail::ThumbError::Encode(e) => Error::internal("encoding a thumbnail", e),
        })?;
        let stored = MEDIA_VARIANTS
            .scan_prefix(&*self.0.db, &hash, Direction::Forward)?
            .take(MAX_VARIANTS + 1)
            .count();
        if stored >= MAX_VARIANTS {
            let mut content = variant_content(MediaVariant {
                sha256: String::new(),
                content_type: encoded.content_type.to_owned(),
                width: encoded.width,
                height: encoded.height,
                size: encoded.bytes.len() as u64,
            });
            content.inline = Some(encoded.bytes.into());
            return Ok(content);
        }
        Ok(variant_content(self.store_variant(&hash, &key, encoded).await?))
    }

    /// Stores a derived file and records it as variant `key` of the file `of`.
    async fn store_variant(
        &self,
        of: &str,
        key: &str,
        encoded: thumbnail::Encoded,
    ) -> Result<MediaVariant> {
        let body = futures_util::stream::iter([Ok::<_, std::convert::Infallible>(Bytes::from(
            encoded.bytes,
        ))]);
        let spooled =
            spool::spool(&self.0.tmp_dir, body, Limit::Size(u64::MAX), self.0.sync_writes).await?;
        let variant = MediaVariant {
            sha256: spooled.sha256.clone(),
            content_type: encoded.content_type.to_owned(),
            width: encoded.width,
            height: encoded.height,
            size: spooled.size,
        };
        // Lock order: the original's stripe, then the variant's (never the reverse), so a
        // thumbnail finishing while its original is deleted cannot outlive it.
        let original = self.stripe(of);
        let _original = original.lock().await;
        let mut refs =
            MEDIA_BLOB_REFS.scan_prefix(&*self.0.db, &of.to_owned(), Direction::Forward)?;
        if refs.next().is_none() {
            return Err(Error::not_found("The original is gone"));
        }
        drop(refs);
        let file = self.stripe(&variant.sha256);
        let _file = if std::ptr::eq(file, original) { None } else { Some(file.lock().await) };
        self.0.store.put_file(&variant.sha256, &spooled.path, spooled.size).await?;
        let mut batch = Batch::new();
        let referrer = format!("variant:{of}:{key}");
        MEDIA_BLOB_REFS.put(&mut batch, &(variant.sha256.clone(), referrer), &());
        MEDIA_VARIANTS.put(&mut batch, &(of.to_owned(), key.to_owned()), &Json(variant.clone()));
        crate::commit(&self.0.db, batch).await?;
        Ok(variant)
    }

    /// Makes the standard thumbnails (and the rendition of a large image) in the
    /// background, decoding the original once.
    fn spawn_pregeneration(&self, hash: String, content_type: String, size: u64, dims: (u32, u32)) {
        if u64::from(dims.0) * u64::from(dims.1) > self.0.config.max_image_pixels {
            return;
        }
        let media = self.clone();
        let span = tracing::info_span!("thumbnail_pregeneration", hash = %hash, size);
        tokio::spawn(
            async move {
                if let Err(e) = media.pregenerate(&hash, &content_type, dims).await {
                    tracing::info!(error = %e, "pre-generating thumbnails failed");
                }
            }
            .instrument(span),
        );
    }

    async fn pregenerate(&self, hash: &str, content_type: &str, dims: (u32, u32)) -> Result<()> {
        let _permit =
            self.0.thumbnails.acquire().await.map_err(|e| Error::internal("thumbnailer", e))?;
        let bytes = self.0.store.read(hash).await?;
        let max_pixels = self.0.config.max_image_pixels;
        let max_side = self.0.config.rendition_max_side;
        let lossless = preview::base_type(content_type) != "image/jpeg";
        let may_animate =
            matches!(preview::base_type(content_type).as_str(), "image/gif" | "image/webp");
        let outputs = tokio::task::spawn_blocking(move || {
            let image = match thumbnail::decode(&bytes, max_pixels) {
                Ok(image) => image,
                Err(e) => return Err(format!("{e:?}")),
            };
            let mut out = Vec::new();
            let rendition = thumbnail::rendition(&image, max_side);
            if let Some(r) = &rendition {
                out.push((RENDITION.to_owned(), thumbnail::encode(r, lossless)));
            }
            for spec in thumbnail::STANDARD {
                if dims.0 <= spec.width && dims.1 <= spec.height && !may_animate {
                    continue; // served as the original
                }
                let ((sw, sh), _) = thumbnail::target(dims, spec);
                let source = match &rendition {
                    Some(r) if r.width() >= sw && r.height() >= sh => r,
                    _ => &image,
                };
                out.push((
                    spec.key(),
                    thumbnail::encode(&thumbnail::render(source, dims, spec), lossless),
                ));
            }
            Ok(out)
        })
        .await
        .map_err(|e| Error::internal("thumbnail task", e))?
        .map_err(|e| Error::internal("decoding an upload", e))?;
        drop(_permit);
        for (key, encoded) in outputs {
            match encoded {
                Ok(encoded) => {
                    self.store_variant(hash, &key, encoded).await?;
                }
                Err(e) => tracing::info!(key, error = ?e, "encoding a thumbnail failed"),
            }
        }
        Ok(())
    }

    /// `preview_url`: OpenGraph data of a page, its image stored as media.
    pub async fn preview(&self, url: &str) -> Result<Value> {
        let config = &self.0.config;
        if !config.url_preview {
            return Err(Error::forbidden("URL previews are disabled on this server"));
        }
        let parsed = reqwest::Url::parse(url)
            .map_err(|_| Error::invalid_param("url is not a valid absolute URL"))?;
        if let Some(cached) = URL_PREVIEWS.get(&*self.0.db, &url.to_owned())?
            && now_millis().saturating_sub(cached.0.fetched_ms)
                < config.url_preview_cache_seconds * 1000
        {
            return Ok(cached.0.og);
        }
        let _permit =
            self.0.previews.acquire().await.map_err(|e| Error::internal("previews", e))?;
        let span = tracing::info_span!("url_preview", host = parsed.host_str().unwrap_or(""));
        let og = self.build_preview(&parsed).instrument(span).await?;
        let mut batch = Batch::new();
        let record = UrlPreviewRecord { fetched_ms: now_millis(), og: og.clone() };
        URL_PREVIEWS.put(&mut batch, &url.to_owned(), &Json(record));
        crate::commit(&self.0.db, batch).await?;
        Ok(og)
    }

    /// Removes ids from `/create` that expired unused and cached previews older than the
    /// cache lifetime; returns how many records went. Scans the tables: run rarely.
    pub async fn sweep(&self) -> Result<usize> {
        let now = now_millis();
        let mut batch = Batch::new();
        let mut removed = 0;
        {
            let _commit = self.0.commit.lock().await;
            for row in MEDIA.scan_range(
                &*self.0.db,
                std::ops::Bound::Unbounded,
                std::ops::Bound::Unbounded,
                Direction::Forward,
            )? {
                let (key, Json(record)) = row?;
                if record.sha256.is_none() && record.expires_ms.is_some_and(|t| t < now) {
                    MEDIA.delete(&mut batch, &key);
                    removed += 1;
                }
            }
            let lifetime = self.0.config.url_preview_cache_seconds.saturating_mul(1000);
            for row in URL_PREVIEWS.scan_range(
                &*self.0.db,
                std::ops::Bound::Unbounded,
                std::ops::Bound::Unbounded,
                Direction::Forward,
            )? {
                let (url, Json(record)) = row?;
                if now.saturating_sub(record.fetched_ms) >= lifetime {
                    URL_PREVIEWS.delete(&mut batch, &url);
                    removed += 1;
                }
            }
            if removed > 0 {
                crate::commit(&self.0.db, batch).await?;
            }
        }
        Ok(removed)
    }

    async fn build_preview(&self, url: &reqwest::Url) -> Result<Value> {
        let page = self.0.fetcher.fetch(url).await.map_err(fetch_error)?;
        let page_type = preview::base_type(&page.content_type);
        let mut og = Map::new();
        if page_type.starts_with("image/") {
            if page.truncated {
                return Err(fetch_error(preview::FetchError::TooLarge));
            }
            self.attach_image(&mut og, page).await?;
        } else if page_type == "text/html" || page_type == "application/xhtml+xml" {
            let html = String::from_utf8_lossy(&page.body);
            og = preview::opengraph(&html, &page.url);
            if let Some(image_url) = og.get("og:image").and_then(Value::as_str).map(str::to_owned) {
                og.remove("og:image");
                // A page is still worth previewing without its image.
                let fetched = match reqwest::Url::parse(&image_url) {
                    Ok(image_url) => self.0.fetcher.fetch(&image_url).await,
                    Err(e) => Err(preview::FetchError::Failed(e.to_string())),
                };
                match fetched {
                    Ok(image)
                        if !image.truncated
                            && preview::base_type(&image.content_type).starts_with("image/") =>
                    {
                        if let Err(e) = self.attach_image(&mut og, image).await {
                            tracing::debug!(error = %e, "preview image not stored");
                        }
                    }
                    Ok(_) => tracing::debug!("preview image too large or not an image"),
                    Err(e) => tracing::debug!(error = ?e, "preview image not fetched"),
                }
            }
        }
        Ok(Value::Object(og))
    }

    /// Stores a fetched image as media and describes it in `og`.
    async fn attach_image(
        &self,
        og: &mut Map<String, Value>,
        image: preview::Fetched,
    ) -> Result<()> {
        let content_type = preview::base_type(&image.content_type);
        let size = image.body.len() as u64;
        let upload = Upload {
            info: UploadInfo {
                // Owned by the server, outside any quota: the user did not choose it.
                owner: String::new(),
                content_type: Some(content_type.clone()),
                filename: None,
                declared_len: Some(size),
            },
            body: futures_util::stream::iter([Ok::<_, std::convert::Infallible>(image.body)]),
        };
        let mxc = self.upload(upload).await?;
        let id = mxc.rsplit('/').next().unwrap_or_default().to_owned();
        if let Some((w, h)) = self.record(&self.0.server_name, &id)?.and_then(|r| r.dimensions) {
            og.entry("og:image:width").or_insert(Value::from(w));
            og.entry("og:image:height").or_insert(Value::from(h));
        }
        og.insert("og:image".into(), Value::String(mxc));
        og.insert("og:image:type".into(), Value::String(content_type));
        og.insert("matrix:image:size".into(), Value::from(size));
        Ok(())
    }

    /// Admin: nobody is served this media item any more (with `by`, the admin's user
    /// id) or it is served again (`None`); its file is kept either way.
    pub async fn quarantine(&self, server: &str, id: &str, by: Option<&str>) -> Result<()> {
        self.change(server, id, |record| {
            record.quarantined = by.is_some();
            record.quarantined_by = by.map(str::to_owned);
        })
        .await
    }

    /// Admin: protects a media item from quarantines of a whole user or room, or not.
    pub async fn protect(&self, server: &str, id: &str, protected: bool) -> Result<()> {
        self.change(server, id, |record| record.protected = protected).await
    }

    /// An item's record, for an admin (404 when there is none).
    pub fn info(&self, server: &str, id: &str) -> Result<MediaRecord> {
        self.record(server, id)?.ok_or_else(|| Error::not_found("Media not found"))
    }

    async fn change(&self, server: &str, id: &str, f: impl FnOnce(&mut MediaRecord)) -> Result<()> {
        let _commit = self.0.commit.lock().await;
        let mut record =
            self.record(server, id)?.ok_or_else(|| Error::not_found("Media not found"))?;
        f(&mut record);
        let mut batch = Batch::new();
        MEDIA.put(&mut batch, &(server.to_owned(), id.to_owned()), &Json(record));
        crate::commit(&self.0.db, batch).await
    }

    /// Admin: removes a media item; its file (and thumbnails) go with the last reference.
    pub async fn delete(&self, server: &str, id: &str) -> Result<()> {
        let record = self.record(server, id)?.ok_or_else(|| Error::not_found("Media not found"))?;
        let key = (server.to_owned(), id.to_owned());
        let Some(hash) = record.sha256.clone() else {
            let mut batch = Batch::new();
            MEDIA.delete(&mut batch, &key);
            return crate::commit(&self.0.db, batch).await;
        };
        let _file = self.stripe(&hash).lock().await;
        {
            let _commit = self.0.commit.lock().await;
            let mut batch = Batch::new();
            MEDIA.delete(&mut batch, &key);
            MEDIA_BLOB_REFS.delete(&mut batch, &(hash.clone(), media_ref(server, id)));
            if !record.owner.is_empty() {
                let used = self.usage(&record.owner)?.saturating_sub(record.size);
                MEDIA_USAGE.put(&mut batch, &record.owner, &used);
            }
            crate::commit(&self.0.db, batch).await?;
        }
        let mut refs = MEDIA_BLOB_REFS.scan_prefix(&*self.0.db, &hash, Direction::Forward)?;
        if refs.next().is_some() {
            return Ok(());
        }
        drop(refs);
        // The last user of this content: its derived files go too.
        let variants: Vec<(String, MediaVariant)> = MEDIA_VARIANTS
            .scan_prefix(&*self.0.db, &hash, Direction::Forward)?
            .filter_map(|row| row.ok())
            .map(|((_, name), v)| (name, v.0))
            .collect();
        let mut batch = Batch::new();
        for (name, v) in &variants {
            MEDIA_VARIANTS.delete(&mut batch, &(hash.clone(), name.clone()));
            MEDIA_BLOB_REFS
                .delete(&mut batch, &(v.sha256.clone(), format!("variant:{hash}:{name}")));
        }
        crate::commit(&self.0.db, batch).await?;
        self.delete_file(&hash).await?;
        drop(_file);
        for (_, v) in variants {
            let _vfile = self.stripe(&v.sha256).lock().await;
            self.release_if_unused(&v.sha256).await?;
        }
        Ok(())
    }

    /// Whether the file of `hash` is still stored (tests and tooling).
    pub async fn stored(&self, hash: &str) -> Result<bool> {
        self.0.store.contains(hash).await
    }

    pub fn tmp_dir(&self) -> &Path {
        &self.0.tmp_dir
    }
}

fn media_ref(server: &str, id: &str) -> String {
    format!("media:{server}/{id}")
}

fn variant_content(v: MediaVariant) -> Content {
    let ext = if v.content_type == "image/png" { "png" } else { "jpg" };
    Content {
        sha256: v.sha256,
        size: v.size,
        content_type: v.content_type,
        filename: Some(format!("thumbnail.{ext}")),
        inline: None,
    }
}

fn fetch_error(e: preview::FetchError) -> Error {
    match e {
        preview::FetchError::Refused => {
            Error::forbidden("URL previews of this address are not allowed")
        }
        preview::FetchError::TooLarge => Error::too_large("The linked content is too large"),
        preview::FetchError::Failed(detail) => {
            tracing::debug!(detail, "URL preview fetch failed");
            Error::new(ErrorKind::Upstream, code::UNKNOWN, "Could not fetch the URL")
        }
    }
}

/// The spec's sanitising rule for media ids: `A-Za-z0-9_-` only.
pub fn valid_media_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 255
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_janitor_drops_unused_ids_and_stale_previews() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = trellis_core::Config::default();
        config.server.data_dir = dir.path().to_owned();
        config.media.unused_id_lifetime_seconds = 0;
        config.media.url_preview_cache_seconds = 0;
        let storage =
            trellis_core::config::StorageConfig { sync_writes: false, ..Default::default() };
        let db = trellis_store::open(&dir.path().join("db"), &storage).unwrap();
        let media = Media::new(&config, db.clone(), None).unwrap();
        let (mxc, _) = media.create("alice").await.unwrap();
        let id = mxc.rsplit('/').next().unwrap().to_owned();
        let mut batch = Batch::new();
        let record = UrlPreviewRecord { fetched_ms: 1, og: serde_json::json!({}) };
        URL_PREVIEWS.put(&mut batch, &"https://example.org/".to_owned(), &Json(record));
        db.write(batch).unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;

        assert_eq!(media.sweep().await.unwrap(), 2);
        assert!(!media.known(&config.server.server_name, &id).unwrap());
        assert_eq!(media.sweep().await.unwrap(), 0, "nothing left to sweep");
    }

    #[tokio::test]
    async fn media_nobody_asked_for_in_a_while_go_but_avatars_and_protected_stay() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = trellis_core::Config::default();
        config.server.data_dir = dir.path().to_owned();
        let storage =
            trellis_core::config::StorageConfig { sync_writes: false, ..Default::default() };
        let db = trellis_store::open(&dir.path().join("db"), &storage).unwrap();
        let media = Media::new(&config, db, None).unwrap();
        let server = config.server.server_name.clone();
        let mut ids = Vec::new();
        for n in 0..3u8 {
            let upload = Upload {
                info: UploadInfo {
                    owner: "alice".into(),
                    content_type: Some("application/octet-stream".into()),
                    filename: None,
                    declared_len: None,
                },
                body: futures_util::stream::iter([Ok::<_, std::convert::Infallible>(Bytes::from(
                    vec![n; 100],
                ))]),
            };
            let mxc = media.upload(upload).await.unwrap();
            ids.push(mxc.rsplit('/').next().unwrap().to_owned());
        }
        media.protect(&server, &ids[2], true).await.unwrap();
        let keep = [format!("mxc://{server}/{}", ids[1])].into_iter().collect();
        let now = now_millis();
        let day = 24 * 3600 * 1000;
        assert_eq!(media.expire_unused(now, 1, 0, &keep).await.unwrap(), 0, "first seen now");
        assert_eq!(media.expire_unused(now + 2 * day, 0, 1, &keep).await.unwrap(), 0, "local kept");
        assert_eq!(media.expire_unused(now + 2 * day, 1, 0, &keep).await.unwrap(), 1);
        assert!(!media.known(&server, &ids[0]).unwrap());
        assert!(media.known(&server, &ids[1]).unwrap() && media.known(&server, &ids[2]).unwrap());
        // Serving an item counts as a use.
        media.content(&server, &ids[1], Duration::ZERO).await.unwrap();
        let record = media.record(&server, &ids[1]).unwrap().unwrap();
        assert!(record.last_access_ms.unwrap() >= now);
    }
}
