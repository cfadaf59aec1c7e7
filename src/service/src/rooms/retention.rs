//! Message retention: a room's `m.room.retention` (`max_lifetime`, in ms) or the server's
//! default, held within the server's bounds, says how long its messages live.
//!
//! An expired message is hidden from every read at once (the visibility view carries the
//! room's cutoff), and the purge job later removes it from storage: the stored event is
//! cut down to its redacted form, which the DAG keeps for its hashes and signatures, and
//! its timeline entry, relation rows, notification rows, search document and the media
//! only it used go. State events never expire: the room's state and auth chain need
//! them.

use std::sync::{Arc, OnceLock};

use serde_json::Value;
use trellis_core::{Result, config::RetentionConfig, now_millis};
use trellis_store::{Batch, Direction, Json};

use super::{
    Rooms,
    reads::{EVENTS, StoredEvent, TIMELINE},
    visibility::EVENT_TIMES,
};

/// Events purged per write, under the room's lock.
const PURGE_BATCH: usize = 500;

/// The server's retention settings, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub enabled: bool,
    pub default_max_ms: u64,
    pub min_ms: u64,
    pub max_ms: u64,
}

impl Limits {
    pub fn from_config(config: &RetentionConfig) -> Self {
        Self {
            enabled: config.enabled,
            default_max_ms: config.default_max_lifetime_seconds.saturating_mul(1000),
            min_ms: config.min_lifetime_seconds.saturating_mul(1000),
            max_ms: config.max_lifetime_seconds.saturating_mul(1000),
        }
    }

    /// How long a room's messages live, in ms, given its policy's `max_lifetime` and
    /// `min_lifetime` (the room asks that messages be kept at least that long); `None`
    /// keeps them forever. The server's bounds have the last word.
    pub fn lifetime(&self, room_max: Option<u64>, room_min: Option<u64>) -> Option<u64> {
        if !self.enabled {
            return None;
        }
        let mut lifetime = room_max.or((self.default_max_ms > 0).then_some(self.default_max_ms))?;
        if let Some(min) = room_min {
            lifetime = lifetime.max(min);
        }
        if self.min_ms > 0 {
            lifetime = lifetime.max(self.min_ms);
        }
        if self.max_ms > 0 {
            lifetime = lifetime.min(self.max_ms);
        }
        Some(lifetime)
    }
}

/// `max_lifetime` of an `m.room.retention` content: a positive integer of ms.
fn policy_max_lifetime(content: &Value) -> Option<u64> {
    policy_field(content, "max_lifetime")
}

fn policy_field(content: &Value, field: &str) -> Option<u64> {
    content.get(field)?.as_u64().filter(|ms| *ms > 0)
}

/// Where a message event refers to media of this server: `url`, `file.url` and the
/// thumbnail's, and `avatar_url`, as `(server, media id)`.
pub fn media_of(content: &Value, server_name: &str) -> Vec<(String, String)> {
    let candidates = [
        content.get("url"),
        content.pointer("/file/url"),
        content.pointer("/info/thumbnail_url"),
        content.pointer("/info/thumbnail_file/url"),
        content.get("avatar_url"),
    ];
    let mut out: Vec<(String, String)> = candidates
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .filter_map(|uri| uri.strip_prefix("mxc://")?.split_once('/'))
        .filter(|(server, id)| *server == server_name && crate::media::valid_media_id(id))
        .map(|(s, id)| (s.to_owned(), id.to_owned()))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The retention settings, set once at start; tools that open the rooms without them
/// honour rooms' policies with no server default or bounds.
#[derive(Default)]
pub struct RetentionSettings(OnceLock<Limits>);

impl RetentionSettings {
    pub fn set(&self, limits: Limits) {
        let _ = self.0.set(limits);
    }

    fn get(&self) -> Limits {
        self.0.get().copied().unwrap_or(Limits { enabled: true, ..Limits::default() })
    }
}

/// What one purge pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Purged {
    pub events: usize,
    pub media: usize,
}

/// An expired message to purge: its short id, stored record and where it sits.
struct Expired {
    short: u64,
    stored: StoredEvent,
    ts: u64,
}

impl Rooms {
    pub fn set_retention(&self, limits: Limits) {
        self.retention.set(limits);
    }

