//! Accounts: `/_synapse/admin/v{1,2,3}/users...` and the account actions admin tools use.

use axum::{
    Router,
    body::Bytes,
    extract::{Path, RawQuery, State},
    http::request::Parts,
    response::{IntoResponse, Response},
    routing::{get, post, put},
};
use http::StatusCode;
use ruma::UserId;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use trellis_core::{Error, Result};
use trellis_service::{
    accounts::{admin::Flag, moderation::Restriction},
    admin::{media as admin_media, users},
    tables::RateOverride,
};

use super::{Params, admin_caller, next_from, page, parse_body, present, respond, to_json, yes};
use crate::{AppState, response::ApiError};

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    router
        .route("/_synapse/admin/v2/users", get(list_v2))
        .route("/_synapse/admin/v3/users", get(list_v3))
        .route("/_synapse/admin/v2/users/{user_id}", get(show).put(create_or_modify))
        .route("/_synapse/admin/v1/deactivate/{user_id}", post(deactivate))
        .route("/_synapse/admin/v1/reset_password/{user_id}", post(reset_password))
        .route("/_synapse/admin/v1/users/{user_id}/admin", get(get_admin).put(set_admin))
        .route(
            "/_synapse/admin/v1/users/{user_id}/shadow_ban",
            post(shadow_ban).delete(lift_shadow_ban),
        )
        .route(
            "/_synapse/admin/v1/users/{user_id}/override_ratelimit",
            get(get_ratelimit).post(set_ratelimit).delete(delete_ratelimit),
        )
        .route("/_synapse/admin/v1/suspend/{user_id}", put(suspend))
        .route("/_synapse/admin/v2/users/{user_id}/devices", get(devices).post(add_device))
        .route(
            "/_synapse/admin/v2/users/{user_id}/devices/{device_id}",
            get(device).put(rename_device).delete(delete_device),
        )
        .route("/_synapse/admin/v2/users/{user_id}/delete_devices", post(delete_devices))
        .route("/_synapse/admin/v1/whois/{user_id}", get(whois))
        .route("/_synapse/admin/v1/users/{user_id}/joined_rooms", get(joined_rooms))
        .route("/_synapse/admin/v1/users/{user_id}/memberships", get(memberships))
        .route("/_synapse/admin/v1/users/{user_id}/media", get(media).delete(delete_media))
        .route("/_synapse/admin/v1/users/{user_id}/login", post(login_as))
        .route("/_synapse/admin/v1/username_available", get(username_available))
        .route("/_synapse/admin/v1/users/{user_id}/pushers", get(pushers))
        .route("/_synapse/admin/v1/users/{user_id}/accountdata", get(account_data))
        .route("/_synapse/admin/v1/threepid/{medium}/users/{address}", get(by_threepid))
}

const USER_ORDERS: &[&str] = &[
    "name",
    "is_guest",
    "admin",
    "user_type",
    "deactivated",
    "shadow_banned",
    "displayname",
    "avatar_url",
    "creation_ts",
    "last_seen_ts",
    "locked",
];

fn user_filter(params: &Params, deactivated_only: bool) -> Result<users::UserFilter> {
    let deactivated = match (params.bool("deactivated")?, deactivated_only) {
        // v3: `true` lists only deactivated accounts, `false` none of them.
        (value, true) => value,
        // v2: `true` lists deactivated accounts too; otherwise they are left out.
        (Some(true), false) => None,
        (_, false) => Some(false),
    };
    Ok(users::UserFilter {
        user_id: params.str("user_id").map(str::to_owned),
        name: params.str("name").map(str::to_owned),
        guests: params.bool("guests")?.filter(|g| !g).map(|_| false),
        admins: params.bool("admins")?,
        deactivated,
        // Locked accounts are listed only when asked for.
        locked: match params.bool("locked")? {
            Some(true) => None,
            _ => Some(false),
        },
        suspended: params.bool("suspended")?,
        shadow_banned: params.bool("shadow_banned")?,
        not_user_types: params.all("not_user_type"),
    })
}

