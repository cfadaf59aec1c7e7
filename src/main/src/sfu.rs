//! The built-in SFU (`trellis-rtc`) on this server's listener, where LiveKit clients
//! expect it: the signalling WebSocket at `<url>/rtc` (the access token in the query or
//! an `Authorization` header), its `/rtc/validate` probe, 404 for the single-connection
//! `/rtc/v1` (clients then fall back to `/rtc`), and the room service's `CreateRoom`,
//! which the token service calls for users who may start calls.

use std::{collections::HashMap, net::SocketAddr, sync::Arc};

use axum::{
    Router,
    extract::{
        Query, State,
        ws::{Message, WebSocket, WebSocketUpgrade, rejection::WebSocketUpgradeRejection},
    },
    response::{IntoResponse, Response},
    routing::{get, post},
};
use http::{HeaderMap, StatusCode, header};
use tracing::Instrument;
use trellis_core::config::Config;
use trellis_core::metrics::SfuMetrics;
use trellis_rtc::sfu::{
    CallReport, IceServer, JoinError, JoinGrant, Session, Sfu, SfuObserver, SfuSettings,
};
use trellis_service::{
    Services, call_history::SfuMedia, call_leaves::CallLeaves, rtc::verify_token, voip,
};

/// The SFU's calls and forwarding, counted in the metrics; an ended call's figures go
/// to call history.
struct Observer(SfuMetrics, std::sync::Weak<Services>);

impl SfuObserver for Observer {
    fn room_opened(&self, _room: &str) {
        self.0.calls.inc();
    }
    fn room_closed(&self, report: &CallReport) {
        self.0.calls.dec();
        let Some(services) = self.1.upgrade() else { return };
        let media = SfuMedia {
            peak_participants: report.peak_participants,
            forwarded_bytes: report.forwarded_bytes,
            seconds: report.duration.as_secs(),
        };
        let room = report.room.clone();
        tokio::spawn(
            async move {
                if let Err(e) = services.call_history.sfu_call_ended(&room, media).await {
                    tracing::warn!(error = %e, "recording a call's media failed");
                }
            }
            .in_current_span(),
        );
    }
    fn participant_joined(&self, room: &str, identity: &str) {
        self.0.participants.inc();
        if let Some(services) = self.1.upgrade() {
            services.call_leaves.joined(room, identity);
        }
    }
    fn participant_left(&self, room: &str, identity: &str) {
        self.0.participants.dec();
        if let Some(services) = self.1.upgrade() {
            services.call_leaves.left(room, identity);
        }
    }
    fn forwarded(&self, packets: u64, bytes: u64) {
        self.0.forwarded_packets.inc_by(packets);
        self.0.forwarded_bytes.inc_by(bytes);
    }
    fn forward_time(&self, took: std::time::Duration) {
        self.0.forward_seconds.observe(took.as_secs_f64());
    }
    fn estimate(&self, send_side: bool) {
        let counter =
            if send_side { &self.0.send_side_estimates } else { &self.0.receiver_estimates };
        counter.inc();
    }
    fn receiver_report(&self, loss: f32, rtt: Option<std::time::Duration>) {
        self.0.subscriber_loss.observe(f64::from(loss));
        if let Some(rtt) = rtt {
            self.0.rtt_seconds.observe(rtt.as_secs_f64());
        }
    }
}

/// The largest signalling message taken from a client.
const SIGNAL_MESSAGE_MAX: usize = 1 << 20;

/// Where the built-in SFU is served, under the public base URL.
pub const PATH: &str = "/_trellis/sfu";

#[derive(Clone)]
struct SfuState {
    services: Arc<Services>,
    sfu: Arc<Sfu>,
}

