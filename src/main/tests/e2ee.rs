//! End-to-end encryption through the HTTP API: device, one-time and fallback keys,
//! cross-signing and signatures, key backup, to-device messages and device-list tracking.
//! Keys are real ed25519 keys and every signature is checked by the server.

mod common;

use std::collections::HashSet;

use base64::{Engine as _, engine::general_purpose::STANDARD_NO_PAD};
use common::{OPEN, TestServer, txn_id};
use ed25519_dalek::{Signer, SigningKey};
use ruma::CanonicalJsonValue;
use serde_json::{Value, json};

fn b64(bytes: &[u8]) -> String {
    STANDARD_NO_PAD.encode(bytes)
}

/// A signing key whose public half is `public`.
struct Key {
    secret: SigningKey,
    public: String,
}

impl Key {
    fn new(seed: u8) -> Self {
        let secret = SigningKey::from_bytes(&[seed; 32]);
        let public = b64(secret.verifying_key().as_bytes());
        Self { secret, public }
    }

    /// Adds a signature by `signer` under `key_id` to `object`.
    fn sign(&self, object: &mut Value, signer: &str, key_id: &str) {
        let CanonicalJsonValue::Object(canonical) =
            CanonicalJsonValue::try_from(object.clone()).unwrap()
        else {
            panic!("not an object")
        };
        let text = ruma::signatures::to_canonical_json_string_for_signing(&canonical).unwrap();
        let sig = b64(&self.secret.sign(text.as_bytes()).to_bytes());
        if object.get("signatures").is_none() {
            object["signatures"] = json!({});
        }
        if object["signatures"].get(signer).is_none() {
            object["signatures"][signer] = json!({});
        }
        object["signatures"][signer][key_id] = json!(sig);
    }
}

/// A signed-in device with its ed25519 identity key.
struct Device {
    user_id: String,
    device_id: String,
    token: String,
    key: Key,
}

impl Device {
    async fn register(s: &TestServer, name: &str, seed: u8) -> Self {
        let (user_id, token) = s.register(name).await;
        Self::from_token(s, user_id, token, seed).await
    }

    async fn login(s: &TestServer, user: &str, seed: u8) -> Self {
        let (status, body) = s
            .post(
                "/_matrix/client/v3/login",
                &json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user},
                        "password": "password123", "initial_device_display_name": "second"}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let user_id = body["user_id"].as_str().unwrap().to_owned();
        let token = body["access_token"].as_str().unwrap().to_owned();
        Self::from_token(s, user_id, token, seed).await
    }

    async fn from_token(s: &TestServer, user_id: String, token: String, seed: u8) -> Self {
        let (_, who) = s.get_auth("/_matrix/client/v3/account/whoami", &token).await;
        let device_id = who["device_id"].as_str().unwrap().to_owned();
        Self { user_id, device_id, token, key: Key::new(seed) }
    }

    fn key_id(&self) -> String {
        format!("ed25519:{}", self.device_id)
    }

    fn device_keys(&self) -> Value {
        let mut keys = json!({
            "user_id": self.user_id,
            "device_id": self.device_id,
            "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
            "keys": {
                format!("curve25519:{}", self.device_id): b64(&[9; 32]),
                self.key_id(): self.key.public,
            },
        });
        self.key.sign(&mut keys, &self.user_id, &self.key_id());
        keys
    }

    fn one_time_key(&self, n: u32) -> Value {
        let mut key = json!({"key": b64(&n.to_be_bytes())});
        self.key.sign(&mut key, &self.user_id, &self.key_id());
        key
    }

    async fn upload(&self, s: &TestServer, body: &Value) -> (u16, Value) {
        s.post_auth("/_matrix/client/v3/keys/upload", &self.token, body).await
    }

    /// Publishes identity keys, `n` one-time keys and a fallback key.
    async fn publish(&self, s: &TestServer, n: u32) {
        let otks: serde_json::Map<String, Value> = (0..n)
            .map(|i| (format!("signed_curve25519:otk{i:03}"), self.one_time_key(i)))
            .collect();
        let mut fallback = self.one_time_key(9999);
        fallback["fallback"] = json!(true);
        self.key.sign(&mut fallback, &self.user_id, &self.key_id());
        let body = json!({
            "device_keys": self.device_keys(),
            "one_time_keys": otks,
            "fallback_keys": {"signed_curve25519:fb1": fallback},
        });
        let (status, resp) = self.upload(s, &body).await;
        assert_eq!(status, 200, "{resp}");
        assert_eq!(resp["one_time_key_counts"]["signed_curve25519"], n);
    }

    async fn sync(&self, s: &TestServer, since: Option<&str>) -> Value {
        let path = match since {
            Some(t) => format!("/_matrix/client/v3/sync?timeout=0&since={t}"),
            None => "/_matrix/client/v3/sync?timeout=0".to_owned(),
        };
        let (status, body) = s.get_auth(&path, &self.token).await;
        assert_eq!(status, 200, "{body}");
        body
    }
}

