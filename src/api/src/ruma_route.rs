//! Routing ruma's endpoint types: one generic glue function gives every endpoint the same
//! shape (authenticate -> parse -> call the handler -> serialize), with paths and methods
//! taken from ruma's metadata so they can never drift from the spec.

use std::{collections::HashSet, future::Future, pin::Pin};

use axum::{
    Router,
    body::Body,
    extract::{FromRequestParts, RawPathParams, Request},
    response::Response,
    routing::{MethodFilter, on},
};
use ruma::api::{
    IncomingRequest, IncomingRequestExt, OutgoingResponseExt,
    auth_scheme::{
        AccessToken, AccessTokenOptional, AppserviceToken, AppserviceTokenOptional, NoAccessToken,
        NoAuthentication,
    },
    error::{DeserializationError, FromHttpRequestError},
    path_builder::PathBuilder,
};
use trellis_core::{Error, ErrorKind, Result, error::code};
use trellis_service::{Client, accounts::Session, appservice, ratelimit::Class};

use crate::{
    AppState,
    response::{error_response, json_response},
};

/// What a handler gets besides its parsed request.
pub struct Ctx {
    pub services: AppState,
    /// Present when the endpoint takes an access token and one was given.
    pub session: Option<Session>,
    /// Where the request came from.
    pub client: Client,
    /// For server-server endpoints: the other server, as its X-Matrix signature proved.
    pub origin: Option<String>,
}

impl Ctx {
    /// The authenticated origin server of a federation request.
    pub fn origin(&self) -> Result<&str> {
        self.origin.as_deref().ok_or_else(|| {
            Error::new(
                ErrorKind::Unauthenticated,
                trellis_core::error::code::UNAUTHORIZED,
                "Not signed",
            )
        })
    }

    /// The authenticated session; only call on endpoints that require a token.
    pub fn session(&self) -> Result<&Session> {
        self.session.as_ref().ok_or_else(Error::missing_token)
    }

    /// The session's user must be `user_id` (for endpoints with a user id in the path).
    pub fn require_self(&self, user_id: &ruma::UserId) -> Result<&Session> {
        let session = self.session()?;
        if self.services.accounts.local_part(user_id.as_str()) != Some(session.localpart.as_str()) {
            return Err(Error::forbidden("You cannot act for another user"));
        }
        Ok(session)
    }

