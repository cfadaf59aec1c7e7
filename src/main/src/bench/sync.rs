//! Sync scenarios: initial and incremental sync latency for a user in many rooms, and
//! delivery latency to long-polling receivers.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use clap::Args;
use serde_json::{Value, json};

use super::{Api, Common, ServerProbe, idle, join_all, next_batch, summary};

#[derive(Args)]
pub struct InitialSyncArgs {
    #[command(flatten)]
    pub common: Common,
    /// Rooms of the measured user.
    #[arg(long, default_value_t = 50)]
    pub rooms: usize,
    /// Messages in each of those rooms.
    #[arg(long, default_value_t = 20)]
    pub messages_per_room: usize,
    /// Initial syncs measured.
    #[arg(long, default_value_t = 30)]
    pub samples: usize,
}

#[derive(Args)]
pub struct IncrementalSyncArgs {
    #[command(flatten)]
    pub common: Common,
    /// Rooms of the measured user.
    #[arg(long, default_value_t = 50)]
    pub rooms: usize,
    /// Messages in each of those rooms before measuring.
    #[arg(long, default_value_t = 5)]
    pub messages_per_room: usize,
    /// Incremental syncs measured of each kind (nothing new; one new message).
    #[arg(long, default_value_t = 100)]
    pub samples: usize,
}

#[derive(Args)]
pub struct DeliveryArgs {
    #[command(flatten)]
    pub common: Common,
    /// Receivers long-polling the room.
    #[arg(long, default_value_t = 20)]
    pub receivers: usize,
    /// Messages per second the sender sends.
    #[arg(long, default_value_t = 20)]
    pub rate: u64,
    /// Length of the sending phase in seconds.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Idle long-polls held open meanwhile, by up to 10 users in no busy room.
    #[arg(long, default_value_t = 0)]
    pub idle: usize,
}

/// A user in `rooms` rooms of `messages` messages each; returns its token and rooms.
async fn user_in_rooms(
    api: &Api,
    name: &str,
    rooms: usize,
    messages: usize,
) -> Result<(String, Vec<String>), String> {
    let token = api.register(name).await?;
    let mut ids = Vec::with_capacity(rooms);
    // Rooms are filled eight at a time.
    for chunk in (0..rooms).collect::<Vec<_>>().chunks(8) {
        let fills = chunk.iter().map(|&r| {
            let (api, token) = (api.clone(), token.clone());
            async move {
                let room = api.create_room(&token, &json!({"name": format!("room {r}")})).await?;
                for m in 0..messages {
                    api.send_text(&token, &room, &format!("s{r}_{m}"), &format!("message {m}"))
                        .await?;
                }
                Ok::<_, String>(room)
            }
        });
        for room in join_all(fills).await? {
            ids.push(room?);
        }
    }
    Ok((token, ids))
}

pub async fn initial_sync(args: InitialSyncArgs) -> Result<Value, String> {
    let api = Api::new(&args.common, 8)?;
    let name = format!("bench_isync_{}", std::process::id());
    let (token, _) = user_in_rooms(&api, &name, args.rooms, args.messages_per_room).await?;
    let mut latencies = Vec::with_capacity(args.samples);
    let (mut errors, mut rooms_seen) = (0, 0);
    let probe = ServerProbe::start(args.common.server_pid);
    for _ in 0..args.samples {
        match api.sync_timed(&token, "").await {
            Ok((elapsed, body)) => {
                latencies.push(elapsed);
                rooms_seen = body["rooms"]["join"].as_object().map_or(0, |r| r.len());
            }
            Err(_) => errors += 1,
        }
    }
    Ok(json!({
        "scenario": "initial-sync",
        "params": {"rooms": args.rooms, "messages_per_room": args.messages_per_room,
                   "samples": args.samples},
        "rooms_in_answer": rooms_seen,
        "initial_sync": summary(&mut latencies),
        "server_cpu_ms_per_sync": probe.cpu_ms_per(args.samples),
        "errors": errors,
        "server": probe.report(),
    }))
}

pub async fn incremental_sync(args: IncrementalSyncArgs) -> Result<Value, String> {
    let api = Api::new(&args.common, 8)?;
    let run = std::process::id();
    let name = format!("bench_incsync_{run}");
    let (token, rooms) = user_in_rooms(&api, &name, args.rooms, args.messages_per_room).await?;
    let mut since = next_batch(&api.sync(&token, "").await?)?;
    let probe = ServerProbe::start(args.common.server_pid);
    let (mut empty, mut one_new, mut errors) = (Vec::new(), Vec::new(), 0);
    for i in 0..args.samples {
        // Nothing new since the last sync.
        let t = Instant::now();
        match api.sync(&token, &format!("since={since}&timeout=0")).await {
            Ok(body) => {
                empty.push(t.elapsed());
                since = next_batch(&body)?;
            }
            Err(_) => errors += 1,
        }
        // One new message (sent untimed) since the last sync.
        if let Some(room) = rooms.get(i % rooms.len().max(1)) {
            api.send_text(&token, room, &format!("n{run}_{i}"), "new").await?;
            let t = Instant::now();
            match api.sync(&token, &format!("since={since}&timeout=0")).await {
                Ok(body) => {
                    one_new.push(t.elapsed());
                    since = next_batch(&body)?;
                }
                Err(_) => errors += 1,
            }
        }
    }
    Ok(json!({
        "scenario": "incremental-sync",
        "params": {"rooms": args.rooms, "messages_per_room": args.messages_per_room,
                   "samples": args.samples},
        "incremental_sync_nothing_new": summary(&mut empty),
        "incremental_sync_one_message": summary(&mut one_new),
        "errors": errors,
        "server": probe.report(),
    }))
}

