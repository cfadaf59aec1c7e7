//! The HTTP/1 connection loop against raw sockets: what a client sees byte for byte.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::{Router, body::Body, routing::get};
use bytes::Bytes;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};

/// Set when the handler's future is dropped before it finished.
struct DropFlag(Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

async fn server(dropped: Arc<AtomicBool>) -> (SocketAddr, watch::Sender<bool>) {
    let app = Router::new()
        .route("/hello", get(|| async { "hello" }))
        .route("/echo", axum::routing::post(|body: Bytes| async move { body }))
        .route("/ignore", axum::routing::post(|| async { "ignored" }))
        .route(
            "/stream",
            get(|| async {
                let pieces = futures_util::stream::iter(
                    ["one", "two"].map(|p| Ok::<_, std::io::Error>(Bytes::from(p))),
                );
                Body::from_stream(pieces)
            }),
        )
        .route("/close", get(|| async { ([(http::header::CONNECTION, "close")], "bye") }))
        .route(
            "/forever",
            get({
                let dropped = dropped.clone();
                move || {
                    let flag = DropFlag(dropped.clone());
                    async move {
                        let _flag = flag;
                        std::future::pending::<()>().await;
                        "never"
                    }
                }
            })
            // A long-poll by POST (sliding sync): the body is read, then it waits.
            .post(move |_body: Bytes| {
                let flag = DropFlag(dropped.clone());
                async move {
                    let _flag = flag;
                    std::future::pending::<()>().await;
                    "never"
                }
            }),
        );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop) = watch::channel(false);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = listener.accept().await.unwrap();
            let limits = crate::limits::ConnectionLimits::new(
                &trellis_core::config::HttpConfig::default(),
                4096,
                trellis_core::metrics::ConnectionMetrics::default(),
            );
            let Some(admitted) = limits.admit(peer.ip()) else { continue };
            tokio::spawn(super::serve(tcp, peer, app.clone(), stop.clone(), admitted));
        }
    });
    (addr, stop_tx)
}

/// A new connection that has sent `bytes`.
async fn connect_and_send(addr: SocketAddr, bytes: &[u8]) -> TcpStream {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(bytes).await.unwrap();
    tcp
}

/// Reads until the server closes the connection or `until` appears `times` times.
async fn read_until(tcp: &mut TcpStream, until: &str, times: usize) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let text = String::from_utf8_lossy(&got).to_string();
        if text.matches(until).count() >= times {
            return text;
        }
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Err(_) => return text,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Ok(Err(_)) => return text,
        }
    }
}

async fn closed(tcp: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    matches!(tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await, Ok(Ok(0)))
}

