//! Reading the audit log (`/_trellis/admin/v1/audit`) and keeping it to its retention.

use std::ops::Bound;

use serde::Serialize;
use trellis_core::{Error, Result, now_millis};
use trellis_store::{Batch, Direction, Json};

use crate::{Services, tables::AUDIT_LOG};

/// One record as admins read it.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// `<milliseconds>_<sequence>`: the record's place, and a paging token.
    pub id: String,
    pub ts: u64,
    /// The acting user's id (or the name tried, or `cli` for the command line).
    pub actor: Option<String>,
    pub action: String,
    pub client_ip: Option<String>,
    pub outcome: String,
    pub detail: Option<String>,
}

/// Which records to read.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    /// A user id or localpart: records of that actor only.
    pub actor: Option<String>,
    /// Records of this action only.
    pub action: Option<String>,
    /// A part of the record's detail (the target: a user, room, report...).
    pub target: Option<String>,
    pub from_ts: Option<u64>,
    pub until_ts: Option<u64>,
    /// Continue after this record id (from a previous page).
    pub after: Option<String>,
    pub forwards: bool,
    pub limit: usize,
}

fn parse_id(id: &str) -> Result<(u64, u64)> {
    id.split_once('_')
        .and_then(|(ms, seq)| Some((ms.parse().ok()?, seq.parse().ok()?)))
        .ok_or_else(|| Error::invalid_param("from is not a record id from a previous page"))
}

/// A page of records, newest first unless `forwards`, with the id to continue from.
pub fn query(services: &Services, q: &AuditQuery) -> Result<(Vec<Entry>, Option<String>)> {
    let actor = q.actor.as_deref().map(|a| {
        services.accounts.local_part(a).map(str::to_owned).unwrap_or_else(|| a.to_owned())
    });
    let after = q.after.as_deref().map(parse_id).transpose()?;
    let low = (q.from_ts.unwrap_or(0), 0);
    let high = (q.until_ts.unwrap_or(u64::MAX), u64::MAX);
    let (start, end, direction) = match (q.forwards, &after) {
        (true, Some(a)) => (Bound::Excluded(a), Bound::Included(&high), Direction::Forward),
        (true, None) => (Bound::Included(&low), Bound::Included(&high), Direction::Forward),
        (false, Some(a)) => (Bound::Included(&low), Bound::Excluded(a), Direction::Backward),
        (false, None) => (Bound::Included(&low), Bound::Included(&high), Direction::Backward),
    };
    let mut out = Vec::new();
    for row in AUDIT_LOG.scan_range(&*services.db, start, end, direction)? {
        let ((ms, seq), Json(record)) = row?;
        if (actor.is_some() && record.actor != actor)
            || q.action.as_ref().is_some_and(|a| *a != record.action)
            || q.target
                .as_ref()
                .is_some_and(|t| !record.detail.as_deref().unwrap_or_default().contains(t.as_str()))
        {
            continue;
        }
        if out.len() == q.limit {
            let next = out.last().map(|e: &Entry| e.id.clone());
            return Ok((out, next));
        }
        let actor = record.actor.map(|a| match a.as_str() {
            "cli" => a,
            _ if a.starts_with('@') => a,
            _ => services.accounts.user_id(&a),
        });
        out.push(Entry {
            id: format!("{ms}_{seq}"),
            ts: ms,
            actor,
            action: record.action,
            client_ip: record.client_ip,
            outcome: record.outcome,
            detail: record.detail,
        });
    }
    Ok((out, None))
}

/// Removes records older than `retention_days` (0 keeps them all); returns how many.
pub async fn sweep(services: &Services, retention_days: u64) -> Result<usize> {
    if retention_days == 0 {
        return Ok(0);
    }
    let cutoff = (now_millis().saturating_sub(retention_days.saturating_mul(86_400_000)), 0);
    let mut removed = 0;
    loop {
        let mut batch = Batch::new();
        let mut n = 0;
        for row in AUDIT_LOG.scan_range(
            &*services.db,
            Bound::Unbounded,
            Bound::Excluded(&cutoff),
            Direction::Forward,
        )? {
            let (key, _) = row?;
            AUDIT_LOG.delete(&mut batch, &key);
            n += 1;
            if n == 10_000 {
                break;
            }
        }
        if n == 0 {
            return Ok(removed);
        }
        crate::commit(&services.db, batch).await?;
        removed += n;
    }
}
