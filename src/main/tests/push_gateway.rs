//! Pushes to push gateways through the real server: a real HTTP server on loopback
//! plays the gateway and records the spec's JSON it receives.

mod common;

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{Json, Router, extract::State, http::StatusCode, routing::post};
use common::{OPEN, TestServer};
use serde_json::{Value, json};

const PUSHERS: &str = "/_matrix/client/v3/pushers";

/// What the gateway does with a request.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Accept,
    /// Answers 503: the gateway is down.
    Down,
    /// Answers 200 rejecting every pushkey.
    Reject,
}

#[derive(Clone)]
struct Gateway {
    /// The notifications it accepted, in arrival order.
    accepted: Arc<Mutex<Vec<Value>>>,
    mode: Arc<Mutex<Mode>>,
    refused: Arc<Mutex<usize>>,
}

async fn notify(State(g): State<Gateway>, Json(body): Json<Value>) -> (StatusCode, Json<Value>) {
    let mode = *g.mode.lock().unwrap();
    match mode {
        Mode::Down => {
            *g.refused.lock().unwrap() += 1;
            (StatusCode::SERVICE_UNAVAILABLE, Json(json!({})))
        }
        Mode::Reject => {
            let keys: Vec<Value> = body["notification"]["devices"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|d| d["pushkey"].clone())
                .collect();
            (StatusCode::OK, Json(json!({"rejected": keys})))
        }
        Mode::Accept => {
            g.accepted.lock().unwrap().push(body["notification"].clone());
            (StatusCode::OK, Json(json!({"rejected": []})))
        }
    }
}

