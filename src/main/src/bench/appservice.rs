//! `trellis bench appservice`: events delivered to one application service while many
//! users send. The scenario is the service: it listens for transactions on `--listen`
//! (the registration the server was started with must point there: see
//! `scripts/bench-appservice`), has its bot join a room of `senders` users who together
//! send `rate` messages a second for `seconds`, and measures events/s delivered and the
//! delay from the start of each send until the transaction carrying it arrived.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    extract::{Path, State},
    http::HeaderMap,
    routing::{post, put},
};
use clap::Args;
use reqwest::Method;
use serde_json::{Value, json};

use super::{Api, Common, micros_now, paced_sends, rooms::shared_room, serve_on, summary};

#[derive(Args)]
pub struct AppserviceArgs {
    #[command(flatten)]
    pub common: Common,
    /// The service's `as_token` (as in the server's registration).
    #[arg(long)]
    pub as_token: String,
    /// The service's `hs_token`: transactions carrying another are refused.
    #[arg(long)]
    pub hs_token: String,
    /// Where the service listens (the registration's `url`).
    #[arg(long, default_value = "127.0.0.1:29400")]
    pub listen: String,
    /// Users sending at once.
    #[arg(long, default_value_t = 20)]
    pub senders: usize,
    /// Messages a second, all senders together.
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    /// Length of the sending phase in seconds.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
}

#[derive(Default)]
struct Received {
    delays: Vec<Duration>,
    transactions: usize,
    first: Option<Instant>,
    last: Option<Instant>,
}

#[derive(Clone)]
struct Receiver {
    hs_token: Arc<str>,
    received: Arc<Mutex<Received>>,
}

async fn transaction(
    State(r): State<Receiver>,
    Path(_txn): Path<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> (axum::http::StatusCode, Json<Value>) {
    let expected = format!("Bearer {}", r.hs_token);
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(expected.as_str()) {
        return (axum::http::StatusCode::FORBIDDEN, Json(json!({"errcode": "M_FORBIDDEN"})));
    }
    let now = micros_now();
    let at = Instant::now();
    let mut received = r.received.lock().unwrap_or_else(|p| p.into_inner());
    received.transactions += 1;
    for event in body["events"].as_array().into_iter().flatten() {
        let Some(sent) = event["content"]["bench_sent_us"].as_u64() else { continue };
        let delay = now.saturating_sub(u128::from(sent));
        received.delays.push(Duration::from_micros(u64::try_from(delay).unwrap_or(u64::MAX)));
        received.first.get_or_insert(at);
        received.last = Some(at);
    }
    (axum::http::StatusCode::OK, Json(json!({})))
}

pub async fn appservice(args: AppserviceArgs) -> Result<Value, String> {
    let received = Arc::new(Mutex::new(Received::default()));
    let receiver = Receiver { hs_token: args.hs_token.as_str().into(), received: received.clone() };
    let app = Router::new()
        .route("/_matrix/app/v1/transactions/{txn}", put(transaction))
        .route("/_matrix/app/v1/ping", post(|| async { Json(json!({})) }))
        .with_state(receiver);
    serve_on(&args.listen, app).await?;

    let api = Api::new(&args.common, args.senders + 4)?;
    let prefix = format!("bench_as_{}", std::process::id());
    let tokens = api.register_many(&prefix, args.senders).await?;
    let room = shared_room(&api, &tokens).await?;
    // The service's bot in the room: every message there is the service's business.
    api.join(&args.as_token, &room).await?;
    let ping = api
        .request(
            Method::POST,
            "/_matrix/client/v1/appservice/bench/ping",
            Some(&args.as_token),
            Some(&json!({})),
        )
        .await;
    let pinged = matches!(ping, Ok((200, _)));

    let (sent, errors, sending) =
        paced_sends(&api, &tokens, &room, args.rate, args.seconds, "b").await;
    // The tail: what was sent arrives within a few seconds, or counts as missing.
    let drain_until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < drain_until {
        if received.lock().unwrap_or_else(|p| p.into_inner()).delays.len() >= sent {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut received = received.lock().unwrap_or_else(|p| p.into_inner());
    let delivered = received.delays.len();
    let span = match (received.first, received.last) {
        (Some(a), Some(b)) if b > a => (b - a).as_secs_f64(),
        _ => sending.as_secs_f64(),
    };
    let transactions = received.transactions;
    Ok(json!({
        "scenario": "appservice",
        "params": {"senders": args.senders, "rate": args.rate, "seconds": args.seconds},
        "pinged": pinged,
        "sent": sent,
        "send_errors": errors,
        "sent_per_s": (sent as f64 / sending.as_secs_f64()).round(),
        "delivered": delivered,
        "delivered_per_s": (delivered as f64 / span.max(0.001)).round(),
        "transactions": transactions,
        "events_per_transaction": if transactions > 0 { (delivered as f64 / transactions as f64 * 10.0).round() / 10.0 } else { 0.0 },
        "send_to_transaction": summary(&mut received.delays),
    }))
}
