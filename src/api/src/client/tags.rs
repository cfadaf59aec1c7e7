//! Room tags: `GET /user/{userId}/rooms/{roomId}/tags` and `PUT`/`DELETE` of one tag.
//! Tags are the per-room `m.tag` account data event (`{"tags": {name: {order?}}}`), so
//! sync delivers them with the rest of the room's account data.

use axum::Router;
use ruma::api::client::tag::{create_tag, delete_tag, get_tags};
use trellis_core::Result;

use crate::{
    AppState,
    ruma_route::{self, Ctx},
};

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = ruma_route::add::<get_tags::v3::Request, _, _>(router, get);
    let router = ruma_route::add::<create_tag::v3::Request, _, _>(router, put);
    ruma_route::add::<delete_tag::v3::Request, _, _>(router, delete)
}

/// GET /_matrix/client/v3/user/{userId}/rooms/{roomId}/tags
async fn get(ctx: Ctx, req: get_tags::v3::Request) -> Result<get_tags::v3::Response> {
    let localpart = &ctx.require_self(&req.user_id)?.localpart;
    let tags = ctx.services.account_data.tags(localpart, &req.room_id)?;
    Ok(get_tags::v3::Response::new(tags))
}

/// PUT /_matrix/client/v3/user/{userId}/rooms/{roomId}/tags/{tag}
async fn put(ctx: Ctx, req: create_tag::v3::Request) -> Result<create_tag::v3::Response> {
    let localpart = &ctx.require_self(&req.user_id)?.localpart;
    ctx.services
        .account_data
        .put_tag(localpart, &req.room_id, &req.tag, req.tag_info.order)
        .await?;
    Ok(create_tag::v3::Response::new())
}

/// DELETE /_matrix/client/v3/user/{userId}/rooms/{roomId}/tags/{tag}
async fn delete(ctx: Ctx, req: delete_tag::v3::Request) -> Result<delete_tag::v3::Response> {
    let localpart = &ctx.require_self(&req.user_id)?.localpart;
    ctx.services.account_data.delete_tag(localpart, &req.room_id, &req.tag).await?;
    Ok(delete_tag::v3::Response::new())
}
