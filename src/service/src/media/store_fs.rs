//! The local filesystem backend: `<root>/ab/cd/abcd…` (two levels of 256 directories
//! keep any one directory small). Files arrive as finished temp files on the same
//! filesystem and are renamed into place, so a crash never leaves a partial file under a
//! content name.

use std::{
    io::SeekFrom,
    ops::Range,
    path::{Path, PathBuf},
};

use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_util::io::ReaderStream;
use trellis_core::{Error, Result};

use super::store::{BlobStore, BlobStream, valid_hash};

/// Read buffer per download: large enough that a download costs few syscalls.
const READ_CHUNK: usize = 256 * 1024;

pub struct FsStore {
    root: PathBuf,
    /// fsync directories after a rename (with `storage.sync_writes`).
    sync: bool,
}

impl FsStore {
    pub fn new(root: PathBuf, sync: bool) -> std::io::Result<Self> {
        std::fs::create_dir_all(&root)?;
        Ok(Self { root, sync })
    }

    fn path(&self, hash: &str) -> Result<PathBuf> {
        if !valid_hash(hash) {
            return Err(Error::internal("media store", format!("invalid hash {hash:?}")));
        }
        Ok(self.root.join(&hash[0..2]).join(&hash[2..4]).join(hash))
    }
}

fn io_error(context: &'static str) -> impl Fn(std::io::Error) -> Error {
    move |e| Error::io(context, e)
}

#[async_trait::async_trait]
impl BlobStore for FsStore {
    async fn put_file(&self, hash: &str, file: &Path, len: u64) -> Result<()> {
        if tokio::fs::try_exists(self.path(hash)?).await.map_err(io_error("media store"))? {
            return Ok(());
        }
        self.replace_file(hash, file, len).await
    }

    /// A rename over the old file: readers have the old file or the new, never neither.
    async fn replace_file(&self, hash: &str, file: &Path, _len: u64) -> Result<()> {
        let target = self.path(hash)?;
        let dir = target.parent().map(Path::to_path_buf).unwrap_or_else(|| self.root.clone());
        tokio::fs::create_dir_all(&dir).await.map_err(io_error("creating a media directory"))?;
        tokio::fs::rename(file, &target).await.map_err(io_error("storing a media file"))?;
        if self.sync {
            // The rename is durable only once the directory entry is.
            tokio::task::spawn_blocking(move || std::fs::File::open(&dir)?.sync_all())
                .await
                .map_err(|e| Error::internal("media store task", e))?
                .map_err(io_error("syncing a media directory"))?;
        }
        Ok(())
    }

    async fn open(&self, hash: &str, range: Option<Range<u64>>) -> Result<BlobStream> {
        let mut file =
            tokio::fs::File::open(self.path(hash)?).await.map_err(io_error("opening media"))?;
        let stream: BlobStream = match range {
            Some(r) => {
                file.seek(SeekFrom::Start(r.start)).await.map_err(io_error("seeking media"))?;
                Box::pin(ReaderStream::with_capacity(file.take(r.end - r.start), READ_CHUNK))
            }
            None => Box::pin(ReaderStream::with_capacity(file, READ_CHUNK)),
        };
        Ok(stream)
    }

    async fn read(&self, hash: &str) -> Result<Vec<u8>> {
        tokio::fs::read(self.path(hash)?).await.map_err(io_error("reading media"))
    }

    async fn delete(&self, hash: &str) -> Result<()> {
        match tokio::fs::remove_file(self.path(hash)?).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::internal("deleting media", e)),
        }
    }

    async fn contains(&self, hash: &str) -> Result<bool> {
        tokio::fs::try_exists(self.path(hash)?).await.map_err(io_error("media store"))
    }

    fn raw(&self) -> &dyn BlobStore {
        self
    }
}
