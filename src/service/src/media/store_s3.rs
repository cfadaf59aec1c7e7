//! The S3 backend (any S3-compatible service) through `object_store`. Objects are named
//! `<prefix><ab>/<hash>`; large files go up as multipart uploads read from the spooled
//! temp file, so memory stays bounded by the part size.

use std::{ops::Range, path::Path, sync::Arc};

use futures_util::{StreamExt, TryStreamExt};
use object_store::{
    GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart,
    aws::AmazonS3Builder, path::Path as ObjectPath,
};
use tokio::io::AsyncReadExt;
use trellis_core::{Error, Result, config::MediaConfig};

use super::store::{BlobStore, BlobStream, valid_hash};

/// Files up to this size go up in one request; larger ones in parts of this size.
const PART_SIZE: usize = 8 * 1024 * 1024;
/// Parts in flight at once per upload.
const PART_CONCURRENCY: usize = 4;

pub struct S3Store {
    store: Arc<dyn ObjectStore>,
    prefix: String,
}

impl S3Store {
    pub fn new(config: &MediaConfig) -> Result<Self, String> {
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(&config.s3_bucket)
            .with_region(&config.s3_region)
            .with_allow_http(config.s3_allow_http);
        if !config.s3_endpoint.is_empty() {
            // Path-style requests: S3-compatible services rarely have per-bucket hostnames.
            builder =
                builder.with_endpoint(&config.s3_endpoint).with_virtual_hosted_style_request(false);
        }
        if !config.s3_access_key_id.is_empty() {
            builder = builder
                .with_access_key_id(&config.s3_access_key_id)
                .with_secret_access_key(&config.s3_secret_access_key);
        }
        let store = builder.build().map_err(|e| format!("media.s3_*: {e}"))?;
        let mut prefix = config.s3_prefix.trim_matches('/').to_owned();
        if !prefix.is_empty() {
            prefix.push('/');
        }
        Ok(Self { store: Arc::new(store), prefix })
    }

    fn path(&self, hash: &str) -> Result<ObjectPath> {
        if !valid_hash(hash) {
            return Err(Error::internal("media store", format!("invalid hash {hash:?}")));
        }
        Ok(ObjectPath::from(format!("{}{}/{hash}", self.prefix, &hash[0..2])))
    }
}

/// Uploads the local file `file` of `len` bytes to `path`: in one request when small, else
/// in parts read from the file, so that memory stays bounded by the part size.
pub(crate) async fn upload_file(
    store: &dyn ObjectStore,
    path: &ObjectPath,
    file: &Path,
    len: u64,
) -> Result<()> {
    let io = |e: std::io::Error| Error::internal("reading a file to upload", e);
    if len <= PART_SIZE as u64 {
        let bytes = tokio::fs::read(file).await.map_err(io)?;
        store.put(path, PutPayload::from(bytes)).await.map_err(s3_error("uploading"))?;
        return Ok(());
    }
    let upload = store.put_multipart(path).await.map_err(s3_error("starting an upload"))?;
    let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
    let mut reader = tokio::fs::File::open(file).await.map_err(io)?;
    let mut buf = vec![0u8; 1024 * 1024];
    loop {
        let n = match reader.read(&mut buf).await {
            Ok(n) => n,
            Err(e) => {
                let _ = writer.abort().await;
                return Err(io(e));
            }
        };
        if n == 0 {
            break;
        }
        if let Err(e) = writer.wait_for_capacity(PART_CONCURRENCY).await {
            let _ = writer.abort().await;
            return Err(Error::internal("uploading", e));
        }
        writer.write(&buf[..n]);
    }
    writer.finish().await.map_err(s3_error("finishing an upload"))?;
    Ok(())
}

fn s3_error(context: &'static str) -> impl Fn(object_store::Error) -> Error {
    move |e| Error::internal(context, e)
}

#[async_trait::async_trait]
impl BlobStore for S3Store {
    async fn put_file(&self, hash: &str, file: &Path, len: u64) -> Result<()> {
        if self.contains(hash).await? {
            return Ok(());
        }
        self.replace_file(hash, file, len).await
    }

    /// An S3 put replaces an object atomically.
    async fn replace_file(&self, hash: &str, file: &Path, len: u64) -> Result<()> {
        upload_file(&*self.store, &self.path(hash)?, file, len).await
    }

    async fn open(&self, hash: &str, range: Option<Range<u64>>) -> Result<BlobStream> {
        let options = GetOptions { range: range.map(GetRange::Bounded), ..Default::default() };
        let result =
            self.store.get_opts(&self.path(hash)?, options).await.map_err(s3_error("S3 get"))?;
        Ok(Box::pin(result.into_stream().map_err(std::io::Error::other).boxed()))
    }

    async fn read(&self, hash: &str) -> Result<Vec<u8>> {
        let result = self.store.get(&self.path(hash)?).await.map_err(s3_error("S3 get"))?;
        Ok(result.bytes().await.map_err(s3_error("S3 get"))?.to_vec())
    }

    async fn delete(&self, hash: &str) -> Result<()> {
        match self.store.delete(&self.path(hash)?).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(Error::internal("S3 delete", e)),
        }
    }

    async fn contains(&self, hash: &str) -> Result<bool> {
        match self.store.head(&self.path(hash)?).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(Error::internal("S3 head", e)),
        }
    }

    fn raw(&self) -> &dyn BlobStore {
        self
    }
}
