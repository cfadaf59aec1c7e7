//! `trellis bench`: load scenarios that drive any homeserver through the standard
//! client-server API only, so Trellis and other servers are measured alike. Each
//! scenario prints one JSON line with its parameters and figures. Every loop is bounded
//! in count and time.
//!
//! The shared pieces live here: the HTTP helper every scenario talks through (one
//! connection pool per run, rate-limit answers honoured and counted, registration that
//! follows user-interactive auth), latency summaries, and the server probe (CPU time and
//! memory of the server's process when it runs on this machine).

use std::{
    process::ExitCode,
    sync::atomic::{AtomicUsize, Ordering::Relaxed},
    time::{Duration, Instant},
};

use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::{Value, json};

mod accounts;
mod appservice;
mod federation;
mod idle;
mod media;
mod push;
mod rooms;
mod search;
mod sfu;
mod sync;
mod turn;

/// The scenarios.
#[derive(Subcommand)]
pub enum BenchCommand {
    /// Registration: `users` accounts registered by `concurrency` clients at once
    /// (`m.login.dummy`, following the server's user-interactive auth); users/s and
    /// latency.
    Register(accounts::RegisterArgs),
    /// Latency of a light authenticated request (`whoami`) while many password logins
    /// run at once: shows whether password hashing stalls other requests.
    LoginStorm(accounts::LoginStormArgs),
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
    /// Initial sync (no `since`) of a user in `rooms` rooms of `messages-per-room`
    /// messages each.
    InitialSync(sync::InitialSyncArgs),
    /// Incremental sync (`timeout=0`) of a user in `rooms` rooms: with nothing new, and
    /// with one new message since the last sync.
    IncrementalSync(sync::IncrementalSyncArgs),
    /// Delivery: `receivers` users long-poll `/sync` in one room while a sender sends
    /// `rate` messages a second for `seconds`; latency from the start of each send until
    /// each receiver's sync returns it. Optionally with `idle` long-polls held beside.
    Delivery(sync::DeliveryArgs),
    /// Idle connections: `connections` long-polls held open by users in no busy room;
    /// latency of a light request (`whoami`) before and under that load, polls lost, and
    /// the server's memory while they are held.
    Idle(idle::IdleArgs),
    /// Media: upload and download throughput of a `size-mb` file beside a plain file
    /// copy, thumbnail latency for a large JPEG, and (with `--server-pid`) server memory
    /// while `clients` upload at once.
    Media(media::MediaArgs),
    /// Application service delivery: `senders` users send `rate` messages a second in a
    /// room the service's bot is in; events/s delivered to the service (the scenario
    /// listens as it) and the delay from each send to its transaction.
    /// `scripts/bench-appservice` starts a server with the matching registration.
    Appservice(appservice::AppserviceArgs),
    /// Push delivery: a room of `members` members, `pushers` of them with an HTTP pusher
    /// at the gateway this scenario plays, while `senders` members send `rate` messages a
    /// second; pushes/s received and the delay from each send to its push.
    /// `scripts/bench-push` starts a server that lets pushers reach loopback.
    Push(push::PushArgs),
    /// Search: `messages` messages of made-up words (natural word frequencies) in
    /// `rooms` rooms, then `POST /search` latency for common and rare words, two words and
    /// a prefix; how far indexing trails sending, and (with `--data-dir`) the index size.
    /// `scripts/bench-search` runs it with and without the index.
    Search(search::SearchArgs),
    /// Two servers: a room of `members` members on the `--base-url` server is joined by a
    /// user of the `--peer-url` server (timed), who then sends `messages` messages while a
    /// member long-polls; PDUs/s the hosting server takes in and send-to-sync latency.
    /// `scripts/bench-federation` starts the two servers with a test CA.
    Federation(federation::FederationArgs),
    /// TURN relay: `calls` users each allocate a relay from `/voip/turnServer`'s
    /// credentials and stream `kbps` of datagrams for `seconds` to an echo peer on
    /// loopback; relayed Mbit/s, loss, round trip through the relay and server CPU per
    /// relayed Mbit. `scripts/bench-turn` starts a server that lets the relay reach
    /// loopback.
    Turn(turn::TurnArgs),
    /// A live stream through the built-in SFU: one publisher of synthetic video, `viewers`
    /// viewers, all on WebRTC's Rust stack in this process, speaking LiveKit's signalling;
    /// delivery, loss, publisher-to-viewer delay and server CPU per forwarded Mbit.
    /// `scripts/bench-sfu-live` starts a server for it.
    SfuLive(sfu::SfuLiveArgs),
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
    /// reports the server's CPU time over the measured phase and its memory (RSS).
    #[arg(long)]
    pub server_pid: Option<u32>,
}

