//! `trellis bench appservice`: events delivered to one application service while many
//! users send. The scenario is the service: it listens for transactions on `--listen`
//! (the registration the server was started with must point there: see
//! `scripts/bench-appservice`), has its bot join a room of `senders` users who together
//! send `rate` messages a second for `seconds`, and measures events/s delivered and the
//! delay from the start of each send until the transaction carrying it arrived.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
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

use super::{Api, Arrivals, Common, paced_sends, rooms::shared_room, serve_on, summary};

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

#[derive(Clone)]
struct Receiver {
    hs_token: Arc<str>,
    arrivals: Arc<Mutex<Arrivals>>,
    transactions: Arc<AtomicUsize>,
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
    r.transactions.fetch_add(1, Ordering::Relaxed);
    let mut arrivals = r.arrivals.lock().unwrap_or_else(|p| p.into_inner());
    for event in body["events"].as_array().into_iter().flatten() {
        if let Some(sent) = event["content"]["bench_sent_us"].as_u64() {
            arrivals.record(sent);
        }
    }
    (axum::http::StatusCode::OK, Json(json!({})))
}

pub async fn appservice(args: AppserviceArgs) -> Result<Value, String> {
    let arrivals = Arc::new(Mutex::new(Arrivals::default()));
    let transactions = Arc::new(AtomicUsize::new(0));
    let receiver = Receiver {
        hs_token: args.hs_token.as_str().into(),
        arrivals: arrivals.clone(),
        transactions: transactions.clone(),
    };
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
    Arrivals::wait_for(&arrivals, sent, Duration::from_secs(10)).await;
    let mut arrivals = arrivals.lock().unwrap_or_else(|p| p.into_inner());
    let delivered = arrivals.delays.len();
    let transactions = transactions.load(Ordering::Relaxed);
    Ok(json!({
        "scenario": "appservice",
        "params": {"senders": args.senders, "rate": args.rate, "seconds": args.seconds},
        "pinged": pinged,
        "sent": sent,
        "send_errors": errors,
        "sent_per_s": (sent as f64 / sending.as_secs_f64()).round(),
        "delivered": delivered,
        "delivered_per_s": arrivals.per_second(sending),
        "transactions": transactions,
        "events_per_transaction": if transactions > 0 { (delivered as f64 / transactions as f64 * 10.0).round() / 10.0 } else { 0.0 },
        "send_to_transaction": summary(&mut arrivals.delays),
    }))
}
