//! HTTP/1.1 connections of the plain listener, served without hyper.
//!
//! A `/sync` long-poll spends nearly all its life waiting. hyper keeps an 8 KiB read
//! buffer and an 8 KiB write buffer per connection for the connection's whole life,
//! which made a held poll cost about 23 KiB and 10,000 of them 300 MB. Here a
//! connection holds no buffer while its request runs: the request head is read into a
//! buffer that is freed once parsed, a request body is read from the socket as the
//! handler asks for it, and a client that hangs up is noticed by peeking one byte.
//!
//! Requests that upgrade the connection (the WebSocket stream) are handed to hyper with
//! the bytes already read, since axum's upgrade support needs hyper's connection.

use std::{
    io,
    net::SocketAddr,
    pin::{Pin, pin},
    sync::{Arc, Mutex, MutexGuard},
    task::{Context, Poll, ready},
    time::Duration,
};

use axum::extract::ConnectInfo;
use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version, header};
use http_body::{Body as _, Frame, SizeHint};
use tokio::{io::ReadBuf, net::TcpStream, sync::watch};
use tower::Service;

mod chunked;

use chunked::ChunkedDecoder;

use crate::limits::Admitted;

/// The largest request head (request line and headers) taken.
const MAX_HEAD: usize = 128 * 1024;
/// The most header fields a request may have.
const MAX_HEADERS: usize = 128;
/// What a head's first read allocates; most heads fit.
const FIRST_READ: usize = 4096;
/// The largest piece of a request body read from the socket at once.
const BODY_READ: usize = 64 * 1024;
/// A body read goes into a fresh block when the current one has less room than this.
const READ_AT_LEAST: usize = 1024;
/// A response body piece up to this size goes out in the same write as the head.
const COALESCE: usize = 16 * 1024;
/// How long a request head may take to arrive once it has started.
const HEAD_WITHIN: Duration = Duration::from_secs(60);

/// What the connection task shares with the body of the request being served.
struct Shared {
    tcp: TcpStream,
    body: Mutex<BodyState>,
    /// Signalled when a request body has been read to its end.
    body_read: tokio::sync::Notify,
}

impl Shared {
    fn body(&self) -> MutexGuard<'_, BodyState> {
        // A poisoned lock only means a reader panicked; the state itself stays sound.
        self.body.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// How a request body ends.
#[derive(Debug, Clone, PartialEq)]
enum Framing {
    /// This many bytes are left.
    Length(u64),
    Chunked(ChunkedDecoder),
}

#[derive(Default)]
struct BodyState {
    framing: Option<Framing>,
    /// Bytes read from the socket but not yet given out (the body's first bytes arrive
    /// with the head; a chunked body's reads may end past what a frame takes).
    pending: BytesMut,
    /// The rest of an interim `100 Continue` still to be written before reading.
    continue_left: &'static [u8],
    /// Advanced when a request is answered: a body whose generation differs (kept alive
    /// past its request) reads nothing more, neither its own rest nor the next body.
    generation: u64,
    /// Bytes of the body read from the socket so far, and whether the handler is waiting
    /// for more: only a body the handler waits on is held to the pace (a handler that
    /// has not started reading is not the client's fault).
    received: u64,
    starving: bool,
}

impl BodyState {
    /// Whether the body has been read to its end (a `Length` framing never stays at 0).
    fn complete(&self) -> bool {
        self.framing.is_none()
    }

