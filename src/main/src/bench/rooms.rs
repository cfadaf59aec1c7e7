//! Room scenarios: sending, reading history, joining.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use clap::Args;
use reqwest::Method;
use serde_json::{Value, json};

use super::{Api, Common, ServerProbe, join_workers, per_second, summary, take_one};

#[derive(Args)]
pub struct SendArgs {
    #[command(flatten)]
    pub common: Common,
    /// Concurrent senders (each a registered user).
    #[arg(long, default_value_t = 10)]
    pub senders: usize,
    /// Messages to send in total.
    #[arg(long, default_value_t = 2000)]
    pub messages: usize,
    /// Rooms the messages are spread over.
    #[arg(long, default_value_t = 1)]
    pub rooms: usize,
    /// Offered load in messages per second (0: as fast as the senders go). Latency at
    /// a fixed rate is what users feel; throughput alone hides queueing.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
}

#[derive(Args)]
pub struct MessagesArgs {
    #[command(flatten)]
    pub common: Common,
    /// Messages in the room before measuring.
    #[arg(long, default_value_t = 100_000)]
    pub events: usize,
    /// Events per `/messages` page.
    #[arg(long, default_value_t = 50)]
    pub page: usize,
    /// Pages to fetch.
    #[arg(long, default_value_t = 500)]
    pub pages: usize,
    /// Concurrent senders while filling the room.
    #[arg(long, default_value_t = 16)]
    pub fill_concurrency: usize,
}

#[derive(Args)]
pub struct JoinArgs {
    #[command(flatten)]
    pub common: Common,
    /// Members of the room before measuring.
    #[arg(long, default_value_t = 200)]
    pub members: usize,
    /// Joins to measure.
    #[arg(long, default_value_t = 50)]
    pub joins: usize,
}

/// The text of message `k` of a load.
pub(super) type Texts = Arc<dyn Fn(u64) -> String + Send + Sync>;

/// Every message says "bench".
fn same_text() -> Texts {
    Arc::new(|_| "bench".to_owned())
}

/// `senders` workers (one token each, round robin over `rooms`) send `messages` in all,
/// at `rate` messages a second in total (0: as fast as they go), message k saying
/// `texts(k)`.
pub(super) async fn send_load(
    api: &Api,
    tokens: Vec<String>,
    rooms: &[String],
    messages: usize,
    rate: u64,
    texts: Texts,
) -> Result<(Vec<Duration>, usize), String> {
    let remaining = Arc::new(std::sync::atomic::AtomicUsize::new(messages));
    let issued = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let start = tokio::time::Instant::now();
    let run = std::process::id();
    let mut workers = Vec::new();
    for (w, token) in tokens.into_iter().enumerate() {
        let (api, rooms, remaining, issued, texts) =
            (api.clone(), rooms.to_vec(), remaining.clone(), issued.clone(), texts.clone());
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0usize;
            let mut n = 0usize;
            while take_one(&remaining) {
                let k = issued.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if rate > 0 {
                    // Message k of the run is due k/rate seconds after the start.
                    tokio::time::sleep_until(
                        start + Duration::from_secs_f64(k as f64 / rate as f64),
                    )
                    .await;
                }
                let room = &rooms[(w + n) % rooms.len()];
                let txn = format!("b{run}_{w}_{n}");
                n += 1;
                let t = Instant::now();
                match api.send_text(&token, room, &txn, &texts(k)).await {
                    Ok(()) => latencies.push(t.elapsed()),
                    Err(_) => errors += 1,
                }
            }
            (latencies, errors)
        }));
    }
    join_workers(workers).await
}

/// A public room created by the first of `tokens` and joined by the others.
pub(super) async fn shared_room(api: &Api, tokens: &[String]) -> Result<String, String> {
    let (first, rest) = tokens.split_first().ok_or("no members")?;
    let room = api.create_room(first, &json!({"preset": "public_chat"})).await?;
    for token in rest {
        api.join(token, &room).await?;
    }
    Ok(room)
}