fn list(state: &AppState, query: Option<String>, v3: bool) -> Result<Value> {
    let params = Params::parse(query);
    let filter = user_filter(&params, v3)?;
    let paging = params.paging(100)?;
    let order = params.order_by(USER_ORDERS, "name")?;
    let items = users::list(state, &filter)?.into_iter().map(to_json).collect::<Result<_>>()?;
    let (users, total) = page(items, order, "name", false, paging);
    let mut body = json!({ "total": total });
    if let Some(next) = next_from(paging, users.len(), total) {
        body["next_token"] = json!(next.to_string());
    }
    body["users"] = Value::Array(users);
    Ok(body)
}

/// GET /_synapse/admin/v2/users
async fn list_v2(State(s): State<AppState>, RawQuery(q): RawQuery) -> Response {
    respond(list(&s, q, false))
}

/// GET /_synapse/admin/v3/users
async fn list_v3(State(s): State<AppState>, RawQuery(q): RawQuery) -> Response {
    respond(list(&s, q, true))
}

fn user_id(raw: &str) -> Result<&UserId> {
    <&UserId>::try_from(raw).map_err(|_| Error::invalid_param("Not a valid user id"))
}

/// GET /_synapse/admin/v2/users/{userId}
async fn show(State(s): State<AppState>, Path(id): Path<String>) -> Response {
    respond(users::details(&s, &id).and_then(to_json))
}

/// The body of `PUT /_synapse/admin/v2/users/{userId}`.
#[derive(Deserialize)]
struct UserBody {
    password: Option<String>,
    #[serde(default = "yes")]
    logout_devices: bool,
    displayname: Option<String>,
    avatar_url: Option<String>,
    threepids: Option<Vec<ThreepidBody>>,
    #[serde(default)]
    external_ids: Option<Vec<Value>>,
    admin: Option<bool>,
    deactivated: Option<bool>,
    locked: Option<bool>,
    #[serde(default, deserialize_with = "present")]
    user_type: Option<Option<String>>,
}

#[derive(Deserialize)]
struct ThreepidBody {
    medium: String,
    address: String,
}

/// PUT /_synapse/admin/v2/users/{userId}
async fn create_or_modify(
    State(s): State<AppState>,
    parts: Parts,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let result = async {
        let (admin, client) = admin_caller(&parts)?;
        let target = user_id(&id)?;
        let body: UserBody = parse_body(&body)?;
        if body.password.as_ref().is_some_and(|p| p.len() > 512) {
            return Err(Error::invalid_param("The password is too long"));
        }
        if body.external_ids.as_ref().is_some_and(|ids| !ids.is_empty()) {
            return Err(Error::invalid_param("Trellis does not link external ids to accounts"));
        }
        let change = users::UserChange {
            password: body.password,
            logout_devices: body.logout_devices,
            displayname: body.displayname,
            avatar_url: body.avatar_url,
            threepids: body
                .threepids
                .map(|list| list.into_iter().map(|t| (t.medium, t.address)).collect()),
            admin: body.admin,
            deactivated: body.deactivated,
            locked: body.locked,
            user_type: body.user_type,
        };
        let created = users::create_or_modify(&s, &admin, target, change, &client).await?;
        Ok((created, to_json(users::details(&s, target.as_str())?)?))
    }
    .await;
    match result {
        Ok((created, body)) => {
            let status = if created { StatusCode::CREATED } else { StatusCode::OK };
            crate::response::json_response(status, body.to_string().into_bytes())
        }
        Err(e) => ApiError(e).into_response(),
    }
}

#[derive(Deserialize)]
struct DeactivateBody {
    #[serde(default)]
    erase: bool,
}

