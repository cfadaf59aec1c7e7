//! What one client may hold of the server: a request body sent a byte at a time is cut
//! while other clients are served, and connections are capped per client address.

mod common;

use std::time::{Duration, Instant};

use common::{OPEN, TestServer};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// Whether the server closed `tcp` (reads the end of the stream or a reset) within `limit`.
async fn closed_within(tcp: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
}

/// A client of the server from another loopback address (not the one capped).
fn other_client() -> reqwest::Client {
    reqwest::Client::builder().local_address("127.0.0.2".parse().ok()).build().unwrap()
}

#[tokio::test]
async fn a_body_sent_a_byte_at_a_time_is_cut_and_others_are_served() {
    let config =
        format!("{OPEN}[http]\nbody_read_window_seconds = 1\nbody_min_bytes_per_second = 100\n");
    let s = TestServer::start(&config).await;
    let addr = s.base.trim_start_matches("http://").to_owned();
    let mut slow = TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /_matrix/client/v3/register HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{"
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    // A byte every half second, while an ordinary client is served at once.
    let dribble = tokio::spawn(async move {
        let start = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if slow.write_all(b" ").await.is_err() || start.elapsed() > Duration::from_secs(15) {
                return (slow, start.elapsed());
            }
        }
    });
    let resp = other_client().get(s.url("/_matrix/client/versions")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let (mut slow, after) = dribble.await.unwrap();
    assert!(after < Duration::from_secs(15), "the slow body was never cut");
    assert!(closed_within(&mut slow, Duration::from_secs(5)).await);
    let metrics = s.metrics().await;
    assert!(metrics.contains("trellis_connections_cut_total{reason=\"slow_body\"} 1"), "{metrics}");

    // A body that keeps its pace is not cut, however long it takes.
    let mut steady = TcpStream::connect(&addr).await.unwrap();
    let body =
        br#"{"username": "steady", "password": "password123", "auth": {"type": "m.login.dummy"}}"#;
    let head = format!(
        "POST /_matrix/client/v3/register HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    steady.write_all(head.as_bytes()).await.unwrap();
    for chunk in body.chunks(40) {
        steady.write_all(chunk).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let mut answer = String::new();
    steady.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test]
async fn connections_are_capped_per_client_address() {
    // Loopback is exempt by default (where a reverse proxy connects from); not here.
    let config =
        format!("{OPEN}[http]\nmax_connections_per_ip = 5\nconnection_limit_exempt = []\n");
    let s = TestServer::start(&config).await;
    let addr = s.base.trim_start_matches("http://").to_owned();
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(TcpStream::connect(&addr).await.unwrap());
    }
    let mut sixth = TcpStream::connect(&addr).await.unwrap();
    assert!(closed_within(&mut sixth, Duration::from_secs(5)).await, "the sixth is closed");
    let resp = other_client().get(s.url("/_matrix/client/versions")).send().await.unwrap();
    assert_eq!(resp.status(), 200, "another address is served meanwhile");
    // A place given back is taken again (the first raw connection surely had one: the
    // harness's own pooled connection may hold another).
    drop(held.remove(0));
    let mut again = None;
    let start = Instant::now();
    while again.is_none() {
        let mut tcp = TcpStream::connect(&addr).await.unwrap();
        tcp.write_all(
            b"GET /_matrix/client/versions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        let mut answer = String::new();
        let _ = tcp.read_to_string(&mut answer).await;
        if answer.starts_with("HTTP/1.1 200") {
            again = Some(answer);
        }
        assert!(start.elapsed() < Duration::from_secs(5), "the freed place never came back");
    }
    let metrics =
        reqwest::get(format!("{}/metrics", s.metrics_base)).await.unwrap().text().await.unwrap();
    assert!(
        !metrics.contains("trellis_connections_refused_total{reason=\"per_ip\"} 0"),
        "{metrics}"
    );
}

#[tokio::test]
async fn anonymous_requests_are_shed_first_near_the_connection_cap() {
    let config = format!("{OPEN}[http]\nmax_connections = 20\nshed_anonymous_percent = 50\n");
    let s = TestServer::start(&config).await;
    let (_, token) = s.register("alice").await;
    let addr = s.base.trim_start_matches("http://").to_owned();
    let mut held = Vec::new();
    for _ in 0..10 {
        held.push(TcpStream::connect(&addr).await.unwrap());
    }
    // Connections are counted once accepted, which may trail the connects a little.
    let start = Instant::now();
    let shed = loop {
        let resp = reqwest::get(s.url("/_matrix/client/versions")).await.unwrap();
        if resp.status() == 429 {
            break resp;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "anonymous requests never shed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(shed.headers().contains_key("retry-after"));
    assert_eq!(shed.headers().get("connection").map(|v| v.as_bytes()), Some(&b"close"[..]));
    let body: serde_json::Value = shed.json().await.unwrap();
    assert_eq!(body["errcode"], "M_LIMIT_EXCEEDED", "{body}");

    // Signed-in users are still served, with a header or a query token.
    let fresh = reqwest::Client::new();
    let whoami = fresh
        .get(s.url("/_matrix/client/v3/account/whoami"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(whoami.status(), 200);
    let whoami = fresh
        .get(s.url(&format!("/_matrix/client/v3/account/whoami?access_token={token}")))
        .send()
        .await
        .unwrap();
    assert_eq!(whoami.status(), 200);
    let health = fresh.get(s.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 200, "health checks are never shed");
    let metrics = s.metrics().await;
    assert!(
        !metrics.contains("trellis_connections_refused_total{reason=\"anonymous\"} 0"),
        "{metrics}"
    );

    drop(held);
    let start = Instant::now();
    loop {
        let resp = reqwest::get(s.url("/_matrix/client/versions")).await.unwrap();
        if resp.status() == 200 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "still shedding with room again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