/// Message bodies the sender sent, by body, with the moment each send started.
type SentAt = Arc<Mutex<HashMap<String, Instant>>>;
/// Delivery latencies noted by all receivers.
type Delivered = Arc<Mutex<Vec<Duration>>>;

/// Time receivers are given after the last send's answer to see the last messages.
const DELIVERY_GRACE: Duration = Duration::from_secs(5);

/// One receiver: long-polls until it has seen `expected` messages (or is stopped), noting
/// when each tagged message arrives.
async fn receive(api: Api, token: String, sent_at: SentAt, delivered: Delivered, expected: usize) {
    // A filter with room for every message of one poll, so none is cut off the timeline.
    let filter = "filter=%7B%22room%22%3A%7B%22timeline%22%3A%7B%22limit%22%3A100%7D%7D%7D";
    let mut since = match api.sync(&token, filter).await.and_then(|b| next_batch(&b)) {
        Ok(since) => since,
        Err(e) => return eprintln!("receiver: {e}"),
    };
    let mut seen = 0;
    while seen < expected {
        let query = format!("{filter}&since={since}&timeout=5000");
        let body = match api.sync(&token, &query).await {
            Ok(body) => body,
            Err(e) => return eprintln!("receiver: {e}"),
        };
        let received = Instant::now();
        let Ok(next) = next_batch(&body) else { return };
        since = next;
        for room in body["rooms"]["join"].as_object().into_iter().flat_map(|r| r.values()) {
            for event in room["timeline"]["events"].as_array().into_iter().flatten() {
                let Some(tag) = event["content"]["body"].as_str() else { continue };
                let sent = sent_at.lock().ok().and_then(|m| m.get(tag).copied());
                if let (Some(sent), Ok(mut delivered)) = (sent, delivered.lock()) {
                    delivered.push(received.saturating_duration_since(sent));
                    seen += 1;
                }
            }
        }
    }
}

pub async fn delivery(args: DeliveryArgs) -> Result<Value, String> {
    let api = Api::new(&args.common, args.idle + args.receivers + 8)?;
    let run = std::process::id();
    let sender = api.register(&format!("bench_sender_{run}")).await?;
    let room = api.create_room(&sender, &json!({"preset": "public_chat"})).await?;
    let receivers = api.register_many(&format!("bench_recv_{run}"), args.receivers).await?;
    for token in &receivers {
        api.join(token, &room).await?;
    }
    // Idle polls are spread over up to 10 quiet users.
    let bystanders = format!("bench_bystander_{run}");
    let idle_users = idle::idle_users(&api, &bystanders, args.idle.min(10)).await?;
    // Idle polls are held until the scenario's own time limit at most, and ended after
    // the deliveries.
    let limit = Instant::now() + Duration::from_secs(args.common.max_seconds);
    let held = idle::hold_polls(&api, &idle_users, args.idle, limit);
    if args.idle > 0 {
        tokio::time::sleep(Duration::from_secs(2)).await;
    }

    let sent_at: SentAt = Arc::default();
    let delivered: Delivered = Arc::default();
    let total = (args.rate * args.seconds) as usize;
    let receivers: Vec<_> = receivers
        .into_iter()
        .map(|token| {
            tokio::spawn(receive(api.clone(), token, sent_at.clone(), delivered.clone(), total))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Open loop: each message is sent at its time whether or not earlier sends have been
    // answered, so a slow server faces the same offered rate.
    let probe = ServerProbe::start(args.common.server_pid);
    let start = tokio::time::Instant::now();
    let mut sends = tokio::task::JoinSet::new();
    for k in 0..total {
        let due = start + Duration::from_secs_f64(k as f64 / args.rate.max(1) as f64);
        tokio::time::sleep_until(due).await;
        let tag = format!("d{run}_{k}");
        // Delivery is measured from the moment the send starts (a receiver may see the
        // event before the sender has its answer), so it includes the send itself.
        let started = Instant::now();
        if let Ok(mut m) = sent_at.lock() {
            m.insert(tag.clone(), started);
        }
        let (api, sender, room) = (api.clone(), sender.clone(), room.clone());
        sends.spawn(async move {
            api.send_text(&sender, &room, &tag, &tag).await.map(|()| started.elapsed())
        });
    }
    let (mut send_latency, mut send_errors) = (Vec::with_capacity(total), 0usize);
    while let Some(sent) = sends.join_next().await {
        match sent {
            Ok(Ok(latency)) => send_latency.push(latency),
            _ => send_errors += 1,
        }
    }
    let cpu = probe.cpu();
    let grace = tokio::time::Instant::now() + DELIVERY_GRACE;
    for mut receiver in receivers {
        if tokio::time::timeout_at(grace, &mut receiver).await.is_err() {
            receiver.abort();
        }
    }
    let (idle_lost, _, _) = held.finish().await;
    let mut delivered = delivered.lock().map(|d| d.clone()).unwrap_or_default();
    let expected = total * args.receivers;
    Ok(json!({
        "scenario": "delivery",
        "params": {"receivers": args.receivers, "rate": args.rate, "seconds": args.seconds,
                   "idle": args.idle},
        "expected_deliveries": expected,
        "missed_deliveries": expected.saturating_sub(delivered.len()),
        "delivery": summary(&mut delivered),
        "send_latency": summary(&mut send_latency),
        "idle_polls_lost": idle_lost,
        "server_cpu_seconds_sending_phase": cpu.map(|c| super::round2(c.as_secs_f64())),
        "errors": send_errors,
        "server": probe.report(),
    }))
}
