//! Acknowledged writes survive `kill -9`: registrations run concurrently, the process is
//! killed mid-load, and after a restart every acknowledged account and token is there.

mod common;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use common::{OPEN, TestServer};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_writes_survive_kill_9() {
    let mut s = TestServer::start(OPEN).await;
    let acked: Arc<Mutex<Vec<(String, String)>>> = Arc::default();

    let mut workers = Vec::new();
    for w in 0..8 {
        let client = s.client.clone();
        let url = s.url("/_matrix/client/v3/register");
        let acked = acked.clone();
        workers.push(tokio::spawn(async move {
            // Bounded: at most 2000 registrations per worker; the kill ends it sooner.
            for i in 0..2000 {
                let body = json!({
                    "username": format!("user_{w}_{i}"),
                    "password": "durable password",
                    "auth": {"type": "m.login.dummy"},
                });
                let Ok(resp) = client.post(&url).json(&body).send().await else { break };
                if resp.status() != 200 {
                    break;
                }
                let Ok(v) = resp.json::<serde_json::Value>().await else { break };
                let user = v["user_id"].as_str().unwrap().to_owned();
                let token = v["access_token"].as_str().unwrap().to_owned();
                acked.lock().unwrap().push((user, token));
            }
        }));
    }

    // Let the load build up, then kill the process without warning.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while acked.lock().unwrap().len() < 200 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    s.kill9();
    for w in workers {
        let _ = w.await;
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 50, "the load never got going: {} writes", acked.len());
    eprintln!("{} registrations acknowledged before kill -9", acked.len());

    s.launch().await;
    for (user, token) in &acked {
        let (status, body) = s.get_auth("/_matrix/client/v3/account/whoami", token).await;
        assert_eq!(status, 200, "token of {user} lost: {body}");
        assert_eq!(body["user_id"], user.as_str());
        let localpart = user.trim_start_matches('@').split(':').next().unwrap();
        let (status, body) =
            s.get(&format!("/_matrix/client/v3/register/available?username={localpart}")).await;
        assert_eq!((status, body["errcode"].as_str()), (400, Some("M_USER_IN_USE")), "{user}");
    }
}

#[tokio::test]
async fn graceful_shutdown_keeps_data() {
    let mut s = TestServer::start(OPEN).await;
    let (user, token) = s.register("kept").await;
    let status = s.terminate();
    assert!(status.success(), "{status}");
    s.launch().await;
    let (status, body) = s.get_auth("/_matrix/client/v3/account/whoami", &token).await;
    assert_eq!(status, 200);
    assert_eq!(body["user_id"], user.as_str());
}
