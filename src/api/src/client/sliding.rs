//! Simplified sliding sync (MSC4186) at
//! `/_matrix/client/unstable/org.matrix.simplified_msc3575/sync`, long-polling like
//! `/sync`.

use std::time::Duration;

use axum::Router;
use ruma::api::{
    IncomingRequest, Metadata, auth_scheme::AccessToken, client::sync::sync_events::v5,
    error::DeserializationError,
};
use trellis_core::Result;
use trellis_service::realtime::sliding::{
    Extensions, ListFilters, ListRequest, RoomWants, SlidingRequest, long_poll,
};

use super::{events::me, sync::JsonResponse};
use crate::{
    AppState,
    ruma_route::{self, Ctx},
};

const MAX_TIMEOUT: Duration = Duration::from_secs(120);

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    ruma_route::add::<SlidingSync, _, _>(router, sliding_sync)
}

/// The request as ruma parses it, answered with JSON built by the service.
struct SlidingSync(v5::Request);

impl Metadata for SlidingSync {
    const METHOD: http::Method = <v5::Request as Metadata>::METHOD;
    const RATE_LIMITED: bool = <v5::Request as Metadata>::RATE_LIMITED;
    type Authentication = AccessToken;
    type PathBuilder = <v5::Request as Metadata>::PathBuilder;
    const PATH_BUILDER: Self::PathBuilder = <v5::Request as Metadata>::PATH_BUILDER;
}

impl IncomingRequest for SlidingSync {
    type EndpointError = <v5::Request as IncomingRequest>::EndpointError;
    type OutgoingResponse = JsonResponse;

    fn try_from_http_request_inner(
        request: http::Request<&[u8]>,
        path_args: &[&str],
    ) -> std::result::Result<Self, DeserializationError> {
        v5::Request::try_from_http_request_inner(request, path_args).map(Self)
    }
}

fn wants(
    required_state: &[(ruma::events::StateEventType, String)],
    limit: ruma::UInt,
) -> RoomWants {
    RoomWants {
        required_state: required_state.iter().map(|(t, k)| (t.to_string(), k.clone())).collect(),
        timeline_limit: usize::try_from(u64::from(limit)).unwrap_or(usize::MAX),
    }
}

/// To-device messages per response when the client sets no limit.
const DEFAULT_TO_DEVICE: usize = 100;

fn to_usize(v: ruma::UInt) -> usize {
    usize::try_from(u64::from(v)).unwrap_or(usize::MAX)
}

/// POST /_matrix/client/unstable/org.matrix.simplified_msc3575/sync
async fn sliding_sync(ctx: Ctx, req: SlidingSync) -> Result<JsonResponse> {
    let req = req.0;
    let user_id = me(&ctx)?;
    let session = ctx.session()?;
    let lists = req
        .lists
        .iter()
        .map(|(name, list)| {
            let filters =
                list.filters.as_ref().map_or_else(ListFilters::default, |f| ListFilters {
                    is_dm: f.is_dm,
                    is_encrypted: f.is_encrypted,
                    is_invite: f.is_invite,
                    room_types: f
                        .room_types
                        .iter()
                        .map(|t| t.as_str().map(str::to_owned))
                        .collect(),
                    not_room_types: f
                        .not_room_types
                        .iter()
                        .map(|t| t.as_str().map(str::to_owned))
                        .collect(),
                });
            let request = ListRequest {
                ranges: list.ranges.iter().map(|(a, b)| (to_usize(*a), to_usize(*b))).collect(),
                wants: wants(&list.room_details.required_state, list.room_details.timeline_limit),
                filters,
            };
            (name.clone(), request)
        })
        .collect();
    let subscriptions = req
        .room_subscriptions
        .iter()
        .map(|(room, sub)| (room.to_string(), wants(&sub.required_state, sub.timeline_limit)))
        .collect();
    let ext = &req.extensions;
    let extensions = Extensions {
        to_device: ext.to_device.enabled == Some(true),
        to_device_since: ext.to_device.since.as_deref().and_then(|s| s.parse().ok()).unwrap_or(0),
        to_device_limit: ext.to_device.limit.map_or(DEFAULT_TO_DEVICE, to_usize),
        e2ee: ext.e2ee.enabled == Some(true),
        account_data: ext.account_data.enabled == Some(true),
        receipts: ext.receipts.enabled == Some(true),
        typing: ext.typing.enabled == Some(true),
    };
    let request = SlidingRequest {
        user_id: &user_id,
        localpart: &session.localpart,
        device_id: &session.device_id,
        conn_id: req.conn_id.as_deref().unwrap_or(""),
        pos: req.pos.as_deref(),
        lists,
        subscriptions,
        extensions,
    };
    let timeout = req.timeout.unwrap_or_default().min(MAX_TIMEOUT);
    Ok(JsonResponse(long_poll(&ctx.services, &request, timeout).await?))
}
