//! `trellis bench`: load scenarios that drive any homeserver through the standard
//! client-server API only, so Trellis and other servers are measured alike. Each
//! scenario prints one JSON line with its parameters and figures. Every loop is bounded
//! in count and time.

use std::{
    process::ExitCode,
    sync::Arc,
    time::{Duration, Instant},
};

use clap::{Args, Subcommand};

mod media;
mod rooms;
mod sync;
use serde_json::{Value, json};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Latency of a light authenticated request (`whoami`) while many password logins
    /// (argon2) run at once: shows whether hashing stalls other requests.
    LoginStorm(LoginStormArgs),
    /// Message sending: `senders` users send `messages` messages in total, spread over
    /// `rooms` rooms they all joined; latency per send, throughput and (with
    /// `--server-pid`) server CPU time per message.
    Send(rooms::SendArgs),
    /// History reading: fills one room with `events` messages, then measures `/messages`
    /// pages of `page` events from random points of its history.
    Messages(rooms::MessagesArgs),
    /// Joining: fills one room with `members` members, then measures `joins` further
    /// users joining it one after another.
    Join(rooms::JoinArgs),
    /// Sync: initial and incremental sync of a user in `rooms` rooms, then delivery
    /// latency to `receivers` long-polling users while `idle` idle long-polls are held.
    Sync(sync::SyncArgs),
    /// Media: upload and download throughput of a `size-mb` file beside a plain file
    /// copy, thumbnail latency for a large JPEG, and (with `--server-pid`) server memory
    /// while `clients` upload at once.
    Media(media::MediaArgs),
}

#[derive(Args)]
pub struct Common {
    /// Base URL of the homeserver's client API.
    #[arg(long, default_value = "http://127.0.0.1:8008")]
    pub base_url: String,
    /// Give up on the whole scenario after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub max_seconds: u64,
    /// The server's process id, when it runs on this machine: the scenario then also
    /// reports the CPU time the server spent on the measured phase.
    #[arg(long)]
    pub server_pid: Option<u32>,
}

/// CPU time (user + system) a process has used so far, from `/proc`.
pub(crate) fn process_cpu(pid: Option<u32>) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid?)).ok()?;
    // Fields after the parenthesised command name; utime and stime are 14th and 15th.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf only reads a system constant.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let per_second = u64::try_from(per_second).ok().filter(|t| *t > 0)?;
    Some(Duration::from_micros(ticks * 1_000_000 / per_second))
}

#[derive(Args)]
pub struct LoginStormArgs {
    #[command(flatten)]
    pub common: Common,
    /// Total logins to perform.
    #[arg(long, default_value_t = 200)]
    pub logins: usize,
    /// Logins in flight at once.
    #[arg(long, default_value_t = 50)]
    pub concurrency: usize,
    /// `whoami` requests measured before the storm (idle baseline).
    #[arg(long, default_value_t = 200)]
    pub idle_probes: usize,
    /// Existing account to log in as; without it one is registered (open registration).
    #[arg(long)]
    pub user: Option<String>,
    #[arg(long, default_value = "bench password 1")]
    pub password: String,
}

pub fn run(command: BenchCommand) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("trellis bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match command {
            BenchCommand::LoginStorm(args) => {
                let limit = Duration::from_secs(args.common.max_seconds);
                tokio::time::timeout(limit, login_storm(args))
                    .await
                    .map_err(|_| "time limit reached".to_owned())?
            }
            BenchCommand::Send(args) => {
                let limit = Duration::from_secs(args.common.max_seconds);
                tokio::time::timeout(limit, rooms::send(args))
                    .await
                    .map_err(|_| "time limit reached".to_owned())?
            }
            BenchCommand::Messages(args) => {
                let limit = Duration::from_secs(args.common.max_seconds);
                tokio::time::timeout(limit, rooms::messages(args))
                    .await
                    .map_err(|_| "time limit reached".to_owned())?
            }
            BenchCommand::Sync(args) => {
                let limit = Duration::from_secs(args.common.max_seconds);
                tokio::time::timeout(limit, sync::sync(args))
                    .await
                    .map_err(|_| "time limit reached".to_owned())?
            }
            BenchCommand::Media(args) => {
                let limit = Duration::from_secs(args.common.max_seconds);
                tokio::time::timeout(limit, media::media(args))
                    .await
                    .map_err(|_| "time limit reached".to_owned())?
            }
            BenchCommand::Join(args) => {
                let limit = Duration::from_secs(args.common.max_seconds);
                tokio::time::timeout(limit, rooms::join(args))
                    .await
                    .map_err(|_| "time limit reached".to_owned())?
            }
        }
    });
    match result {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("trellis bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Claims one unit of the remaining work; false when none is left.
pub(crate) fn take_one(remaining: &std::sync::atomic::AtomicUsize) -> bool {
    use std::sync::atomic::Ordering::Relaxed;
    remaining.fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1)).is_ok()
}

