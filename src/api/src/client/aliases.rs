//! Room aliases: `PUT/GET/DELETE /directory/room/{alias}` and `GET /rooms/{id}/aliases`.

use axum::Router;
use ruma::{
    OwnedRoomAliasId, OwnedRoomId, OwnedServerName,
    api::client::{
        alias::{create_alias, delete_alias, get_alias},
        room::aliases,
    },
};
use trellis_core::{Error, Result};
use trellis_service::appservice;

use super::rooms::require_joined;
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

/// Whether the user may change the room's canonical alias (and so remove its aliases).
fn may_manage_aliases(ctx: &Ctx, room_id: &str, user: &str) -> Result<bool> {
    let power = ctx.services.rooms.power(room_id, user)?;
    let needed = power.levels["events"]["m.room.canonical_alias"]
        .as_i64()
        .or_else(|| power.levels["state_default"].as_i64())
        .unwrap_or(50);
    Ok(power.level >= needed)
}

/// PUT /_matrix/client/v3/directory/room/{roomAlias}
async fn create(ctx: Ctx, req: create_alias::v3::Request) -> Result<create_alias::v3::Response> {
    require_joined(&ctx, &req.room_id)?;
    let session = ctx.session()?;
    appservice::check_alias_not_exclusive(&ctx.services, session, req.room_alias.as_str())?;
    let localpart = session.localpart.clone();
    ctx.services.aliases.set(req.room_alias.as_str(), req.room_id.as_str(), &localpart).await?;
    Ok(create_alias::v3::Response::new())
}

/// The room a local alias names, and this server as the one to join through.
pub(crate) fn local_alias(
    services: &trellis_service::Services,
    alias: &str,
) -> Result<(OwnedRoomId, Vec<OwnedServerName>)> {
    let record =
        services.aliases.resolve(alias)?.ok_or_else(|| Error::not_found("Room alias not found"))?;
    let room_id =
        OwnedRoomId::try_from(record.room_id).map_err(|e| Error::internal("room id", e))?;
    let server = OwnedServerName::try_from(services.server_name())
        .map_err(|e| Error::internal("server name", e))?;
    Ok((room_id, vec![server]))
}

/// GET /_matrix/client/v3/directory/room/{roomAlias}
async fn get(ctx: Ctx, req: get_alias::v3::Request) -> Result<get_alias::v3::Response> {
    if req.room_alias.server_name().as_str() != ctx.services.server_name() {
        let answer = ctx.services.federation.remote_alias(req.room_alias.as_str()).await?;
        let room_id = answer["room_id"]
            .as_str()
            .and_then(|r| OwnedRoomId::try_from(r).ok())
            .ok_or_else(|| Error::not_found("Room alias not found"))?;
        let servers = answer["servers"]
            .as_array()
            .map(|a| a.iter().filter_map(|s| s.as_str()?.try_into().ok()).collect())
            .unwrap_or_default();
        return Ok(get_alias::v3::Response::new(room_id, servers));
    }
    let alias = req.room_alias.as_str();
    if ctx.services.aliases.resolve(alias)?.is_none() {
        // An application service whose namespace holds it may create it now.
        appservice::queries::query_alias(&ctx.services, alias).await?;
    }
    let (room_id, servers) = local_alias(&ctx.services, alias)?;
    Ok(get_alias::v3::Response::new(room_id, servers))
}

/// DELETE /_matrix/client/v3/directory/room/{roomAlias}
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
    if record.creator != session.localpart
        && !is_admin
        && !may_manage_aliases(&ctx, &record.room_id, &user)?
    {
        return Err(Error::forbidden("You may not remove this alias"));
    }
    let user = ruma::UserId::parse(user).map_err(|e| Error::internal("user id", e))?;
    trellis_service::rooms::aliases::delete_alias(&ctx.services, &user, alias).await?;
    Ok(delete_alias::v3::Response::new())
}

/// GET /_matrix/client/v3/rooms/{roomId}/aliases
async fn list(ctx: Ctx, req: aliases::v3::Request) -> Result<aliases::v3::Response> {
    let user = ctx.services.accounts.user_id(&ctx.session()?.localpart);
    let aliases = trellis_service::rooms::aliases::listed_for(&ctx.services, &user, &req.room_id)?
        .into_iter()
        .filter_map(|a| OwnedRoomAliasId::try_from(a).ok())
        .collect();
    Ok(aliases::v3::Response::new(aliases))
}
