//! Receiving an upload: the body is written to a temp file as it arrives, hashed on the
//! way, and cut off at the size limit, so no upload is ever held whole in memory.

use std::path::Path;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use std::io::Write;
use tempfile::TempPath;
use trellis_core::{Error, ErrorKind, Result};

use super::store::hex;

/// Small chunks are gathered into writes of this size; larger ones bypass the buffer
/// (std's `BufWriter` writes them straight through), saving a copy.
const WRITE_BUFFER: usize = 256 * 1024;

/// A complete upload in a temp file (removed when dropped unless the store took it).
pub struct Spooled {
    pub path: TempPath,
    pub sha256: String,
    pub size: u64,
}

/// Why an upload was cut off.
pub enum Limit {
    /// The server's size limit.
    Size(u64),
    /// What is left of the uploader's quota (smaller than the size limit).
    Quota(u64),
}

impl Limit {
    fn bytes(&self) -> u64 {
        match self {
            Limit::Size(n) | Limit::Quota(n) => *n,
        }
    }

    pub fn error(&self) -> Error {
        match self {
            Limit::Size(n) => Error::too_large(format!("Uploads are limited to {n} bytes")),
            Limit::Quota(_) => Error::resource_limit("This upload would exceed your media quota"),
        }
    }
}

/// Chunks in flight between the receiving task and each of the two workers.
const PIPELINE_DEPTH: usize = 16;

/// Receives `body` into a temp file. Receiving, hashing and writing overlap: the async
/// task only hands each chunk (a cheap `Bytes` clone) to a hashing thread and a
/// writing thread, so an upload costs about its slowest stage, not the sum of all three.
pub async fn spool<S, E>(tmp_dir: &Path, mut body: S, limit: Limit, sync: bool) -> Result<Spooled>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let io = |e: std::io::Error| Error::io("spooling an upload", e);
    let named = tempfile::Builder::new().prefix("upload-").tempfile_in(tmp_dir).map_err(io)?;
    let (file, path) = named.into_parts();
    let (to_hasher, mut from_body) = tokio::sync::mpsc::channel::<Bytes>(PIPELINE_DEPTH);
    let (to_writer, mut for_file) = tokio::sync::mpsc::channel::<Bytes>(PIPELINE_DEPTH);
    let hasher = tokio::task::spawn_blocking(move || {
        let mut hasher = Sha256::new();
        while let Some(chunk) = from_body.blocking_recv() {
            hasher.update(&chunk);
        }
        hasher.finalize()
    });
    let writer = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let mut out = std::io::BufWriter::with_capacity(WRITE_BUFFER, file);
        while let Some(chunk) = for_file.blocking_recv() {
            out.write_all(&chunk)?;
        }
        let file = out.into_inner().map_err(|e| e.into_error())?;
        if sync {
            // Durable before the database says the media exists.
            file.sync_all()?;
        }
        Ok(())
    });
    let mut size = 0u64;
    let mut failure = None;
    while let Some(chunk) = body.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "upload body ended early");
                failure = Some(Error::new(
                    ErrorKind::BadRequest,
                    trellis_core::error::code::UNKNOWN,
                    "Could not read the upload body",
                ));
                break;
            }
        };
        size += chunk.len() as u64;
        if size > limit.bytes() {
            failure = Some(limit.error());
            break;
        }
        // A full pipeline makes this task wait: the workers are the bottleneck then, and
        // that back-pressure keeps memory bounded.
        if to_hasher.send(chunk.clone()).await.is_err() || to_writer.send(chunk).await.is_err() {
            break;
        }
    }
    drop(to_hasher);
    drop(to_writer);
    let written = writer.await.map_err(|e| Error::internal("upload writer", e))?;
    let digest = hasher.await.map_err(|e| Error::internal("upload hasher", e))?;
    if let Some(e) = failure {
        return Err(e);
    }
    written.map_err(io)?;
    Ok(Spooled { path, sha256: hex(&digest), size })
}
