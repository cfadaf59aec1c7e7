//! Room scenarios: sending, reading history, joining.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use clap::Args;
use serde_json::{Value, json};

use super::{Common, join_workers, post, process_cpu, summary, take_one};

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

fn client(pool: usize) -> Result<reqwest::Client, String> {
    reqwest::Client::builder().pool_max_idle_per_host(pool + 4).build().map_err(|e| e.to_string())
}

/// Registers a bench user through open registration; returns its access token.
async fn bench_user(client: &reqwest::Client, base: &str, name: &str) -> Result<String, String> {
    let (status, body) = post(
        client,
        &format!("{base}/_matrix/client/v3/register"),
        &json!({"username": name, "password": "bench password 1", "auth": {"type": "m.login.dummy"}}),
    )
    .await?;
    match (status, body["access_token"].as_str()) {
        (200, Some(t)) => Ok(t.to_owned()),
        _ => Err(format!("registering {name}: {status} {body}")),
    }
}

/// Registers `n` users, a few at a time (registration hashes a password).
async fn bench_users(
    client: &reqwest::Client,
    base: &str,
    prefix: &str,
    n: usize,
) -> Result<Vec<String>, String> {
    let mut tokens = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(8) {
        let batch = chunk.iter().map(|i| {
            let name = format!("{prefix}_{i}");
            let (client, base) = (client.clone(), base.to_owned());
            async move { bench_user(&client, &base, &name).await }
        });
        for token in futures_join_all(batch).await {
            tokens.push(token?);
        }
    }
    Ok(tokens)
}

/// Runs futures concurrently and collects their outputs in order.
async fn futures_join_all<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let mut set = tokio::task::JoinSet::new();
    for (i, f) in futures.enumerate() {
        set.spawn(async move { (i, f.await) });
    }
    let mut out: Vec<(usize, F::Output)> = Vec::new();
    while let Some(Ok(item)) = set.join_next().await {
        out.push(item);
    }
    out.sort_by_key(|(i, _)| *i);
    out.into_iter().map(|(_, o)| o).collect()
}

async fn authed_post(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    body: &Value,
) -> Result<(u16, Value), String> {
    let resp =
        client.post(url).bearer_auth(token).json(body).send().await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    Ok((status, resp.json().await.unwrap_or(Value::Null)))
}

async fn create_public_room(
    client: &reqwest::Client,
    base: &str,
    token: &str,
) -> Result<String, String> {
    let create_url = format!("{base}/_matrix/client/v3/createRoom");
    let (status, body) =
        authed_post(client, &create_url, token, &json!({"preset": "public_chat"})).await?;
    body["room_id"]
        .as_str()
        .filter(|_| status == 200)
        .map(str::to_owned)
        .ok_or_else(|| format!("createRoom: {status} {body}"))
}

async fn join_room(
    client: &reqwest::Client,
    base: &str,
    room: &str,
    token: &str,
) -> Result<(), String> {
    let join_url = format!("{base}/_matrix/client/v3/rooms/{room}/join");
    let (status, body) = authed_post(client, &join_url, token, &json!({})).await?;
    if status != 200 {
        return Err(format!("join: {status} {body}"));
    }
    Ok(())
}

/// `senders` workers (one token each, round robin over `rooms`) send `messages` in all.
async fn send_load(
    client: &reqwest::Client,
    base: &str,
    tokens: Vec<String>,
    rooms: &[String],
    messages: usize,
    rate: u64,
) -> Result<(Vec<Duration>, usize), String> {
    let remaining = Arc::new(std::sync::atomic::AtomicUsize::new(messages));
    let issued = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let start = tokio::time::Instant::now();
    let run = std::process::id();
    let mut workers = Vec::new();
    for (w, token) in tokens.into_iter().enumerate() {
        let (client, base, rooms, remaining, issued) =
            (client.clone(), base.to_owned(), rooms.to_vec(), remaining.clone(), issued.clone());
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0usize;
            let mut n = 0usize;
            while take_one(&remaining) {
                if rate > 0 {
                    // Message k of the run is due k/rate seconds after the start.
                    let k = issued.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tokio::time::sleep_until(
                        start + Duration::from_secs_f64(k as f64 / rate as f64),
                    )
                    .await;
                }
                let room = &rooms[(w + n) % rooms.len()];
                let url = format!(
                    "{base}/_matrix/client/v3/rooms/{room}/send/m.room.message/b{run}_{w}_{n}"
                );
                n += 1;
                let t = Instant::now();
                let body = json!({"msgtype": "m.text", "body": "bench"});
                match client.put(&url).bearer_auth(&token).json(&body).send().await {
                    Ok(r) if r.status().is_success() => latencies.push(t.elapsed()),
                    _ => errors += 1,
                }
            }
            (latencies, errors)
        }));
    }
    join_workers(workers).await
}

fn per_second(count: usize, elapsed: f64) -> f64 {
    ((count as f64 / elapsed) * 100.0).round() / 100.0
}

