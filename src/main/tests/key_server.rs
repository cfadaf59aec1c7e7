//! The signed server key document: valid signatures (checked with ruma), stable across
//! restarts, key file private.

mod common;

use std::collections::BTreeMap;

use common::TestServer;
use ruma::{CanonicalJsonObject, serde::Base64};

async fn fetch_and_verify(s: &TestServer, server_name: &str) -> (String, String) {
    let (status, body) = s.get("/_matrix/key/v2/server").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["server_name"], server_name);
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()
            as u64;
    assert!(body["valid_until_ts"].as_u64().unwrap() > now);
    assert!(body["old_verify_keys"].is_object());

    let keys = body["verify_keys"].as_object().unwrap();
    assert_eq!(keys.len(), 1);
    let (key_id, key) = keys.iter().next().unwrap();
    assert!(key_id.starts_with("ed25519:"));
    let key_b64 = key["key"].as_str().unwrap().to_owned();

    let object: CanonicalJsonObject = serde_json::from_value(body.clone()).unwrap();
    let mut server_keys = BTreeMap::new();
    server_keys.insert(key_id.clone(), Base64::parse(&key_b64).unwrap());
    let mut map = BTreeMap::new();
    map.insert(server_name.to_owned(), server_keys);
    ruma::signatures::verify_json(&map, &object).expect("signature verifies");

    // A tampered document must not verify: proves the check above can fail.
    let mut tampered = object.clone();
    tampered.insert("server_name".into(), ruma::CanonicalJsonValue::String("evil.example".into()));
    assert!(ruma::signatures::verify_json(&map, &tampered).is_err());

    (key_id.clone(), key_b64)
}

#[tokio::test]
async fn key_document_is_signed_and_stable_across_restarts() {
    let mut s =
        TestServer::start_with_env("", &[("TRELLIS_SERVER__SERVER_NAME", "keys.example")]).await;
    let first = fetch_and_verify(&s, "keys.example").await;

    // The deprecated form with a key id returns the same key.
    let (status, body) = s.get(&format!("/_matrix/key/v2/server/{}", first.0)).await;
    assert_eq!(status, 200);
    assert_eq!(body["verify_keys"][&first.0]["key"], first.1);

    let (status, body) = s.get("/_matrix/federation/v1/version").await;
    assert_eq!(status, 200);
    assert_eq!(body["server"]["name"], "Trellis");

    s.kill9();
    s.launch().await;
    let second = fetch_and_verify(&s, "keys.example").await;
    assert_eq!(first, second, "the signing key must survive restarts");

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(s.data_dir().join("signing.key")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    }
}

/// Key rotation: the old key goes into `federation.old_signing_keys`, a new key file is
/// made, and the key server publishes the new key with the old one as
/// `old_verify_keys` (with its `expired_ts`), all signed by the new key.
#[tokio::test]
async fn a_rotated_key_is_published_as_an_old_verify_key() {
    let mut s =
        TestServer::start_with_env("", &[("TRELLIS_SERVER__SERVER_NAME", "keys.example")]).await;
    let (old_id, old_key) = fetch_and_verify(&s, "keys.example").await;
    s.terminate();
    std::fs::rename(s.data_dir().join("signing.key"), s.dir.path().join("retired.key")).unwrap();
    let mut config = std::fs::read_to_string(&s.config_path).unwrap();
    config.push_str(&format!(
        "\n[federation]\nold_signing_keys = [{{ key_id = \"{old_id}\", public_key = \"{old_key}\", \
         expired_ts = 1700000000000 }}]\n"
    ));
    std::fs::write(&s.config_path, config).unwrap();
    s.launch().await;

    let (new_id, new_key) = fetch_and_verify(&s, "keys.example").await;
    assert_ne!(new_key, old_key, "a new key was made");
    let (_, body) = s.get("/_matrix/key/v2/server").await;
    assert_eq!(body["old_verify_keys"][&old_id]["key"], old_key.as_str(), "{body}");
    assert_eq!(body["old_verify_keys"][&old_id]["expired_ts"], 1_700_000_000_000u64);
    assert!(body["old_verify_keys"].get(&new_id).is_none());

    // A malformed old key is a configuration error, not a silently broken document.
    s.terminate();
    let config = std::fs::read_to_string(&s.config_path).unwrap().replace(&old_key, "short");
    std::fs::write(&s.config_path, config).unwrap();
    let out = common::run_cli(&["config", "check", s.config_path.to_str().unwrap()], s.dir.path());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("old_signing_keys"), "{out:?}");
}
