//! The Application Service API through the real server: registration files, `as_token`
//! authentication and masquerading, `m.login.application_service`, exclusive namespaces,
//! `ts`, ping, user and alias queries, and transactions (kept over a restart). The
//! service here is a small recorder on loopback; `appservice_interop.rs` runs a real
//! application-service framework.

mod common;

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    routing::{get, post, put},
};
use common::{OPEN, TestServer};
use serde_json::{Value, json};

const AS_TOKEN: &str = "as-secret";
const HS_TOKEN: &str = "hs-secret";

/// What the recorder saw.
#[derive(Default)]
struct Seen {
    /// (transaction id, events)
    transactions: Vec<(String, Vec<Value>)>,
    /// Ephemeral events, by type.
    ephemeral: Vec<String>,
    /// Every transaction body received, repeats included.
    bodies: Vec<Value>,
    pings: usize,
}

#[derive(Clone)]
struct Recorder {
    seen: Arc<Mutex<Seen>>,
    homeserver: Arc<Mutex<String>>,
}

fn authorised(headers: &HeaderMap) -> bool {
    headers.get("authorization").and_then(|v| v.to_str().ok()) == Some("Bearer hs-secret")
}

async fn transaction(
    State(r): State<Recorder>,
    Path(txn): Path<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    if !authorised(&headers) {
        return (StatusCode::FORBIDDEN, Json(json!({"errcode": "M_FORBIDDEN"})));
    }
    let events = body["events"].as_array().cloned().unwrap_or_default();
    let mut seen = r.seen.lock().unwrap();
    seen.bodies.push(body.clone());
    for e in body["ephemeral"].as_array().into_iter().flatten() {
        seen.ephemeral.push(e["type"].as_str().unwrap_or_default().to_owned());
    }
    for m in body["de.sorunome.msc2409.to_device"].as_array().into_iter().flatten() {
        let to = format!("{} {}", m["to_user_id"].as_str().unwrap_or("?"), m["to_device_id"]);
        seen.ephemeral.push(format!("to_device {to} {}", m["content"]["n"]));
    }
    // A repeated transaction id is acknowledged again, not processed again.
    if !seen.transactions.iter().any(|(id, _)| *id == txn) {
        seen.transactions.push((txn, events));
    }
    (StatusCode::OK, Json(json!({})))
}

async fn ping(State(r): State<Recorder>, headers: HeaderMap) -> (StatusCode, Json<Value>) {
    if !authorised(&headers) {
        return (StatusCode::FORBIDDEN, Json(json!({})));
    }
    r.seen.lock().unwrap().pings += 1;
    (StatusCode::OK, Json(json!({})))
}

/// A user of the namespace comes into being when the homeserver asks about them.
async fn user_query(State(r): State<Recorder>, Path(user): Path<String>) -> StatusCode {
    let localpart = user.trim_start_matches('@').split(':').next().unwrap_or_default().to_owned();
    let base = r.homeserver.lock().unwrap().clone();
    let body = json!({"type": "m.login.application_service", "username": localpart,
                      "inhibit_login": true});
    let resp = reqwest::Client::new()
        .post(format!("{base}/_matrix/client/v3/register"))
        .bearer_auth(AS_TOKEN)
        .json(&body)
        .send()
        .await;
    match resp {
        Ok(r) if r.status().is_success() => StatusCode::OK,
        _ => StatusCode::NOT_FOUND,
    }
}

/// A room alias of the namespace is created when the homeserver asks about it.
async fn alias_query(State(r): State<Recorder>, Path(alias): Path<String>) -> StatusCode {
    let name = alias.trim_start_matches('#').split(':').next().unwrap_or_default().to_owned();
    let base = r.homeserver.lock().unwrap().clone();
    let resp = reqwest::Client::new()
        .post(format!("{base}/_matrix/client/v3/createRoom"))
        .bearer_auth(AS_TOKEN)
        .json(&json!({"room_alias_name": name, "preset": "public_chat"}))
        .send()
        .await;
    match resp {
        Ok(r) if r.status().is_success() => StatusCode::OK,
        _ => StatusCode::NOT_FOUND,
    }
}

async fn irc_protocol(headers: HeaderMap) -> (StatusCode, Json<Value>) {
    if !authorised(&headers) {
        return (StatusCode::FORBIDDEN, Json(json!({})));
    }
    let instance = json!({"desc": "Libera Chat", "fields": {"network": "libera"},
                          "network_id": "libera"});
    let protocol = json!({"user_fields": ["network", "nickname"],
        "location_fields": ["network", "channel"], "icon": "mxc://localhost/irc",
        "field_types": {"network": {"regexp": "[a-z]+", "placeholder": "libera"},
                        "nickname": {"regexp": ".+", "placeholder": "nick"},
                        "channel": {"regexp": "#.+", "placeholder": "#room"}},
        "instances": [instance]});
    (StatusCode::OK, Json(protocol))
}

