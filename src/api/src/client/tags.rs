//! Room tags: `GET /user/{userId}/rooms/{roomId}/tags` and `PUT`/`DELETE` of one tag.
//! Tags are the per-room `m.tag` account data event (`{"tags": {name: {order?}}}`), so
//! sync delivers them with the rest of the room's account data.

use axum::Router;
use ruma::{
    api::client::tag::{create_tag, delete_tag, get_tags},
    events::tag::{TagInfo, TagName, Tags},
};
use serde_json::{Map, Value, json};
use trellis_core::{Error, Result};

use crate::{
    AppState,
    ruma_route::{self, Ctx},
};

const EVENT_TYPE: &str = "m.tag";
/// The spec caps tag names at 255 bytes.
const MAX_TAG_BYTES: usize = 255;

/// Tag changes rewrite the room's whole `m.tag` event: serialised so that two changes
/// at once cannot both start from the same tags and lose one of them.
static WRITES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = ruma_route::add::<get_tags::v3::Request, _, _>(router, get);
    let router = ruma_route::add::<create_tag::v3::Request, _, _>(router, put);
    ruma_route::add::<delete_tag::v3::Request, _, _>(router, delete)
}

/// The stored tags as a JSON map (empty when none).
fn stored(ctx: &Ctx, localpart: &str, room_id: &str) -> Result<Map<String, Value>> {
    let content = ctx.services.account_data.get(localpart, Some(room_id), EVENT_TYPE)?;
    Ok(match content.and_then(|mut c| c.get_mut("tags").map(Value::take)) {
        Some(Value::Object(tags)) => tags,
        _ => Map::new(),
    })
}

async fn get(ctx: Ctx, req: get_tags::v3::Request) -> Result<get_tags::v3::Response> {
    let localpart = ctx.require_self(&req.user_id)?.localpart.clone();
    let mut tags = Tags::new();
    for (name, info) in stored(&ctx, &localpart, req.room_id.as_str())? {
        // `m.tag` can also be written through the generic account data endpoint, so a
        // malformed entry is skipped rather than failing the whole listing.
        match serde_json::from_value::<TagInfo>(info) {
            Ok(info) => {
                tags.insert(TagName::from(name), info);
            }
            Err(e) => tracing::debug!(error = %e, "skipping a malformed tag"),
        }
    }
    Ok(get_tags::v3::Response::new(tags))
}

async fn put(ctx: Ctx, req: create_tag::v3::Request) -> Result<create_tag::v3::Response> {
    let localpart = ctx.require_self(&req.user_id)?.localpart.clone();
    if req.tag.is_empty() || req.tag.len() > MAX_TAG_BYTES {
        return Err(Error::invalid_param(format!("Tag names are 1 to {MAX_TAG_BYTES} bytes")));
    }
    let mut info = json!({});
    if let Some(order) = req.tag_info.order {
        if !(0.0..=1.0).contains(&order) {
            return Err(Error::invalid_param("order must be a number between 0 and 1"));
        }
        info["order"] = json!(order);
    }
    let room = req.room_id.as_str();
    let _guard = WRITES.lock().await;
    let mut tags = stored(&ctx, &localpart, room)?;
    tags.insert(req.tag, info);
    ctx.services
        .account_data
        .put(&localpart, Some(room), EVENT_TYPE, json!({ "tags": tags }))
        .await?;
    Ok(create_tag::v3::Response::new())
}

async fn delete(ctx: Ctx, req: delete_tag::v3::Request) -> Result<delete_tag::v3::Response> {
    let localpart = ctx.require_self(&req.user_id)?.localpart.clone();
    let room = req.room_id.as_str();
    let _guard = WRITES.lock().await;
    let mut tags = stored(&ctx, &localpart, room)?;
    // Removing a tag the room does not have changes nothing and is not an error.
    if tags.remove(&req.tag).is_some() {
        ctx.services
            .account_data
            .put(&localpart, Some(room), EVENT_TYPE, json!({ "tags": tags }))
            .await?;
    }
    Ok(delete_tag::v3::Response::new())
}