    /// Messages of `room_id` sent (by `origin_server_ts`) before this time in ms are
    /// expired; 0 when nothing expires there.
    pub fn expired_before(&self, room_id: &str) -> Result<u64> {
        let limits = self.retention.get();
        if !limits.enabled {
            return Ok(0);
        }
        let policy = self
            .state_of(room_id, "m.room.retention", "")?
            .and_then(|pdu| serde_json::from_str::<Value>(pdu.content.get()).ok());
        let (room_max, room_min) = match &policy {
            Some(content) => (policy_max_lifetime(content), policy_field(content, "min_lifetime")),
            None => (None, None),
        };
        Ok(limits.lifetime(room_max, room_min).map_or(0, |ms| now_millis().saturating_sub(ms)))
    }

    /// Whether `pdu` in a room whose cutoff is `expired_before` has expired.
    pub fn is_expired(pdu: &super::Pdu, expired_before: u64) -> bool {
        expired_before > 0
            && pdu.state_key.is_none()
            && u64::from(pdu.origin_server_ts.get()) < expired_before
    }

    /// Up to `limit` expired messages of room `room` (short id) older than `before`,
    /// after the `EVENT_TIMES` key `after` (state events are passed over, so each batch
    /// goes on where the last one stopped); with the key to go on from.
    fn expired_in(
        &self,
        room: u64,
        before: u64,
        after: (u64, u64),
        limit: usize,
    ) -> Result<(Vec<Expired>, (u64, u64))> {
        let mut out = Vec::new();
        let mut last = after;
        let rows = EVENT_TIMES.scan_range(
            &*self.db,
            std::ops::Bound::Excluded(&(room, after.0, after.1)),
            std::ops::Bound::Excluded(&(room, before, 0)),
            Direction::Forward,
        )?;
        for row in rows {
            let ((_, ts, position), short) = row?;
            last = (ts, position);
            let Some(Json(stored)) = EVENTS.get(&*self.db, &short)? else { continue };
            if stored.json.get("state_key").is_some() {
                continue;
            }
            out.push(Expired { short, stored, ts });
            if out.len() >= limit {
                break;
            }
        }
        Ok((out, last))
    }

    /// The local users with any membership in room `room` (short id), former members
    /// included: any of them may have notification rows there.
    fn local_members_ever(&self, room: u64) -> Result<Vec<String>> {
        let suffix = format!(":{}", self.server_name);
        let mut out = Vec::new();
        for row in super::members::ROOM_MEMBERS.scan_prefix(&*self.db, &room, Direction::Forward)? {
            let ((_, user), _) = row?;
            if user.ends_with(&suffix) {
                out.push(user);
            }
        }
        Ok(out)
    }
}

/// What the purge of one room left to do once its batches are written.
#[derive(Default)]
struct Leftovers {
    /// Search positions to forget.
    positions: Vec<u64>,
    /// Short ids of pruned events, for the compaction.
    shorts: Vec<u64>,
    /// Media the purged events used, to delete if nothing else does.
    media: Vec<(String, String)>,
}

/// Purges every room's expired messages from storage, then compacts what held them so
/// that their content leaves the disk. A room that fails is logged and passed over.
pub async fn purge_expired(services: &Arc<crate::Services>) -> Result<Purged> {
    let mut purged = Purged::default();
    let mut rooms = Vec::new();
    for row in super::reads::ROOMS.scan_range(
        &*services.db,
        std::ops::Bound::Unbounded,
        std::ops::Bound::Unbounded,
        Direction::Forward,
    )? {
        let (short, Json(record)) = row?;
        rooms.push((short, record.room_id));
    }
    let mut left = Leftovers::default();
    for (room, room_id) in rooms {
        match purge_room(services, room, &room_id, &mut left).await {
            Ok(n) => purged.events += n,
            Err(e) => tracing::warn!(room_id, error = %e, "purging a room's expired messages"),
        }
    }
    if let Some(search) = services.search.index() {
        let (search, positions) = (search.clone(), std::mem::take(&mut left.positions));
        tokio::task::spawn_blocking(move || search.forget(&positions))
            .await
            .map_err(|e| trellis_core::Error::internal("search task", e))??;
    }
    purged.media = delete_unused_media(services, std::mem::take(&mut left.media)).await?;
    if !left.shorts.is_empty() {
        let (db, ranges) = (services.db.clone(), runs(&mut left.shorts));
        tokio::task::spawn_blocking(move || EVENTS.compact(&*db, &ranges))
            .await
            .map_err(|e| trellis_core::Error::internal("compaction task", e))??;
    }
    Ok(purged)
}