async fn irc_locations(
    axum::extract::Query(query): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> Json<Value> {
    let channel = query.get("channel").cloned().unwrap_or_default();
    Json(json!([{"alias": "#bridge_irc:localhost", "protocol": "irc",
                 "fields": {"network": "libera", "channel": channel}}]))
}

/// Serves the recorder on `port` until the returned task is aborted.
async fn serve(recorder: Recorder, port: u16) -> tokio::task::JoinHandle<()> {
    let app = Router::new()
        .route("/_matrix/app/v1/transactions/{txn}", put(transaction))
        .route("/_matrix/app/v1/ping", post(ping))
        .route("/_matrix/app/v1/users/{user}", get(user_query))
        .route("/_matrix/app/v1/rooms/{alias}", get(alias_query))
        .route("/_matrix/app/v1/thirdparty/protocol/irc", get(irc_protocol))
        .route("/_matrix/app/v1/thirdparty/location/irc", get(irc_locations))
        .with_state(recorder);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    })
}

fn registration(port: u16) -> String {
    format!(
        "id: bridge\nurl: \"http://127.0.0.1:{port}\"\nas_token: {AS_TOKEN}\nhs_token: {HS_TOKEN}\n\
         sender_localpart: bridgebot\nrate_limited: false\nprotocols: [irc]\nreceive_ephemeral: true\n\
         org.matrix.msc3202: true\nnamespaces:\n  users:\n    \
         - exclusive: true\n      regex: \"@bridge_.*:localhost\"\n  aliases:\n    \
         - exclusive: true\n      regex: \"#bridge_.*:localhost\"\n"
    )
}

async fn start(port: u16) -> (TestServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bridge.yaml");
    std::fs::write(&file, registration(port)).unwrap();
    let config = format!("{OPEN}[appservice]\nregistration_files = [\"{}\"]\n", file.display());
    (TestServer::start(&config).await, dir)
}

