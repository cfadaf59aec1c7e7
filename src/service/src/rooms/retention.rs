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

    /// Up to `limit` expired messages of room `room` (short id) older than `before`.
    fn expired_in(&self, room: u64, before: u64, limit: usize) -> Result<Vec<Expired>> {
        let mut out = Vec::new();
        let rows = EVENT_TIMES.scan_range(
            &*self.db,
            std::ops::Bound::Included(&(room, 0, 0)),
            std::ops::Bound::Excluded(&(room, before, 0)),
            Direction::Forward,
        )?;
        for row in rows {
            let ((_, ts, _), short) = row?;
            let Some(Json(stored)) = EVENTS.get(&*self.db, &short)? else { continue };
            if stored.json.get("state_key").is_some() {
                continue;
            }
            out.push(Expired { short, stored, ts });
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }
}

/// Purges every room's expired messages from storage, then compacts what held them so
/// that their content leaves the disk.
pub async fn purge_expired(services: &Arc<crate::Services>) -> Result<Purged> {
    let rooms = &services.rooms;
    let mut purged = Purged::default();
    let mut events_range: Option<(u64, u64)> = None;
    let mut positions: Vec<u64> = Vec::new();
    let mut room_ids = Vec::new();
    for row in super::reads::ROOMS.scan_range(
        &*services.db,
        std::ops::Bound::Unbounded,
        std::ops::Bound::Unbounded,
        Direction::Forward,
    )? {
        let (short, Json(record)) = row?;
        room_ids.push((short, record.room_id));
    }
    for (room, room_id) in room_ids {
        let before = rooms.expired_before(&room_id)?;
        if before == 0 {
            continue;
        }
        loop {
            let lock = services.timeline.room_lock(&room_id);
            let guard = lock.lock().await;
            let expired = rooms.expired_in(room, before, PURGE_BATCH)?;
            if expired.is_empty() {
                break;
            }
            let Some((_, record)) = rooms.room(&room_id)? else { break };
            let (_, rules) = record.rules()?;
            let members = rooms.joined_members(&room_id)?;
            let mut batch = Batch::new();
            let mut media = Vec::new();
            for event in &expired {
                let stored = &event.stored;
                let content = stored.json.get("content").cloned().unwrap_or(Value::Null);
                let sender = stored.json.get("sender").and_then(Value::as_str).unwrap_or("");
                rooms.unindex_relation(&mut batch, stored, sender, &content)?;
                media.extend(crate::media::uses::forget_into(
                    &services.db,
                    &mut batch,
                    &media_of(&content, services.server_name()),
                    &room_id,
                    stored.position,
                )?);
                services.notifier.forget_event_into(
                    &mut batch,
                    &room_id,
                    stored.position,
                    &members,
                )?;
                TIMELINE.delete(&mut batch, &(room, stored.position));
                EVENT_TIMES.delete(&mut batch, &(room, event.ts, stored.position));
                let object: ruma::CanonicalJsonObject = serde_json::from_value(stored.json.clone())
                    .map_err(|e| trellis_core::Error::internal("stored event", e))?;
                let redacted = ruma::canonical_json::redact(object, &rules.redaction, None)
                    .map_err(|e| trellis_core::Error::internal("pruning an expired event", e))?;
                let mut kept = stored.clone();
                kept.json = serde_json::to_value(redacted)
                    .map_err(|e| trellis_core::Error::internal("pruning an expired event", e))?;
                EVENTS.put(&mut batch, &event.short, &Json(kept));
                positions.push(stored.position);
                let (lo, hi) = events_range.unwrap_or((event.short, event.short));
                events_range = Some((lo.min(event.short), hi.max(event.short)));
            }
            crate::commit(&services.db, batch).await?;
            for event in &expired {
                rooms.cache.invalidate(&event.short);
            }
            drop(guard);
            services.notifier.forget_room(&room_id);
            purged.events += expired.len();
            media.sort();
            media.dedup();
            for (server, id) in media {
                // Another remembered event still shows it.
                if crate::media::uses::used(&services.db, &server, &id)? {
                    continue;
                }
                match services.media.delete(&server, &id).await {
                    Ok(()) => purged.media += 1,
                    Err(e) => {
                        tracing::warn!(media = %id, error = %e, "deleting an expired message's media")
                    }
                }
            }
            if expired.len() < PURGE_BATCH {
                break;
            }
        }
    }
    if let Some(search) = services.search.index() {
        let search = search.clone();
        let to_forget = std::mem::take(&mut positions);
        tokio::task::spawn_blocking(move || search.forget(&to_forget))
            .await
            .map_err(|e| trellis_core::Error::internal("search task", e))??;
    }
    if let Some((lo, hi)) = events_range {
        let db = services.db.clone();
        tokio::task::spawn_blocking(move || {
            EVENTS.compact(&*db, &lo, &hi)?;
            // The notification and relation rows hold no content; the timeline rows
            // only ids. The events table is where the text was.
            Ok::<_, trellis_core::Error>(())
        })
        .await
        .map_err(|e| trellis_core::Error::internal("compaction task", e))??;
    }
    Ok(purged)
}

/// How often the purge looks for expired messages, from the config.
pub async fn run(services: Arc<crate::Services>) {
    use tracing::Instrument;
    let every =
        std::time::Duration::from_secs(services.config.retention.purge_interval_seconds.max(1));
    let mut ticker = tokio::time::interval(every);
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
