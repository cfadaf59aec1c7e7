//! The server-server API's plumbing: where other servers are (`discovery`), their keys
//! (`keys`), and requests signed and verified with X-Matrix authorization.

pub mod acl;
pub mod backfill;
pub mod discovery;
pub mod edus;
pub mod events;
pub mod invites;
pub mod keys;
pub mod membership;
pub mod pdus;
pub mod sender;
pub mod transactions;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};
use tracing::Instrument;

use http::{Method, StatusCode};
use ruma::{OwnedServerName, api::federation::authentication::XMatrix, signatures::PublicKeyMap};
use serde_json::Value;
use tokio::sync::Semaphore;
use trellis_core::{Error, ErrorKind, Result, config::FederationConfig, error::code, now_millis};
use trellis_store::Db;

use crate::keys::ServerKeys;

/// Requests in flight to one server at a time; more wait their turn.
const PER_DESTINATION: usize = 8;
/// Requests of one other server handled at a time; more wait their turn, for at most
/// [`INBOUND_WAIT`], then get 429.
const PER_ORIGIN: usize = 16;
const INBOUND_WAIT: Duration = Duration::from_secs(5);
/// The largest response accepted from another server.
const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

pub struct Federation {
    db: Db,
    server_name: String,
    keys: Arc<ServerKeys>,
    config: FederationConfig,
    client: reqwest::Client,
    resolver: Arc<discovery::Resolver>,
    key_cache: keys::KeyCache,
    limits: Mutex<HashMap<String, Arc<Semaphore>>>,
    pub outbox: sender::Outbox,
    /// Inbound transactions are handled one at a time per origin.
    inbound: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Inbound requests in flight per origin.
    origin_turns: OriginTurns,
}

/// Turns for the requests of each other server: at most [`PER_ORIGIN`] at a time, so
/// that one server cannot take all of this one.
#[derive(Default)]
struct OriginTurns(Mutex<HashMap<String, Arc<Semaphore>>>);

impl OriginTurns {
    /// A turn for one request of `origin`; 429 `M_LIMIT_EXCEEDED` after waiting `wait`.
    async fn take(
        &self,
        origin: &str,
        wait: Duration,
    ) -> Result<tokio::sync::OwnedSemaphorePermit> {
        let semaphore = {
            let mut limits = self.0.lock().unwrap_or_else(|p| p.into_inner());
            if limits.len() > 10_000 {
                limits.retain(|_, s| s.available_permits() < PER_ORIGIN);
            }
            limits
                .entry(origin.to_owned())
                .or_insert_with(|| Arc::new(Semaphore::new(PER_ORIGIN)))
                .clone()
        };
        match tokio::time::timeout(wait, semaphore.acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => {
                tracing::info!(origin, "too many concurrent requests from a server");
                Err(Error::limit_exceeded(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX)))
            }
        }
    }
}

