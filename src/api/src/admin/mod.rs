//! The admin API. Paths and shapes follow Synapse's admin API where one exists, so that
//! existing admin tools work against Trellis; Trellis's own are under `/_trellis/admin`.
//! One guard in front of every route checks that the caller is a server admin and writes
//! each call, refused or not, to the audit log.

mod appservices;
mod audit;
mod backups;
mod exports;
mod insight;
mod media;
mod panel;
mod reports;
mod rooms;
mod server;
mod tokens;
mod users;

use std::cmp::Ordering;

use axum::{
    Router,
    body::Bytes,
    extract::{MatchedPath, Request, State},
    http::request::Parts,
    middleware::{self, Next},
    response::{IntoResponse, Response},
};
use http::StatusCode;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::Value;
use trellis_core::{Error, Result};
use trellis_service::Client;

use crate::{
    AppState,
    response::{ApiError, json_response},
    ruma_route::{access_token, client_of, json_error},
};

pub fn routes(router: Router<AppState>, state: AppState) -> Router<AppState> {
    let admin = Router::new();
    let admin = tokens::routes(admin);
    let admin = reports::routes(admin);
    let admin = appservices::routes(admin);
    let admin = users::routes(admin);
    let admin = rooms::routes(admin);
    let admin = media::routes(admin);
    let admin = server::routes(admin);
    let admin = audit::routes(admin);
    let admin = backups::routes(admin);
    let admin = exports::routes(admin);
    let admin = insight::routes(admin);
    let admin = admin.route_layer(middleware::from_fn_with_state(state, guard));
    panel::routes(server::public_routes(router.merge(admin)))
}

/// Read-only figures the admin panel polls; their successful reads are not audited.
const LIVE_ROUTES: &[&str] = &["/_trellis/admin/v1/dashboard", "/_trellis/admin/v1/analytics"];

/// The admin making a request, put there by the guard.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    /// The admin's localpart.
    pub localpart: String,
    pub client: Client,
}

/// The admin making the request (their localpart) and where from.
pub(crate) fn admin_caller(parts: &Parts) -> Result<(String, Client)> {
    parts
        .extensions
        .get::<Caller>()
        .map(|c| (c.localpart.clone(), c.client.clone()))
        .ok_or_else(|| Error::forbidden("You are not a server admin"))
}

/// Lets only server admins through, and audits every call.
async fn guard(State(s): State<AppState>, request: Request, next: Next) -> Response {
    let (mut parts, body) = request.into_parts();
    let client = client_of(&parts, s.config.http.x_forwarded_for);
    let route = parts.extensions.get::<MatchedPath>().map(|m| m.as_str().to_owned());
    // The path names the target; the query is left out (it may hold an access token).
    let detail = Some(format!("{} {}", parts.method, decoded(parts.uri.path())));
    let session = match access_token(&parts) {
        Some(token) => {
            trellis_service::appservice::authenticate(&s, &token, parts.uri.query(), &client).await
        }
        None => Err(Error::missing_token()),
    };
    let session = match session {
        Ok(session) => session,
        Err(e) => return ApiError(e).into_response(),
    };
    let actor = Some(session.localpart.as_str());
    let admin = match s.accounts.user(&session.localpart) {
        Ok(Some(user)) => user.admin,
        Ok(None) => false,
        Err(e) => return ApiError(e).into_response(),
    };
    if !admin {
        s.audit.log(actor, "admin_api", &client, "forbidden", detail).await;
        return ApiError(Error::forbidden("You are not a server admin")).into_response();
    }
    let parts_method_get = parts.method == http::Method::GET;
    let caller = Caller { localpart: session.localpart.clone(), client: client.clone() };
    parts.extensions.insert(caller);
    let span = tracing::info_span!("admin", admin = %session.localpart, route = route.as_deref());
    let response =
        tracing::Instrument::instrument(next.run(Request::from_parts(parts, body)), span).await;
    let status = response.status();
    // The panel polls the live figures: reading them successfully is not recorded.
    let polled = parts_method_get && route.as_deref().is_some_and(|r| LIVE_ROUTES.contains(&r));
    if !(polled && status.is_success()) {
        let outcome =
            if status.is_success() { "ok".to_owned() } else { status.as_u16().to_string() };
        s.audit.log(actor, "admin_api", &client, &outcome, detail).await;
    }
    response
}

fn decoded(path: &str) -> String {
    let bytes: Vec<u8> =
        form_urlencoded::parse(format!("p={}", path.replace('+', "%2B")).as_bytes())
            .next()
            .map(|(_, v)| v.into_owned().into_bytes())
            .unwrap_or_default();
    String::from_utf8(bytes).unwrap_or_else(|_| path.to_owned())
}

pub(crate) fn ok_json(value: Value) -> Response {
    json_response(StatusCode::OK, value.to_string().into_bytes())
}

pub(crate) fn parse_body<T: DeserializeOwned>(body: &Bytes) -> Result<T> {
    let body: &[u8] = if body.is_empty() { b"{}" } else { body };
    serde_json::from_slice(body).map_err(json_error)
}