async fn claim(s: &TestServer, token: &str, user: &str, device: &str) -> Value {
    let (status, body) = s
        .post_auth(
            "/_matrix/client/v3/keys/claim",
            token,
            &json!({"one_time_keys": {user: {device: "signed_curve25519"}}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body["one_time_keys"][user][device].clone()
}

#[tokio::test]
async fn device_keys_are_published_queried_and_claimed_once_then_the_fallback() {
    let s = TestServer::start(OPEN).await;
    let alice = Device::register(&s, "alice", 1).await;
    let bob = Device::register(&s, "bob", 2).await;
    alice.publish(&s, 3).await;

    // Bob sees Alice's device with its keys, her signature, and its display name.
    let (status, q) = s
        .post_auth(
            "/_matrix/client/v3/keys/query",
            &bob.token,
            &json!({"device_keys": {&alice.user_id: []}}),
        )
        .await;
    assert_eq!(status, 200, "{q}");
    let dev = &q["device_keys"][&alice.user_id][&alice.device_id];
    assert_eq!(dev["keys"][alice.key_id()], alice.key.public);
    assert!(dev["signatures"][&alice.user_id][alice.key_id()].is_string());
    assert!(dev["unsigned"].is_object());

    // Alice's sync reports her counts and her unused fallback key.
    let sync = alice.sync(&s, None).await;
    assert_eq!(sync["device_one_time_keys_count"]["signed_curve25519"], 3);
    assert_eq!(sync["device_unused_fallback_key_types"], json!(["signed_curve25519"]));

    // Three claims take the three one-time keys, each once, then the fallback key.
    let mut seen = HashSet::new();
    for _ in 0..3 {
        let got = claim(&s, &bob.token, &alice.user_id, &alice.device_id).await;
        let (id, key) = got.as_object().unwrap().iter().next().unwrap();
        assert!(id.starts_with("signed_curve25519:otk"), "{id}");
        assert!(key["signatures"][&alice.user_id][alice.key_id()].is_string());
        assert!(seen.insert(id.clone()), "{id} handed out twice");
    }
    let sync = alice.sync(&s, None).await;
    assert_eq!(sync["device_one_time_keys_count"]["signed_curve25519"], 0);
    for _ in 0..2 {
        let got = claim(&s, &bob.token, &alice.user_id, &alice.device_id).await;
        assert!(got.get("signed_curve25519:fb1").is_some(), "{got}");
    }
    let sync = alice.sync(&s, None).await;
    assert_eq!(sync["device_unused_fallback_key_types"], json!([]));

    // A new fallback key is unused again; an unknown device has nothing to claim.
    let mut fallback = alice.one_time_key(7777);
    alice.key.sign(&mut fallback, &alice.user_id, &alice.key_id());
    let (status, _) =
        alice.upload(&s, &json!({"fallback_keys": {"signed_curve25519:fb2": fallback}})).await;
    assert_eq!(status, 200);
    let sync = alice.sync(&s, None).await;
    assert_eq!(sync["device_unused_fallback_key_types"], json!(["signed_curve25519"]));
    let none = claim(&s, &bob.token, &alice.user_id, "NOSUCHDEVICE").await;
    assert!(none.is_null(), "{none}");
}

#[tokio::test]
async fn bad_key_uploads_are_refused_and_change_nothing() {
    let s = TestServer::start(OPEN).await;
    let alice = Device::register(&s, "alice", 1).await;

    // Keys for another device, another user, or signed by the wrong key.
    let mut other_device = alice.device_keys();
    other_device["device_id"] = json!("SOMEONEELSE");
    let mut other_user = alice.device_keys();
    other_user["user_id"] = json!("@mallory:localhost");
    let mut forged = alice.device_keys();
    Key::new(66).sign(&mut forged, &alice.user_id, &alice.key_id());
    let mut no_ed25519 = alice.device_keys();
    no_ed25519["keys"] = json!({"curve25519:X": "abc"});
    for (bad, errcode) in [
        (other_device, "M_INVALID_PARAM"),
        (other_user, "M_INVALID_PARAM"),
        (forged, "M_INVALID_SIGNATURE"),
        (no_ed25519, "M_INVALID_PARAM"),
    ] {
        let (status, body) = alice.upload(&s, &json!({"device_keys": bad})).await;
        assert_eq!((status, body["errcode"].as_str()), (400, Some(errcode)), "{body}");
    }
    let (_, q) = s
        .post_auth(
            "/_matrix/client/v3/keys/query",
            &alice.token,
            &json!({"device_keys": {&alice.user_id: []}}),
        )
        .await;
    assert_eq!(q["device_keys"][&alice.user_id], json!({}), "nothing was stored");

    // One-time keys must carry the device's signature once it has identity keys.
    alice.publish(&s, 1).await;
    let mut forged_otk = json!({"key": "abc"});
    Key::new(66).sign(&mut forged_otk, &alice.user_id, &alice.key_id());
    let (status, body) =
        alice.upload(&s, &json!({"one_time_keys": {"signed_curve25519:bad": forged_otk}})).await;
    assert_eq!((status, body["errcode"].as_str()), (400, Some("M_INVALID_SIGNATURE")));
    // Re-using a key id for a different key is refused; the same key again is fine.
    let (status, body) = alice
        .upload(&s, &json!({"one_time_keys": {"signed_curve25519:otk000": alice.one_time_key(5)}}))
        .await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = alice
        .upload(&s, &json!({"one_time_keys": {"signed_curve25519:otk000": alice.one_time_key(0)}}))
        .await;
    assert_eq!((status, &body["one_time_key_counts"]["signed_curve25519"]), (200, &json!(1)));

    // Not signed in: 401.
    let (status, body) = s.post("/_matrix/client/v3/keys/upload", &json!({})).await;
    assert_eq!((status, body["errcode"].as_str()), (401, Some("M_MISSING_TOKEN")));
}

#[tokio::test]
async fn fifty_concurrent_claims_hand_out_each_one_time_key_at_most_once() {
    let s = std::sync::Arc::new(TestServer::start(OPEN).await);
    let alice = Device::register(&s, "alice", 1).await;
    let bob = Device::register(&s, "bob", 2).await;
    alice.publish(&s, 20).await;
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let (s, token) = (s.clone(), bob.token.clone());
        let (user, device) = (alice.user_id.clone(), alice.device_id.clone());
        tasks.push(tokio::spawn(async move { claim(&s, &token, &user, &device).await }));
    }
    let mut one_time = Vec::new();
    let mut fallbacks = 0;
    for task in tasks {
        let got = task.await.unwrap();
        let id = got.as_object().unwrap().keys().next().unwrap().clone();
        if id == "signed_curve25519:fb1" {
            fallbacks += 1;
        } else {
            one_time.push(id);
        }
    }
    let distinct: HashSet<_> = one_time.iter().collect();
    assert_eq!((one_time.len(), distinct.len(), fallbacks), (20, 20, 30));
}

fn cross_signing_key(user: &str, usage: &str, key: &Key) -> Value {
    json!({"user_id": user, "usage": [usage], "keys": {format!("ed25519:{}", key.public): key.public}})
}

#[tokio::test]
async fn cross_signing_keys_and_signatures() {
    let s = TestServer::start(OPEN).await;
    let alice = Device::register(&s, "alice", 1).await;
    let bob = Device::register(&s, "bob", 2).await;
    alice.publish(&s, 0).await;
    let (master, ssk, usk) = (Key::new(11), Key::new(12), Key::new(13));
    let master_id = format!("ed25519:{}", master.public);
    let master_key = cross_signing_key(&alice.user_id, "master", &master);
    let mut self_signing = cross_signing_key(&alice.user_id, "self_signing", &ssk);
    master.sign(&mut self_signing, &alice.user_id, &master_id);
    let mut user_signing = cross_signing_key(&alice.user_id, "user_signing", &usk);
    master.sign(&mut user_signing, &alice.user_id, &master_id);
    let upload = json!({"master_key": master_key, "self_signing_key": self_signing,
                        "user_signing_key": user_signing});

    // A self-signing key not signed by the master key is refused.
    let mut unsigned_ssk = cross_signing_key(&alice.user_id, "self_signing", &ssk);
    Key::new(99).sign(&mut unsigned_ssk, &alice.user_id, &master_id);
    let path = "/_matrix/client/v3/keys/device_signing/upload";
    let (status, body) = s
        .post_auth(
            path,
            &alice.token,
            &json!({"master_key": master_key, "self_signing_key": unsigned_ssk}),
        )
        .await;
    assert_eq!((status, body["errcode"].as_str()), (400, Some("M_INVALID_SIGNATURE")), "{body}");

    // The first upload needs no password; sending the same keys again neither.
    let (status, body) = s.post_auth(path, &alice.token, &upload).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = s.post_auth(path, &alice.token, &upload).await;
    assert_eq!(status, 200, "{body}");
    // Replacing the master key does: 401 with flows, then 200 with the password.
    let new_master = cross_signing_key(&alice.user_id, "master", &Key::new(21));
    let (status, body) = s.post_auth(path, &alice.token, &json!({"master_key": new_master})).await;
    assert_eq!(status, 401, "{body}");
    assert!(body["flows"].is_array() && body["session"].is_string());

    // Bob sees Alice's master and self-signing keys but not her user-signing key.
    let query = json!({"device_keys": {&alice.user_id: []}});
    let (_, q) = s.post_auth("/_matrix/client/v3/keys/query", &bob.token, &query).await;
    assert_eq!(q["master_keys"][&alice.user_id]["keys"][&master_id], master.public);
    assert!(q["self_signing_keys"][&alice.user_id].is_object());
    assert!(q["user_signing_keys"].get(&alice.user_id).is_none(), "{q}");
    let (_, q) = s.post_auth("/_matrix/client/v3/keys/query", &alice.token, &query).await;
    assert!(q["user_signing_keys"][&alice.user_id].is_object(), "{q}");

    // Alice signs her device with her self-signing key: Bob then sees that signature.
    let ssk_id = format!("ed25519:{}", ssk.public);
    let mut device = alice.device_keys();
    ssk.sign(&mut device, &alice.user_id, &ssk_id);
    // ...and a forged signature on her master key is reported, not stored.
    let mut forged = master_key.clone();
    Key::new(77).sign(&mut forged, &alice.user_id, &alice.key_id());
    let (status, body) = s
        .post_auth(
            "/_matrix/client/v3/keys/signatures/upload",
            &alice.token,
            &json!({&alice.user_id: {&alice.device_id: device, &master.public: forged}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["failures"][&alice.user_id][&master.public]["errcode"], "M_INVALID_SIGNATURE");
    assert!(body["failures"][&alice.user_id].get(&alice.device_id).is_none(), "{body}");
    let (_, q) = s.post_auth("/_matrix/client/v3/keys/query", &bob.token, &query).await;
    let dev = &q["device_keys"][&alice.user_id][&alice.device_id];
    assert!(dev["signatures"][&alice.user_id][&ssk_id].is_string(), "{dev}");
    assert!(
        q["master_keys"][&alice.user_id]["signatures"][&alice.user_id]
            .get(alice.key_id())
            .is_none()
    );

    // Bob gets cross-signing keys and signs Alice's master key with his user-signing key.
    let (bob_master, bob_usk) = (Key::new(31), Key::new(33));
    let bob_master_id = format!("ed25519:{}", bob_master.public);
    let mut bob_user_signing = cross_signing_key(&bob.user_id, "user_signing", &bob_usk);
    bob_master.sign(&mut bob_user_signing, &bob.user_id, &bob_master_id);
    let (status, _) = s
        .post_auth(
            path,
            &bob.token,
            &json!({"master_key": cross_signing_key(&bob.user_id, "master", &bob_master),
                    "user_signing_key": bob_user_signing}),
        )
        .await;
    assert_eq!(status, 200);
    let bob_usk_id = format!("ed25519:{}", bob_usk.public);
    let mut signed_master = master_key.clone();
    bob_usk.sign(&mut signed_master, &bob.user_id, &bob_usk_id);
    let (status, body) = s
        .post_auth(
            "/_matrix/client/v3/keys/signatures/upload",
            &bob.token,
            &json!({&alice.user_id: {&master.public: signed_master}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.get("failures").is_none_or(|f| f == &json!({})), "{body}");
    let (_, q) = s.post_auth("/_matrix/client/v3/keys/query", &bob.token, &query).await;
    assert!(q["master_keys"][&alice.user_id]["signatures"][&bob.user_id][&bob_usk_id].is_string());
    // Signing a key that does not exist fails for that key only.
    let (_, body) = s
        .post_auth(
            "/_matrix/client/v3/keys/signatures/upload",
            &bob.token,
            &json!({&alice.user_id: {"NOTAKEY": {"signatures": {}}}}),
        )
        .await;
    assert!(body["failures"][&alice.user_id]["NOTAKEY"]["errcode"].is_string(), "{body}");
}

#[tokio::test]
async fn key_backup_versions_and_keys() {
    let s = TestServer::start(OPEN).await;
    let alice = Device::register(&s, "alice", 1).await;
    let t = &alice.token;
    let (status, body) = s.get_auth("/_matrix/client/v3/room_keys/version", t).await;
    assert_eq!((status, body["errcode"].as_str()), (404, Some("M_NOT_FOUND")));

    let algorithm = "m.megolm_backup.v1.curve25519-aes-sha2";
    let version_body = json!({"algorithm": algorithm, "auth_data": {"public_key": "abc"}});
    let (status, body) =
        s.post_auth("/_matrix/client/v3/room_keys/version", t, &version_body).await;
    assert_eq!(status, 200, "{body}");
    let v1 = body["version"].as_str().unwrap().to_owned();
    let (_, info) = s.get_auth("/_matrix/client/v3/room_keys/version", t).await;
    assert_eq!((info["version"].as_str(), info["count"].as_u64()), (Some(v1.as_str()), Some(0)));
    assert_eq!(info["auth_data"]["public_key"], "abc");
    let etag0 = info["etag"].as_str().unwrap().to_owned();

    let room = "!room:localhost";
    let key = |verified: bool, index: u64, tag: &str| {
        json!({"first_message_index": index, "forwarded_count": 0, "is_verified": verified,
               "session_data": {"ciphertext": tag}})
    };
    let put = |sid: &str| format!("/_matrix/client/v3/room_keys/keys/{room}/{sid}?version={v1}");
    let (status, body) = s.put_auth(&put("s1"), t, &key(false, 5, "first")).await;
    assert_eq!((status, body["count"].as_u64()), (200, Some(1)), "{body}");
    assert_ne!(body["etag"].as_str(), Some(etag0.as_str()));
    // A worse copy is ignored; a better one (lower index) replaces it.
    s.put_auth(&put("s1"), t, &key(false, 9, "worse")).await;
    let (_, got) = s.get_auth(&put("s1"), t).await;
    assert_eq!(got["session_data"]["ciphertext"], "first");
    s.put_auth(&put("s1"), t, &key(false, 1, "better")).await;
    let (_, got) = s.get_auth(&put("s1"), t).await;
    assert_eq!(got["session_data"]["ciphertext"], "better");

    // All three levels of writes and reads.
    let all = json!({"rooms": {room: {"sessions": {"s2": key(true, 0, "two")}},
                               "!other:localhost": {"sessions": {"s3": key(true, 0, "three")}}}});
    let (status, body) =
        s.put_auth(&format!("/_matrix/client/v3/room_keys/keys?version={v1}"), t, &all).await;
    assert_eq!((status, body["count"].as_u64()), (200, Some(3)), "{body}");
    let (_, got) = s.get_auth(&format!("/_matrix/client/v3/room_keys/keys?version={v1}"), t).await;
    assert_eq!(got["rooms"][room]["sessions"].as_object().unwrap().len(), 2);
    let (_, got) =
        s.get_auth(&format!("/_matrix/client/v3/room_keys/keys/{room}?version={v1}"), t).await;
    assert_eq!(got["sessions"]["s2"]["session_data"]["ciphertext"], "two");
    let (status, _) = s.get_auth(&put("missing"), t).await;
    assert_eq!(status, 404);

    // Bad key data is refused.
    let (status, body) = s.put_auth(&put("s9"), t, &json!({"session_data": {}})).await;
    assert_eq!((status, body["errcode"].as_str()), (400, Some("M_BAD_JSON")), "{body}");

    // A new version becomes current: writes to the old one get 403 with the current.
    let (_, body) = s.post_auth("/_matrix/client/v3/room_keys/version", t, &version_body).await;
    let v2 = body["version"].as_str().unwrap().to_owned();
    let (status, body) = s.put_auth(&put("s4"), t, &key(true, 0, "late")).await;
    assert_eq!((status, body["errcode"].as_str()), (403, Some("M_WRONG_ROOM_KEYS_VERSION")));
    assert_eq!(body["current_version"], v2);

    // Deleting a session, then the old version.
    let (status, body) = s.delete_auth(&put("s1"), t, &json!({})).await;
    assert_eq!((status, body["count"].as_u64()), (200, Some(2)), "{body}");
    let (status, _) =
        s.delete_auth(&format!("/_matrix/client/v3/room_keys/version/{v1}"), t, &json!({})).await;
    assert_eq!(status, 200);
    let (status, _) = s.get_auth(&format!("/_matrix/client/v3/room_keys/version/{v1}"), t).await;
    assert_eq!(status, 404);

    // Updating auth_data keeps the algorithm; changing the algorithm is refused.
    let path = format!("/_matrix/client/v3/room_keys/version/{v2}");
    let (status, _) = s
        .put_auth(&path, t, &json!({"algorithm": algorithm, "auth_data": {"public_key": "new"}}))
        .await;
    assert_eq!(status, 200);
    let (_, info) = s.get_auth(&path, t).await;
    assert_eq!(info["auth_data"]["public_key"], "new");
    let (status, _) = s.put_auth(&path, t, &json!({"algorithm": "other", "auth_data": {}})).await;
    assert_eq!(status, 400);
}

/// Two syncs of a device acknowledging the same messages at once (a client retrying)
/// must not lose what arrived after them.
#[tokio::test]
async fn concurrent_acknowledgements_lose_no_later_message() {
    let s = std::sync::Arc::new(TestServer::start(OPEN).await);
    let alice = Device::register(&s, "alice", 1).await;
    let bob = Device::register(&s, "bob", 2).await;
    let first = bob.sync(&s, None).await;
    let since = first["next_batch"].as_str().unwrap().to_owned();
    let send = |n: u32| {
        let (s, token, user, device) =
            (s.clone(), alice.token.clone(), bob.user_id.clone(), bob.device_id.clone());
        async move {
            let path = format!("/_matrix/client/v3/sendToDevice/m.custom/{}", txn_id());
            let body = json!({"messages": {user: {device: {"n": n}}}});
            let (status, resp) = s.put_auth(&path, &token, &body).await;
            assert_eq!(status, 200, "{resp}");
        }
    };
    send(1).await;
    send(2).await;
    let got = bob.sync(&s, Some(&since)).await;
    assert_eq!(got["to_device"]["events"].as_array().map(Vec::len), Some(2), "{got}");
    let token = got["next_batch"].as_str().unwrap().to_owned();
    send(3).await;
    let both = (0..2).map(|_| {
        let (s, bob_token, token) = (s.clone(), bob.token.clone(), token.clone());
        tokio::spawn(async move {
            s.get_auth(&format!("/_matrix/client/v3/sync?timeout=0&since={token}"), &bob_token)
                .await
        })
    });
    let mut seen = Vec::new();
    for answer in both {
        let (status, body) = answer.await.unwrap();
        assert_eq!(status, 200, "{body}");
        for event in body["to_device"]["events"].as_array().into_iter().flatten() {
            seen.push(event["content"]["n"].clone());
        }
    }
    // Both answers may carry the third message (neither acknowledged it); what matters
    // is that it is not lost, then or later.
    assert!(seen.contains(&json!(3)), "{seen:?}");
    let later = bob.sync(&s, Some(&token)).await;
    assert_eq!(later["to_device"]["events"][0]["content"]["n"], 3, "{later}");
}

#[tokio::test]
async fn to_device_messages_are_delivered_once_and_deleted_after_acknowledgement() {
    let s = std::sync::Arc::new(TestServer::start(OPEN).await);
    let alice = Device::register(&s, "alice", 1).await;
    let bob = Device::register(&s, "bob", 2).await;
    let bob2 = Device::login(&s, "bob", 3).await;
    let first = bob.sync(&s, None).await;
    let since = first["next_batch"].as_str().unwrap().to_owned();

    // A long-poll of Bob's is woken by a message to his device.
    let waiting = {
        let (s, token, since) = (s.clone(), bob.token.clone(), since.clone());
        tokio::spawn(async move {
            s.get_auth(&format!("/_matrix/client/v3/sync?timeout=20000&since={since}"), &token)
                .await
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let txn = txn_id();
    let path = format!("/_matrix/client/v3/sendToDevice/m.room.encrypted/{txn}");
    let body = json!({"messages": {&bob.user_id: {&bob.device_id: {"ciphertext": "hello"}}}});
    let (status, resp) = s.put_auth(&path, &alice.token, &body).await;
    assert_eq!(status, 200, "{resp}");
    // The same transaction again is not a second message.
    s.put_auth(&path, &alice.token, &body).await;
    let (_, woken) = waiting.await.unwrap();
    let events = woken["to_device"]["events"].as_array().unwrap();
    assert_eq!(events.len(), 1, "{woken}");
    assert_eq!(events[0]["sender"], alice.user_id);
    assert_eq!(events[0]["type"], "m.room.encrypted");
    assert_eq!(events[0]["content"]["ciphertext"], "hello");
    // Only the addressed device gets it.
    let other = bob2.sync(&s, None).await;
    assert!(other.get("to_device").is_none(), "{other}");

    // Syncing again from the old token redelivers (not acknowledged); from the new one
    // it is gone.
    let again = bob.sync(&s, Some(&since)).await;
    assert_eq!(again["to_device"]["events"].as_array().map(Vec::len), Some(1));
    let next = again["next_batch"].as_str().unwrap().to_owned();
    let after = bob.sync(&s, Some(&next)).await;
    assert!(after.get("to_device").is_none(), "{after}");
    let replay = bob.sync(&s, Some(&since)).await;
    assert!(replay.get("to_device").is_none(), "deleted once acknowledged: {replay}");

    // `*` reaches every device of the user.
    let body = json!({"messages": {&bob.user_id: {"*": {"n": 1}}}});
    s.put_auth(
        &format!("/_matrix/client/v3/sendToDevice/m.custom/{}", txn_id()),
        &alice.token,
        &body,
    )
    .await;
    for device in [&bob, &bob2] {
        let got = device.sync(&s, None).await;
        assert_eq!(got["to_device"]["events"][0]["content"]["n"], 1, "{got}");
    }

    // Many messages come in batches; the token says how far each batch got.
    for i in 0..150 {
        let body = json!({"messages": {&bob2.user_id: {&bob2.device_id: {"i": i}}}});
        s.put_auth(
            &format!("/_matrix/client/v3/sendToDevice/m.custom/{}", txn_id()),
            &alice.token,
            &body,
        )
        .await;
    }
    let mut got = Vec::new();
    let mut token: Option<String> = None;
    for _ in 0..5 {
        let resp = bob2.sync(&s, token.as_deref()).await;
        for e in resp["to_device"]["events"].as_array().into_iter().flatten() {
            if e["type"] == "m.custom" && e["content"].get("i").is_some() {
                got.push(e["content"]["i"].as_u64().unwrap());
            }
        }
        token = Some(resp["next_batch"].as_str().unwrap().to_owned());
    }
    assert_eq!(got, (0..150).collect::<Vec<u64>>());
}

#[tokio::test]
async fn device_list_changes_reach_users_who_share_a_room() {
    let s = TestServer::start(OPEN).await;
    let alice = Device::register(&s, "alice", 1).await;
    let bob = Device::register(&s, "bob", 2).await;
    let carol = Device::register(&s, "carol", 3).await;
    let room = s.create_room(&alice.token, json!({"preset": "public_chat"})).await;
    s.join_room(&bob.token, &room).await;
    let since = bob.sync(&s, None).await["next_batch"].as_str().unwrap().to_owned();
    let carol_since = carol.sync(&s, None).await["next_batch"].as_str().unwrap().to_owned();

    // Alice publishes keys: Bob, who shares a room, hears of it; Carol does not.
    alice.publish(&s, 1).await;
    let got = bob.sync(&s, Some(&since)).await;
    assert_eq!(got["device_lists"]["changed"], json!([alice.user_id]), "{got}");
    let got = carol.sync(&s, Some(&carol_since)).await;
    assert!(got.get("device_lists").is_none(), "{got}");
    let (status, changes) = s
        .get_auth(
            &format!(
                "/_matrix/client/v3/keys/changes?from={since}&to={}",
                got["next_batch"].as_str().unwrap()
            ),
            &bob.token,
        )
        .await;
    assert_eq!(status, 200, "{changes}");
    assert_eq!(changes["changed"], json!([alice.user_id]));

    // Carol joining makes her new to Bob; Alice logging in a second device is a change.
    let since = bob.sync(&s, Some(&since)).await["next_batch"].as_str().unwrap().to_owned();
    s.join_room(&carol.token, &room).await;
    let got = bob.sync(&s, Some(&since)).await;
    assert_eq!(got["device_lists"]["changed"], json!([carol.user_id]), "{got}");
    let since = got["next_batch"].as_str().unwrap().to_owned();
    let alice2 = Device::login(&s, "alice", 4).await;
    alice2.publish(&s, 0).await;
    let got = bob.sync(&s, Some(&since)).await;
    assert_eq!(got["device_lists"]["changed"], json!([alice.user_id]), "{got}");
    let since = got["next_batch"].as_str().unwrap().to_owned();

    // Deleting a device is a change too.
    let (status, _) = s.post_auth("/_matrix/client/v3/logout", &alice2.token, &json!({})).await;
    assert_eq!(status, 200);
    let got = bob.sync(&s, Some(&since)).await;
    assert_eq!(got["device_lists"]["changed"], json!([alice.user_id]), "{got}");
    let since = got["next_batch"].as_str().unwrap().to_owned();
    // ...and the deleted device's keys are gone with it.
    let (_, q) = s
        .post_auth(
            "/_matrix/client/v3/keys/query",
            &bob.token,
            &json!({"device_keys": {&alice.user_id: []}}),
        )
        .await;
    let devices: Vec<&String> =
        q["device_keys"][&alice.user_id].as_object().unwrap().keys().collect();
    assert_eq!(devices, vec![&alice.device_id], "{q}");
    let none = claim(&s, &bob.token, &alice.user_id, &alice2.device_id).await;
    assert!(none.is_null(), "{none}");

    // Carol leaving the only room she shares with Bob puts her in `left`.
    s.post_auth(&format!("/_matrix/client/v3/rooms/{room}/leave"), &carol.token, &json!({})).await;
    let got = bob.sync(&s, Some(&since)).await;
    assert_eq!(got["device_lists"]["left"], json!([carol.user_id]), "{got}");
}

#[tokio::test]
async fn sliding_sync_extensions_carry_to_device_and_key_counts() {
    let s = TestServer::start(OPEN).await;
    let alice = Device::register(&s, "alice", 1).await;
    let bob = Device::register(&s, "bob", 2).await;
    bob.publish(&s, 2).await;
    let body = json!({"messages": {&bob.user_id: {&bob.device_id: {"secret": "x"}}}});
    s.put_auth(
        &format!("/_matrix/client/v3/sendToDevice/m.custom/{}", txn_id()),
        &alice.token,
        &body,
    )
    .await;
    let path = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync";
    let request =
        json!({"extensions": {"to_device": {"enabled": true}, "e2ee": {"enabled": true}}});
    let (status, resp) = s.post_auth(path, &bob.token, &request).await;
    assert_eq!(status, 200, "{resp}");
    let ext = &resp["extensions"];
    assert_eq!(ext["to_device"]["events"][0]["content"]["secret"], "x", "{resp}");
    assert_eq!(ext["e2ee"]["device_one_time_keys_count"]["signed_curve25519"], 2);
    assert_eq!(ext["e2ee"]["device_unused_fallback_key_types"], json!(["signed_curve25519"]));

    // Acknowledged by the next request's `since`: not delivered again.
    let next = ext["to_device"]["next_batch"].as_str().unwrap();
    let request = json!({"extensions": {"to_device": {"enabled": true, "since": next}}});
    let (_, resp) = s
        .post_auth(
            &format!("{path}?pos={}&timeout=0", resp["pos"].as_str().unwrap()),
            &bob.token,
            &request,
        )
        .await;
    assert_eq!(resp["extensions"]["to_device"]["events"], json!([]), "{resp}");
}

#[tokio::test]
async fn one_time_keys_are_claimed_in_the_order_they_were_uploaded() {
    let s = TestServer::start(OPEN).await;
    let alice = Device::register(&s, "alice", 1).await;
    let bob = Device::register(&s, "bob", 2).await;
    alice.publish(&s, 0).await;
    // Each later upload's key id sorts before the earlier ones': claims must still hand
    // out the oldest upload first.
    let ids = ["zzz", "mmm", "AAA"];
    for (n, id) in ids.iter().enumerate() {
        let key = alice.one_time_key(n as u32);
        let body = json!({"one_time_keys": {format!("signed_curve25519:{id}"): key}});
        let (status, resp) = alice.upload(&s, &body).await;
        assert_eq!(status, 200, "{resp}");
    }
    for id in ids {
        let claimed = claim(&s, &bob.token, &alice.user_id, &alice.device_id).await;
        let name = format!("signed_curve25519:{id}");
        assert!(claimed.get(&name).is_some(), "expected {name}, got {claimed}");
    }
}

#[tokio::test]
async fn a_dehydrated_device_holds_keys_and_collects_to_device_messages() {
    const BASE: &str = "/_matrix/client/unstable/org.matrix.msc3814.v1/dehydrated_device";
    let s = TestServer::start(OPEN).await;
    let alice = Device::register(&s, "alice", 1).await;
    let bob = Device::register(&s, "bob", 2).await;
    let (_, versions) = s.get("/_matrix/client/versions").await;
    assert_eq!(versions["unstable_features"]["org.matrix.msc3814"], true, "{versions}");
    let (status, body) = s.get_auth(BASE, &alice.token).await;
    assert_eq!((status, body["errcode"].as_str()), (404, Some("M_NOT_FOUND")), "{body}");

    let dehydrated = |id: &str, seed: u8| Device {
        user_id: alice.user_id.clone(),
        device_id: id.to_owned(),
        token: alice.token.clone(),
        key: Key::new(seed),
    };
    let first = dehydrated("DEHYD1", 7);
    let data = json!({"algorithm": "org.matrix.msc3814.v2", "device_pickle": "p", "nonce": "n"});
    let body = json!({
        "device_id": "DEHYD1",
        "device_data": data,
        "initial_device_display_name": "Dehydrated device",
        "device_keys": first.device_keys(),
        "one_time_keys": {"signed_curve25519:AAAA": first.one_time_key(1)},
        "fallback_keys": {},
    });
    let (status, put) = s.put_auth(BASE, &alice.token, &body).await;
    assert_eq!(status, 200, "{put}");
    assert_eq!(put["device_id"], "DEHYD1");
    let (_, got) = s.get_auth(BASE, &alice.token).await;
    assert_eq!((&got["device_id"], &got["device_data"]), (&json!("DEHYD1"), &data), "{got}");

    // Others see its keys and can claim its one-time key.
    let (_, q) = s
        .post_auth(
            "/_matrix/client/v3/keys/query",
            &bob.token,
            &json!({"device_keys": {&alice.user_id: []}}),
        )
        .await;
    assert!(q["device_keys"][&alice.user_id]["DEHYD1"].is_object(), "{q}");
    let claimed = claim(&s, &bob.token, &alice.user_id, "DEHYD1").await;
    assert!(claimed.get("signed_curve25519:AAAA").is_some(), "{claimed}");

    // Messages sent to it wait until the rehydrating client fetches them, in batches.
    for n in 0..2 {
        let path = format!("/_matrix/client/v3/sendToDevice/m.room.encrypted/{}", txn_id());
        let message = json!({"messages": {&alice.user_id: {"DEHYD1": {"n": n}}}});
        let (status, _) = s.put_auth(&path, &bob.token, &message).await;
        assert_eq!(status, 200);
    }
    let events = format!("{BASE}/DEHYD1/events");
    let (status, page) = s.post_auth(&events, &alice.token, &json!({})).await;
    assert_eq!(status, 200, "{page}");
    let got: Vec<_> =
        page["events"].as_array().unwrap().iter().map(|e| e["content"]["n"].clone()).collect();
    assert_eq!(got, [json!(0), json!(1)], "{page}");
    let next = page["next_batch"].as_str().unwrap();
    let (_, page) = s.post_auth(&events, &alice.token, &json!({"next_batch": next})).await;
    assert_eq!(page["events"], json!([]), "{page}");
    let (status, _) =
        s.post_auth(&format!("{BASE}/{}/events", alice.device_id), &alice.token, &json!({})).await;
    assert_eq!(status, 404);

    // A new one replaces it; deleting it leaves none.
    let second = dehydrated("DEHYD2", 8);
    let body = json!({"device_id": "DEHYD2", "device_data": data,
                      "device_keys": second.device_keys(), "one_time_keys": {}, "fallback_keys": {}});
    let (status, put) = s.put_auth(BASE, &alice.token, &body).await;
    assert_eq!(status, 200, "{put}");
    let (_, devices) = s.get_auth("/_matrix/client/v3/devices", &alice.token).await;
    let ids: HashSet<&str> = devices["devices"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|d| d["device_id"].as_str())
        .collect();
    assert!(ids.contains("DEHYD2") && !ids.contains("DEHYD1"), "{devices}");
    let (status, deleted) = s.delete_auth(BASE, &alice.token, &json!({})).await;
    assert_eq!((status, &deleted["device_id"]), (200, &json!("DEHYD2")), "{deleted}");
    let (status, _) = s.get_auth(BASE, &alice.token).await;
    assert_eq!(status, 404);
    // A signed-in device's id cannot be taken.
    let taken = json!({"device_id": alice.device_id, "device_data": data,
                       "device_keys": alice.device_keys(), "one_time_keys": {}, "fallback_keys": {}});
    let (status, body) = s.put_auth(BASE, &alice.token, &taken).await;
    assert_eq!((status, body["errcode"].as_str()), (400, Some("M_INVALID_PARAM")), "{body}");
}
