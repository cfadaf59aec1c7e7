//! Calls through the real server: TURN credentials (`GET /voip/turnServer`).

mod common;

use common::{OPEN, TestServer};
use serde_json::json;

const TURN: &str = "/_matrix/client/v3/voip/turnServer";

#[tokio::test]
async fn turn_credentials_come_from_the_shared_secret_and_expire() {
    let config = format!(
        "{OPEN}[voip]\nturn_uris = [\"turn:turn.example.org:3478?transport=udp\", \
         \"turns:turn.example.org:5349?transport=tcp\"]\nturn_shared_secret = \"s3cret\"\n\
         turn_user_lifetime_seconds = 600\n"
    );
    let s = TestServer::start(&config).await;
    let (alice_id, alice) = s.register("alice").await;
    let (status, body) = s.get_auth(TURN, &alice).await;
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
    let (status, body) = s.get_auth(TURN, guest["access_token"].as_str().unwrap()).await;
    assert_eq!((status, body["ttl"].as_u64()), (200, Some(600)), "{body}");
    let (status, body) = s.get(TURN).await;
    assert_eq!((status, body["errcode"].as_str()), (401, Some("M_MISSING_TOKEN")));
}

#[tokio::test]
async fn without_a_turn_server_the_answer_is_empty() {
    let s = TestServer::start(OPEN).await;
    let (_, alice) = s.register("alice").await;
    let (status, body) = s.get_auth(TURN, &alice).await;
    assert_eq!((status, body), (200, json!({})));
}