/// For a body field where `null` and absent mean different things.
pub(crate) fn present<'de, D, T>(d: D) -> std::result::Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// A body flag that is on unless sent as `false`.
pub(crate) fn yes() -> bool {
    true
}

pub(crate) fn respond(result: Result<Value>) -> Response {
    match result {
        Ok(v) => ok_json(v),
        Err(e) => ApiError(e).into_response(),
    }
}

/// A serialisable service answer as JSON.
pub(crate) fn to_json(value: impl Serialize) -> Result<Value> {
    serde_json::to_value(value).map_err(|e| Error::internal("admin answer", e))
}

/// The query string's parameters, read as Synapse's admin API reads them.
pub(crate) struct Params(Vec<(String, String)>);

/// Where a listing starts and how much of it to give.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Paging {
    pub from: usize,
    pub limit: usize,
    pub backwards: bool,
}

/// Listings give at most this many items per page.
const MAX_LIMIT: usize = 10_000;

impl Params {
    pub fn parse(query: Option<String>) -> Self {
        Self(form_urlencoded::parse(query.unwrap_or_default().as_bytes()).into_owned().collect())
    }

    pub fn str(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// Every value of a repeated parameter.
    pub fn all(&self, key: &str) -> Vec<String> {
        self.0.iter().filter(|(k, _)| k == key).map(|(_, v)| v.clone()).collect()
    }

    pub fn bool(&self, key: &str) -> Result<Option<bool>> {
        match self.str(key) {
            None => Ok(None),
            Some("true") => Ok(Some(true)),
            Some("false") => Ok(Some(false)),
            Some(_) => Err(Error::invalid_param(format!("{key} must be true or false"))),
        }
    }

    pub fn u64(&self, key: &str) -> Result<Option<u64>> {
        self.str(key)
            .map(|v| v.parse().map_err(|_| Error::invalid_param(format!("{key} must be a number"))))
            .transpose()
    }

    /// A string parameter that must not be empty when given.
    pub fn term(&self, key: &str) -> Result<Option<&str>> {
        match self.str(key) {
            Some("") => Err(Error::invalid_param(format!("{key} must not be empty"))),
            other => Ok(other),
        }
    }

    /// `from`, `limit` (`default_limit` unless given) and `dir` (`f` or `b`).
    pub fn paging(&self, default_limit: usize) -> Result<Paging> {
        let from = usize::try_from(self.u64("from")?.unwrap_or(0)).unwrap_or(usize::MAX);
        let limit = self
            .u64("limit")?
            .map_or(default_limit, |l| usize::try_from(l).unwrap_or(MAX_LIMIT))
            .min(MAX_LIMIT);
        let backwards = match self.str("dir") {
            None | Some("f") => false,
            Some("b") => true,
            Some(_) => return Err(Error::invalid_param("dir must be f or b")),
        };
        Ok(Paging { from, limit, backwards })
    }

    /// `order_by`, one of `allowed` (`default` when absent).
    pub fn order_by<'a>(&'a self, allowed: &[&str], default: &'a str) -> Result<&'a str> {
        match self.str("order_by") {
            None => Ok(default),
            Some(o) if allowed.contains(&o) => Ok(o),
            Some(o) => Err(Error::invalid_param(format!("Unknown order_by: {o}"))),
        }
    }
}

/// How JSON values sort: nothing first, then booleans, numbers and text.
fn compare(a: &Value, b: &Value) -> Ordering {
    fn rank(v: &Value) -> u8 {
        match v {
            Value::Null => 0,
            Value::Bool(_) => 1,
            Value::Number(_) => 2,
            Value::String(_) => 3,
            _ => 4,
        }
    }
    match (a, b) {
        (Value::Bool(x), Value::Bool(y)) => x.cmp(y),
        (Value::Number(x), Value::Number(y)) => {
            x.as_f64().unwrap_or(0.0).total_cmp(&y.as_f64().unwrap_or(0.0))
        }
        (Value::String(x), Value::String(y)) => x.cmp(y),
        _ => rank(a).cmp(&rank(b)),
    }
}

/// Sorts `items` by their field `order` (ties by `tie`), largest first when
/// `largest_first` (reversed by `dir=b`), and cuts the page; returns it with the total.
pub(crate) fn page(
    mut items: Vec<Value>,
    order: &str,
    tie: &str,
    largest_first: bool,
    paging: Paging,
) -> (Vec<Value>, usize) {
    items.sort_by(|a, b| {
        let primary = compare(&a[order], &b[order]);
        let primary = if largest_first { primary.reverse() } else { primary };
        let primary = if paging.backwards { primary.reverse() } else { primary };
        primary.then_with(|| compare(&a[tie], &b[tie]))
    });
    let total = items.len();
    let page = items.into_iter().skip(paging.from).take(paging.limit).collect();
    (page, total)
}

/// The offset of the next page, when there is one.
pub(crate) fn next_from(paging: Paging, shown: usize, total: usize) -> Option<usize> {
    let next = paging.from.saturating_add(shown);
    (shown > 0 && next < total).then_some(next)
}
