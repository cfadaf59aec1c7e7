//! `POST /user_directory/search`.

use axum::Router;
use ruma::events::room::member::MembershipState;
use ruma::{
    OwnedMxcUri, UserId,
    api::client::user_directory::search_users::{self, v3::User},
};
use trellis_core::{Error, Result};

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
    let searcher = ctx.session()?.localpart.clone();
    let limit = usize::try_from(u64::from(req.limit)).unwrap_or(MAX_LIMIT).min(MAX_LIMIT);
    // Visible: the searcher, everyone joined to a room the searcher is joined to, and
    // the members of rooms published in the room directory.
    let me = ctx.services.accounts.user_id(&searcher);
    let mut visible = std::collections::HashSet::from([me.clone()]);
    let mut rooms = ctx.services.rooms.rooms_of(&me, &MembershipState::Join)?;
    rooms.extend(ctx.services.public_rooms.published()?);
    rooms.sort();
    rooms.dedup();
    for room in rooms {
        visible.extend(ctx.services.rooms.members(&room, &MembershipState::Join)?);
    }
    let accounts = &ctx.services.accounts;
    let (hits, limited) = ctx.services.directory.search(&req.search_term, limit, |localpart| {
        Ok(visible.contains(&accounts.user_id(localpart)))
    })?;
    let mut results = Vec::with_capacity(hits.len());
    for hit in hits {
        let user_id = UserId::parse(ctx.services.accounts.user_id(&hit.localpart))
            .map_err(|e| Error::internal("user id", e))?;
        let mut user = User::new(user_id);
        user.display_name = hit.display_name;
        user.avatar_url = hit.avatar_url.map(OwnedMxcUri::from);
        results.push(user);
    }
    Ok(search_users::v3::Response::new(results, limited))
}