#[tokio::test]
async fn keep_alive_and_pipelined_requests_are_answered_in_order() {
    let (addr, _stop) = server(Arc::default()).await;
    let mut tcp = connect_and_send(addr, b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let first = read_until(&mut tcp, "hello", 1).await;
    assert!(first.starts_with("HTTP/1.1 200 OK\r\n"), "{first}");
    assert!(first.contains("content-length: 5\r\n") && first.contains("date: "), "{first}");
    // Two requests in one write, the second with a body.
    tcp.write_all(
        b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\nPOST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nping",
    )
    .await
    .unwrap();
    let both = read_until(&mut tcp, "HTTP/1.1 200", 2).await;
    let both = read_until_more(&mut tcp, both, "ping").await;
    let (hello, ping) = (both.find("hello").unwrap(), both.find("ping").unwrap());
    assert!(hello < ping, "{both}");
}

async fn read_until_more(tcp: &mut TcpStream, mut so_far: String, until: &str) -> String {
    if !so_far.contains(until) {
        so_far.push_str(&read_until(tcp, until, 1).await);
    }
    so_far
}

#[tokio::test]
async fn bodies_arrive_split_chunked_or_after_100_continue() {
    let (addr, _stop) = server(Arc::default()).await;
    // A length-delimited body in pieces.
    let mut tcp = connect_and_send(
        addr,
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\nhello",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    tcp.write_all(b" world").await.unwrap();
    let answer = read_until(&mut tcp, "hello world", 1).await;
    assert!(answer.contains("content-length: 11\r\n"), "{answer:?}");
    assert!(answer.ends_with("\r\n\r\nhello world"), "{answer:?}");
    // A chunked body, on the same connection.
    tcp.write_all(
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    tcp.write_all(b"2\r\nde\r\n0\r\n\r\n").await.unwrap();
    let answer = read_until(&mut tcp, "abcde", 1).await;
    assert!(answer.contains("\r\n\r\nabcde"), "{answer}");
    // The client waits for the interim response before sending its body.
    let mut tcp = connect_and_send(
        addr,
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n",
    )
    .await;
    let interim = read_until(&mut tcp, "\r\n\r\n", 1).await;
    assert_eq!(interim, "HTTP/1.1 100 Continue\r\n\r\n");
    tcp.write_all(b"ok").await.unwrap();
    let answer = read_until(&mut tcp, "\r\n\r\nok", 1).await;
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
}

#[tokio::test]
async fn an_unread_body_keeps_the_connection_only_if_it_arrived_whole() {
    let (addr, _stop) = server(Arc::default()).await;
    let mut tcp =
        connect_and_send(addr, b"POST /ignore HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
            .await;
    let answer = read_until(&mut tcp, "ignored", 1).await;
    assert!(!answer.contains("connection: close"), "{answer}");
    tcp.write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    assert!(read_until(&mut tcp, "hello", 1).await.contains("hello"));
    // Most of the body is still to come: the answer closes the connection instead of
    // reading a body nobody wants.
    let tcp = connect_and_send(
        addr,
        b"POST /ignore HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nabc",
    )
    .await;
    // The client goes on sending its body meanwhile, as uploaders do: the answer still
    // arrives whole (the server drains instead of resetting the connection).
    let (mut read, mut write) = tcp.into_split();
    let sender = tokio::spawn(async move {
        let chunk = vec![b'x'; 10_000];
        for _ in 0..10 {
            if write.write_all(&chunk).await.is_err() {
                break;
            }
        }
        write
    });
    let mut answer = Vec::new();
    let read_all = tokio::time::timeout(Duration::from_secs(5), read.read_to_end(&mut answer));
    assert!(matches!(read_all.await, Ok(Ok(_))), "the connection was reset");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.contains("connection: close\r\n"), "{answer}");
    assert!(answer.ends_with("ignored"), "{answer}");
    let _ = sender.await;
}

#[tokio::test]
async fn streamed_bodies_are_chunked_for_http_1_1_and_close_delimited_for_1_0() {
    let (addr, _stop) = server(Arc::default()).await;
    let mut tcp = connect_and_send(addr, b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let answer = read_until(&mut tcp, "0\r\n\r\n", 1).await;
    assert!(answer.contains("transfer-encoding: chunked\r\n"), "{answer}");
    assert!(answer.ends_with("\r\n\r\n3\r\none\r\n3\r\ntwo\r\n0\r\n\r\n"), "{answer}");
    let mut tcp = connect_and_send(addr, b"GET /stream HTTP/1.0\r\n\r\n").await;
    let answer = read_until(&mut tcp, "never appears", 1).await;
    assert!(answer.starts_with("HTTP/1.0 200 OK\r\n"), "{answer}");
    assert!(answer.ends_with("\r\n\r\nonetwo"), "{answer}");
    // HTTP/1.0 keeps the connection only when asked to.
    let mut tcp =
        connect_and_send(addr, b"GET /hello HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").await;
    let answer = read_until(&mut tcp, "hello", 1).await;
    assert!(answer.contains("connection: keep-alive\r\n"), "{answer}");
    tcp.write_all(b"GET /hello HTTP/1.0\r\n\r\n").await.unwrap();
    assert!(read_until(&mut tcp, "hello", 1).await.contains("connection: close"));
    assert!(closed(&mut tcp).await);
}

#[tokio::test]
async fn malformed_or_ambiguous_requests_are_refused_and_closed() {
    let (addr, _stop) = server(Arc::default()).await;
    let cases: [(&[u8], &str); 5] = [
        (b"POST /echo HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", "400"),
        (b"POST /echo HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", "400"),
        (b"POST /echo HTTP/1.1\r\nContent-Length: -3\r\n\r\n", "400"),
        (b"POST /echo HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", "501"),
        (b"NOT HTTP\r\n\r\n", "400"),
    ];
    for (request, status) in cases {
        let mut tcp = connect_and_send(addr, request).await;
        let answer = read_until(&mut tcp, "never appears", 1).await;
        assert!(answer.starts_with(&format!("HTTP/1.1 {status} ")), "{answer}");
        assert!(answer.contains("\"errcode\":\"M_UNKNOWN\""), "{answer}");
    }
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let huge = format!("GET /hello HTTP/1.1\r\nX-Big: {}\r\n\r\n", "a".repeat(super::MAX_HEAD));
    let _ = tcp.write_all(huge.as_bytes()).await;
    let answer = read_until(&mut tcp, "never appears", 1).await;
    assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
}

#[tokio::test]
async fn a_client_hanging_up_ends_its_waiting_request() {
    for request in [
        &b"GET /forever HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        b"POST /forever HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
        b"POST /forever HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    ] {
        let dropped = Arc::new(AtomicBool::new(false));
        let (addr, _stop) = server(dropped.clone()).await;
        let tcp = connect_and_send(addr, request).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!dropped.load(Ordering::SeqCst));
        drop(tcp);
        let mut ended = false;
        for _ in 0..100 {
            if dropped.load(Ordering::SeqCst) {
                ended = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let request = String::from_utf8_lossy(request);
        assert!(ended, "the request kept running after its client left: {request}");
    }
}

#[tokio::test]
async fn a_handler_may_close_the_connection_and_http_1_0_has_no_transfer_codings() {
    let (addr, _stop) = server(Arc::default()).await;
    let mut tcp = connect_and_send(addr, b"GET /close HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let answer = read_until(&mut tcp, "never appears", 1).await;
    assert!(answer.contains("connection: close\r\n") && answer.ends_with("bye"), "{answer}");
    let mut tcp = connect_and_send(
        addr,
        b"POST /echo HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    )
    .await;
    let answer = read_until(&mut tcp, "never appears", 1).await;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
}

#[tokio::test]
async fn a_body_dribbled_in_byte_by_byte_arrives_whole() {
    let (addr, _stop) = server(Arc::default()).await;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let body: Vec<u8> = (0..200u8).map(|i| b'a' + i % 26).collect();
    tcp.write_all(
        format!("POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", body.len())
            .as_bytes(),
    )
    .await
    .unwrap();
    for byte in &body {
        tcp.write_all(std::slice::from_ref(byte)).await.unwrap();
        tokio::task::yield_now().await;
    }
    let expected = String::from_utf8(body).unwrap();
    let answer = read_until(&mut tcp, &expected, 1).await;
    assert!(answer.ends_with(&expected), "{answer}");
}