/// POST /_synapse/admin/v1/deactivate/{userId}
async fn deactivate(
    State(s): State<AppState>,
    parts: Parts,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    respond(
        async {
            let (_, client) = admin_caller(&parts)?;
            let body: DeactivateBody = parse_body(&body)?;
            let (localpart, _) = users::existing(&s, &id)?;
            trellis_service::accounts::deactivation::deactivate(
                &s, &localpart, body.erase, &client,
            )
            .await?;
            Ok(json!({"id_server_unbind_result": "success"}))
        }
        .await,
    )
}

#[derive(Deserialize)]
struct ResetBody {
    new_password: Option<String>,
    #[serde(default = "yes")]
    logout_devices: bool,
}

/// POST /_synapse/admin/v1/reset_password/{userId}
async fn reset_password(
    State(s): State<AppState>,
    parts: Parts,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    respond(
        async {
            let (_, client) = admin_caller(&parts)?;
            let body: ResetBody = parse_body(&body)?;
            let password =
                body.new_password.ok_or_else(|| Error::missing_param("Missing new_password"))?;
            let (localpart, _) = users::existing(&s, &id)?;
            s.accounts
                .set_password(&localpart, password, body.logout_devices, None, &client)
                .await?;
            Ok(json!({}))
        }
        .await,
    )
}

/// GET /_synapse/admin/v1/users/{userId}/admin
async fn get_admin(State(s): State<AppState>, Path(id): Path<String>) -> Response {
    respond(users::existing(&s, &id).map(|(_, user)| json!({"admin": user.admin})))
}

#[derive(Deserialize)]
struct AdminBody {
    admin: Option<bool>,
}

/// PUT /_synapse/admin/v1/users/{userId}/admin
async fn set_admin(
    State(s): State<AppState>,
    parts: Parts,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    respond(
        async {
            let (admin, client) = admin_caller(&parts)?;
            let body: AdminBody = parse_body(&body)?;
            let on = body.admin.ok_or_else(|| Error::missing_param("Missing admin"))?;
            let (localpart, _) = users::existing(&s, &id)?;
            s.accounts.set_flag(&admin, &localpart, Flag::Admin, on, &client).await?;
            Ok(json!({}))
        }
        .await,
    )
}

async fn set_shadow_ban(s: &AppState, parts: &Parts, id: &str, on: bool) -> Result<Value> {
    let (admin, client) = admin_caller(parts)?;
    let (localpart, _) = users::existing(s, id)?;
    s.accounts.set_flag(&admin, &localpart, Flag::ShadowBanned, on, &client).await?;
    Ok(json!({}))
}

/// POST /_synapse/admin/v1/users/{userId}/shadow_ban
async fn shadow_ban(State(s): State<AppState>, parts: Parts, Path(id): Path<String>) -> Response {
    respond(set_shadow_ban(&s, &parts, &id, true).await)
}

/// DELETE /_synapse/admin/v1/users/{userId}/shadow_ban
async fn lift_shadow_ban(
    State(s): State<AppState>,
    parts: Parts,
    Path(id): Path<String>,
) -> Response {
    respond(set_shadow_ban(&s, &parts, &id, false).await)
}

/// GET /_synapse/admin/v1/users/{userId}/override_ratelimit
async fn get_ratelimit(State(s): State<AppState>, Path(id): Path<String>) -> Response {
    respond(users::existing(&s, &id).and_then(|(_, user)| match user.rate_override {
        Some(o) => to_json(o),
        None => Ok(json!({})),
    }))
}

#[derive(Deserialize)]
struct RateBody {
    #[serde(default)]
    messages_per_second: Value,
    #[serde(default)]
    burst_count: Value,
}

fn count(value: &Value, name: &str) -> Result<u32> {
    match value {
        Value::Null => Ok(0),
        v => v
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| Error::invalid_param(format!("{name} must be a positive integer"))),
    }
}

