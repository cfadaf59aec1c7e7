//! Delayed events (MSC4140): `?org.matrix.msc4140.delay=` on `/send` and `/state`, and
//! the endpoints that list, cancel, restart and send them, in both forms clients use.

use std::time::Duration;

use axum::{
    Router,
    body::Bytes,
    extract::{Path, RawQuery, Request, State},
    middleware::Next,
    response::{IntoResponse, Response},
    routing::put,
};
use ruma::{
    MilliSecondsSinceUnixEpoch, OwnedRoomId, OwnedTransactionId, UInt,
    api::client::delayed_events::{
        DelayedEventData, get_all_delayed_events, get_delayed_event,
        update_delayed_event::{self, UpdateAction},
    },
    serde::Raw,
};
use serde_json::{Value, json};
use tower::ServiceExt;
use trellis_core::{Error, Result};
use trellis_service::{
    delayed_events::{Action, Delayed, NewDelayed},
    ratelimit::Class,
};

use super::{
    events::{device, user},
    webhooks::respond,
};
use crate::{
    AppState,
    ruma_route::{self, Authenticated, Ctx, json_error},
};

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = ruma_route::add::<get_all_delayed_events::unstable::Request, _, _>(router, list);
    let router = ruma_route::add::<get_delayed_event::unstable::Request, _, _>(router, get_one);
    let router =
        ruma_route::add::<update_delayed_event::unstable_v1::Request, _, _>(router, update_v1);
    ruma_route::add::<update_delayed_event::unstable_v2::Request, _, _>(router, update_v2)
}

/// The `/send` and `/state` forms with a delay: the same paths as the ordinary ones,
/// told apart by their query, so they live in a router of their own that [`divert`]
/// hands those requests to before the main router sees them. Plain handlers: ruma's
/// request types cannot read the delay out of a query string.
pub fn delayed_sends(services: AppState) -> Router {
    let mut router = Router::new();
    for version in ["v3", "r0"] {
        let rooms = format!("/_matrix/client/{version}/rooms/{{room_id}}");
        router = router
            .route(&format!("{rooms}/send/{{event_type}}/{{txn_id}}"), put(send))
            .route(&format!("{rooms}/state/{{event_type}}/{{state_key}}"), put(state))
            .route(&format!("{rooms}/state/{{event_type}}"), put(state_empty_key))
            .route(&format!("{rooms}/state/{{event_type}}/"), put(state_empty_key));
    }
    router
        .fallback(|| async {
            crate::response::ApiError(Error::unrecognized("Unrecognized request"))
        })
        .with_state(services)
}

/// Middleware in front of the main router: a `PUT` that asks for a delay goes to the
/// delayed-send router.
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

/// The delay the query asks for, in milliseconds.
fn delay_ms(query: Option<&str>) -> Result<u64> {
    let value = form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .find(|(key, _)| key == "org.matrix.msc4140.delay")
        .map(|(_, value)| value.into_owned())
        .ok_or_else(|| Error::missing_param("org.matrix.msc4140.delay"))?;
    value.parse().map_err(|_| {
        Error::invalid_param("org.matrix.msc4140.delay must be a number of milliseconds")
    })
}

fn event_content(body: &[u8]) -> Result<Value> {
    let content: Value = serde_json::from_slice(body).map_err(json_error)?;
    if !content.is_object() {
        return Err(Error::bad_json("The event content must be a JSON object"));
    }
    Ok(content)
}

fn room_id(room: &str) -> Result<OwnedRoomId> {
    OwnedRoomId::try_from(room).map_err(|_| Error::invalid_param("Not a room id"))
}

fn respond_id(answer: Result<String>) -> Response {
    respond(answer.map(|delay_id| json!({ "delay_id": delay_id })))
}

/// PUT /_matrix/client/v3/rooms/{roomId}/send/{eventType}/{txnId}?org.matrix.msc4140.delay=
async fn send(
    Authenticated(ctx): Authenticated,
    Path((room, kind, txn)): Path<(String, String, String)>,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Response {
    respond_id(
        async {
            ctx.rate_limit(Class::Message)?;
            let (user, device, room_id) = (user(&ctx)?, device(&ctx)?, room_id(&room)?);
            let txn_id: OwnedTransactionId = txn.into();
            let new = NewDelayed {
                user: &user,
                device: &device,
                room_id: &room_id,
                kind,
                state_key: None,
                content: event_content(&body)?,
                delay_ms: delay_ms(query.as_deref())?,
                txn_id: Some(&txn_id),
            };
            ctx.services.delayed_events.schedule_event(&ctx.services, new).await
        }
        .await,
    )
}

/// PUT /_matrix/client/v3/rooms/{roomId}/state/{eventType}/{stateKey}?org.matrix.msc4140.delay=
async fn state(
    Authenticated(ctx): Authenticated,
    Path((room, kind, key)): Path<(String, String, String)>,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Response {
    respond_id(schedule_state(ctx, room, kind, key, query, body).await)
}

/// PUT /_matrix/client/v3/rooms/{roomId}/state/{eventType}?org.matrix.msc4140.delay=
async fn state_empty_key(
    Authenticated(ctx): Authenticated,
    Path((room, kind)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Response {
    respond_id(schedule_state(ctx, room, kind, String::new(), query, body).await)
}

async fn schedule_state(
    ctx: Ctx,
    room: String,
    kind: String,
    key: String,
    query: Option<String>,
    body: Bytes,
) -> Result<String> {
    ctx.rate_limit(Class::Message)?;
    let (user, device, room_id) = (user(&ctx)?, device(&ctx)?, room_id(&room)?);
    let new = NewDelayed {
        user: &user,
        device: &device,
        room_id: &room_id,
        kind,
        state_key: Some(key),
        content: event_content(&body)?,
        delay_ms: delay_ms(query.as_deref())?,
        txn_id: None,
    };
    ctx.services.delayed_events.schedule_event(&ctx.services, new).await
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
    // Limited by address: no token is read here. The delay id, a secret only its owner
    // was given, is the credential (a delegate such as an SFU holds nothing else).
    ctx.rate_limit(Class::Default)?;
    let delayed = &ctx.services.delayed_events;
    delayed.update(&ctx.services, &req.delay_id, action(&req.action)?, None).await?;
    Ok(update_delayed_event::unstable_v2::Response::new())
}

/// GET /_matrix/client/unstable/org.matrix.msc4140/delayed_events
async fn list(
    ctx: Ctx,
    _: get_all_delayed_events::unstable::Request,
) -> Result<get_all_delayed_events::unstable::Response> {
    let user = user(&ctx)?;
    let waiting = ctx.services.delayed_events.waiting_of(&user)?.into_iter();
    let data = waiting.map(|(id, r)| data(id, r));
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
