//! The TURN server over real sockets on loopback: the `turn` crate's own client for UDP,
//! hand-built STUN messages where the test needs to see the wire (TCP, refusals).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use stun::agent::TransactionId;
use stun::attributes::{ATTR_MESSAGE_INTEGRITY, ATTR_NONCE, ATTR_REALM, ATTR_USERNAME};
use stun::error_code::ErrorCodeAttribute;
use stun::fingerprint::FINGERPRINT;
use stun::integrity::MessageIntegrity;
use stun::message::{
    BINDING_REQUEST, CLASS_ERROR_RESPONSE, CLASS_INDICATION, CLASS_REQUEST, CLASS_SUCCESS_RESPONSE,
    Getter, METHOD_ALLOCATE, METHOD_CHANNEL_BIND, METHOD_CREATE_PERMISSION, METHOD_REFRESH,
    METHOD_SEND, Message, MessageType, Setter,
};
use stun::textattrs::TextAttribute;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};
use tokio::sync::Notify;
use tokio::time::timeout;
use trellis_rtc::turn::{RefusalReason, TurnObserver, TurnServer, TurnSettings, rest_credentials};
use turn::client::{Client, ClientConfig};
use turn::proto::PROTO_UDP;
use turn::proto::chandata::ChannelData;
use turn::proto::channum::ChannelNumber;
use turn::proto::data::Data;
use turn::proto::lifetime::Lifetime;
use turn::proto::peeraddr::PeerAddress;
use turn::proto::relayaddr::RelayedAddress;
use turn::proto::reqtrans::RequestedTransport;
use webrtc_util::Conn;

const SECRET: &str = "s3cret";
const REALM: &str = "example.org";
/// Only a bound on how long a broken server can hang a test, never a measurement.
const PATIENCE: Duration = Duration::from_secs(5);
const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

#[derive(Default)]
struct Counts {
    opened: AtomicU64,
    closed: AtomicU64,
    relayed_datagrams: AtomicU64,
    relayed_bytes: AtomicU64,
    refused: Mutex<HashMap<RefusalReason, u64>>,
    changed: Notify,
}

impl TurnObserver for Counts {
    fn allocation_opened(&self, _user: &str) {
        self.opened.fetch_add(1, Ordering::SeqCst);
        self.changed.notify_waiters();
    }
    fn allocation_closed(&self, _user: &str) {
        self.closed.fetch_add(1, Ordering::SeqCst);
        self.changed.notify_waiters();
    }
    fn relayed(&self, bytes: u64) {
        self.relayed_datagrams.fetch_add(1, Ordering::SeqCst);
        self.relayed_bytes.fetch_add(bytes, Ordering::SeqCst);
        self.changed.notify_waiters();
    }
    fn refused(&self, reason: RefusalReason) {
        *self.refused.lock().unwrap().entry(reason).or_default() += 1;
        self.changed.notify_waiters();
    }
}

impl Counts {
    fn opened(&self) -> u64 {
        self.opened.load(Ordering::SeqCst)
    }
    fn closed(&self) -> u64 {
        self.closed.load(Ordering::SeqCst)
    }
    fn refused(&self, reason: RefusalReason) -> u64 {
        self.refused.lock().unwrap().get(&reason).copied().unwrap_or(0)
    }

    async fn wait_until(&self, what: &str, done: impl Fn(&Counts) -> bool) {
        let waited = timeout(PATIENCE, async {
            loop {
                let changed = self.changed.notified();
                if done(self) {
                    return;
                }
                changed.await;
            }
        })
        .await;
        assert!(waited.is_ok(), "never saw {what}");
    }
}

fn settings() -> TurnSettings {
    TurnSettings {
        listen_udp: SocketAddr::new(LOOPBACK, 0),
        listen_tcp: Some(SocketAddr::new(LOOPBACK, 0)),
        relay_ip: LOOPBACK,
        relay_bind_ip: LOOPBACK,
        relay_min_port: 20000,
        relay_max_port: 60000,
        realm: REALM.into(),
        shared_secret: SECRET.into(),
        max_allocations_per_user: 0,
        user_bandwidth_bytes_per_sec: 0,
        allowed_peers: Vec::new(),
        deny_private_peers: true,
    }
}

