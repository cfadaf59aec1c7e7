//! `POST /account/deactivate` as a whole: the account closes (see
//! [`Accounts::deactivate`](super::Accounts::deactivate)), an erasure is recorded so that
//! later joiners get the user's events redacted (`rooms::erasure`) and the media they
//! uploaded are deleted, and the user leaves
//! every room and turns down every invite, as the spec asks of a deactivation.

use std::sync::Arc;

use ruma::{OwnedRoomId, UserId, events::room::member::MembershipState};
use tracing::Instrument;
use trellis_core::{Error, Result};

use crate::{Services, audit::Client, rooms::membership};

pub async fn deactivate(
    services: &Arc<Services>,
    localpart: &str,
    erase: bool,
    client: &Client,
) -> Result<()> {
    let user_id = UserId::parse(services.accounts.user_id(localpart))
        .map_err(|e| Error::internal("user id", e))?;
    if erase {
        // From here on, whoever joins a room gets this user's events there redacted.
        let now = services.rooms.stream.visible();
        services.rooms.erasures.erase(user_id.as_str(), now).await?;
    }
    services.accounts.deactivate(localpart, erase, client).await?;
    if erase {
        let removed = services.media.delete_uploads_of(localpart).await?;
        services
            .audit
            .log(Some(localpart), "erase_media", client, "ok", Some(format!("{removed} items")))
            .await;
    }
    let rooms = &services.rooms;
    let mut left: Vec<OwnedRoomId> = rooms.joined_rooms(&user_id)?;
    for state in [MembershipState::Invite, MembershipState::Knock] {
        let ids = rooms.rooms_of(user_id.as_str(), &state)?;
        left.extend(ids.into_iter().filter_map(|r| OwnedRoomId::try_from(r).ok()));
    }
    let span = tracing::info_span!("deactivation_leaves", user = %user_id, rooms = left.len());
    async {
        for room_id in left {
            // One room that cannot be left (its server unreachable) leaves the rest.
            if let Err(e) = membership::leave(services, &user_id, &room_id, None).await {
                tracing::warn!(%room_id, error = %e, "a deactivated user could not leave a room");
            }
        }
    }
    .instrument(span)
    .await;
    Ok(())
}