    /// Consumes a body that arrived whole with the head but that the handler never read,
    /// so that the connection can carry the next request.
    fn settle(&mut self) {
        match &mut self.framing {
            Some(Framing::Length(left)) if self.pending.len() as u64 >= *left => {
                self.pending.advance(usize::try_from(*left).unwrap_or(usize::MAX));
                self.framing = None;
            }
            Some(Framing::Chunked(decoder)) => loop {
                match decoder.decode(&mut self.pending) {
                    Ok(Some(_)) => {}
                    Ok(None) if decoder.is_done() => {
                        self.framing = None;
                        break;
                    }
                    _ => break,
                }
            },
            _ => {}
        }
    }
}

/// How long a shed anonymous client is asked to wait.
const SHED_RETRY_MS: u64 = 5_000;

/// A request with no credentials: no `Authorization` header (a client's token or a
/// server's signature) and no `access_token` in the query. `/health` never counts, so a
/// load balancer's checks are not shed.
fn anonymous(parts: &http::request::Parts) -> bool {
    parts.uri.path() != "/health"
        && !parts.headers.contains_key(http::header::AUTHORIZATION)
        && !parts.uri.query().is_some_and(|q| q.split('&').any(|p| p.starts_with("access_token=")))
}

/// Serves HTTP/1.x requests on `tcp` until the client closes, asks to close, or `stop`
/// turns true while the connection is idle.
pub async fn serve(
    tcp: TcpStream,
    peer: SocketAddr,
    mut app: axum::Router,
    mut stop: watch::Receiver<bool>,
    admitted: Admitted,
) {
    let limits = admitted.limits();
    let shared = Arc::new(Shared {
        tcp,
        body: Mutex::new(BodyState::default()),
        body_read: tokio::sync::Notify::new(),
    });
    // Bytes read past the previous request (a pipelined next request).
    let mut carry = BytesMut::new();
    loop {
        // The steps that are not waiting on the handler are boxed while they run, so that
        // a connection's task only holds what waiting on a request needs.
        let head = tokio::select! {
            head = Box::pin(read_head(&shared.tcp, &mut carry)) => head,
            () = crate::plain::stopped(&mut stop) => return,
        };
        let head = match head {
            Ok(Some(head)) => head,
            Ok(None) => return,
            Err(HeadError::Io(e)) => {
                tracing::debug!(%peer, error = %e, "reading a request head failed");
                return;
            }
            Err(HeadError::Reject(status, why)) => {
                // Framing failures have HTTP statuses of their own (408, 431, 501) that
                // no Matrix error kind names: the status is set here, at the wire.
                let error = trellis_core::Error::new(
                    trellis_core::ErrorKind::BadRequest,
                    trellis_core::error::code::UNKNOWN,
                    why,
                );
                let mut answer = trellis_api::response::error_response(&error);
                *answer.status_mut() = status;
                let written =
                    write_response(&shared.tcp, answer, &Method::GET, Version::HTTP_11, false);
                if Box::pin(written).await.is_ok() {
                    // The client may still be sending what was refused.
                    Box::pin(linger(&shared.tcp)).await;
                }
                return;
            }
        };
        if limits.shedding_anonymous() && anonymous(&head.parts) {
            // Near the connection cap, requests nobody signed are the ones turned away,
            // and their connections closed, so that signed-in users keep a place.
            limits.metrics().refused("anonymous");
            let answer = trellis_api::response::error_response(
                &trellis_core::Error::limit_exceeded(SHED_RETRY_MS),
            );
            let written =
                write_response(&shared.tcp, answer, &head.parts.method, Version::HTTP_11, false);
            if Box::pin(written).await.is_ok() {
                Box::pin(linger(&shared.tcp)).await;
            }
            return;
        }
        if head.upgrade {
            Box::pin(upgrade(shared, head, carry, peer, app, stop)).await;
            return;
        }
        let Head { mut parts, framing, keep_alive, expect_continue, .. } = head;
        let method = parts.method.clone();
        let version = parts.version;
        let has_body = !matches!(framing, Framing::Length(0));
        let generation = {
            let mut body = shared.body();
            *body = BodyState {
                framing: has_body.then_some(framing.clone()),
                pending: std::mem::take(&mut carry),
                continue_left: if expect_continue && has_body { CONTINUE } else { b"" },
                generation: body.generation,
                received: 0,
                starving: false,
            };
            body.generation
        };
        let body = if has_body {
            let exact = match framing {
                Framing::Length(n) => Some(n),
                Framing::Chunked(_) => None,
            };
            axum::body::Body::new(RequestBody { shared: shared.clone(), exact, generation })
        } else {
            axum::body::Body::empty()
        };
        parts.extensions.insert(ConnectInfo(peer));
        let request = Request::from_parts(parts, body);
        let response = {
            let mut call = pin!(Service::call(&mut app, request));
            // Once the request's body is read (or if it has none) the socket is ours
            // while the request runs: a client that hangs up (a long-poll given up) ends
            // the request at once.
            let mut watch_hangup = !has_body;
            let mut body_pending = has_body;
            // The body's pace is checked once a window (see `BodyPace`).
            let mut pace_check = tokio::time::Instant::now() + limits.pace.window;
            let mut received_before = 0;
            loop {
                tokio::select! {
                    response = call.as_mut() => break response,
                    () = tokio::time::sleep_until(pace_check), if body_pending => {
                        let (received, starving) = {
                            let body = shared.body();
                            (body.received, body.starving && !body.complete())
                        };
                        if starving && received - received_before < limits.pace.min_bytes {
                            // Sending a body a byte at a time (or not at all) holds a
                            // connection and a handler for nothing.
                            tracing::info!(%peer, received, "request body too slow; connection cut");
                            limits.metrics().cut("slow_body");
                            return;
                        }
                        received_before = received;
                        pace_check += limits.pace.window;
                    }
                    () = shared.body_read.notified(), if body_pending => {
                        body_pending = false;
                        let body = shared.body();
                        // Bytes past the body are a pipelined request: not a hang-up.
                        watch_hangup = body.complete() && body.pending.is_empty();
                    }
                    gone = hung_up(&shared.tcp), if watch_hangup => {
                        if gone {
                            return;
                        }
                        // The next request arrived early; it waits its turn.
                        watch_hangup = false;
                    }
                }
            }
        };
        let Ok(response) = response;
        // Whatever of the body the handler left unread decides whether the connection can
        // carry another request.
        let body_done = {
            let mut body = shared.body();
            body.generation += 1;
            body.settle();
            let done = body.complete();
            if done {
                carry = std::mem::take(&mut body.pending);
            }
            done
        };
        let keep_alive = keep_alive && body_done && !asks_to_close(&response);
        match Box::pin(write_response(&shared.tcp, response, &method, version, keep_alive)).await {
            Ok(true) if keep_alive => {}
            Ok(_) if !body_done => {
                Box::pin(linger(&shared.tcp)).await;
                return;
            }
            Ok(_) => return,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "writing a response failed");
                return;
            }
        }
    }
}