/// Test peers live on loopback, which the default policy refuses.
fn loopback_allowed() -> TurnSettings {
    TurnSettings { allowed_peers: vec!["127.0.0.0/8".parse().unwrap()], ..settings() }
}

async fn start(settings: TurnSettings) -> (TurnServer, Arc<Counts>) {
    let counts = Arc::new(Counts::default());
    let server = TurnServer::start(settings, counts.clone()).await.unwrap();
    (server, counts)
}

fn credentials(user: &str) -> (String, String) {
    rest_credentials(SECRET, user, Duration::from_secs(3600))
}

async fn client(server: SocketAddr, username: &str, password: &str) -> Client {
    let conn = Arc::new(UdpSocket::bind((LOOPBACK, 0)).await.unwrap());
    let client = Client::new(ClientConfig {
        stun_serv_addr: String::new(),
        turn_serv_addr: server.to_string(),
        username: username.into(),
        password: password.into(),
        realm: String::new(),
        software: String::new(),
        rto_in_ms: 0,
        conn,
        vnet: None,
    })
    .await
    .unwrap();
    client.listen().await.unwrap();
    client
}

async fn allocate(client: &Client) -> Result<impl Conn, String> {
    timeout(PATIENCE, client.allocate())
        .await
        .expect("allocate never answered")
        .map_err(|err| err.to_string())
}

async fn recv(socket: &UdpSocket) -> (Vec<u8>, SocketAddr) {
    let mut buf = vec![0; 2048];
    let (n, from) =
        timeout(PATIENCE, socket.recv_from(&mut buf)).await.expect("no datagram arrived").unwrap();
    buf.truncate(n);
    (buf, from)
}

/// Shows that nothing reached `peer` before now: a datagram sent to it now from
/// elsewhere must be the first it reads.
async fn assert_nothing_arrived(peer: &UdpSocket) {
    let sentinel = UdpSocket::bind((LOOPBACK, 0)).await.unwrap();
    sentinel.send_to(b"sentinel", peer.local_addr().unwrap()).await.unwrap();
    let (data, from) = recv(peer).await;
    assert_eq!(
        from,
        sentinel.local_addr().unwrap(),
        "something else reached the peer first: {data:?}"
    );
    assert_eq!(data, b"sentinel");
}

#[tokio::test]
async fn relays_both_ways_with_good_credentials() {
    let (server, counts) = start(loopback_allowed()).await;
    let (username, password) = credentials("@alice:example.org");
    let client = client(server.udp_addr(), &username, &password).await;
    let relay = allocate(&client).await.unwrap();
    let relay_addr = relay.local_addr().unwrap();
    assert_eq!(relay_addr.ip(), LOOPBACK);
    assert_eq!(counts.opened(), 1);

    let peer = UdpSocket::bind((LOOPBACK, 0)).await.unwrap();
    let peer_addr = peer.local_addr().unwrap();
    relay.send_to(b"ping", peer_addr).await.unwrap();
    let (data, from) = recv(&peer).await;
    assert_eq!(data, b"ping");
    assert_eq!(from, relay_addr);

    peer.send_to(b"pong!", from).await.unwrap();
    let mut buf = vec![0; 1500];
    let (n, from) = timeout(PATIENCE, relay.recv_from(&mut buf))
        .await
        .expect("relayed datagram never arrived")
        .unwrap();
    assert_eq!(&buf[..n], b"pong!");
    assert_eq!(from, peer_addr);

    assert_eq!(counts.relayed_datagrams.load(Ordering::SeqCst), 2);
    assert_eq!(counts.relayed_bytes.load(Ordering::SeqCst), 9);
    for reason in
        [RefusalReason::Auth, RefusalReason::Quota, RefusalReason::Peer, RefusalReason::Bandwidth]
    {
        assert_eq!(counts.refused(reason), 0, "{reason:?}");
    }
    client.close().await.unwrap();
    server.close().await;
}

#[tokio::test]
async fn wrong_password_is_refused() {
    let (server, counts) = start(loopback_allowed()).await;
    let (username, _) = credentials("@alice:example.org");
    let client = client(server.udp_addr(), &username, "not the password").await;
    let err = allocate(&client).await.err().expect("allocation with a wrong password");
    assert!(err.contains("401"), "{err}");
    assert_eq!(counts.refused(RefusalReason::Auth), 1);
    assert_eq!(counts.opened(), 0);
    client.close().await.unwrap();
    server.close().await;
}

