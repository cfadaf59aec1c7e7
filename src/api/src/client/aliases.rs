//! Room aliases: `PUT/GET/DELETE /directory/room/{alias}` and `GET /rooms/{id}/aliases`.

use axum::Router;
use ruma::{
    OwnedRoomAliasId, OwnedRoomId, OwnedServerName,
    api::client::{
        alias::{create_alias, delete_alias, get_alias},
        room::aliases,
    },
};
use serde_json::Value;
use trellis_core::{Error, Result};

use crate::{
    AppState,
    ruma_route::{self, Ctx},
};

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = ruma_route::add::<create_alias::v3::Request, _, _>(router, create);
    let router = ruma_route::add::<get_alias::v3::Request, _, _>(router, get);
    let router = ruma_route::add::<delete_alias::v3::Request, _, _>(router, delete);
    ruma_route::add::<aliases::v3::Request, _, _>(router, list)
}

fn joined(ctx: &Ctx, room_id: &str) -> Result<String> {
    let user = ctx.services.accounts.user_id(&ctx.session()?.localpart);
    match ctx.services.rooms.membership(room_id, &user)?.as_deref() {
        Some("join") => Ok(user),
        _ => Err(Error::forbidden("You are not a member of this room")),
    }
}

/// The user's power in a room as its power levels state says, and the level needed to
/// change its canonical alias. Creators of rooms that privilege them rank above all.
fn alias_power(ctx: &Ctx, room_id: &str, user: &str) -> Result<(i64, i64)> {
    let rooms = &ctx.services.rooms;
    let levels: Value = rooms
        .state_of(room_id, "m.room.power_levels", "")?
        .map(|p| serde_json::from_str(p.content.get()).unwrap_or(Value::Null))
        .unwrap_or(Value::Null);
    let creator =
        rooms.state_of(room_id, "m.room.create", "")?.is_some_and(|c| c.sender.as_str() == user);
    let level = if creator && levels["users"][user].is_null() {
        i64::MAX
    } else {
        levels["users"][user].as_i64().or_else(|| levels["users_default"].as_i64()).unwrap_or(0)
    };
    let needed = levels["events"]["m.room.canonical_alias"]
        .as_i64()
        .or_else(|| levels["state_default"].as_i64())
        .unwrap_or(50);
    Ok((level, needed))
}

async fn create(ctx: Ctx, req: create_alias::v3::Request) -> Result<create_alias::v3::Response> {
    joined(&ctx, req.room_id.as_str())?;
    let localpart = ctx.session()?.localpart.clone();
    ctx.services.aliases.set(req.room_alias.as_str(), req.room_id.as_str(), &localpart).await?;
    Ok(create_alias::v3::Response::new())
}

async fn get(ctx: Ctx, req: get_alias::v3::Request) -> Result<get_alias::v3::Response> {
    let record = ctx
        .services
        .aliases
        .resolve(req.room_alias.as_str())?
        .ok_or_else(|| Error::not_found("Room alias not found"))?;
    let room_id =
        OwnedRoomId::try_from(record.room_id).map_err(|e| Error::internal("room id", e))?;
    let server = OwnedServerName::try_from(ctx.services.server_name())
        .map_err(|e| Error::internal("server name", e))?;
    Ok(get_alias::v3::Response::new(room_id, vec![server]))
}

async fn delete(ctx: Ctx, req: delete_alias::v3::Request) -> Result<delete_alias::v3::Response> {
    let session = ctx.session()?.clone();
    let alias = req.room_alias.as_str();
    let record = ctx
        .services
        .aliases
        .resolve(alias)?
        .ok_or_else(|| Error::not_found("Room alias not found"))?;
    let user = ctx.services.accounts.user_id(&session.localpart);
    let is_admin = ctx.services.accounts.user(&session.localpart)?.is_some_and(|u| u.admin);
    let (level, needed) = alias_power(&ctx, &record.room_id, &user)?;
    if record.creator != session.localpart && !is_admin && level < needed {
        return Err(Error::forbidden("You may not remove this alias"));
    }
    ctx.services.aliases.delete(alias).await?;
    Ok(delete_alias::v3::Response::new())
}

async fn list(ctx: Ctx, req: aliases::v3::Request) -> Result<aliases::v3::Response> {
    joined(&ctx, req.room_id.as_str())?;
    let aliases = ctx
        .services
        .aliases
        .of_room(req.room_id.as_str())?
        .into_iter()
        .filter_map(|a| OwnedRoomAliasId::try_from(a).ok())
        .collect();
    Ok(aliases::v3::Response::new(aliases))
}
