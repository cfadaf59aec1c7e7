//! `POST /user_directory/search`.

use axum::Router;
use ruma::{
    OwnedMxcUri,
    api::client::user_directory::search_users::{self, v3::User},
};
use trellis_core::Result;
use trellis_service::accounts::directory;

use super::events::user;

use crate::{
    AppState,
    ruma_route::{self, Ctx},
};

/// The most results one search returns, whatever the client asks.
const MAX_LIMIT: usize = 100;

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    ruma_route::add::<search_users::v3::Request, _, _>(router, search)
}

/// POST /_matrix/client/v3/user_directory/search
async fn search(ctx: Ctx, req: search_users::v3::Request) -> Result<search_users::v3::Response> {
    let limit = usize::try_from(u64::from(req.limit)).unwrap_or(MAX_LIMIT).min(MAX_LIMIT);
    let (hits, limited) =
        directory::search_users(&ctx.services, &user(&ctx)?, &req.search_term, limit)?;
    let results = hits
        .into_iter()
        .map(|(user_id, hit)| {
            let mut user = User::new(user_id);
            user.display_name = hit.display_name;
            user.avatar_url = hit.avatar_url.map(OwnedMxcUri::from);
            user
        })
        .collect();
    Ok(search_users::v3::Response::new(results, limited))
}
