//! The audit log: who did what, from where, when, with what outcome. Kept in a table
//! that admins read later, and mirrored as structured log lines (target `audit`).

use std::sync::atomic::{AtomicU64, Ordering};

use trellis_core::now_millis;
use trellis_store::{Batch, Db, Json};

use crate::tables::{AUDIT_LOG, AuditRecord};

/// Where a request came from, for audit records and per-address limits.
#[derive(Debug, Clone, Default)]
pub struct Client {
    pub ip: Option<String>,
    /// The client's `User-Agent`, cut to [`MAX_USER_AGENT`] bytes.
    pub user_agent: Option<String>,
}

/// User agents are kept to this many bytes.
pub const MAX_USER_AGENT: usize = 512;

impl Client {
    pub fn from_ip(ip: Option<std::net::IpAddr>) -> Self {
        Self { ip: ip.map(|i| i.to_string()), user_agent: None }
    }

    /// With the request's user agent, for "last seen" records.
    pub fn with_user_agent(mut self, user_agent: Option<&str>) -> Self {
        self.user_agent = user_agent.map(|ua| {
            let mut end = ua.len().min(MAX_USER_AGENT);
            while !ua.is_char_boundary(end) {
                end -= 1;
            }
            ua[..end].to_owned()
        });
        self
    }

    /// Actions taken by the command line on the server host.
    pub fn cli() -> Self {
        Self { ip: Some("cli".into()), user_agent: None }
    }
}

pub struct Audit {
    db: Db,
    /// Orders records within one millisecond; starts from the clock so that records
    /// from before a restart never collide with new ones.
    seq: AtomicU64,
}

impl Audit {
    pub fn new(db: Db) -> Self {
        Self { db, seq: AtomicU64::new(now_millis().wrapping_mul(1000)) }
    }

    /// Adds a record to the batch of the action it describes (same atomic write).
    pub fn add(
        &self,
        batch: &mut Batch,
        actor: Option<&str>,
        action: &str,
        client: &Client,
        outcome: &str,
        detail: Option<String>,
    ) {
        tracing::info!(
            target: "audit",
            actor = actor.unwrap_or("-"),
            action,
            client_ip = client.ip.as_deref().unwrap_or("-"),
            outcome,
            detail = detail.as_deref().unwrap_or(""),
        );
        let key = (now_millis(), self.seq.fetch_add(1, Ordering::Relaxed));
        let record = AuditRecord {
            actor: actor.map(str::to_owned),
            action: action.to_owned(),
            client_ip: client.ip.clone(),
            outcome: outcome.to_owned(),
            detail,
        };
        AUDIT_LOG.put(batch, &key, &Json(record));
    }

    /// Writes a record on its own (for attempts that change nothing else).
    pub async fn log(
        &self,
        actor: Option<&str>,
        action: &str,
        client: &Client,
        outcome: &str,
        detail: Option<String>,
    ) {
        let mut batch = Batch::new();
        self.add(&mut batch, actor, action, client, outcome, detail);
        if let Err(e) = crate::commit(&self.db, batch).await {
            tracing::error!(error = %e, "writing the audit log");
        }
    }
}
