//! The server's ed25519 signing key: created once, kept in a 0600 file, used to sign
//! the key server response (and, later, events and federation requests).
//!
//! The file uses Synapse's format, `ed25519 <version> <unpadded base64 seed>`, so that an
//! operator can bring a key over from another homeserver.

use std::{
    io::Write,
    path::{Path, PathBuf},
};

use base64::{Engine as _, engine::general_purpose::STANDARD_NO_PAD};
use ed25519_dalek::{SigningKey, pkcs8::EncodePrivateKey};
use ruma::{CanonicalJsonObject, CanonicalJsonValue, signatures::Ed25519KeyPair};
use trellis_core::{Error, Result, now_millis};

pub struct ServerKeys {
    server_name: String,
    key_pair: Ed25519KeyPair,
    /// `ed25519:<version>`
    key_id: String,
    public_key_b64: String,
    validity_ms: u64,
    /// Keys used before this one (from config), published as `old_verify_keys`.
    old_keys: Vec<trellis_core::config::OldSigningKey>,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

impl ServerKeys {
    /// Loads the key at `path`, generating and saving a new one if the file is absent.
    pub fn load_or_generate(
        path: &Path,
        server_name: &str,
        validity_hours: u64,
    ) -> Result<Self, KeyFileError> {
        let io = |source| KeyFileError::Io { path: path.to_owned(), source };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let text = generate_key_file_text();
                write_private_file(path, &text).map_err(io)?;
                tracing::info!(path = %path.display(), "generated a new server signing key");
                text
            }
            Err(e) => return Err(io(e)),
        };
        let invalid = |message: &str| KeyFileError::Invalid {
            path: path.to_owned(),
            message: message.to_owned(),
        };
        let mut parts = text.split_whitespace();
        let (Some("ed25519"), Some(version), Some(seed_b64)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid("expected `ed25519 <version> <base64 seed>`"));
        };
        if !version.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(invalid("key version may only contain [a-zA-Z0-9_]"));
        }
        let seed = STANDARD_NO_PAD
            .decode(seed_b64.trim_end_matches('='))
            .map_err(|_| invalid("seed is not base64"))?;
        let seed: [u8; 32] = seed.try_into().map_err(|_| invalid("seed must be 32 bytes"))?;
        let der = SigningKey::from_bytes(&seed)
            .to_pkcs8_der()
            .map_err(|_| invalid("cannot encode key"))?;
        let key_pair = Ed25519KeyPair::from_der(der.as_bytes(), version.to_owned())
            .map_err(|e| invalid(&e.to_string()))?;
        let public_key_b64 = STANDARD_NO_PAD.encode(key_pair.public_key());
        Ok(Self {
            server_name: server_name.to_owned(),
            key_id: format!("ed25519:{version}"),
            key_pair,
            public_key_b64,
            validity_ms: validity_hours.saturating_mul(3_600_000),
            old_keys: Vec::new(),
        })
    }

    /// The keys this server signed with before (key rotation).
    pub fn with_old_keys(mut self, old_keys: Vec<trellis_core::config::OldSigningKey>) -> Self {
        self.old_keys = old_keys;
        self
    }

    /// The public key `key_id` of this server as of `at_ms`: the current key, or a
    /// retired one for what it signed before it expired.
    pub fn public_key_at(&self, key_id: &str, at_ms: u64) -> Option<String> {
        if key_id == self.key_id {
            return Some(self.public_key_b64.clone());
        }
        self.old_keys
            .iter()
            .find(|k| k.key_id == key_id && at_ms <= k.expired_ts)
            .map(|k| k.public_key.trim_end_matches('=').to_owned())
    }

    pub fn key_pair(&self) -> &Ed25519KeyPair {
        &self.key_pair
    }

    /// A secret for `purpose` derived from the signing key (an Ed25519 signature is
    /// deterministic): stable over restarts and never stored.
    pub fn derived_secret(&self, purpose: &[u8]) -> String {
        use ruma::signatures::KeyPair;
        STANDARD_NO_PAD.encode(self.key_pair.sign(purpose).as_bytes())
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    pub fn public_key_base64(&self) -> &str {
        &self.public_key_b64
    }

    /// Adds this server's signature to `object`.
    pub fn sign_json(&self, object: &mut CanonicalJsonObject) -> Result<()> {
        ruma::signatures::sign_json(&self.server_name, &self.key_pair, object)
            .map_err(|e| Error::internal("signing JSON", e))
    }

    /// The signed body of `GET /_matrix/key/v2/server`.
    pub fn server_keys_document(&self) -> Result<CanonicalJsonObject> {
        let mut verify_key = CanonicalJsonObject::new();
        verify_key.insert("key".into(), CanonicalJsonValue::String(self.public_key_b64.clone()));
        let mut verify_keys = CanonicalJsonObject::new();
        verify_keys.insert(self.key_id.clone(), CanonicalJsonValue::Object(verify_key));
        let valid_until = now_millis().saturating_add(self.validity_ms);

        let mut doc = CanonicalJsonObject::new();
        doc.insert("server_name".into(), CanonicalJsonValue::String(self.server_name.clone()));
        doc.insert("verify_keys".into(), CanonicalJsonValue::Object(verify_keys));
        let mut old_verify_keys = CanonicalJsonObject::new();
        for old in &self.old_keys {
            let mut entry = CanonicalJsonObject::new();
            let key = old.public_key.trim_end_matches('=').to_owned();
            entry.insert("key".into(), CanonicalJsonValue::String(key));
            entry.insert(
                "expired_ts".into(),
                CanonicalJsonValue::Integer(
                    ruma::Int::try_from(old.expired_ts).unwrap_or(ruma::Int::MAX),
                ),
            );
            old_verify_keys.insert(old.key_id.clone(), CanonicalJsonValue::Object(entry));
        }
        doc.insert("old_verify_keys".into(), CanonicalJsonValue::Object(old_verify_keys));
        doc.insert(
            "valid_until_ts".into(),
            CanonicalJsonValue::Integer(ruma::Int::try_from(valid_until).unwrap_or(ruma::Int::MAX)),
        );
        self.sign_json(&mut doc)?;
        Ok(doc)
    }
}