fn rest_password(username: &str) -> String {
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(username.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

#[tokio::test]
async fn expired_username_is_refused() {
    let (server, counts) = start(loopback_allowed()).await;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let username = format!("{}:@bob:example.org", now - 60);
    let client = client(server.udp_addr(), &username, &rest_password(&username)).await;
    let err = allocate(&client).await.err().expect("allocation with an expired username");
    assert!(err.contains("401"), "{err}");
    assert_eq!(counts.refused(RefusalReason::Auth), 1);
    assert_eq!(counts.opened(), 0);
    client.close().await.unwrap();
    server.close().await;
}

#[test]
fn rest_credentials_sign_the_expiring_username() {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let (username, password) =
        rest_credentials(SECRET, "@alice:example.org", Duration::from_secs(600));
    let (expiry, user) = username.split_once(':').unwrap();
    assert_eq!(user, "@alice:example.org");
    let expiry: u64 = expiry.parse().unwrap();
    assert!((now + 600..now + 602).contains(&expiry), "{expiry} vs {now}");
    assert_eq!(password, rest_password(&username));
    // python3: base64.b64encode(hmac.new(b"s3cret",
    //     b"1700000000:@alice:example.org", hashlib.sha1).digest())
    assert_eq!(rest_password("1700000000:@alice:example.org"), "oKcYiX5WLXOJY95WjqLUBOVFmFk=");
}

#[tokio::test]
async fn allocation_quota_is_per_user_and_frees_on_close() {
    let (server, counts) =
        start(TurnSettings { max_allocations_per_user: 2, ..loopback_allowed() }).await;
    let (username, password) = credentials("@carol:example.org");
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(client(server.udp_addr(), &username, &password).await);
    }
    let first = allocate(&clients[0]).await.unwrap();
    let _second = allocate(&clients[1]).await.unwrap();
    let err = allocate(&clients[2]).await.err().expect("a third allocation");
    assert!(err.contains("486"), "{err}");
    assert_eq!(counts.refused(RefusalReason::Quota), 1);

    // Someone else is not held to carol's quota.
    let (other_user, other_password) = credentials("@dave:example.org");
    let other = client(server.udp_addr(), &other_user, &other_password).await;
    let _others = allocate(&other).await.unwrap();

    // Closing refreshes with lifetime 0.
    first.close().await.unwrap();
    counts.wait_until("the first allocation close", |c| c.closed() == 1).await;
    let _fourth = allocate(&clients[3]).await.unwrap();
    assert_eq!(counts.opened(), 4);
    assert_eq!(counts.refused(RefusalReason::Quota), 1);

    for client in clients.iter().chain([&other]) {
        client.close().await.unwrap();
    }
    server.close().await;
}

#[tokio::test]
async fn bandwidth_beyond_the_users_bucket_is_dropped() {
    // One byte a second: the bucket starts with a single datagram's worth and will not
    // refill enough during the test for another.
    let (server, counts) =
        start(TurnSettings { user_bandwidth_bytes_per_sec: 1, ..loopback_allowed() }).await;
    let (username, password) = credentials("@erin:example.org");
    let client = client(server.udp_addr(), &username, &password).await;
    let relay = allocate(&client).await.unwrap();
    let peer = UdpSocket::bind((LOOPBACK, 0)).await.unwrap();
    let peer_addr = peer.local_addr().unwrap();

    relay.send_to(&[1; 1000], peer_addr).await.unwrap();
    let (data, _) = recv(&peer).await;
    assert_eq!(data, [1; 1000]);
    relay.send_to(&[2; 1000], peer_addr).await.unwrap();
    // The server handles one client's datagrams in order, so once this is answered the
    // second datagram has been dealt with.
    timeout(PATIENCE, client.send_binding_request_to(&server.udp_addr().to_string()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(counts.refused(RefusalReason::Bandwidth), 1);
    assert_eq!(counts.relayed_bytes.load(Ordering::SeqCst), 1000);
    assert_nothing_arrived(&peer).await;
    client.close().await.unwrap();
    server.close().await;
}

/// A client transport the test drives message by message.
enum Wire {
    Udp(UdpSocket, SocketAddr),
    Tcp(TcpStream),
}

impl Wire {
    async fn send(&mut self, raw: &[u8]) {
        match self {
            Wire::Udp(socket, server) => {
                socket.send_to(raw, *server).await.unwrap();
            }
            Wire::Tcp(stream) => stream.write_all(raw).await.unwrap(),
        }
    }

    /// One datagram or one TCP frame, ChannelData padding checked and removed.
    async fn recv(&mut self) -> Vec<u8> {
        timeout(PATIENCE, async {
            match self {
                Wire::Udp(socket, _) => {
                    let mut buf = vec![0; 2048];
                    let n = socket.recv(&mut buf).await.unwrap();
                    buf.truncate(n);
                    buf
                }
                Wire::Tcp(stream) => {
                    let mut head = [0u8; 4];
                    stream.read_exact(&mut head).await.unwrap();
                    let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
                    let (body, padding) = if (0x40..=0x7f).contains(&head[0]) {
                        (len, len.div_ceil(4) * 4 - len)
                    } else {
                        (16 + len, 0)
                    };
                    let mut rest = vec![0; body + padding];
                    stream.read_exact(&mut rest).await.unwrap();
                    assert!(rest[body..].iter().all(|b| *b == 0), "bad padding");
                    rest.truncate(body);
                    [&head[..], &rest].concat()
                }
            }
        })
        .await
        .expect("no answer from the server")
    }

    async fn transact(&mut self, request: &Message) -> Message {
        self.send(&request.raw).await;
        loop {
            let raw = self.recv().await;
            let mut m = Message { raw, ..Default::default() };
            if m.decode().is_ok() && m.transaction_id == request.transaction_id {
                return m;
            }
        }
    }
}

fn build(setters: Vec<Box<dyn Setter>>) -> Message {
    let mut m = Message::new();
    m.build(&setters).unwrap();
    m
}

fn error_code(m: &Message) -> u16 {
    let mut code = ErrorCodeAttribute::default();
    code.get_from(m).unwrap();
    code.code.0
}

struct Session {
    username: String,
    realm: String,
    nonce: String,
    integrity: MessageIntegrity,
    relayed: SocketAddr,
}

impl Session {
    /// An authenticated request: the given attributes, then credentials.
    fn request(&self, typ: MessageType, mut attrs: Vec<Box<dyn Setter>>) -> Message {
        let mut setters: Vec<Box<dyn Setter>> = vec![Box::new(TransactionId::new()), Box::new(typ)];
        setters.append(&mut attrs);
        setters.push(Box::new(TextAttribute::new(ATTR_USERNAME, self.username.clone())));
        setters.push(Box::new(TextAttribute::new(ATTR_REALM, self.realm.clone())));
        setters.push(Box::new(TextAttribute::new(ATTR_NONCE, self.nonce.clone())));
        setters.push(Box::new(self.integrity.clone()));
        setters.push(Box::new(FINGERPRINT));
        build(setters)
    }
}

fn allocate_request() -> Message {
    build(vec![
        Box::new(TransactionId::new()),
        Box::new(MessageType::new(METHOD_ALLOCATE, CLASS_REQUEST)),
        Box::new(RequestedTransport { protocol: PROTO_UDP }),
        Box::new(FINGERPRINT),
    ])
}

fn text(m: &Message, attr: stun::attributes::AttrType) -> String {
    TextAttribute::get_from_as(m, attr).unwrap().text
}

/// The realm and nonce of a 401 or 438 (with the given code), checked to be the shape
/// the crate sends: no MESSAGE-INTEGRITY, FINGERPRINT because the requests have one.
fn challenge_of(response: &Message, code: u16) -> (String, String) {
    assert_eq!(response.typ.class, CLASS_ERROR_RESPONSE, "{response}");
    assert_eq!(error_code(response), code, "{response}");
    assert!(!response.contains(ATTR_MESSAGE_INTEGRITY));
    FINGERPRINT.check(response).unwrap();
    let realm = text(response, ATTR_REALM);
    let nonce = text(response, ATTR_NONCE);
    assert_eq!(realm, REALM);
    assert!(!nonce.is_empty());
    (realm, nonce)
}

/// An anonymous Allocate, for the challenge.
async fn challenge(wire: &mut Wire) -> (String, String) {
    challenge_of(&wire.transact(&allocate_request()).await, 401)
}

fn session(user: &str, password: Option<&str>, realm: &str, nonce: &str) -> Session {
    let (username, right_password) = credentials(user);
    Session {
        integrity: MessageIntegrity::new_long_term_integrity(
            username.clone(),
            realm.into(),
            password.map_or(right_password, str::to_owned),
        ),
        username,
        realm: realm.into(),
        nonce: nonce.into(),
        relayed: SocketAddr::new(LOOPBACK, 0),
    }
}

/// The long-term credential dance: an anonymous Allocate for the challenge, then the
/// authenticated one.
async fn allocate_on(wire: &mut Wire, user: &str) -> Session {
    let (realm, nonce) = challenge(wire).await;
    let mut session = session(user, None, &realm, &nonce);
    let request = session.request(
        MessageType::new(METHOD_ALLOCATE, CLASS_REQUEST),
        vec![Box::new(RequestedTransport { protocol: PROTO_UDP })],
    );
    let response = wire.transact(&request).await;
    assert_eq!(response.typ.class, CLASS_SUCCESS_RESPONSE, "{response}");
    let mut relayed = RelayedAddress::default();
    relayed.get_from(&response).unwrap();
    session.relayed = SocketAddr::new(relayed.ip, relayed.port);
    session
}

fn peer_address(addr: SocketAddr) -> Box<PeerAddress> {
    Box::new(PeerAddress { ip: addr.ip(), port: addr.port() })
}

#[tokio::test]
async fn default_policy_refuses_loopback_peers() {
    let (server, counts) = start(settings()).await;
    let socket = UdpSocket::bind((LOOPBACK, 0)).await.unwrap();
    let mut wire = Wire::Udp(socket, server.udp_addr());
    let session = allocate_on(&mut wire, "@mallory:example.org").await;
    let peer = UdpSocket::bind((LOOPBACK, 0)).await.unwrap();
    let peer_addr = peer.local_addr().unwrap();

    for method in [METHOD_CREATE_PERMISSION, METHOD_CHANNEL_BIND] {
        let mut attrs: Vec<Box<dyn Setter>> = vec![peer_address(peer_addr)];
        if method == METHOD_CHANNEL_BIND {
            attrs.push(Box::new(ChannelNumber(0x4000)));
        }
        let request = session.request(MessageType::new(method, CLASS_REQUEST), attrs);
        let mut response = wire.transact(&request).await;
        assert_eq!(response.typ, MessageType::new(method, CLASS_ERROR_RESPONSE));
        assert_eq!(error_code(&response), 403);
        session.integrity.check(&mut response).expect("403 signed with the user's key");
        FINGERPRINT.check(&response).unwrap();
    }
    assert_eq!(counts.refused(RefusalReason::Peer), 2);

    let send = build(vec![
        Box::new(TransactionId::new()),
        Box::new(MessageType::new(METHOD_SEND, CLASS_INDICATION)),
        peer_address(peer_addr),
        Box::new(Data(b"let me in".to_vec())),
        Box::new(FINGERPRINT),
    ]);
    wire.send(&send.raw).await;
    // Requests from one client are handled in order: once this is answered, the
    // indication has been dealt with.
    let binding = build(vec![Box::new(TransactionId::new()), Box::new(BINDING_REQUEST)]);
    let answer = wire.transact(&binding).await;
    assert_eq!(answer.typ.class, CLASS_SUCCESS_RESPONSE);
    assert_eq!(counts.refused(RefusalReason::Peer), 3);
    assert_nothing_arrived(&peer).await;
    assert_eq!(counts.relayed_datagrams.load(Ordering::SeqCst), 0);
    server.close().await;
}

fn channel_data(number: u16, data: &[u8]) -> Vec<u8> {
    let mut c = ChannelData { data: data.to_vec(), number: ChannelNumber(number), raw: Vec::new() };
    c.encode();
    c.raw
}

#[tokio::test]
async fn tcp_allocates_relays_channel_data_and_ends_with_the_connection() {
    let (server, counts) = start(loopback_allowed()).await;
    let tcp_addr = server.tcp_addr().expect("TCP is on");
    let mut wire = Wire::Tcp(TcpStream::connect(tcp_addr).await.unwrap());
    let session = allocate_on(&mut wire, "@frank:example.org").await;
    assert_eq!(session.relayed.ip(), LOOPBACK);
    assert_eq!(counts.opened(), 1);

    let peer = UdpSocket::bind((LOOPBACK, 0)).await.unwrap();
    let peer_addr = peer.local_addr().unwrap();
    let bind = session.request(
        MessageType::new(METHOD_CHANNEL_BIND, CLASS_REQUEST),
        vec![peer_address(peer_addr), Box::new(ChannelNumber(0x4000))],
    );
    let bound = wire.transact(&bind).await;
    assert_eq!(bound.typ.class, CLASS_SUCCESS_RESPONSE, "{bound}");

    // Five bytes of data travel padded to eight; the peer sees the five.
    wire.send(&channel_data(0x4000, b"hello")).await;
    let (data, from) = recv(&peer).await;
    assert_eq!(data, b"hello");
    assert_eq!(from, session.relayed);

    peer.send_to(b"abc", from).await.unwrap();
    let frame = wire.recv().await;
    assert_eq!(frame, [&[0x40, 0x00, 0x00, 0x03][..], b"abc"].concat());
    // The next frame starts where the padding ends.
    peer.send_to(b"defgh", from).await.unwrap();
    let frame = wire.recv().await;
    assert_eq!(frame, [&[0x40, 0x00, 0x00, 0x05][..], b"defgh"].concat());

    drop(wire);
    counts.wait_until("the allocation of the closed connection to end", |c| c.closed() == 1).await;
    server.close().await;
}

#[tokio::test]
async fn tcp_connections_sending_garbage_are_closed() {
    let (server, _counts) = start(settings()).await;
    let mut stream = TcpStream::connect(server.tcp_addr().unwrap()).await.unwrap();
    stream
        .write_all(&[
            0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03, 0, 0, 0, 0, 0, 0, 0,
            0, 0,
        ])
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let read = timeout(PATIENCE, stream.read(&mut buf)).await.expect("connection left open");
    // Closed either cleanly or by reset, with nothing said.
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    server.close().await;
}

#[tokio::test]
async fn bad_settings_are_refused() {
    let counts = Arc::new(Counts::default());
    for bad in [
        TurnSettings { relay_min_port: 0, ..settings() },
        TurnSettings { relay_min_port: 5000, relay_max_port: 4000, ..settings() },
        TurnSettings { shared_secret: String::new(), ..settings() },
    ] {
        assert!(TurnServer::start(bad, counts.clone()).await.is_err());
    }
}

fn signed_allocate(session: &Session) -> Message {
    session.request(
        MessageType::new(METHOD_ALLOCATE, CLASS_REQUEST),
        vec![Box::new(RequestedTransport { protocol: PROTO_UDP })],
    )
}

#[tokio::test]
async fn every_challenge_carries_the_same_nonce() {
    let (server, counts) = start(loopback_allowed()).await;
    let mut nonces = Vec::new();
    for i in 0..64 {
        let socket = UdpSocket::bind((LOOPBACK, 0)).await.unwrap();
        let mut wire = Wire::Udp(socket, server.udp_addr());
        let method = if i % 2 == 0 { METHOD_ALLOCATE } else { METHOD_REFRESH };
        let request = build(vec![
            Box::new(TransactionId::new()),
            Box::new(MessageType::new(method, CLASS_REQUEST)),
            Box::new(FINGERPRINT),
        ]);
        let response = wire.transact(&request).await;
        assert_eq!(response.typ.method, method);
        nonces.push(challenge_of(&response, 401).1);
    }
    assert!(nonces.iter().all(|n| *n == nonces[0]), "{nonces:?}");
    let nonce = nonces[0].clone();

    let socket = UdpSocket::bind((LOOPBACK, 0)).await.unwrap();
    let mut wire = Wire::Udp(socket, server.udp_addr());

    // Checked by the gate before the nonce: a made-up nonce and a wrong password get
    // the credentials challenge, with the shared nonce.
    let forged = session("@grace:example.org", Some("guess"), REALM, "made-up");
    let response = wire.transact(&signed_allocate(&forged)).await;
    assert_eq!(challenge_of(&response, 401).1, nonce);
    assert_eq!(counts.refused(RefusalReason::Auth), 1);

    // Good credentials and a nonce the server never gave out: stale, and the shared one.
    let unknown = session("@grace:example.org", None, REALM, "made-up");
    let response = wire.transact(&signed_allocate(&unknown)).await;
    assert_eq!(challenge_of(&response, 438).1, nonce);

    // Integrity without the credential attributes to check it by.
    let bare = build(vec![
        Box::new(TransactionId::new()),
        Box::new(MessageType::new(METHOD_ALLOCATE, CLASS_REQUEST)),
        Box::new(RequestedTransport { protocol: PROTO_UDP }),
        Box::new(TextAttribute::new(ATTR_NONCE, "made-up".into())),
        Box::new(MessageIntegrity(vec![0; 16])),
    ]);
    let response = wire.transact(&bare).await;
    assert_eq!(response.typ.class, CLASS_ERROR_RESPONSE);
    assert_eq!(error_code(&response), 400);

    let granted = session("@grace:example.org", None, REALM, &nonce);
    let mut response = wire.transact(&signed_allocate(&granted)).await;
    assert_eq!(response.typ.class, CLASS_SUCCESS_RESPONSE, "{response}");
    granted.integrity.check(&mut response).unwrap();
    assert_eq!(counts.opened(), 1);
    assert_eq!(counts.refused(RefusalReason::Auth), 1);

    // The turn crate's client, which takes the nonce from the challenge.
    let (username, password) = credentials("@heidi:example.org");
    let client = client(server.udp_addr(), &username, &password).await;
    let _relay = allocate(&client).await.unwrap();
    assert_eq!(counts.opened(), 2);
    client.close().await.unwrap();
    server.close().await;
}

#[tokio::test]
async fn signed_requests_without_an_allocation_leave_allocations_followed() {
    let (server, counts) =
        start(TurnSettings { max_allocations_per_user: 1, ..loopback_allowed() }).await;
    let tcp_addr = server.tcp_addr().unwrap();
    let peer = UdpSocket::bind((LOOPBACK, 0)).await.unwrap();
    let peer_addr = peer.local_addr().unwrap();

    // More signed requests than the server could ever follow at once, each for the
    // 5-tuple of a connection with no allocation, which the crate leaves unanswered.
    // TCP, so that none is lost on the way.
    let mut flood = Wire::Tcp(TcpStream::connect(tcp_addr).await.unwrap());
    let (realm, nonce) = challenge(&mut flood).await;
    let mallory = session("@mallory:example.org", None, &realm, &nonce);
    let mut burst = Vec::new();
    for i in 0..5000 {
        let request = match i % 3 {
            0 => mallory.request(
                MessageType::new(METHOD_REFRESH, CLASS_REQUEST),
                vec![Box::new(Lifetime(Duration::from_secs(600)))],
            ),
            1 => mallory.request(
                MessageType::new(METHOD_CREATE_PERMISSION, CLASS_REQUEST),
                vec![peer_address(peer_addr)],
            ),
            _ => mallory.request(
                MessageType::new(METHOD_CHANNEL_BIND, CLASS_REQUEST),
                vec![peer_address(peer_addr), Box::new(ChannelNumber(0x4000))],
            ),
        };
        burst.extend_from_slice(&request.raw);
    }
    flood.send(&burst).await;
    // Frames of one connection are handled in order: once this is answered, so is the
    // burst.
    let binding = build(vec![Box::new(TransactionId::new()), Box::new(BINDING_REQUEST)]);
    assert_eq!(flood.transact(&binding).await.typ.class, CLASS_SUCCESS_RESPONSE);

    let mut wire = Wire::Tcp(TcpStream::connect(tcp_addr).await.unwrap());
    let judy = allocate_on(&mut wire, "@judy:example.org").await;
    assert_eq!(counts.opened(), 1);

    // Followed, so held to the quota.
    let mut second = Wire::Tcp(TcpStream::connect(tcp_addr).await.unwrap());
    let (realm, nonce) = challenge(&mut second).await;
    let again = session("@judy:example.org", None, &realm, &nonce);
    let response = second.transact(&signed_allocate(&again)).await;
    assert_eq!(response.typ.class, CLASS_ERROR_RESPONSE);
    assert_eq!(error_code(&response), 486);

    // And its relay learns its permissions.
    let bind = judy.request(
        MessageType::new(METHOD_CHANNEL_BIND, CLASS_REQUEST),
        vec![peer_address(peer_addr), Box::new(ChannelNumber(0x4001))],
    );
    assert_eq!(wire.transact(&bind).await.typ.class, CLASS_SUCCESS_RESPONSE);
    wire.send(&channel_data(0x4001, b"hello")).await;
    let (data, from) = recv(&peer).await;
    assert_eq!(data, b"hello");
    assert_eq!(from, judy.relayed);
    peer.send_to(b"back", from).await.unwrap();
    assert_eq!(wire.recv().await, [&[0x40, 0x01, 0x00, 0x04][..], b"back"].concat());
    server.close().await;
}

#[tokio::test]
async fn requests_on_an_allocation_must_use_its_credentials() {
    let (server, counts) = start(loopback_allowed()).await;
    let socket = UdpSocket::bind((LOOPBACK, 0)).await.unwrap();
    let mut wire = Wire::Udp(socket, server.udp_addr());
    let alice = allocate_on(&mut wire, "@alice:example.org").await;
    let bob = session("@bob:example.org", None, &alice.realm, &alice.nonce);
    let end = |s: &Session| {
        s.request(
            MessageType::new(METHOD_REFRESH, CLASS_REQUEST),
            vec![Box::new(Lifetime(Duration::ZERO))],
        )
    };
    let mut response = wire.transact(&end(&bob)).await;
    assert_eq!(response.typ.class, CLASS_ERROR_RESPONSE);
    assert_eq!(error_code(&response), 441);
    bob.integrity.check(&mut response).unwrap();

    let response = wire.transact(&end(&alice)).await;
    assert_eq!(response.typ.class, CLASS_SUCCESS_RESPONSE, "{response}");
    counts.wait_until("the allocation to close", |c| c.closed() == 1).await;
    server.close().await;
}

/// A TCP connection from `source`, and whether the server serves it: it answers a
/// Binding request, or closes the connection without a word.
async fn tcp_served(server: SocketAddr, source: IpAddr) -> (bool, TcpStream) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source, 0)).unwrap();
    let mut stream = socket.connect(server).await.unwrap();
    let binding = build(vec![Box::new(TransactionId::new()), Box::new(BINDING_REQUEST)]);
    // Refused connections may already be reset.
    let _ = stream.write_all(&binding.raw).await;
    let mut head = [0u8; 20];
    let read =
        timeout(PATIENCE, stream.read_exact(&mut head)).await.expect("neither served nor closed");
    match read {
        Ok(_) => {
            assert_eq!(head[8..20], binding.transaction_id.0);
            let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
            let mut rest = vec![0; len];
            stream.read_exact(&mut rest).await.unwrap();
            (true, stream)
        }
        Err(_) => (false, stream),
    }
}

#[tokio::test]
async fn tcp_connections_are_capped_per_address() {
    let (server, _counts) = start(settings()).await;
    let tcp_addr = server.tcp_addr().unwrap();
    let mut held = Vec::new();
    for i in 0..32 {
        let (served, stream) = tcp_served(tcp_addr, LOOPBACK).await;
        assert!(served, "connection {i} refused");
        held.push(stream);
    }
    let (served, _) = tcp_served(tcp_addr, LOOPBACK).await;
    assert!(!served, "a 33rd connection from one address");
    let (served, _other) = tcp_served(tcp_addr, Ipv4Addr::new(127, 0, 0, 2).into()).await;
    assert!(served, "another address is not held to the first one's cap");

    // A slot comes back when its connection ends, once the server has noticed.
    drop(held.pop());
    let reconnected = timeout(PATIENCE, async {
        loop {
            if tcp_served(tcp_addr, LOOPBACK).await.0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(reconnected.is_ok(), "the slot of a closed connection never came back");
    server.close().await;
}
