//! Media encryption at rest: a [`BlobStore`] that encrypts every file it stores with
//! AES-256-GCM and decrypts what it serves, above any backend.
//!
//! A stored file is a 40-byte header followed by the plaintext cut in 64 KiB segments,
//! each sealed on its own (the STREAM construction: nonce = 7-byte prefix, the segment's
//! number, a last-segment flag), so a range request decrypts only the segments it
//! touches. Each file is sealed under its own key, the SHA-256 of the configured key and
//! a random 16-byte salt in the header, so nonces never repeat under one AES key however
//! many files there are. The header (magic, key id, salt, plaintext length) is the
//! associated data of every segment, so nothing in it can be changed, and with the last
//! flag a file can neither be cut short nor extended.
//!
//! Files keep their names (the SHA-256 of the plaintext), so identical uploads still share
//! one file. Files without the magic were written before encryption was turned on and are
//! served as they are; the re-encryption job rewrites them, and files under a retired key.

use std::{
    io::{Read, Write},
    ops::Range,
    path::{Path, PathBuf},
    sync::Arc,
};

use aes_gcm::{
    Aes256Gcm, KeyInit,
    aead::{
        generic_array::GenericArray,
        stream::{NewStream, StreamBE32, StreamPrimitive},
    },
};
use bytes::{Bytes, BytesMut};
use futures_util::{StreamExt, TryStreamExt};
use sha2::Digest;
use trellis_core::{Error, Result};

use super::store::{BlobStore, BlobStream};

const MAGIC: &[u8; 8] = b"TRLSENC1";
pub const HEADER_LEN: u64 = 40;
/// Plaintext bytes per sealed segment.
const SEGMENT: u64 = 64 * 1024;
const TAG: u64 = 16;
const SEALED: u64 = SEGMENT + TAG;

/// One configured key and its id: the first 8 bytes of the key's SHA-256, written into
/// every file it seals so that reads find the right key after a rotation.
#[derive(Clone)]
pub struct MediaKey {
    id: [u8; 8],
    secret: [u8; 32],
}

impl MediaKey {
    pub fn from_hex(hex: &str) -> Result<Self, String> {
        let hex = hex.trim();
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("a media encryption key is 64 hex digits (32 bytes)".into());
        }
        let mut key = [0u8; 32];
        for (i, byte) in key.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
                .map_err(|_| "a media encryption key is 64 hex digits".to_owned())?;
        }
        let digest = sha2::Sha256::digest(key);
        let mut id = [0u8; 8];
        id.copy_from_slice(&digest[..8]);
        Ok(Self { id, secret: key })
    }

    /// The AES key of the file with `salt`.
    fn file_cipher(&self, salt: &[u8; 16]) -> Aes256Gcm {
        // The secret key is fixed-length and the digest is never shown, so a plain hash
        // of key and salt serves as the derivation (no length extension to fear).
        let mut hasher = sha2::Sha256::new();
        hasher.update(b"trellis media file key\0");
        hasher.update(self.secret);
        hasher.update(salt);
        let derived: [u8; 32] = hasher.finalize().into();
        Aes256Gcm::new(GenericArray::from_slice(&derived))
    }

    /// The id as hex, for logs and the admin API.
    pub fn id_hex(&self) -> String {
        super::store::hex(&self.id)
    }
}

/// The keys in use: the first seals new files, all of them open old ones.
#[derive(Clone)]
pub struct MediaKeys(Arc<Vec<MediaKey>>);

impl MediaKeys {
    /// Reads keys from `media.encryption_keys` or the file `media.encryption_key_file`
    /// (one hex key per line, `#` comments); `None` when encryption is off.
    pub fn from_config(config: &trellis_core::config::MediaConfig) -> Result<Option<Self>, String> {
        let lines: Vec<String> = if !config.encryption_key_file.as_os_str().is_empty() {
            let path = &config.encryption_key_file;
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("media.encryption_key_file {}: {e}", path.display()))?;
            text.lines().map(str::to_owned).collect()
        } else {
            config.encryption_keys.clone()
        };
        let keys = lines
            .iter()
            .map(|l| l.split('#').next().unwrap_or("").trim())
            .filter(|l| !l.is_empty())
            .map(MediaKey::from_hex)
            .collect::<Result<Vec<_>, _>>()?;
        Ok((!keys.is_empty()).then(|| Self(Arc::new(keys))))
    }

    pub fn current(&self) -> &MediaKey {
        // Built only from a non-empty list.
        &self.0[0]
    }

    fn by_id(&self, id: &[u8]) -> Option<&MediaKey> {
        self.0.iter().find(|k| k.id == id)
    }
}

