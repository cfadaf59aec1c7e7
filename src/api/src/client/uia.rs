//! Converting ruma's `auth` objects into what the accounts service checks.

use ruma::api::client::uiaa::{AuthData, UserIdentifier};
use trellis_core::Result;
use trellis_service::accounts::AuthInput;

use crate::ruma_route::Ctx;

pub fn auth_input(auth: Option<&AuthData>) -> Option<AuthInput> {
    let auth = auth?;
    let mut input = AuthInput {
        session: auth.session().map(str::to_owned),
        kind: auth.auth_type().map(|t| t.to_string()),
        ..Default::default()
    };
    // ruma does not recognise the spec's stage name for registration tokens and keeps
    // it as a custom stage, so read the token from the raw data.
    input.token = auth.data().get("token").and_then(|v| v.as_str()).map(str::to_owned);
    let creds = auth.data().get("threepid_creds").cloned();
    input.threepid_creds = creds.and_then(|c| {
        let sid = c.get("sid")?.as_str()?.to_owned();
        let secret = c.get("client_secret")?.as_str()?.to_owned();
        Some((sid, secret))
    });
    if let AuthData::Password(p) = auth {
        input.password = Some(p.password.clone());
        if let UserIdentifier::Matrix(id) = &p.identifier {
            input.user = Some(id.user.clone());
        }
    }
    Some(input)
}

/// Re-authenticates the signed-in user before a sensitive action (password, or a dummy
/// stage for accounts without one); returns the user's localpart.
pub async fn reauthenticate(ctx: &Ctx, auth: Option<&AuthData>, purpose: &str) -> Result<String> {
    let localpart = ctx.session()?.localpart.clone();
    ctx.services.accounts.reauthenticate(&localpart, auth_input(auth).as_ref(), purpose).await?;
    Ok(localpart)
}