/// POST /_synapse/admin/v1/users/{userId}/override_ratelimit
async fn set_ratelimit(
    State(s): State<AppState>,
    parts: Parts,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    respond(
        async {
            let (admin, client) = admin_caller(&parts)?;
            let body: RateBody = parse_body(&body)?;
            let limit = RateOverride {
                messages_per_second: count(&body.messages_per_second, "messages_per_second")?,
                burst_count: count(&body.burst_count, "burst_count")?,
            };
            let (localpart, _) = users::existing(&s, &id)?;
            s.accounts.set_rate_override(&admin, &localpart, Some(limit), &client).await?;
            to_json(limit)
        }
        .await,
    )
}

/// DELETE /_synapse/admin/v1/users/{userId}/override_ratelimit
async fn delete_ratelimit(
    State(s): State<AppState>,
    parts: Parts,
    Path(id): Path<String>,
) -> Response {
    respond(
        async {
            let (admin, client) = admin_caller(&parts)?;
            let (localpart, _) = users::existing(&s, &id)?;
            s.accounts.set_rate_override(&admin, &localpart, None, &client).await?;
            Ok(json!({}))
        }
        .await,
    )
}

#[derive(Deserialize)]
struct SuspendBody {
    suspend: Option<bool>,
}

/// PUT /_synapse/admin/v1/suspend/{userId}
async fn suspend(
    State(s): State<AppState>,
    parts: Parts,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    respond(
        async {
            let (admin, client) = admin_caller(&parts)?;
            let body: SuspendBody = parse_body(&body)?;
            let on = body.suspend.ok_or_else(|| Error::missing_param("Missing suspend"))?;
            users::existing(&s, &id)?;
            let on = s.accounts.restrict(&admin, &id, Restriction::Suspend, on, &client).await?;
            Ok(json!({ format!("user_{id}_suspended"): on }))
        }
        .await,
    )
}

fn device_json(user_id: &str, d: trellis_service::accounts::DeviceInfo) -> Value {
    json!({
        "device_id": d.device_id,
        "display_name": d.display_name,
        "last_seen_ip": d.last_seen_ip,
        "last_seen_ts": d.last_seen_ms,
        "last_seen_user_agent": d.last_seen_user_agent,
        "user_id": user_id,
    })
}

/// GET /_synapse/admin/v2/users/{userId}/devices
async fn devices(State(s): State<AppState>, Path(id): Path<String>) -> Response {
    respond(users::existing(&s, &id).and_then(|(localpart, _)| {
        let devices: Vec<Value> =
            s.accounts.devices(&localpart)?.into_iter().map(|d| device_json(&id, d)).collect();
        Ok(json!({"total": devices.len(), "devices": devices}))
    }))
}

#[derive(Deserialize)]
struct NewDevice {
    device_id: Option<String>,
}

/// POST /_synapse/admin/v2/users/{userId}/devices
async fn add_device(State(s): State<AppState>, Path(id): Path<String>, body: Bytes) -> Response {
    let result = async {
        let body: NewDevice = parse_body(&body)?;
        let device = body.device_id.ok_or_else(|| Error::missing_param("Missing device_id"))?;
        let (localpart, _) = users::existing(&s, &id)?;
        if s.accounts.device(&localpart, &device).is_err() {
            s.accounts.add_sessionless_device(&localpart, &device, None).await?;
        }
        Ok(())
    }
    .await;
    match result {
        Ok(()) => crate::response::json_response(StatusCode::CREATED, b"{}".to_vec()),
        Err(e) => ApiError(e).into_response(),
    }
}

/// GET /_synapse/admin/v2/users/{userId}/devices/{deviceId}
async fn device(State(s): State<AppState>, Path((id, device)): Path<(String, String)>) -> Response {
    respond(
        users::existing(&s, &id).and_then(|(localpart, _)| {
            Ok(device_json(&id, s.accounts.device(&localpart, &device)?))
        }),
    )
}

#[derive(Deserialize)]
struct RenameBody {
    display_name: Option<String>,
}

