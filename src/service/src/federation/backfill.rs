//! Backfill: when paginating backwards reaches the start of what this server has of a
//! room (it joined later than the room began), older events are fetched from another
//! server in the room (`/backfill`), checked, and placed before the local timeline.

use std::sync::Arc;

use http::Method;
use trellis_core::Result;

use super::encode;
use crate::Services;

/// Events asked for per backfill request.
const BACKFILL_LIMIT: usize = 100;
/// Servers tried per backfill.
const SERVERS_TRIED: usize = 3;

/// Whether other servers may have history older than this server's oldest event of
/// the room (its `prev_events` are not here).
pub fn more_remote(services: &Services, room_id: &str) -> Result<bool> {
    if !services.federation.enabled() {
        return Ok(false);
    }
    let Some((_, oldest)) = services.rooms.oldest_event(room_id)? else { return Ok(false) };
    Ok(!oldest.prev_events.is_empty() && !services.rooms.missing_prev_events(&oldest)?.is_empty())
}

/// Fetches history older than the room's oldest local event; how many events were
/// added (0 when the room's beginning is already here or no server could help).
pub async fn backfill(services: &Arc<Services>, room_id: &str, wanted: usize) -> Result<usize> {
    let rooms = &services.rooms;
    if !services.federation.enabled() {
        return Ok(0);
    }
    if !more_remote(services, room_id)? {
        return Ok(0);
    }
    let Some((oldest_position, oldest)) = rooms.oldest_event(room_id)? else { return Ok(0) };
    let Some((_, room)) = rooms.room(room_id)? else { return Ok(0) };
    let (version, rules) = room.rules()?;
    let limit = wanted.clamp(1, BACKFILL_LIMIT);
    for server in super::sender::room_servers(&services.federation, &services.rooms, room_id)?
        .iter()
        .take(SERVERS_TRIED)
    {
        let path = format!(
            "/_matrix/federation/v1/backfill/{}?v={}&limit={limit}",
            encode(room_id),
            encode(oldest.event_id.as_str())
        );
        let answer = match services.federation.request(server, Method::GET, &path, None).await {
            Ok(a) => a,
            Err(e) => {
                tracing::info!(server, room_id, error = %e.message, "backfill failed");
                continue;
            }
        };
        let mut events: Vec<_> = services
            .federation
            .verify_pdus(&rules, super::pdus::pdus_in(&answer, "pdus"))
            .await
            .into_iter()
            .filter(|(p, _)| p.room_id.as_ref().is_some_and(|r| r.as_str() == room_id))
            .collect();
        events.sort_by_key(|(p, _)| std::cmp::Reverse(p.depth));
        let ids: Vec<_> = events.iter().map(|(p, _)| p.event_id.clone()).collect();
        services.timeline.store_outliers(room_id, &version, events).await?;
        let placed = services.timeline.place_backfilled(room_id, &ids, oldest_position).await?;
        if placed > 0 {
            return Ok(placed);
        }
    }
    Ok(0)
}
