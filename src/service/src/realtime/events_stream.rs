//! `GET /events`, the deprecated stream before `/sync`: the new events of the user's
//! joined rooms, oldest first, as one flat list. It is `/sync` underneath (the same
//! live-wait, visibility and tokens) with everything but room timelines filtered out;
//! with a room id, the new events of that one room, which a user may read without being
//! in it when it is world readable (peeking).

use std::time::Duration;

use ruma::api::client::filter::FilterDefinition;
use serde_json::Value;
use trellis_core::{Error, Result};

use ruma::RoomId;

use super::{
    live,
    sync::{LiveSync, SyncRequest, SyncToken, reader_event},
};
use crate::{Services, accounts::Session, rooms::viewer::Viewer};

/// Events per room one answer carries at most.
const ROOM_LIMIT: u32 = 100;

pub struct EventsPage {
    pub chunk: Vec<Value>,
    pub start: String,
    pub end: String,
}

/// The events after `from` (a `/events`, `/initialSync` or `/sync` token; none: from
/// now), waiting up to `timeout` for the first.
pub async fn events(
    services: &Services,
    session: &Session,
    from: Option<&str>,
    timeout: Duration,
) -> Result<EventsPage> {
    let since = match from {
        Some(token) => {
            SyncToken::parse(token).ok_or_else(|| Error::invalid_param("Invalid from token"))?
        }
        None => SyncToken { position: services.rooms.stream.visible(), to_device: 0 },
    };
    let user_id = services.accounts.user_id(&session.localpart);
    let filter = timelines_only();
    let request = SyncRequest {
        user_id: &user_id,
        localpart: &session.localpart,
        device_id: &session.device_id,
        since: Some(since.position),
        // To-device messages are not part of this stream, and are never acknowledged by it.
        to_device_since: since.position,
        full_state: false,
        filter: &filter,
        use_state_after: false,
    };
    let deadline = tokio::time::Instant::now() + timeout;
    let mut query = LiveSync::new(services, request)?;
    let answer = live::wait(services, &mut query, Some(deadline)).await?;
    let body = serde_json::to_value(&answer.body).map_err(|e| Error::internal("sync body", e))?;
    let mut chunk = Vec::new();
    for (room_id, room) in body["rooms"]["join"].as_object().into_iter().flatten() {
        for event in room["timeline"]["events"].as_array().into_iter().flatten() {
            let mut event = event.clone();
            event["room_id"] = Value::from(room_id.as_str());
            chunk.push(event);
        }
    }
    let end = SyncToken { position: answer.token.position.max(since.position), to_device: 0 };
    Ok(EventsPage { chunk, start: since.render(), end: end.render() })
}

/// `GET /events?room_id=`: peeking, the new events of one room the user may read
/// without being in it (a world-readable room, or one they were in), oldest first,
/// waiting up to `timeout` for the first.
pub async fn peek(
    services: &Services,
    session: &Session,
    room_id: &RoomId,
    from: Option<&str>,
    timeout: Duration,
) -> Result<EventsPage> {
    let user_id = services.accounts.user_id(&session.localpart);
    let viewer = Viewer::load(services, &session.localpart)?;
    let room = viewer.reader(services, room_id.as_str(), &user_id)?;
    let stream = &services.rooms.stream;
    let since = match from {
        Some(token) => {
            SyncToken::parse(token).ok_or_else(|| Error::invalid_param("Invalid from token"))?
        }
        None => SyncToken { position: stream.visible(), to_device: 0 },
    };
    let deadline = tokio::time::Instant::now() + timeout;
    let mut changes = stream.subscribe();
    // How far the room has been looked through: events up to it were either returned or
    // not the user's to see.
    let mut cursor = since.position;
    loop {
        let visible = stream.visible();
        let events =
            services.rooms.timeline_forwards(room_id.as_str(), cursor, ROOM_LIMIT as usize)?;
        let examined: Vec<_> =
            events.into_iter().take_while(|(position, _)| *position <= visible).collect();
        let full = examined.len() == ROOM_LIMIT as usize;
        let last_examined = examined.last().map(|(position, _)| *position);
        let seen: Vec<_> = examined
            .into_iter()
            .filter(|(position, pdu)| !pdu.rejected && room.sees(*position, pdu))
            .collect();
        let reached = match (seen.last(), full) {
            (Some((position, _)), _) => *position,
            // A page of only invisible events: go on from its end, not past what follows.
            (None, true) => last_examined.unwrap_or(cursor),
            (None, false) => visible,
        };
        if seen.is_empty() && full {
            cursor = reached;
            continue;
        }
        if seen.is_empty() {
            cursor = last_examined.unwrap_or(cursor);
        }
        if !seen.is_empty() || tokio::time::Instant::now() >= deadline {
            let chunk = seen
                .iter()
                .map(|(_, pdu)| {
                    let pdu = room.shown(services, pdu)?;
                    let mut event = reader_event(&pdu, &user_id, &session.device_id);
                    event["room_id"] = Value::from(room_id.as_str());
                    Ok(event)
                })
                .collect::<Result<_>>()?;
            let end = SyncToken { position: reached.max(since.position), to_device: 0 };
            return Ok(EventsPage { chunk, start: since.render(), end: end.render() });
        }
        // Woken by any new position; the deadline ends the wait with an empty chunk.
        let _ = tokio::time::timeout_at(deadline, changes.changed()).await;
    }
}

/// A sync filter keeping only room timelines.
fn timelines_only() -> FilterDefinition {
    let none = || vec!["*".to_owned()];
    let mut filter = FilterDefinition::default();
    filter.presence.not_types = none();
    filter.account_data.not_types = none();
    filter.room.account_data.not_types = none();
    filter.room.ephemeral.not_types = none();
    filter.room.state.not_types = none();
    filter.room.timeline.limit = Some(ROOM_LIMIT.into());
    filter
}