impl BenchCommand {
    fn common(&self) -> &Common {
        match self {
            Self::Register(a) => &a.common,
            Self::LoginStorm(a) => &a.common,
            Self::Send(a) => &a.common,
            Self::Messages(a) => &a.common,
            Self::Join(a) => &a.common,
            Self::InitialSync(a) => &a.common,
            Self::IncrementalSync(a) => &a.common,
            Self::Delivery(a) => &a.common,
            Self::Idle(a) => &a.common,
            Self::Media(a) => &a.common,
            Self::Federation(a) => &a.common,
            Self::Appservice(a) => &a.common,
            Self::Push(a) => &a.common,
            Self::Search(a) => &a.common,
            Self::Turn(a) => &a.common,
            Self::SfuLive(a) => &a.common,
        }
    }

    async fn execute(self) -> Result<Value, String> {
        match self {
            Self::Register(a) => accounts::register(a).await,
            Self::LoginStorm(a) => accounts::login_storm(a).await,
            Self::Send(a) => rooms::send(a).await,
            Self::Messages(a) => rooms::messages(a).await,
            Self::Join(a) => rooms::join(a).await,
            Self::InitialSync(a) => sync::initial_sync(a).await,
            Self::IncrementalSync(a) => sync::incremental_sync(a).await,
            Self::Delivery(a) => sync::delivery(a).await,
            Self::Idle(a) => idle::idle(a).await,
            Self::Media(a) => media::media(a).await,
            Self::Federation(a) => federation::federation(a).await,
            Self::Appservice(a) => appservice::appservice(a).await,
            Self::Push(a) => push::push(a).await,
            Self::Search(a) => search::search(a).await,
            Self::Turn(a) => turn::turn(a).await,
            Self::SfuLive(a) => sfu::sfu_live(a).await,
        }
    }
}

