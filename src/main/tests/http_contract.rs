//! The HTTP contract every client relies on: Matrix error JSON for every failure, CORS,
//! limits, discovery and observability endpoints.

mod common;

use common::{OPEN, TestServer, json_of};
use serde_json::json;

#[tokio::test]
async fn versions_answers_with_json() {
    let s = TestServer::start("").await;
    let (status, body) = s.get("/_matrix/client/versions").await;
    assert_eq!(status, 200);
    let versions: Vec<&str> =
        body["versions"].as_array().unwrap().iter().filter_map(|v| v.as_str()).collect();
    assert!(versions.contains(&"v1.1") && versions.contains(&"v1.10"), "{body}");
}

#[tokio::test]
async fn unknown_route_and_wrong_method_are_m_unrecognized() {
    let s = TestServer::start("").await;
    let (status, body) = s.get("/_matrix/client/v3/no/such/endpoint").await;
    assert_eq!((status, body["errcode"].as_str()), (404, Some("M_UNRECOGNIZED")));
    let (status, body) = s.get("/").await;
    assert_eq!((status, body["errcode"].as_str()), (404, Some("M_UNRECOGNIZED")));

    let resp = s.client.delete(s.url("/_matrix/client/versions")).send().await.unwrap();
    let (status, body) = json_of(resp).await;
    assert_eq!((status, body["errcode"].as_str()), (405, Some("M_UNRECOGNIZED")));
    assert!(body["error"].is_string());
}

#[tokio::test]
async fn malformed_and_misshapen_json_are_rejected() {
    let s = TestServer::start(OPEN).await;
    let url = s.url("/_matrix/client/v3/register");
    for bad in ["{not json", "{\"username\": ", "\u{0}\u{1}"] {
        let resp = s.client.post(&url).body(bad).send().await.unwrap();
        let (status, body) = json_of(resp).await;
        assert_eq!((status, body["errcode"].as_str()), (400, Some("M_NOT_JSON")), "{bad:?}");
    }
    for wrong in [json!({"username": 5}), json!([1, 2]), json!({"inhibit_login": "yes"})] {
        let (status, body) = s.post("/_matrix/client/v3/register", &wrong).await;
        assert_eq!((status, body["errcode"].as_str()), (400, Some("M_BAD_JSON")), "{wrong}");
    }
}

#[tokio::test]
async fn oversize_bodies_get_m_too_large() {
    let s = TestServer::start("[http]\nmax_request_bytes = 4096\n").await;
    let big = format!("{{\"username\": \"{}\"}}", "a".repeat(10_000));
    let resp =
        s.client.post(s.url("/_matrix/client/v3/register")).body(big.clone()).send().await.unwrap();
    let (status, body) = json_of(resp).await;
    assert_eq!((status, body["errcode"].as_str()), (413, Some("M_TOO_LARGE")));

    // Without a Content-Length the limit must hold while streaming.
    let stream = futures_stream(big.into_bytes());
    let resp = s
        .client
        .post(s.url("/_matrix/client/v3/register"))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    let (status, body) = json_of(resp).await;
    assert_eq!((status, body["errcode"].as_str()), (413, Some("M_TOO_LARGE")));
}

fn futures_stream(
    data: Vec<u8>,
) -> impl futures_core::Stream<Item = Result<Vec<u8>, std::io::Error>> + Send + 'static {
    struct Chunks(Vec<Vec<u8>>);
    impl futures_core::Stream for Chunks {
        type Item = Result<Vec<u8>, std::io::Error>;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Self::Item>> {
            std::task::Poll::Ready(if self.0.is_empty() {
                None
            } else {
                Some(Ok(self.0.remove(0)))
            })
        }
    }
    Chunks(data.chunks(1000).map(<[u8]>::to_vec).collect())
}

#[tokio::test]
async fn cors_headers_on_responses_and_preflight() {
    let s = TestServer::start("").await;
    let resp = s
        .client
        .get(s.url("/_matrix/client/versions"))
        .header("Origin", "https://app.example")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["access-control-allow-origin"], "*");

    let resp = s
        .client
        .request(reqwest::Method::OPTIONS, s.url("/_matrix/client/v3/register"))
        .header("Origin", "https://app.example")
        .header("Access-Control-Request-Method", "POST")
        .header("Access-Control-Request-Headers", "authorization, content-type")
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success());
    let h = resp.headers();
    assert_eq!(h["access-control-allow-origin"], "*");
    let methods = h["access-control-allow-methods"].to_str().unwrap().to_uppercase();
    for m in ["GET", "POST", "PUT", "DELETE", "OPTIONS"] {
        assert!(methods.contains(m), "{methods}");
    }
    let headers = h["access-control-allow-headers"].to_str().unwrap().to_lowercase();
    for name in ["x-requested-with", "content-type", "authorization"] {
        assert!(headers.contains(name), "{headers}");
    }

    // Any OPTIONS request is answered so, without running the endpoint (here: no account
    // gets registered), and error responses carry the headers too.
    let resp = s
        .client
        .request(reqwest::Method::OPTIONS, s.url("/_matrix/client/v3/register"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["access-control-allow-origin"], "*");
    let resp = s.client.get(s.url("/_matrix/client/v3/no-such-endpoint")).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(resp.headers()["access-control-allow-origin"], "*");
}