/// Starts the SFU when it is on and no external one is configured, and points the call
/// token service at it: its URL, and an API key and secret of its own (the secret is
/// derived from the signing key, so tokens outlive restarts and nothing is stored).
pub async fn prepare(config: &mut Config, keys: &trellis_service::ServerKeys) -> Option<Arc<Sfu>> {
    let rtc = &config.rtc;
    if !rtc.sfu || !rtc.livekit_url.is_empty() {
        return None;
    }
    let udp_listen = rtc.sfu_udp_listen.parse::<SocketAddr>().ok()?;
    let public_ip = rtc.sfu_public_ip.parse().unwrap_or_else(|_| crate::turn::default_route_ip());
    let settings = SfuSettings {
        udp_listen,
        public_ips: vec![public_ip],
        max_participants: rtc.sfu_max_participants,
        max_publishers: rtc.sfu_max_publishers,
        max_publish_bitrate: rtc.sfu_max_publish_kbps.saturating_mul(1000),
        send_side_estimate: rtc.sfu_send_side_estimate,
        server_version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    let sfu = match Sfu::start(settings).await {
        Ok(sfu) => sfu,
        Err(e) => {
            tracing::error!(error = %e, listen = %udp_listen, "the built-in SFU cannot start; group calls are not offered");
            return None;
        }
    };
    let base = config.public_base_url();
    let ws_base = base.replacen("https://", "wss://", 1).replacen("http://", "ws://", 1);
    config.rtc.livekit_url = format!("{ws_base}{PATH}");
    config.rtc.livekit_api_key = "trellis".to_owned();
    config.rtc.livekit_api_secret = keys.derived_secret(b"trellis built-in SFU API secret");
    tracing::info!(media = %sfu.media_addr(), url = %config.rtc.livekit_url, %public_ip, "built-in SFU listening");
    Some(sfu)
}

/// The SFU's routes, to be tried before the main router; its calls feed the metrics.
pub fn routes(services: Arc<Services>, sfu: Arc<Sfu>) -> Router {
    sfu.observe(Arc::new(Observer(services.metrics.sfu.clone(), Arc::downgrade(&services))));
    // The SFU tells who leaves its calls: delayed leaves may be handed over.
    CallLeaves::attach(&services);
    Router::new()
        .route(&format!("{PATH}/rtc"), get(rtc))
        .route(&format!("{PATH}/rtc/validate"), get(validate))
        .route(&format!("{PATH}/rtc/v1"), get(single_connection))
        .route(&format!("{PATH}/rtc/v1/validate"), get(single_connection))
        .route(&format!("{PATH}/twirp/livekit.RoomService/CreateRoom"), post(create_room))
        .with_state(SfuState { services, sfu })
}

/// A plain-text answer any web page may read (the client fetches `validate` from its
/// page's origin).
fn text(status: StatusCode, body: &'static str) -> Response {
    (status, [(header::ACCESS_CONTROL_ALLOW_ORIGIN, "*")], body).into_response()
}

fn token<'a>(query: &'a HashMap<String, String>, headers: &'a HeaderMap) -> Option<&'a str> {
    query.get("access_token").map(String::as_str).or_else(|| {
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
    })
}

/// GET /_trellis/sfu/rtc/v1 (and its validate): the single-connection protocol is not
/// spoken; a 404 makes clients use `/rtc`.
async fn single_connection() -> Response {
    text(StatusCode::NOT_FOUND, "single peer connection signalling is not supported")
}

/// GET /_trellis/sfu/rtc/validate
async fn validate(
    State(st): State<SfuState>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    match token(&query, &headers).map(|t| verify_token(&st.services.config.rtc, t)) {
        Some(Ok(t)) if t.room_join => text(StatusCode::OK, "success"),
        _ => text(StatusCode::UNAUTHORIZED, "invalid token"),
    }
}

/// POST /_trellis/sfu/twirp/livekit.RoomService/CreateRoom
async fn create_room(
    State(st): State<SfuState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let none = HashMap::new();
    let allowed = token(&none, &headers)
        .and_then(|t| verify_token(&st.services.config.rtc, t).ok())
        .is_some_and(|t| t.room_create);
    if !allowed {
        return text(StatusCode::UNAUTHORIZED, "invalid token");
    }
    let name = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["name"].as_str().map(str::to_owned))
        .filter(|n| !n.is_empty());
    let Some(name) = name else {
        return text(StatusCode::BAD_REQUEST, "a room name is required");
    };
    st.sfu.permit_room(&name);
    axum::Json(serde_json::json!({ "name": name })).into_response()
}

/// GET /_trellis/sfu/rtc
async fn rtc(
    State(st): State<SfuState>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let Ok(upgrade) = upgrade else {
        return text(StatusCode::NOT_FOUND, "a WebSocket is expected here");
    };
    let verified = token(&query, &headers).map(|t| verify_token(&st.services.config.rtc, t));
    let Some(Ok(verified)) = verified else {
        return text(StatusCode::UNAUTHORIZED, "invalid token");
    };
    if !verified.room_join || verified.room.is_empty() {
        return text(StatusCode::UNAUTHORIZED, "the token does not allow joining a room");
    }
    let ice_servers = voip::turn_server(
        &st.services.config.voip,
        st.services.builtin_turn.get(),
        &verified.identity,
        false,
    )
    .ok()
    .flatten()
    .map(|c| vec![IceServer { urls: c.uris, username: c.username, credential: c.password }])
    .unwrap_or_default();
    let grant = JoinGrant {
        room: verified.room,
        identity: verified.identity,
        name: verified.name,
        metadata: String::new(),
        can_publish: verified.can_publish,
        can_subscribe: verified.can_subscribe,
        can_publish_data: verified.can_publish_data,
        may_create: verified.room_create,
        can_update_metadata: verified.can_update_metadata,
        // What livekit clients send (`1`/`0`); LiveKit's default is on.
        auto_subscribe: !matches!(
            query.get("auto_subscribe").map(String::as_str),
            Some("0" | "false")
        ),
    };
    let resume = (query.get("reconnect").map(String::as_str) == Some("1"))
        .then(|| query.get("sid"))
        .flatten();
    match st.sfu.join(grant, resume.map(String::as_str), ice_servers).await {
        // Signalling messages are SDP and small protobufs.
        Ok(session) => upgrade
            .max_message_size(SIGNAL_MESSAGE_MAX)
            .on_upgrade(move |socket| pump(socket, session)),
        Err(JoinError::NoSuchRoom) => text(StatusCode::NOT_FOUND, "requested room does not exist"),
        Err(JoinError::Full) => text(StatusCode::FORBIDDEN, "the call is full"),
        Err(e) => {
            tracing::warn!(error = %e, "joining a call failed");
            text(StatusCode::INTERNAL_SERVER_ERROR, "the call could not be joined")
        }
    }
}

/// Carries a session's signalling over its WebSocket until either side ends it.
async fn pump(mut socket: WebSocket, mut session: Session) {
    loop {
        tokio::select! {
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Binary(bytes))) => {
                    if !session.handle.handle(&bytes).await {
                        break;
                    }
                }
                Some(Ok(Message::Close(_)) | Err(_)) | None => break,
                Some(Ok(_)) => {}
            },
            outgoing = session.responses.recv() => match outgoing {
                Some(bytes) => {
                    if socket.send(Message::Binary(bytes.into())).await.is_err() {
                        break;
                    }
                }
                None => break,
            },
        }
    }
    // Whatever was queued (a leave, say) still goes out.
    while let Ok(bytes) = session.responses.try_recv() {
        if socket.send(Message::Binary(bytes.into())).await.is_err() {
            break;
        }
    }
    let _ = socket.send(Message::Close(None)).await;
    session.handle.closed();
}
