//! What one backup holds: every file by its path under the data directory, size and
//! SHA-256, and figures about the backup itself.

use serde::{Deserialize, Serialize};

/// Names this layout; a manifest in another one is refused rather than misread.
pub const FORMAT: &str = "trellis-backup-1";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format: String,
    /// Sorts by time: `YYYYMMDD-HHMMSS-<random>`.
    pub id: String,
    pub server_name: String,
    pub trellis_version: String,
    pub schema_version: u64,
    /// When the database was checkpointed: the backup holds every write acknowledged
    /// before it.
    pub created_at_ms: u64,
    /// `manual`, `scheduled` or `cli`.
    pub kind: String,
    pub files: Vec<FileEntry>,
    /// Bytes of all the files, and of those this backup had to copy (the rest were
    /// stored already by earlier backups).
    pub total_bytes: u64,
    pub copied_bytes: u64,
    pub copied_files: u64,
    pub duration_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileEntry {
    /// `db/<name>` for the database checkpoint, `media/<sha256>` for media files,
    /// `sealed-media/<name>` for media files encrypted at rest (named by the SHA-256 of
    /// their plaintext, kept as sealed), `signing.key`.
    pub path: String,
    pub sha256: String,
    pub size: u64,
    /// Modification time of database files (seconds), so that the next backup can skip
    /// hashing a table file it has seen: RocksDB never rewrites one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtime: Option<i64>,
    /// For sealed media, which sealing of the file this is (key id and nonce prefix), so
    /// that the next backup can skip reading a file it has seen: only resealing changes
    /// a sealed file, and it changes this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealing: Option<String>,
}

/// Where a file of a backup goes back to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place<'a> {
    Database(&'a str),
    Media(&'a str),
    /// A media file encrypted at rest, stored back as it is.
    SealedMedia(&'a str),
    SigningKey,
}

impl FileEntry {
    /// Where this file belongs; `None` for a path this version does not know (or one
    /// that tries to leave its directory).
    pub fn place(&self) -> Option<Place<'_>> {
        if self.path == "signing.key" {
            return Some(Place::SigningKey);
        }
        let plain = |name: &str| {
            !name.is_empty() && !name.contains(['/', '\\']) && name != "." && name != ".."
        };
        if let Some(name) = self.path.strip_prefix("db/") {
            return plain(name).then_some(Place::Database(name));
        }
        if let Some(hash) = self.path.strip_prefix("sealed-media/") {
            let named =
                hash.len() == 64 && hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
            return named.then_some(Place::SealedMedia(hash));
        }
        let hash = self.path.strip_prefix("media/")?;
        (hash == self.sha256).then_some(Place::Media(hash))
    }
}

impl Manifest {
    /// The figures a listing shows, without the file list.
    pub fn summary(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "created_at": self.created_at_ms,
            "kind": self.kind,
            "server_name": self.server_name,
            "trellis_version": self.trellis_version,
            "schema_version": self.schema_version,
            "files": self.files.len(),
            "total_bytes": self.total_bytes,
            "copied_bytes": self.copied_bytes,
            "copied_files": self.copied_files,
            "duration_ms": self.duration_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, sha: &str) -> FileEntry {
        FileEntry { path: path.into(), sha256: sha.into(), size: 1, mtime: None, sealing: None }
    }

    #[test]
    fn places_refuse_paths_that_leave_their_directory() {
        assert_eq!(entry("db/000012.sst", "x").place(), Some(Place::Database("000012.sst")));
        assert_eq!(entry("signing.key", "x").place(), Some(Place::SigningKey));
        assert_eq!(entry("media/abc", "abc").place(), Some(Place::Media("abc")));
        assert_eq!(entry("media/abc", "abd").place(), None, "media are named by content");
        let hash = "ab".repeat(32);
        let sealed = format!("sealed-media/{hash}");
        assert_eq!(entry(&sealed, "x").place(), Some(Place::SealedMedia(&hash)));
        assert_eq!(entry("sealed-media/../signing.key", "x").place(), None);
        for bad in ["db/../x", "db/a/b", "db/..", "db/", "other/x", "../signing.key"] {
            assert_eq!(entry(bad, "x").place(), None, "{bad}");
        }
    }
}
