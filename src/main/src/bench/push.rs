//! `trellis bench push`: pushes to one push gateway while many users send into a big
//! room. The scenario is the gateway: it listens on `--listen` (the server must allow
//! loopback gateways, `push.gateway_ip_allow`: see `scripts/bench-push`), fills a room
//! with `members` members of whom `pushers` have an HTTP pusher pointing at it, has
//! `senders` other members send `rate` messages a second for `seconds`, and measures
//! pushes/s received and the delay from the start of each send until its push arrived.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{Json, Router, extract::State, routing::post};
use clap::Args;
use reqwest::Method;
use serde_json::{Value, json};

use super::{
    Api, Arrivals, Common, ServerProbe, paced_sends, rooms::shared_room, serve_on, summary,
};

#[derive(Args)]
pub struct PushArgs {
    #[command(flatten)]
    pub common: Common,
    /// Where the gateway listens.
    #[arg(long, default_value = "127.0.0.1:29500")]
    pub listen: String,
    /// Members of the room, senders and pusher holders included.
    #[arg(long, default_value_t = 1000)]
    pub members: usize,
    /// Members with a pusher.
    #[arg(long, default_value_t = 20)]
    pub pushers: usize,
    /// Members sending at once.
    #[arg(long, default_value_t = 20)]
    pub senders: usize,
    /// Messages a second, all senders together.
    #[arg(long, default_value_t = 500)]
    pub rate: u64,
    /// Length of the sending phase in seconds.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
}

async fn notify(
    State(received): State<Arc<Mutex<Arrivals>>>,
    Json(body): Json<Value>,
) -> Json<Value> {
    if let Some(sent) = body["notification"]["content"]["bench_sent_us"].as_u64() {
        received.lock().unwrap_or_else(|p| p.into_inner()).record(sent);
    }
    Json(json!({"rejected": []}))
}

pub async fn push(args: PushArgs) -> Result<Value, String> {
    if args.senders + args.pushers > args.members {
        return Err("--members must hold the senders and the pusher holders".into());
    }
    let received = Arc::new(Mutex::new(Arrivals::default()));
    let app =
        Router::new().route("/_matrix/push/v1/notify", post(notify)).with_state(received.clone());
    let gateway = format!("http://{}/_matrix/push/v1/notify", args.listen);
    serve_on(&args.listen, app).await?;

    let api = Api::new(&args.common, args.senders + 8)?;
    let prefix = format!("bench_push_{}", std::process::id());
    let tokens = api.register_many(&prefix, args.members).await?;
    let room = shared_room(&api, &tokens).await?;
    let (senders, rest) = tokens.split_at(args.senders);
    for (i, token) in rest.iter().take(args.pushers).enumerate() {
        let pusher = json!({"kind": "http", "app_id": "org.trellis.bench", "pushkey": format!("key{i}"),
                            "app_display_name": "Bench", "device_display_name": "Phone",
                            "lang": "en", "data": {"url": gateway}});
        api.call(Method::POST, "/_matrix/client/v3/pushers/set", token, Some(&pusher)).await?;
    }

    let probe = ServerProbe::start(args.common.server_pid);
    let (sent, errors, sending) =
        paced_sends(&api, senders, &room, args.rate, args.seconds, "p").await;
    let expected = sent * args.pushers;
    // The tail: queued pushes arrive within a while, or count as missing.
    Arrivals::wait_for(&received, expected, Duration::from_secs(30)).await;
    let server = probe.report();
    let mut received = received.lock().unwrap_or_else(|p| p.into_inner());
    let pushed = received.delays.len();
    Ok(json!({
        "scenario": "push",
        "params": {"members": args.members, "pushers": args.pushers, "senders": args.senders,
                   "rate": args.rate, "seconds": args.seconds},
        "sent": sent,
        "errors": errors,
        "sent_per_s": (sent as f64 / sending.as_secs_f64()).round(),
        "pushes_expected": expected,
        "pushes": pushed,
        "pushes_per_s": received.per_second(sending),
        "send_to_push": summary(&mut received.delays),
        "server": server,
    }))
}
