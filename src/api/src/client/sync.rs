//! `/sync` with long-polling, sync filters, and the ephemeral writes syncs deliver:
//! typing, receipts and read markers.

use std::time::Duration;

use axum::Router;
use ruma::api::{
    IncomingRequest, Metadata, OutgoingBody, OutgoingResponse,
    auth_scheme::AccessToken,
    client::{
        filter::{FilterDefinition, create_filter, get_filter},
        read_marker::set_read_marker,
        receipt::create_receipt,
        sync::sync_events::{self, v3::Filter},
        typing::create_typing_event::{self, v3::Typing},
    },
    error::{DeserializationError, IntoHttpError},
};
use serde_json::Value;
use trellis_core::{Error, Result};
use trellis_service::realtime::{filters, receipts, sync, typing};

use super::events::user;

use crate::{
    AppState,
    ruma_route::{self, Ctx},
};

/// The longest a sync waits for something to happen, whatever the client asks.
const MAX_TIMEOUT: Duration = Duration::from_secs(120);

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = ruma_route::add::<SyncRequest, _, _>(router, sync_handler);
    let router = ruma_route::add::<create_filter::v3::Request, _, _>(router, create);
    let router = ruma_route::add::<get_filter::v3::Request, _, _>(router, get);
    let router = ruma_route::add::<create_typing_event::v3::Request, _, _>(router, typing);
    let router = ruma_route::add::<create_receipt::v3::Request, _, _>(router, receipt);
    ruma_route::add::<set_read_marker::v3::Request, _, _>(router, read_markers)
}

/// `/sync` as ruma parses it, answered with JSON we build ourselves: the response is
/// assembled from stored events without a round trip through typed event structs.
struct SyncRequest(sync_events::v3::Request);

type Inner = sync_events::v3::Request;

impl Metadata for SyncRequest {
    const METHOD: http::Method = <Inner as Metadata>::METHOD;
    const RATE_LIMITED: bool = <Inner as Metadata>::RATE_LIMITED;
    type Authentication = AccessToken;
    type PathBuilder = <Inner as Metadata>::PathBuilder;
    const PATH_BUILDER: Self::PathBuilder = <Inner as Metadata>::PATH_BUILDER;
}

impl IncomingRequest for SyncRequest {
    type EndpointError = <Inner as IncomingRequest>::EndpointError;
    type OutgoingResponse = JsonResponse<trellis_service::realtime::out::Out>;

    fn try_from_http_request_inner(
        request: http::Request<&[u8]>,
        path_args: &[&str],
    ) -> std::result::Result<Self, DeserializationError> {
        Inner::try_from_http_request_inner(request, path_args).map(Self)
    }
}

/// A 200 response with a JSON body.
pub(super) struct JsonResponse<T = Value>(pub T);

pub(super) struct JsonBody(Vec<u8>);

impl OutgoingBody for JsonBody {
    type Error = std::convert::Infallible;

    fn content_type(&self) -> Option<http::HeaderValue> {
        Some(http::HeaderValue::from_static("application/json"))
    }

    fn try_into_buf<T: Default + bytes::BufMut + AsRef<[u8]>>(
        self,
    ) -> std::result::Result<T, Self::Error> {
        let mut buf = T::default();
        buf.put_slice(&self.0);
        Ok(buf)
    }
}

impl<T: serde::Serialize> OutgoingResponse for JsonResponse<T> {
    type Body = JsonBody;

    fn try_into_http_response_inner(
        self,
    ) -> std::result::Result<http::Response<Self::Body>, IntoHttpError> {
        let body = serde_json::to_vec(&self.0)?;
        Ok(http::Response::new(JsonBody(body)))
    }
}

fn resolve_filter(ctx: &Ctx, filter: Option<&Filter>) -> Result<FilterDefinition> {
    match filter {
        None => Ok(FilterDefinition::default()),
        Some(Filter::FilterDefinition(def)) => Ok(def.clone()),
        Some(Filter::FilterId(id)) => ctx.services.filters.resolve(&ctx.session()?.localpart, id),
        Some(_) => Err(Error::bad_json("Unsupported filter")),
    }
}