/// Waits until the recorder holds `n` events; answers their bodies in arrival order.
async fn received(recorder: &Recorder, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let events: Vec<Value> = {
            let seen = recorder.seen.lock().unwrap();
            seen.transactions.iter().flat_map(|(_, e)| e.clone()).collect()
        };
        let bodies: Vec<Value> = events
            .iter()
            .filter(|e| e["type"] == "m.room.message")
            .map(|e| e["content"]["body"].clone())
            .collect();
        if bodies.len() >= n {
            return bodies;
        }
        assert!(Instant::now() < deadline, "only {bodies:?} arrived");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_bridge_registers_puppets_masquerades_and_receives_what_it_is_interested_in() {
    let port = common::free_port();
    let recorder = Recorder { seen: Arc::default(), homeserver: Arc::default() };
    let (s, _dir) = start(port).await;
    *recorder.homeserver.lock().unwrap() = s.base.clone();
    let listener = serve(recorder.clone(), port).await;

    // The service's own user exists and is who the as_token is.
    let (status, who) = s.get_auth("/_matrix/client/v3/account/whoami", AS_TOKEN).await;
    assert_eq!((status, who["user_id"].as_str()), (200, Some("@bridgebot:localhost")), "{who}");
    let (status, body) = s
        .post_auth(
            "/_matrix/client/v1/appservice/bridge/ping",
            AS_TOKEN,
            &json!({"transaction_id": "p1"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body["duration_ms"].is_u64(), "{body}");
    assert_eq!(recorder.seen.lock().unwrap().pings, 1);
    let (status, _) =
        s.post_auth("/_matrix/client/v1/appservice/other/ping", AS_TOKEN, &json!({})).await;
    assert_eq!(status, 403);

    // Puppets: registered by the service, out of reach of everyone else.
    let puppet = json!({"type": "m.login.application_service", "username": "bridge_alice",
                        "inhibit_login": true});
    let (status, body) = s.post_auth("/_matrix/client/v3/register", AS_TOKEN, &puppet).await;
    assert_eq!((status, body["user_id"].as_str()), (200, Some("@bridge_alice:localhost")));
    let outside = json!({"type": "m.login.application_service", "username": "carol"});
    let (status, body) = s.post_auth("/_matrix/client/v3/register", AS_TOKEN, &outside).await;
    assert_eq!((status, body["errcode"].as_str()), (400, Some("M_EXCLUSIVE")), "{body}");
    let (status, body) = s
        .post(
            "/_matrix/client/v3/register",
            &json!({"username": "bridge_eve", "password": "password123",
                    "auth": {"type": "m.login.dummy"}}),
        )
        .await;
    assert_eq!((status, body["errcode"].as_str()), (400, Some("M_EXCLUSIVE")), "{body}");
    let as_alice = "/_matrix/client/v3/account/whoami?user_id=@bridge_alice:localhost";
    let (_, who) = s.get_auth(as_alice, AS_TOKEN).await;
    assert_eq!(who["user_id"], "@bridge_alice:localhost");
    let (human_id, human) = s.register("human").await;
    let (status, _) = s
        .get_auth(&format!("/_matrix/client/v3/account/whoami?user_id={human_id}"), AS_TOKEN)
        .await;
    assert_eq!(status, 403);
    let (status, body) = s.get_auth(&format!("{as_alice}&device_id=NOPE"), AS_TOKEN).await;
    assert_eq!((status, body["errcode"].as_str()), (400, Some("M_UNKNOWN_DEVICE")), "{body}");
    // Login as a puppet.
    let login = json!({"type": "m.login.application_service",
                       "identifier": {"type": "m.id.user", "user": "bridge_alice"}});
    let (status, body) = s.post_auth("/_matrix/client/v3/login", AS_TOKEN, &login).await;
    assert_eq!(status, 200, "{body}");
    let puppet_device = body["device_id"].as_str().unwrap().to_owned();

    // A room with a human: the puppet joins and speaks (with its own timestamp), and the
    // service hears the human.
    let room = s.create_room(&human, json!({"preset": "public_chat"})).await;
    let join = format!("/_matrix/client/v3/rooms/{room}/join?user_id=@bridge_alice:localhost");
    let (status, body) = s.post_auth(&join, AS_TOKEN, &json!({})).await;
    assert_eq!(status, 200, "{body}");
    let send = format!(
        "/_matrix/client/v3/rooms/{room}/send/m.room.message/t1?user_id=@bridge_alice:localhost&ts=1234567"
    );
    let (status, sent) =
        s.put_auth(&send, AS_TOKEN, &json!({"msgtype": "m.text", "body": "from the bridge"})).await;
    assert_eq!(status, 200, "{sent}");
    let event_id = sent["event_id"].as_str().unwrap();
    let (_, event) =
        s.get_auth(&format!("/_matrix/client/v3/rooms/{room}/event/{event_id}"), &human).await;
    assert_eq!(
        (event["sender"].as_str(), event["origin_server_ts"].as_u64()),
        (Some("@bridge_alice:localhost"), Some(1234567)),
        "{event}"
    );
    let hello = s.send_text(&human, &room, "hello bridge").await;
    let bodies = received(&recorder, 2).await;
    assert_eq!(bodies, [json!("from the bridge"), json!("hello bridge")]);
    // Ephemeral events of its rooms: typing and read receipts.
    let typing = format!("/_matrix/client/v3/rooms/{room}/typing/{human_id}");
    let (status, _) = s.put_auth(&typing, &human, &json!({"typing": true, "timeout": 5000})).await;
    assert_eq!(status, 200);
    let receipt = format!("/_matrix/client/v3/rooms/{room}/receipt/m.read/{hello}");
    let (status, _) = s.post_auth(&receipt, &human, &json!({})).await;
    assert_eq!(status, 200);
    // To-device messages for its users' devices (MSC2409).
    let path = format!("/_matrix/client/v3/sendToDevice/m.room.encrypted/{}", common::txn_id());
    let messages = json!({"messages": {"@bridge_alice:localhost": {&puppet_device: {"n": 7}}}});
    let (status, _) = s.put_auth(&path, &human, &messages).await;
    assert_eq!(status, 200);
    let to_device = format!("to_device @bridge_alice:localhost \"{puppet_device}\" 7");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let kinds = recorder.seen.lock().unwrap().ephemeral.clone();
        if kinds.contains(&"m.typing".to_owned())
            && kinds.contains(&"m.receipt".to_owned())
            && kinds.contains(&to_device)
        {
            break;
        }
        assert!(Instant::now() < deadline, "ephemeral events seen: {kinds:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Queries: an unknown user and alias of the namespace come into being on demand.
    let (status, profile) = s.get("/_matrix/client/v3/profile/@bridge_bob:localhost").await;
    assert_eq!(status, 200, "{profile}");
    let (status, alias) =
        s.get("/_matrix/client/v3/directory/room/%23bridge_lobby:localhost").await;
    assert_eq!(status, 200, "{alias}");
    assert!(alias["room_id"].as_str().is_some_and(|r| r.starts_with('!')), "{alias}");
    let (status, body) = s
        .put_auth(
            "/_matrix/client/v3/directory/room/%23bridge_mine:localhost",
            &human,
            &json!({"room_id": room}),
        )
        .await;
    assert_eq!((status, body["errcode"].as_str()), (400, Some("M_EXCLUSIVE")), "{body}");

    // The network it bridges: protocols, lookups, and its own room list.
    let (status, protocols) = s.get_auth("/_matrix/client/v3/thirdparty/protocols", &human).await;
    assert_eq!(status, 200, "{protocols}");
    assert_eq!(protocols["irc"]["instances"][0]["instance_id"], "bridge|libera", "{protocols}");
    let (status, found) =
        s.get_auth("/_matrix/client/v3/thirdparty/location/irc?channel=%23rust", &human).await;
    assert_eq!(status, 200, "{found}");
    assert_eq!(found[0]["fields"]["channel"], "#rust", "{found}");
    let (status, _) = s.get_auth("/_matrix/client/v3/thirdparty/protocol/xmpp", &human).await;
    assert_eq!(status, 404);
    let list = format!("/_matrix/client/v3/directory/list/appservice/libera/{room}");
    let (status, _) = s.put_auth(&list, &human, &json!({"visibility": "public"})).await;
    assert_eq!(status, 403);
    let (status, body) = s.put_auth(&list, AS_TOKEN, &json!({"visibility": "public"})).await;
    assert_eq!(status, 200, "{body}");
    let directory = "/_matrix/client/v3/publicRooms";
    let (_, libera) =
        s.post_auth(directory, &human, &json!({"third_party_instance_id": "bridge|libera"})).await;
    assert_eq!(libera["chunk"][0]["room_id"], room.as_str(), "{libera}");
    let (_, matrix) = s.post_auth(directory, &human, &json!({})).await;
    assert!(!matrix.to_string().contains(room.as_str()), "{matrix}");
    let (_, all) = s.post_auth(directory, &human, &json!({"include_all_networks": true})).await;
    assert!(all.to_string().contains(room.as_str()), "{all}");
    listener.abort();
}

#[tokio::test]
async fn events_queued_while_a_service_is_down_arrive_once_in_order_after_a_restart() {
    let port = common::free_port();
    let recorder = Recorder { seen: Arc::default(), homeserver: Arc::default() };
    let (mut s, _dir) = start(port).await;
    let (_, human) = s.register("human").await;
    let room = s.create_room(&human, json!({"preset": "public_chat"})).await;
    let join = format!("/_matrix/client/v3/rooms/{room}/join");
    let (status, _) = s.post_auth(&join, AS_TOKEN, &json!({})).await;
    assert_eq!(status, 200);
    // Nobody listens on the service's port yet: the events wait in the queue.
    for n in 0..5 {
        s.send_text(&human, &room, &format!("m{n}")).await;
    }
    s.kill9();
    s.launch().await;
    let listener = serve(recorder.clone(), port).await;
    let bodies = received(&recorder, 5).await;
    let expected: Vec<Value> = (0..5).map(|n| json!(format!("m{n}"))).collect();
    assert_eq!(bodies, expected);
    // Nothing more comes: no duplicates after the first delivery.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(received(&recorder, 5).await, expected);
    listener.abort();
}

#[tokio::test]
async fn registrations_are_added_and_removed_at_runtime_and_offline() {
    let port = common::free_port();
    let (mut s, dir) = start(port).await;
    // An admin, made offline.
    s.terminate();
    let config = s.config_path.to_str().unwrap().to_owned();
    let cwd = s.dir.path().to_owned();
    let pwfile = s.dir.path().join("pw");
    std::fs::write(&pwfile, "admin password\n").unwrap();
    let cli = |args: &[&str]| common::run_cli(&[args, &["--config", &config]].concat(), &cwd);
    let out =
        cli(&["user", "create", "root2", "--admin", "--password-file", pwfile.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Offline: add, list (files and database), refuse a clash, remove.
    let second = dir.path().join("second.yaml");
    std::fs::write(
        &second,
        registration(port)
            .replace("id: bridge", "id: second")
            .replace(AS_TOKEN, "as-two")
            .replace(HS_TOKEN, "hs-two"),
    )
    .unwrap();
    let out = cli(&["appservice", "add", second.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = cli(&["appservice", "list"]);
    let listed = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(listed.contains("bridge") && listed.contains("second"), "{listed}");
    let clash = dir.path().join("clash.yaml");
    std::fs::write(&clash, registration(port).replace("id: bridge", "id: clash")).unwrap();
    let out = cli(&["appservice", "add", clash.to_str().unwrap()]);
    assert!(!out.status.success(), "a token in use is refused");
    assert!(String::from_utf8_lossy(&out.stderr).contains("shares a token"));
    s.launch().await;
    let (status, who) = s.get_auth("/_matrix/client/v3/account/whoami", "as-two").await;
    assert_eq!(status, 200, "{who}");

    // Online, through the admin API.
    let (status, login) = s
        .post(
            "/_matrix/client/v3/login",
            &json!({"type": "m.login.password", "password": "admin password",
                    "identifier": {"type": "m.id.user", "user": "root2"}}),
        )
        .await;
    assert_eq!(status, 200, "{login}");
    let admin = login["access_token"].as_str().unwrap().to_owned();
    let third = registration(port)
        .replace("id: bridge", "id: third")
        .replace(AS_TOKEN, "as-three")
        .replace(HS_TOKEN, "hs-three")
        .replace("bridgebot", "thirdbot");
    let add = reqwest::Client::new()
        .post(s.url("/_trellis/admin/v1/appservices"))
        .bearer_auth(&admin)
        .body(third)
        .send()
        .await
        .unwrap();
    let (status, body) = common::json_of(add).await;
    assert_eq!((status, body["id"].as_str()), (200, Some("third")), "{body}");
    let (status, who) = s.get_auth("/_matrix/client/v3/account/whoami", "as-three").await;
    assert_eq!((status, who["user_id"].as_str()), (200, Some("@thirdbot:localhost")), "{who}");
    let (_, listed) = s.get_auth("/_trellis/admin/v1/appservices", &admin).await;
    let ids: Vec<&str> =
        listed["appservices"].as_array().unwrap().iter().filter_map(|a| a["id"].as_str()).collect();
    assert_eq!(ids, ["bridge", "second", "third"], "{listed}");
    let bad = reqwest::Client::new()
        .post(s.url("/_trellis/admin/v1/appservices"))
        .bearer_auth(&admin)
        .body("id: broken\nhs_token: x\nsender_localpart: y\n")
        .send()
        .await
        .unwrap();
    let (status, body) = common::json_of(bad).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("as_token"), "{body}");
    let (status, _) =
        s.delete_auth("/_trellis/admin/v1/appservices/third", &admin, &json!({})).await;
    assert_eq!(status, 200);
    let (status, _) = s.get_auth("/_matrix/client/v3/account/whoami", "as-three").await;
    assert_eq!(status, 401);
    let (status, _) =
        s.delete_auth("/_trellis/admin/v1/appservices/bridge", &admin, &json!({})).await;
    assert_eq!(status, 400, "a registration from a file stays");
    let (status, _) = s.get_auth("/_trellis/admin/v1/appservices", "as-two").await;
    assert_eq!(status, 403, "services are not admins");
}

#[tokio::test]
async fn a_webhook_posts_what_it_receives_into_its_room() {
    let s = TestServer::start(OPEN).await;
    let (_, alice) = s.register("alice").await;
    let (bob_id, bob) = s.register("bob").await;
    let room = s.create_room(&alice, json!({"invite": [bob_id]})).await;
    s.join_room(&bob, &room).await;
    let hooks = format!("/_trellis/client/v1/rooms/{room}/webhooks");
    let (status, body) = s.post_auth(&hooks, &bob, &json!({})).await;
    assert_eq!((status, body["errcode"].as_str()), (403, Some("M_FORBIDDEN")), "{body}");
    let (status, hook) =
        s.post_auth(&hooks, &alice, &json!({"name": "CI", "msgtype": "m.text"})).await;
    assert_eq!(status, 200, "{hook}");
    let url = hook["url"].as_str().unwrap().to_owned();
    let path = url.split_once("/_trellis/").map(|(_, p)| format!("/_trellis/{p}")).unwrap();

    let http = reqwest::Client::new();
    let sent = http
        .post(s.url(&path))
        .json(&json!({"text": "build passed",
                      "html": "<b>build</b> passed<script>alert(1)</script>"}))
        .send()
        .await
        .unwrap();
    let (status, body) = common::json_of(sent).await;
    assert_eq!(status, 200, "{body}");
    let form = http
        .post(s.url(&path))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("text=deploy+done&msgtype=m.notice")
        .send()
        .await
        .unwrap();
    assert_eq!(form.status(), 200);
    let (_, page) =
        s.get_auth(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=5"), &bob).await;
    let chunk = page["chunk"].as_array().unwrap();
    let (notice, build) = (&chunk[0], &chunk[1]);
    assert_eq!(
        (notice["sender"].as_str(), notice["content"]["msgtype"].as_str()),
        (Some("@_webhooks:localhost"), Some("m.notice")),
        "{page}"
    );
    assert_eq!(notice["content"]["body"], "deploy done");
    assert_eq!(build["content"]["body"], "build passed");
    let html = build["content"]["formatted_body"].as_str().unwrap();
    assert!(html.contains("<b>build</b>") && !html.contains("script"), "{html}");

    // Listed without its secret; a wrong secret and a revoked hook are both unknown.
    let (_, listed) = s.get_auth(&hooks, &alice).await;
    assert_eq!(listed["webhooks"][0]["name"], "CI", "{listed}");
    assert!(!listed.to_string().contains(url.rsplit('/').next().unwrap()), "{listed}");
    let wrong = format!("{}x", path);
    let (status, _) = s.post(&wrong, &json!({"text": "x"})).await;
    assert_eq!(status, 404);
    let id = hook["id"].as_str().unwrap();
    let (status, _) = s.delete_auth(&format!("{hooks}/{id}"), &alice, &json!({})).await;
    assert_eq!(status, 200);
    let (status, _) = s.post(&path, &json!({"text": "too late"})).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn bots_are_marked_in_their_profile_and_not_rate_limited() {
    let limited = "[registration]\nmode = \"open\"\n[auth]\nargon2_memory_kib = 64\n\
                   argon2_iterations = 1\n[rate_limits]\nregister = { per_second = 100, burst = 100 }\n\
                   message = { per_second = 0.1, burst = 2 }\n";
    let mut s = TestServer::start(limited).await;
    s.terminate();
    let config = s.config_path.to_str().unwrap().to_owned();
    let cwd = s.dir.path().to_owned();
    let pwfile = s.dir.path().join("pw");
    std::fs::write(&pwfile, "bot password 1\n").unwrap();
    let out = common::run_cli(
        &[
            "user",
            "create",
            "helper",
            "--bot",
            "--password-file",
            pwfile.to_str().unwrap(),
            "--config",
            &config,
        ],
        &cwd,
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("(bot)"));
    s.launch().await;
    let (_, profile) = s.get("/_matrix/client/v3/profile/@helper:localhost").await;
    assert_eq!(profile["org.trellis.bot"], true, "{profile}");
    let (status, login) = s
        .post(
            "/_matrix/client/v3/login",
            &json!({"type": "m.login.password", "password": "bot password 1",
                    "identifier": {"type": "m.id.user", "user": "helper"}}),
        )
        .await;
    assert_eq!(status, 200, "{login}");
    let bot = login["access_token"].as_str().unwrap().to_owned();
    let (_, human) = s.register("human").await;
    let room = s.create_room(&bot, json!({"preset": "public_chat"})).await;
    s.join_room(&human, &room).await;
    // Five messages in a row: a person is stopped after two, the bot is not.
    let send = |token: String, n: usize| {
        let path =
            format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/{}", common::txn_id());
        let s = &s;
        async move {
            s.put_auth(&path, &token, &json!({"msgtype": "m.text", "body": format!("{n}")})).await.0
        }
    };
    let mut bot_statuses = Vec::new();
    let mut human_statuses = Vec::new();
    for n in 0..5 {
        bot_statuses.push(send(bot.clone(), n).await);
        human_statuses.push(send(human.clone(), n).await);
    }
    assert_eq!(bot_statuses, [200; 5]);
    assert!(human_statuses.contains(&429), "{human_statuses:?}");
}

#[tokio::test]
async fn an_outgoing_webhook_receives_its_rooms_events_through_the_ssrf_guard() {
    let config = format!("{OPEN}[appservice]\noutgoing_webhook_ip_allow = [\"127.0.0.0/8\"]\n");
    let s = TestServer::start(&config).await;
    let (_, alice) = s.register("alice").await;
    let (bob_id, bob) = s.register("bob").await;
    let room = s.create_room(&alice, json!({"invite": [bob_id]})).await;
    s.join_room(&bob, &room).await;
    let other = s.create_room(&alice, json!({})).await;

    // The receiving end: any HTTP endpoint.
    // (Authorization header, body) of each delivery.
    type Deliveries = Arc<Mutex<Vec<(Option<String>, Value)>>>;
    let seen: Deliveries = Arc::default();
    let recorder = seen.clone();
    let app = Router::new().route(
        "/hook",
        post(move |headers: HeaderMap, Json(body): Json<Value>| {
            let recorder = recorder.clone();
            async move {
                let auth =
                    headers.get("authorization").and_then(|v| v.to_str().ok()).map(str::to_owned);
                recorder.lock().unwrap().push((auth, body));
                Json(json!({}))
            }
        }),
    );
    let port = common::free_port();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let hooks = format!("/_trellis/client/v1/rooms/{room}/webhooks/outgoing");
    let url = format!("http://127.0.0.1:{port}/hook");
    let (status, _) = s.post_auth(&hooks, &bob, &json!({"url": url})).await;
    assert_eq!(status, 403, "members without state power cannot");
    let (status, body) = s.post_auth(&hooks, &alice, &json!({"url": "http://10.1.2.3/hook"})).await;
    assert_eq!((status, body["errcode"].as_str()), (400, Some("M_INVALID_PARAM")), "{body}");
    let (status, hook) = s.post_auth(&hooks, &alice, &json!({"url": url})).await;
    assert_eq!(status, 200, "{hook}");
    let token = hook["token"].as_str().unwrap().to_owned();

    s.send_text(&alice, &other, "not this room").await;
    s.send_text(&bob, &room, "ship it").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let (auth, body) = loop {
        let found =
            seen.lock().unwrap().iter().find(|(_, b)| b.to_string().contains("ship it")).cloned();
        if let Some(found) = found {
            break found;
        }
        assert!(Instant::now() < deadline, "nothing arrived");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(auth, Some(format!("Bearer {token}")));
    assert_eq!(body["events"].as_array().unwrap().last().unwrap()["room_id"], room.as_str());
    assert!(!seen.lock().unwrap().iter().any(|(_, b)| b.to_string().contains("not this room")));

    let (_, listed) = s.get_auth(&hooks, &alice).await;
    let id = listed["webhooks"][0]["id"].as_str().unwrap().to_owned();
    assert!(!listed.to_string().contains(&token), "{listed}");
    let (status, _) = s.delete_auth(&format!("{hooks}/{id}"), &alice, &json!({})).await;
    assert_eq!(status, 200);
    let (_, listed) = s.get_auth(&hooks, &alice).await;
    assert_eq!(listed["webhooks"], json!([]), "{listed}");

    // A room has a handful at most.
    for _ in 0..5 {
        let (status, _) = s.post_auth(&hooks, &alice, &json!({"url": url})).await;
        assert_eq!(status, 200);
    }
    let (status, body) = s.post_auth(&hooks, &alice, &json!({"url": url})).await;
    assert_eq!((status, body["errcode"].as_str()), (403, Some("M_FORBIDDEN")), "{body}");

    // The hooks pass the room on for their creator: not while she is away.
    let (status, _) =
        s.post_auth(&format!("/_matrix/client/v3/rooms/{room}/leave"), &alice, &json!({})).await;
    assert_eq!(status, 200);
    s.send_text(&bob, &room, "while she was away").await;
    let alice_id = "@alice:localhost";
    let (status, _) = s
        .post_auth(
            &format!("/_matrix/client/v3/rooms/{room}/invite"),
            &bob,
            &json!({"user_id": alice_id}),
        )
        .await;
    assert_eq!(status, 200);
    s.join_room(&alice, &room).await;
    s.send_text(&bob, &room, "welcome back").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !seen.lock().unwrap().iter().any(|(_, b)| b.to_string().contains("welcome back")) {
        assert!(Instant::now() < deadline, "nothing arrived after the creator came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let all = seen.lock().unwrap().iter().map(|(_, b)| b.to_string()).collect::<String>();
    assert!(!all.contains("while she was away"), "{all}");
    server.abort();
}

#[tokio::test]
async fn an_outgoing_webhook_never_reaches_a_private_address_behind_a_name() {
    let s = TestServer::start(OPEN).await;
    let (_, alice) = s.register("alice").await;
    let room = s.create_room(&alice, json!({})).await;
    let hits = Arc::new(Mutex::new(0usize));
    let counter = hits.clone();
    let app = Router::new().route(
        "/hook",
        post(move || {
            let counter = counter.clone();
            async move {
                *counter.lock().unwrap() += 1;
                Json(json!({}))
            }
        }),
    );
    let port = common::free_port();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let hooks = format!("/_trellis/client/v1/rooms/{room}/webhooks/outgoing");
    // A literal loopback address is refused at once; a name is refused when resolved.
    let (status, _) =
        s.post_auth(&hooks, &alice, &json!({"url": format!("http://127.0.0.1:{port}/hook")})).await;
    assert_eq!(status, 400);
    let (status, body) =
        s.post_auth(&hooks, &alice, &json!({"url": format!("http://localhost:{port}/hook")})).await;
    assert_eq!(status, 200, "{body}");
    s.send_text(&alice, &room, "secret").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(*hits.lock().unwrap(), 0, "the guard let a loopback connection through");
    server.abort();
}

/// Waits for a transaction body that `check` accepts; answers it.
async fn body_where(recorder: &Recorder, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(body) = recorder.seen.lock().unwrap().bodies.iter().find(|b| check(b)) {
            return body.clone();
        }
        assert!(Instant::now() < deadline, "no transaction with {what} arrived");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn an_encrypted_bridge_manages_its_devices_and_hears_of_keys_device_lists_and_presence() {
    let port = common::free_port();
    let recorder = Recorder { seen: Arc::default(), homeserver: Arc::default() };
    let (s, _dir) = start(port).await;
    let _listener = serve(recorder.clone(), port).await;
    let carol = "@bridge_carol:localhost";
    let (status, body) = s
        .post_auth(
            "/_matrix/client/v3/register",
            AS_TOKEN,
            &json!({"type": "m.login.application_service", "username": "bridge_carol",
                    "inhibit_login": true}),
        )
        .await;
    assert_eq!(status, 200, "{body}");

    // The bridge creates its puppet's device with the id it chose (spec v1.17): 201, then
    // 200 for an update. Nobody else creates devices that way.
    let as_carol = |path: &str| format!("{path}?user_id={}", common::urlencode(carol));
    let device_path = as_carol("/_matrix/client/v3/devices/CAROLDEV");
    let (status, _) = s.put_auth(&device_path, AS_TOKEN, &json!({"display_name": "Bridge"})).await;
    assert_eq!(status, 201);
    let (status, _) = s.put_auth(&device_path, AS_TOKEN, &json!({"display_name": "Bridged"})).await;
    assert_eq!(status, 200);
    let (status, device) = s.get_auth(&device_path, AS_TOKEN).await;
    assert_eq!((status, device["display_name"].as_str()), (200, Some("Bridged")), "{device}");
    let (_, human) = s.register("dora").await;
    let (status, body) =
        s.put_auth("/_matrix/client/v3/devices/MINE", &human, &json!({"display_name": "x"})).await;
    assert_eq!((status, body["errcode"].as_str()), (404, Some("M_NOT_FOUND")), "{body}");

    // Keys for the device, uploaded as it.
    let keys = format!("{}&device_id=CAROLDEV", as_carol("/_matrix/client/v3/keys/upload"));
    let upload = json!({
        "one_time_keys": {"signed_curve25519:K1": {"key": "k1", "signatures": {}},
                          "signed_curve25519:K2": {"key": "k2", "signatures": {}}},
        "fallback_keys": {"signed_curve25519:F1": {"key": "f1", "fallback": true,
                                                   "signatures": {}}}});
    let (status, body) = s.post_auth(&keys, AS_TOKEN, &upload).await;
    assert_eq!((status, body["one_time_key_counts"]["signed_curve25519"].as_u64()), (200, Some(2)));

    // The puppet joins a room: the transaction naming it carries its devices' counts.
    let room = s.create_room(&human, json!({"preset": "public_chat"})).await;
    let join = as_carol(&format!("/_matrix/client/v3/join/{room}"));
    let (status, body) = s.post_auth(&join, AS_TOKEN, &json!({})).await;
    assert_eq!(status, 200, "{body}");
    let counts = "org.matrix.msc3202.device_one_time_keys_count";
    let fallbacks = "org.matrix.msc3202.device_unused_fallback_key_types";
    let body = body_where(&recorder, "two keys", |b| {
        b[counts][carol]["CAROLDEV"]["signed_curve25519"] == 2
    })
    .await;
    assert_eq!(body[fallbacks][carol]["CAROLDEV"], json!(["signed_curve25519"]), "{body}");
    assert!(body[counts].get("@dora:localhost").is_none(), "{body}");
    assert!(body.get("device_one_time_keys_count").is_none(), "unstable names only: {body}");

    // Someone claims a key and writes to the device: the count drops.
    let claim = json!({"one_time_keys": {carol: {"CAROLDEV": "signed_curve25519"}}});
    let (status, _) = s.post_auth("/_matrix/client/v3/keys/claim", &human, &claim).await;
    assert_eq!(status, 200);
    let path = format!("/_matrix/client/v3/sendToDevice/m.room.encrypted/{}", common::txn_id());
    let messages = json!({"messages": {carol: {"CAROLDEV": {"n": 1}}}});
    let (status, _) = s.put_auth(&path, &human, &messages).await;
    assert_eq!(status, 200);
    body_where(&recorder, "one key", |b| b[counts][carol]["CAROLDEV"]["signed_curve25519"] == 1)
        .await;

    // A co-member's new device is a device list change; their presence comes along.
    let (status, _) = s
        .post(
            "/_matrix/client/v3/login",
            &json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "dora"},
                    "password": "password123"}),
        )
        .await;
    assert_eq!(status, 200);
    let lists = "org.matrix.msc3202.device_lists";
    let is_dora = |v: &Value| v.as_array().is_some_and(|a| a.contains(&json!("@dora:localhost")));
    body_where(&recorder, "dora's device list change", |b| is_dora(&b[lists]["changed"])).await;
    let presence =
        format!("/_matrix/client/v3/presence/{}/status", common::urlencode("@dora:localhost"));
    let (status, _) =
        s.put_auth(&presence, &human, &json!({"presence": "online", "status_msg": "here"})).await;
    assert_eq!(status, 200);
    body_where(&recorder, "dora's presence", |b| {
        b["ephemeral"].as_array().into_iter().flatten().any(|e| {
            e["type"] == "m.presence"
                && e["sender"] == "@dora:localhost"
                && e["content"]["status_msg"] == "here"
        })
    })
    .await;

    // Once nobody of the bridge shares a room with her, she is "left".
    let (status, _) =
        s.post_auth(&format!("/_matrix/client/v3/rooms/{room}/leave"), &human, &json!({})).await;
    assert_eq!(status, 200);
    body_where(&recorder, "dora left", |b| is_dora(&b[lists]["left"])).await;

    // The bridge deletes the device without re-authenticating, as often as it likes.
    let (status, body) = s.delete_auth(&device_path, AS_TOKEN, &json!({})).await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = s.delete_auth(&device_path, AS_TOKEN, &json!({})).await;
    assert_eq!(status, 200);
    let (status, _) = s.get_auth(&device_path, AS_TOKEN).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn an_outgoing_webhook_that_keeps_failing_is_removed() {
    let config = format!(
        "{OPEN}[appservice]\noutgoing_webhook_ip_allow = [\"127.0.0.0/8\"]\n\
         outgoing_webhook_give_up_seconds = 1\n"
    );
    let s = TestServer::start(&config).await;
    let (_, alice) = s.register("alice").await;
    let room = s.create_room(&alice, json!({})).await;
    let hooks = format!("/_trellis/client/v1/rooms/{room}/webhooks/outgoing");
    // Nothing listens there.
    let url = format!("http://127.0.0.1:{}/hook", common::free_port());
    let (status, _) = s.post_auth(&hooks, &alice, &json!({"url": url})).await;
    assert_eq!(status, 200);
    s.send_text(&alice, &room, "anyone?").await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, listed) = s.get_auth(&hooks, &alice).await;
        assert_eq!(status, 200, "{listed}");
        if listed["webhooks"] == json!([]) {
            break;
        }
        assert!(Instant::now() < deadline, "the failing hook stayed: {listed}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
