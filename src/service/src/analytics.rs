//! Usage analytics as compact daily aggregates, never by scanning history: messages
//! sent (by this server's users) and received (from other servers) per day and per room,
//! read receipts per day, and the users active each day (from the "last seen" writes,
//! at most one per device every five minutes). Daily and monthly active users, per-room
//! activity and registration cohorts are read from these; Prometheus gets the same
//! figures. Counts gather in memory and are added to the tables every 30 seconds and
//! at shutdown.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use async_trait::async_trait;
use serde::Serialize;
use trellis_core::{
    Result,
    metrics::{Metrics, UsageMetrics},
    now_millis,
};
use trellis_store::{Batch, Db, Direction, Json, Table, catalog};

use crate::{
    pipeline::{Appended, Consumer},
    tables::USERS,
};

/// (day, metric) -> count; days are counted from the Unix epoch (UTC)
const DAILY: Table<(u64, String), u64> = Table::new(&catalog::ANALYTICS_DAILY);
/// (day, user localpart) -> (): who was active that day
pub(crate) const ACTIVE_DAYS: Table<(u64, String), ()> = Table::new(&catalog::USER_ACTIVE_DAYS);
/// (day, room id) -> messages that day
const ROOM_DAYS: Table<(u64, String), u64> = Table::new(&catalog::ROOM_ACTIVITY_DAILY);

const DAY_MS: u64 = 86_400_000;
/// How often gathered counts are written.
pub const FLUSH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);

pub const SENT: &str = "messages_sent";
pub const RECEIVED: &str = "messages_received";
pub const READ: &str = "read_receipts";

/// The day (since the epoch, UTC) of a time in milliseconds.
pub fn day_of(ms: u64) -> u64 {
    ms / DAY_MS
}