    /// Takes a token from the rate-limit bucket of `class` for this user (or address).
    pub fn rate_limit(&self, class: Class) -> Result<()> {
        if let Some(session) = &self.session
            && let Some(id) = &session.appservice
            && let Some(reg) = self.services.appservices.by_id(id)
            && (!reg.rate_limited || reg.sender_localpart == session.localpart)
        {
            // A service's own user is never limited, its users as its registration says.
            return Ok(());
        }
        if self.session.as_ref().is_some_and(|s| s.bot)
            && self.services.config.rate_limits.exempt_bots
        {
            return Ok(());
        }
        let key = match (&self.session, &self.client.ip) {
            (Some(s), _) => s.localpart.as_str(),
            (None, Some(ip)) => ip.as_str(),
            (None, None) => "-",
        };
        if let Some(o) = self.session.as_ref().and_then(|s| s.rate_override) {
            // An admin's override: `0/0` lifts every limit, otherwise it sets the rate
            // of the user's messages.
            if o.messages_per_second == 0 && o.burst_count == 0 {
                return Ok(());
            }
            if class == Class::Message {
                let limit = trellis_core::config::RateLimit::new(
                    f64::from(o.messages_per_second),
                    o.burst_count.max(1),
                );
                return self.services.rate_limits.check_with(class, key, limit);
            }
        }
        self.services.rate_limits.check(class, key)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthKind {
    None,
    Optional,
    Required,
    /// Another server's X-Matrix signature.
    Server,
}

/// Maps ruma's authentication scheme of an endpoint to what we check.
pub trait AuthPolicy {
    const KIND: AuthKind;
}

impl AuthPolicy for NoAuthentication {
    const KIND: AuthKind = AuthKind::None;
}
impl AuthPolicy for NoAccessToken {
    const KIND: AuthKind = AuthKind::None;
}
impl AuthPolicy for AccessToken {
    const KIND: AuthKind = AuthKind::Required;
}
impl AuthPolicy for AccessTokenOptional {
    const KIND: AuthKind = AuthKind::Optional;
}
impl AuthPolicy for AppserviceToken {
    const KIND: AuthKind = AuthKind::Required;
}
impl AuthPolicy for AppserviceTokenOptional {
    const KIND: AuthKind = AuthKind::Optional;
}
impl AuthPolicy for ruma::api::federation::authentication::ServerSignatures {
    const KIND: AuthKind = AuthKind::Server;
}

/// Registers `handler` for every path (stable, unstable, legacy) of endpoint `R`.
pub fn add<R, F, Fut>(router: Router<AppState>, handler: F) -> Router<AppState>
where
    R: IncomingRequest + Send + 'static,
    R::Authentication: AuthPolicy,
    R::OutgoingResponse: Send,
    F: Fn(Ctx, R) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<R::OutgoingResponse>> + Send + 'static,
{
    add_patched::<R, F, Fut>(router, handler, None)
}

/// Rewrites a successful response body after ruma serialized it.
pub type Patch = fn(&mut serde_json::Value);

/// As [`add`], with the answer's JSON passed through `patch`: for fields the spec
/// requires but ruma leaves out when they hold their default (an empty `failures` map,
/// a capability that is enabled), which clients read unconditionally.
pub fn add_patched<R, F, Fut>(
    mut router: Router<AppState>,
    handler: F,
    patch: Option<Patch>,
) -> Router<AppState>
where
    R: IncomingRequest + Send + 'static,
    R::Authentication: AuthPolicy,
    R::OutgoingResponse: Send,
    F: Fn(Ctx, R) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<R::OutgoingResponse>> + Send + 'static,
{
    let filter = match MethodFilter::try_from(R::METHOD) {
        Ok(f) => f,
        Err(_) => return router,
    };
    let method = R::METHOD;
    let guests = R::PATH_BUILDER.all_paths().any(|p| crate::guest_access::allows(&method, p));
    let mut seen = HashSet::new();
    for path in R::PATH_BUILDER.all_paths() {
        // A trailing `{state_key}` may be empty (`.../state/m.room.name` or `.../name/`),
        // which the router cannot match as a parameter: mount those forms too, passing
        // the empty key explicitly.
        let mut forms = vec![(path.to_owned(), false)];
        if let Some(prefix) = path.strip_suffix("/{state_key}") {
            forms.push((prefix.to_owned(), true));
            forms.push((format!("{prefix}/"), true));
        }
        for (form, empty_key) in forms {
            if !seen.insert(form.clone()) {
                continue;
            }
            let handler = handler.clone();
            router = router.route(
                &form,
                on(
                    filter,
                    move |axum::extract::State(state): axum::extract::State<AppState>,
                          req: Request| {
                        let how = Route { empty_key, patch, guests };
                        dispatch::<R, F, Fut>(state, req, handler.clone(), how)
                    },
                ),
            );
        }
    }
    router
}

/// Answers one request. Not an `async fn`: an async function's arguments stay in its
/// future for its whole life, and a request's future is allocated whole, at the size of
/// its largest step, for as long as the request runs (for a held `/sync`, the poll's
/// lifetime). The preparation is boxed and freed once done, the parsed request never
/// enters the future (see [`start`]) and the handler's future is boxed by itself.
/// What a mounted path adds to its endpoint's metadata.
#[derive(Clone, Copy)]
struct Route {
    /// The path leaves out a trailing empty `{state_key}`.
    empty_key: bool,
    patch: Option<Patch>,
    /// Guest accounts may call the endpoint.
    guests: bool,
}

fn dispatch<R, F, Fut>(
    services: AppState,
    req: Request,
    handler: F,
    how: Route,
) -> impl Future<Output = Response>
where
    R: IncomingRequest,
    R::Authentication: AuthPolicy,
    F: Fn(Ctx, R) -> Fut,
    Fut: Future<Output = Result<R::OutgoingResponse>>,
{
    let prepared = Box::pin(prepare::<R>(services, req, how));
    async move {
        let answered = async {
            let Prepared { ctx, parts, bytes, args, turn } = prepared.await?;
            let future = start::<R, F, Fut>(ctx, parts, bytes, &args, &handler)?;
            drop(args);
            let response = future.await?;
            drop(turn);
            let http_resp = response
                .try_into_http_response::<Vec<u8>>()
                .map_err(|e| Error::internal("serializing a response", e))?;
            let (parts, mut body) = http_resp.into_parts();
            if let Some(patch) = how.patch {
                body = patched(body, patch)?;
            }
            let mut resp = json_response(parts.status, body);
            *resp.headers_mut() = parts.headers;
            Ok::<_, Error>(resp)
        };
        match answered.await {
            Ok(resp) => resp,
            Err(e) => error_response(&e),
        }
    }
}

fn patched(body: Vec<u8>, patch: Patch) -> Result<Vec<u8>> {
    let mut value: serde_json::Value =
        serde_json::from_slice(&body).map_err(|e| Error::internal("re-reading a response", e))?;
    patch(&mut value);
    serde_json::to_vec(&value).map_err(|e| Error::internal("serializing a response", e))
}

/// For the few endpoints ruma has no type for (the deprecated `GET /initialSync` and
/// `GET /events`, the Trellis extensions) or whose answer ruma cannot give (`PUT
/// /devices/{deviceId}`'s 201): the caller of a plain axum handler, authenticated as
/// [`add`] does it, a token required.
pub struct Authenticated(pub Ctx);

impl FromRequestParts<AppState> for Authenticated {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        services: &AppState,
    ) -> std::result::Result<Self, Response> {
        let client = client_of(parts, services.config.http.x_forwarded_for);
        let authenticate = async {
            let token = access_token(parts).ok_or_else(Error::missing_token)?;
            appservice::authenticate(services, &token, parts.uri.query(), &client).await
        };
        match authenticate.await {
            // Guests only where the spec's list (by the matched route) allows them.
            Ok(session)
                if session.guest
                    && !parts.extensions.get::<axum::extract::MatchedPath>().is_some_and(|p| {
                        crate::guest_access::allows(&parts.method, p.as_str())
                    }) =>
            {
                Err(error_response(&Error::guest_forbidden()))
            }
            Ok(session)
                if session.suspended
                    && crate::suspension::forbids(&parts.method, parts.uri.path()) =>
            {
                Err(error_response(&Error::user_suspended()))
            }
            Ok(session) => {
                let services = services.clone();
                Ok(Self(Ctx { services, session: Some(session), client, origin: None }))
            }
            Err(e) => Err(error_response(&e)),
        }
    }
}

/// A request authenticated and read, ready for its handler.
struct Prepared {
    ctx: Ctx,
    parts: http::request::Parts,
    bytes: axum::body::Bytes,
    args: Vec<String>,
    /// Held until the answer is built: one server's requests take their turns.
    turn: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// `POST /logout` and `/logout/all`.
fn logs_out(path: &str) -> bool {
    path.ends_with("/logout") || path.ends_with("/logout/all")
}

async fn prepare<R>(services: AppState, req: Request, how: Route) -> Result<Prepared>
where
    R: IncomingRequest,
    R::Authentication: AuthPolicy,
{
    let (mut parts, body) = req.into_parts();
    let mut args: Vec<String> = match RawPathParams::from_request_parts(&mut parts, &()).await {
        Ok(params) => params.iter().map(|(_, v)| v.to_owned()).collect(),
        Err(_) => return Err(Error::invalid_param("Path parameters are not valid UTF-8")),
    };
    if how.empty_key {
        args.push(String::new());
    }
    let client = client_of(&parts, services.config.http.x_forwarded_for);
    let session = match <R::Authentication as AuthPolicy>::KIND {
        AuthKind::None | AuthKind::Server => None,
        kind => match access_token(&parts) {
            Some(token) => {
                // A service registering a user names them in `user_id` (frameworks do)
                // before they exist: registration acts as the service itself.
                let query = parts.uri.query().filter(|_| !parts.uri.path().ends_with("/register"));
                match appservice::authenticate(&services, &token, query, &client).await {
                    Ok(session) => Some(session),
                    // A locked account may still log out (and nothing else).
                    Err(e) if e.errcode == code::USER_LOCKED && logs_out(parts.uri.path()) => {
                        Some(services.accounts.authenticate_to_log_out(&token, &client).await?)
                    }
                    Err(e) => return Err(e),
                }
            }
            None if kind == AuthKind::Required => return Err(Error::missing_token()),
            None => None,
        },
    };
    let kind = <R::Authentication as AuthPolicy>::KIND;
    if kind == AuthKind::Required && !how.guests && session.as_ref().is_some_and(|s| s.guest) {
        return Err(Error::guest_forbidden());
    }
    if session.as_ref().is_some_and(|s| s.suspended)
        && crate::suspension::forbids(&parts.method, parts.uri.path())
    {
        return Err(Error::user_suspended());
    }
    let bytes = read_body(body).await?;
    let origin = if <R::Authentication as AuthPolicy>::KIND == AuthKind::Server {
        let signed = http::Request::builder()
            .method(parts.method.clone())
            .uri(parts.uri.clone())
            .body(&bytes[..])
            .map_err(|e| Error::internal("request", e))?;
        let (mut signed_parts, body) = signed.into_parts();
        signed_parts.headers = parts.headers.clone();
        Some(
            services
                .federation
                .verify_request(&http::Request::from_parts(signed_parts, body))
                .await?,
        )
    } else {
        None
    };
    let turn = match &origin {
        Some(origin) => Some(services.federation.inbound_turn(origin).await?),
        None => None,
    };
    let ctx = Ctx { services, session, client, origin };
    if R::RATE_LIMITED {
        ctx.rate_limit(Class::Default)?;
    }
    Ok(Prepared { ctx, parts, bytes, args, turn })
}

/// Where ruma's parsers and the spec (or what clients send) part ways: answers the spec
/// gives before parsing, or a body completed so that it parses.
fn around_parser_gaps(
    parts: &http::request::Parts,
    bytes: axum::body::Bytes,
) -> Result<axum::body::Bytes> {
    let path = parts.uri.path();
    let body = || serde_json::from_slice::<serde_json::Value>(&bytes).ok();
    // ruma's login body parser indexes `type` without checking that it is there.
    if parts.method == http::Method::POST
        && path.ends_with("/login")
        && let Some(serde_json::Value::Object(body)) = body()
        && !body.get("type").is_some_and(serde_json::Value::is_string)
    {
        return Err(Error::bad_json("A login needs a `type`"));
    }
    // The OpenID token is authentication: without one the answer is 401, not a bad query.
    if path.ends_with("/openid/userinfo")
        && !parts.uri.query().is_some_and(|q| q.split('&').any(|p| p.starts_with("access_token=")))
    {
        return Err(Error::new(
            ErrorKind::Unauthenticated,
            trellis_core::error::code::UNKNOWN_TOKEN,
            "An OpenID access token is required",
        ));
    }
    // A password stage naming the user the deprecated way (`user` rather than an
    // `identifier`), as older clients still do, which ruma refuses.
    if parts.method != http::Method::GET
        && bytes.windows(6).any(|w| w == b"\"auth\"")
        && let Some(serde_json::Value::Object(mut body)) = body()
        && let Some(serde_json::Value::Object(auth)) = body.get_mut("auth")
        && auth.get("type").and_then(serde_json::Value::as_str) == Some("m.login.password")
        && !auth.contains_key("identifier")
        && let Some(user) = auth.get("user").and_then(serde_json::Value::as_str)
    {
        let identifier = serde_json::json!({"type": "m.id.user", "user": user});
        auth.insert("identifier".into(), identifier);
        let completed = serde_json::to_vec(&body).map_err(|e| Error::internal("auth body", e))?;
        return Ok(completed.into());
    }
    // ruma requires `timeout` with `typing: true`; clients that leave it out mean a
    // default, as other servers take it.
    if parts.method == http::Method::PUT
        && path.contains("/typing/")
        && let Some(serde_json::Value::Object(mut body)) = body()
        && body.get("typing") == Some(&serde_json::Value::Bool(true))
        && !body.contains_key("timeout")
    {
        body.insert("timeout".into(), DEFAULT_TYPING_TIMEOUT_MS.into());
        let completed = serde_json::to_vec(&body).map_err(|e| Error::internal("typing body", e))?;
        return Ok(completed.into());
    }
    Ok(bytes)
}

/// How long a user types when their client names no timeout.
const DEFAULT_TYPING_TIMEOUT_MS: u64 = 30_000;

/// Parses the request and starts its handler. A plain function, so that the parsed
/// request (kilobytes for some endpoints) is never part of the request's future.
fn start<R, F, Fut>(
    ctx: Ctx,
    parts: http::request::Parts,
    mut bytes: axum::body::Bytes,
    args: &[String],
    handler: &F,
) -> Result<Pin<Box<Fut>>>
where
    R: IncomingRequest,
    F: Fn(Ctx, R) -> Fut,
{
    // Some clients (matrix-nio's join, for one) send no body where every field is
    // optional; an empty body reads as the empty object, as other homeservers do.
    if bytes.is_empty() && matches!(parts.method, http::Method::POST | http::Method::PUT) {
        bytes = axum::body::Bytes::from_static(b"{}");
    }
    let bytes = around_parser_gaps(&parts, bytes)?;
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let http_request = http::Request::from_parts(parts, &bytes[..]);
    // ruma's parsers are not all panic-free on hostile input (a missing `type` in a login
    // body indexes a map); a panic there is the client's malformed request, not ours.
    let parsed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        R::try_from_http_request(http_request, &arg_refs)
    }));
    let request = match parsed {
        Ok(result) => result.map_err(parse_error)?,
        Err(_) => return Err(Error::bad_json("Malformed request body")),
    };
    Ok(Box::pin(handler(ctx, request)))
}