/// Purges the expired messages of one room, batch by batch under its lock.
async fn purge_room(
    services: &Arc<crate::Services>,
    room: u64,
    room_id: &str,
    left: &mut Leftovers,
) -> Result<usize> {
    let rooms = &services.rooms;
    let before = rooms.expired_before(room_id)?;
    if before == 0 {
        return Ok(0);
    }
    let Some((_, record)) = rooms.room(room_id)? else { return Ok(0) };
    let (_, rules) = record.rules()?;
    let members = rooms.local_members_ever(room)?;
    let mut after = (0, 0);
    let mut total = 0;
    loop {
        let lock = services.timeline.room_lock(room_id);
        let guard = lock.lock().await;
        let (expired, last) = rooms.expired_in(room, before, after, PURGE_BATCH)?;
        after = last;
        if expired.is_empty() {
            return Ok(total);
        }
        let mut batch = Batch::new();
        let mut done = Vec::new();
        for event in &expired {
            let stored = &event.stored;
            let pruned = serde_json::from_value::<ruma::CanonicalJsonObject>(stored.json.clone())
                .map_err(|e| e.to_string())
                .and_then(|o| {
                    ruma::canonical_json::redact(o, &rules.redaction, None)
                        .map_err(|e| e.to_string())
                });
            let pruned = match pruned {
                Ok(pruned) => pruned,
                Err(e) => {
                    // Hidden from every read all the same; looked at again next pass.
                    tracing::warn!(event_id = stored.event_id, error = %e, "an expired event cannot be pruned");
                    continue;
                }
            };
            let content = stored.json.get("content").cloned().unwrap_or(Value::Null);
            let sender = stored.json.get("sender").and_then(Value::as_str).unwrap_or("");
            rooms.unindex_relation(&mut batch, stored, sender, &content)?;
            left.media.extend(crate::media::uses::forget_into(
                &services.db,
                &mut batch,
                &media_of(&content, services.server_name()),
                room_id,
                stored.position,
            )?);
            services.notifier.forget_event_into(&mut batch, room_id, stored.position, &members)?;
            TIMELINE.delete(&mut batch, &(room, stored.position));
            EVENT_TIMES.delete(&mut batch, &(room, event.ts, stored.position));
            let mut kept = stored.clone();
            kept.json = serde_json::to_value(pruned)
                .map_err(|e| trellis_core::Error::internal("pruning an expired event", e))?;
            EVENTS.put(&mut batch, &event.short, &Json(kept));
            done.push((event.short, stored.position));
            // A thread's latest reply falls back to the one before, read from the
            // database: written now, so that the next reply of the same thread purged
            // in this batch does not fall back to this one.
            if content.pointer("/m.relates_to/rel_type").and_then(Value::as_str) == Some("m.thread")
            {
                crate::commit(&services.db, std::mem::take(&mut batch)).await?;
            }
        }
        crate::commit(&services.db, batch).await?;
        for (short, position) in &done {
            rooms.cache.invalidate(short);
            left.shorts.push(*short);
            left.positions.push(*position);
        }
        drop(guard);
        services.notifier.forget_room(room_id);
        total += done.len();
        if expired.len() < PURGE_BATCH {
            return Ok(total);
        }
    }
}

/// Deletes the media in `candidates` that no remembered event uses any more, sparing
/// what may be in use where the index cannot see: protected and quarantined items,
/// profile avatars, and items older than the index (events from before it used them).
async fn delete_unused_media(
    services: &Arc<crate::Services>,
    mut candidates: Vec<(String, String)>,
) -> Result<usize> {
    if candidates.is_empty() {
        return Ok(0);
    }
    candidates.sort();
    candidates.dedup();
    let avatars = crate::admin::media::avatars(services)?;
    let since = services.media.uses_tracked_since();
    let mut deleted = 0;
    for (server, id) in candidates {
        if crate::media::uses::used(&services.db, &server, &id)?
            || avatars.contains(&format!("mxc://{server}/{id}"))
        {
            continue;
        }
        let Ok(record) = services.media.info(&server, &id) else { continue };
        if record.protected || record.quarantined || record.created_ms < since {
            continue;
        }
        match services.media.delete(&server, &id).await {
            Ok(()) => deleted += 1,
            Err(e) => {
                tracing::warn!(media = %id, error = %e, "deleting an expired message's media")
            }
        }
    }
    Ok(deleted)
}

