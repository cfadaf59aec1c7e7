//! Two-server scenario: a room on one homeserver with many members, joined by a user of
//! another homeserver over federation (timed), who then sends messages into it while a
//! user of the first server long-polls: how fast the first server takes in the events
//! its peer sends (PDUs/s) and how long each takes from send to sync.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use clap::Args;
use reqwest::Method;
use serde_json::{Value, json};

use super::{Api, Common, ServerProbe, join_all, next_batch, per_second, round2, summary};

#[derive(Args)]
pub struct FederationArgs {
    /// `--base-url`: the server hosting the room (and `--server-pid` its process).
    #[command(flatten)]
    pub common: Common,
    /// Client API of the other server, whose user joins the room and sends.
    #[arg(long)]
    pub peer_url: String,
    /// Members the room has (registered on the hosting server) before the join.
    #[arg(long, default_value_t = 100)]
    pub members: usize,
    /// Messages the joined user sends.
    #[arg(long, default_value_t = 1000)]
    pub messages: usize,
    /// Sends in flight at once.
    #[arg(long, default_value_t = 10)]
    pub concurrency: usize,
}

/// A timeline limit no poll exceeds, so no message is cut off.
const FILTER: &str = "filter=%7B%22room%22%3A%7B%22timeline%22%3A%7B%22limit%22%3A1000%7D%7D%7D";

pub async fn federation(args: FederationArgs) -> Result<Value, String> {
    let host = Api::new(&args.common, args.concurrency + 8)?;
    let peer = Api { base: args.peer_url.trim_end_matches('/').to_owned(), ..host.clone() };
    let run = std::process::id();

    // The room, with its members, on the hosting server.
    let owner = host.register(&format!("bench_fed_owner_{run}")).await?;
    let room = host.create_room(&owner, &json!({"preset": "public_chat"})).await?;
    // Room ids have `!` and `:`, both fine in a path segment.
    let room_path = room.clone();
    // The hosting server's name, from its user's id (room ids of version 12 have none).
    let whoami = host.call(Method::GET, "/_matrix/client/v3/account/whoami", &owner, None).await?;
    let server = whoami["user_id"]
        .as_str()
        .and_then(|u| u.split_once(':'))
        .map(|(_, s)| s.to_owned())
        .ok_or("whoami without a user id")?;
    let members = host.register_many(&format!("bench_fed_m{run}"), args.members).await?;
    for chunk in members.chunks(8) {
        let joins = chunk.iter().map(|token| {
            let (api, token, room) = (host.clone(), token.clone(), room_path.clone());
            async move { api.join(&token, &room).await }
        });
        for joined in join_all(joins).await? {
            joined?;
        }
    }

    // The peer's user joins over federation.
    let joiner = peer.register(&format!("bench_fed_joiner_{run}")).await?;
    let probe = ServerProbe::start(args.common.server_pid);
    let started = Instant::now();
    let path = format!("/_matrix/client/v3/join/{room_path}?server_name={server}");
    peer.call(Method::POST, &path, &joiner, Some(&json!({}))).await?;
    let join_ms = round2(started.elapsed().as_secs_f64() * 1000.0);
    let join_server = probe.report();

    // The owner long-polls while the joiner sends.
    let since = next_batch(&host.sync(&owner, &format!("{FILTER}&timeout=0")).await?)?;
    let seen: Arc<Mutex<HashMap<usize, Instant>>> = Arc::default();
    let receiver = {
        let (api, owner, seen, room) = (host.clone(), owner.clone(), seen.clone(), room.clone());
        let wanted = args.messages;
        tokio::spawn(async move { receive(api, owner, room, since, seen, wanted).await })
    };
    let probe = ServerProbe::start(args.common.server_pid);
    let sent: Arc<Mutex<HashMap<usize, Instant>>> = Arc::default();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let first_send = Instant::now();
    let senders = (0..args.concurrency.max(1)).map(|_| {
        let (api, token, room) = (peer.clone(), joiner.clone(), room_path.clone());
        let (sent, next, total) = (sent.clone(), next.clone(), args.messages);
        async move {
            let mut errors = 0;
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= total {
                    return errors;
                }
                let start = Instant::now();
                sent.lock().unwrap_or_else(|p| p.into_inner()).insert(i, start);
                let txn = format!("fed{run}_{i}");
                if api.send_text(&token, &room, &txn, &format!("fed {i}")).await.is_err() {
                    errors += 1;
                }
            }
        }
    });
    let errors: usize = join_all(senders).await?.into_iter().sum();
    let send_seconds = first_send.elapsed();
    // Receiving ends when every message is seen or 30 s after the last send.
    let _ = tokio::time::timeout(Duration::from_secs(30), receiver).await;
    let seen = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let sent = sent.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut latencies: Vec<Duration> = seen
        .iter()
        .filter_map(|(i, at)| sent.get(i).map(|s| at.saturating_duration_since(*s)))
        .collect();
    let last_seen = seen.values().max().copied().unwrap_or(first_send);
    Ok(json!({
        "scenario": "federation",
        "params": {"members": args.members, "messages": args.messages, "concurrency": args.concurrency},
        "join_ms": join_ms,
        "join_server": join_server,
        "sent_per_second": per_second(args.messages, send_seconds),
        "received_per_second": per_second(seen.len(), last_seen.saturating_duration_since(first_send)),
        "delivery": summary(&mut latencies),
        "missed": args.messages.saturating_sub(seen.len()),
        "errors": errors,
        "server": probe.report(),
        "server_cpu_ms_per_pdu": probe.cpu_ms_per(seen.len()),
    }))
}

/// Long-polls `room` until `wanted` messages `fed <i>` have been seen; records when each was.
async fn receive(
    api: Api,
    token: String,
    room: String,
    mut since: String,
    seen: Arc<Mutex<HashMap<usize, Instant>>>,
    wanted: usize,
) -> Result<(), String> {
    loop {
        let sync = api.sync(&token, &format!("{FILTER}&timeout=10000&since={since}")).await?;
        let now = Instant::now();
        let events = sync["rooms"]["join"][&room]["timeline"]["events"].as_array().cloned();
        let mut seen_now = seen.lock().unwrap_or_else(|p| p.into_inner());
        for event in events.unwrap_or_default() {
            let index = event["content"]["body"]
                .as_str()
                .and_then(|b| b.strip_prefix("fed "))
                .and_then(|i| i.parse::<usize>().ok());
            if let Some(i) = index {
                seen_now.entry(i).or_insert(now);
            }
        }
        if seen_now.len() >= wanted {
            return Ok(());
        }
        drop(seen_now);
        since = next_batch(&sync)?;
    }
}
