//! The plain-HTTP listener: HTTP/1.1 (served by [`crate::http1`], upgrades by hyper) and
//! HTTP/2 with prior knowledge (hyper), told apart by peeking at the first bytes.

use std::{net::SocketAddr, pin::pin, sync::Arc, time::Duration};

use axum::extract::ConnectInfo;
use hyper::server::conn::{http1, http2};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    service::TowerToHyperService,
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinSet,
};
use tower::ServiceExt;

use crate::limits::{Admitted, ConnectionLimits};

/// The HTTP/2 connection preface starts with this, which no HTTP/1 method does.
const H2_PREFIX: &[u8] = b"PRI";
/// How long a connection may dribble in its first bytes before it is taken as HTTP/1.
const PEEK_TRIES: u32 = 50;
/// How long a new connection may stay silent before it is closed.
const FIRST_BYTES_WITHIN: Duration = Duration::from_secs(60);

/// Serves `app` on `listener` until `stop` turns true, then lets open connections finish
/// their requests (the caller bounds how long). Connections over `limits` are closed as
/// soon as they are accepted.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    mut stop: watch::Receiver<bool>,
    limits: Arc<ConnectionLimits>,
) {
    let mut connections = JoinSet::new();
    while let Some((tcp, peer)) = accept(&listener, &mut stop).await {
        while connections.try_join_next().is_some() {}
        let Some(admitted) = limits.admit(peer.ip()) else { continue };
        connections.spawn(connection(tcp, peer, app.clone(), stop.clone(), admitted));
    }
    while connections.join_next().await.is_some() {}
}

/// A hyper connection's life: served until done or told to stop, then the requests in
/// flight finish (a macro: hyper's HTTP/1 and HTTP/2 connections share no trait for it).
macro_rules! drive {
    ($conn:expr, $peer:expr, $stop:expr) => {{
        let mut conn = pin!($conn);
        let result = tokio::select! {
            result = conn.as_mut() => result,
            () = stopped(&mut $stop) => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = result {
            tracing::debug!(peer = %$peer, error = %e, "connection ended with an error");
        }
    }};
}

async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    app: axum::Router,
    mut stop: watch::Receiver<bool>,
    admitted: Admitted,
) {
    // A silent connection neither holds its task forever nor delays a shutdown.
    let h2 = tokio::select! {
        h2 = tokio::time::timeout(FIRST_BYTES_WITHIN, is_h2(&tcp)) => h2,
        () = stopped(&mut stop) => return,
    };
    match h2 {
        Ok(Some(false)) => crate::http1::serve(tcp, peer, app, stop, admitted).await,
        // Boxed: a connection task is allocated at the size of its largest path, and
        // hyper's HTTP/2 connection is several times the size of an idle HTTP/1 one.
        Ok(Some(true)) => Box::pin(serve_h2(tcp, peer, app, stop)).await,
        _ => {}
    }
}

async fn serve_h2(
    tcp: TcpStream,
    peer: SocketAddr,
    app: axum::Router,
    mut stop: watch::Receiver<bool>,
) {
    let mut builder = http2::Builder::new(TokioExecutor::new());
    // WebSockets over HTTP/2 (RFC 8441), as axum's own server allows.
    builder.enable_connect_protocol();
    let service = hyper_service(app, peer);
    drive!(builder.serve_connection(TokioIo::new(tcp), service), peer, stop);
}

fn keepalive() -> socket2::TcpKeepalive {
    let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60));
    #[cfg(target_os = "linux")]
    let keepalive = keepalive.with_interval(Duration::from_secs(15)).with_retries(4);
    keepalive
}

/// Serves an HTTP/1 connection whose request upgrades it (a WebSocket) with hyper, which
/// axum's upgrade support needs.
pub async fn serve_hyper_http1(
    io: crate::http1::Replay,
    peer: SocketAddr,
    app: axum::Router,
    mut stop: watch::Receiver<bool>,
) {
    let service = hyper_service(app, peer);
    let conn = http1::Builder::new().serve_connection(TokioIo::new(io), service).with_upgrades();
    drive!(conn, peer, stop);
}

/// `app` as hyper serves it, with the peer's address where axum's extractors look.
pub fn hyper_service(
    app: axum::Router,
    peer: SocketAddr,
) -> TowerToHyperService<
    tower::util::MapRequest<
        axum::Router,
        impl FnMut(http::Request<hyper::body::Incoming>) -> http::Request<hyper::body::Incoming> + Clone,
    >,
> {
    let service = app.map_request(move |mut req: http::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
        req
    });
    TowerToHyperService::new(service)
}

/// The next connection, configured, or `None` once `stop` turns true (shared with the
/// TLS listener).
pub async fn accept(
    listener: &TcpListener,
    stop: &mut watch::Receiver<bool>,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    configure(&tcp);
                    return Some((tcp, peer));
                }
                Err(e) => {
                    // Out of descriptors, usually: wait instead of spinning.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            () = stopped(stop) => return None,
        }
    }
}

/// Socket options of every accepted connection.
fn configure(tcp: &TcpStream) {
    // Streamed bodies go out in several writes; with Nagle's algorithm a small one waits
    // for the client's delayed ACK (40 ms on Linux).
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!(error = %e, "setting TCP_NODELAY failed");
    }
    // A client that vanished without closing (a phone changing networks) leaves no trace
    // on the socket: probes after a quiet minute end its connection, and the long-poll
    // or idle keep-alive it held, within about two minutes instead of never.
    if let Err(e) = socket2::SockRef::from(tcp).set_tcp_keepalive(&keepalive()) {
        tracing::debug!(error = %e, "setting TCP keepalive failed");
    }
}

/// Completes once `stop` turns true (the borrow it returns is not held across awaits).
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Whether the client speaks HTTP/2 with prior knowledge; `None` if it closed or
/// failed before sending anything.
async fn is_h2(tcp: &TcpStream) -> Option<bool> {
    let mut head = [0u8; 3];
    for _ in 0..PEEK_TRIES {
        let n = tcp.peek(&mut head).await.ok()?;
        if n == 0 {
            return None;
        }
        if n == head.len() || head[..n] != H2_PREFIX[..n] {
            return Some(head[..n] == *H2_PREFIX);
        }
        // A partial "PRI": peeking again at once would return the same bytes.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Some(false)
}