/// What a stored file's first bytes say about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sealing {
    /// Written before encryption was turned on.
    Plain,
    /// Sealed under the key with id `key`, with the random salt `salt` (which tells one
    /// sealing of a file from another).
    Sealed { key: [u8; 8], salt: [u8; 16] },
}

impl Sealing {
    /// Names this sealing of a file (hex of key id and nonce prefix); `None` for plaintext.
    pub fn tag(&self) -> Option<String> {
        match self {
            Sealing::Plain => None,
            Sealing::Sealed { key, salt } => {
                Some(format!("{}{}", super::store::hex(key), super::store::hex(salt)))
            }
        }
    }

    pub fn key(&self) -> Option<[u8; 8]> {
        match self {
            Sealing::Plain => None,
            Sealing::Sealed { key, .. } => Some(*key),
        }
    }
}

#[derive(Clone)]
struct Header {
    key: [u8; 8],
    salt: [u8; 16],
    len: u64,
    bytes: [u8; HEADER_LEN as usize],
}

impl Header {
    fn parse(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < HEADER_LEN as usize || &bytes[..8] != MAGIC {
            return None;
        }
        let mut header =
            Header { key: [0; 8], salt: [0; 16], len: 0, bytes: [0; HEADER_LEN as usize] };
        header.bytes.copy_from_slice(&bytes[..HEADER_LEN as usize]);
        header.key.copy_from_slice(&bytes[8..16]);
        header.salt.copy_from_slice(&bytes[16..32]);
        let mut len = [0u8; 8];
        len.copy_from_slice(&bytes[32..40]);
        header.len = u64::from_be_bytes(len);
        // More than 2^32 segments cannot be numbered: a damaged header.
        (header.len.div_ceil(SEGMENT) <= u64::from(u32::MAX)).then_some(header)
    }

    fn new(key: &MediaKey, len: u64) -> Self {
        let salt: [u8; 16] = crate::random::bytes();
        let mut bytes = [0u8; HEADER_LEN as usize];
        bytes[..8].copy_from_slice(MAGIC);
        bytes[8..16].copy_from_slice(&key.id);
        bytes[16..32].copy_from_slice(&salt);
        bytes[32..40].copy_from_slice(&len.to_be_bytes());
        Header { key: key.id, salt, len, bytes }
    }

    /// Segments in the file: an empty file still has one (empty, last) segment, so that
    /// removing every segment is detected.
    fn segments(&self) -> u64 {
        self.len.div_ceil(SEGMENT).max(1)
    }

    /// The file's own key makes every nonce unique already; the prefix is fixed.
    fn stream(&self, key: &MediaKey) -> StreamBE32<Aes256Gcm> {
        StreamBE32::from_aead(key.file_cipher(&self.salt), GenericArray::from_slice(&[0u8; 7]))
    }
}

fn damaged(why: &str) -> Error {
    Error::internal("encrypted media", why.to_owned())
}

/// Seals the plaintext file `from` into `to` (blocking).
fn seal_file(key: &MediaKey, from: &Path, to: &Path) -> Result<u64> {
    let io = |e| Error::io("encrypting a media file", e);
    let mut input = std::io::BufReader::new(std::fs::File::open(from).map_err(io)?);
    let len = input.get_ref().metadata().map_err(io)?.len();
    let header = Header::new(key, len);
    let stream = header.stream(key);
    let mut out = std::io::BufWriter::new(std::fs::File::create(to).map_err(io)?);
    out.write_all(&header.bytes).map_err(io)?;
    let segments = header.segments();
    let mut buf = Vec::with_capacity(SEALED as usize);
    let mut written = HEADER_LEN;
    for n in 0..segments {
        let want = SEGMENT.min(len - n * SEGMENT) as usize;
        buf.clear();
        buf.resize(want, 0);
        input.read_exact(&mut buf).map_err(io)?;
        let position = u32::try_from(n).map_err(|_| damaged("file too large to encrypt"))?;
        stream
            .encrypt_in_place(position, n + 1 == segments, &header.bytes, &mut buf)
            .map_err(|_| damaged("sealing failed"))?;
        out.write_all(&buf).map_err(io)?;
        written += buf.len() as u64;
    }
    let file = out.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    Ok(written)
}

