//! Delayed events (MSC4140): `?org.matrix.msc4140.delay=` on `/send` and `/state`, and
//! the endpoints that list, cancel, restart and send them, in both forms clients use.

use std::time::Duration;

use axum::{
    Router,
    extract::{Request, State},
    middleware::Next,
    response::{IntoResponse, Response},
};
use ruma::{
    MilliSecondsSinceUnixEpoch, UInt,
    api::client::delayed_events::{
        DelayParameters, DelayedEventData, delayed_message_event, delayed_state_event,
        get_all_delayed_events, get_delayed_event,
        update_delayed_event::{self, UpdateAction},
    },
    serde::Raw,
};
use tower::ServiceExt;
use trellis_core::{Error, Result};
use trellis_service::{
    delayed_events::{Action, Delayed, NewDelayed},
    ratelimit::Class,
};

use super::events::{device, raw_value, user};
use crate::{
    AppState,
    ruma_route::{self, Ctx},
};

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = ruma_route::add::<get_all_delayed_events::unstable::Request, _, _>(router, list);
    let router = ruma_route::add::<get_delayed_event::unstable::Request, _, _>(router, get_one);
    let router =
        ruma_route::add::<update_delayed_event::unstable_v1::Request, _, _>(router, update_v1);
    ruma_route::add::<update_delayed_event::unstable_v2::Request, _, _>(router, update_v2)
}

/// The `/send` and `/state` forms with a delay: the same paths as the ordinary ones,
/// told apart by their query, so they live in a router of their own that
/// [`divert`] hands those requests to.
pub fn delayed_sends(services: AppState) -> Router {
    let router = Router::new();
    let router = ruma_route::add::<delayed_message_event::unstable::Request, _, _>(router, send);
    let router = ruma_route::add::<delayed_state_event::unstable::Request, _, _>(router, state);
    router.with_state(services)
}

/// Middleware: a `PUT` that asks for a delay goes to the delayed-send router.
pub async fn divert(State(delayed): State<Router>, req: Request, next: Next) -> Response {
    let asks_delay = req.method() == http::Method::PUT
        && req.uri().query().is_some_and(|q| q.contains("org.matrix.msc4140.delay="));
    if !asks_delay {
        return next.run(req).await;
    }
    match delayed.oneshot(req).await {
        Ok(resp) => resp,
        Err(never) => match never {},
    }
    .into_response()
}

fn delay_ms(parameters: &DelayParameters) -> u64 {
    match parameters {
        DelayParameters::Timeout { timeout } => {
            u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX)
        }
        _ => 0,
    }
}

/// PUT /_matrix/client/v3/rooms/{roomId}/send/{eventType}/{txnId}?org.matrix.msc4140.delay=
async fn send(
    ctx: Ctx,
    req: delayed_message_event::unstable::Request,
) -> Result<delayed_message_event::unstable::Response> {
    ctx.rate_limit(Class::Message)?;
    let (user, device) = (user(&ctx)?, device(&ctx)?);
    let new = NewDelayed {
        user: &user,
        device: &device,
        room_id: &req.room_id,
        kind: req.event_type.to_string(),
        state_key: None,
        content: raw_value(&req.body)?,
        delay_ms: delay_ms(&req.delay_parameters),
        txn_id: Some(&req.txn_id),
    };
    let id = ctx.services.delayed_events.schedule_event(&ctx.services, new).await?;
    Ok(delayed_message_event::unstable::Response::new(id))
}

/// PUT /_matrix/client/v3/rooms/{roomId}/state/{eventType}/{stateKey}?org.matrix.msc4140.delay=
async fn state(
    ctx: Ctx,
    req: delayed_state_event::unstable::Request,
) -> Result<delayed_state_event::unstable::Response> {
    ctx.rate_limit(Class::Message)?;
    let (user, device) = (user(&ctx)?, device(&ctx)?);
    let new = NewDelayed {
        user: &user,
        device: &device,
        room_id: &req.room_id,
        kind: req.event_type.to_string(),
        state_key: Some(req.state_key),
        content: raw_value(&req.body)?,
        delay_ms: delay_ms(&req.delay_parameters),
        txn_id: None,
    };
    let id = ctx.services.delayed_events.schedule_event(&ctx.services, new).await?;
    Ok(delayed_state_event::unstable::Response::new(id))
}

