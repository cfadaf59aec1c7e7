//! Media: quarantine and protection, one item's details and deletion, clean-ups.

use axum::{
    Router,
    extract::{Path, RawQuery, State},
    http::request::Parts,
    response::Response,
    routing::{get, post},
};
use serde_json::json;
use trellis_core::{Error, Result};
use trellis_service::admin::{media, users};

use super::{Params, admin_caller, respond, rooms::quarantine_room_media, to_json};
use crate::AppState;

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    router
        .route("/_synapse/admin/v1/media/quarantine/{server}/{id}", post(quarantine))
        .route("/_synapse/admin/v1/media/unquarantine/{server}/{id}", post(unquarantine))
        .route("/_synapse/admin/v1/media/protect/{id}", post(protect))
        .route("/_synapse/admin/v1/media/unprotect/{id}", post(unprotect))
        .route("/_synapse/admin/v1/media/{server}/{id}", get(info).delete(delete_one))
        .route("/_synapse/admin/v1/media/delete", post(delete_old))
        .route("/_synapse/admin/v1/media/{server}/delete", post(delete_old_of_server))
        .route("/_synapse/admin/v1/purge_media_cache", post(purge_cache))
        .route("/_synapse/admin/v1/room/{room_id}/media/quarantine", post(quarantine_room))
        .route("/_synapse/admin/v1/quarantine_media/{room_id}", post(quarantine_room))
        .route("/_synapse/admin/v1/user/{user_id}/media/quarantine", post(quarantine_user))
}

/// POST /_synapse/admin/v1/media/quarantine/{serverName}/{mediaId}
///
/// Quarantined media is served to nobody; the file stays for the admin to inspect.
async fn quarantine(
    State(s): State<AppState>,
    parts: Parts,
    Path((server, id)): Path<(String, String)>,
) -> Response {
    respond(
        async {
            let (admin, _) = admin_caller(&parts)?;
            s.media.quarantine(&server, &id, Some(&s.accounts.user_id(&admin))).await?;
            Ok(json!({}))
        }
        .await,
    )
}

/// POST /_synapse/admin/v1/media/unquarantine/{serverName}/{mediaId}
async fn unquarantine(
    State(s): State<AppState>,
    Path((server, id)): Path<(String, String)>,
) -> Response {
    respond(s.media.quarantine(&server, &id, None).await.map(|()| json!({})))
}

/// POST /_synapse/admin/v1/media/protect/{mediaId}
async fn protect(State(s): State<AppState>, Path(id): Path<String>) -> Response {
    respond(s.media.protect(s.server_name(), &id, true).await.map(|()| json!({})))
}

/// POST /_synapse/admin/v1/media/unprotect/{mediaId}
async fn unprotect(State(s): State<AppState>, Path(id): Path<String>) -> Response {
    respond(s.media.protect(s.server_name(), &id, false).await.map(|()| json!({})))
}

/// GET /_synapse/admin/v1/media/{serverName}/{mediaId}
async fn info(State(s): State<AppState>, Path((server, id)): Path<(String, String)>) -> Response {
    respond(media::info(&s, &server, &id).and_then(to_json).map(|mut info| {
        let local = server == s.server_name();
        info["media_origin"] = if local { json!(null) } else { json!(server) };
        json!({"media_info": info})
    }))
}

/// DELETE /_synapse/admin/v1/media/{serverName}/{mediaId}
///
/// Deletes a media item; its file goes once no other media item has the same content.
async fn delete_one(
    State(s): State<AppState>,
    Path((server, id)): Path<(String, String)>,
) -> Response {
    respond(
        async {
            if server != s.server_name() {
                return Err(Error::invalid_param("Can only delete local media"));
            }
            s.media.info(&server, &id)?;
            let deleted = media::delete(&s, vec![id]).await?;
            Ok(json!({"total": deleted.len(), "deleted_media": deleted}))
        }
        .await,
    )
}

/// The earliest plausible timestamp in milliseconds: smaller ones are seconds by mistake.
const MIN_TS_MS: u64 = 30_000_000_000;

fn before_ts(params: &Params) -> Result<u64> {
    let ts = params.u64("before_ts")?.ok_or_else(|| Error::missing_param("Missing before_ts"))?;
    if ts < MIN_TS_MS {
        return Err(Error::invalid_param("before_ts is in milliseconds, not from the year 1970"));
    }
    Ok(ts)
}

async fn remove_old(s: &AppState, q: Option<String>) -> Result<serde_json::Value> {
    let params = Params::parse(q);
    let before = before_ts(&params)?;
    let size_gt = params.u64("size_gt")?.unwrap_or(0);
    let keep_profiles = params.bool("keep_profiles")?.unwrap_or(true);
    let deleted = media::delete_old(s, before, size_gt, keep_profiles).await?;
    Ok(json!({"total": deleted.len(), "deleted_media": deleted}))
}

/// POST /_synapse/admin/v1/media/delete
async fn delete_old(State(s): State<AppState>, RawQuery(q): RawQuery) -> Response {
    respond(remove_old(&s, q).await)
}

/// POST /_synapse/admin/v1/media/{serverName}/delete
async fn delete_old_of_server(
    State(s): State<AppState>,
    Path(server): Path<String>,
    RawQuery(q): RawQuery,
) -> Response {
    respond(
        async {
            if server != s.server_name() {
                return Err(Error::invalid_param("Can only delete local media"));
            }
            remove_old(&s, q).await
        }
        .await,
    )
}

/// POST /_synapse/admin/v1/purge_media_cache
async fn purge_cache(State(s): State<AppState>, RawQuery(q): RawQuery) -> Response {
    respond(
        async {
            let before = before_ts(&Params::parse(q))?;
            Ok(json!({"deleted": media::purge_remote_cache(&s, before).await?}))
        }
        .await,
    )
}

/// POST /_synapse/admin/v1/room/{roomId}/media/quarantine
async fn quarantine_room(
    State(s): State<AppState>,
    parts: Parts,
    Path(id): Path<String>,
) -> Response {
    respond(
        async {
            let (admin, _) = admin_caller(&parts)?;
            Ok(json!({"num_quarantined": quarantine_room_media(&s, &admin, &id).await?}))
        }
        .await,
    )
}

/// POST /_synapse/admin/v1/user/{userId}/media/quarantine
async fn quarantine_user(
    State(s): State<AppState>,
    parts: Parts,
    Path(id): Path<String>,
) -> Response {
    respond(
        async {
            let (admin, _) = admin_caller(&parts)?;
            let (localpart, _) = users::existing(&s, &id)?;
            let admin = s.accounts.user_id(&admin);
            Ok(json!({"num_quarantined": media::quarantine_user(&s, &admin, &localpart).await?}))
        }
        .await,
    )
}