/// Reads the whole body; the size limit layer has already bounded it.
async fn read_body(body: Body) -> Result<axum::body::Bytes> {
    axum::body::to_bytes(body, usize::MAX).await.map_err(|e| {
        // The limit error sits some layers down the source chain (axum wraps it twice).
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        let mut too_large = false;
        while let Some(err) = source {
            too_large |= err.is::<http_body_util::LengthLimitError>();
            source = err.source();
        }
        if too_large {
            Error::too_large("Request body is too large")
        } else {
            Error::new(
                ErrorKind::BadRequest,
                trellis_core::error::code::UNKNOWN,
                "Could not read request body",
            )
        }
    })
}

/// Where a request comes from: its address (see [`client_ip`]) and user agent.
pub(crate) fn client_of(parts: &http::request::Parts, trust_forwarded: bool) -> Client {
    let user_agent = parts.headers.get(http::header::USER_AGENT).and_then(|v| v.to_str().ok());
    Client::from_ip(client_ip(parts, trust_forwarded)).with_user_agent(user_agent)
}

/// The peer address, or with `x_forwarded_for` the left-most forwarded address.
pub(crate) fn client_ip(
    parts: &http::request::Parts,
    trust_forwarded: bool,
) -> Option<std::net::IpAddr> {
    if trust_forwarded {
        let forwarded = parts
            .headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .and_then(|v| v.trim().parse().ok());
        if forwarded.is_some() {
            return forwarded;
        }
    }
    parts
        .extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|info| info.0.ip())
}