const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// Whether a handler asked for the connection to close after its answer.
fn asks_to_close(response: &Response<axum::body::Body>) -> bool {
    has_token(response.headers(), header::CONNECTION, "close")
}

/// How much of an unwanted body is read and dropped after answering, and for how long.
const LINGER_BYTES: usize = 1024 * 1024;
const LINGER_FOR: Duration = Duration::from_secs(2);

/// Closes a connection whose client is still sending a body nobody read (an upload
/// refused early). Closing a socket with unread data resets the connection, and a reset
/// can reach the client before it has read the answer explaining the refusal; so the
/// sending side is shut first and what still arrives is read and dropped, for a while.
async fn linger(tcp: &TcpStream) {
    if socket2::SockRef::from(tcp).shutdown(std::net::Shutdown::Write).is_err() {
        return;
    }
    let mut sink = vec![0u8; 16 * 1024];
    let mut dropped = 0;
    let deadline = tokio::time::Instant::now() + LINGER_FOR;
    while dropped < LINGER_BYTES {
        match tokio::time::timeout_at(deadline, tcp.readable()).await {
            Ok(Ok(())) => {}
            _ => return,
        }
        match tcp.try_read(&mut sink) {
            Ok(0) => return,
            Ok(n) => dropped += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}

/// Completes with `true` once the client closed its side, with `false` once it sent
/// more bytes (a pipelined request), without taking any of them.
async fn hung_up(tcp: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    !matches!(tcp.peek(&mut byte).await, Ok(n) if n > 0)
}

/// A parsed request head.
struct Head {
    parts: http::request::Parts,
    framing: Framing,
    keep_alive: bool,
    expect_continue: bool,
    upgrade: bool,
    /// The raw head, kept only for an upgrade (hyper reads it again).
    raw: Option<Bytes>,
}

enum HeadError {
    Io(io::Error),
    Reject(StatusCode, &'static str),
}

impl From<io::Error> for HeadError {
    fn from(e: io::Error) -> Self {
        HeadError::Io(e)
    }
}

/// Reads and parses the next request head; `None` if the client closed between
/// requests. What follows the head stays in `carry`.
async fn read_head(tcp: &TcpStream, carry: &mut BytesMut) -> Result<Option<Head>, HeadError> {
    // Wait for the first byte without a buffer: an idle keep-alive connection holds none.
    // A peek, not `readable()`: readiness left over from the previous request would
    // report data that is not there (and start the head's clock on an idle connection).
    if carry.is_empty() && tcp.peek(&mut [0u8; 1]).await? == 0 {
        return Ok(None);
    }
    let mut buf = std::mem::take(carry);
    let read = async {
        loop {
            if !buf.is_empty() {
                match parse_head(&buf)? {
                    Some((mut head, len)) => {
                        let rest = buf.split_off(len);
                        if head.upgrade {
                            head.raw = Some(buf.freeze());
                        }
                        // The body's first bytes or the next request: usually nothing, in
                        // which case no allocation stays behind.
                        *carry = if rest.is_empty() { BytesMut::new() } else { rest };
                        return Ok(Some(head));
                    }
                    None if buf.len() >= MAX_HEAD => {
                        return Err(HeadError::Reject(
                            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                            "Request head too large",
                        ));
                    }
                    None => {}
                }
            }
            // A head's buffer doubles as it fills, from a first read most heads fit in.
            let grow = buf.capacity().max(FIRST_READ);
            match std::future::poll_fn(|cx| poll_read(tcp, cx, &mut buf, grow)).await {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && buf.is_empty() => {
                    return Ok(None);
                }
                Err(e) => return Err(e.into()),
            }
        }
    };
    match tokio::time::timeout(HEAD_WITHIN, read).await {
        Ok(result) => result,
        Err(_) => Err(HeadError::Reject(StatusCode::REQUEST_TIMEOUT, "Request head too slow")),
    }
}

/// Parses a request head from `buf` and says how many bytes it took, or `None` if it is
/// incomplete (a plain function: the header array lives on the stack, not in the
/// connection's future).
fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize)>, HeadError> {
    const BAD: HeadError = HeadError::Reject(StatusCode::BAD_REQUEST, "Malformed request");
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut fields);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HeadError::Reject(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "Too many header fields",
            ));
        }
        Err(_) => return Err(BAD),
    };
    let method = Method::from_bytes(req.method.unwrap_or_default().as_bytes()).map_err(|_| BAD)?;
    let uri = http::Uri::try_from(req.path.unwrap_or_default()).map_err(|_| BAD)?;
    let version = match req.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let mut headers = HeaderMap::with_capacity(req.headers.len());
    for field in req.headers.iter() {
        let name = header::HeaderName::from_bytes(field.name.as_bytes()).map_err(|_| BAD)?;
        let value = HeaderValue::from_bytes(field.value).map_err(|_| BAD)?;
        headers.append(name, value);
    }
    if version == Version::HTTP_10 && headers.contains_key(header::TRANSFER_ENCODING) {
        // HTTP/1.0 has no transfer codings (RFC 9112 section 6.1): faulty framing.
        return Err(BAD);
    }
    let framing = framing(&headers)?;
    let keep_alive = match version {
        Version::HTTP_10 => has_token(&headers, header::CONNECTION, "keep-alive"),
        _ => !has_token(&headers, header::CONNECTION, "close"),
    };
    let expect_continue = version == Version::HTTP_11
        && headers
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let upgrade =
        headers.contains_key(header::UPGRADE) && has_token(&headers, header::CONNECTION, "upgrade");
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() = headers;
    let (parts, ()) = request.into_parts();
    let head = Head { parts, framing, keep_alive, expect_continue, upgrade, raw: None };
    Ok(Some((head, len)))
}

