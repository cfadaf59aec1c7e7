//! Reports to the server's moderators: users report an event, a room (spec v1.13) or a
//! user (v1.14); admins list, read and delete them through the Synapse-compatible admin
//! API (`/_synapse/admin/v1/event_reports`), which moderation tools already speak.

use std::sync::Arc;

use ruma::{EventId, RoomId, UserId};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use trellis_core::{Error, ErrorKind, Result, error::code, now_millis};
use trellis_store::{Batch, Direction, Json, Table, catalog};

use crate::{Services, audit::Client, rooms::viewer::Viewer};

/// report id -> the report
const REPORTS: Table<u64, Json<Report>> = Table::new(&catalog::REPORTS);

/// A reason longer than this is refused: reports are read by people.
const MAX_REASON_BYTES: usize = 10_000;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub reporter: String,
    /// The room of a reported event or room.
    pub room_id: Option<String>,
    pub event_id: Option<String>,
    /// The reported user.
    pub user_id: Option<String>,
    pub reason: Option<String>,
    /// Reports of clients older than spec v1.16, which sent a score.
    pub score: Option<i64>,
    pub received_ms: u64,
    /// Where the moderators are with it.
    #[serde(default)]
    pub triage: Triage,
}

/// The moderators' handling of a report.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Triage {
    /// `open` (new), `assigned` or `resolved`.
    pub status: Status,
    /// The admin it is assigned to (a user id).
    pub assignee: Option<String>,
    pub notes: Vec<Note>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    #[default]
    Open,
    Assigned,
    Resolved,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Note {
    /// The admin who wrote it (a user id).
    pub author: String,
    pub ts: u64,
    pub text: String,
}

/// A change an admin makes to a report's handling.
#[derive(Debug, Clone, Default)]
pub struct TriageChange {
    pub status: Option<Status>,
    /// `Some(None)` unassigns.
    pub assignee: Option<Option<String>>,
    pub note: Option<String>,
}

/// Serialises new ids (the next after the newest).
static NEXT_ID: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn check_reason(reason: Option<&str>) -> Result<()> {
    if reason.is_some_and(|r| r.len() > MAX_REASON_BYTES) {
        return Err(Error::invalid_param(format!(
            "The reason is longer than {MAX_REASON_BYTES} bytes"
        )));
    }
    Ok(())
}

async fn store(services: &Services, report: Report, client: &Client) -> Result<u64> {
    let _guard = NEXT_ID.lock().await;
    let newest = REPORTS.scan_prefix(&*services.db, &(), Direction::Backward)?.next();
    let id = match newest {
        Some(row) => row?.0 + 1,
        None => 1,
    };
    let localpart = services.accounts.local_part(&report.reporter).map(str::to_owned);
    let mut batch = Batch::new();
    REPORTS.put(&mut batch, &id, &Json(report));
    services.audit.add(
        &mut batch,
        localpart.as_deref(),
        "report",
        client,
        "ok",
        Some(id.to_string()),
    );
    crate::commit(&services.db, batch).await?;
    tracing::info!(report = id, "report received");
    Ok(id)
}

/// `POST /rooms/{roomId}/report/{eventId}`: only an event the reporter may see (else
/// 404, which does not tell whether it exists).
pub async fn report_event(
    services: &Arc<Services>,
    reporter: &UserId,
    room_id: &RoomId,
    event_id: &EventId,
    reason: Option<String>,
    client: &Client,
) -> Result<()> {
    check_reason(reason.as_deref())?;
    let (room, user) = (room_id.as_str(), reporter.as_str());
    let seen = Viewer::load(services, reporter.localpart()).and_then(|viewer| {
        viewer.reader(services, room, user)?.event(services, room, event_id.as_str()).map(drop)
    });
    if let Err(e) = seen {
        return Err(match e.kind {
            ErrorKind::Forbidden | ErrorKind::NotFound => {
                Error::not_found("The event does not exist or you cannot see it")
            }
            _ => e,
        });
    }
    let report = Report {
        reporter: user.to_owned(),
        room_id: Some(room.to_owned()),
        event_id: Some(event_id.to_string()),
        user_id: None,
        reason,
        score: None,
        received_ms: now_millis(),
        triage: Triage::default(),
    };
    store(services, report, client).await.map(drop)
}

/// `POST /rooms/{roomId}/report` (v1.13): a room this server knows.
pub async fn report_room(
    services: &Services,
    reporter: &UserId,
    room_id: &RoomId,
    reason: String,
    client: &Client,
) -> Result<()> {
    check_reason(Some(&reason))?;
    if services.rooms.room(room_id.as_str())?.is_none() {
        return Err(Error::not_found("Unknown room"));
    }
    let report = Report {
        reporter: reporter.to_string(),
        room_id: Some(room_id.to_string()),
        event_id: None,
        user_id: None,
        reason: Some(reason),
        score: None,
        received_ms: now_millis(),
        triage: Triage::default(),
    };
    store(services, report, client).await.map(drop)
}

/// `POST /users/{userId}/report` (v1.14): a user of this server that exists, or a user of
/// another server.
pub async fn report_user(
    services: &Services,
    reporter: &UserId,
    user_id: &UserId,
    reason: String,
    client: &Client,
) -> Result<()> {
    check_reason(Some(&reason))?;
    if let Some(localpart) = services.accounts.local_part(user_id.as_str())
        && services.accounts.user(localpart)?.is_none()
    {
        return Err(Error::not_found("Unknown user"));
    }
    let report = Report {
        reporter: reporter.to_string(),
        room_id: None,
        event_id: None,
        user_id: Some(user_id.to_string()),
        reason: Some(reason),
        score: None,
        received_ms: now_millis(),
        triage: Triage::default(),
    };
    store(services, report, client).await.map(drop)
}

