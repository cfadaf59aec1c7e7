//! Calls through HTTP against the real binary: delayed events (MSC4140), MatrixRTC
//! discovery and the LiveKit token exchange (checked with LiveKit's own token library),
//! call history, and the built-in TURN server carrying a real WebRTC call between two
//! Chromium peers that may only use the relay.

mod common;

use std::time::{Duration, Instant};

use common::{OPEN, TestServer, admin_token, free_port, mint_certificates, txn_id, urlencode};
use serde_json::{Value, json};

const MSC4140: &str = "/_matrix/client/unstable/org.matrix.msc4140/delayed_events";
const TURN_SERVER: &str = "/_matrix/client/v3/voip/turnServer";

/// The bodies of the messages in `room`, oldest first.
async fn bodies(s: &TestServer, token: &str, room: &str) -> Vec<String> {
    let path = format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=100");
    let (status, page) = s.get_auth(&path, token).await;
    assert_eq!(status, 200, "{page}");
    let mut out: Vec<String> = page["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "m.room.message")
        .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned))
        .collect();
    out.reverse();
    out
}

/// Schedules a delayed text message; its delay id.
async fn delay_text(s: &TestServer, token: &str, room: &str, body: &str, delay_ms: u64) -> String {
    let path = format!(
        "/_matrix/client/v3/rooms/{room}/send/m.room.message/{}?org.matrix.msc4140.delay={delay_ms}",
        txn_id()
    );
    let (status, resp) =
        s.put_auth(&path, token, &json!({"msgtype": "m.text", "body": body})).await;
    assert_eq!(status, 200, "{resp}");
    assert!(resp.get("event_id").is_none(), "a delay id, not an event: {resp}");
    resp["delay_id"].as_str().unwrap().to_owned()
}

