//! Federation between two real Trellis servers on loopback, each with a TLS federation
//! listener whose certificate comes from a test CA both trust: signed requests, key
//! fetching, the notary, and the queries that cross servers (profiles, aliases, device
//! keys). Unsigned and badly signed requests are refused.

mod common;

use common::{OPEN, TestServer, free_port, mint_certificates};
use serde_json::{Value, json};

struct Peer {
    server: TestServer,
    name: String,
    _certs: tempfile::TempDir,
}

/// A server named `127.0.0.1:<its TLS port>` with the certificates in `certs` (which
/// come from one test CA every server here trusts).
async fn server_with(certs: &std::path::Path) -> (TestServer, String) {
    let dir = certs.display();
    let name = format!("127.0.0.1:{}", free_port());
    let config = format!(
        "{OPEN}[federation]\ntls_listen = \"{name}\"\ntls_certificate = \"{dir}/server.pem\"\n\
         tls_private_key = \"{dir}/server.key\"\nca_file = \"{dir}/ca.pem\"\n"
    );
    let server =
        TestServer::start_with_env(&config, &[("TRELLIS_SERVER__SERVER_NAME", name.as_str())])
            .await;
    (server, name)
}

async fn peer() -> Peer {
    let certs = tempfile::tempdir().unwrap();
    mint_certificates(certs.path());
    let (server, name) = server_with(certs.path()).await;
    Peer { server, name, _certs: certs }
}

/// `n` servers whose certificates come from one CA (the first peer keeps the CA).
async fn peers(n: usize) -> Vec<Peer> {
    let certs = tempfile::tempdir().unwrap();
    mint_certificates(certs.path());
    let mut out = Vec::new();
    for _ in 0..n {
        let (server, name) = server_with(certs.path()).await;
        out.push(Peer { server, name, _certs: tempfile::tempdir().unwrap() });
    }
    out[0]._certs = certs;
    out
}

/// Two servers whose certificates come from one CA.
async fn pair() -> (Peer, Peer) {
    let mut both = peers(2).await;
    let b = both.pop().unwrap();
    (both.pop().unwrap(), b)
}

#[tokio::test]
async fn profiles_aliases_and_device_keys_cross_servers() {
    let (a, b) = pair().await;
    let (alice, alice_token) = a.server.register("alice").await;
    assert!(alice.ends_with(&format!(":{}", a.name)), "{alice}");
    let (_, bob_token) = b.server.register("bob").await;
    let (status, _) = a
        .server
        .put_auth(
            &format!("/_matrix/client/v3/profile/{alice}/displayname"),
            &alice_token,
            &json!({"displayname": "Alice of A"}),
        )
        .await;
    assert_eq!(status, 200);

    // Bob, on B, reads Alice's profile: B signs a request to A, A fetches B's key.
    let (status, profile) =
        b.server.get_auth(&format!("/_matrix/client/v3/profile/{alice}"), &bob_token).await;
    assert_eq!(status, 200, "{profile}");
    assert_eq!(profile["displayname"], "Alice of A");
    let (status, name) = b
        .server
        .get_auth(&format!("/_matrix/client/v3/profile/{alice}/displayname"), &bob_token)
        .await;
    assert_eq!((status, &name["displayname"]), (200, &json!("Alice of A")), "{name}");
    // An unknown user over there is 404 here too.
    let ghost = format!("@ghost:{}", a.name);
    let (status, body) =
        b.server.get_auth(&format!("/_matrix/client/v3/profile/{ghost}"), &bob_token).await;
    assert_eq!((status, body["errcode"].as_str()), (404, Some("M_NOT_FOUND")), "{body}");

    // An alias of A resolves on B.
    let room = a
        .server
        .create_room(&alice_token, json!({"preset": "public_chat", "room_alias_name": "lobby"}))
        .await;
    let alias = common::urlencode(&format!("#lobby:{}", a.name));
    let (status, body) =
        b.server.get_auth(&format!("/_matrix/client/v3/directory/room/{alias}"), &bob_token).await;
    assert_eq!((status, body["room_id"].as_str()), (200, Some(room.as_str())), "{body}");
    assert_eq!(body["servers"], json!([a.name]));

    // Alice's device keys and one-time keys reach Bob's server.
    let (_, who) = a.server.get_auth("/_matrix/client/v3/account/whoami", &alice_token).await;
    let device = who["device_id"].as_str().unwrap().to_owned();
    let upload =
        json!({"one_time_keys": {"curve25519:AAAA": "b3RrMQ", "curve25519:AAAB": "b3RrMg"}});
    let (status, _) =
        a.server.post_auth("/_matrix/client/v3/keys/upload", &alice_token, &upload).await;
    assert_eq!(status, 200);
    let (status, claimed) = b
        .server
        .post_auth(
            "/_matrix/client/v3/keys/claim",
            &bob_token,
            &json!({"one_time_keys": {&alice: {&device: "curve25519"}}}),
        )
        .await;
    assert_eq!(status, 200, "{claimed}");
    let keys = claimed["one_time_keys"][&alice][&device].as_object().unwrap();
    assert_eq!(keys.len(), 1, "{claimed}");
    let (status, q) = b
        .server
        .post_auth(
            "/_matrix/client/v3/keys/query",
            &bob_token,
            &json!({"device_keys": {&alice: []}}),
        )
        .await;
    assert_eq!(status, 200, "{q}");
    assert!(q["device_keys"][&alice].is_object(), "{q}");
    assert!(q.get("failures").is_none_or(|f| f.get(&a.name).is_none()), "{q}");
}

