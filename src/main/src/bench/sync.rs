//! Sync scenarios: initial and incremental sync latency for a user in many rooms, and
//! delivery latency to long-polling receivers while many idle long-polls are held.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use clap::Args;
use serde_json::{Value, json};

use super::{Common, process_cpu, summary};

#[derive(Args)]
pub struct SyncArgs {
    #[command(flatten)]
    pub common: Common,
    /// Rooms of the measured user (initial/incremental sync).
    #[arg(long, default_value_t = 50)]
    pub rooms: usize,
    /// Messages in each of those rooms.
    #[arg(long, default_value_t = 20)]
    pub messages_per_room: usize,
    /// Syncs measured of each kind.
    #[arg(long, default_value_t = 50)]
    pub samples: usize,
    /// Receivers long-polling one room while a sender sends (0: skip delivery).
    #[arg(long, default_value_t = 20)]
    pub receivers: usize,
    /// Messages per second the sender sends during the delivery phase.
    #[arg(long, default_value_t = 20)]
    pub rate: u64,
    /// Length of the delivery phase in seconds.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Idle long-polls held open (by a user in no busy room) during delivery.
    #[arg(long, default_value_t = 1000)]
    pub idle: usize,
}

fn server_rss_mb(pid: Option<u32>) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid?)).ok()?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some((kb / 1024.0 * 10.0).round() / 10.0)
}

pub(crate) async fn register(
    client: &reqwest::Client,
    base: &str,
    name: &str,
) -> Result<String, String> {
    let resp = client
        .post(format!("{base}/_matrix/client/v3/register"))
        .json(&json!({"username": name, "password": "bench password 1",
            "auth": {"type": "m.login.dummy"}}))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let body: Value = resp.json().await.map_err(|e| e.to_string())?;
    body["access_token"].as_str().map(str::to_owned).ok_or_else(|| format!("register: {body}"))
}

async fn call(
    client: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    token: &str,
    body: Option<Value>,
) -> Result<Value, String> {
    let mut req = client.request(method, url).bearer_auth(token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let body: Value = resp.json().await.map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!("{status}: {body}"));
    }
    Ok(body)
}