/// Waits until `body` is in the room (panics after `limit`).
async fn wait_for_body(s: &TestServer, token: &str, room: &str, body: &str, limit: Duration) {
    let start = Instant::now();
    while !bodies(s, token, room).await.iter().any(|b| b == body) {
        assert!(start.elapsed() < limit, "{body} never posted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn delayed_events_are_posted_cancelled_restarted_and_survive_a_restart() {
    let mut s = TestServer::start(OPEN).await;
    let (_, versions) = s.get("/_matrix/client/versions").await;
    assert_eq!(versions["unstable_features"]["org.matrix.msc4140"], true);
    let (_, alice) = s.register("alice").await;
    let room = s.create_room(&alice, json!({})).await;

    let posted = delay_text(&s, &alice, &room, "posted later", 1500).await;
    let cancelled = delay_text(&s, &alice, &room, "never posted", 1500).await;
    let restarted = delay_text(&s, &alice, &room, "restarted", 1500).await;
    let (status, list) = s.get_auth(MSC4140, &alice).await;
    assert_eq!(status, 200, "{list}");
    let waiting = list["delayed_events"].as_array().unwrap();
    assert_eq!(waiting.len(), 3, "{list}");
    let first = waiting.iter().find(|d| d["delay_id"] == posted.as_str()).unwrap();
    assert_eq!(first["delay"], 1500);
    assert_eq!(first["room_id"], room);
    assert_eq!(first["type"], "m.room.message");
    assert_eq!(first["content"]["body"], "posted later");
    assert!(first["running_since"].as_u64().unwrap() > 0);
    assert!(bodies(&s, &alice, &room).await.is_empty(), "nothing is posted at once");

    // The per-action form needs no token (the delay id is the credential) and takes an
    // empty body, as matrix-js-sdk sends it.
    let resp = s.client.post(s.url(&format!("{MSC4140}/{cancelled}/cancel"))).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let (status, again) = s.post(&format!("{MSC4140}/{cancelled}/cancel"), &json!({})).await;
    assert_eq!((status, again["errcode"].as_str()), (404, Some("M_NOT_FOUND")), "{again}");
    // Ids are random: guessing finds nothing.
    let (status, _) = s.post(&format!("{MSC4140}/syd_guessed/restart"), &json!({})).await;
    assert_eq!(status, 404);

    // The body form (what matrix-rust-sdk's widget driver sends), authenticated.
    tokio::time::sleep(Duration::from_millis(900)).await;
    let (status, resp) =
        s.post_auth(&format!("{MSC4140}/{restarted}"), &alice, &json!({"action": "restart"})).await;
    assert_eq!(status, 200, "{resp}");
    let (status, _) = s.post(&format!("{MSC4140}/{restarted}"), &json!({"action": "send"})).await;
    assert_eq!(status, 401, "the body form needs a token");

    wait_for_body(&s, &alice, &room, "posted later", Duration::from_secs(10)).await;
    // Restarted 900 ms in, it is due 1500 ms after that: not with the first.
    assert!(!bodies(&s, &alice, &room).await.contains(&"restarted".to_owned()));
    wait_for_body(&s, &alice, &room, "restarted", Duration::from_secs(10)).await;
    let (_, one) = s.get_auth(&format!("{MSC4140}/{posted}"), &alice).await;
    assert!(one["event_id"].as_str().is_some_and(|id| id.starts_with('$')), "{one}");
    assert!(one["finalised_ts"].as_u64().is_some(), "{one}");
    let (_, gone) = s.get_auth(&format!("{MSC4140}/{cancelled}"), &alice).await;
    assert!(gone["event_id"].is_null() && gone["finalised_ts"].as_u64().is_some(), "{gone}");
    let (_, list) = s.get_auth(MSC4140, &alice).await;
    assert_eq!(list["delayed_events"], json!([]), "only waiting ones are listed");

    // `send` posts at once.
    let now = delay_text(&s, &alice, &room, "sent early", 600_000).await;
    let (status, _) = s.post_auth(&format!("{MSC4140}/{now}/send"), &alice, &json!({})).await;
    assert_eq!(status, 200);
    assert!(bodies(&s, &alice, &room).await.contains(&"sent early".to_owned()));

    // Over a restart: one due while the server is down is posted when it is back; one
    // cancelled before never is.
    let survivor = delay_text(&s, &alice, &room, "after the restart", 2000).await;
    let doomed = delay_text(&s, &alice, &room, "cancelled before the restart", 2000).await;
    let (status, _) = s.post(&format!("{MSC4140}/{doomed}/cancel"), &json!({})).await;
    assert_eq!(status, 200);
    s.terminate();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    s.launch().await;
    wait_for_body(&s, &alice, &room, "after the restart", Duration::from_secs(10)).await;
    let (_, one) = s.get_auth(&format!("{MSC4140}/{survivor}"), &alice).await;
    assert!(one["event_id"].as_str().is_some(), "{one}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let seen = bodies(&s, &alice, &room).await;
    assert!(!seen.contains(&"cancelled before the restart".to_owned()), "{seen:?}");
    assert!(!seen.contains(&"never posted".to_owned()), "{seen:?}");
    assert_eq!(seen.iter().filter(|b| *b == "after the restart").count(), 1, "posted once");
}

#[tokio::test]
async fn delayed_state_is_cancelled_by_another_users_state_only_and_limits_hold() {
    let config =
        format!("{OPEN}[rooms]\nmax_event_delay_ms = 60000\nmax_delayed_events_per_user = 3\n");
    let mut s = TestServer::start(&config).await;
    let admin = admin_token(&mut s).await;
    let (_, alice) = s.register("alice").await;
    let (bob_id, bob) = s.register("bob").await;
    let room = s
        .create_room(
            &alice,
            json!({"preset": "public_chat",
                   "power_level_content_override": {"users": {"@alice:localhost": 100}, "state_default": 0}}),
        )
        .await;
    s.join_room(&bob, &room).await;
    let state_path = |key: &str| {
        format!("/_matrix/client/v3/rooms/{room}/state/org.example.slot/{}", urlencode(key))
    };
    let delayed = |key: &str| format!("{}?org.matrix.msc4140.delay=60000", state_path(key));

    // A delayed "leave" for alice's slot, then alice sets the slot herself (as Element Call
    // does when it joins): her own state leaves the delayed one waiting.
    let (status, resp) = s.put_auth(&delayed("alice"), &alice, &json!({})).await;
    assert_eq!(status, 200, "{resp}");
    let alices = resp["delay_id"].as_str().unwrap().to_owned();
    let (status, _) = s.put_auth(&state_path("alice"), &alice, &json!({"in": true})).await;
    assert_eq!(status, 200);
    let (_, list) = s.get_auth(MSC4140, &alice).await;
    assert_eq!(list["delayed_events"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list["delayed_events"][0]["state_key"], "alice");
    // Bob setting the same slot cancels it.
    let (status, _) = s.put_auth(&state_path("alice"), &bob, &json!({"bob": true})).await;
    assert_eq!(status, 200);
    let (_, list) = s.get_auth(MSC4140, &alice).await;
    assert_eq!(list["delayed_events"], json!([]), "{list}");
    let (_, gone) = s.get_auth(&format!("{MSC4140}/{alices}"), &alice).await;
    assert!(gone["finalised_ts"].as_u64().is_some() && gone["event_id"].is_null(), "{gone}");
    let (_, slot) = s.get_auth(&state_path("alice"), &alice).await;
    assert_eq!(slot, json!({"bob": true}), "bob's state stands");

    // Too long a delay: the MSC's unstable error, with the maximum js-sdk retries with.
    let path = format!(
        "/_matrix/client/v3/rooms/{room}/send/m.room.message/{}?org.matrix.msc4140.delay=60001",
        txn_id()
    );
    let (status, err) = s.put_auth(&path, &alice, &json!({"body": "x", "msgtype": "m.text"})).await;
    assert_eq!(status, 400, "{err}");
    assert_eq!(err["errcode"], "M_UNKNOWN");
    assert_eq!(err["org.matrix.msc4140.errcode"], "M_MAX_DELAY_EXCEEDED");
    assert_eq!(err["org.matrix.msc4140.max_delay"], 60000);
    // Not a number.
    let path = format!(
        "/_matrix/client/v3/rooms/{room}/send/m.room.message/{}?org.matrix.msc4140.delay=soon",
        txn_id()
    );
    let (status, err) = s.put_auth(&path, &alice, &json!({"body": "x", "msgtype": "m.text"})).await;
    assert_eq!(status, 400, "{err}");
    // Too many waiting.
    for n in 0..3 {
        delay_text(&s, &alice, &room, &format!("n{n}"), 60_000).await;
    }
    let path = format!(
        "/_matrix/client/v3/rooms/{room}/send/m.room.message/{}?org.matrix.msc4140.delay=1000",
        txn_id()
    );
    let (status, err) = s.put_auth(&path, &alice, &json!({"body": "x", "msgtype": "m.text"})).await;
    assert_eq!((status, err["errcode"].as_str()), (429, Some("M_LIMIT_EXCEEDED")), "{err}");
    // A retried transaction answers the same delay id rather than counting again.
    let txn = txn_id();
    let path = format!(
        "/_matrix/client/v3/rooms/{room}/send/m.room.message/{txn}?org.matrix.msc4140.delay=1000"
    );
    let (status, first) = s.put_auth(&path, &bob, &json!({"body": "b", "msgtype": "m.text"})).await;
    assert_eq!(status, 200, "{first}");
    let (_, second) = s.put_auth(&path, &bob, &json!({"body": "b", "msgtype": "m.text"})).await;
    assert_eq!(first["delay_id"], second["delay_id"]);
    // Not in the room: refused when scheduling, not later.
    let (_, carol) = s.register("carol").await;
    let path = format!(
        "/_matrix/client/v3/rooms/{room}/send/m.room.message/{}?org.matrix.msc4140.delay=1000",
        txn_id()
    );
    let (status, err) = s.put_auth(&path, &carol, &json!({"body": "c", "msgtype": "m.text"})).await;
    assert_eq!((status, err["errcode"].as_str()), (403, Some("M_FORBIDDEN")), "{err}");
    // Unknown actions and ids.
    let (status, err) =
        s.post_auth(&format!("{MSC4140}/syd_nothing/cancel"), &alice, &json!({})).await;
    assert_eq!((status, err["errcode"].as_str()), (404, Some("M_NOT_FOUND")), "{err}");
    let (status, _) =
        s.post_auth(&format!("{MSC4140}/syd_nothing/explode"), &alice, &json!({})).await;
    assert_eq!(status, 400);
    // A suspended user schedules nothing, and what they had waiting is not posted.
    let (status, _) = s
        .put_auth(
            &format!("/_matrix/client/v1/admin/suspend/{}", urlencode(&bob_id)),
            &admin,
            &json!({"suspended": true}),
        )
        .await;
    assert_eq!(status, 200);
    let path = format!(
        "/_matrix/client/v3/rooms/{room}/send/m.room.message/{}?org.matrix.msc4140.delay=0",
        txn_id()
    );
    let (status, err) = s.put_auth(&path, &bob, &json!({"body": "s", "msgtype": "m.text"})).await;
    assert_eq!((status, err["errcode"].as_str()), (403, Some("M_USER_SUSPENDED")), "{err}");
    let waiting = first["delay_id"].as_str().unwrap();
    let start = Instant::now();
    loop {
        let (_, one) = s.get_auth(&format!("{MSC4140}/{waiting}"), &bob).await;
        if one["finalised_ts"].as_u64().is_some() {
            assert_eq!(one["error"]["errcode"], "M_USER_SUSPENDED", "{one}");
            assert!(one["event_id"].is_null(), "{one}");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "never finished: {one}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!bodies(&s, &alice, &room).await.contains(&"b".to_owned()));
}

/// The `[rtc]` section for a LiveKit SFU at `url`.
fn livekit(url: &str) -> String {
    format!(
        "[rtc]\nlivekit_url = \"{url}\"\nlivekit_api_key = \"devkey\"\n\
         livekit_api_secret = \"a-secret-of-at-least-32-characters!!\"\n"
    )
}

/// A stand-in for the LiveKit server's HTTP API: records each `CreateRoom` call (its
/// bearer token and body). Answers its `ws://` URL.
async fn fake_sfu() -> (String, std::sync::Arc<std::sync::Mutex<Vec<(String, Value)>>>) {
    use axum::{extract::State, http::HeaderMap, routing::post};
    type Calls = std::sync::Arc<std::sync::Mutex<Vec<(String, Value)>>>;
    async fn create(State(calls): State<Calls>, headers: HeaderMap, body: String) -> String {
        let token =
            headers["authorization"].to_str().unwrap().trim_start_matches("Bearer ").to_owned();
        calls.lock().unwrap().push((token, serde_json::from_str(&body).unwrap()));
        "{}".to_owned()
    }
    let calls = Calls::default();
    let app = axum::Router::new()
        .route("/twirp/livekit.RoomService/CreateRoom", post(create))
        .with_state(calls.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("ws://{addr}"), calls)
}

/// What LiveKit's own token library (`livekit-api`, installed by `.ci/install-deps`)
/// reads out of `jwt` with the key and secret above; an error if it does not verify.
async fn livekit_reads(jwt: &str, secret: &str) -> Value {
    let script = r#"
import json, sys
from livekit import api
claims = api.TokenVerifier("devkey", sys.argv[2]).verify(sys.argv[1])
v = claims.video
print(json.dumps({"identity": claims.identity, "name": claims.name, "room": v.room,
                  "room_join": v.room_join, "room_create": v.room_create,
                  "can_publish": v.can_publish, "can_subscribe": v.can_subscribe}))
"#;
    let out = tokio::process::Command::new("python3")
        .args(["-c", script, jwt, secret])
        .output()
        .await
        .expect("python3 runs");
    if !out.status.success() {
        return json!({"error": String::from_utf8_lossy(&out.stderr)});
    }
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test]
async fn matrixrtc_discovery_and_livekit_tokens_that_livekit_accepts() {
    // Without an SFU: nothing advertised, the exchange unrecognised.
    let plain = TestServer::start(OPEN).await;
    let (status, body) =
        plain.get("/_matrix/client/unstable/org.matrix.msc4143/rtc/transports").await;
    assert_eq!((status, body), (200, json!({"rtc_transports": []})));
    let (_, wk) = plain.get("/.well-known/matrix/client").await;
    assert!(wk.get("org.matrix.msc4143.rtc_foci").is_none(), "{wk}");
    let (status, err) = plain.post("/_trellis/livekit/sfu/get", &json!({})).await;
    assert_eq!(status, 400, "a body without the fields is bad JSON: {err}");
    drop(plain);

    let (sfu, created) = fake_sfu().await;
    let s = TestServer::start(&format!("{OPEN}{}", livekit(&sfu))).await;
    let (alice_id, alice) = s.register("alice").await;
    let room = s.create_room(&alice, json!({})).await;
    let service_url = format!("{}/_trellis/livekit", s.base);
    let focus = json!([{"type": "livekit", "livekit_service_url": service_url}]);
    let (status, body) = s.get("/_matrix/client/unstable/org.matrix.msc4143/rtc/transports").await;
    assert_eq!((status, &body["rtc_transports"]), (200, &focus), "no token needed: {body}");
    let (_, body) = s.get_auth("/_matrix/client/v1/rtc/transports", &alice).await;
    assert_eq!(body["rtc_transports"], focus);
    let (_, wk) = s.get("/.well-known/matrix/client").await;
    assert_eq!(wk["org.matrix.msc4143.rtc_foci"], focus, "{wk}");
    let (_, versions) = s.get("/_matrix/client/versions").await;
    assert_eq!(versions["unstable_features"]["org.matrix.msc4143"], true);

    let (status, openid) = s
        .post_auth(
            &format!("/_matrix/client/v3/user/{}/openid/request_token", urlencode(&alice_id)),
            &alice,
            &json!({}),
        )
        .await;
    assert_eq!(status, 200, "{openid}");
    let secret = "a-secret-of-at-least-32-characters!!";

    // Element Call's legacy exchange, as lk-jwt-service answers it.
    let (status, got) = s
        .post(
            "/_trellis/livekit/sfu/get",
            &json!({"room": room, "openid_token": openid, "device_id": "DEVICE1"}),
        )
        .await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["url"], sfu.as_str());
    let claims = livekit_reads(got["jwt"].as_str().unwrap(), secret).await;
    assert_eq!(claims["identity"], format!("{alice_id}:DEVICE1"), "{claims}");
    let expected_room = {
        // base64(SHA-256(JSON [room, slot])), unpadded: what lk-jwt-service names it.
        let out = std::process::Command::new("python3")
            .args([
                "-c",
                "import base64,hashlib,json,sys;print(base64.b64encode(hashlib.sha256(json.dumps([sys.argv[1],'m.call#ROOM'],separators=(',',':')).encode()).digest()).decode().rstrip('='))",
                &room,
            ])
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    assert_eq!(claims["room"], expected_room, "{claims}");
    assert_eq!(claims["room_join"], true);
    assert_eq!(claims["room_create"], false, "members never create rooms themselves");
    // For a user of this server, the call's room was made on the SFU first, with a token
    // LiveKit accepts as allowed to create it.
    let (creator, body) = created.lock().unwrap().first().cloned().expect("CreateRoom called");
    assert_eq!(body["name"], expected_room);
    let claims = livekit_reads(&creator, secret).await;
    assert_eq!(claims["room_create"], true, "{claims}");
    // Someone who is not in the room gets nothing, even with a valid OpenID token.
    let (bob_id, bob) = s.register("bob").await;
    let (_, bob_openid) = s
        .post_auth(
            &format!("/_matrix/client/v3/user/{}/openid/request_token", urlencode(&bob_id)),
            &bob,
            &json!({}),
        )
        .await;
    let (status, err) = s
        .post(
            "/_trellis/livekit/sfu/get",
            &json!({"room": room, "openid_token": bob_openid, "device_id": "B"}),
        )
        .await;
    assert_eq!((status, err["errcode"].as_str()), (403, Some("M_FORBIDDEN")), "{err}");
    assert_eq!(claims["can_publish"], true);
    assert!(
        livekit_reads(got["jwt"].as_str().unwrap(), "another secret of 32+ characters!!")
            .await
            .get("error")
            .is_some()
    );

    // MSC4195's `/get_token`: the identity is derived from user, device and member id.
    let body = json!({"room_id": room, "slot_id": "m.call#ROOM", "openid_token": openid,
                      "member": {"id": "member1", "claimed_user_id": alice_id,
                                 "claimed_device_id": "DEVICE1"}});
    let (status, got) = s.post("/_trellis/livekit/get_token", &body).await;
    assert_eq!(status, 200, "{got}");
    let claims = livekit_reads(got["jwt"].as_str().unwrap(), secret).await;
    assert_eq!(claims["room"], expected_room);
    assert_eq!(claims["identity"].as_str().map(str::len), Some(43), "{claims}");
    // Claiming to be someone else, or a made-up token: 401.
    let mut lying = body.clone();
    lying["member"]["claimed_user_id"] = json!("@bob:localhost");
    let (status, err) = s.post("/_trellis/livekit/get_token", &lying).await;
    assert_eq!((status, err["errcode"].as_str()), (401, Some("M_UNAUTHORIZED")), "{err}");
    let mut forged = body.clone();
    forged["openid_token"]["access_token"] = json!("made-up");
    let (status, _) = s.post("/_trellis/livekit/get_token", &forged).await;
    assert_eq!(status, 401);

    // The homeserver form: an access token and membership of the room.
    let path = "/_matrix/client/unstable/io.element.msc4195/rtc/livekit/get_token";
    let ask = json!({"url": format!("{sfu}/"), "room_id": room, "slot_id": "m.call#ROOM",
                     "member_id": "member1"});
    let (status, got) = s.post_auth(path, &alice, &ask).await;
    assert_eq!(status, 200, "{got}");
    let claims = livekit_reads(got["jwt"].as_str().unwrap(), secret).await;
    assert_eq!(claims["room"], expected_room, "{claims}");
    let (_, outsider) = s.register("outsider").await;
    let (status, _) = s.post_auth(path, &outsider, &ask).await;
    assert_eq!(status, 403, "not in the room");
}

#[tokio::test]
async fn call_history_follows_the_signalling() {
    let mut s = TestServer::start(OPEN).await;
    let admin = admin_token(&mut s).await;
    let (alice_id, alice) = s.register("alice").await;
    let (bob_id, bob) = s.register("bob").await;
    let (_, carol) = s.register("carol").await;
    let room = s.create_room(&alice, json!({"preset": "public_chat"})).await;
    s.join_room(&bob, &room).await;
    let send = |kind: &'static str, content: Value, token: String| {
        let s = &s;
        let room = room.clone();
        async move {
            let path = format!("/_matrix/client/v3/rooms/{room}/send/{kind}/{}", txn_id());
            let (status, resp) = s.put_auth(&path, &token, &content).await;
            assert_eq!(status, 200, "{resp}");
        }
    };
    let offer = json!({"type": "offer", "sdp": "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n"});
    // An answered video call, then a missed one.
    send("m.call.invite", json!({"call_id": "c1", "party_id": "p1", "version": "1", "lifetime": 60000, "offer": offer}), alice.clone()).await;
    send("m.call.answer", json!({"call_id": "c1", "party_id": "p2", "version": "1", "answer": {"type": "answer", "sdp": "v=0"}}), bob.clone()).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    send(
        "m.call.hangup",
        json!({"call_id": "c1", "party_id": "p1", "version": "1", "reason": "user_hangup"}),
        alice.clone(),
    )
    .await;
    send("m.call.invite", json!({"call_id": "c2", "party_id": "p1", "version": "1", "lifetime": 60000, "offer": {"type": "offer", "sdp": "v=0\r\nm=audio 9 RTP 0\r\n"}}), alice.clone()).await;
    send(
        "m.call.hangup",
        json!({"call_id": "c2", "party_id": "p1", "version": "1", "reason": "invite_timeout"}),
        alice.clone(),
    )
    .await;

    let (status, history) = s.get_auth("/_trellis/client/v1/calls", &bob).await;
    assert_eq!(status, 200, "{history}");
    let calls = history["calls"].as_array().unwrap();
    assert_eq!(calls.len(), 2, "{history}");
    let (missed, answered) = (&calls[0], &calls[1]);
    assert_eq!(missed["call_id"], "c2", "newest first");
    assert_eq!(missed["state"], "missed");
    assert_eq!(missed["end_reason"], "invite_timeout");
    assert_eq!(missed["video"], false);
    assert_eq!(answered["state"], "ended");
    assert_eq!(answered["type"], "direct");
    assert_eq!(answered["caller"], alice_id);
    assert_eq!(answered["participants"], json!([alice_id, bob_id]));
    assert_eq!(answered["video"], true);
    assert!(answered["duration_ms"].as_u64().is_some(), "{answered}");
    assert!(answered["answered_ts"].as_u64() >= answered["started_ts"].as_u64());
    // Paging.
    let (_, first) = s.get_auth("/_trellis/client/v1/calls?limit=1", &bob).await;
    assert_eq!(first["calls"].as_array().unwrap().len(), 1);
    let next = first["next_batch"].as_str().unwrap();
    let (_, second) =
        s.get_auth(&format!("/_trellis/client/v1/calls?limit=1&from={next}"), &bob).await;
    assert_eq!(second["calls"][0]["call_id"], "c1");
    assert!(second["next_batch"].is_null());
    // Carol was in no call.
    let (_, none) = s.get_auth("/_trellis/client/v1/calls", &carol).await;
    assert_eq!(none["calls"], json!([]));
    // In a room of three, a call rings its `invitee` only, or (without one) nobody else.
    s.join_room(&carol, &room).await;
    send("m.call.invite", json!({"call_id": "c3", "party_id": "p1", "version": "1", "lifetime": 60000, "invitee": bob_id, "offer": offer}), alice.clone()).await;
    send("m.call.invite", json!({"call_id": "c4", "party_id": "p1", "version": "1", "lifetime": 60000, "offer": offer}), alice.clone()).await;
    let (_, bobs) = s.get_auth("/_trellis/client/v1/calls", &bob).await;
    let ids: Vec<&str> =
        bobs["calls"].as_array().unwrap().iter().map(|c| c["call_id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["c3", "c2", "c1"], "{bobs}");
    let (_, none) = s.get_auth("/_trellis/client/v1/calls", &carol).await;
    assert_eq!(none["calls"], json!([]), "{none}");

    // A group call: Element Call's member state, joined by two, left by both.
    let member = |user: &str| format!("_{user}_DEV_m.call");
    let set_member = |token: String, key: String, content: Value| {
        let s = &s;
        let room = room.clone();
        async move {
            let path = format!(
                "/_matrix/client/v3/rooms/{room}/state/org.matrix.msc3401.call.member/{}",
                urlencode(&key)
            );
            let (status, resp) = s.put_auth(&path, &token, &content).await;
            assert_eq!(status, 200, "{resp}");
        }
    };
    let joined = json!({"application": "m.call", "call_id": "", "scope": "m.room", "device_id": "DEV",
                        "m.call.intent": "video", "focus_active": {"type": "livekit"}});
    // Members may set their own call state in this room.
    let (status, _) = s
        .put_auth(
            &format!("/_matrix/client/v3/rooms/{room}/state/m.room.power_levels/"),
            &alice,
            &json!({"users": {alice_id.clone(): 100}, "events": {"org.matrix.msc3401.call.member": 0}}),
        )
        .await;
    assert_eq!(status, 200);
    set_member(alice.clone(), member(&alice_id), joined.clone()).await;
    set_member(bob.clone(), member(&bob_id), joined.clone()).await;
    let (_, dash) = s.get_auth("/_trellis/admin/v1/dashboard", &admin).await;
    assert_eq!(dash["calls"]["group_calls_now"], 1, "{dash}");
    set_member(alice.clone(), member(&alice_id), json!({})).await;
    set_member(bob.clone(), member(&bob_id), json!({})).await;
    let (_, history) = s.get_auth("/_trellis/client/v1/calls", &alice).await;
    let group = &history["calls"][0];
    assert_eq!(group["type"], "group", "{history}");
    assert_eq!(group["state"], "ended");
    assert_eq!(group["participants"], json!([alice_id, bob_id]));
    assert_eq!(group["video"], true);

    // The older MSC3401 form: the device's calls listed in `memberships`, empty to leave.
    let legacy = |calls: Value| json!({"memberships": calls});
    let key = alice_id.clone();
    set_member(
        alice.clone(),
        key.clone(),
        legacy(json!([{"call_id": "", "application": "m.call",
        "device_id": "DEV", "expires": 3600000, "foci_active": [{"type": "livekit"}]}])),
    )
    .await;
    let (_, dash) = s.get_auth("/_trellis/admin/v1/dashboard", &admin).await;
    assert_eq!(dash["calls"]["group_calls_now"], 1, "{dash}");
    set_member(alice.clone(), key, legacy(json!([]))).await;
    let (_, dash) = s.get_auth("/_trellis/admin/v1/dashboard", &admin).await;
    assert_eq!(dash["calls"]["group_calls_now"], 0, "an empty list leaves: {dash}");

    // The admin sees every call, and non-admins are refused.
    let (status, all) = s.get_auth("/_trellis/admin/v1/calls", &admin).await;
    assert_eq!(status, 200, "{all}");
    assert_eq!(all["total"], 6, "{all}");
    let (status, _) = s.get_auth("/_trellis/admin/v1/calls", &alice).await;
    assert_eq!(status, 403);
}

/// Runs `tests/interop/turn_call.py`: two Chromium peers limited to the relay.
async fn browser_call(s: &TestServer, ice_servers: &Value) -> Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/turn_call.py");
    let out = tokio::process::Command::new("python3")
        .args([script, &s.url("/_matrix/client/versions"), &ice_servers.to_string()])
        .output()
        .await
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(stdout.trim()).unwrap()
}

/// A metric's value, summed over its label sets.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter(|l| name.contains('{') || l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn ice_servers(creds: &Value) -> Value {
    json!([{"urls": creds["uris"], "username": creds["username"], "credential": creds["password"]}])
}

const TURN: &str = "[turn]\nlisten_udp = \"127.0.0.1:0\"\nlisten_tcp = \"127.0.0.1:0\"\n\
                    public_ip = \"127.0.0.1\"\n";

#[tokio::test]
async fn a_real_webrtc_call_goes_through_the_built_in_turn_relay() {
    // The test's peers are all on loopback, which the relay refuses by default.
    let config = format!("{OPEN}{TURN}allowed_peer_ips = [\"127.0.0.0/8\"]\n");
    let s = TestServer::start(&config).await;
    let (alice_id, alice) = s.register("alice").await;
    let (status, creds) = s.get_auth(TURN_SERVER, &alice).await;
    assert_eq!(status, 200, "{creds}");
    let uris: Vec<&str> =
        creds["uris"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert_eq!(uris.len(), 2, "{creds}");
    assert!(uris[0].starts_with("turn:127.0.0.1:") && uris[0].ends_with("?transport=udp"));
    assert!(uris[1].ends_with("?transport=tcp"));
    let username = creds["username"].as_str().unwrap();
    let (expiry, user) = username.split_once(':').unwrap();
    assert_eq!(user, alice_id, "TURN REST API username: expiry:user");
    assert!(expiry.parse::<u64>().unwrap() > 0);
    assert_eq!(creds["ttl"], 86400);

    let call = browser_call(&s, &ice_servers(&creds)).await;
    assert_eq!(call["connected"], true, "{call}");
    assert_eq!(
        (call["local"].as_str(), call["remote"].as_str()),
        (Some("relay"), Some("relay")),
        "{call}"
    );
    assert!(call["framesDecoded"].as_u64().unwrap() > 10, "video flowed: {call}");
    let metrics = s.metrics().await;
    assert!(metric(&metrics, "trellis_turn_allocations_opened_total") >= 2.0, "{metrics}");
    assert!(metric(&metrics, "trellis_turn_relayed_bytes_total") > 10_000.0, "{metrics}");

    // A wrong password gets no relay at all.
    let mut wrong = creds.clone();
    wrong["password"] = json!("not the password");
    let call = browser_call(&s, &ice_servers(&wrong)).await;
    assert_eq!(call["connected"], false, "{call}");
    assert!(call["errors"].as_array().unwrap().iter().any(|e| e["code"] == 401), "{call}");
    let metrics = s.metrics().await;
    assert!(
        metric(&metrics, "trellis_turn_refusals_total{reason=\"auth\"}") > 0.0
            || metrics.contains("trellis_turn_refusals_total{reason=\"auth\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn the_relay_refuses_loopback_peers_by_default_and_can_be_switched_off() {
    let s = TestServer::start(&format!("{OPEN}{TURN}")).await;
    let (_, alice) = s.register("alice").await;
    let (_, creds) = s.get_auth(TURN_SERVER, &alice).await;
    let call = browser_call(&s, &ice_servers(&creds)).await;
    assert_eq!(call["connected"], false, "relaying to 127.0.0.1 is refused: {call}");
    let metrics = s.metrics().await;
    assert!(metric(&metrics, "trellis_turn_refusals_total{reason=\"peer\"") > 0.0, "{metrics}");
    drop(s);

    // Off, and with an external TURN server configured: that one is offered.
    let off = TestServer::start(OPEN).await;
    let (_, token) = off.register("alice").await;
    let (status, none) = off.get_auth(TURN_SERVER, &token).await;
    assert_eq!((status, none), (200, json!({})));
    let external = TestServer::start(&format!(
        "{OPEN}[voip]\nturn_uris = [\"turn:turn.example.org:3478\"]\nturn_shared_secret = \"s\"\n"
    ))
    .await;
    let (_, token) = external.register("alice").await;
    let (_, creds) = external.get_auth(TURN_SERVER, &token).await;
    assert_eq!(creds["uris"], json!(["turn:turn.example.org:3478"]));
}

#[tokio::test]
async fn turn_credentials_come_from_the_shared_secret_and_expire() {
    let config = format!(
        "{OPEN}[voip]\nturn_uris = [\"turn:turn.example.org:3478?transport=udp\", \
         \"turns:turn.example.org:5349?transport=tcp\"]\nturn_shared_secret = \"s3cret\"\n\
         turn_user_lifetime_seconds = 600\n"
    );
    let s = TestServer::start(&config).await;
    let (alice_id, alice) = s.register("alice").await;
    let (status, body) = s.get_auth(TURN_SERVER, &alice).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["uris"].as_array().map(Vec::len), Some(2), "{body}");
    assert_eq!(body["ttl"], 600);
    let username = body["username"].as_str().unwrap();
    let (expiry, user) = username.split_once(':').unwrap();
    assert_eq!(user, alice_id);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let expiry: u64 = expiry.parse().unwrap();
    assert!((now + 590..=now + 610).contains(&expiry), "{username}");
    // HMAC-SHA1 is 20 bytes: 28 characters of base64.
    assert_eq!(body["password"].as_str().map(str::len), Some(28), "{body}");

    // Guests get them too (as the spec's guest endpoints include it); nobody without a
    // token does.
    let (status, guest) = s.post("/_matrix/client/v3/register?kind=guest", &json!({})).await;
    assert_eq!(status, 200, "{guest}");
    let (status, body) = s.get_auth(TURN_SERVER, guest["access_token"].as_str().unwrap()).await;
    assert_eq!((status, body["ttl"].as_u64()), (200, Some(600)), "{body}");
    let (status, body) = s.get(TURN_SERVER).await;
    assert_eq!((status, body["errcode"].as_str()), (401, Some("M_MISSING_TOKEN")));
}

#[tokio::test]
async fn without_a_turn_server_the_answer_is_empty() {
    let s = TestServer::start(OPEN).await;
    let (_, alice) = s.register("alice").await;
    let (status, body) = s.get_auth(TURN_SERVER, &alice).await;
    assert_eq!((status, body), (200, json!({})));
}

#[tokio::test]
async fn call_invites_and_matrixrtc_rings_ring() {
    let s = TestServer::start(OPEN).await;
    let (_, alice) = s.register("alice").await;
    let (_, bob) = s.register("bob").await;
    let room = s.create_room(&alice, json!({"preset": "public_chat"})).await;
    s.join_room(&bob, &room).await;
    for (kind, content) in [
        (
            "m.call.invite",
            json!({"call_id": "r1", "party_id": "p", "version": "1", "lifetime": 60000,
                                 "offer": {"type": "offer", "sdp": "v=0"}}),
        ),
        (
            "org.matrix.msc4075.rtc.notification",
            json!({"notification_type": "ring", "sender_ts": 1, "lifetime": 30000}),
        ),
        (
            "m.rtc.notification",
            json!({"notification_type": "notification", "sender_ts": 2, "lifetime": 30000}),
        ),
    ] {
        let path = format!("/_matrix/client/v3/rooms/{room}/send/{kind}/{}", txn_id());
        let (status, resp) = s.put_auth(&path, &alice, &content).await;
        assert_eq!(status, 200, "{resp}");
    }
    let (status, notes) = s.get_auth("/_matrix/client/v3/notifications", &bob).await;
    assert_eq!(status, 200, "{notes}");
    let rings: Vec<&str> = notes["notifications"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| {
            n["actions"]
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a["set_tweak"] == "sound" && a["value"] == "ring")
        })
        .map(|n| n["event"]["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        rings.len(),
        2,
        "a call invite and a ring ring, a plain notification does not: {notes}"
    );
    assert!(
        rings.contains(&"m.call.invite") && rings.contains(&"org.matrix.msc4075.rtc.notification")
    );
}

/// A server named `127.0.0.1:<its TLS port>` federating with certificates from the test
/// CA in `certs`, with `extra` configuration.
async fn federating(certs: &std::path::Path, extra: &str) -> (TestServer, String) {
    let dir = certs.display();
    let name = format!("127.0.0.1:{}", free_port());
    let config = format!(
        "{OPEN}{extra}[federation]\ntls_listen = \"{name}\"\ntls_certificate = \"{dir}/server.pem\"\n\
         tls_private_key = \"{dir}/server.key\"\nca_file = \"{dir}/ca.pem\"\n"
    );
    let server =
        TestServer::start_with_env(&config, &[("TRELLIS_SERVER__SERVER_NAME", name.as_str())])
            .await;
    (server, name)
}

#[tokio::test]
async fn a_member_from_another_server_gets_a_join_only_token() {
    let certs = tempfile::tempdir().unwrap();
    mint_certificates(certs.path());
    let (sfu, created) = fake_sfu().await;
    let (a, a_name) = federating(certs.path(), &livekit(&sfu)).await;
    let (b, _) = federating(certs.path(), "").await;
    let (_, alice) = a.register("alice").await;
    let room = a.create_room(&alice, json!({"preset": "public_chat"})).await;
    let (bob_id, bob) = b.register("bob").await;
    let path = format!("/_matrix/client/v3/user/{}/openid/request_token", urlencode(&bob_id));
    let (status, bob_openid) = b.post_auth(&path, &bob, &json!({})).await;
    assert_eq!(status, 200, "{bob_openid}");
    // Not in the room yet: nothing.
    let ask = json!({"room": room, "openid_token": bob_openid, "device_id": "BOBDEV"});
    let (status, err) = a.post("/_trellis/livekit/sfu/get", &ask).await;
    assert_eq!((status, err["errcode"].as_str()), (403, Some("M_FORBIDDEN")), "{err}");

    let (status, joined) = b
        .post_auth(
            &format!("/_matrix/client/v3/join/{}?server_name={a_name}", urlencode(&room)),
            &bob,
            &json!({}),
        )
        .await;
    assert_eq!(status, 200, "{joined}");
    // A asks B who the token belongs to, sees bob joined, and gives him a token to join
    // the call, without creating the call's room for him.
    let (status, got) = a.post("/_trellis/livekit/sfu/get", &ask).await;
    assert_eq!(status, 200, "{got}");
    let claims =
        livekit_reads(got["jwt"].as_str().unwrap(), "a-secret-of-at-least-32-characters!!").await;
    assert_eq!(claims["identity"], format!("{bob_id}:BOBDEV"), "{claims}");
    assert_eq!(claims["room_join"], true);
    assert_eq!(claims["room_create"], false);
    assert!(created.lock().unwrap().is_empty(), "a remote user starts no call");
    // A token B does not know is refused.
    let mut forged = ask.clone();
    forged["openid_token"]["access_token"] = json!("made-up");
    let (status, err) = a.post("/_trellis/livekit/sfu/get", &forged).await;
    assert_eq!((status, err["errcode"].as_str()), (401, Some("M_UNAUTHORIZED")), "{err}");
}
