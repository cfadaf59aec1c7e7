//! `GET /capabilities`: what this server lets the user do.

use axum::Router;
#[allow(deprecated)]
use ruma::api::client::discovery::get_capabilities::{
    self,
    v3::{
        Capabilities, ChangePasswordCapability, GetLoginTokenCapability, ProfileFieldsCapability,
        SetAvatarUrlCapability, SetDisplayNameCapability, ThirdPartyIdChangesCapability,
    },
};
use trellis_core::Result;

use crate::{
    AppState,
    ruma_route::{self, Ctx},
};

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    ruma_route::add::<get_capabilities::v3::Request, _, _>(router, capabilities)
}

// The per-field capabilities are deprecated since v1.16 in favour of `m.profile_fields`,
// but clients written against older versions still read them.
#[allow(deprecated)]
async fn capabilities(
    ctx: Ctx,
    _: get_capabilities::v3::Request,
) -> Result<get_capabilities::v3::Response> {
    ctx.session()?;
    let mut caps = Capabilities::new();
    caps.change_password = ChangePasswordCapability::new(true);
    caps.set_displayname = SetDisplayNameCapability::new(true);
    caps.set_avatar_url = SetAvatarUrlCapability::new(true);
    // Email and phone numbers cannot be added yet.
    caps.thirdparty_id_changes = ThirdPartyIdChangesCapability::new(false);
    caps.get_login_token = GetLoginTokenCapability::new(true);
    caps.profile_fields = Some(ProfileFieldsCapability::new(true));
    Ok(get_capabilities::v3::Response::new(caps))
}
