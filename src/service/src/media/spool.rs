//! Receiving an upload: the body is written to a temp file as it arrives, hashed on the
//! way, and cut off at the size limit, so no upload is ever held whole in memory.

use std::path::Path;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tempfile::TempPath;
use tokio::io::AsyncWriteExt;
use trellis_core::{Error, Result};

use super::store::hex;

/// Bytes gathered before each write to the file: few, large writes.
const WRITE_BUFFER: usize = 1024 * 1024;

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

pub async fn spool<S, E>(tmp_dir: &Path, mut body: S, limit: Limit, sync: bool) -> Result<Spooled>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let io = |e: std::io::Error| Error::internal("spooling an upload", e);
    let named = tempfile::Builder::new().prefix("upload-").tempfile_in(tmp_dir).map_err(io)?;
    let (file, path) = named.into_parts();
    let mut out =
        tokio::io::BufWriter::with_capacity(WRITE_BUFFER, tokio::fs::File::from_std(file));
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| {
            tracing::debug!(error = %e, "upload body ended early");
            Error::new(
                http::StatusCode::BAD_REQUEST,
                trellis_core::error::code::UNKNOWN,
                "Could not read the upload body",
            )
        })?;
        size += chunk.len() as u64;
        if size > limit.bytes() {
            return Err(limit.error());
        }
        hasher.update(&chunk);
        out.write_all(&chunk).await.map_err(io)?;
    }
    out.flush().await.map_err(io)?;
    let file = out.into_inner();
    if sync {
        // Durable before the database says the media exists.
        file.sync_all().await.map_err(io)?;
    }
    drop(file);
    Ok(Spooled { path, sha256: hex(&hasher.finalize()), size })
}