/// `Authorization: Bearer` first; the deprecated `access_token` query parameter second.
pub(crate) fn access_token(parts: &http::request::Parts) -> Option<String> {
    if let Some(value) = parts.headers.get(http::header::AUTHORIZATION) {
        let value = value.to_str().ok()?;
        return value.strip_prefix("Bearer ").map(|t| t.trim().to_owned());
    }
    let query = parts.uri.query()?;
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "access_token")
        .map(|(_, v)| v.into_owned())
}

/// A JSON body error: syntax errors are `M_NOT_JSON`, wrong shapes `M_BAD_JSON`.
pub(crate) fn json_error(j: serde_json::Error) -> Error {
    if j.is_syntax() || j.is_eof() {
        Error::not_json(format!("Request body is not valid JSON: {j}"))
    } else {
        Error::bad_json(format!("Invalid request body: {j}"))
    }
}

fn parse_error(e: FromHttpRequestError) -> Error {
    match e {
        FromHttpRequestError::MethodMismatch { .. } => Error::method_not_allowed(),
        FromHttpRequestError::Deserialization(d) => match d {
            DeserializationError::Json(j) => json_error(j),
            DeserializationError::Utf8(_) => Error::not_json("Request body is not UTF-8"),
            DeserializationError::Query(q) => {
                Error::invalid_param(format!("Invalid query string: {q}"))
            }
            DeserializationError::Ident(i) => {
                Error::invalid_param(format!("Invalid identifier: {i}"))
            }
            DeserializationError::Header(h) => Error::invalid_param(format!("Invalid header: {h}")),
            other => Error::bad_json(other.to_string()),
        },
        other => Error::bad_json(other.to_string()),
    }
}