fn generate_key_file_text() -> String {
    let seed: [u8; 32] = crate::random::bytes();
    let version = format!("a_{}", crate::random::alphanumeric(4));
    format!("ed25519 {version} {}\n", STANDARD_NO_PAD.encode(seed))
}

/// Creates `path` with mode 0600 from the first byte on (never world-readable, not even
/// briefly), via a temporary file renamed into place so a crash leaves no half key.
fn write_private_file(path: &Path, contents: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp)?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_key_persists_and_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/signing.key");
        let a = ServerKeys::load_or_generate(&path, "example.org", 24).unwrap();
        let b = ServerKeys::load_or_generate(&path, "example.org", 24).unwrap();
        assert_eq!(a.key_id(), b.key_id());
        assert_eq!(a.public_key_base64(), b.public_key_base64());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
    }

    #[test]
    fn synapse_format_key_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        // Seed of all zero bytes: its public key is well known.
        std::fs::write(&path, "ed25519 a_test AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\n")
            .unwrap();
        let k = ServerKeys::load_or_generate(&path, "example.org", 24).unwrap();
        assert_eq!(k.key_id(), "ed25519:a_test");
        assert_eq!(k.public_key_base64(), "O2onvM62pC1io6jQKm8Nc2UyFXcd4kOmOsBIoYtZ2ik");
    }

    #[test]
    fn bad_key_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["", "rsa a b", "ed25519 v!x AAAA", "ed25519 v notbase64!!", "ed25519 v AAAA"] {
            let path = dir.path().join("bad");
            std::fs::write(&path, bad).unwrap();
            assert!(ServerKeys::load_or_generate(&path, "e.org", 24).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn key_document_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let k = ServerKeys::load_or_generate(&dir.path().join("k"), "example.org", 24).unwrap();
        let doc = k.server_keys_document().unwrap();
        let key = ruma::serde::Base64::parse(k.public_key_base64()).unwrap();
        let mut keys = std::collections::BTreeMap::new();
        keys.insert(k.key_id().to_owned(), key);
        let mut map = std::collections::BTreeMap::new();
        map.insert("example.org".to_owned(), keys);
        ruma::signatures::verify_json(&map, &doc).unwrap();
    }
}