/// Starts a gateway on loopback; answers it and its notify URL.
async fn gateway() -> (Gateway, String) {
    let g = Gateway {
        accepted: Arc::default(),
        mode: Arc::new(Mutex::new(Mode::Accept)),
        refused: Arc::default(),
    };
    let app = Router::new().route("/_matrix/push/v1/notify", post(notify)).with_state(g.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (g, format!("http://127.0.0.1:{port}/_matrix/push/v1/notify"))
}

fn config() -> String {
    format!("{OPEN}[push]\ngateway_ip_allow = [\"127.0.0.0/8\"]\n")
}

async fn set_pusher(s: &TestServer, token: &str, url: &str, pushkey: &str) {
    let pusher = json!({"kind": "http", "app_id": "org.example.app", "pushkey": pushkey,
                        "app_display_name": "App", "device_display_name": "Phone",
                        "lang": "en", "data": {"url": url, "custom": "kept"}});
    let (status, body) = s.post_auth(&format!("{PUSHERS}/set"), token, &pusher).await;
    assert_eq!(status, 200, "{body}");
}

/// Waits until the gateway accepted a notification that `check` accepts.
async fn accepted_where(g: &Gateway, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(n) = g.accepted.lock().unwrap().iter().find(|n| check(n)) {
            return n.clone();
        }
        assert!(Instant::now() < deadline, "no push with {what} arrived");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn is_message(n: &Value, body: &str) -> bool {
    n["content"]["body"] == body
}

#[tokio::test]
async fn a_message_is_pushed_once_with_counts_and_a_read_updates_the_badge() {
    let (g, url) = gateway().await;
    let s = TestServer::start(&config()).await;
    let (_, alice) = s.register("alice").await;
    let (bob_id, bob) = s.register("bob").await;
    let room = s.create_room(&alice, json!({"invite": [bob_id], "name": "Plans"})).await;
    s.join_room(&bob, &room).await;
    set_pusher(&s, &bob, &url, "bob-phone").await;

    let hello = s.send_text(&alice, &room, "hello").await;
    let n = accepted_where(&g, "hello", |n| is_message(n, "hello")).await;
    assert_eq!(n["event_id"], hello.as_str(), "{n}");
    assert_eq!(n["room_id"], room.as_str());
    assert_eq!(n["type"], "m.room.message");
    assert_eq!(n["sender"], "@alice:localhost");
    assert_eq!(n["sender_display_name"], "alice");
    assert_eq!(n["room_name"], "Plans");
    assert_eq!(n["counts"]["unread"], 1);
    let device = &n["devices"][0];
    assert_eq!(
        (device["app_id"].as_str(), device["pushkey"].as_str()),
        (Some("org.example.app"), Some("bob-phone"))
    );
    assert_eq!(device["data"], json!({"custom": "kept"}), "data without the url: {n}");
    assert!(device["pushkey_ts"].as_u64().is_some_and(|t| t > 1_600_000_000), "{n}");
    // A one-to-one room rings with a sound: high priority.
    assert_eq!(device["tweaks"]["sound"], "default", "{n}");
    assert_eq!(n["prio"], "high");

    // Alice's own message is not pushed to her, nor is anything pushed twice.
    let second = s.send_text(&alice, &room, "second").await;
    let n = accepted_where(&g, "second", |n| is_message(n, "second")).await;
    assert_eq!(n["counts"]["unread"], 2, "{n}");
    let pushes_of =
        |id: &str| g.accepted.lock().unwrap().iter().filter(|n| n["event_id"] == id).count();
    assert_eq!((pushes_of(&hello), pushes_of(&second)), (1, 1));

    // Bob reads: his phone's badge goes to zero, with no event.
    let path = format!("/_matrix/client/v3/rooms/{room}/receipt/m.read/{second}");
    let (status, _) = s.post_auth(&path, &bob, &json!({})).await;
    assert_eq!(status, 200);
    let n = accepted_where(&g, "a counts update", |n| n.get("event_id").is_none()).await;
    assert_eq!(n["counts"]["unread"], 0, "{n}");
    assert_eq!(n["prio"], "low");
    assert_eq!(n["devices"][0]["pushkey"], "bob-phone");
}

#[tokio::test]
async fn pushes_wait_for_a_gateway_that_is_down_even_over_a_restart_and_arrive_in_order() {
    let (g, url) = gateway().await;
    let mut s = TestServer::start(&config()).await;
    let (_, alice) = s.register("alice").await;
    let (bob_id, bob) = s.register("bob").await;
    let room = s.create_room(&alice, json!({"invite": [bob_id]})).await;
    s.join_room(&bob, &room).await;
    set_pusher(&s, &bob, &url, "bob-phone").await;

    *g.mode.lock().unwrap() = Mode::Down;
    let mut sent = Vec::new();
    for i in 0..5 {
        sent.push(s.send_text(&alice, &room, &format!("m{i}")).await);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while *g.refused.lock().unwrap() == 0 {
        assert!(Instant::now() < deadline, "the server never tried the gateway");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    s.terminate();
    s.launch().await;
    *g.mode.lock().unwrap() = Mode::Accept;

    accepted_where(&g, "the last message", |n| is_message(n, "m4")).await;
    let arrived: Vec<String> = g
        .accepted
        .lock()
        .unwrap()
        .iter()
        .filter_map(|n| n["event_id"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(arrived, sent, "each once, in order");
}

#[tokio::test]
async fn a_pushkey_the_gateway_rejects_removes_the_pusher() {
    let (g, url) = gateway().await;
    let s = TestServer::start(&config()).await;
    let (_, alice) = s.register("alice").await;
    let (bob_id, bob) = s.register("bob").await;
    let room = s.create_room(&alice, json!({"invite": [bob_id]})).await;
    s.join_room(&bob, &room).await;
    set_pusher(&s, &bob, &url, "uninstalled").await;
    *g.mode.lock().unwrap() = Mode::Reject;
    s.send_text(&alice, &room, "anyone there?").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = s.get_auth(PUSHERS, &bob).await;
        if body["pushers"] == json!([]) {
            break;
        }
        assert!(Instant::now() < deadline, "the rejected pusher stayed: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn gateways_at_private_addresses_are_refused_unless_allowed() {
    let s = TestServer::start(OPEN).await;
    let (_, bob) = s.register("bob").await;
    for url in
        ["http://127.0.0.1:9/_matrix/push/v1/notify", "http://10.1.2.3/_matrix/push/v1/notify"]
    {
        let pusher = json!({"kind": "http", "app_id": "org.example.app", "pushkey": "k",
                            "app_display_name": "App", "device_display_name": "Phone",
                            "lang": "en", "data": {"url": url}});
        let (status, body) = s.post_auth(&format!("{PUSHERS}/set"), &bob, &pusher).await;
        assert_eq!((status, body["errcode"].as_str()), (400, Some("M_INVALID_PARAM")), "{body}");
    }
    let (_, body) = s.get_auth(PUSHERS, &bob).await;
    assert_eq!(body["pushers"], json!([]));
}
