//! Where backups are kept: a directory or an S3-compatible bucket, both through
//! `object_store`. File contents are stored once each, named by their SHA-256
//! (`files/<ab>/<sha256>`), whatever the number of backups that hold them: that is what
//! makes every backup after the first incremental. `manifests/<id>.json` lists the files
//! of one backup; it is written last, so a backup cut short leaves no manifest. A backup
//! being taken announces itself in `pending/<id>` so that a prune does not take its new
//! files away.

use std::{path::Path, sync::Arc, time::Duration};

use futures_util::TryStreamExt;
use object_store::{
    ObjectMeta, ObjectStore, ObjectStoreExt, PutPayload, aws::AmazonS3Builder,
    local::LocalFileSystem, path::Path as ObjectPath,
};
use trellis_core::{Error, Result, config::BackupConfig};

use super::{failure, manifest::Manifest};
use crate::media::upload_file;

/// A pending marker older than this is from a backup that died; prune ignores it.
const PENDING_EXPIRY: Duration = Duration::from_secs(24 * 3600);

pub struct Repository {
    store: Arc<dyn ObjectStore>,
    /// Where it is, for messages and the manifest list.
    describe: String,
}

fn store_err(context: &'static str) -> impl Fn(object_store::Error) -> Error {
    move |e| failure(context)(&e)
}

fn io_err(context: &'static str) -> impl Fn(std::io::Error) -> Error {
    move |e| failure(context)(&e)
}

/// Backup ids and content hashes are ours; anything else in a name is refused.
fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