pub struct EncryptedStore {
    inner: Box<dyn BlobStore>,
    keys: MediaKeys,
    /// Where sealed files are written before they go into the store.
    tmp_dir: PathBuf,
}

impl EncryptedStore {
    async fn open_sealed(
        &self,
        hash: &str,
        header: &Header,
        range: Option<Range<u64>>,
    ) -> Result<BlobStream> {
        let key = self
            .keys
            .by_id(&header.key)
            .ok_or_else(|| damaged("sealed under a key that is not configured"))?
            .clone();
        let range = range.unwrap_or(0..header.len);
        let end = range.end.min(header.len);
        let start = range.start.min(end);
        let first = start / SEGMENT;
        let last = if end > start { (end - 1) / SEGMENT } else { first };
        let sealed_start = HEADER_LEN + first * SEALED;
        let sealed_end = (HEADER_LEN + (last + 1) * SEALED)
            .min(HEADER_LEN + header.len + header.segments() * TAG);
        let sealed = self.inner.open(hash, Some(sealed_start..sealed_end)).await?;
        Ok(open_segments(sealed, header.clone(), key, first, start - first * SEGMENT, end - start))
    }

    pub fn new(inner: Box<dyn BlobStore>, keys: MediaKeys, tmp_dir: PathBuf) -> Self {
        Self { inner, keys, tmp_dir }
    }

    async fn header(&self, hash: &str) -> Result<Option<Header>> {
        let mut stream = self.inner.open(hash, Some(0..HEADER_LEN)).await?;
        let mut head = Vec::with_capacity(HEADER_LEN as usize);
        while let Some(chunk) = stream.next().await {
            head.extend_from_slice(&chunk.map_err(|e| Error::io("reading media", e))?);
            if head.len() >= HEADER_LEN as usize {
                break;
            }
        }
        Ok(Header::parse(&head))
    }

    async fn sealed_put(&self, hash: &str, file: &Path, replace: bool) -> Result<()> {
        let key = self.keys.current().clone();
        let sealed = self.tmp_dir.join(format!("{hash}.sealed.{}", crate::random::alphanumeric(8)));
        let (from, to) = (file.to_path_buf(), sealed.clone());
        let len = tokio::task::spawn_blocking(move || seal_file(&key, &from, &to))
            .await
            .map_err(|e| Error::internal("media encryption task", e))?;
        let result = match len {
            Ok(len) if replace => self.inner.replace_file(hash, &sealed, len).await,
            Ok(len) => self.inner.put_file(hash, &sealed, len).await,
            Err(e) => Err(e),
        };
        let _ = tokio::fs::remove_file(&sealed).await;
        result
    }
}

/// Decrypts the sealed segments `first..` of a file arriving as `sealed` and yields the
/// plaintext bytes `skip..skip + take` of what they hold.
fn open_segments(
    sealed: BlobStream,
    header: Header,
    key: MediaKey,
    first: u64,
    skip: u64,
    take: u64,
) -> BlobStream {
    struct State {
        input: BlobStream,
        pending: BytesMut,
        segment: u64,
        skip: u64,
        left: u64,
        header: Header,
        stream: StreamBE32<Aes256Gcm>,
        done: bool,
        /// Whether a tag was checked, or need not be. An empty file still checks its one
        /// (empty) segment, so that a header changed to say "empty" is caught.
        checked: bool,
    }
    let stream = header.stream(&key);
    let checked = header.len > 0;
    let state = State {
        input: sealed,
        pending: BytesMut::new(),
        segment: first,
        skip,
        left: take,
        header,
        stream,
        done: false,
        checked,
    };
    let out = futures_util::stream::try_unfold(state, |mut st| async move {
        loop {
            if (st.left == 0 && st.checked) || st.done {
                return Ok(None);
            }
            let segments = st.header.segments();
            let last = st.segment + 1 == segments;
            let want = if last {
                (st.header.len - st.segment * SEGMENT + TAG) as usize
            } else {
                SEALED as usize
            };
            if st.pending.len() < want {
                match st.input.next().await {
                    Some(chunk) => {
                        st.pending.extend_from_slice(&chunk?);
                        continue;
                    }
                    None => {
                        return Err(std::io::Error::other("an encrypted media file is cut short"));
                    }
                }
            }
            let mut buf = st.pending.split_to(want).to_vec();
            let position = u32::try_from(st.segment)
                .map_err(|_| std::io::Error::other("encrypted media: segment out of range"))?;
            st.stream.decrypt_in_place(position, last, &st.header.bytes, &mut buf).map_err(
                |_| std::io::Error::other("an encrypted media file failed authentication"),
            )?;
            st.segment += 1;
            st.done = last;
            st.checked = true;
            let from = st.skip.min(buf.len() as u64) as usize;
            st.skip -= from as u64;
            let to = (from as u64 + st.left).min(buf.len() as u64) as usize;
            st.left -= (to - from) as u64;
            if to > from {
                return Ok(Some((Bytes::from(buf).slice(from..to), st)));
            }
        }
    });
    Box::pin(out)
}

