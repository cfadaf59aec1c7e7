//! Spaces: `GET /rooms/{roomId}/hierarchy`. Rooms this server is not in are asked of
//! the servers their `m.space.child` events name (federation `/hierarchy`).

use axum::Router;
use http::Method;
use ruma::{
    api::client::space::{SpaceHierarchyRoomsChunk, get_hierarchy},
    serde::Raw,
};
use serde_json::Value;
use trellis_core::{Error, Result};
use trellis_service::{
    federation::encode,
    rooms::public::{HierarchyQuery, HierarchyRoom, hierarchy as walk},
};

use crate::{
    AppState,
    ruma_route::{self, Ctx},
};

/// Servers of one `via` list asked about a room before giving up on it.
const VIA_TRIED: usize = 3;

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    ruma_route::add::<get_hierarchy::v1::Request, _, _>(router, hierarchy)
}

/// GET /_matrix/client/v1/rooms/{roomId}/hierarchy
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
    let services = ctx.services.clone();
    let ask = move |room_id: String, via: Vec<String>| {
        ask_servers(services.clone(), room_id, via, req.suggested_only)
    };
    let page = walk(&ctx.services.rooms, req.room_id.as_str(), &user, &query, ask).await?;
    let mut resp = get_hierarchy::v1::Response::new();
    resp.next_batch = page.next_batch;
    for room in page.rooms {
        resp.rooms.push(chunk(&room)?);
    }
    Ok(resp)
}

/// The first answer of another server's `/hierarchy` for the room, if any gives one.
pub(crate) async fn ask_servers(
    services: AppState,
    room_id: String,
    via: Vec<String>,
    suggested_only: bool,
) -> Option<Value> {
    if !services.federation.enabled() {
        return None;
    }
    let path = format!(
        "/_matrix/federation/v1/hierarchy/{}?suggested_only={suggested_only}",
        encode(&room_id)
    );
    let own = services.server_name();
    for server in via.iter().filter(|s| s.as_str() != own).take(VIA_TRIED) {
        match services.federation.request(server, Method::GET, &path, None).await {
            Ok(answer) => return Some(answer),
            Err(e) => tracing::debug!(%server, room_id, error = %e, "remote hierarchy"),
        }
    }
    None
}

pub(crate) fn children_state(
    room: &HierarchyRoom,
) -> Result<Vec<Raw<ruma::events::space::child::HierarchySpaceChildEvent>>> {
    room.children
        .iter()
        .map(|c| {
            serde_json::value::to_raw_value(&c.stripped())
                .map(Raw::from_json)
                .map_err(|e| Error::internal("space child event", e))
        })
        .collect()
}

fn chunk(room: &HierarchyRoom) -> Result<SpaceHierarchyRoomsChunk> {
    Ok(SpaceHierarchyRoomsChunk::new(room.info.to_summary()?, children_state(room)?))
}
