//! Application services added and removed at runtime (a Trellis admin API; servers admins
//! only, every change in the audit log): `/_trellis/admin/v1/appservices`.

use axum::{
    Router,
    body::Bytes,
    extract::{Path, State},
    http::request::Parts,
    response::Response,
    routing::{delete, get},
};
use serde_json::{Value, json};
use trellis_core::Error;
use trellis_service::appservice::{self, registration::Namespace};

use super::{admin_caller, respond};
use crate::AppState;

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    router
        .route("/_trellis/admin/v1/appservices", get(list).post(add))
        .route("/_trellis/admin/v1/appservices/{id}", delete(remove))
}

fn namespaces(list: &[Namespace]) -> Value {
    list.iter().map(|ns| json!({"exclusive": ns.exclusive, "regex": ns.pattern})).collect()
}

/// GET /_trellis/admin/v1/appservices
async fn list(State(s): State<AppState>, parts: Parts) -> Response {
    respond(
        async {
            admin_caller(&parts)?;
            let listed: Vec<Value> = s
                .appservices
                .all()
                .iter()
                .map(|r| {
                    json!({
                        "id": r.id,
                        "url": r.url,
                        "sender": s.accounts.user_id(&r.sender_localpart),
                        "rate_limited": r.rate_limited,
                        "receive_ephemeral": r.receive_ephemeral,
                        "protocols": r.protocols,
                        "namespaces": {
                            "users": namespaces(&r.users),
                            "aliases": namespaces(&r.aliases),
                            "rooms": namespaces(&r.rooms),
                        },
                    })
                })
                .collect();
            Ok(json!({ "appservices": listed }))
        }
        .await,
    )
}

/// POST /_trellis/admin/v1/appservices (the registration, YAML or JSON, as the body)
async fn add(State(s): State<AppState>, parts: Parts, body: Bytes) -> Response {
    respond(
        async {
            let (admin, client) = admin_caller(&parts)?;
            let text = std::str::from_utf8(&body)
                .map_err(|_| Error::not_json("The registration is not UTF-8 text"))?;
            let id = appservice::add(&s, text).await?;
            s.audit.log(Some(&admin), "appservice_add", &client, "ok", Some(id.clone())).await;
            Ok(json!({ "id": id }))
        }
        .await,
    )
}

/// DELETE /_trellis/admin/v1/appservices/{id}
async fn remove(State(s): State<AppState>, parts: Parts, Path(id): Path<String>) -> Response {
    respond(
        async {
            let (admin, client) = admin_caller(&parts)?;
            appservice::remove(&s, &id).await?;
            s.audit.log(Some(&admin), "appservice_remove", &client, "ok", Some(id)).await;
            Ok(json!({}))
        }
        .await,
    )
}