#[tokio::test]
async fn unsigned_and_forged_federation_requests_are_refused() {
    let (a, b) = pair().await;
    let (alice, _) = a.server.register("alice").await;
    let path =
        format!("/_matrix/federation/v1/query/profile?user_id={}", common::urlencode(&alice));
    let (status, body) = a.server.get(&path).await;
    assert_eq!((status, body["errcode"].as_str()), (401, Some("M_UNAUTHORIZED")), "{body}");

    // A signature that does not verify with B's real key.
    let forged = format!(
        "X-Matrix origin=\"{}\",destination=\"{}\",key=\"ed25519:a_bcde\",sig=\"{}\"",
        b.name,
        a.name,
        "A".repeat(86)
    );
    let resp = a
        .server
        .client
        .get(a.server.url(&path))
        .header("Authorization", forged)
        .send()
        .await
        .unwrap();
    let (status, body) = common::json_of(resp).await;
    assert_eq!((status, body["errcode"].as_str()), (401, Some("M_UNAUTHORIZED")), "{body}");
    // An origin that is not a server at all.
    let bogus = "X-Matrix origin=\"127.0.0.1:1\",key=\"ed25519:x\",sig=\"AAAA\"";
    let resp = a
        .server
        .client
        .get(a.server.url(&path))
        .header("Authorization", bogus)
        .send()
        .await
        .unwrap();
    let (status, _) = common::json_of(resp).await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn the_notary_serves_other_servers_keys_with_its_own_signature() {
    let (a, b) = pair().await;
    let (_, body) = b.server.get("/_matrix/key/v2/server").await;
    let b_key_id = body["verify_keys"].as_object().unwrap().keys().next().unwrap().clone();

    let (status, body) = a.server.get(&format!("/_matrix/key/v2/query/{}", b.name)).await;
    assert_eq!(status, 200, "{body}");
    let keys: &Value = &body["server_keys"][0];
    assert_eq!(keys["server_name"], b.name);
    assert!(keys["verify_keys"].get(&b_key_id).is_some(), "{keys}");
    assert!(keys["signatures"][&b.name].is_object(), "B's own signature stays");
    assert!(keys["signatures"][&a.name].is_object(), "A countersigns: {keys}");

    let (status, body) = a
        .server
        .post("/_matrix/key/v2/query", &json!({"server_keys": {&b.name: {}, &a.name: {}}}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["server_keys"].as_array().unwrap().len(), 2, "{body}");
}

#[tokio::test]
async fn an_unreachable_server_is_a_clean_error() {
    let a = peer().await;
    let (_, token) = a.server.register("alice").await;
    let nobody = format!("@x:127.0.0.1:{}", free_port());
    let (status, body) =
        a.server.get_auth(&format!("/_matrix/client/v3/profile/{nobody}"), &token).await;
    assert!(status >= 500 || status == 404, "{status} {body}");
    assert!(body["errcode"].is_string());
    let (status, q) = a
        .server
        .post_auth("/_matrix/client/v3/keys/query", &token, &json!({"device_keys": {&nobody: []}}))
        .await;
    assert_eq!(status, 200, "{q}");
    assert!(q["failures"].as_object().is_some_and(|f| !f.is_empty()), "{q}");
}

#[tokio::test]
async fn media_of_another_server_is_fetched_over_federation_and_cached() {
    let (a, b) = pair().await;
    let (_, alice_token) = a.server.register("alice").await;
    let (_, bob_token) = b.server.register("bob").await;
    let content: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let resp = a
        .server
        .client
        .post(a.server.url("/_matrix/media/v3/upload?filename=data.bin"))
        .bearer_auth(&alice_token)
        .header("Content-Type", "application/octet-stream")
        .body(content.clone())
        .send()
        .await
        .unwrap();
    let (status, body) = common::json_of(resp).await;
    assert_eq!(status, 200, "{body}");
    let mxc = body["content_uri"].as_str().unwrap();
    let (server, id) = mxc.trim_start_matches("mxc://").split_once('/').unwrap();
    assert_eq!(server, a.name);

    // Bob's server fetches it from A (signed), then serves it byte for byte.
    let path = format!("/_matrix/client/v1/media/download/{server}/{id}");
    for _ in 0..2 {
        let resp =
            b.server.client.get(b.server.url(&path)).bearer_auth(&bob_token).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{:?}", resp.text().await);
        let disposition = resp.headers()["content-disposition"].to_str().unwrap().to_owned();
        assert!(disposition.contains("data.bin"), "{disposition}");
        assert_eq!(resp.bytes().await.unwrap().to_vec(), content);
    }
    // Unknown remote media is 404; A's federation media endpoint wants a signature.
    let missing = format!("/_matrix/client/v1/media/download/{server}/NoSuchMediaIdAtAllHere00");
    let (status, _) = b.server.get_auth(&missing, &bob_token).await;
    assert_eq!(status, 404);
    let (status, body) = a.server.get(&format!("/_matrix/federation/v1/media/download/{id}")).await;
    assert_eq!((status, body["errcode"].as_str()), (401, Some("M_UNAUTHORIZED")), "{body}");
}

/// Polls `room`'s recent history on `server` until an event satisfies `pred`.
async fn wait_for_event(
    server: &TestServer,
    token: &str,
    room: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let path =
        format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=50", common::urlencode(room));
    for _ in 0..100 {
        let (status, body) = server.get_auth(&path, token).await;
        if status == 200
            && let Some(found) = body["chunk"].as_array().and_then(|c| c.iter().find(|e| pred(e)))
        {
            return found.clone();
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (_, body) = server.get_auth(&path, token).await;
    panic!("event never arrived; history: {body}");
}

/// Syncs (incrementally, long-polling) until a response satisfies `pred`.
async fn sync_until(server: &TestServer, token: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let mut since: Option<String> = None;
    // A give-up bound, not a speed check: a long-poll answers early whenever anything
    // changes, so a count of polls ran out on a busy machine before the servers caught up.
    let give_up = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while std::time::Instant::now() < give_up {
        let path = match &since {
            Some(s) => format!("/_matrix/client/v3/sync?timeout=500&since={s}"),
            None => "/_matrix/client/v3/sync".to_owned(),
        };
        let (status, body) = server.get_auth(&path, token).await;
        assert_eq!(status, 200, "{body}");
        if pred(&body) {
            return body;
        }
        since = body["next_batch"].as_str().map(str::to_owned);
    }
    panic!("sync never showed what was expected");
}

fn text_is(body: &'static str) -> impl Fn(&Value) -> bool {
    move |e: &Value| e["type"] == "m.room.message" && e["content"]["body"] == body
}

#[tokio::test]
async fn a_room_is_shared_across_servers() {
    let (a, b) = pair().await;
    let (alice, alice_token) = a.server.register("alice").await;
    let (bob, bob_token) = b.server.register("bob").await;
    let (status, _) = b
        .server
        .put_auth(
            &format!("/_matrix/client/v3/profile/{bob}/displayname"),
            &bob_token,
            &json!({"displayname": "Bob of B"}),
        )
        .await;
    assert_eq!(status, 200);
    let room = a
        .server
        .create_room(&alice_token, json!({"preset": "public_chat", "room_alias_name": "square"}))
        .await;

    // Bob joins through the alias: B asks A for the room (make_join/send_join).
    let alias = common::urlencode(&format!("#square:{}", a.name));
    let (status, body) = b
        .server
        .post_auth(&format!("/_matrix/client/v3/join/{alias}"), &bob_token, &json!({}))
        .await;
    assert_eq!((status, body["room_id"].as_str()), (200, Some(room.as_str())), "{body}");

    // Both servers see both members, with Bob's profile in his membership.
    for (server, token) in [(&a.server, &alice_token), (&b.server, &bob_token)] {
        let path = format!("/_matrix/client/v3/rooms/{}/joined_members", common::urlencode(&room));
        let (status, members) = server.get_auth(&path, token).await;
        assert_eq!(status, 200, "{members}");
        assert_eq!(members["joined"][&bob]["display_name"], "Bob of B", "{members}");
        assert!(members["joined"].get(&alice).is_some(), "{members}");
    }

    // Messages go both ways.
    b.server.send_text(&bob_token, &room, "hello from B").await;
    let seen = wait_for_event(&a.server, &alice_token, &room, text_is("hello from B")).await;
    assert_eq!(seen["sender"], bob);
    a.server.send_text(&alice_token, &room, "hello from A").await;
    let seen = wait_for_event(&b.server, &bob_token, &room, text_is("hello from A")).await;
    assert_eq!(seen["sender"], alice);

    // State changes too: the room's name set on A is current state on B.
    let path = format!("/_matrix/client/v3/rooms/{}/state/m.room.name/", common::urlencode(&room));
    let (status, _) = a.server.put_auth(&path, &alice_token, &json!({"name": "Square"})).await;
    assert_eq!(status, 200);
    wait_for_event(&b.server, &bob_token, &room, |e| e["type"] == "m.room.name").await;
    let (status, name) = b.server.get_auth(&path, &bob_token).await;
    assert_eq!((status, &name["name"]), (200, &json!("Square")), "{name}");

    // Bob's sync on B has the room with both messages.
    let (status, sync) = b.server.get_auth("/_matrix/client/v3/sync", &bob_token).await;
    assert_eq!(status, 200);
    let timeline = &sync["rooms"]["join"][&room]["timeline"]["events"];
    let bodies: Vec<&str> =
        timeline.as_array().unwrap().iter().filter_map(|e| e["content"]["body"].as_str()).collect();
    assert!(bodies.contains(&"hello from A") && bodies.contains(&"hello from B"), "{sync}");

    // Typing, read receipts and to-device messages cross too.
    let typing = format!(
        "/_matrix/client/v3/rooms/{}/typing/{}",
        common::urlencode(&room),
        common::urlencode(&bob)
    );
    let (status, _) =
        b.server.put_auth(&typing, &bob_token, &json!({"typing": true, "timeout": 20000})).await;
    assert_eq!(status, 200);
    let room_key = room.clone();
    let bob_id = bob.clone();
    sync_until(&a.server, &alice_token, move |s| {
        s["rooms"]["join"][&room_key]["ephemeral"]["events"].as_array().is_some_and(|evs| {
            evs.iter().any(|e| {
                e["type"] == "m.typing"
                    && e["content"]["user_ids"]
                        .as_array()
                        .is_some_and(|u| u.contains(&json!(bob_id)))
            })
        })
    })
    .await;
    let from_b = wait_for_event(&a.server, &alice_token, &room, text_is("hello from B")).await;
    let event_id = from_b["event_id"].as_str().unwrap().to_owned();
    let receipt = format!(
        "/_matrix/client/v3/rooms/{}/receipt/m.read/{}",
        common::urlencode(&room),
        common::urlencode(&event_id)
    );
    let (status, _) = a.server.post_auth(&receipt, &alice_token, &json!({})).await;
    assert_eq!(status, 200);
    let (room_key, alice_id) = (room.clone(), alice.clone());
    sync_until(&b.server, &bob_token, move |s| {
        s["rooms"]["join"][&room_key]["ephemeral"]["events"].as_array().is_some_and(|evs| {
            evs.iter().any(|e| {
                e["type"] == "m.receipt"
                    && e["content"][&event_id]["m.read"].get(&alice_id).is_some()
            })
        })
    })
    .await;
    let (status, _) = a
        .server
        .put_auth(
            "/_matrix/client/v3/sendToDevice/org.example.ping/t1",
            &alice_token,
            &json!({"messages": {&bob: {"*": {"hello": "bob"}}}}),
        )
        .await;
    assert_eq!(status, 200);
    let alice_id = alice.clone();
    sync_until(&b.server, &bob_token, move |s| {
        s["to_device"]["events"].as_array().is_some_and(|evs| {
            evs.iter().any(|e| {
                e["type"] == "org.example.ping"
                    && e["sender"] == alice_id
                    && e["content"]["hello"] == "bob"
            })
        })
    })
    .await;

    // Presence too: Bob's status set on B reads on A.
    let (status, _) = b
        .server
        .put_auth(
            &format!("/_matrix/client/v3/presence/{bob}/status"),
            &bob_token,
            &json!({"presence": "unavailable", "status_msg": "lunch"}),
        )
        .await;
    assert_eq!(status, 200);
    let mut seen = Value::Null;
    for _ in 0..50 {
        let (_, p) = a
            .server
            .get_auth(&format!("/_matrix/client/v3/presence/{bob}/status"), &alice_token)
            .await;
        seen = p;
        if seen["status_msg"] == "lunch" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(
        (&seen["presence"], &seen["status_msg"]),
        (&json!("unavailable"), &json!("lunch")),
        "{seen}"
    );

    // Bob leaves; A sees it.
    let (status, _) = b
        .server
        .post_auth(
            &format!("/_matrix/client/v3/rooms/{}/leave", common::urlencode(&room)),
            &bob_token,
            &json!({}),
        )
        .await;
    assert_eq!(status, 200);
    wait_for_event(&a.server, &alice_token, &room, |e| {
        e["type"] == "m.room.member"
            && e["state_key"] == bob
            && e["content"]["membership"] == "leave"
    })
    .await;
}

#[tokio::test]
async fn invites_cross_servers_and_can_be_accepted_or_rejected() {
    let (a, b) = pair().await;
    let (alice, alice_token) = a.server.register("alice").await;
    let (bob, bob_token) = b.server.register("bob").await;
    let (carol, carol_token) = b.server.register("carol").await;
    let room = a
        .server
        .create_room(&alice_token, json!({"preset": "private_chat", "name": "Private"}))
        .await;
    let room_path = common::urlencode(&room);

    // An invite to a room Bob's server is not in shows up in Bob's sync, with the
    // room's name from the invite state.
    for target in [&bob, &carol] {
        let (status, body) = a
            .server
            .post_auth(
                &format!("/_matrix/client/v3/rooms/{room_path}/invite"),
                &alice_token,
                &json!({"user_id": target}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let room_key = room.clone();
    let sync =
        sync_until(&b.server, &bob_token, move |s| s["rooms"]["invite"].get(&room_key).is_some())
            .await;
    let state = sync["rooms"]["invite"][&room]["invite_state"]["events"].as_array().unwrap();
    assert!(
        state.iter().any(|e| e["type"] == "m.room.name" && e["content"]["name"] == "Private"),
        "{sync}"
    );
    assert!(
        state.iter().any(|e| e["type"] == "m.room.member"
            && e["state_key"] == bob
            && e["content"]["membership"] == "invite"
            && e["sender"] == alice),
        "{sync}"
    );

    // Bob accepts by joining; the room is private, so only the invite lets him in.
    let (status, body) = b
        .server
        .post_auth(&format!("/_matrix/client/v3/rooms/{room_path}/join"), &bob_token, &json!({}))
        .await;
    assert_eq!(status, 200, "{body}");
    b.server.send_text(&bob_token, &room, "thanks for the invite").await;
    wait_for_event(&a.server, &alice_token, &room, text_is("thanks for the invite")).await;

    // Carol rejects hers: Alice's server records her leave.
    let (status, body) = b
        .server
        .post_auth(&format!("/_matrix/client/v3/rooms/{room_path}/leave"), &carol_token, &json!({}))
        .await;
    assert_eq!(status, 200, "{body}");
    let carol_id = carol.clone();
    wait_for_event(&a.server, &alice_token, &room, move |e| {
        e["type"] == "m.room.member"
            && e["state_key"] == carol_id
            && e["content"]["membership"] == "leave"
    })
    .await;
    // A stranger on B cannot join the private room.
    let (dave, dave_token) = b.server.register("dave").await;
    let (status, body) = b
        .server
        .post_auth(
            &format!("/_matrix/client/v3/join/{room_path}?server_name={}", a.name),
            &dave_token,
            &json!({}),
        )
        .await;
    assert_eq!((status, body["errcode"].as_str()), (403, Some("M_FORBIDDEN")), "{body}");

    // createRoom's invite list reaches other servers' users, and the trusted preset
    // gives them the creator's power as it does local invitees.
    let direct = a
        .server
        .create_room(
            &alice_token,
            json!({"preset": "trusted_private_chat", "invite": [dave], "is_direct": true}),
        )
        .await;
    let key = direct.clone();
    let sync =
        sync_until(&b.server, &dave_token, move |s| s["rooms"]["invite"].get(&key).is_some()).await;
    let state = sync["rooms"]["invite"][&direct]["invite_state"]["events"].as_array().unwrap();
    assert!(
        state.iter().any(|e| e["state_key"] == dave && e["content"]["is_direct"] == true),
        "{sync}"
    );
    let (status, power) = a
        .server
        .get_auth(
            &format!(
                "/_matrix/client/v3/rooms/{}/state/m.room.power_levels/",
                common::urlencode(&direct)
            ),
            &alice_token,
        )
        .await;
    assert_eq!(status, 200, "{power}");
    assert_eq!(power["users"][&dave], 100, "{power}");
    // The invitee's client can show the room before joining: its server asks the
    // inviting one for the summary.
    let (status, summary) = b
        .server
        .get_auth(
            &format!("/_matrix/client/v1/room_summary/{}", common::urlencode(&direct)),
            &dave_token,
        )
        .await;
    assert_eq!(status, 200, "{summary}");
    assert_eq!(
        (summary["membership"].as_str(), summary["join_rule"].as_str()),
        (Some("invite"), Some("invite")),
        "{summary}"
    );
}

/// Acting as server B (with B's own signing key): an X-Matrix signed request to A, a
/// PUT of `body`, or a GET when `body` is null.
async fn send_as(
    from: &Peer,
    keys: &trellis_service::ServerKeys,
    to: &Peer,
    ca: &std::path::Path,
    path: &str,
    body: &Value,
) -> (u16, Value) {
    let method = if body.is_null() { "GET" } else { "PUT" };
    let mut request = json!({
        "method": method, "uri": path, "origin": from.name, "destination": to.name,
    });
    if !body.is_null() {
        request["content"] = body.clone();
    }
    let mut signing: ruma::CanonicalJsonObject = serde_json::from_value(request).unwrap();
    keys.sign_json(&mut signing).unwrap();
    let sig = signing["signatures"].as_object().unwrap()[&from.name].as_object().unwrap()
        [keys.key_id()]
    .as_str()
    .unwrap()
    .to_owned();
    let header = format!(
        "X-Matrix origin=\"{}\",destination=\"{}\",key=\"{}\",sig=\"{sig}\"",
        from.name,
        to.name,
        keys.key_id()
    );
    let ca = reqwest::Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap();
    let client = reqwest::Client::builder().add_root_certificate(ca).build().unwrap();
    let url = format!("https://{}{path}", to.name);
    let req = if body.is_null() { client.get(url) } else { client.put(url).json(body) };
    let resp = req.header("Authorization", header).send().await.unwrap();
    common::json_of(resp).await
}

#[tokio::test]
async fn a_peer_sending_garbage_gets_errors_while_the_room_stays_correct() {
    use trellis_service::rooms::{EventRef, PduTemplate, build_pdu};

    let (a, b) = pair().await;
    let (_, alice_token) = a.server.register("alice").await;
    let (bob, bob_token) = b.server.register("bob").await;
    let room = a.server.create_room(&alice_token, json!({"preset": "public_chat"})).await;
    let room_path = common::urlencode(&room);
    let (status, body) = b
        .server
        .post_auth(
            &format!("/_matrix/client/v3/join/{room_path}?server_name={}", a.name),
            &bob_token,
            &json!({}),
        )
        .await;
    assert_eq!(status, 200, "{body}");

    // What B's next events build on, as A sees the room.
    let (_, state) = a
        .server
        .get_auth(&format!("/_matrix/client/v3/rooms/{room_path}/state"), &alice_token)
        .await;
    let id_of = |kind: &str, key: &str| -> String {
        state
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["type"] == kind && e["state_key"] == key)
            .unwrap()["event_id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let auth: Vec<EventRef> = [
        id_of("m.room.create", ""),
        id_of("m.room.power_levels", ""),
        id_of("m.room.member", &bob),
    ]
    .into_iter()
    .map(|event_id| EventRef { event_id, sha256: String::new() })
    .collect();
    let latest = id_of("m.room.member", &bob);
    let keys = trellis_service::ServerKeys::load_or_generate(
        &b.server.data_dir().join("signing.key"),
        &b.name,
        24,
    )
    .unwrap();
    let server: &ruma::ServerName = b.name.as_str().try_into().unwrap();
    let version = ruma::RoomVersionId::V11;
    let now_ms =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()
            as u64;
    let event = |kind: &str, state_key: Option<&str>, content: Value| {
        let template = PduTemplate {
            room_id: Some(room.clone()),
            sender: bob.clone(),
            kind: kind.into(),
            state_key: state_key.map(str::to_owned),
            content,
            redacts: None,
            prev_events: vec![EventRef { event_id: latest.clone(), sha256: String::new() }],
            auth_events: auth.clone(),
            depth: 100,
            origin_server_ts: now_ms,
        };
        let (pdu, _) = build_pdu(&keys, server, &version, template).unwrap();
        (pdu.event_id.to_string(), serde_json::to_value(&*pdu.json).unwrap())
    };
    let (good_id, good) =
        event("m.room.message", None, json!({"msgtype": "m.text", "body": "legit"}));
    let (forged_id, mut forged) = event("m.room.message", None, json!({"body": "forged"}));
    let sigs = forged["signatures"][&b.name].as_object_mut().unwrap();
    for sig in sigs.values_mut() {
        *sig = json!("A".repeat(86));
    }
    let (unsigned_id, mut unsigned) = event("m.room.message", None, json!({"body": "unsigned"}));
    unsigned.as_object_mut().unwrap().remove("signatures");
    let (coup_id, coup) =
        event("m.room.power_levels", Some(""), json!({"users": {&bob: 100}, "users_default": 0}));
    let (tampered_id, mut tampered) = event("m.room.message", None, json!({"body": "original"}));
    tampered["content"]["body"] = json!("tampered");
    let malformed = json!({"room_id": room, "type": "m.room.message", "sender": bob});

    let txn = json!({
        "origin": b.name,
        "origin_server_ts": now_ms,
        "pdus": [good, forged, unsigned, coup, tampered, malformed],
    });
    let ca = a._certs.path().join("ca.pem");
    let (status, answer) =
        send_as(&b, &keys, &a, &ca, "/_matrix/federation/v1/send/t1", &txn).await;
    assert_eq!(status, 200, "{answer}");
    let results = &answer["pdus"];
    assert_eq!(results[&good_id], json!({}), "{answer}");
    for refused in [&forged_id, &unsigned_id, &coup_id] {
        assert!(results[refused]["error"].is_string(), "{refused}: {answer}");
    }
    // A content hash mismatch is redacted, not dropped: the event stays in the DAG.
    assert_eq!(results[&tampered_id], json!({}), "{answer}");

    // Alice sees the legitimate message, the tampered one without its content, and
    // nothing of the rest; the power levels are unchanged.
    wait_for_event(&a.server, &alice_token, &room, text_is("legit")).await;
    let (status, ev) = a
        .server
        .get_auth(
            &format!(
                "/_matrix/client/v3/rooms/{room_path}/event/{}",
                common::urlencode(&tampered_id)
            ),
            &alice_token,
        )
        .await;
    assert_eq!(status, 200, "{ev}");
    assert!(ev["content"].get("body").is_none(), "redacted: {ev}");
    for hidden in [&forged_id, &unsigned_id, &coup_id] {
        let path =
            format!("/_matrix/client/v3/rooms/{room_path}/event/{}", common::urlencode(hidden));
        let (status, _) = a.server.get_auth(&path, &alice_token).await;
        assert_eq!(status, 404, "{hidden}");
    }
    let (_, levels) = a
        .server
        .get_auth(
            &format!("/_matrix/client/v3/rooms/{room_path}/state/m.room.power_levels/"),
            &alice_token,
        )
        .await;
    assert!(levels["users"].get(&bob).is_none(), "{levels}");

    // The same transaction id again gets the same answer; a body claiming another origin
    // than the signature is refused.
    let (status, again) = send_as(&b, &keys, &a, &ca, "/_matrix/federation/v1/send/t1", &txn).await;
    assert_eq!((status, &again), (200, &answer));
    let mut lying = txn.clone();
    lying["origin"] = json!("evil.example");
    let (status, body) =
        send_as(&b, &keys, &a, &ca, "/_matrix/federation/v1/send/t2", &lying).await;
    assert_eq!((status, body["errcode"].as_str()), (403, Some("M_FORBIDDEN")), "{body}");
}

/// The current state of a room as one server's client sees it: (type, state_key) ->
/// event id, for comparing servers.
async fn state_ids(
    server: &TestServer,
    token: &str,
    room: &str,
) -> std::collections::BTreeMap<(String, String), String> {
    let path = format!("/_matrix/client/v3/rooms/{}/state", common::urlencode(room));
    let (status, state) = server.get_auth(&path, token).await;
    assert_eq!(status, 200, "{state}");
    state
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let key = (
                e["type"].as_str().unwrap().to_owned(),
                e["state_key"].as_str().unwrap().to_owned(),
            );
            (key, e["event_id"].as_str().unwrap().to_owned())
        })
        .collect()
}

#[tokio::test]
async fn a_netsplit_heals_with_the_same_state_on_every_server() {
    let mut all = peers(3).await;
    let (alice, alice_token) = all[0].server.register("alice").await;
    let (bob, bob_token) = all[1].server.register("bob").await;
    let (carol, carol_token) = all[2].server.register("carol").await;
    let room = all[0].server.create_room(&alice_token, json!({"preset": "public_chat"})).await;
    let room_path = common::urlencode(&room);
    // Everyone may change the name and topic.
    let levels = format!("/_matrix/client/v3/rooms/{room_path}/state/m.room.power_levels/");
    let (_, mut pl) = all[0].server.get_auth(&levels, &alice_token).await;
    pl["events"]["m.room.name"] = json!(0);
    pl["events"]["m.room.topic"] = json!(0);
    let (status, _) = all[0].server.put_auth(&levels, &alice_token, &pl).await;
    assert_eq!(status, 200);
    let a_name = all[0].name.clone();
    for (peer, token) in [(&all[1], &bob_token), (&all[2], &carol_token)] {
        let (status, body) = peer
            .server
            .post_auth(
                &format!("/_matrix/client/v3/join/{room_path}?server_name={a_name}"),
                token,
                &json!({}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
    all[1].server.send_text(&bob_token, &room, "before the split").await;
    wait_for_event(&all[2].server, &carol_token, &room, text_is("before the split")).await;

    // C goes down hard; A and B carry on, changing state.
    all[2].server.kill9();
    all[0].server.send_text(&alice_token, &room, "during the split").await;
    let name = format!("/_matrix/client/v3/rooms/{room_path}/state/m.room.name/");
    let (status, _) =
        all[1].server.put_auth(&name, &bob_token, &json!({"name": "Named by B"})).await;
    assert_eq!(status, 200);
    wait_for_event(&all[0].server, &alice_token, &room, |e| e["type"] == "m.room.name").await;

    // C comes back and, before it has heard anything, changes the topic on its own branch.
    all[2].server.launch().await;
    let topic = format!("/_matrix/client/v3/rooms/{room_path}/state/m.room.topic/");
    let (status, _) =
        all[2].server.put_auth(&topic, &carol_token, &json!({"topic": "Topic from C"})).await;
    assert_eq!(status, 200);
    all[2].server.send_text(&carol_token, &room, "after the split").await;

    // Everything reaches everyone, and the branches resolve to one state everywhere.
    wait_for_event(&all[2].server, &carol_token, &room, text_is("during the split")).await;
    wait_for_event(&all[0].server, &alice_token, &room, text_is("after the split")).await;
    wait_for_event(&all[1].server, &bob_token, &room, text_is("after the split")).await;
    let tokens = [&alice_token, &bob_token, &carol_token];
    let mut states = Vec::new();
    for _ in 0..50 {
        states.clear();
        for (peer, token) in all.iter().zip(tokens) {
            states.push(state_ids(&peer.server, token, &room).await);
        }
        if states.windows(2).all(|w| w[0] == w[1]) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(states.windows(2).all(|w| w[0] == w[1]), "states differ: {states:#?}");
    let (_, n) = all[2].server.get_auth(&name, &carol_token).await;
    assert_eq!(n["name"], "Named by B");
    let (_, t) = all[0].server.get_auth(&topic, &alice_token).await;
    assert_eq!(t["topic"], "Topic from C");
    for user in [&alice, &bob, &carol] {
        assert!(states[0].contains_key(&("m.room.member".to_owned(), user.clone())));
    }
}

#[tokio::test]
async fn history_from_before_a_join_is_backfilled_from_the_other_server() {
    let (a, b) = pair().await;
    let (_, alice_token) = a.server.register("alice").await;
    let (_, bob_token) = b.server.register("bob").await;
    let room = a.server.create_room(&alice_token, json!({"preset": "public_chat"})).await;
    let room_path = common::urlencode(&room);
    for i in 0..30 {
        a.server.send_text(&alice_token, &room, &format!("early {i}")).await;
    }
    let (status, body) = b
        .server
        .post_auth(
            &format!("/_matrix/client/v3/join/{room_path}?server_name={}", a.name),
            &bob_token,
            &json!({}),
        )
        .await;
    assert_eq!(status, 200, "{body}");

    // B has only Bob's join; paging back fetches the rest from A, oldest last.
    let mut bodies = Vec::new();
    let mut from: Option<String> = None;
    for _ in 0..10 {
        let mut path = format!("/_matrix/client/v3/rooms/{room_path}/messages?dir=b&limit=20");
        if let Some(f) = &from {
            path.push_str(&format!("&from={f}"));
        }
        let (status, page) = b.server.get_auth(&path, &bob_token).await;
        assert_eq!(status, 200, "{page}");
        for e in page["chunk"].as_array().unwrap() {
            if let Some(body) = e["content"]["body"].as_str() {
                bodies.push(body.to_owned());
            }
        }
        match page["end"].as_str() {
            Some(end) => from = Some(end.to_owned()),
            None => break,
        }
    }
    let expected: Vec<String> = (0..30).rev().map(|i| format!("early {i}")).collect();
    assert_eq!(bodies, expected);
}

/// Keeps the two-server bench scenario working (tiny sizes, no timing asserted).
#[tokio::test]
async fn the_federation_bench_scenario_runs() {
    let (a, b) = pair().await;
    let out = tokio::process::Command::new(common::BIN)
        .args(["bench", "federation", "--base-url"])
        .arg(a.server.url(""))
        .arg("--peer-url")
        .arg(b.server.url(""))
        .args(["--members", "3", "--messages", "10", "--concurrency", "2", "--max-seconds", "60"])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let line: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(line["scenario"], "federation");
    assert_eq!((line["missed"].as_u64(), line["errors"].as_u64()), (Some(0), Some(0)), "{line}");
    assert!(line["join_ms"].is_number() && line["delivery"]["count"] == 10, "{line}");
}

#[tokio::test]
async fn another_servers_room_directory_is_listed_over_federation() {
    let (a, b) = pair().await;
    let (_, alice_token) = a.server.register("alice").await;
    let (_, bob_token) = b.server.register("bob").await;
    let room = a
        .server
        .create_room(
            &alice_token,
            json!({"preset": "public_chat", "visibility": "public", "name": "Town square"}),
        )
        .await;
    let (status, list) = b
        .server
        .get_auth(&format!("/_matrix/client/v3/publicRooms?server={}", a.name), &bob_token)
        .await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["chunk"][0]["room_id"], room, "{list}");
    assert_eq!(list["chunk"][0]["name"], "Town square");
    let (status, found) = b
        .server
        .post_auth(
            &format!("/_matrix/client/v3/publicRooms?server={}", a.name),
            &bob_token,
            &json!({"filter": {"generic_search_term": "town"}}),
        )
        .await;
    assert_eq!(status, 200, "{found}");
    assert_eq!(found["chunk"].as_array().map(Vec::len), Some(1), "{found}");
    let (status, none) = b
        .server
        .post_auth(
            &format!("/_matrix/client/v3/publicRooms?server={}", a.name),
            &bob_token,
            &json!({"filter": {"generic_search_term": "nothing like it"}}),
        )
        .await;
    assert_eq!((status, none["chunk"].as_array().map(Vec::len)), (200, Some(0)), "{none}");
}

/// Real crypto clients (matrix-nio with libolm) on two servers: Alice on A, Bob and his
/// second device on B; Megolm messages both ways and a forwarded room key, all over
/// federation (invite, join, device keys, one-time key claims, to-device messages).
#[tokio::test]
async fn encrypted_messages_cross_servers_between_real_crypto_clients() {
    let (a, b) = pair().await;
    common::run_nio_scenario(&[a.server.base.clone(), b.server.base.clone()]).await;
}

#[tokio::test]
async fn another_servers_user_can_knock() {
    use trellis_service::rooms::{EventRef, PduTemplate, build_pdu};

    let (a, b) = pair().await;
    let (_, alice_token) = a.server.register("alice").await;
    let room = a
        .server
        .create_room(
            &alice_token,
            json!({"preset": "private_chat", "room_version": "11", "name": "Knock knock",
                   "initial_state": [{"type": "m.room.join_rules", "state_key": "",
                                      "content": {"join_rule": "knock"}}]}),
        )
        .await;
    let room_path = common::urlencode(&room);
    let bob = format!("@bob:{}", b.name);
    let keys = trellis_service::ServerKeys::load_or_generate(
        &b.server.data_dir().join("signing.key"),
        &b.name,
        24,
    )
    .unwrap();
    let ca = a._certs.path().join("ca.pem");

    // B asks A for a knock template, signs it as Bob's server, and hands it back.
    let path =
        format!("/_matrix/federation/v1/make_knock/{room_path}/{}?ver=11", common::urlencode(&bob));
    let (status, made) = send_as(&b, &keys, &a, &ca, &path, &Value::Null).await;
    assert_eq!(status, 200, "{made}");
    assert_eq!(made["room_version"], "11");
    let template = &made["event"];
    assert_eq!(template["content"]["membership"], "knock");
    let refs = |field: &str| -> Vec<EventRef> {
        template[field]
            .as_array()
            .unwrap()
            .iter()
            .map(|id| EventRef { event_id: id.as_str().unwrap().to_owned(), sha256: String::new() })
            .collect()
    };
    let server: &ruma::ServerName = b.name.as_str().try_into().unwrap();
    let (knock, _) = build_pdu(
        &keys,
        server,
        &ruma::RoomVersionId::V11,
        PduTemplate {
            room_id: Some(room.clone()),
            sender: bob.clone(),
            kind: "m.room.member".into(),
            state_key: Some(bob.clone()),
            content: json!({"membership": "knock", "reason": "let me in"}),
            redacts: None,
            prev_events: refs("prev_events"),
            auth_events: refs("auth_events"),
            depth: template["depth"].as_u64().unwrap(),
            origin_server_ts: template["origin_server_ts"].as_u64().unwrap(),
        },
    )
    .unwrap();
    let path = format!(
        "/_matrix/federation/v1/send_knock/{room_path}/{}",
        common::urlencode(knock.event_id.as_str())
    );
    let (status, answer) =
        send_as(&b, &keys, &a, &ca, &path, &serde_json::to_value(&*knock.json).unwrap()).await;
    assert_eq!(status, 200, "{answer}");
    let state = answer["knock_room_state"].as_array().unwrap();
    assert!(
        state.iter().any(|e| e["type"] == "m.room.name" && e["content"]["name"] == "Knock knock"),
        "{answer}"
    );

    // Alice sees Bob knocking and can let him in with an invite.
    let path = format!(
        "/_matrix/client/v3/rooms/{room_path}/state/m.room.member/{}",
        common::urlencode(&bob)
    );
    let (status, member) = a.server.get_auth(&path, &alice_token).await;
    assert_eq!((status, &member["membership"]), (200, &json!("knock")), "{member}");
    assert_eq!(member["reason"], "let me in");
}

/// A user's knock on another server's room: the knock and the room's name show in the
/// user's sync, the resident sees it and can let the user in with an invite; a knock
/// withdrawn reaches the resident as a leave and the knocker's sync as a left room.
#[tokio::test]
async fn a_user_knocks_on_another_servers_room() {
    let (a, b) = pair().await;
    let (_, alice_token) = a.server.register("alice").await;
    let (bob, bob_token) = b.server.register("bob").await;
    let (carol, carol_token) = b.server.register("carol").await;
    let room = a
        .server
        .create_room(
            &alice_token,
            json!({"preset": "private_chat", "name": "Knock knock",
                   "initial_state": [{"type": "m.room.join_rules", "state_key": "",
                                      "content": {"join_rule": "knock"}}]}),
        )
        .await;
    let room_path = common::urlencode(&room);
    let path = format!("/_matrix/client/v3/knock/{room_path}?via={}", a.name);
    let (status, body) =
        b.server.post_auth(&path, &bob_token, &json!({"reason": "let me in"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["room_id"], room);

    let key = room.clone();
    let sync =
        sync_until(&b.server, &bob_token, move |s| s["rooms"]["knock"].get(&key).is_some()).await;
    let state = sync["rooms"]["knock"][&room]["knock_state"]["events"].as_array().unwrap();
    assert!(
        state.iter().any(|e| e["type"] == "m.room.name" && e["content"]["name"] == "Knock knock"),
        "{sync}"
    );
    assert!(
        state.iter().any(|e| e["type"] == "m.room.member"
            && e["state_key"] == bob
            && e["content"]["membership"] == "knock"),
        "{sync}"
    );
    let member = format!("/_matrix/client/v3/rooms/{room_path}/state/m.room.member/");
    let (status, knocked) =
        a.server.get_auth(&format!("{member}{}", common::urlencode(&bob)), &alice_token).await;
    assert_eq!(status, 200, "{knocked}");
    assert_eq!(
        (knocked["membership"].as_str(), knocked["reason"].as_str()),
        (Some("knock"), Some("let me in"))
    );

    // Alice lets Bob in: the invite replaces the knock, and Bob joins.
    let (status, body) = a
        .server
        .post_auth(
            &format!("/_matrix/client/v3/rooms/{room_path}/invite"),
            &alice_token,
            &json!({"user_id": bob}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let key = room.clone();
    sync_until(&b.server, &bob_token, move |s| s["rooms"]["invite"].get(&key).is_some()).await;
    let (status, body) = b
        .server
        .post_auth(&format!("/_matrix/client/v3/rooms/{room_path}/join"), &bob_token, &json!({}))
        .await;
    assert_eq!(status, 200, "{body}");
    b.server.send_text(&bob_token, &room, "knocked and came in").await;
    wait_for_event(&a.server, &alice_token, &room, text_is("knocked and came in")).await;

    // Carol knocks and thinks better of it.
    let (status, first) = b.server.get_auth("/_matrix/client/v3/sync", &carol_token).await;
    assert_eq!(status, 200, "{first}");
    let since = first["next_batch"].as_str().unwrap().to_owned();
    let (status, body) = b.server.post_auth(&path, &carol_token, &json!({})).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = b
        .server
        .post_auth(&format!("/_matrix/client/v3/rooms/{room_path}/leave"), &carol_token, &json!({}))
        .await;
    assert_eq!(status, 200, "{body}");
    let carol_id = carol.clone();
    wait_for_event(&a.server, &alice_token, &room, move |e| {
        e["type"] == "m.room.member"
            && e["state_key"] == carol_id
            && e["content"]["membership"] == "leave"
    })
    .await;
    let (status, after) =
        b.server.get_auth(&format!("/_matrix/client/v3/sync?since={since}"), &carol_token).await;
    assert_eq!(status, 200, "{after}");
    let left = &after["rooms"]["leave"][&room]["timeline"]["events"];
    assert!(
        left.as_array()
            .into_iter()
            .flatten()
            .any(|e| e["state_key"] == carol && e["content"]["membership"] == "leave"),
        "{after}"
    );
    assert!(after["rooms"]["knock"].get(&room).is_none(), "{after}");
}

/// A space on another server: a member's server walks the rooms it is not in by asking
/// the server their `m.space.child` events name; rooms the user may not see are left out.
#[tokio::test]
async fn a_space_on_another_server_is_walked_over_federation() {
    let (a, b) = pair().await;
    let (_, alice_token) = a.server.register("alice").await;
    let (_, bob_token) = b.server.register("bob").await;
    let public = |name: &str, space: bool| {
        let mut body = json!({"preset": "public_chat", "name": name});
        if space {
            body["creation_content"] = json!({"type": "m.space"});
        }
        body
    };
    let space = a.server.create_room(&alice_token, public("Outer space", true)).await;
    let lobby = a.server.create_room(&alice_token, public("Lobby", false)).await;
    let inner = a.server.create_room(&alice_token, public("Inner space", true)).await;
    let deep = a.server.create_room(&alice_token, public("Deep room", false)).await;
    let secret = a
        .server
        .create_room(&alice_token, json!({"preset": "private_chat", "name": "Secret"}))
        .await;
    let link = |parent: &str, child: &str, order: &str| {
        let path = format!(
            "/_matrix/client/v3/rooms/{}/state/m.space.child/{}",
            common::urlencode(parent),
            common::urlencode(child)
        );
        (path, json!({"via": [a.name], "order": order}))
    };
    // A space A has, linked from the inner space only through a server nobody can
    // reach: B's server learns its summary from A's answer about the inner space and
    // cannot ask about its children.
    let far = a.server.create_room(&alice_token, public("Far space", true)).await;
    for (parent, child, order) in [
        (&space, &lobby, "a"),
        (&space, &inner, "b"),
        (&space, &secret, "c"),
        (&inner, &deep, "a"),
        (&inner, &far, "b"),
    ] {
        let (path, mut body) = link(parent, child, order);
        if child == &far {
            body["via"] = json!(["127.0.0.1:1"]);
        }
        let (status, answer) = a.server.put_auth(&path, &alice_token, &body).await;
        assert_eq!(status, 200, "{answer}");
    }

    // Bob's server is in the space only.
    let (status, body) = b
        .server
        .post_auth(
            &format!(
                "/_matrix/client/v3/join/{}?server_name={}",
                common::urlencode(&space),
                a.name
            ),
            &bob_token,
            &json!({}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, page) = b
        .server
        .get_auth(
            &format!("/_matrix/client/v1/rooms/{}/hierarchy", common::urlencode(&space)),
            &bob_token,
        )
        .await;
    assert_eq!(status, 200, "{page}");
    let rooms = page["rooms"].as_array().unwrap();
    let ids: Vec<&str> = rooms.iter().map(|r| r["room_id"].as_str().unwrap()).collect();
    assert_eq!(
        ids,
        [space.as_str(), lobby.as_str(), inner.as_str(), deep.as_str(), far.as_str()],
        "{page}"
    );
    assert_eq!(rooms[4]["children_state"], json!([]), "{page}");
    assert_eq!(rooms[1]["name"], "Lobby");
    assert_eq!(rooms[2]["room_type"], "m.space");
    assert_eq!(rooms[2]["children_state"][0]["state_key"], deep, "{page}");
    assert_eq!(rooms[4]["name"], "Far space", "{page}");
    assert_eq!(rooms[3]["name"], "Deep room");
    assert_eq!(rooms[0]["children_state"].as_array().map(Vec::len), Some(3), "{page}");

    // Summaries of rooms B is not in come from A too, for those Bob may see.
    let summary_of = |room: &str| {
        format!("/_matrix/client/v1/room_summary/{}?via={}", common::urlencode(room), a.name)
    };
    let (status, summary) = b.server.get_auth(&summary_of(&lobby), &bob_token).await;
    assert_eq!(status, 200, "{summary}");
    assert_eq!(
        (summary["name"].as_str(), summary["membership"].as_str()),
        (Some("Lobby"), Some("leave"))
    );
    let (status, summary) = b.server.get_auth(&summary_of(&secret), &bob_token).await;
    assert_eq!((status, summary["errcode"].as_str()), (404, Some("M_NOT_FOUND")), "{summary}");

    // What A tells B directly: the secret room is a child B's users cannot see.
    let keys = trellis_service::ServerKeys::load_or_generate(
        &b.server.data_dir().join("signing.key"),
        &b.name,
        24,
    )
    .unwrap();
    let ca = a._certs.path().join("ca.pem");
    let path = format!("/_matrix/federation/v1/hierarchy/{}", common::urlencode(&space));
    let (status, answer) = send_as(&b, &keys, &a, &ca, &path, &Value::Null).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["room"]["room_id"], space);
    assert_eq!(answer["inaccessible_children"], json!([secret]), "{answer}");
    let children: Vec<&str> = answer["children"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["room_id"].as_str().unwrap())
        .collect();
    assert_eq!(children.len(), 2, "{answer}");
    assert!(children.contains(&lobby.as_str()) && children.contains(&inner.as_str()));
    let path = format!("/_matrix/federation/v1/hierarchy/{}", common::urlencode(&secret));
    let (status, answer) = send_as(&b, &keys, &a, &ca, &path, &Value::Null).await;
    assert_eq!((status, answer["errcode"].as_str()), (404, Some("M_NOT_FOUND")), "{answer}");
}
