//! Reports to the server's moderators: of an event, a room (v1.13) or a user (v1.14).

use axum::Router;
use ruma::api::client::{
    reporting::report_user,
    room::{report_content, report_room},
};
use trellis_core::Result;
use trellis_service::reports;

use super::events::user;
use crate::{
    AppState,
    ruma_route::{self, Ctx},
};

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = ruma_route::add::<report_content::v3::Request, _, _>(router, event);
    let router = ruma_route::add::<report_room::v3::Request, _, _>(router, room);
    ruma_route::add::<report_user::v3::Request, _, _>(router, user_report)
}

/// POST /_matrix/client/v3/rooms/{roomId}/report/{eventId}
async fn event(ctx: Ctx, req: report_content::v3::Request) -> Result<report_content::v3::Response> {
    let reporter = user(&ctx)?;
    reports::report_event(
        &ctx.services,
        &reporter,
        &req.room_id,
        &req.event_id,
        req.reason,
        &ctx.client,
    )
    .await?;
    Ok(report_content::v3::Response::new())
}

/// POST /_matrix/client/v3/rooms/{roomId}/report
async fn room(ctx: Ctx, req: report_room::v3::Request) -> Result<report_room::v3::Response> {
    let reporter = user(&ctx)?;
    reports::report_room(&ctx.services, &reporter, &req.room_id, req.reason, &ctx.client).await?;
    Ok(report_room::v3::Response::new())
}

/// POST /_matrix/client/v3/users/{userId}/report
async fn user_report(ctx: Ctx, req: report_user::v3::Request) -> Result<report_user::v3::Response> {
    let reporter = user(&ctx)?;
    reports::report_user(&ctx.services, &reporter, &req.user_id, req.reason, &ctx.client).await?;
    Ok(report_user::v3::Response::new())
}