#[async_trait::async_trait]
impl BlobStore for EncryptedStore {
    async fn put_file(&self, hash: &str, file: &Path, _len: u64) -> Result<()> {
        if self.inner.contains(hash).await? {
            return Ok(());
        }
        self.sealed_put(hash, file, false).await
    }

    async fn replace_file(&self, hash: &str, file: &Path, _len: u64) -> Result<()> {
        self.sealed_put(hash, file, true).await
    }

    async fn open(&self, hash: &str, range: Option<Range<u64>>) -> Result<BlobStream> {
        // The header and the body are two reads: a reseal renaming a new file into place
        // between them would pair one file's header with the other's bytes. The header
        // is read again once the body is open; a change means a reseal, and a retry.
        for _ in 0..3 {
            let header = self.header(hash).await?;
            let body = match &header {
                None => self.inner.open(hash, range.clone()).await?,
                Some(header) => self.open_sealed(hash, header, range.clone()).await?,
            };
            let again = self.header(hash).await?;
            if again.as_ref().map(|h| h.bytes) == header.as_ref().map(|h| h.bytes) {
                return Ok(body);
            }
        }
        Err(damaged("the file kept changing while it was opened"))
    }

    async fn read(&self, hash: &str) -> Result<Vec<u8>> {
        let stream = self.open(hash, None).await?;
        let chunks: Vec<Bytes> =
            stream.try_collect().await.map_err(|e| Error::io("reading media", e))?;
        Ok(chunks.concat())
    }

    async fn delete(&self, hash: &str) -> Result<()> {
        self.inner.delete(hash).await
    }

    async fn contains(&self, hash: &str) -> Result<bool> {
        self.inner.contains(hash).await
    }

    fn raw(&self) -> &dyn BlobStore {
        self.inner.raw()
    }

    async fn sealing(&self, hash: &str) -> Result<Sealing> {
        Ok(match self.header(hash).await? {
            Some(header) => Sealing::Sealed { key: header.key, salt: header.salt },
            None => Sealing::Plain,
        })
    }