/// What a sync needs from its request, taken out of it by a plain function: a held poll
/// keeps its future's whole state for as long as it waits.
fn params(ctx: &Ctx, req: SyncRequest) -> Result<sync::Params> {
    let req = req.0;
    Ok(sync::Params {
        filter: Box::new(resolve_filter(ctx, req.filter.as_ref())?),
        token: req.since.as_deref().map(parse_since).transpose()?,
        timeout: req.timeout.unwrap_or_default().min(MAX_TIMEOUT),
        full_state: req.full_state,
        use_state_after: req.use_state_after,
        set_presence: req.set_presence,
    })
}

/// GET /_matrix/client/v3/sync
fn sync_handler(
    ctx: Ctx,
    req: SyncRequest,
) -> impl Future<Output = Result<JsonResponse<trellis_service::realtime::out::Out>>> {
    let params = params(&ctx, req);
    async move {
        let params = params?;
        Ok(JsonResponse(sync::long_poll(&ctx.services, ctx.session()?, params).await?))
    }
}

/// A `since` token of `/sync` (or of the WebSocket stream).
pub(super) fn parse_since(token: &str) -> Result<sync::SyncToken> {
    sync::SyncToken::parse(token).ok_or_else(|| Error::invalid_param("Invalid sync token"))
}

/// POST /_matrix/client/v3/user/{userId}/filter
async fn create(ctx: Ctx, req: create_filter::v3::Request) -> Result<create_filter::v3::Response> {
    let session = ctx.require_self(&req.user_id)?;
    let definition =
        serde_json::to_value(&req.filter).map_err(|e| Error::bad_json(e.to_string()))?;
    let id = ctx.services.filters.create(&session.localpart, definition).await?;
    Ok(create_filter::v3::Response::new(id))
}

/// GET /_matrix/client/v3/user/{userId}/filter/{filterId}
async fn get(ctx: Ctx, req: get_filter::v3::Request) -> Result<get_filter::v3::Response> {
    let session = ctx.require_self(&req.user_id)?;
    let value = ctx
        .services
        .filters
        .get(&session.localpart, &req.filter_id)?
        .ok_or_else(|| Error::not_found("Unknown filter"))?;
    Ok(get_filter::v3::Response::new(filters::parse(&value)?))
}

/// PUT /_matrix/client/v3/rooms/{roomId}/typing/{userId}
async fn typing(
    ctx: Ctx,
    req: create_typing_event::v3::Request,
) -> Result<create_typing_event::v3::Response> {
    ctx.require_self(&req.user_id)?;
    let timeout = match req.state {
        Typing::Yes(info) => Some(info.timeout),
        _ => None,
    };
    typing::set_typing(&ctx.services, &req.room_id, &req.user_id, timeout).await?;
    Ok(create_typing_event::v3::Response::new())
}

/// POST /_matrix/client/v3/rooms/{roomId}/receipt/{receiptType}/{eventId}
async fn receipt(
    ctx: Ctx,
    req: create_receipt::v3::Request,
) -> Result<create_receipt::v3::Response> {
    let (user, room_id, event_id) = (user(&ctx)?, &req.room_id, &req.event_id);
    let (kind, thread) = (&req.receipt_type, &req.thread);
    receipts::set_receipt(&ctx.services, &user, room_id, kind, event_id, thread).await?;
    Ok(create_receipt::v3::Response::new())
}

/// POST /_matrix/client/v3/rooms/{roomId}/read_markers
async fn read_markers(
    ctx: Ctx,
    req: set_read_marker::v3::Request,
) -> Result<set_read_marker::v3::Response> {
    let user = user(&ctx)?;
    let set = receipts::set_read_markers(
        &ctx.services,
        &user,
        &req.room_id,
        req.fully_read.as_deref(),
        req.read_receipt.as_deref(),
        req.private_read_receipt.as_deref(),
    );
    set.await?;
    Ok(set_read_marker::v3::Response::new())
}
