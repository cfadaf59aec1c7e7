//! `GET /notifications`: the events that notified the user, newest first, with whether
//! they have been read.

use axum::Router;
use ruma::{
    MilliSecondsSinceUnixEpoch, OwnedRoomId, UInt,
    api::client::push::get_notifications::v3::{Notification, Request, Response},
};
use serde_json::json;
use trellis_core::{Error, Result};

use super::events::{me, to_raw};
use crate::{
    AppState,
    ruma_route::{self, Ctx},
};

const DEFAULT_LIMIT: usize = 50;
const MAX_LIMIT: usize = 500;

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    ruma_route::add_patched::<Request, _, _>(router, notifications, Some(profile_tags))
}

/// Each notification names the profile tag of the pusher rule that matched; rules here
/// have none, and clients expect the key (ruma leaves a `None` out).
fn profile_tags(body: &mut serde_json::Value) {
    let notifications = body["notifications"].as_array_mut().into_iter().flatten();
    for n in notifications.filter_map(serde_json::Value::as_object_mut) {
        n.entry("profile_tag").or_insert(serde_json::Value::Null);
    }
}

/// GET /_matrix/client/v3/notifications
async fn notifications(ctx: Ctx, req: Request) -> Result<Response> {
    let user = me(&ctx)?;
    let from = req
        .from
        .as_deref()
        .map(|f| f.parse::<u64>().map_err(|_| Error::invalid_param("Invalid `from` token")))
        .transpose()?;
    let limit = req
        .limit
        .and_then(|l| usize::try_from(u64::from(l)).ok())
        .unwrap_or(DEFAULT_LIMIT)
        .clamp(1, MAX_LIMIT);
    let only_highlight = req.only.as_deref() == Some("highlight");
    let services = &ctx.services;
    let (rows, next) = services.notifier.history(services, &user, from, limit, only_highlight)?;
    let mut out = Vec::with_capacity(rows.len());
    for (position, n) in rows {
        let Some(stored) = services.rooms.cached_event(&n.event_id)? else { continue };
        let expired_before = services.rooms.expired_before(&n.room_id)?;
        if trellis_service::rooms::Rooms::is_expired(&stored.pdu, expired_before) {
            continue;
        }
        let mut event = trellis_service::realtime::sync::sync_event(&stored.pdu);
        event["room_id"] = json!(n.room_id);
        // Read once a receipt (unthreaded or main) is at or after the event.
        let mut read = false;
        for (thread, id) in services.receipts.latest(&n.room_id, &user)? {
            if (thread.is_empty() || thread == "main")
                && services.rooms.position_of(&id)?.is_some_and(|p| p >= position)
            {
                read = true;
            }
        }
        let actions = serde_json::from_value(n.actions).unwrap_or_default();
        let Ok(room_id) = OwnedRoomId::try_from(n.room_id) else { continue };
        let ts = MilliSecondsSinceUnixEpoch(UInt::try_from(n.ts).unwrap_or_default());
        out.push(Notification::new(actions, to_raw(&event)?, read, room_id, ts));
    }
    let mut resp = Response::new(out);
    resp.next_token = next.map(|p| p.to_string());
    Ok(resp)
}