/// The client for outbound federation: HTTP/1.1 over TLS (ring) trusting the system's
/// roots plus `ca_file`, with name lookups through discovery.
pub fn build_client(
    config: &FederationConfig,
    resolver: Arc<discovery::Resolver>,
) -> Result<reqwest::Client, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if !config.ca_file.as_os_str().is_empty() {
        let path = &config.ca_file;
        let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut added = 0;
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| format!("{}: {e}", path.display()))?;
            roots.add(cert).map_err(|e| format!("{}: {e}", path.display()))?;
            added += 1;
        }
        if added == 0 {
            return Err(format!("{}: no certificates", path.display()));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .dns_resolver(Arc::new(discovery::DnsBridge(resolver)))
        .timeout(Duration::from_secs(config.request_timeout_seconds))
        .connect_timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::limited(3))
        .user_agent(concat!("Trellis/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| e.to_string())
}

use rustls::pki_types::pem::PemObject as _;

impl Federation {
    pub fn new(
        db: Db,
        server_name: String,
        keys: Arc<ServerKeys>,
        config: FederationConfig,
    ) -> Result<Self, String> {
        let resolver = Arc::new(discovery::Resolver::new());
        let client = build_client(&config, resolver.clone())?;
        Ok(Self {
            server_name,
            keys,
            config,
            client,
            resolver,
            key_cache: keys::KeyCache::default(),
            limits: Mutex::default(),
            outbox: sender::Outbox::new(db.clone()).map_err(|e| e.to_string())?,
            inbound: Mutex::default(),
            origin_turns: OriginTurns::default(),
            db,
        })
    }

    pub fn enabled(&self) -> bool {
        self.config.enabled
    }

    fn denied(&self, server: &str) -> bool {
        self.config.denied_servers.iter().any(|d| d == server)
    }

    /// The lock that orders the inbound transactions of `origin`.
    pub fn inbound_lock(&self, origin: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.inbound.lock().unwrap_or_else(|p| p.into_inner());
        if locks.len() > 10_000 {
            locks.retain(|_, l| Arc::strong_count(l) > 1);
        }
        locks.entry(origin.to_owned()).or_default().clone()
    }

    /// A turn for one request of `origin` (see [`OriginTurns`]), waiting at most
    /// [`INBOUND_WAIT`].
    pub async fn inbound_turn(&self, origin: &str) -> Result<tokio::sync::OwnedSemaphorePermit> {
        self.origin_turns.take(origin, INBOUND_WAIT).await
    }

    fn limit(&self, server: &str) -> Arc<Semaphore> {
        let mut limits = self.limits.lock().unwrap_or_else(|p| p.into_inner());
        limits
            .entry(server.to_owned())
            .or_insert_with(|| Arc::new(Semaphore::new(PER_DESTINATION)))
            .clone()
    }

    fn unavailable(server: &str, why: impl std::fmt::Display) -> Error {
        Error::new(ErrorKind::Upstream, code::UNKNOWN, format!("Could not reach {server}: {why}"))
    }

    /// An unauthenticated GET (the key server).
    async fn get_unsigned(&self, server: &str, path: &str) -> Result<Value> {
        self.send(server, Method::GET, path, None, false).await
    }

    /// A signed request to `server`; the JSON answer, or the remote's Matrix error.
    pub async fn request(
        &self,
        server: &str,
        method: Method,
        path_and_query: &str,
        body: Option<&Value>,
    ) -> Result<Value> {
        self.send(server, method, path_and_query, body, true).await
    }

    async fn send(
        &self,
        server: &str,
        method: Method,
        path_and_query: &str,
        body: Option<&Value>,
        signed: bool,
    ) -> Result<Value> {
        let (status, _, bytes) =
            self.send_raw(server, method, path_and_query, body, signed, MAX_RESPONSE_BYTES).await?;
        let value: Value = serde_json::from_slice(&bytes)
            .map_err(|_| Self::unavailable(server, format!("non-JSON answer ({status})")))?;
        if status.is_success() {
            return Ok(value);
        }
        Err(Self::remote_error(server, status, &value))
    }

    /// The remote's Matrix error passed on (404 for an unknown profile, and so on).
    fn remote_error(server: &str, status: StatusCode, value: &Value) -> Error {
        let errcode = match value.get("errcode").and_then(Value::as_str) {
            Some("M_NOT_FOUND") => code::NOT_FOUND,
            Some("M_FORBIDDEN") => code::FORBIDDEN,
            _ => code::UNKNOWN,
        };
        let message = value.get("error").and_then(Value::as_str).unwrap_or("Remote error");
        Error::new(
            ErrorKind::of_remote_status(status.as_u16()),
            errcode,
            format!("{server}: {message}"),
        )
    }

    /// A signed GET whose answer is not JSON (media): `(content type, body)` of a
    /// success, at most `limit` bytes.
    pub async fn get_bytes(
        &self,
        server: &str,
        path_and_query: &str,
        limit: usize,
    ) -> Result<(Option<String>, bytes::Bytes)> {
        let (status, content_type, bytes) =
            self.send_raw(server, Method::GET, path_and_query, None, true, limit).await?;
        if status.is_success() {
            return Ok((content_type, bytes));
        }
        let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Err(Self::remote_error(server, status, &value))
    }

    async fn send_raw(
        &self,
        server: &str,
        method: Method,
        path_and_query: &str,
        body: Option<&Value>,
        signed: bool,
        limit: usize,
    ) -> Result<(StatusCode, Option<String>, bytes::Bytes)> {
        if !self.config.enabled {
            return Err(Error::forbidden("Federation is disabled on this server"));
        }
        if server == self.server_name || self.denied(server) {
            return Err(Error::forbidden(format!("Federation with {server} is not allowed")));
        }
        let destination = self
            .resolver
            .resolve(&self.client, server)
            .await
            .ok_or_else(|| Self::unavailable(server, "invalid server name"))?;
        let body_bytes = match body {
            Some(v) => serde_json::to_vec(v).map_err(|e| Error::internal("request json", e))?,
            None => Vec::new(),
        };
        let url = format!("{}{path_and_query}", destination.base_url);
        let mut request = self
            .client
            .request(method.clone(), &url)
            .header(http::header::HOST, &destination.host_header);
        if body.is_some() {
            request = request
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(body_bytes.clone());
        }
        if signed {
            request = request.header(
                http::header::AUTHORIZATION,
                self.authorization(server, &method, path_and_query, &body_bytes)?,
            );
        }
        let _permit = self.limit(server).acquire_owned().await;
        let span =
            tracing::debug_span!("federation_request", server, %method, path = path_and_query);
        // Attached to the future rather than entered: an entered span would stay current
        // on the worker thread for whatever task runs there while this one waits.
        async {
            let mut response = request.send().await.map_err(|e| Self::unavailable(server, e))?;
            let status =
                StatusCode::from_u16(response.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            if response.content_length().is_some_and(|n| n > limit as u64) {
                return Err(Self::unavailable(server, "response too large"));
            }
            let (content_type, body) = read_limited(&mut response, server, limit).await?;
            Ok((status, content_type, body))
        }
        .instrument(span)
        .await
    }

    /// The X-Matrix `Authorization` header for a request to `destination`.
    fn authorization(
        &self,
        destination: &str,
        method: &Method,
        path_and_query: &str,
        body: &[u8],
    ) -> Result<String> {
        let origin: OwnedServerName = self
            .server_name
            .as_str()
            .try_into()
            .map_err(|e| Error::internal("own server name", e))?;
        let dest: OwnedServerName = destination
            .try_into()
            .map_err(|_| Error::invalid_param(format!("Invalid server name {destination}")))?;
        let request = http::Request::builder()
            .method(method)
            .uri(path_and_query)
            .body(body)
            .map_err(|e| Error::internal("building a request", e))?;
        let input = ruma::api::federation::authentication::XMatrixSigningInput::new(
            origin,
            dest,
            self.keys.key_pair(),
        );
        let header = XMatrix::sign_http_request(&request, input)
            .map_err(|e| Error::internal("signing a request", e))?;
        Ok(header.to_string())
    }

    /// Checks the X-Matrix authorization of an inbound request; returns the origin.
    pub async fn verify_request(&self, request: &http::Request<&[u8]>) -> Result<String> {
        let unauthorized =
            |why: &str| Error::new(ErrorKind::Unauthenticated, code::UNAUTHORIZED, why.to_owned());
        if !self.config.enabled {
            return Err(Error::forbidden("Federation is disabled on this server"));
        }
        let header = XMatrix::extract_from_http_headers(request.headers())
            .map_err(|_| unauthorized("Missing or malformed X-Matrix authorization"))?;
        let origin = header.origin.to_string();
        if self.denied(&origin) {
            return Err(Error::forbidden("Federation with your server is not allowed"));
        }
        let destination: OwnedServerName = self
            .server_name
            .as_str()
            .try_into()
            .map_err(|e| Error::internal("own server name", e))?;
        let key = self
            .verify_key(&origin, header.key.as_str(), now_millis())
            .await?
            .ok_or_else(|| unauthorized("Unknown or expired signing key"))?;
        let key = ruma::serde::Base64::parse(key).map_err(|_| unauthorized("Bad signing key"))?;
        let mut map = PublicKeyMap::new();
        map.insert(origin.clone(), [(header.key.to_string(), key)].into_iter().collect());
        header
            .verify_http_request(request, &destination, &map)
            .map_err(|_| unauthorized("Invalid X-Matrix signature"))?;
        self.outbox.peer_alive(&origin);
        Ok(origin)
    }
}

/// A response's content type and body, read in chunks so that a peer that lies about
/// (or omits) its length cannot make us buffer more than `limit`.
async fn read_limited(
    response: &mut reqwest::Response,
    peer: &str,
    limit: usize,
) -> Result<(Option<String>, bytes::Bytes)> {
    let content_type = response
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut buf = bytes::BytesMut::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| Federation::unavailable(peer, e))? {
        if buf.len() + chunk.len() > limit {
            return Err(Federation::unavailable(peer, "response too large"));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok((content_type, buf.freeze()))
}

/// Percent-encodes a query parameter or path segment.
pub fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The server part of a user id, room alias or room id.
pub fn server_of(id: &str) -> Option<&str> {
    id.split_once(':').map(|(_, server)| server).filter(|s| !s.is_empty())
}

impl Federation {
    /// Another server's user's profile (all fields, or one).
    pub async fn remote_profile(&self, user_id: &str, field: Option<&str>) -> Result<Value> {
        let server = server_of(user_id).ok_or_else(|| Error::invalid_param("Invalid user id"))?;
        let mut path = format!("/_matrix/federation/v1/query/profile?user_id={}", encode(user_id));
        if let Some(field) = field {
            path.push_str(&format!("&field={}", encode(field)));
        }
        self.request(server, Method::GET, &path, None).await
    }

    /// The user another server's OpenID token stands for (its `sub`), as that server
    /// answers `GET /openid/userinfo` (unsigned: the token is the credential).
    pub async fn remote_openid_user(&self, server: &str, token: &str) -> Result<String> {
        let path = format!("/_matrix/federation/v1/openid/userinfo?access_token={}", encode(token));
        let answer = self.get_unsigned(server, &path).await?;
        answer["sub"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| Self::unavailable(server, "OpenID user info without `sub`".to_owned()))
    }

    /// Another server's room alias: `{room_id, servers}`.
    pub async fn remote_alias(&self, alias: &str) -> Result<Value> {
        let server = server_of(alias).ok_or_else(|| Error::invalid_param("Invalid alias"))?;
        let path = format!("/_matrix/federation/v1/query/directory?room_alias={}", encode(alias));
        self.request(server, Method::GET, &path, None).await
    }

    /// Asks each server for its users' keys; answers by server, errors as `failures`.
    pub async fn remote_keys(
        &self,
        path: &str,
        field: &str,
        by_server: std::collections::BTreeMap<String, Value>,
    ) -> (Vec<Value>, serde_json::Map<String, Value>) {
        let requests = by_server.into_iter().map(|(server, users)| async move {
            let body = serde_json::json!({ field: users });
            let result = self.request(&server, Method::POST, path, Some(&body)).await;
            (server, result)
        });
        let mut answers = Vec::new();
        let mut failures = serde_json::Map::new();
        for (server, result) in futures_util::future::join_all(requests).await {
            match result {
                Ok(v) => answers.push(v),
                Err(e) => {
                    failures.insert(
                        server,
                        serde_json::json!({"errcode": e.errcode, "error": e.message}),
                    );
                }
            }
        }
        (answers, failures)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_server_gets_a_bounded_number_of_turns() {
        let turns = OriginTurns::default();
        let wait = Duration::from_millis(20);
        let mut held = Vec::new();
        for _ in 0..PER_ORIGIN {
            held.push(turns.take("busy.example", wait).await.unwrap());
        }
        let refused = turns.take("busy.example", wait).await.unwrap_err();
        assert_eq!(refused.kind, ErrorKind::RateLimited);
        // Other servers are not held up by the busy one.
        assert!(turns.take("other.example", wait).await.is_ok());
        // A finished request gives its turn to the next.
        held.pop();
        assert!(turns.take("busy.example", wait).await.is_ok());
    }
}