/// A report the server itself files (the content policy flagged something).
pub async fn flag(
    services: &Services,
    room_id: Option<&str>,
    event_id: Option<&str>,
    user_id: Option<&str>,
    reason: String,
) -> Result<u64> {
    let report = Report {
        reporter: services.server_name().to_owned(),
        room_id: room_id.map(str::to_owned),
        event_id: event_id.map(str::to_owned),
        user_id: user_id.map(str::to_owned),
        reason: Some(reason),
        score: None,
        received_ms: now_millis(),
        triage: Triage::default(),
    };
    store(services, report, &Client::default()).await
}

/// What the admin API lists: filters and a page.
#[derive(Debug, Default)]
pub struct ListQuery {
    pub from: u64,
    pub limit: usize,
    /// Newest first (`b`, the default) or oldest first.
    pub forwards: bool,
    pub reporter: Option<String>,
    pub room_id: Option<String>,
    pub status: Option<Status>,
}

/// A report as Synapse's admin API shows it.
fn describe(services: &Services, id: u64, report: &Report, with_event: bool) -> Result<Value> {
    let mut out = json!({
        "id": id,
        "received_ts": report.received_ms,
        "room_id": report.room_id,
        "event_id": report.event_id,
        "user_id": report.reporter,
        "reason": report.reason,
        "score": report.score,
        "target_user_id": report.user_id,
        "status": report.triage.status,
        "assignee": report.triage.assignee,
        "notes": report.triage.notes,
    });
    if let Some(room_id) = &report.room_id {
        let rooms = &services.rooms;
        out["name"] = json!(rooms.state_text(room_id, "m.room.name", "name")?);
        out["canonical_alias"] =
            json!(rooms.state_text(room_id, "m.room.canonical_alias", "alias")?);
    }
    if let Some(event_id) = &report.event_id
        && let Some(event) = services.rooms.event(event_id)?
    {
        out["sender"] = event.json["sender"].clone();
        if with_event {
            out["event_json"] = event.json;
        }
    }
    Ok(out)
}

/// The admin API's list: a page of reports, the total matching and the next `from`.
pub fn list(services: &Services, query: &ListQuery) -> Result<(Vec<Value>, usize, Option<u64>)> {
    let direction = if query.forwards { Direction::Forward } else { Direction::Backward };
    let mut matching = Vec::new();
    for row in REPORTS.scan_prefix(&*services.db, &(), direction)? {
        let (id, Json(report)) = row?;
        let wanted = query.reporter.as_ref().is_none_or(|u| *u == report.reporter)
            && query.room_id.as_ref().is_none_or(|r| report.room_id.as_ref() == Some(r))
            && query.status.is_none_or(|s| s == report.triage.status);
        if wanted {
            matching.push((id, report));
        }
    }
    let total = matching.len();
    let start = usize::try_from(query.from).unwrap_or(usize::MAX).min(total);
    let end = start.saturating_add(query.limit).min(total);
    let page = matching[start..end]
        .iter()
        .map(|(id, report)| describe(services, *id, report, false))
        .collect::<Result<Vec<_>>>()?;
    let next = (end < total).then_some(end as u64);
    Ok((page, total, next))
}

/// One report with its event, for the admin API.
pub fn get(services: &Services, id: u64) -> Result<Value> {
    let Json(report) =
        REPORTS.get(&*services.db, &id)?.ok_or_else(|| Error::not_found("No such report"))?;
    describe(services, id, &report, true)
}

/// Changes a report's handling (status, assignee, a note); returns it as listed.
pub async fn triage(
    services: &Services,
    id: u64,
    change: TriageChange,
    admin: &str,
    client: &Client,
) -> Result<Value> {
    let _guard = NEXT_ID.lock().await;
    let Json(mut report) =
        REPORTS.get(&*services.db, &id)?.ok_or_else(|| Error::not_found("No such report"))?;
    if let Some(assignee) = change.assignee {
        report.triage.assignee = assignee;
        if report.triage.assignee.is_some() && report.triage.status == Status::Open {
            report.triage.status = Status::Assigned;
        }
    }
    if let Some(status) = change.status {
        report.triage.status = status;
    }
    if let Some(text) = change.note {
        check_reason(Some(&text))?;
        let author = services.accounts.user_id(admin);
        report.triage.notes.push(Note { author, ts: now_millis(), text });
    }
    let mut batch = Batch::new();
    REPORTS.put(&mut batch, &id, &Json(report.clone()));
    let detail = Some(format!("{id}: {:?}", report.triage.status));
    services.audit.add(&mut batch, Some(admin), "report_triage", client, "ok", detail);
    crate::commit(&services.db, batch).await?;
    describe(services, id, &report, false)
}

/// Deletes a report (the admin dealt with it).
pub async fn delete(services: &Services, id: u64, admin: &str, client: &Client) -> Result<()> {
    if REPORTS.get(&*services.db, &id)?.is_none() {
        return Err(Error::new(ErrorKind::NotFound, code::NOT_FOUND, "No such report"));
    }
    let mut batch = Batch::new();
    REPORTS.delete(&mut batch, &id);
    services.audit.add(
        &mut batch,
        Some(admin),
        "report_delete",
        client,
        "ok",
        Some(id.to_string()),
    );
    crate::commit(&services.db, batch).await
}
