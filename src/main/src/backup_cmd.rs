//! `trellis backup ...` (docs/operations.md). `create` takes the backup itself when the
//! server is stopped, and asks the running server to take it (through the admin API, with
//! the admin access token in `TRELLIS_ADMIN_TOKEN`) when it runs. `list`, `verify` and
//! `prune` work on the repository alone, server running or not; `restore` fills an empty
//! data directory.

use std::{process::ExitCode, time::Duration};

use clap::Subcommand;
use serde_json::Value;
use trellis_core::Config;
use trellis_service::{
    Audit, Client,
    backup::{self, Repository, Sources},
    media::Media,
};

#[derive(Subcommand)]
pub enum BackupCommand {
    /// Take a backup (of the running server, or of a stopped one's data directory).
    Create {
        /// Where to (a directory or s3://bucket/prefix); default `backup.destination`.
        /// A running server always uses its `backup.destination`.
        #[arg(long)]
        to: Option<String>,
        /// The running server's client API; default `http://<server.listen>`.
        #[arg(long)]
        server: Option<String>,
    },
    /// List the backups in the repository, oldest first.
    List {
        #[arg(long)]
        to: Option<String>,
    },
    /// Read every file of a backup back, check it against the manifest, and open its
    /// database read-only.
    Verify {
        /// A backup id, or `latest`.
        #[arg(default_value = "latest")]
        id: String,
        #[arg(long)]
        to: Option<String>,
    },
    /// Put a backup back into the data directory, which must hold no server's data.
    Restore {
        #[arg(default_value = "latest")]
        id: String,
        #[arg(long)]
        to: Option<String>,
    },
    /// Keep the newest backups and remove files only older ones held.
    Prune {
        #[arg(long)]
        keep: usize,
        #[arg(long)]
        to: Option<String>,
    },
}

pub fn run(config: Config, command: BackupCommand) -> ExitCode {
    crate::user_cmd::run_offline(execute(config, command))
}

fn repository(config: &Config, to: Option<String>) -> Result<Repository, String> {
    let destination = to.unwrap_or_else(|| config.backup.destination.clone());
    Repository::open(&destination, &config.backup)
}

fn pretty(value: Result<Value, serde_json::Error>) -> Result<String, String> {
    value.and_then(|v| serde_json::to_string_pretty(&v)).map_err(|e| e.to_string())
}

async fn execute(config: Config, command: BackupCommand) -> Result<String, String> {
    match command {
        BackupCommand::Create { to, server } => {
            let token = std::env::var("TRELLIS_ADMIN_TOKEN").ok().filter(|t| !t.is_empty());
            if token.is_some() || server.is_some() {
                if to.is_some() {
                    return Err("a running server backs up to its backup.destination; \
                                --to is for a stopped server"
                        .into());
                }
                let server = server.unwrap_or_else(|| format!("http://{}", config.server.listen));
                let token = token.ok_or("set TRELLIS_ADMIN_TOKEN to an admin's access token")?;
                return online_create(&server, &token).await;
            }
            let db = crate::user_cmd::open_offline(&config).map_err(|e| {
                if e.contains("LOCK") || e.contains("lock") {
                    format!(
                        "{e}\nthe server is running: set TRELLIS_ADMIN_TOKEN to an admin's \
                         access token and it takes the backup itself"
                    )
                } else {
                    e
                }
            })?;
            let repo = repository(&config, to)?;
            let media = Media::new(&config, db.clone(), None)?;
            let id = backup::new_id();
            let sources = Sources { config: &config, db: &db, media: &media };
            let outcome = backup::create(&sources, &repo, &id, "cli").await;
            let (result, detail) = match &outcome {
                Ok(m) => ("ok", format!("{} to {}", m.id, repo.describe())),
                Err(e) => ("failed", format!("{id} to {}: {e}", repo.describe())),
            };
            Audit::new(db.clone())
                .log(None, "backup_create", &Client::cli(), result, Some(detail))
                .await;
            let manifest = outcome.map_err(|e| e.to_string())?;
            pretty(Ok(manifest.summary()))
        }
        BackupCommand::List { to } => {
            let repo = repository(&config, to)?;
            let list = repo.manifests().await.map_err(|e| e.to_string())?;
            pretty(Ok(list.iter().map(backup::Manifest::summary).collect()))
        }
        BackupCommand::Verify { id, to } => {
            let repo = repository(&config, to)?;
            let verified = backup::verify(&repo, &id, &std::env::temp_dir())
                .await
                .map_err(|e| e.to_string())?;
            let report = pretty(serde_json::to_value(&verified))?;
            if verified.ok() {
                Ok(report)
            } else {
                Err(format!("the backup is damaged:\n{report}"))
            }
        }
        BackupCommand::Restore { id, to } => {
            let repo = repository(&config, to)?;
            let restored = backup::restore(&repo, &id, &config).await.map_err(|e| e.to_string())?;
            pretty(serde_json::to_value(restored))
        }
        BackupCommand::Prune { keep, to } => {
            let repo = repository(&config, to)?;
            pretty(serde_json::to_value(
                backup::prune(&repo, keep).await.map_err(|e| e.to_string())?,
            ))
        }
    }
}

/// Has the running server take a backup, and waits for it.
async fn online_create(server: &str, token: &str) -> Result<String, String> {
    let http = reqwest::Client::new();
    let base = format!("{}/_trellis/admin/v1/backups", server.trim_end_matches('/'));
    let answer = |r: reqwest::Response| async move {
        let status = r.status();
        let body: Value = r.json().await.map_err(|e| format!("{server}: {e}"))?;
        if status.is_success() { Ok(body) } else { Err(format!("{server}: {status}: {body}")) }
    };
    let started = http
        .post(&base)
        .bearer_auth(token)
        .json(&serde_json::json!({}))
        .send()
        .await
        .map_err(|e| format!("{server}: {e}"))?;
    let started = answer(started).await?;
    let id = started["id"].as_str().ok_or("the server answered no backup id")?.to_owned();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let status = http
            .get(format!("{base}/{id}"))
            .bearer_auth(token)
            .send()
            .await
            .map_err(|e| format!("{server}: {e}"))?;
        let status = answer(status).await?;
        match status["state"].as_str() {
            Some("running") => continue,
            Some("failed") => return Err(format!("backup {id} failed: {}", status["error"])),
            _ => return pretty(Ok(status)),
        }
    }
}
