//! Spaces: `GET /rooms/{roomId}/hierarchy`, over the rooms this server has.

use axum::Router;
use ruma::{
    api::client::space::{SpaceHierarchyRoomsChunk, get_hierarchy},
    serde::Raw,
};
use trellis_core::{Error, Result};
use trellis_service::rooms::public::{HierarchyQuery, hierarchy as walk};

use crate::{
    AppState,
    ruma_route::{self, Ctx},
};

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    ruma_route::add::<get_hierarchy::v1::Request, _, _>(router, hierarchy)
}

async fn hierarchy(
    ctx: Ctx,
    req: get_hierarchy::v1::Request,
) -> Result<get_hierarchy::v1::Response> {
    let user = ctx.services.accounts.user_id(&ctx.session()?.localpart);
    let query = HierarchyQuery {
        from: req.from.as_deref(),
        limit: req.limit.map(u64::from),
        max_depth: req.max_depth.map(u64::from),
        suggested_only: req.suggested_only,
    };
    let page = walk(&ctx.services.rooms, req.room_id.as_str(), &user, &query)?;
    let mut resp = get_hierarchy::v1::Response::new();
    resp.next_batch = page.next_batch;
    for room in page.rooms {
        let children_state = room
            .children
            .iter()
            .map(|c| {
                serde_json::value::to_raw_value(&c.stripped())
                    .map(Raw::from_json)
                    .map_err(|e| Error::internal("space child event", e))
            })
            .collect::<Result<_>>()?;
        resp.rooms.push(SpaceHierarchyRoomsChunk::new(room.info.to_summary()?, children_state));
    }
    Ok(resp)
}
