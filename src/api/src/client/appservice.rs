//! Endpoints application services call: `POST /_matrix/client/v1/appservice/{id}/ping`.

use axum::Router;
use ruma::api::client::appservice::request_ping;
use trellis_core::Result;
use trellis_service::appservice::queries;

use crate::{
    AppState,
    ruma_route::{self, Ctx},
};

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    ruma_route::add::<request_ping::v1::Request, _, _>(router, ping)
}

/// POST /_matrix/client/v1/appservice/{appserviceId}/ping
async fn ping(ctx: Ctx, req: request_ping::v1::Request) -> Result<request_ping::v1::Response> {
    let txn = req.transaction_id.as_ref().map(|t| t.as_str());
    let took = queries::ping(&ctx.services, ctx.session()?, &req.appservice_id, txn).await?;
    Ok(request_ping::v1::Response::new(took))
}
