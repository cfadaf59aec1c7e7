//! `GET /_matrix/federation/v1/hierarchy/{roomId}`: a space and its direct children as
//! another server may see them.

use axum::Router;
use ruma::{
    OwnedRoomId,
    api::federation::space::{SpaceHierarchyParentSummary, get_hierarchy},
};
use trellis_core::Result;
use trellis_service::rooms::public::server_hierarchy;

use crate::{
    AppState,
    client::spaces::children_state,
    ruma_route::{self, Ctx},
};

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    ruma_route::add::<get_hierarchy::v1::Request, _, _>(router, hierarchy)
}

/// GET /_matrix/federation/v1/hierarchy/{roomId}
async fn hierarchy(
    ctx: Ctx,
    req: get_hierarchy::v1::Request,
) -> Result<get_hierarchy::v1::Response> {
    let origin = ctx.origin()?;
    let found =
        server_hierarchy(&ctx.services.rooms, req.room_id.as_str(), origin, req.suggested_only)?;
    let room = SpaceHierarchyParentSummary::new(
        found.room.info.to_summary()?,
        children_state(&found.room)?,
    );
    let mut resp = get_hierarchy::v1::Response::new(room);
    resp.children = found.children.iter().map(|c| c.to_summary()).collect::<Result<_>>()?;
    resp.inaccessible_children =
        found.inaccessible.iter().filter_map(|r| OwnedRoomId::try_from(r.as_str()).ok()).collect();
    Ok(resp)
}