pub async fn send(args: SendArgs) -> Result<Value, String> {
    let client = client(args.senders)?;
    let base = args.common.base_url.trim_end_matches('/').to_owned();
    let prefix = format!("bench_send_{}", std::process::id());
    let tokens = bench_users(&client, &base, &prefix, args.senders.max(1)).await?;
    let mut rooms = Vec::new();
    for _ in 0..args.rooms.max(1) {
        let room = create_public_room(&client, &base, &tokens[0]).await?;
        for token in &tokens[1..] {
            join_room(&client, &base, &room, token).await?;
        }
        rooms.push(room);
    }
    let cpu_before = process_cpu(args.common.server_pid);
    let started = Instant::now();
    let (mut latencies, errors) =
        send_load(&client, &base, tokens, &rooms, args.messages, args.rate).await?;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_before.zip(process_cpu(args.common.server_pid)).map(|(a, b)| b - a);
    let sent = latencies.len();
    Ok(json!({
        "scenario": "send",
        "params": {"senders": args.senders, "messages": args.messages, "rooms": args.rooms,
                   "rate": args.rate},
        "messages_per_second": per_second(sent, elapsed),
        "send_latency": summary(&mut latencies),
        "server_cpu_ms_per_message": cpu.map(|c| {
            ((c.as_secs_f64() * 1000.0 / sent.max(1) as f64) * 1000.0).round() / 1000.0
        }),
        "errors": errors,
    }))
}

pub async fn messages(args: MessagesArgs) -> Result<Value, String> {
    let client = client(args.fill_concurrency)?;
    let base = args.common.base_url.trim_end_matches('/').to_owned();
    let prefix = format!("bench_hist_{}", std::process::id());
    let tokens = bench_users(&client, &base, &prefix, args.fill_concurrency.max(1)).await?;
    let reader = tokens[0].clone();
    let room = create_public_room(&client, &base, &tokens[0]).await?;
    for token in &tokens[1..] {
        join_room(&client, &base, &room, token).await?;
    }
    let fill_started = Instant::now();
    let (filled, fill_errors) =
        send_load(&client, &base, tokens, std::slice::from_ref(&room), args.events, 0).await?;
    let fill_seconds = fill_started.elapsed().as_secs_f64();

    // Pages start at tokens spread over the whole history: walk back once with large
    // pages to collect them, then fetch measured pages from random ones.
    let url = |from: Option<&str>, limit: usize| {
        let mut u = format!("{base}/_matrix/client/v3/rooms/{room}/messages?dir=b&limit={limit}");
        if let Some(f) = from {
            u.push_str(&format!("&from={f}"));
        }
        u
    };
    let get = |u: String| {
        let client = client.clone();
        let reader = reader.clone();
        async move {
            let resp =
                client.get(&u).bearer_auth(&reader).send().await.map_err(|e| e.to_string())?;
            let status = resp.status().as_u16();
            let body: Value = resp.json().await.map_err(|e| e.to_string())?;
            if status != 200 {
                return Err(format!("/messages: {status} {body}"));
            }
            Ok::<Value, String>(body)
        }
    };
    let mut starts: Vec<Option<String>> = vec![None];
    let mut from: Option<String> = None;
    loop {
        let body = get(url(from.as_deref(), 1000)).await?;
        match body["end"].as_str() {
            Some(end) => {
                starts.push(Some(end.to_owned()));
                from = Some(end.to_owned());
            }
            None => break,
        }
    }
    let mut latencies = Vec::with_capacity(args.pages);
    let mut returned = 0usize;
    let cpu_before = process_cpu(args.common.server_pid);
    let mut seed = u64::from(std::process::id()) | 1;
    for _ in 0..args.pages {
        // xorshift: a fixed, dependency-free spread over the start points.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let start = &starts[(seed % starts.len() as u64) as usize];
        let t = Instant::now();
        let body = get(url(start.as_deref(), args.page)).await?;
        latencies.push(t.elapsed());
        returned += body["chunk"].as_array().map_or(0, Vec::len);
    }
    let cpu = cpu_before.zip(process_cpu(args.common.server_pid)).map(|(a, b)| b - a);
    Ok(json!({
        "scenario": "messages",
        "params": {"events": args.events, "page": args.page, "pages": args.pages},
        "fill_messages_per_second": per_second(filled.len(), fill_seconds),
        "fill_errors": fill_errors,
        "events_per_page": (returned as f64 / args.pages.max(1) as f64).round(),
        "page_latency": summary(&mut latencies),
        "server_cpu_ms_per_page": cpu.map(|c| {
            ((c.as_secs_f64() * 1000.0 / args.pages.max(1) as f64) * 1000.0).round() / 1000.0
        }),
    }))
}

pub async fn join(args: JoinArgs) -> Result<Value, String> {
    let client = client(8)?;
    let base = args.common.base_url.trim_end_matches('/').to_owned();
    let prefix = format!("bench_join_{}", std::process::id());
    let members = bench_users(&client, &base, &prefix, args.members.max(1)).await?;
    let room = create_public_room(&client, &base, &members[0]).await?;
    for token in &members[1..] {
        join_room(&client, &base, &room, token).await?;
    }
    let joiners = bench_users(&client, &base, &format!("{prefix}_new"), args.joins).await?;
    let mut latencies = Vec::with_capacity(args.joins);
    let cpu_before = process_cpu(args.common.server_pid);
    for token in &joiners {
        let t = Instant::now();
        join_room(&client, &base, &room, token).await?;
        latencies.push(t.elapsed());
    }
    let cpu = cpu_before.zip(process_cpu(args.common.server_pid)).map(|(a, b)| b - a);
    Ok(json!({
        "scenario": "join",
        "params": {"members": args.members, "joins": args.joins},
        "join_latency": summary(&mut latencies),
        "server_cpu_ms_per_join": cpu.map(|c| {
            ((c.as_secs_f64() * 1000.0 / args.joins.max(1) as f64) * 1000.0).round() / 1000.0
        }),
    }))
}
