//! Idle connections: many long-polls held open by users in no busy room, as a server
//! with many connected but quiet clients sees them, and what that costs other requests.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use clap::Args;
use serde_json::{Value, json};

use super::{Api, Common, ServerProbe, next_batch, rss_mb, summary, whoami_probes};

#[derive(Args)]
pub struct IdleArgs {
    #[command(flatten)]
    pub common: Common,
    /// Long-polls held open at once.
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// Users the long-polls are spread over (each one's polls share its sync token).
    #[arg(long, default_value_t = 10)]
    pub users: usize,
    /// `whoami` requests measured before and again while the polls are held.
    #[arg(long, default_value_t = 200)]
    pub probes: usize,
    /// Pause between two probes, in milliseconds.
    #[arg(long, default_value_t = 10)]
    pub probe_interval_ms: u64,
    /// Seconds given to the polls to connect before probing.
    #[arg(long, default_value_t = 3)]
    pub ramp_seconds: u64,
}

/// `n` users for idle long-polls, each with the token of its first sync.
pub(crate) async fn idle_users(
    api: &Api,
    prefix: &str,
    n: usize,
) -> Result<Vec<(String, String)>, String> {
    let mut users = Vec::with_capacity(n);
    for token in api.register_many(prefix, n).await? {
        let since = next_batch(&api.sync(&token, "").await?)?;
        users.push((token, since));
    }
    Ok(users)
}

/// Long-polls held open until `stop`.
pub(crate) struct HeldPolls {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    lost: Arc<AtomicUsize>,
    answered: Arc<AtomicUsize>,
}

/// Holds `count` long-polls open until `stop`, spread over `users` (token, since). A poll
/// the server answers (it has nothing new, so only at its own timeout) is sent again, as
/// a client would; a poll that fails (connection error or error status) counts as lost
/// and is sent again after 100 ms.
pub(crate) fn hold_polls(
    api: &Api,
    users: &[(String, String)],
    count: usize,
    stop: Instant,
) -> HeldPolls {
    let lost = Arc::new(AtomicUsize::new(0));
    let answered = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::with_capacity(count);
    if !users.is_empty() {
        for i in 0..count {
            let (token, mut since) = users[i % users.len()].clone();
            let (api, lost, answered) = (api.clone(), lost.clone(), answered.clone());
            tasks.push(tokio::spawn(async move {
                while Instant::now() < stop {
                    let query = format!("since={since}&timeout=60000");
                    let deadline = tokio::time::Instant::from_std(stop);
                    match tokio::time::timeout_at(deadline, api.sync(&token, &query)).await {
                        Err(_) => break,
                        Ok(Ok(body)) => {
                            answered.fetch_add(1, Relaxed);
                            if let Ok(next) = next_batch(&body) {
                                since = next;
                            }
                        }
                        Ok(Err(_)) => {
                            lost.fetch_add(1, Relaxed);
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            }));
        }
    }
    HeldPolls { tasks, lost, answered }
}

impl HeldPolls {
    /// Ends the polls now; returns how many were lost, answered, and still held.
    pub async fn finish(self) -> (usize, usize, usize) {
        let held = self.tasks.iter().filter(|t| !t.is_finished()).count();
        for task in self.tasks {
            task.abort();
            let _ = task.await;
        }
        (self.lost.load(Relaxed), self.answered.load(Relaxed), held)
    }
}

pub async fn idle(args: IdleArgs) -> Result<Value, String> {
    let api = Api::new(&args.common, args.connections + 4)?;
    let run = std::process::id();
    let pid = args.common.server_pid;
    let users = idle_users(&api, &format!("bench_idle_{run}"), args.users.max(1)).await?;
    let prober = api.register(&format!("bench_prober_{run}")).await?;
    let interval = Duration::from_millis(args.probe_interval_ms);
    let (mut before, mut errors) = whoami_probes(&api, &prober, args.probes, interval).await;
    let rss_before = rss_mb(pid);

    let probe = ServerProbe::start(pid);
    // Room for the ramp, the probes (with 1 s per probe at worst) and a margin.
    let hold = args.ramp_seconds + (args.probes as u64 * (args.probe_interval_ms + 1000)) / 1000;
    let stop = Instant::now() + Duration::from_secs(hold + 2);
    let held = hold_polls(&api, &users, args.connections, stop);
    tokio::time::sleep(Duration::from_secs(args.ramp_seconds)).await;
    let rss_held = rss_mb(pid);
    let (mut under_load, failed) = whoami_probes(&api, &prober, args.probes, interval).await;
    errors += failed;
    let cpu = probe.cpu();
    let (lost, answered, still_held) = held.finish().await;
    Ok(json!({
        "scenario": "idle",
        "params": {"connections": args.connections, "users": args.users, "probes": args.probes,
                   "probe_interval_ms": args.probe_interval_ms,
                   "ramp_seconds": args.ramp_seconds},
        "polls_still_held": still_held,
        "connections_lost": lost,
        "polls_answered_early": answered,
        "whoami_before": summary(&mut before),
        "whoami_under_load": summary(&mut under_load),
        "server_rss_mb_before": rss_before,
        "server_rss_mb_held": rss_held,
        "server_cpu_seconds_held": cpu.map(|c| super::round2(c.as_secs_f64())),
        "errors": errors,
        "server": probe.report(),
    }))
}