    fn current_key(&self) -> Option<[u8; 8]> {
        Some(self.keys.current().id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::store_fs::FsStore;

    const KEY_A: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
    const KEY_B: &str = "ff0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    fn store(dir: &Path, keys: &[&str]) -> EncryptedStore {
        let keys =
            MediaKeys(Arc::new(keys.iter().map(|k| MediaKey::from_hex(k).unwrap()).collect()));
        let tmp = dir.join("tmp");
        std::fs::create_dir_all(&tmp).unwrap();
        EncryptedStore::new(Box::new(FsStore::new(dir.join("blobs"), false).unwrap()), keys, tmp)
    }

    fn plain(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    async fn put(store: &EncryptedStore, dir: &Path, hash: &str, bytes: &[u8]) {
        let file = dir.join("upload");
        std::fs::write(&file, bytes).unwrap();
        store.put_file(hash, &file, bytes.len() as u64).await.unwrap();
    }

    async fn range(store: &EncryptedStore, hash: &str, r: Option<Range<u64>>) -> Vec<u8> {
        let chunks: Vec<Bytes> = store.open(hash, r).await.unwrap().try_collect().await.unwrap();
        chunks.concat()
    }

    const H: &str = "aa00000000000000000000000000000000000000000000000000000000000000";

    #[tokio::test]
    async fn ranges_round_trip_at_segment_edges() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path(), &[KEY_A]);
        for len in [0usize, 1, 65535, 65536, 65537, 200_000] {
            let bytes = plain(len);
            store.delete(H).await.unwrap();
            put(&store, dir.path(), H, &bytes).await;
            let raw = store.raw().read(H).await.unwrap();
            assert_eq!(&raw[..8], MAGIC);
            let leaked = |c: &[u8]| c.len() >= 64 && raw.windows(64).any(|w| w == &c[..64]);
            assert!(!bytes.chunks(4096).any(leaked), "plaintext in the sealed file");
            assert_eq!(range(&store, H, None).await, bytes, "len {len}");
            let l = len as u64;
            for (a, b) in [(0, l), (0, 1), (65535, 65537), (l / 2, l), (l, l), (3, 131_073)] {
                let (a, b) = (a.min(l), b.min(l));
                assert_eq!(range(&store, H, Some(a..b)).await, &bytes[a as usize..b as usize]);
            }
        }
    }

    #[tokio::test]
    async fn tampering_and_truncation_fail_and_old_keys_still_open() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = plain(150_000);
        put(&store(dir.path(), &[KEY_A]), dir.path(), H, &bytes).await;
        // Rotated: B seals, A still opens.
        let rotated = store(dir.path(), &[KEY_B, KEY_A]);
        assert_eq!(range(&rotated, H, None).await, bytes);
        let sealing = rotated.sealing(H).await.unwrap();
        assert!(sealing.key().is_some() && sealing.key() != rotated.current_key());
        // Without A the file cannot be opened.
        assert!(store(dir.path(), &[KEY_B]).open(H, None).await.is_err());
        let path = dir.path().join("blobs/aa/00").join(H);
        let sealed = std::fs::read(&path).unwrap();
        let mut flipped = sealed.clone();
        flipped[70_000] ^= 1;
        std::fs::write(&path, &flipped).unwrap();
        let got: Result<Vec<Bytes>, _> = rotated.open(H, None).await.unwrap().try_collect().await;
        assert!(got.is_err());
        std::fs::write(&path, &sealed[..sealed.len() - 100]).unwrap();
        let got: Result<Vec<Bytes>, _> = rotated.open(H, None).await.unwrap().try_collect().await;
        assert!(got.is_err());
        // A header changed to say "empty" fails too.
        let mut emptied = sealed.clone();
        emptied[32..40].copy_from_slice(&0u64.to_be_bytes());
        std::fs::write(&path, &emptied).unwrap();
        let got: Result<Vec<Bytes>, _> = rotated.open(H, None).await.unwrap().try_collect().await;
        assert!(got.is_err());
        // Dropping whole trailing segments is caught by the last-segment flag.
        std::fs::write(&path, &sealed[..(HEADER_LEN + SEALED) as usize]).unwrap();
        let got: Result<Vec<Bytes>, _> = rotated.open(H, None).await.unwrap().try_collect().await;
        assert!(got.is_err());
    }

    #[tokio::test]
    async fn files_from_before_encryption_are_served_and_replaced_sealed() {
        let dir = tempfile::tempdir().unwrap();
        let plain_store = FsStore::new(dir.path().join("blobs"), false).unwrap();
        let bytes = plain(1000);
        let file = dir.path().join("upload");
        std::fs::write(&file, &bytes).unwrap();
        plain_store.put_file(H, &file, 1000).await.unwrap();
        let store = store(dir.path(), &[KEY_A]);
        assert_eq!(store.sealing(H).await.unwrap(), Sealing::Plain);
        assert_eq!(range(&store, H, Some(10..20)).await, &bytes[10..20]);
        let copy = dir.path().join("copy");
        std::fs::write(&copy, &bytes).unwrap();
        store.replace_file(H, &copy, 1000).await.unwrap();
        assert_eq!(store.sealing(H).await.unwrap().key(), store.current_key());
        assert_eq!(store.read(H).await.unwrap(), bytes);
    }
}
