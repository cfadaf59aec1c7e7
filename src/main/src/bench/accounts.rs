//! Account scenarios: registration throughput, and logins (password hashing) that must
//! not stall other requests.

use std::{
    sync::{Arc, atomic::AtomicUsize},
    time::{Duration, Instant},
};

use clap::Args;
use reqwest::Method;
use serde_json::{Value, json};

use super::{
    Api, Common, PASSWORD, ServerProbe, join_workers, per_second, summary, take_one, whoami_probes,
};

#[derive(Args)]
pub struct RegisterArgs {
    #[command(flatten)]
    pub common: Common,
    /// Accounts to register.
    #[arg(long, default_value_t = 200)]
    pub users: usize,
    /// Registrations in flight at once.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
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
    /// Password of `--user`.
    #[arg(long, default_value = PASSWORD)]
    pub password: String,
}

pub async fn register(args: RegisterArgs) -> Result<Value, String> {
    let api = Api::new(&args.common, args.concurrency)?;
    let prefix = format!("bench_reg_{}", std::process::id());
    let next = Arc::new(AtomicUsize::new(0));
    let remaining = Arc::new(AtomicUsize::new(args.users));
    let probe = ServerProbe::start(args.common.server_pid);
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..args.concurrency.max(1) {
        let (api, prefix, next, remaining) =
            (api.clone(), prefix.clone(), next.clone(), remaining.clone());
        workers.push(tokio::spawn(async move {
            let (mut latencies, mut errors) = (Vec::new(), 0);
            while take_one(&remaining) {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let t = Instant::now();
                match api.register(&format!("{prefix}_{i}")).await {
                    Ok(_) => latencies.push(t.elapsed()),
                    Err(e) => {
                        errors += 1;
                        eprintln!("{e}");
                    }
                }
            }
            (latencies, errors)
        }));
    }
    let (mut latencies, errors) = join_workers(workers).await?;
    let elapsed = started.elapsed();
    Ok(json!({
        "scenario": "register",
        "params": {"users": args.users, "concurrency": args.concurrency},
        "users_per_second": per_second(latencies.len(), elapsed),
        "register_latency": summary(&mut latencies),
        "errors": errors,
        "server": probe.report(),
    }))
}

pub async fn login_storm(args: LoginStormArgs) -> Result<Value, String> {
    let api = Api::new(&args.common, args.concurrency)?;
    let user = match args.user.clone() {
        Some(u) => u,
        None => {
            let name = format!("bench_login_{}", std::process::id());
            api.register(&name).await?;
            name
        }
    };
    let login_body = json!({"type": "m.login.password",
        "identifier": {"type": "m.id.user", "user": user}, "password": args.password});
    let login_path = "/_matrix/client/v3/login";
    let (status, body) = api.request(Method::POST, login_path, None, Some(&login_body)).await?;
    let token = match (status, body["access_token"].as_str()) {
        (200, Some(t)) => t.to_owned(),
        _ => return Err(format!("logging in: {status} {body}")),
    };
    let (mut idle, mut errors) =
        whoami_probes(&api, &token, args.idle_probes, Duration::ZERO).await;

    // The storm: `concurrency` workers share `logins` logins.
    let remaining = Arc::new(AtomicUsize::new(args.logins));
    let probe = ServerProbe::start(args.common.server_pid);
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..args.concurrency.max(1) {
        let (api, body, remaining) = (api.clone(), login_body.clone(), remaining.clone());
        workers.push(tokio::spawn(async move {
            let (mut latencies, mut failures) = (Vec::new(), 0);
            while take_one(&remaining) {
                let t = Instant::now();
                match api.request(Method::POST, login_path, None, Some(&body)).await {
                    Ok((200, _)) => latencies.push(t.elapsed()),
                    _ => failures += 1,
                }
            }
            (latencies, failures)
        }));
    }
    // Probe whoami until every login is done (bounded by the scenario's time limit).
    let mut during = Vec::new();
    while !workers.iter().all(|w| w.is_finished()) {
        let (latency, failed) = whoami_probes(&api, &token, 1, Duration::from_millis(5)).await;
        during.extend(latency);
        errors += failed;
    }
    let (mut logins, failures) = join_workers(workers).await?;
    let elapsed = started.elapsed();
    errors += failures;
    Ok(json!({
        "scenario": "login-storm",
        "params": {"logins": args.logins, "concurrency": args.concurrency,
                   "idle_probes": args.idle_probes},
        "logins_per_second": per_second(logins.len(), elapsed),
        "login_latency": summary(&mut logins),
        "whoami_idle": summary(&mut idle),
        "whoami_during_storm": summary(&mut during),
        "errors": errors,
        "server": probe.report(),
    }))
}