pub fn run(command: BenchCommand) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("trellis bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    let limit = Duration::from_secs(command.common().max_seconds);
    let result = runtime.block_on(async move {
        tokio::time::timeout(limit, command.execute())
            .await
            .map_err(|_| format!("time limit of {} s reached", limit.as_secs()))?
    });
    // Tasks still waiting (held long-polls) are dropped, not awaited.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(mut line) => {
            if let Some(fields) = line.as_object_mut() {
                fields.insert("rate_limited".into(), json!(RATE_LIMITED.load(Relaxed)));
            }
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("trellis bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Rate-limit answers (429) received and waited out, over the whole scenario.
static RATE_LIMITED: AtomicUsize = AtomicUsize::new(0);

/// How often one request is retried after 429 answers before it counts as failed.
const RATE_LIMIT_RETRIES: usize = 20;

/// The password of every account the scenarios register.
pub(crate) const PASSWORD: &str = "bench password 1";

/// The client API of the server under test, over one pool of reused connections.
#[derive(Clone)]
pub(crate) struct Api {
    pub client: reqwest::Client,
    pub base: String,
}

impl Api {
    /// `connections`: how many requests the scenario keeps in flight at once (idle
    /// connections kept for reuse).
    pub fn new(common: &Common, connections: usize) -> Result<Self, String> {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(connections + 4)
            .tcp_nodelay(true)
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self { client, base: common.base_url.trim_end_matches('/').to_owned() })
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends a request and reads its JSON answer (`null` when it has none). A 429 answer
    /// is waited out as its `retry_after_ms` says (1 s without one, 10 s at most) and the
    /// request sent again; every such answer is counted in the scenario's `rate_limited`.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Result<(u16, Value), String> {
        for _ in 0..=RATE_LIMIT_RETRIES {
            let mut req = self.client.request(method.clone(), self.url(path));
            if let Some(token) = token {
                req = req.bearer_auth(token);
            }
            if let Some(body) = body {
                req = req.json(body);
            }
            let resp = req.send().await.map_err(|e| format!("{method} {path}: {e}"))?;
            let status = resp.status().as_u16();
            let value = resp.json().await.unwrap_or(Value::Null);
            if status != 429 {
                return Ok((status, value));
            }
            RATE_LIMITED.fetch_add(1, Relaxed);
            let wait = value["retry_after_ms"].as_u64().unwrap_or(1000).min(10_000);
            tokio::time::sleep(Duration::from_millis(wait)).await;
        }
        Err(format!("{method} {path}: still rate limited after {RATE_LIMIT_RETRIES} retries"))
    }

    /// An authenticated request that must succeed (2xx); returns its JSON answer.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: &str,
        body: Option<&Value>,
    ) -> Result<Value, String> {
        let (status, value) = self.request(method.clone(), path, Some(token), body).await?;
        if !(200..300).contains(&status) {
            return Err(format!("{method} {path}: {status} {value}"));
        }
        Ok(value)
    }

    /// Registers `name` with [`PASSWORD`] through the `m.login.dummy` stage, answering a
    /// 401 user-interactive auth challenge with its session; returns the access token.
    pub async fn register(&self, name: &str) -> Result<String, String> {
        let path = "/_matrix/client/v3/register";
        let mut body =
            json!({"username": name, "password": PASSWORD, "auth": {"type": "m.login.dummy"}});
        for _ in 0..2 {
            let (status, answer) = self.request(Method::POST, path, None, Some(&body)).await?;
            match (status, answer["access_token"].as_str(), answer["session"].as_str()) {
                (200, Some(token), _) => return Ok(token.to_owned()),
                (401, _, Some(session)) => body["auth"]["session"] = json!(session),
                _ => return Err(format!("registering {name}: {status} {answer}")),
            }
        }
        Err(format!("registering {name}: the dummy stage did not complete registration"))
    }

    /// Registers `{prefix}_{i}` for i in 0..n, eight at a time; returns their tokens.
    pub async fn register_many(&self, prefix: &str, n: usize) -> Result<Vec<String>, String> {
        let mut tokens = Vec::with_capacity(n);
        for chunk in (0..n).collect::<Vec<_>>().chunks(8) {
            let batch = chunk.iter().map(|i| {
                let (api, name) = (self.clone(), format!("{prefix}_{i}"));
                async move { api.register(&name).await }
            });
            for token in join_all(batch).await? {
                tokens.push(token?);
            }
        }
        Ok(tokens)
    }

    pub async fn create_room(&self, token: &str, body: &Value) -> Result<String, String> {
        let answer =
            self.call(Method::POST, "/_matrix/client/v3/createRoom", token, Some(body)).await?;
        answer["room_id"].as_str().map(str::to_owned).ok_or_else(|| format!("createRoom: {answer}"))
    }

    pub async fn join(&self, token: &str, room: &str) -> Result<(), String> {
        let path = format!("/_matrix/client/v3/rooms/{room}/join");
        self.call(Method::POST, &path, token, Some(&json!({}))).await.map(drop)
    }

    /// Sends an `m.text` message with transaction id `txn`.
    pub async fn send_text(
        &self,
        token: &str,
        room: &str,
        txn: &str,
        text: &str,
    ) -> Result<(), String> {
        let path = format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/{txn}");
        let body = json!({"msgtype": "m.text", "body": text});
        self.call(Method::PUT, &path, token, Some(&body)).await.map(drop)
    }

    /// `/sync` with the given query string.
    pub async fn sync(&self, token: &str, query: &str) -> Result<Value, String> {
        self.call(Method::GET, &format!("/_matrix/client/v3/sync?{query}"), token, None).await
    }

    /// [`Self::sync`] with the time until its whole answer arrived: the load generator
    /// parsing a large answer into a tree afterwards is not the server's time.
    pub async fn sync_timed(&self, token: &str, query: &str) -> Result<(Duration, Value), String> {
        let path = format!("/_matrix/client/v3/sync?{query}");
        let started = Instant::now();
        let resp = self
            .client
            .get(self.url(&path))
            .bearer_auth(token)
            .send()
            .await
            .map_err(|e| format!("GET {path}: {e}"))?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.map_err(|e| format!("GET {path}: {e}"))?;
        let elapsed = started.elapsed();
        let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if status != 200 {
            return Err(format!("GET {path}: {status} {value}"));
        }
        Ok((elapsed, value))
    }
}

