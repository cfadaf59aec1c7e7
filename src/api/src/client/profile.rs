//! Profiles: the whole profile and single fields (displayname, avatar_url and extended
//! fields of spec v1.16).

use axum::Router;
use ruma::{
    UserId,
    api::client::profile::{
        ProfileFieldValue, UserProfile, delete_profile_field, get_profile, get_profile_field,
        set_profile_field,
    },
};
use trellis_core::{Error, Result};
use trellis_service::{
    accounts::{Session, profile},
    appservice::queries,
};

use crate::{
    AppState,
    ruma_route::{self, Ctx},
};

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = ruma_route::add::<get_profile::v3::Request, _, _>(router, get_all);
    let router = ruma_route::add::<get_profile_field::v3::Request, _, _>(router, get_field);
    let router = ruma_route::add::<set_profile_field::v3::Request, _, _>(router, set_field);
    ruma_route::add::<delete_profile_field::v3::Request, _, _>(router, delete_field)
}

/// The localpart of a local user who exists and is active, else 404.
/// A local user who exists (an application service whose namespace holds an unknown
/// one is asked first, and may create them).
async fn existing_local_user(ctx: &Ctx, user_id: &UserId) -> Result<String> {
    let not_found = || Error::not_found("Profile not found");
    let accounts = &ctx.services.accounts;
    let localpart = accounts.local_part(user_id.as_str()).ok_or_else(not_found)?;
    let mut user = accounts.user(localpart)?;
    if user.is_none() && queries::query_user(&ctx.services, user_id.as_str()).await? {
        user = accounts.user(localpart)?;
    }
    match user {
        Some(u) if !u.deactivated => Ok(localpart.to_owned()),
        _ => Err(not_found()),
    }
}

/// Another server's user's profile, asked over federation.
async fn remote_profile(ctx: &Ctx, user_id: &UserId, field: Option<&str>) -> Result<UserProfile> {
    let value = ctx.services.federation.remote_profile(user_id.as_str(), field).await?;
    let mut profile = UserProfile::new();
    if let Some(fields) = value.as_object() {
        for (name, v) in fields {
            profile.set(name.clone(), v.clone());
        }
    }
    Ok(profile)
}

fn is_local(ctx: &Ctx, user_id: &UserId) -> bool {
    ctx.services.accounts.local_part(user_id.as_str()).is_some()
}

/// GET /_matrix/client/v3/profile/{userId}
async fn get_all(ctx: Ctx, req: get_profile::v3::Request) -> Result<get_profile::v3::Response> {
    if !is_local(&ctx, &req.user_id) {
        let mut resp = get_profile::v3::Response::new();
        resp.data = remote_profile(&ctx, &req.user_id, None).await?;
        return Ok(resp);
    }
    let localpart = existing_local_user(&ctx, &req.user_id).await?;
    let mut profile = UserProfile::new();
    for (field, value) in ctx.services.profiles.get_all(&localpart)? {
        profile.set(field, value);
    }
    let mut resp = get_profile::v3::Response::new();
    resp.data = profile;
    Ok(resp)
}

/// GET /_matrix/client/v3/profile/{userId}/{field}
async fn get_field(
    ctx: Ctx,
    req: get_profile_field::v3::Request,
) -> Result<get_profile_field::v3::Response> {
    let field = req.field.as_str();
    let value = if is_local(&ctx, &req.user_id) {
        let localpart = existing_local_user(&ctx, &req.user_id).await?;
        ctx.services.profiles.get(&localpart, field)?
    } else {
        let profile = remote_profile(&ctx, &req.user_id, Some(field)).await?;
        profile.get(field).cloned()
    };
    let value = value.ok_or_else(|| Error::not_found("Profile field not set"))?;
    let value = ProfileFieldValue::new(field, value)
        .map_err(|e| Error::internal("stored profile field", e))?;
    Ok(get_profile_field::v3::Response::new(value))
}

/// PUT /_matrix/client/v3/profile/{userId}/{field}
async fn set_field(
    ctx: Ctx,
    req: set_profile_field::v3::Request,
) -> Result<set_profile_field::v3::Response> {
    let session = ctx.require_self(&req.user_id)?;
    let (field, value) = (req.value.field_name(), req.value.value().into_owned());
    guest_keeps_to_display_name(session, field.as_str())?;
    profile::update_field(&ctx.services, &req.user_id, field.as_str(), Some(value)).await?;
    Ok(set_profile_field::v3::Response::new())
}

/// DELETE /_matrix/client/v3/profile/{userId}/{field}
async fn delete_field(
    ctx: Ctx,
    req: delete_profile_field::v3::Request,
) -> Result<delete_profile_field::v3::Response> {
    let session = ctx.require_self(&req.user_id)?;
    guest_keeps_to_display_name(session, req.field.as_str())?;
    profile::update_field(&ctx.services, &req.user_id, req.field.as_str(), None).await?;
    Ok(delete_profile_field::v3::Response::new())
}

/// Guests may change their display name and no other profile field (the spec's guest
/// access module).
fn guest_keeps_to_display_name(session: &Session, field: &str) -> Result<()> {
    if session.guest && field != "displayname" {
        return Err(Error::guest_forbidden());
    }
    Ok(())
}
