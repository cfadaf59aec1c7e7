//! Pushers: `GET /pushers` and `POST /pushers/set`.

use axum::Router;
use ruma::api::client::push::{Pusher, get_pushers, set_pusher};
use trellis_core::{Error, Result};
use trellis_service::push::{self, pushers::PusherChange};

use super::push_rules::Unparsed;
use crate::{
    AppState,
    ruma_route::{self, Ctx},
};

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = ruma_route::add::<get_pushers::v3::Request, _, _>(router, get);
    ruma_route::add::<Unparsed<set_pusher::v3::Request>, _, _>(router, set)
}

/// GET /_matrix/client/v3/pushers
async fn get(ctx: Ctx, _req: get_pushers::v3::Request) -> Result<get_pushers::v3::Response> {
    let localpart = &ctx.session()?.localpart;
    let pushers = ctx
        .services
        .pushers
        .list(localpart)?
        .into_iter()
        .map(|p| {
            serde_json::to_value(&p)
                .and_then(serde_json::from_value::<Pusher>)
                .map_err(|e| Error::internal("stored pusher", e))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(get_pushers::v3::Response::new(pushers))
}

/// POST /_matrix/client/v3/pushers/set
///
/// ruma's body parser reports a missing `data.url` or `lang` as `M_BAD_JSON`; the spec
/// wants `M_MISSING_PARAM`/`M_INVALID_PARAM`, so the service validates the raw body.
async fn set(ctx: Ctx, req: Unparsed<set_pusher::v3::Request>) -> Result<set_pusher::v3::Response> {
    let session = ctx.session()?;
    let change = PusherChange::parse(&req.json()?)?;
    push::gateway::set_pusher(&ctx.services, &session.localpart, &session.device_id, change)
        .await?;
    Ok(set_pusher::v3::Response::new())
}