/// How the request's body is delimited (RFC 9112 section 6.3). A request carrying both
/// `Transfer-Encoding` and `Content-Length`, or lengths that disagree, is refused: such
/// requests are how requests get smuggled past proxies.
fn framing(headers: &HeaderMap) -> Result<Framing, HeadError> {
    const BAD: HeadError = HeadError::Reject(StatusCode::BAD_REQUEST, "Bad body framing");
    if headers.contains_key(header::TRANSFER_ENCODING) {
        if headers.contains_key(header::CONTENT_LENGTH) {
            return Err(BAD);
        }
        let codings: Vec<&[u8]> = headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|c| !c.is_empty())
            .collect();
        return match codings.as_slice() {
            [only] if only.eq_ignore_ascii_case(b"chunked") => {
                Ok(Framing::Chunked(ChunkedDecoder::default()))
            }
            _ => Err(HeadError::Reject(
                StatusCode::NOT_IMPLEMENTED,
                "Only the chunked transfer coding is supported",
            )),
        };
    }
    let mut length = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        for part in value.as_bytes().split(|b| *b == b',') {
            let part = part.trim_ascii();
            if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
                return Err(BAD);
            }
            let n: u64 = std::str::from_utf8(part).ok().and_then(|s| s.parse().ok()).ok_or(BAD)?;
            if length.is_some_and(|l| l != n) {
                return Err(BAD);
            }
            length = Some(n);
        }
    }
    Ok(Framing::Length(length.unwrap_or(0)))
}