#[tokio::test]
async fn well_known_answers_by_default_and_as_configured() {
    let s = TestServer::start("").await;
    // Unconfigured, clients are pointed back at the address they reached.
    let (status, body) = s.get("/.well-known/matrix/client").await;
    assert_eq!(status, 200, "{body}");
    let reached = s.url("");
    assert_eq!(body["m.homeserver"]["base_url"], reached.trim_end_matches('/'));
    let (status, _) = s.get("/.well-known/matrix/server").await;
    assert_eq!(status, 404);

    let s = TestServer::start(
        "[well_known]\nclient = \"https://matrix.example.org\"\nserver = \"matrix.example.org:443\"\n",
    )
    .await;
    let (status, body) = s.get("/.well-known/matrix/client").await;
    assert_eq!(status, 200);
    assert_eq!(body["m.homeserver"]["base_url"], "https://matrix.example.org");
    let (status, body) = s.get("/.well-known/matrix/server").await;
    assert_eq!(status, 200);
    assert_eq!(body["m.server"], "matrix.example.org:443");
}

#[tokio::test]
async fn health_metrics_and_request_ids() {
    let s = TestServer::start("").await;
    let resp = s.client.get(s.url("/health")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().contains_key("x-request-id"));
    let _ = s.get("/_matrix/client/versions").await;
    let _ = s.get("/nope").await;

    let text = s.metrics().await;
    assert!(
        text.contains("trellis_http_requests_total{method=\"GET\",route=\"/_matrix/client/versions\",status=\"200\"}"),
        "{text}"
    );
    assert!(text.contains("route=\"unmatched\",status=\"404\""), "{text}");
    assert!(text.contains("trellis_http_request_duration_seconds_bucket"));
    assert!(
        text.contains("trellis_storage{family=\"shared_point\",stat=\"estimated_keys\"}"),
        "{text}"
    );
    // Metrics are not served on the client listener.
    let (status, _) = s.get("/metrics").await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn registration_is_closed_by_default() {
    let s = TestServer::start("").await;
    let (status, body) = s
        .post(
            "/_matrix/client/v3/register",
            &json!({"username": "alice", "auth": {"type": "m.login.dummy"}}),
        )
        .await;
    assert_eq!((status, body["errcode"].as_str()), (403, Some("M_FORBIDDEN")));
}

#[tokio::test]
async fn open_registration_with_uia_then_whoami() {
    let s = TestServer::start(OPEN).await;
    let (status, body) = s
        .post(
            "/_matrix/client/v3/register",
            &json!({"username": "alice", "password": "long enough pw"}),
        )
        .await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["flows"][0]["stages"][0], "m.login.dummy");
    let session = body["session"].as_str().unwrap().to_owned();

    let (status, body) = s
        .post(
            "/_matrix/client/v3/register",
            &json!({"username": "alice", "password": "long enough pw", "device_id": "PHONE",
                    "auth": {"type": "m.login.dummy", "session": session}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["user_id"], "@alice:localhost");
    assert_eq!(body["device_id"], "PHONE");
    let token = body["access_token"].as_str().unwrap();

    let (status, body) = s.get_auth("/_matrix/client/v3/account/whoami", token).await;
    assert_eq!(status, 200);
    assert_eq!(body["user_id"], "@alice:localhost");
    assert_eq!(body["device_id"], "PHONE");
    // `is_guest` may be omitted when false.
    assert_ne!(body["is_guest"], true);
    // The deprecated query parameter works too.
    let (status, _) =
        s.get(&format!("/_matrix/client/v3/account/whoami?access_token={token}")).await;
    assert_eq!(status, 200);

    let (status, body) = s.get("/_matrix/client/v3/register/available?username=alice").await;
    assert_eq!((status, body["errcode"].as_str()), (400, Some("M_USER_IN_USE")));
    let (status, body) = s.get("/_matrix/client/v3/register/available?username=bob").await;
    assert_eq!((status, body["available"].as_bool()), (200, Some(true)));
    let (status, body) = s.get("/_matrix/client/v3/register/available?username=Not%20Valid!").await;
    assert_eq!((status, body["errcode"].as_str()), (400, Some("M_INVALID_USERNAME")));

    let (status, body) = s
        .post(
            "/_matrix/client/v3/register",
            &json!({"username": "alice", "auth": {"type": "m.login.dummy"}}),
        )
        .await;
    assert_eq!((status, body["errcode"].as_str()), (400, Some("M_USER_IN_USE")));
    let (status, body) = s
        .post(
            "/_matrix/client/v3/register",
            &json!({"username": "carol", "password": "short", "auth": {"type": "m.login.dummy"}}),
        )
        .await;
    assert_eq!((status, body["errcode"].as_str()), (400, Some("M_WEAK_PASSWORD")));
    let (status, _) = s
        .post(
            "/_matrix/client/v3/register",
            &json!({"username": "dave", "auth": {"type": "m.login.dummy", "session": "forged"}}),
        )
        .await;
    assert_eq!(status, 400);
    // Guest accounts are on by default, and can be switched off.
    let guest = json!({"auth": {"type": "m.login.dummy"}});
    let (status, body) = s.post("/_matrix/client/v3/register?kind=guest", &guest).await;
    assert_eq!(status, 200, "{body}");
    let no_guests = [("TRELLIS_REGISTRATION__GUEST_ACCESS", "false")];
    let s = TestServer::start_with_env(OPEN, &no_guests).await;
    let (status, body) = s.post("/_matrix/client/v3/register?kind=guest", &guest).await;
    assert_eq!((status, body["errcode"].as_str()), (403, Some("M_FORBIDDEN")));
}

#[tokio::test]
async fn missing_and_unknown_tokens() {
    let s = TestServer::start("").await;
    let (status, body) = s.get("/_matrix/client/v3/account/whoami").await;
    assert_eq!((status, body["errcode"].as_str()), (401, Some("M_MISSING_TOKEN")));
    let (status, body) = s.get_auth("/_matrix/client/v3/account/whoami", "nonsense").await;
    assert_eq!((status, body["errcode"].as_str()), (401, Some("M_UNKNOWN_TOKEN")));
    assert_eq!(body["soft_logout"], false);
}

/// Hostile and odd input of many shapes: every answer is Matrix JSON and the process
/// stays up.
#[tokio::test]
async fn odd_input_never_crashes_the_server() {
    let s = TestServer::start(OPEN).await;
    let paths = [
        "/_matrix/client/v3/register?kind=%ZZ",
        "/_matrix/client/v3/register?kind=",
        "/_matrix/client/v3/register/available",
        "/_matrix/client/v3/register/available?username=%FF%FE",
        "/_matrix/key/v2/server/%FF",
        "/_matrix/client/v3/account/whoami?access_token=%00",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/_matrix/client/v3/rooms/%FF/send/m.room.message/1",
    ];
    let bodies: [&[u8]; 6] = [
        b"",
        b"null",
        b"{}",
        b"\xff\xfe\xfd",
        b"{\"auth\": {\"type\": 7}}",
        b"[[[[[[[[[[]]]]]]]]]]",
    ];
    for path in paths {
        for body in bodies {
            for method in [reqwest::Method::GET, reqwest::Method::POST, reqwest::Method::PUT] {
                let resp = s
                    .client
                    .request(method.clone(), s.url(path))
                    .header(
                        "Authorization",
                        reqwest::header::HeaderValue::from_bytes(b"Bearer \xff\xfe x").unwrap(),
                    )
                    .body(body.to_vec())
                    .send()
                    .await
                    .unwrap();
                let status = resp.status().as_u16();
                let text = resp.text().await.unwrap();
                let parsed: serde_json::Value = serde_json::from_str(&text)
                    .unwrap_or_else(|_| panic!("{method} {path}: {status} non-JSON {text:?}"));
                // A user-interactive auth challenge (401 with `flows`) needs no errcode.
                if status >= 400 && parsed.get("flows").is_none() {
                    assert!(parsed["errcode"].is_string(), "{method} {path}: {text}");
                }
                assert!(status < 500, "{method} {path}: {status} {text}");
            }
        }
    }
    let (status, _) = s.get("/_matrix/client/versions").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn the_plain_listener_speaks_http2_with_prior_knowledge() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = TestServer::start(OPEN).await;
    let addr = s.base.trim_start_matches("http://").trim_end_matches('/').to_owned();
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    // The connection preface, then an empty SETTINGS frame (length 0, type 4, no flags,
    // stream 0).
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
    tcp.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
    let mut head = [0u8; 9];
    tokio::time::timeout(std::time::Duration::from_secs(5), tcp.read_exact(&mut head))
        .await
        .expect("the server answers the preface")
        .unwrap();
    // An HTTP/2 server's first frame is its own SETTINGS, on stream 0.
    assert_eq!(head[3], 4, "frame type of {head:?}");
    assert_eq!(&head[5..9], &[0, 0, 0, 0], "stream of {head:?}");
}
