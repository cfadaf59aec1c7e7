//! Notifications out through the real server: pushes to push gateways (a real HTTP
//! server on loopback plays the gateway and records the spec's JSON it receives) and
//! notification mails (through a real SMTP server).

mod common;

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{Json, Router, extract::State, http::StatusCode, routing::post};
use common::{OPEN, SmtpServer, TestServer, code_in, decode_qp};
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

    // Operators see it in the metrics (counted once the gateway's answer is read, so
    // possibly a moment after the gateway saw the push).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = s.client.get(format!("{}/metrics", s.metrics_base)).send().await.unwrap();
        let metrics = metrics.text().await.unwrap();
        let sent = metrics
            .lines()
            .find(|l| l.starts_with("trellis_pushes_total{outcome=\"sent\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok());
        if sent.is_some_and(|n| n >= 3) && metrics.contains("trellis_push_queue ") {
            break;
        }
        assert!(Instant::now() < deadline, "{metrics}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
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

/// Adds `address` to the account through the mailed validation code (mail #1 to it).
async fn add_email(s: &TestServer, smtp: &SmtpServer, token: &str, user: &str, address: &str) {
    let request = json!({"client_secret": "cs", "email": address, "send_attempt": 1});
    let (status, body) =
        s.post("/_matrix/client/v3/account/3pid/email/requestToken", &request).await;
    assert_eq!(status, 200, "{body}");
    let (sid, submit_url) =
        (body["sid"].as_str().unwrap().to_owned(), body["submit_url"].as_str().unwrap().to_owned());
    let code = code_in(&smtp.wait_for(address, 1).await);
    let submit = json!({"sid": sid, "client_secret": "cs", "token": code});
    let (status, _) =
        common::json_of(s.client.post(&submit_url).json(&submit).send().await.unwrap()).await;
    assert_eq!(status, 200);
    let auth = json!({"type": "m.login.password", "password": "password123",
                      "identifier": {"type": "m.id.user", "user": user}});
    let add = json!({"sid": sid, "client_secret": "cs"});
    let (status, body) = s.post_auth("/_matrix/client/v3/account/3pid/add", token, &add).await;
    assert_eq!(status, 401, "{body}");
    let mut add = add;
    add["auth"] = auth;
    add["auth"]["session"] = body["session"].clone();
    let (status, body) = s.post_auth("/_matrix/client/v3/account/3pid/add", token, &add).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn an_inactive_user_is_mailed_a_digest_without_encrypted_text_and_can_unsubscribe() {
    let smtp = SmtpServer::start().await;
    let config = format!(
        "{OPEN}{}[push]\nemail_delay_seconds = 1\nemail_period_seconds = 1\n\
         web_client_url = \"https://chat.example.org\"\n",
        smtp.config()
    );
    let s = TestServer::start(&config).await;
    let (_, alice) = s.register("alice").await;
    let (bob_id, bob) = s.register("bob").await;
    add_email(&s, &smtp, &bob, "bob", "bob@example.org").await;
    let pusher = json!({"kind": "email", "app_id": "m.email", "pushkey": "bob@example.org",
                        "app_display_name": "Email", "device_display_name": "bob@example.org",
                        "lang": "en", "data": {}});
    let (status, body) = s.post_auth(&format!("{PUSHERS}/set"), &bob, &pusher).await;
    assert_eq!(status, 200, "{body}");

    let plans = s.create_room(&alice, json!({"invite": [bob_id], "name": "Plans"})).await;
    s.join_room(&bob, &plans).await;
    let encryption = json!({"type": "m.room.encryption", "state_key": "",
                            "content": {"algorithm": "m.megolm.v1.aes-sha2"}});
    let secrets = s
        .create_room(
            &alice,
            json!({"invite": [bob_id], "name": "Secrets", "initial_state": [encryption]}),
        )
        .await;
    s.join_room(&bob, &secrets).await;
    s.send_text(&alice, &plans, "lunch at noon?").await;
    let path =
        format!("/_matrix/client/v3/rooms/{secrets}/send/m.room.encrypted/{}", common::txn_id());
    let sealed = json!({"algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "SECRETCIPHERTEXT",
                        "device_id": "D", "sender_key": "k", "session_id": "s"});
    let (status, _) = s.put_auth(&path, &alice, &sealed).await;
    assert_eq!(status, 200);

    // Bob stays away: one digest arrives.
    let mail = smtp.wait_for("bob@example.org", 2).await;
    let text = decode_qp(&mail);
    assert!(text.contains("lunch at noon?"), "{text}");
    assert!(
        text.contains("Subject: 2 unread messages in Plans, Secrets"),
        "invites accepted since are not news: {text}"
    );
    assert!(text.contains("Plans") && text.contains("Secrets"), "{text}");
    assert!(text.contains("You have 1 encrypted message."), "{text}");
    assert!(!text.contains("SECRETCIPHERTEXT"), "no ciphertext or plaintext of encrypted rooms");
    assert!(text.contains(&format!("https://chat.example.org/#/room/{plans}")), "{text}");
    assert!(mail.contains("List-Unsubscribe-Post: List-Unsubscribe=One-Click"), "{mail}");
    assert!(mail.contains("Content-Type: text/html") && mail.contains("Content-Type: text/plain"));
    let header = mail
        .lines()
        .find(|l| l.starts_with("List-Unsubscribe: <"))
        .unwrap_or_else(|| panic!("no List-Unsubscribe in {mail}"));
    let link = header.trim_start_matches("List-Unsubscribe: <").trim_end_matches('>').to_owned();

    // Following the link changes nothing; the one-click POST unsubscribes, without login.
    let page = s.client.get(&link).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("<form method=\"post\""));
    let (_, body) = s.get_auth(PUSHERS, &bob).await;
    assert_eq!(body["pushers"].as_array().map(Vec::len), Some(1));
    let done = s.client.post(&link).body("List-Unsubscribe=One-Click").send().await.unwrap();
    assert_eq!(done.status(), 200);
    let (_, body) = s.get_auth(PUSHERS, &bob).await;
    assert_eq!(body["pushers"], json!([]), "{body}");
    let again = s.client.post(&link).send().await.unwrap();
    assert_eq!(again.status(), 404);
}
