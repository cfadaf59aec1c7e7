//! Media encryption at rest (docs/operations.md): files are stored sealed with
//! AES-256-GCM and served as uploaded, whole and by range; files from before encryption
//! was turned on are sealed at the next start; a key rotation reseals every file; a
//! backup keeps the sealed bytes and restores them.

mod common;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use common::{BIN, OPEN, TestServer, noise};
use serde_json::Value;

const KEY_A: &str = "1111111111111111111111111111111111111111111111111111111111111111";
const KEY_B: &str = "2222222222222222222222222222222222222222222222222222222222222222";

fn config(repo: &Path, keys: &[&str]) -> String {
    let keys: Vec<String> = keys.iter().map(|k| format!("\"{k}\"")).collect();
    format!(
        "{OPEN}[backup]\ndestination = \"{}\"\n[media]\nencryption_keys = [{}]\n",
        repo.display(),
        keys.join(", ")
    )
}

/// Rewrites the server's configuration (keeping the listener and data directory lines
/// the harness added) and restarts it.
async fn restart_with(s: &mut TestServer, extra: &str) {
    s.terminate();
    let written = std::fs::read_to_string(&s.config_path).unwrap();
    let harness = &written[written.find("[turn]").unwrap()..];
    std::fs::write(&s.config_path, format!("{extra}\n{harness}")).unwrap();
    s.launch().await;
}

async fn upload(s: &TestServer, token: &str, data: &[u8]) -> String {
    s.upload_bytes(token, data).await
}

async fn download(s: &TestServer, token: &str, mxc: &str, range: Option<&str>) -> Vec<u8> {
    let path = format!("/_matrix/client/v1/media/download/{}", mxc.trim_start_matches("mxc://"));
    let mut request = s.client.get(s.url(&path)).bearer_auth(token);
    if let Some(range) = range {
        request = request.header("range", range);
    }
    let resp = request.send().await.unwrap();
    assert_eq!(resp.status(), if range.is_some() { 206 } else { 200 }, "downloading {mxc}");
    resp.bytes().await.unwrap().to_vec()
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

/// Where the filesystem store keeps the file of `data`.
fn blob(data_dir: &Path, data: &[u8]) -> PathBuf {
    let hash = sha256_hex(data);
    data_dir.join("media/blobs").join(&hash[0..2]).join(&hash[2..4]).join(hash)
}

/// Whether `haystack` holds any 32-byte stretch of `plain`.
fn leaks(haystack: &[u8], plain: &[u8]) -> bool {
    plain.chunks(4096).any(|chunk| haystack.windows(32).any(|w| w == &chunk[..32]))
}

/// The id of the key a sealed file names, once the file is sealed under a key other
/// than `not`.
async fn sealed_key(path: &Path, not: Option<&[u8]>) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(bytes) = std::fs::read(path)
            && bytes.starts_with(b"TRLSENC1")
            && not.is_none_or(|n| n != &bytes[8..16])
        {
            return bytes[8..16].to_vec();
        }
        assert!(Instant::now() < deadline, "{} was not (re)sealed", path.display());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn media_are_sealed_at_rest_and_survive_rotation_and_restore() {
    let repo = tempfile::tempdir().unwrap();
    // Files stored before encryption is turned on.
    let mut s = TestServer::start(OPEN).await;
    let (_, token) = s.register("alice").await;
    let old = noise(100_000, 21);
    let old_mxc = upload(&s, &token, &old).await;
    let data_dir = s.data_dir();
    assert_eq!(std::fs::read(blob(&data_dir, &old)).unwrap(), old, "stored as it came");

    restart_with(&mut s, &config(repo.path(), &[KEY_A])).await;
    let key_a = sealed_key(&blob(&data_dir, &old), None).await;
    assert!(!leaks(&std::fs::read(blob(&data_dir, &old)).unwrap(), &old));
    assert_eq!(download(&s, &token, &old_mxc, None).await, old);

    // New uploads are sealed; whole files and ranges across segments come back.
    let new = noise(200_000, 22);
    let new_mxc = upload(&s, &token, &new).await;
    let sealed = std::fs::read(blob(&data_dir, &new)).unwrap();
    assert!(sealed.starts_with(b"TRLSENC1") && !leaks(&sealed, &new));
    assert_eq!(&sealed[8..16], &key_a[..]);
    assert_eq!(download(&s, &token, &new_mxc, None).await, new);
    let part = download(&s, &token, &new_mxc, Some("bytes=65530-131080")).await;
    assert_eq!(part, &new[65530..=131080]);
    let tail = download(&s, &token, &new_mxc, Some("bytes=199990-")).await;
    assert_eq!(tail, &new[199990..]);

    // Rotation: B seals, A still opens; the start reseals every file under B.
    restart_with(&mut s, &config(repo.path(), &[KEY_B, KEY_A])).await;
    let key_b = sealed_key(&blob(&data_dir, &old), Some(&key_a)).await;
    assert_eq!(sealed_key(&blob(&data_dir, &new), Some(&key_a)).await, key_b);
    // Once resealed, A is no longer needed.
    restart_with(&mut s, &config(repo.path(), &[KEY_B])).await;
    assert_eq!(download(&s, &token, &old_mxc, None).await, old);
    assert_eq!(download(&s, &token, &new_mxc, None).await, new);

    // A backup keeps the sealed bytes, and a restore with the key serves the files.
    s.terminate();
    let out = Command::new(BIN)
        .args(["backup", "create", "--config"])
        .arg(&s.config_path)
        .env_remove("TRELLIS_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let manifest: Value = {
        let dir = repo.path().join("manifests");
        let first = std::fs::read_dir(&dir).unwrap().flatten().next().unwrap().path();
        serde_json::from_str(&std::fs::read_to_string(first).unwrap()).unwrap()
    };
    let sealed_entries = manifest["files"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["path"].as_str().unwrap().starts_with("sealed-media/"))
        .count();
    assert_eq!(sealed_entries, 2, "{manifest}");
    fn all_bytes(dir: &Path) -> Vec<u8> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            if entry.path().is_dir() {
                out.extend(all_bytes(&entry.path()));
            } else {
                out.extend(std::fs::read(entry.path()).unwrap());
            }
        }
        out
    }
    let stored = all_bytes(&repo.path().join("files"));
    assert!(!leaks(&stored, &old) && !leaks(&stored, &new), "the backup holds plaintext");

    let mut r = TestServer::prepare(&config(repo.path(), &[KEY_B]), &[]);
    let out = Command::new(BIN)
        .args(["backup", "restore", "latest", "--config"])
        .arg(&r.config_path)
        .env_remove("TRELLIS_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    r.launch().await;
    assert_eq!(download(&r, &token, &new_mxc, None).await, new);
    assert_eq!(download(&r, &token, &old_mxc, None).await, old);
    assert!(std::fs::read(blob(&r.data_dir(), &new)).unwrap().starts_with(b"TRLSENC1"));
}