pub(crate) type WorkerResult = (Vec<Duration>, usize);

/// Waits for load workers; returns all their latencies and their error count.
pub(crate) async fn join_workers(
    workers: Vec<tokio::task::JoinHandle<WorkerResult>>,
) -> Result<WorkerResult, String> {
    let mut latencies = Vec::new();
    let mut errors = 0;
    for w in workers {
        let (l, e) = w.await.map_err(|e| e.to_string())?;
        latencies.extend(l);
        errors += e;
    }
    Ok((latencies, errors))
}

/// Latency percentiles in milliseconds.
pub(crate) fn summary(samples: &mut [Duration]) -> Value {
    if samples.is_empty() {
        return json!(null);
    }
    samples.sort();
    let pick = |q: f64| {
        let idx = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples[idx].as_secs_f64() * 1000.0
    };
    let round = |v: f64| (v * 100.0).round() / 100.0;
    json!({
        "count": samples.len(),
        "p50_ms": round(pick(0.5)),
        "p95_ms": round(pick(0.95)),
        "p99_ms": round(pick(0.99)),
        "max_ms": round(pick(1.0)),
    })
}

pub(crate) async fn post(
    client: &reqwest::Client,
    url: &str,
    body: &Value,
) -> Result<(u16, Value), String> {
    let resp = client.post(url).json(body).send().await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let value = resp.json().await.unwrap_or(Value::Null);
    Ok((status, value))
}

async fn login_storm(args: LoginStormArgs) -> Result<Value, String> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency + 4)
        .build()
        .map_err(|e| e.to_string())?;
    let base = args.common.base_url.trim_end_matches('/').to_owned();
    let user = match args.user.clone() {
        Some(u) => u,
        None => {
            let name = format!("bench_{}", std::process::id());
            let (status, body) = post(
                &client,
                &format!("{base}/_matrix/client/v3/register"),
                &json!({"username": name, "password": args.password, "auth": {"type": "m.login.dummy"}}),
            )
            .await?;
            if status != 200 {
                return Err(format!("registering {name}: {status} {body}"));
            }
            name
        }
    };
    let login_body = json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user},
                            "password": args.password});
    let login_url = format!("{base}/_matrix/client/v3/login");
    let (status, body) = post(&client, &login_url, &login_body).await?;
    let token = match (status, body["access_token"].as_str()) {
        (200, Some(t)) => t.to_owned(),
        _ => return Err(format!("logging in: {status} {body}")),
    };
    let whoami_url = format!("{base}/_matrix/client/v3/account/whoami");
    let probe = |client: reqwest::Client, url: String, token: String| async move {
        let started = Instant::now();
        let ok = client
            .get(&url)
            .bearer_auth(&token)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        (started.elapsed(), ok)
    };

    let mut idle = Vec::with_capacity(args.idle_probes);
    let mut errors = 0usize;
    for _ in 0..args.idle_probes {
        let (d, ok) = probe(client.clone(), whoami_url.clone(), token.clone()).await;
        idle.push(d);
        errors += usize::from(!ok);
    }

    // The storm: `concurrency` workers share `logins` logins.
    let remaining = Arc::new(std::sync::atomic::AtomicUsize::new(args.logins));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..args.concurrency.max(1) {
        let (client, url, body, remaining) =
            (client.clone(), login_url.clone(), login_body.clone(), remaining.clone());
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut failures = 0usize;
            while take_one(&remaining) {
                let t = Instant::now();
                match client.post(&url).json(&body).send().await {
                    Ok(r) if r.status().is_success() => latencies.push(t.elapsed()),
                    _ => failures += 1,
                }
            }
            (latencies, failures)
        }));
    }
    // Probe whoami until every login is done.
    let mut during = Vec::new();
    let storm_done = || workers.iter().all(|w| w.is_finished());
    while !storm_done() {
        let (d, ok) = probe(client.clone(), whoami_url.clone(), token.clone()).await;
        during.push(d);
        errors += usize::from(!ok);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (mut logins, failures) = join_workers(workers).await?;
    errors += failures;
    let elapsed = started.elapsed().as_secs_f64();
    Ok(json!({
        "scenario": "login-storm",
        "params": {"logins": args.logins, "concurrency": args.concurrency, "idle_probes": args.idle_probes},
        "logins_per_second": ((logins.len() as f64 / elapsed) * 100.0).round() / 100.0,
        "login_latency": summary(&mut logins),
        "whoami_idle": summary(&mut idle),
        "whoami_during_storm": summary(&mut during),
        "errors": errors,
    }))
}