/// `YYYY-MM-DD` of a day number.
pub fn date_of(day: u64) -> String {
    // Civil-from-days (Howard Hinnant's algorithm), for dates after 1970.
    let z = i64::try_from(day).unwrap_or(0) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

#[derive(Default)]
struct Pending {
    daily: HashMap<(u64, &'static str), u64>,
    rooms: HashMap<(u64, String), u64>,
}

/// Hours of messages kept in memory for the live dashboard.
const HOURS_KEPT: u64 = 48;
const HOUR_MS: u64 = 3_600_000;

pub struct Analytics {
    db: Db,
    server_suffix: String,
    pending: Mutex<Pending>,
    /// Messages per hour (hour since the epoch -> count) since start-up, the last
    /// [`HOURS_KEPT`].
    hourly: Mutex<std::collections::BTreeMap<u64, u64>>,
    /// One flush at a time (they read, add and write).
    flushing: tokio::sync::Mutex<()>,
    metrics: UsageMetrics,
}

impl Analytics {
    pub fn new(db: Db, server_name: &str, metrics: &Metrics) -> Self {
        Self {
            db,
            server_suffix: format!(":{server_name}"),
            pending: Mutex::default(),
            hourly: Mutex::default(),
            flushing: tokio::sync::Mutex::new(()),
            metrics: metrics.usage.clone(),
        }
    }

    fn count(&self, metric: &'static str, room: Option<&str>) {
        let day = day_of(now_millis());
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        *pending.daily.entry((day, metric)).or_default() += 1;
        if let Some(room) = room {
            *pending.rooms.entry((day, room.to_owned())).or_default() += 1;
        }
    }

    /// Messages per hour over the last `hours` hours (oldest first; the start of each
    /// hour in milliseconds), as counted since start-up.
    pub fn messages_per_hour(&self, hours: u64) -> Vec<(u64, u64)> {
        let now = now_millis() / HOUR_MS;
        let hourly = self.hourly.lock().unwrap_or_else(|p| p.into_inner());
        (now.saturating_sub(hours.min(HOURS_KEPT).saturating_sub(1))..=now)
            .map(|h| (h * HOUR_MS, hourly.get(&h).copied().unwrap_or(0)))
            .collect()
    }

    /// A local user set a read receipt.
    pub fn note_read(&self) {
        self.metrics.read();
        self.count(READ, None);
    }

    /// Adds what was gathered to the tables, and refreshes the active-user gauges.
    pub async fn flush(&self) -> Result<()> {
        let _one = self.flushing.lock().await;
        let pending = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        let mut batch = Batch::new();
        for ((day, metric), n) in pending.daily {
            let key = (day, metric.to_owned());
            let total = DAILY.get(&*self.db, &key)?.unwrap_or(0) + n;
            DAILY.put(&mut batch, &key, &total);
        }
        for (key, n) in pending.rooms {
            let total = ROOM_DAYS.get(&*self.db, &key)?.unwrap_or(0) + n;
            ROOM_DAYS.put(&mut batch, &key, &total);
        }
        crate::commit(&self.db, batch).await?;
        let (day, month) = self.active_users()?;
        self.metrics.active("day", day);
        self.metrics.active("month", month);
        Ok(())
    }

    /// Distinct users active today and in the last 30 days.
    pub fn active_users(&self) -> Result<(usize, usize)> {
        let today = day_of(now_millis());
        Ok((
            self.active_between(today, today)?,
            self.active_between(today.saturating_sub(29), today)?,
        ))
    }

    /// Distinct users active on days `from..=to`.
    fn active_between(&self, from: u64, to: u64) -> Result<usize> {
        let mut users = std::collections::HashSet::new();
        let start = (from, String::new());
        let end = (to.saturating_add(1), String::new());
        for row in ACTIVE_DAYS.scan_range(
            &*self.db,
            std::ops::Bound::Included(&start),
            std::ops::Bound::Excluded(&end),
            Direction::Forward,
        )? {
            let ((_, user), ()) = row?;
            users.insert(user);
        }
        Ok(users.len())
    }

    /// The figures of the last `days` days (today included).
    pub fn report(&self, days: u64) -> Result<Report> {
        let today = day_of(now_millis());
        let first = today.saturating_sub(days.saturating_sub(1));
        let mut daily = Vec::new();
        for day in first..=today {
            let get = |m: &str| DAILY.get(&*self.db, &(day, m.to_owned())).map(|v| v.unwrap_or(0));
            daily.push(Day {
                date: date_of(day),
                active_users: self.active_between(day, day)?,
                messages_sent: get(SENT)?,
                messages_received: get(RECEIVED)?,
                read_receipts: get(READ)?,
            });
        }
        // What has not been flushed yet counts too.
        {
            let pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            for ((day, metric), n) in &pending.daily {
                if let Some(d) =
                    daily.get_mut(usize::try_from(day.saturating_sub(first)).unwrap_or(usize::MAX))
                {
                    match *metric {
                        SENT => d.messages_sent += n,
                        RECEIVED => d.messages_received += n,
                        READ => d.read_receipts += n,
                        _ => {}
                    }
                }
            }
        }
        let mut rooms: HashMap<String, u64> = HashMap::new();
        let start = (first, String::new());
        for row in ROOM_DAYS.scan_range(
            &*self.db,
            std::ops::Bound::Included(&start),
            std::ops::Bound::Unbounded,
            Direction::Forward,
        )? {
            let ((_, room), n) = row?;
            *rooms.entry(room).or_default() += n;
        }
        for ((day, room), n) in &self.pending.lock().unwrap_or_else(|p| p.into_inner()).rooms {
            if *day >= first {
                *rooms.entry(room.clone()).or_default() += n;
            }
        }
        let mut rooms: Vec<RoomActivity> = rooms
            .into_iter()
            .map(|(room_id, messages)| RoomActivity { room_id, messages })
            .collect();
        rooms.sort_by(|a, b| b.messages.cmp(&a.messages).then_with(|| a.room_id.cmp(&b.room_id)));
        rooms.truncate(20);
        let (daily_active_users, monthly_active_users) = self.active_users()?;
        Ok(Report {
            daily_active_users,
            monthly_active_users,
            daily,
            rooms,
            cohorts: self.cohorts(first, today)?,
        })
    }

    /// Users by the day they registered (within the window), and how many of them were
    /// active again 1, 7 and 30 days later.
    fn cohorts(&self, first: u64, today: u64) -> Result<Vec<Cohort>> {
        let mut by_day: std::collections::BTreeMap<u64, Vec<String>> = Default::default();
        for row in USERS.scan_prefix(&*self.db, &(), Direction::Forward)? {
            let (localpart, Json(user)) = row?;
            let day = day_of(user.created_ms);
            if day >= first && !user.guest {
                by_day.entry(day).or_default().push(localpart);
            }
        }
        by_day
            .into_iter()
            .map(|(day, users)| {
                let back = |after: u64| -> Result<Option<usize>> {
                    let target = day + after;
                    if target > today {
                        return Ok(None);
                    }
                    let mut n = 0;
                    for user in &users {
                        if ACTIVE_DAYS.contains(&*self.db, &(target, user.clone()))? {
                            n += 1;
                        }
                    }
                    Ok(Some(n))
                };
                Ok(Cohort {
                    date: date_of(day),
                    registered: users.len(),
                    active_day_1: back(1)?,
                    active_day_7: back(7)?,
                    active_day_30: back(30)?,
                })
            })
            .collect()
    }
}

/// Notes in `batch` that `localpart` was active today.
pub(crate) fn note_active(batch: &mut Batch, localpart: &str) {
    ACTIVE_DAYS.put(batch, &(day_of(now_millis()), localpart.to_owned()), &());
}

#[async_trait]
impl Consumer for Analytics {
    fn name(&self) -> &'static str {
        "analytics"
    }

    async fn on_event(&self, event: &Appended<'_>) -> Result<Option<u64>> {
        let kind = event.pdu.kind.to_string();
        if kind != "m.room.message" && kind != "m.room.encrypted" {
            return Ok(None);
        }
        let local = event.pdu.sender.as_str().ends_with(&self.server_suffix);
        let (metric, direction) = if local { (SENT, "sent") } else { (RECEIVED, "received") };
        self.metrics.message(direction);
        self.count(metric, Some(event.room_id.as_str()));
        let hour = now_millis() / HOUR_MS;
        let mut hourly = self.hourly.lock().unwrap_or_else(|p| p.into_inner());
        *hourly.entry(hour).or_default() += 1;
        hourly.retain(|h, _| *h + HOURS_KEPT > hour);
        Ok(None)
    }
}

/// Runs until the process ends: writes the gathered counts every [`FLUSH_INTERVAL`].
pub async fn run(analytics: Arc<Analytics>) {
    let mut ticker = tokio::time::interval(FLUSH_INTERVAL);
    loop {
        ticker.tick().await;
        if let Err(e) = analytics.flush().await {
            tracing::warn!(error = %e, "writing analytics failed");
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub daily_active_users: usize,
    pub monthly_active_users: usize,
    pub daily: Vec<Day>,
    /// The busiest rooms of the window, by messages.
    pub rooms: Vec<RoomActivity>,
    pub cohorts: Vec<Cohort>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Day {
    pub date: String,
    pub active_users: usize,
    pub messages_sent: u64,
    pub messages_received: u64,
    pub read_receipts: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RoomActivity {
    pub room_id: String,
    pub messages: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Cohort {
    pub date: String,
    pub registered: usize,
    /// `None` until that day has come.
    pub active_day_1: Option<usize>,
    pub active_day_7: Option<usize>,
    pub active_day_30: Option<usize>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_are_named_by_their_utc_date() {
        assert_eq!(date_of(0), "1970-01-01");
        assert_eq!(date_of(day_of(951_782_400_000)), "2000-02-29");
        assert_eq!(date_of(day_of(1_796_515_200_000)), "2026-12-06");
        assert_eq!(date_of(day_of(1_796_515_200_000 - 1)), "2026-12-05");
    }
}