pub async fn sync(args: SyncArgs) -> Result<Value, String> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.idle + args.receivers + 16)
        .build()
        .map_err(|e| e.to_string())?;
    let base = args.common.base_url.trim_end_matches('/').to_owned();
    let run = std::process::id();
    let pid = args.common.server_pid;
    let idle_rss = server_rss_mb(pid);

    // A user in `rooms` rooms with `messages_per_room` messages each.
    let user = register(&client, &base, &format!("bench_sync_{run}")).await?;
    for r in 0..args.rooms {
        let room = call(
            &client,
            reqwest::Method::POST,
            format!("{base}/_matrix/client/v3/createRoom"),
            &user,
            Some(json!({"name": format!("room {r}")})),
        )
        .await?["room_id"]
            .as_str()
            .map(str::to_owned)
            .ok_or("no room id")?;
        for m in 0..args.messages_per_room {
            call(
                &client,
                reqwest::Method::PUT,
                format!("{base}/_matrix/client/v3/rooms/{room}/send/m.room.message/s{r}_{m}"),
                &user,
                Some(json!({"msgtype": "m.text", "body": format!("message {m}")})),
            )
            .await?;
        }
    }
    let sync_url = |query: &str| format!("{base}/_matrix/client/v3/sync?{query}");
    let mut initial = Vec::new();
    let mut since = String::new();
    for _ in 0..args.samples {
        let t = Instant::now();
        let body = call(&client, reqwest::Method::GET, sync_url(""), &user, None).await?;
        initial.push(t.elapsed());
        since = body["next_batch"].as_str().unwrap_or_default().to_owned();
    }
    let mut incremental = Vec::new();
    for _ in 0..args.samples {
        let t = Instant::now();
        call(
            &client,
            reqwest::Method::GET,
            sync_url(&format!("since={since}&timeout=0")),
            &user,
            None,
        )
        .await?;
        incremental.push(t.elapsed());
    }

    let mut result = json!({
        "scenario": "sync",
        "params": {"rooms": args.rooms, "messages_per_room": args.messages_per_room,
            "samples": args.samples, "receivers": args.receivers, "rate": args.rate,
            "seconds": args.seconds, "idle": args.idle},
        "server_rss_mb_at_start": idle_rss,
        "initial_sync": summary(&mut initial),
        "incremental_sync": summary(&mut incremental),
    });
    if args.receivers == 0 {
        return Ok(result);
    }

    // Delivery: receivers long-poll one room while a sender sends at `rate`, and idle
    // long-polls are held by a user in no busy room.
    let sender = register(&client, &base, &format!("bench_sender_{run}")).await?;
    let room = call(
        &client,
        reqwest::Method::POST,
        format!("{base}/_matrix/client/v3/createRoom"),
        &sender,
        Some(json!({"preset": "public_chat"})),
    )
    .await?["room_id"]
        .as_str()
        .map(str::to_owned)
        .ok_or("no room id")?;
    let mut receivers = Vec::new();
    for i in 0..args.receivers {
        let token = register(&client, &base, &format!("bench_recv_{run}_{i}")).await?;
        call(
            &client,
            reqwest::Method::POST,
            format!("{base}/_matrix/client/v3/rooms/{room}/join"),
            &token,
            Some(json!({})),
        )
        .await?;
        receivers.push(token);
    }
    let bystander = register(&client, &base, &format!("bench_idle_{run}")).await?;
    let bystander_since = call(&client, reqwest::Method::GET, sync_url(""), &bystander, None)
        .await?["next_batch"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    // Everything ends a little after the send phase: 2 s for the idle polls to connect,
    // 0.5 s for receivers to start, the sends, then 3 s for the last deliveries.
    let stop = Instant::now() + Duration::from_secs_f64(args.seconds as f64 + 5.5);
    let idle_errors = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut idle_tasks = Vec::new();
    for _ in 0..args.idle {
        let (client, base, token, errors, mut since) = (
            client.clone(),
            base.clone(),
            bystander.clone(),
            idle_errors.clone(),
            bystander_since.clone(),
        );
        idle_tasks.push(tokio::spawn(async move {
            while Instant::now() < stop {
                let url = format!("{base}/_matrix/client/v3/sync?since={since}&timeout=60000");
                let polled = tokio::time::timeout_at(
                    tokio::time::Instant::from_std(stop),
                    client.get(&url).bearer_auth(&token).send(),
                )
                .await;
                match polled {
                    Err(_) => break,
                    Ok(Ok(r)) if r.status().is_success() => {
                        // Like a real client, continue from the returned token.
                        if let Ok(body) = r.json::<Value>().await
                            && let Some(next) = body["next_batch"].as_str()
                        {
                            since = next.to_owned();
                        }
                    }
                    Ok(_) => {
                        errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }));
    }
    // Let the idle polls connect before measuring.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_with_idle = server_rss_mb(pid);

    let sent_at: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let mut receiver_tasks = Vec::new();
    for token in receivers {
        let (client, base, sent_at) = (client.clone(), base.clone(), sent_at.clone());
        receiver_tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut since = call(
                &client,
                reqwest::Method::GET,
                format!("{base}/_matrix/client/v3/sync?filter=%7B%22room%22%3A%7B%22timeline%22%3A%7B%22limit%22%3A50%7D%7D%7D"),
                &token,
                None,
            )
            .await
            .map(|b| b["next_batch"].as_str().unwrap_or_default().to_owned())
            .unwrap_or_default();
            while Instant::now() < stop {
                let url = format!("{base}/_matrix/client/v3/sync?since={since}&timeout=5000");
                let Ok(body) = call(&client, reqwest::Method::GET, url, &token, None).await else {
                    break;
                };
                let received = Instant::now();
                since = body["next_batch"].as_str().unwrap_or_default().to_owned();
                if let Some(rooms) = body["rooms"]["join"].as_object() {
                    for room in rooms.values() {
                        for ev in room["timeline"]["events"].as_array().into_iter().flatten() {
                            let Some(tag) = ev["content"]["body"].as_str() else { continue };
                            let sent = sent_at.lock().ok().and_then(|m| m.get(tag).copied());
                            if let Some(sent) = sent {
                                latencies.push(received.saturating_duration_since(sent));
                            }
                        }
                    }
                }
            }
            latencies
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cpu_before = process_cpu(pid);
    let total = args.rate * args.seconds;
    let start = tokio::time::Instant::now();
    let mut send_errors = 0usize;
    for k in 0..total {
        tokio::time::sleep_until(
            start + Duration::from_secs_f64(k as f64 / args.rate.max(1) as f64),
        )
        .await;
        let tag = format!("d{run}_{k}");
        // Delivery is measured from the moment the send starts (a receiver may see the
        // event before the sender has its answer), so it includes the send itself.
        if let Ok(mut m) = sent_at.lock() {
            m.insert(tag.clone(), Instant::now());
        }
        let url = format!("{base}/_matrix/client/v3/rooms/{room}/send/m.room.message/{tag}");
        let ok = call(
            &client,
            reqwest::Method::PUT,
            url,
            &sender,
            Some(json!({"msgtype": "m.text", "body": tag})),
        )
        .await
        .is_ok();
        if !ok {
            send_errors += 1;
        }
    }
    let cpu = cpu_before.zip(process_cpu(pid)).map(|(a, b)| b - a);
    let mut delivery = Vec::new();
    for t in receiver_tasks {
        delivery.extend(t.await.map_err(|e| e.to_string())?);
    }
    for t in idle_tasks {
        let _ = t.await;
    }
    result["delivery"] = summary(&mut delivery);
    result["expected_deliveries"] = json!(total as usize * args.receivers);
    result["send_errors"] = json!(send_errors);
    result["idle_poll_errors"] = json!(idle_errors.load(std::sync::atomic::Ordering::Relaxed));
    result["server_rss_mb_with_idle_polls"] = json!(rss_with_idle);
    result["server_cpu_seconds_delivery_phase"] = json!(cpu.map(|c| c.as_secs_f64()));
    Ok(result)
}
