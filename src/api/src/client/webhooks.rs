//! Incoming webhooks (a Trellis extension): `/_trellis/client/v1/rooms/{roomId}/webhooks`
//! to create, list and revoke a room's hooks, and `/_trellis/hooks/v1/{id}/{secret}`, the
//! URL a hook's caller posts to (no access token: the secret is the credential).

use axum::{
    Router,
    body::Bytes,
    extract::{Path, State},
    http::{HeaderMap, request::Parts},
    response::{IntoResponse, Response},
    routing::{delete, post},
};
use http::StatusCode;
use ruma::RoomId;
use serde::Deserialize;
use serde_json::{Value, json};
use trellis_core::{Error, Result};
use trellis_service::webhooks;

use super::events::user;
use crate::{
    AppState,
    response::{ApiError, json_response},
    ruma_route::{Authenticated, client_of, json_error},
};

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    router
        .route("/_trellis/client/v1/rooms/{room_id}/webhooks", post(create).get(list))
        .route("/_trellis/client/v1/rooms/{room_id}/webhooks/{id}", delete(revoke))
        .route(
            "/_trellis/client/v1/rooms/{room_id}/webhooks/outgoing",
            post(create_outgoing).get(list_outgoing),
        )
        .route(
            "/_trellis/client/v1/rooms/{room_id}/webhooks/outgoing/{id}",
            delete(revoke_outgoing),
        )
        .route("/_trellis/hooks/v1/{id}/{secret}", post(call))
}

pub(super) fn respond(answer: Result<Value>) -> Response {
    match answer {
        Ok(body) => json_response(StatusCode::OK, body.to_string().into_bytes()),
        Err(e) => ApiError(e).into_response(),
    }
}

fn room(room_id: &str) -> Result<&RoomId> {
    <&RoomId>::try_from(room_id).map_err(|_| Error::invalid_param("Not a room id"))
}

fn describe(hook: &webhooks::Webhook) -> Value {
    json!({"id": hook.id, "room_id": hook.room_id, "name": hook.name, "msgtype": hook.msgtype,
           "created_by": hook.created_by, "created_ts": hook.created_ms})
}

#[derive(Deserialize, Default)]
struct NewHook {
    name: Option<String>,
    msgtype: Option<String>,
}

/// POST /_trellis/client/v1/rooms/{roomId}/webhooks
async fn create(
    Authenticated(ctx): Authenticated,
    Path(room_id): Path<String>,
    body: Bytes,
) -> Response {
    respond(
        async {
            let req: NewHook = if body.is_empty() {
                NewHook::default()
            } else {
                serde_json::from_slice(&body).map_err(json_error)?
            };
            let (user, room) = (user(&ctx)?, room(&room_id)?);
            let created =
                webhooks::create(&ctx.services, &user, room, req.name, req.msgtype, &ctx.client)
                    .await?;
            let url = format!(
                "{}/_trellis/hooks/v1/{}/{}",
                ctx.services.public_base_url(),
                created.hook.id,
                created.secret
            );
            let mut answer = describe(&created.hook);
            answer["url"] = json!(url);
            Ok(answer)
        }
        .await,
    )
}

/// GET /_trellis/client/v1/rooms/{roomId}/webhooks
async fn list(Authenticated(ctx): Authenticated, Path(room_id): Path<String>) -> Response {
    respond(
        async {
            let hooks = webhooks::list(&ctx.services, &user(&ctx)?, room(&room_id)?)?;
            Ok(json!({"webhooks": hooks.iter().map(describe).collect::<Vec<_>>()}))
        }
        .await,
    )
}

/// DELETE /_trellis/client/v1/rooms/{roomId}/webhooks/{id}
async fn revoke(
    Authenticated(ctx): Authenticated,
    Path((room_id, id)): Path<(String, String)>,
) -> Response {
    respond(
        async {
            let (user, room) = (user(&ctx)?, room(&room_id)?);
            webhooks::revoke(&ctx.services, &user, room, &id, &ctx.client).await?;
            Ok(json!({}))
        }
        .await,
    )
}

/// POST /_trellis/hooks/v1/{id}/{secret}
async fn call(
    State(services): State<AppState>,
    Path((id, secret)): Path<(String, String)>,
    headers: HeaderMap,
    parts: Parts,
    body: Bytes,
) -> Response {
    respond(
        async {
            let client = client_of(&parts, services.config.http.x_forwarded_for);
            let content_type = headers.get("content-type").and_then(|v| v.to_str().ok());
            let post = webhooks::parse_post(content_type, &body)?;
            let event_id = webhooks::call(&services, &id, &secret, post, &client).await?;
            Ok(json!({"event_id": event_id}))
        }
        .await,
    )
}

#[derive(Deserialize)]
struct NewOutgoing {
    url: String,
}

/// POST /_trellis/client/v1/rooms/{roomId}/webhooks/outgoing
async fn create_outgoing(
    Authenticated(ctx): Authenticated,
    Path(room_id): Path<String>,
    body: Bytes,
) -> Response {
    respond(
        async {
            let req: NewOutgoing = serde_json::from_slice(&body).map_err(json_error)?;
            let (user, room) = (user(&ctx)?, room(&room_id)?);
            let hook = webhooks::create_outgoing(&ctx.services, &user, room, &req.url, &ctx.client)
                .await?;
            Ok(json!({"id": hook.id, "url": hook.url, "token": hook.token}))
        }
        .await,
    )
}

/// GET /_trellis/client/v1/rooms/{roomId}/webhooks/outgoing
async fn list_outgoing(Authenticated(ctx): Authenticated, Path(room_id): Path<String>) -> Response {
    respond(
        async {
            let hooks = webhooks::list_outgoing(&ctx.services, &user(&ctx)?, room(&room_id)?)?;
            let listed: Vec<Value> =
                hooks.iter().map(|(id, url)| json!({"id": id, "url": url})).collect();
            Ok(json!({"webhooks": listed}))
        }
        .await,
    )
}

/// DELETE /_trellis/client/v1/rooms/{roomId}/webhooks/outgoing/{id}
async fn revoke_outgoing(
    Authenticated(ctx): Authenticated,
    Path((room_id, id)): Path<(String, String)>,
) -> Response {
    respond(
        async {
            let (user, room) = (user(&ctx)?, room(&room_id)?);
            webhooks::revoke_outgoing(&ctx.services, &user, room, &id, &ctx.client).await?;
            Ok(json!({}))
        }
        .await,
    )
}