fn action(action: &UpdateAction) -> Result<Action> {
    match action {
        UpdateAction::Cancel => Ok(Action::Cancel),
        UpdateAction::Restart => Ok(Action::Restart),
        UpdateAction::Send => Ok(Action::Send),
        other => Err(Error::invalid_param(format!("Unknown action {}", other.as_str()))),
    }
}

/// POST /_matrix/client/unstable/org.matrix.msc4140/delayed_events/{delayId}
async fn update_v1(
    ctx: Ctx,
    req: update_delayed_event::unstable_v1::Request,
) -> Result<update_delayed_event::unstable_v1::Response> {
    ctx.rate_limit(Class::Default)?;
    let caller = user(&ctx)?;
    let delayed = &ctx.services.delayed_events;
    delayed.update(&ctx.services, &req.delay_id, action(&req.action)?, Some(&caller)).await?;
    Ok(update_delayed_event::unstable_v1::Response::new())
}

/// POST /_matrix/client/unstable/org.matrix.msc4140/delayed_events/{delayId}/{action}
async fn update_v2(
    ctx: Ctx,
    req: update_delayed_event::unstable_v2::Request,
) -> Result<update_delayed_event::unstable_v2::Response> {
    ctx.rate_limit(Class::Default)?;
    // The token is optional here (a delegate such as an SFU holds only the delay id);
    // when one is given, only its user's delayed events are found.
    let caller = match &ctx.session {
        Some(_) => Some(user(&ctx)?),
        None => None,
    };
    let delayed = &ctx.services.delayed_events;
    let act = action(&req.action)?;
    delayed.update(&ctx.services, &req.delay_id, act, caller.as_deref()).await?;
    Ok(update_delayed_event::unstable_v2::Response::new())
}

/// GET /_matrix/client/unstable/org.matrix.msc4140/delayed_events
async fn list(
    ctx: Ctx,
    _: get_all_delayed_events::unstable::Request,
) -> Result<get_all_delayed_events::unstable::Response> {
    let user = user(&ctx)?;
    let waiting = ctx.services.delayed_events.list(&user)?.into_iter();
    let data = waiting.filter(|(_, r)| r.outcome.is_none()).map(|(id, r)| data(id, r));
    Ok(get_all_delayed_events::unstable::Response::new(data.collect::<Result<_>>()?))
}

/// GET /_matrix/client/unstable/org.matrix.msc4140/delayed_events/{delayId}
async fn get_one(
    ctx: Ctx,
    req: get_delayed_event::unstable::Request,
) -> Result<get_delayed_event::unstable::Response> {
    let record = ctx.services.delayed_events.get(&user(&ctx)?, &req.delay_id)?;
    Ok(get_delayed_event::unstable::Response::new(data(req.delay_id, record)?))
}

fn millis(ms: u64) -> MilliSecondsSinceUnixEpoch {
    MilliSecondsSinceUnixEpoch(UInt::new_saturating(ms))
}

fn data(id: String, record: Delayed) -> Result<DelayedEventData> {
    let room_id = ruma::OwnedRoomId::try_from(record.room_id.as_str())
        .map_err(|e| Error::internal("delayed event's room", e))?;
    let content = Raw::from_json(
        serde_json::value::to_raw_value(&record.content)
            .map_err(|e| Error::internal("delayed event's content", e))?,
    );
    let mut out = DelayedEventData::new(
        id,
        room_id,
        record.kind.as_str().into(),
        record.state_key,
        content,
        Duration::from_millis(record.delay_ms),
        millis(record.running_since),
    );
    if let Some(outcome) = record.outcome {
        out.finalized_ts = Some(millis(outcome.finished_ts));
        out.event_id = outcome.event_id.and_then(|id| ruma::OwnedEventId::try_from(id).ok());
        out.error = outcome.error.and_then(|(errcode, error)| {
            serde_json::from_value(serde_json::json!({ "errcode": errcode, "error": error })).ok()
        });
    }
    Ok(out)
}
