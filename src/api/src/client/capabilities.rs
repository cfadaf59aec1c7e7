//! `GET /capabilities`: what this server lets the user do.

use axum::Router;
#[allow(deprecated)]
use ruma::api::client::discovery::get_capabilities::{
    self,
    v3::{
        AccountModerationCapability, Capabilities, ChangePasswordCapability,
        GetLoginTokenCapability, ProfileFieldsCapability, RoomVersionStability,
        RoomVersionsCapability, SetAvatarUrlCapability, SetDisplayNameCapability,
        ThirdPartyIdChangesCapability,
    },
};
use trellis_core::Result;

use crate::{
    AppState,
    ruma_route::{self, Ctx},
};

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    ruma_route::add_patched::<get_capabilities::v3::Request, _, _>(
        router,
        capabilities,
        Some(enabled_listed),
    )
}

/// ruma leaves out a capability at its default value, which for these is `enabled:
/// true`; clients written before the default was specified read an absent one as off.
fn enabled_listed(body: &mut serde_json::Value) {
    if let Some(caps) = body["capabilities"].as_object_mut() {
        for name in ["m.change_password", "m.set_displayname", "m.set_avatar_url"] {
            caps.entry(name).or_insert_with(|| serde_json::json!({"enabled": true}));
        }
    }
}

// The per-field capabilities are deprecated since v1.16 in favour of `m.profile_fields`,
// but clients written against older versions still read them.
/// GET /_matrix/client/v3/capabilities
#[allow(deprecated)]
async fn capabilities(
    ctx: Ctx,
    _: get_capabilities::v3::Request,
) -> Result<get_capabilities::v3::Response> {
    let session = ctx.session()?;
    let mut caps = Capabilities::new();
    // Server admins lock and suspend accounts (`/_matrix/client/v1/admin/...`).
    if ctx.services.accounts.user(&session.localpart)?.is_some_and(|u| u.admin) {
        caps.account_moderation = AccountModerationCapability::new(true, true);
    }
    caps.change_password = ChangePasswordCapability::new(true);
    caps.set_displayname = SetDisplayNameCapability::new(true);
    caps.set_avatar_url = SetAvatarUrlCapability::new(true);
    // Addresses can be added and removed when the server sends validation mail.
    caps.thirdparty_id_changes = ThirdPartyIdChangesCapability::new(ctx.services.mailer.is_some());
    caps.get_login_token = GetLoginTokenCapability::new(true);
    caps.profile_fields = Some(ProfileFieldsCapability::new(true));
    // Every version ruma has rules for is supported; the default comes from config.
    let available = (1..=12)
        .filter_map(|n| ruma::RoomVersionId::try_from(n.to_string().as_str()).ok())
        .filter(|v| v.rules().is_some())
        .map(|v| (v, RoomVersionStability::Stable))
        .collect();
    let default =
        ruma::RoomVersionId::try_from(ctx.services.config.rooms.default_room_version.as_str())
            .map_err(|e| trellis_core::Error::internal("default room version", e))?;
    caps.room_versions = RoomVersionsCapability::new(default, available);
    Ok(get_capabilities::v3::Response::new(caps))
}