/// PUT /_synapse/admin/v2/users/{userId}/devices/{deviceId}
async fn rename_device(
    State(s): State<AppState>,
    Path((id, device)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    respond(
        async {
            let body: RenameBody = parse_body(&body)?;
            let (localpart, _) = users::existing(&s, &id)?;
            s.accounts.device(&localpart, &device)?;
            if let Some(name) = body.display_name {
                if name.chars().count() > 100 {
                    return Err(Error::too_large("A device name is at most 100 characters"));
                }
                s.accounts.rename_device(&localpart, &device, Some(name)).await?;
            }
            Ok(json!({}))
        }
        .await,
    )
}

async fn remove_devices(s: &AppState, parts: &Parts, id: &str, ids: &[String]) -> Result<Value> {
    let (_, client) = admin_caller(parts)?;
    let (localpart, _) = users::existing(s, id)?;
    trellis_service::accounts::devices::delete_devices(s, &localpart, ids, &client).await?;
    Ok(json!({}))
}

/// DELETE /_synapse/admin/v2/users/{userId}/devices/{deviceId}
async fn delete_device(
    State(s): State<AppState>,
    parts: Parts,
    Path((id, device)): Path<(String, String)>,
) -> Response {
    respond(remove_devices(&s, &parts, &id, &[device]).await)
}

#[derive(Deserialize)]
struct DeleteDevicesBody {
    devices: Option<Vec<String>>,
}

/// POST /_synapse/admin/v2/users/{userId}/delete_devices
async fn delete_devices(
    State(s): State<AppState>,
    parts: Parts,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    respond(
        async {
            let body: DeleteDevicesBody = parse_body(&body)?;
            let ids = body.devices.ok_or_else(|| Error::missing_param("Missing devices"))?;
            remove_devices(&s, &parts, &id, &ids).await
        }
        .await,
    )
}

/// GET /_synapse/admin/v1/whois/{userId}
async fn whois(State(s): State<AppState>, Path(id): Path<String>) -> Response {
    respond(users::existing(&s, &id).and_then(|(localpart, _)| {
        // One session per device, as the client-server `whois` answers.
        let mut devices = Map::new();
        for d in s.accounts.devices(&localpart)? {
            let connections: Vec<Value> = d
                .last_seen_ms
                .map(|ts| {
                    json!({"ip": d.last_seen_ip, "last_seen": ts, "user_agent": d.last_seen_user_agent})
                })
                .into_iter()
                .collect();
            devices.insert(d.device_id, json!({"sessions": [{"connections": connections}]}));
        }
        Ok(json!({"user_id": id, "devices": devices}))
    }))
}

/// GET /_synapse/admin/v1/users/{userId}/joined_rooms
async fn joined_rooms(State(s): State<AppState>, Path(id): Path<String>) -> Response {
    respond(user_id(&id).and_then(|user| {
        let rooms: Vec<String> =
            s.rooms.joined_rooms(user)?.into_iter().map(|r| r.to_string()).collect();
        Ok(json!({"total": rooms.len(), "joined_rooms": rooms}))
    }))
}

/// GET /_synapse/admin/v1/users/{userId}/memberships
async fn memberships(State(s): State<AppState>, Path(id): Path<String>) -> Response {
    respond(user_id(&id).and_then(|user| {
        let all: Map<String, Value> = users::memberships(&s, user.as_str())?
            .into_iter()
            .map(|(room, m)| (room, Value::from(m)))
            .collect();
        Ok(json!({"memberships": all}))
    }))
}

const MEDIA_ORDERS: &[&str] = &[
    "media_id",
    "upload_name",
    "created_ts",
    "last_access_ts",
    "media_length",
    "media_type",
    "quarantined_by",
    "safe_from_quarantine",
];

/// A page of a user's media: newest first unless `order_by` or `dir` says otherwise.
fn media_page(s: &AppState, id: &str, query: Option<String>) -> Result<(Vec<Value>, Value)> {
    let params = Params::parse(query);
    let mut paging = params.paging(100)?;
    if params.str("order_by").is_none() && params.str("dir").is_none() {
        paging.backwards = true;
    }
    let order = params.order_by(MEDIA_ORDERS, "created_ts")?;
    let (localpart, _) = users::existing(s, id)?;
    let items =
        admin_media::of_user(s, &localpart)?.into_iter().map(to_json).collect::<Result<_>>()?;
    let (media, total) = page(items, order, "media_id", false, paging);
    let mut meta = json!({"total": total});
    if let Some(next) = next_from(paging, media.len(), total) {
        meta["next_token"] = json!(next);
    }
    Ok((media, meta))
}

/// GET /_synapse/admin/v1/users/{userId}/media
async fn media(
    State(s): State<AppState>,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Response {
    respond(media_page(&s, &id, q).map(|(media, mut meta)| {
        meta["media"] = Value::Array(media);
        meta
    }))
}

/// DELETE /_synapse/admin/v1/users/{userId}/media
async fn delete_media(
    State(s): State<AppState>,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Response {
    respond(
        async {
            let (media, _) = media_page(&s, &id, q)?;
            let ids =
                media.iter().filter_map(|m| m["media_id"].as_str().map(str::to_owned)).collect();
            let deleted = admin_media::delete(&s, ids).await?;
            Ok(json!({"total": deleted.len(), "deleted_media": deleted}))
        }
        .await,
    )
}

#[derive(Deserialize)]
struct LoginBody {
    valid_until_ms: Option<u64>,
}

/// POST /_synapse/admin/v1/users/{userId}/login
async fn login_as(
    State(s): State<AppState>,
    parts: Parts,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    respond(
        async {
            let (admin, client) = admin_caller(&parts)?;
            let body: LoginBody = parse_body(&body)?;
            let (localpart, _) = users::existing(&s, &id)?;
            let token =
                s.accounts.admin_login(&admin, &localpart, body.valid_until_ms, &client).await?;
            Ok(json!({"access_token": token}))
        }
        .await,
    )
}

/// GET /_synapse/admin/v1/username_available
async fn username_available(State(s): State<AppState>, RawQuery(q): RawQuery) -> Response {
    respond((|| {
        let params = Params::parse(q);
        let name =
            params.str("username").ok_or_else(|| Error::missing_param("Missing username"))?;
        s.accounts.check_available(name)?;
        Ok(json!({"available": true}))
    })())
}

/// GET /_synapse/admin/v1/users/{userId}/pushers
async fn pushers(State(s): State<AppState>, Path(id): Path<String>) -> Response {
    respond(users::existing(&s, &id).map(|(localpart, _)| {
        // Every pusher is held in memory: this is all of the user's.
        let pushers: Vec<Value> = s
            .pushers
            .of(&localpart)
            .map(|list| list.iter().map(pusher_json).collect())
            .unwrap_or_default();
        json!({"total": pushers.len(), "pushers": pushers})
    }))
}

fn pusher_json(record: &trellis_service::push::pushers::PusherRecord) -> Value {
    let mut value = serde_json::to_value(&record.pusher).unwrap_or_else(|_| json!({}));
    value["device_id"] = json!(record.device_id);
    value["enabled"] = json!(true);
    value
}

/// GET /_synapse/admin/v1/users/{userId}/accountdata
async fn account_data(State(s): State<AppState>, Path(id): Path<String>) -> Response {
    respond(users::existing(&s, &id).and_then(|(localpart, _)| {
        let (global, rooms) = users::account_data(&s, &localpart)?;
        Ok(json!({"account_data": {"global": global, "rooms": rooms}}))
    }))
}

/// GET /_synapse/admin/v1/threepid/{medium}/users/{address}
async fn by_threepid(
    State(s): State<AppState>,
    Path((medium, address)): Path<(String, String)>,
) -> Response {
    respond((|| {
        let owner = match medium.as_str() {
            "email" => s.accounts.email_owner(&address.trim().to_lowercase())?,
            _ => None,
        };
        let owner = owner.ok_or_else(|| Error::not_found("User not found"))?;
        Ok(json!({"user_id": s.accounts.user_id(&owner)}))
    })())
}