/// Whether a comma-separated header (such as `Connection`) lists `token`.
fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.as_bytes()
            .split(|b| *b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    })
}

/// The body of the request being served, read from the socket as it is polled.
struct RequestBody {
    shared: Arc<Shared>,
    exact: Option<u64>,
    generation: u64,
}

impl http_body::Body for RequestBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let shared = &self.shared;
        let mut state = shared.body();
        if state.generation != self.generation {
            return Poll::Ready(Some(Err(io::Error::other("the request has been answered"))));
        }
        // The client waits for this before it sends the body.
        while !state.continue_left.is_empty() {
            ready!(shared.tcp.poll_write_ready(cx))?;
            match shared.tcp.try_write(state.continue_left) {
                Ok(n) => state.continue_left = &state.continue_left[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Some(Err(e))),
            }
        }
        loop {
            let state = &mut *state;
            let Some(framing) = &mut state.framing else { return Poll::Ready(None) };
            match framing {
                Framing::Length(left) => {
                    if !state.pending.is_empty() {
                        let take = usize::try_from(*left).unwrap_or(usize::MAX);
                        let data = state.pending.split_to(take.min(state.pending.len()));
                        *left -= data.len() as u64;
                        if *left == 0 {
                            state.framing = None;
                            shared.body_read.notify_one();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data.freeze()))));
                    }
                    let want = usize::try_from(*left).unwrap_or(usize::MAX).min(BODY_READ);
                    if let Err(stop) = read_more(&shared.tcp, cx, state, want) {
                        return stop.into_poll();
                    }
                }
                Framing::Chunked(decoder) => {
                    if !state.pending.is_empty() {
                        match decoder.decode(&mut state.pending) {
                            Ok(Some(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                            Ok(None) if decoder.is_done() => {
                                state.framing = None;
                                shared.body_read.notify_one();
                                return Poll::Ready(None);
                            }
                            Ok(None) => {}
                            Err(e) => return Poll::Ready(Some(Err(e))),
                        }
                    }
                    if let Err(stop) = read_more(&shared.tcp, cx, state, BODY_READ) {
                        return stop.into_poll();
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.shared.body().complete()
    }

    fn size_hint(&self) -> SizeHint {
        match self.exact {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

/// Reads at most `max` more bytes of the body into its pending bytes, keeping count of
/// what arrived and whether the handler now waits on the client.
fn read_more(
    tcp: &TcpStream,
    cx: &mut Context<'_>,
    state: &mut BodyState,
    max: usize,
) -> Result<(), ReadStop> {
    let before = state.pending.len();
    match poll_read(tcp, cx, &mut state.pending, max) {
        Poll::Pending => {
            state.starving = true;
            Err(ReadStop::Pending)
        }
        Poll::Ready(Err(e)) => Err(ReadStop::Failed(e)),
        Poll::Ready(Ok(())) => {
            state.starving = false;
            state.received += (state.pending.len() - before) as u64;
            Ok(())
        }
    }
}

/// Why [`read_more`] read nothing.
enum ReadStop {
    Pending,
    Failed(io::Error),
}

impl ReadStop {
    fn into_poll<T>(self) -> Poll<Option<Result<T, io::Error>>> {
        match self {
            Self::Pending => Poll::Pending,
            Self::Failed(e) => Poll::Ready(Some(Err(e))),
        }
    }
}

/// Reads at most `max` more bytes into `buf`; the end of the stream is an error (the
/// body was cut short). Reads go into what is left of `buf`'s block, a new block only
/// when little is: the frames handed out share the block, so a fresh block per read
/// would keep a whole block alive for every small read a handler collects.
fn poll_read(
    tcp: &TcpStream,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
    max: usize,
) -> Poll<io::Result<()>> {
    if buf.capacity() - buf.len() < READ_AT_LEAST {
        buf.reserve(max.clamp(READ_AT_LEAST, BODY_READ));
    }
    loop {
        ready!(tcp.poll_read_ready(cx))?;
        let start = buf.len();
        let spare = (buf.capacity() - start).min(max);
        let chunk = &mut buf.spare_capacity_mut()[..spare];
        let mut read = ReadBuf::uninit(chunk);
        match tcp.try_read(read.initialize_unfilled()) {
            Ok(0) => return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => {
                // SAFETY: `try_read` initialised and filled these `n` bytes of spare capacity.
                unsafe { buf.set_len(start + n) };
                return Poll::Ready(Ok(()));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
}

/// Writes the response; `Ok(false)` if the connection must close after it (the body's
/// end is marked by closing).
async fn write_response(
    tcp: &TcpStream,
    response: Response<axum::body::Body>,
    method: &Method,
    version: Version,
    keep_alive: bool,
) -> io::Result<bool> {
    let (mut parts, body) = response.into_parts();
    // Framing and the connection's fate are decided here, whatever a handler set.
    parts.headers.remove(header::TRANSFER_ENCODING);
    parts.headers.remove(header::CONNECTION);
    let status = parts.status;
    let bodiless = *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let mut body = pin!(body);
    let known = parts.headers.contains_key(header::CONTENT_LENGTH);
    let exact = body.size_hint().exact();
    // An HTTP/1.0 client knows no chunks: a body of unknown length ends with the
    // connection.
    let chunked = !bodiless && !known && exact.is_none() && version == Version::HTTP_11;
    let keep_alive = keep_alive && (bodiless || known || exact.is_some() || chunked);
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(if version == Version::HTTP_10 { b"HTTP/1.0 " } else { b"HTTP/1.1 " });
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    // axum sets the length of bodies it knows; this covers the rest.
    if !known
        && !bodiless
        && let Some(n) = exact
    {
        out.extend_from_slice(format!("content-length: {n}\r\n").as_bytes());
    }
    if chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if !parts.headers.contains_key(header::DATE) {
        out.extend_from_slice(b"date: ");
        date::append(&mut out);
        out.extend_from_slice(b"\r\n");
    }
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    } else if version == Version::HTTP_10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if bodiless {
        write_all(tcp, &out).await?;
        return Ok(keep_alive);
    }
    loop {
        let frame = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await;
        let data = match frame {
            None => break,
            Some(Err(e)) => {
                // Half a response cannot be taken back: the connection ends here.
                write_all(tcp, &out).await?;
                return Err(io::Error::other(e));
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                Err(_) => continue, // trailers: not sent over HTTP/1
            },
        };
        if data.is_empty() {
            continue;
        }
        if chunked {
            out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
        }
        if data.len() <= COALESCE {
            out.extend_from_slice(&data);
        } else {
            write_all(tcp, &out).await?;
            out.clear();
            write_all(tcp, &data).await?;
        }
        if chunked {
            out.extend_from_slice(b"\r\n");
        }
        if out.len() > COALESCE {
            write_all(tcp, &out).await?;
            out.clear();
        }
    }
    if chunked {
        out.extend_from_slice(b"0\r\n\r\n");
    }
    write_all(tcp, &out).await?;
    Ok(keep_alive)
}

async fn write_all(tcp: &TcpStream, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        tcp.writable().await?;
        match tcp.try_write(buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Hands a connection whose request asks to upgrade it to hyper, replaying what was read.
async fn upgrade(
    shared: Arc<Shared>,
    head: Head,
    carry: BytesMut,
    peer: SocketAddr,
    app: axum::Router,
    stop: watch::Receiver<bool>,
) {
    // Bodies of earlier requests were dropped with their requests.
    let Ok(shared) = Arc::try_unwrap(shared) else { return };
    let mut replay = BytesMut::from(head.raw.unwrap_or_default().as_ref());
    replay.extend_from_slice(&carry);
    let io = Replay { read: replay.freeze(), tcp: shared.tcp };
    crate::plain::serve_hyper_http1(io, peer, app, stop).await;
}

/// A socket that first yields bytes read from it earlier.
pub struct Replay {
    read: Bytes,
    tcp: TcpStream,
}

impl tokio::io::AsyncRead for Replay {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.read.is_empty() {
            let n = self.read.len().min(buf.remaining());
            buf.put_slice(&self.read[..n]);
            self.read.advance(n);
            if self.read.is_empty() {
                // The replayed bytes' block is not kept for the socket's life.
                self.read = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Replay {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// The `Date` header's value, formatted once per second.
mod date {
    use std::{cell::RefCell, time::SystemTime};

    thread_local! {
        static CACHED: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
    }

    pub fn append(out: &mut Vec<u8>) {
        let now = SystemTime::now();
        let secs = now.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        CACHED.with(|cached| {
            let mut cached = cached.borrow_mut();
            if cached.0 != secs || cached.1.is_empty() {
                *cached = (secs, httpdate::fmt_http_date(now));
            }
            out.extend_from_slice(cached.1.as_bytes());
        })
    }
}

#[cfg(test)]
mod tests;
