//! Pushers: `GET /pushers` and `POST /pushers/set`, and the unsubscribe link of
//! notification mails (`/_trellis/push/v1/unsubscribe/{token}`: a page with a button on
//! `GET`, the unsubscription on `POST`, which is also what RFC 8058 mail clients send).

use axum::{
    Router,
    extract::{Path, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing,
};
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
    let router = ruma_route::add::<Unparsed<set_pusher::v3::Request>, _, _>(router, set);
    router.route(
        "/_trellis/push/v1/unsubscribe/{token}",
        routing::get(unsubscribe_page).post(unsubscribe),
    )
}

fn page(status: StatusCode, body: &str) -> Response {
    let html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Notification emails</title>\
         </head><body>{body}</body></html>"
    );
    (status, [(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response()
}

/// GET /_trellis/push/v1/unsubscribe/{token}
///
/// Changes nothing (mail scanners follow links): the button posts.
async fn unsubscribe_page(State(services): State<AppState>, Path(token): Path<String>) -> Response {
    match push::email::unsubscribe_known(&services, &token) {
        Ok(true) => page(
            StatusCode::OK,
            "<form method=\"post\"><p>Stop receiving notification emails at this address?</p>\
             <button type=\"submit\">Unsubscribe</button></form>",
        ),
        Ok(false) => page(StatusCode::NOT_FOUND, "<p>This link is not valid any more.</p>"),
        Err(e) => crate::response::ApiError(e).into_response(),
    }
}

/// POST /_trellis/push/v1/unsubscribe/{token}
async fn unsubscribe(State(services): State<AppState>, Path(token): Path<String>) -> Response {
    match push::email::unsubscribe(&services, &token).await {
        Ok(()) => page(StatusCode::OK, "<p>You will get no more notification emails here.</p>"),
        Err(e) if e.errcode == trellis_core::error::code::NOT_FOUND => {
            page(StatusCode::NOT_FOUND, "<p>This link is not valid any more.</p>")
        }
        Err(e) => crate::response::ApiError(e).into_response(),
    }
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