/// The `next_batch` token of a sync answer.
pub(crate) fn next_batch(sync: &Value) -> Result<String, String> {
    sync["next_batch"].as_str().map(str::to_owned).ok_or_else(|| "sync without next_batch".into())
}

/// Runs futures concurrently as tasks and collects their outputs in order.
pub(crate) async fn join_all<F>(futures: impl Iterator<Item = F>) -> Result<Vec<F::Output>, String>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let tasks: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(tasks.len());
    for task in tasks {
        out.push(task.await.map_err(|e| e.to_string())?);
    }
    Ok(out)
}

/// Claims one unit of the remaining work; false when none is left.
pub(crate) fn take_one(remaining: &AtomicUsize) -> bool {
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

/// Rounds to two decimals.
pub(crate) fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

pub(crate) fn per_second(count: usize, elapsed: Duration) -> f64 {
    round2(count as f64 / elapsed.as_secs_f64().max(1e-9))
}

/// Serves `app` on `listen` (the scenario's own end: a gateway, a service) until the
/// run ends.
pub(crate) async fn serve_on(listen: &str, app: axum::Router) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("listening on {listen}: {e}"))?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(())
}

/// What arrived at the scenario's own end (a gateway, a service) of the messages
/// `paced_sends` stamped: their delays and when the first and last arrived.
#[derive(Default)]
pub(crate) struct Arrivals {
    pub delays: Vec<Duration>,
    first: Option<Instant>,
    last: Option<Instant>,
}

impl Arrivals {
    /// A message stamped `bench_sent_us` arrived now.
    pub fn record(&mut self, sent_us: u64) {
        let delay = micros_now().saturating_sub(u128::from(sent_us));
        self.delays.push(Duration::from_micros(u64::try_from(delay).unwrap_or(u64::MAX)));
        let now = Instant::now();
        self.first.get_or_insert(now);
        self.last = Some(now);
    }

    /// Arrivals a second, over the time between the first and the last (or `fallback`).
    pub fn per_second(&self, fallback: Duration) -> f64 {
        let span = match (self.first, self.last) {
            (Some(a), Some(b)) if b > a => (b - a).as_secs_f64(),
            _ => fallback.as_secs_f64(),
        };
        (self.delays.len() as f64 / span.max(0.001)).round()
    }