pub async fn send(args: SendArgs) -> Result<Value, String> {
    let api = Api::new(&args.common, args.senders)?;
    let prefix = format!("bench_send_{}", std::process::id());
    let tokens = api.register_many(&prefix, args.senders.max(1)).await?;
    let mut rooms = Vec::new();
    for _ in 0..args.rooms.max(1) {
        rooms.push(shared_room(&api, &tokens).await?);
    }
    let probe = ServerProbe::start(args.common.server_pid);
    let started = Instant::now();
    let (mut latencies, errors) =
        send_load(&api, tokens, &rooms, args.messages, args.rate, same_text()).await?;
    let elapsed = started.elapsed();
    let sent = latencies.len();
    Ok(json!({
        "scenario": "send",
        "params": {"senders": args.senders, "messages": args.messages, "rooms": args.rooms,
                   "rate": args.rate},
        "messages_per_second": per_second(sent, elapsed),
        "send_latency": summary(&mut latencies),
        "server_cpu_ms_per_message": probe.cpu_ms_per(sent),
        "errors": errors,
        "server": probe.report(),
    }))
}

pub async fn messages(args: MessagesArgs) -> Result<Value, String> {
    let api = Api::new(&args.common, args.fill_concurrency)?;
    let prefix = format!("bench_hist_{}", std::process::id());
    let tokens = api.register_many(&prefix, args.fill_concurrency.max(1)).await?;
    let reader = tokens[0].clone();
    let room = shared_room(&api, &tokens).await?;
    let fill_started = Instant::now();
    let (filled, fill_errors) =
        send_load(&api, tokens, std::slice::from_ref(&room), args.events, 0, same_text()).await?;
    let fill_elapsed = fill_started.elapsed();

    // Pages start at tokens spread over the whole history: walk back once with large
    // pages to collect them, then fetch measured pages from random ones.
    let path = |from: Option<&str>, limit: usize| {
        let mut p = format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit={limit}");
        if let Some(f) = from {
            p.push_str(&format!("&from={f}"));
        }
        p
    };
    let mut starts: Vec<Option<String>> = vec![None];
    let mut from: Option<String> = None;
    // Bounded: the walk back cannot take more pages than the room has events.
    for _ in 0..args.events / 1000 + 3 {
        let body = api.call(Method::GET, &path(from.as_deref(), 1000), &reader, None).await?;
        match body["end"].as_str() {
            Some(end) if body["chunk"].as_array().is_some_and(|c| !c.is_empty()) => {
                starts.push(Some(end.to_owned()));
                from = Some(end.to_owned());
            }
            _ => break,
        }
    }
    let mut latencies = Vec::with_capacity(args.pages);
    let (mut returned, mut errors) = (0usize, 0usize);
    let probe = ServerProbe::start(args.common.server_pid);
    let mut seed = u64::from(std::process::id()) | 1;
    for _ in 0..args.pages {
        // xorshift: a fixed, dependency-free spread over the start points.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let start = &starts[(seed % starts.len() as u64) as usize];
        let t = Instant::now();
        match api.call(Method::GET, &path(start.as_deref(), args.page), &reader, None).await {
            Ok(body) => {
                latencies.push(t.elapsed());
                returned += body["chunk"].as_array().map_or(0, Vec::len);
            }
            Err(_) => errors += 1,
        }
    }
    Ok(json!({
        "scenario": "messages",
        "params": {"events": args.events, "page": args.page, "pages": args.pages},
        "fill_messages_per_second": per_second(filled.len(), fill_elapsed),
        "fill_errors": fill_errors,
        "events_per_page": (returned as f64 / args.pages.max(1) as f64).round(),
        "page_latency": summary(&mut latencies),
        "server_cpu_ms_per_page": probe.cpu_ms_per(args.pages),
        "errors": errors,
        "server": probe.report(),
    }))
}

pub async fn join(args: JoinArgs) -> Result<Value, String> {
    let api = Api::new(&args.common, 8)?;
    let prefix = format!("bench_join_{}", std::process::id());
    let members = api.register_many(&prefix, args.members.max(1)).await?;
    let room = shared_room(&api, &members).await?;
    let joiners = api.register_many(&format!("{prefix}_new"), args.joins).await?;
    let mut latencies = Vec::with_capacity(args.joins);
    let mut errors = 0;
    let probe = ServerProbe::start(args.common.server_pid);
    for token in &joiners {
        let t = Instant::now();
        match api.join(token, &room).await {
            Ok(()) => latencies.push(t.elapsed()),
            Err(_) => errors += 1,
        }
    }
    Ok(json!({
        "scenario": "join",
        "params": {"members": args.members, "joins": args.joins},
        "join_latency": summary(&mut latencies),
        "server_cpu_ms_per_join": probe.cpu_ms_per(args.joins),
        "errors": errors,
        "server": probe.report(),
    }))
}