/// `shorts` as ranges of ids close together: the compaction rewrites those stretches of
/// the events table, not everything between the oldest and newest purged event.
fn runs(shorts: &mut [u64]) -> Vec<(u64, u64)> {
    const GAP: u64 = 4096;
    shorts.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &short in shorts.iter() {
        match out.last_mut() {
            Some((_, hi)) if short <= hi.saturating_add(GAP) => *hi = short,
            _ => out.push((short, short)),
        }
    }
    out
}

/// How often the purge looks for expired messages, from the config.
pub async fn run(services: Arc<crate::Services>) {
    use tracing::Instrument;
    let every =
        std::time::Duration::from_secs(services.config.retention.purge_interval_seconds.max(1));
    // The first pass waits one interval: a start has enough to do (the search catch-up).
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        if !services.config.retention.enabled {
            continue;
        }
        let started = std::time::Instant::now();
        let purged = purge_expired(&services).instrument(tracing::info_span!("retention")).await;
        match purged {
            Ok(p) if p.events == 0 => {}
            Ok(p) => tracing::info!(
                events = p.events,
                media = p.media,
                ms = started.elapsed().as_millis() as u64,
                "purged expired messages"
            ),
            Err(e) => tracing::warn!(error = %e, "purging expired messages failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_policies_are_held_within_the_servers_bounds() {
        let off = Limits { enabled: false, default_max_ms: 5, ..Limits::default() };
        assert_eq!(off.lifetime(Some(10), None), None);
        let open = Limits { enabled: true, ..Limits::default() };
        assert_eq!(open.lifetime(None, None), None, "no policy, no default: forever");
        assert_eq!(open.lifetime(None, Some(10)), None, "a minimum alone expires nothing");
        assert_eq!(open.lifetime(Some(10), None), Some(10));
        assert_eq!(open.lifetime(Some(10), Some(50)), Some(50), "the room's own minimum");
        let bounded = Limits { enabled: true, default_max_ms: 500, min_ms: 100, max_ms: 1000 };
        assert_eq!(bounded.lifetime(None, None), Some(500));
        assert_eq!(bounded.lifetime(Some(10), None), Some(100));
        assert_eq!(bounded.lifetime(Some(5000), None), Some(1000));
        assert_eq!(bounded.lifetime(Some(700), None), Some(700));
        assert_eq!(bounded.lifetime(Some(700), Some(5000)), Some(1000), "the server's bound wins");
    }

    #[test]
    fn only_positive_integer_lifetimes_count() {
        assert_eq!(policy_max_lifetime(&serde_json::json!({"max_lifetime": 1000})), Some(1000));
        for bad in [
            serde_json::json!({"max_lifetime": 0}),
            serde_json::json!({"max_lifetime": -5}),
            serde_json::json!({"max_lifetime": "1000"}),
            serde_json::json!({"min_lifetime": 1000}),
        ] {
            assert_eq!(policy_max_lifetime(&bad), None, "{bad}");
        }
    }

    #[test]
    fn purged_ids_are_compacted_in_runs() {
        assert_eq!(
            runs(&mut [9000, 1, 5, 20_000, 9100]),
            vec![(1, 5), (9000, 9100), (20_000, 20_000)]
        );
        assert!(runs(&mut []).is_empty());
    }

    #[test]
    fn media_of_finds_this_servers_uris_only() {
        let id = "a".repeat(32);
        let content = serde_json::json!({
            "url": format!("mxc://here.org/{id}"),
            "info": {"thumbnail_url": "mxc://elsewhere.org/bbbb"},
            "file": {"url": "not-an-mxc"},
        });
        assert_eq!(media_of(&content, "here.org"), vec![("here.org".into(), id)]);
    }
}