    /// Waits up to `limit` until `count` arrived.
    pub async fn wait_for(arrivals: &std::sync::Mutex<Self>, count: usize, limit: Duration) {
        let until = Instant::now() + limit;
        while Instant::now() < until {
            if arrivals.lock().unwrap_or_else(|p| p.into_inner()).delays.len() >= count {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Microseconds since the Unix epoch: what `paced_sends` stamps messages with.
fn micros_now() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros())
}

/// `tokens` send into `room`, together `rate` messages a second for `seconds` (open
/// loop), each message stamped with `bench_sent_us` (when its send started) for the
/// receiving end to measure delays by; answers (sent, errors, how long sending took).
pub(crate) async fn paced_sends(
    api: &Api,
    tokens: &[String],
    room: &str,
    rate: u64,
    seconds: u64,
    txn_prefix: &str,
) -> (usize, usize, Duration) {
    let per_sender = (rate as f64 / tokens.len().max(1) as f64).max(0.001);
    let interval = Duration::from_secs_f64(1.0 / per_sender);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let sends = tokens.iter().enumerate().map(|(i, token)| {
        let (api, token, room) = (api.clone(), token.clone(), room.to_owned());
        async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let (mut sent, mut errors) = (0usize, 0usize);
            while Instant::now() < deadline {
                ticker.tick().await;
                let path = format!(
                    "/_matrix/client/v3/rooms/{room}/send/m.room.message/{txn_prefix}{i}_{sent}"
                );
                let body = json!({"msgtype": "m.text", "body": "bench",
                                  "bench_sent_us": micros_now() as u64});
                match api.request(Method::PUT, &path, Some(&token), Some(&body)).await {
                    Ok((200, _)) => sent += 1,
                    _ => errors += 1,
                }
            }
            (sent, errors)
        }
    });
    let results = futures_util::future::join_all(sends).await;
    let sent = results.iter().map(|(s, _)| s).sum();
    let errors = results.iter().map(|(_, e)| e).sum();
    (sent, errors, started.elapsed())
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
    json!({
        "count": samples.len(),
        "p50_ms": round2(pick(0.5)),
        "p95_ms": round2(pick(0.95)),
        "p99_ms": round2(pick(0.99)),
        "max_ms": round2(pick(1.0)),
    })
}

/// Times `probes` calls of `whoami`, `interval` apart; returns latencies and failures.
pub(crate) async fn whoami_probes(
    api: &Api,
    token: &str,
    probes: usize,
    interval: Duration,
) -> (Vec<Duration>, usize) {
    let mut latencies = Vec::with_capacity(probes);
    let mut errors = 0;
    for _ in 0..probes {
        let started = Instant::now();
        match api.call(Method::GET, "/_matrix/client/v3/account/whoami", token, None).await {
            Ok(_) => latencies.push(started.elapsed()),
            Err(_) => errors += 1,
        }
        tokio::time::sleep(interval).await;
    }
    (latencies, errors)
}

/// CPU time (user + system) a process has used so far, from `/proc`.
fn process_cpu(pid: Option<u32>) -> Option<Duration> {
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

/// Resident memory of a process in MB, from `/proc`.
pub(crate) fn rss_mb(pid: Option<u32>) -> Option<f64> {
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

/// The server's CPU time over a measured phase and its memory, when its pid is known.
pub(crate) struct ServerProbe {
    pid: Option<u32>,
    cpu_before: Option<Duration>,
}

impl ServerProbe {
    /// Starts the measured phase.
    pub fn start(pid: Option<u32>) -> Self {
        Self { pid, cpu_before: process_cpu(pid) }
    }

    /// Server CPU time since `start`.
    pub fn cpu(&self) -> Option<Duration> {
        self.cpu_before.zip(process_cpu(self.pid)).map(|(a, b)| b.saturating_sub(a))
    }

    /// Server CPU milliseconds per unit of work (`n` units) since `start`.
    pub fn cpu_ms_per(&self, n: usize) -> Option<f64> {
        self.cpu().map(|c| (c.as_secs_f64() * 1000.0 / n.max(1) as f64 * 1000.0).round() / 1000.0)
    }

    /// `{"cpu_seconds", "rss_mb"}`: CPU since `start` and memory now (nulls without pid).
    pub fn report(&self) -> Value {
        json!({
            "cpu_seconds": self.cpu().map(|c| round2(c.as_secs_f64())),
            "rss_mb": rss_mb(self.pid),
        })
    }
}
