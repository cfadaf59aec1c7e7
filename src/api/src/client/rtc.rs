//! MatrixRTC: the transports clients find their SFU by (MSC4143), and the LiveKit token
//! exchange lk-jwt-service does elsewhere (`/sfu/get`, MSC4195's `/get_token`), served
//! under `/_trellis/livekit`, plus the homeserver form of MSC4195's `get_token`.

use axum::{
    Router,
    body::Bytes,
    extract::{FromRequestParts, State},
    http::request::Parts,
    response::Response,
    routing::{get, post},
};
use ruma::api::client::rtc::livekit::get_token;
use serde::Deserialize;
use serde_json::{Value, json};
use trellis_core::Result;
use trellis_service::{
    ratelimit::Class,
    rtc::{self, ClaimedMember, OpenIdToken, SfuAccess, SlotMember},
};

use super::{
    events::{device, user},
    webhooks::respond,
};
use crate::{
    AppState,
    ruma_route::{self, Authenticated, Ctx, client_of, json_error},
};

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = router
        .route("/_matrix/client/unstable/org.matrix.msc4143/rtc/transports", get(transports))
        .route("/_matrix/client/v1/rtc/transports", get(transports))
        .route(&format!("{}/sfu/get", rtc::JWT_SERVICE_PATH), post(sfu_get))
        .route(&format!("{}/get_token", rtc::JWT_SERVICE_PATH), post(slot_token))
        .route(
            &format!("{}/delegate_delayed_leave", rtc::JWT_SERVICE_PATH),
            post(delegate_with_openid),
        )
        .route(
            "/_matrix/client/unstable/io.element.msc4195/rtc/livekit/delegate_delayed_leave",
            post(delegate),
        );
    ruma_route::add::<get_token::v1::Request, _, _>(router, member_token)
}

fn access(access: SfuAccess) -> Value {
    json!({ "url": access.url, "jwt": access.jwt })
}

/// GET /_matrix/client/unstable/org.matrix.msc4143/rtc/transports
///
/// Answered with or without an access token: clients are seen calling it without one,
/// and the answer is the same for everyone.
async fn transports(State(services): State<AppState>) -> Response {
    respond(Ok(json!({ "rtc_transports": rtc::transports(&services) })))
}

#[derive(Deserialize)]
struct LegacyRequest {
    room: String,
    openid_token: OpenIdToken,
    device_id: String,
    /// A delayed leave handed over with the token (with `delay_timeout` and
    /// `delay_cs_api_url`, which the server does not need: the delay is its own).
    #[serde(default)]
    delay_id: Option<String>,
}

/// The exchanges take no access token: limited by the caller's address, since each may
/// ask another server over federation.
fn limit(services: &AppState, parts: &Parts) -> Result<()> {
    let client = client_of(parts, services.config.http.x_forwarded_for);
    services.rate_limits.check(Class::Default, client.ip.as_deref().unwrap_or("-"))
}

/// POST /_trellis/livekit/sfu/get
async fn sfu_get(State(services): State<AppState>, parts: Parts, body: Bytes) -> Response {
    respond(
        async {
            limit(&services, &parts)?;
            let req: LegacyRequest = serde_json::from_slice(&body).map_err(json_error)?;
            let granted = rtc::legacy_token(
                &services,
                &req.room,
                &req.openid_token,
                &req.device_id,
                req.delay_id.as_deref(),
            )
            .await?;
            Ok(access(granted))
        }
        .await,
    )
}

#[derive(Deserialize)]
struct SlotRequest {
    room_id: String,
    slot_id: String,
    openid_token: OpenIdToken,
    member: ClaimedMember,
    /// As in [`LegacyRequest`].
    #[serde(default)]
    delay_id: Option<String>,
}

/// POST /_trellis/livekit/get_token
async fn slot_token(State(services): State<AppState>, parts: Parts, body: Bytes) -> Response {
    respond(
        async {
            limit(&services, &parts)?;
            let req: SlotRequest = serde_json::from_slice(&body).map_err(json_error)?;
            let granted = rtc::slot_token(
                &services,
                &req.room_id,
                &req.slot_id,
                &req.openid_token,
                &req.member,
                req.delay_id.as_deref(),
            )
            .await?;
            Ok(access(granted))
        }
        .await,
    )
}

/// POST /_matrix/client/unstable/io.element.msc4195/rtc/livekit/get_token
async fn member_token(ctx: Ctx, req: get_token::v1::Request) -> Result<get_token::v1::Response> {
    ctx.rate_limit(Class::Default)?;
    let (user, device) = (user(&ctx)?, device(&ctx)?);
    let member = SlotMember {
        user: &user,
        device_id: device.as_str(),
        room_id: &req.room_id,
        slot_id: &req.slot_id,
        member_id: &req.member_id,
        sfu_url: &req.url,
    };
    let jwt = rtc::member_token(&ctx.services, &member).await?;
    Ok(get_token::v1::Response::new(jwt))
}

#[derive(Deserialize)]
struct OpenIdHandOver {
    room_id: String,
    slot_id: String,
    openid_token: OpenIdToken,
    member: ClaimedMember,
    delay_id: String,
}

/// POST /_trellis/livekit/delegate_delayed_leave
async fn delegate_with_openid(
    State(services): State<AppState>,
    parts: Parts,
    body: Bytes,
) -> Response {
    respond(
        async {
            rtc::hand_over_offered(&services)?;
            limit(&services, &parts)?;
            let req: OpenIdHandOver = serde_json::from_slice(&body).map_err(json_error)?;
            rtc::delegate_leave_with_openid(
                &services,
                &req.room_id,
                &req.slot_id,
                &req.openid_token,
                &req.member,
                &req.delay_id,
            )
            .await?;
            Ok(json!({}))
        }
        .await,
    )
}

#[derive(Deserialize)]
struct HandOver {
    url: String,
    room_id: ruma::OwnedRoomId,
    slot_id: String,
    member_id: String,
    delay_id: String,
}

/// POST /_matrix/client/unstable/io.element.msc4195/rtc/livekit/delegate_delayed_leave
async fn delegate(State(services): State<AppState>, mut parts: Parts, body: Bytes) -> Response {
    if let Err(e) = rtc::hand_over_offered(&services) {
        return respond(Err(e));
    }
    let ctx = match Authenticated::from_request_parts(&mut parts, &services).await {
        Ok(Authenticated(ctx)) => ctx,
        Err(rejection) => return rejection,
    };
    respond(
        async {
            ctx.rate_limit(Class::Default)?;
            let req: HandOver = serde_json::from_slice(&body).map_err(json_error)?;
            let (user, device) = (user(&ctx)?, device(&ctx)?);
            let member = SlotMember {
                user: &user,
                device_id: device.as_str(),
                room_id: &req.room_id,
                slot_id: &req.slot_id,
                member_id: &req.member_id,
                sfu_url: &req.url,
            };
            rtc::delegate_leave(&services, &member, &req.delay_id).await?;
            Ok(json!({}))
        }
        .await,
    )
}