fn valid_sha(sha: &str) -> bool {
    sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

impl Repository {
    /// The repository `destination` names: `s3://bucket/prefix` or a local directory
    /// (created if missing).
    pub fn open(destination: &str, config: &BackupConfig) -> std::result::Result<Self, String> {
        if destination.is_empty() {
            return Err("no backup destination: set backup.destination or pass --to".into());
        }
        let store: Arc<dyn ObjectStore> = match destination.strip_prefix("s3://") {
            Some(rest) => {
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                let mut builder = AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_region(&config.s3_region)
                    .with_allow_http(config.s3_allow_http);
                if !config.s3_endpoint.is_empty() {
                    builder = builder
                        .with_endpoint(&config.s3_endpoint)
                        .with_virtual_hosted_style_request(false);
                }
                if !config.s3_access_key_id.is_empty() {
                    builder = builder
                        .with_access_key_id(&config.s3_access_key_id)
                        .with_secret_access_key(&config.s3_secret_access_key);
                }
                let s3 = builder.build().map_err(|e| format!("backup.s3_*: {e}"))?;
                let prefix = prefix.trim_matches('/');
                if prefix.is_empty() {
                    Arc::new(s3)
                } else {
                    Arc::new(object_store::prefix::PrefixStore::new(s3, prefix))
                }
            }
            None => {
                std::fs::create_dir_all(destination)
                    .map_err(|e| format!("creating {destination}: {e}"))?;
                let local = LocalFileSystem::new_with_prefix(destination)
                    .map_err(|e| format!("{destination}: {e}"))?;
                Arc::new(local.with_automatic_cleanup(true))
            }
        };
        Ok(Self { store, describe: destination.to_owned() })
    }

    pub fn describe(&self) -> &str {
        &self.describe
    }

    fn file_path(sha: &str) -> Result<ObjectPath> {
        if !valid_sha(sha) {
            return Err(failure("backup repository")(&format!("invalid hash {sha:?}")));
        }
        Ok(ObjectPath::from(format!("files/{}/{sha}", &sha[0..2])))
    }

    fn manifest_path(id: &str) -> Result<ObjectPath> {
        if !valid_id(id) {
            return Err(Error::not_found("No such backup"));
        }
        Ok(ObjectPath::from(format!("manifests/{id}.json")))
    }

    /// The size of the stored file with this content, if it is stored.
    pub async fn file_size(&self, sha: &str) -> Result<Option<u64>> {
        match self.store.head(&Self::file_path(sha)?).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(failure("backup repository")(&e)),
        }
    }

    /// Stores the local file `file` (of `len` bytes) as the contents hashing to `sha`.
    pub async fn put_file(&self, sha: &str, file: &Path, len: u64) -> Result<()> {
        upload_file(&*self.store, &Self::file_path(sha)?, file, len).await
    }

    /// Writes the stored file `sha` to `to`, answering the SHA-256 of what was read (the
    /// caller compares).
    pub async fn get_file(&self, sha: &str, to: &Path) -> Result<(String, u64)> {
        let result =
            self.store.get(&Self::file_path(sha)?).await.map_err(store_err("reading a backup"))?;
        let stream = Box::pin(result.into_stream().map_err(std::io::Error::other));
        let (out, sha, len) = crate::media::write_hashed(stream, to)
            .await
            .map_err(io_err("restoring a file from a backup"))?;
        out.sync_all().await.map_err(io_err("restoring a file"))?;
        Ok((sha, len))
    }

    /// Removes `path`; a missing one is not an error.
    async fn delete(&self, path: &ObjectPath, context: &'static str) -> Result<()> {
        match self.store.delete(path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(failure(context)(&e)),
        }
    }

    pub async fn delete_file(&self, sha: &str) -> Result<()> {
        self.delete(&Self::file_path(sha)?, "deleting a backup file").await
    }

    /// Everything stored under `prefix`.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        self.store
            .list(Some(&ObjectPath::from(prefix)))
            .try_collect()
            .await
            .map_err(store_err("listing the backup repository"))
    }

    /// Every stored file's hash.
    pub async fn files(&self) -> Result<Vec<String>> {
        Ok(self
            .list("files")
            .await?
            .into_iter()
            .filter_map(|meta| meta.location.filename().map(str::to_owned))
            .filter(|name| valid_sha(name))
            .collect())
    }

    pub async fn put_manifest(&self, manifest: &Manifest) -> Result<()> {
        let json = serde_json::to_vec_pretty(manifest)
            .map_err(|e| failure("encoding a backup manifest")(&e))?;
        self.store
            .put(&Self::manifest_path(&manifest.id)?, PutPayload::from(json))
            .await
            .map_err(store_err("writing a backup manifest"))?;
        Ok(())
    }

    pub async fn manifest(&self, id: &str) -> Result<Manifest> {
        let result = match self.store.get(&Self::manifest_path(id)?).await {
            Ok(result) => result,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(Error::not_found("No such backup"));
            }
            Err(e) => return Err(failure("reading a backup manifest")(&e)),
        };
        let bytes = result.bytes().await.map_err(store_err("reading a backup manifest"))?;
        serde_json::from_slice(&bytes).map_err(|e| failure("reading a backup manifest")(&e))
    }

    /// Every backup's id, oldest first (ids sort by time).
    async fn ids(&self) -> Result<Vec<String>> {
        let mut ids: Vec<String> = self
            .list("manifests")
            .await?
            .into_iter()
            .filter_map(|m| m.location.filename()?.strip_suffix(".json").map(str::to_owned))
            .filter(|id| valid_id(id))
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Every backup, oldest first.
    pub async fn manifests(&self) -> Result<Vec<Manifest>> {
        let mut out = Vec::new();
        for id in self.ids().await? {
            out.push(self.manifest(&id).await?);
        }
        Ok(out)
    }

    /// The newest backup, if any.
    pub async fn latest(&self) -> Result<Option<Manifest>> {
        match self.ids().await?.pop() {
            Some(id) => Ok(Some(self.manifest(&id).await?)),
            None => Ok(None),
        }
    }

    pub async fn delete_manifest(&self, id: &str) -> Result<()> {
        self.delete(&Self::manifest_path(id)?, "deleting a backup manifest").await
    }

    /// Announces a backup being taken (see the module comment).
    pub async fn mark_pending(&self, id: &str) -> Result<()> {
        let path = ObjectPath::from(format!("pending/{id}"));
        self.store
            .put(&path, PutPayload::from_static(b""))
            .await
            .map_err(store_err("writing to the backup repository"))?;
        Ok(())
    }

    pub async fn clear_pending(&self, id: &str) -> Result<()> {
        let path = ObjectPath::from(format!("pending/{id}"));
        self.delete(&path, "writing to the backup repository").await
    }

    /// Whether a backup is being taken into this repository now (by this server or
    /// another process), as far as its marker says.
    pub async fn pending(&self) -> Result<bool> {
        let listed: Vec<_> = self
            .store
            .list(Some(&ObjectPath::from("pending")))
            .try_collect()
            .await
            .map_err(store_err("listing backups"))?;
        let now = now_secs();
        Ok(listed
            .iter()
            .any(|m| (now - m.last_modified.timestamp()).unsigned_abs() < PENDING_EXPIRY.as_secs()))
    }
}

fn now_secs() -> i64 {
    i64::try_from(trellis_core::now_millis() / 1000).unwrap_or(i64::MAX)
}
