//! The one error type of the server. Every failure a client can see maps to a Matrix
//! error JSON: an [`ErrorKind`] (which the API turns into an HTTP status), an `errcode` and a
//! human-readable `error`. Services never name HTTP statuses: the kind says what went
//! wrong, the edge decides how HTTP spells it.

use std::borrow::Cow;

use serde_json::{Map, Value};

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Matrix error codes as the spec spells them.
pub mod code {
    pub const UNRECOGNIZED: &str = "M_UNRECOGNIZED";
    pub const NOT_JSON: &str = "M_NOT_JSON";
    pub const BAD_JSON: &str = "M_BAD_JSON";
    pub const TOO_LARGE: &str = "M_TOO_LARGE";
    pub const NOT_FOUND: &str = "M_NOT_FOUND";
    pub const FORBIDDEN: &str = "M_FORBIDDEN";
    pub const UNKNOWN: &str = "M_UNKNOWN";
    pub const UNKNOWN_TOKEN: &str = "M_UNKNOWN_TOKEN";
    pub const MISSING_TOKEN: &str = "M_MISSING_TOKEN";
    pub const MISSING_PARAM: &str = "M_MISSING_PARAM";
    pub const INVALID_PARAM: &str = "M_INVALID_PARAM";
    pub const LIMIT_EXCEEDED: &str = "M_LIMIT_EXCEEDED";
    pub const USER_IN_USE: &str = "M_USER_IN_USE";
    pub const INVALID_USERNAME: &str = "M_INVALID_USERNAME";
    pub const EXCLUSIVE: &str = "M_EXCLUSIVE";
    pub const WEAK_PASSWORD: &str = "M_WEAK_PASSWORD";
    pub const UNAUTHORIZED: &str = "M_UNAUTHORIZED";
    pub const USER_DEACTIVATED: &str = "M_USER_DEACTIVATED";
    pub const USER_LOCKED: &str = "M_USER_LOCKED";
    pub const USER_SUSPENDED: &str = "M_USER_SUSPENDED";
    pub const THREEPID_DENIED: &str = "M_THREEPID_DENIED";
    pub const THREEPID_IN_USE: &str = "M_THREEPID_IN_USE";
    pub const THREEPID_NOT_FOUND: &str = "M_THREEPID_NOT_FOUND";
    pub const THREEPID_AUTH_FAILED: &str = "M_THREEPID_AUTH_FAILED";
    pub const THREEPID_MEDIUM_NOT_SUPPORTED: &str = "M_THREEPID_MEDIUM_NOT_SUPPORTED";
    pub const INVALID_SIGNATURE: &str = "M_INVALID_SIGNATURE";
    pub const WRONG_ROOM_KEYS_VERSION: &str = "M_WRONG_ROOM_KEYS_VERSION";
    pub const RESOURCE_LIMIT_EXCEEDED: &str = "M_RESOURCE_LIMIT_EXCEEDED";
    pub const CANNOT_OVERWRITE_MEDIA: &str = "M_CANNOT_OVERWRITE_MEDIA";
    pub const NOT_YET_UPLOADED: &str = "M_NOT_YET_UPLOADED";
    pub const UNABLE_TO_AUTHORISE_JOIN: &str = "M_UNABLE_TO_AUTHORISE_JOIN";
    pub const UNABLE_TO_GRANT_JOIN: &str = "M_UNABLE_TO_GRANT_JOIN";
    pub const INCOMPATIBLE_ROOM_VERSION: &str = "M_INCOMPATIBLE_ROOM_VERSION";
    pub const BAD_ALIAS: &str = "M_BAD_ALIAS";
    pub const GUEST_ACCESS_FORBIDDEN: &str = "M_GUEST_ACCESS_FORBIDDEN";
    pub const UNKNOWN_DEVICE: &str = "M_UNKNOWN_DEVICE";
    pub const URL_NOT_SET: &str = "M_URL_NOT_SET";
    pub const BAD_STATUS: &str = "M_BAD_STATUS";
    pub const CONNECTION_FAILED: &str = "M_CONNECTION_FAILED";
    pub const CONNECTION_TIMEOUT: &str = "M_CONNECTION_TIMEOUT";
    pub const APPSERVICE_LOGIN_UNSUPPORTED: &str = "M_APPSERVICE_LOGIN_UNSUPPORTED";
    pub const CANNOT_LEAVE_SERVER_NOTICE_ROOM: &str = "M_CANNOT_LEAVE_SERVER_NOTICE_ROOM";
}

/// What kind of failure an error is. The errcode alone does not decide this: the spec
/// sends `M_UNKNOWN` and `M_UNRECOGNIZED` with several statuses, and user-interactive
/// auth answers with no errcode at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is malformed or asks for something that cannot be (400).
    BadRequest,
    /// No credentials, credentials that are not or no longer valid, or the first step of
    /// user-interactive auth (401).
    Unauthenticated,
    /// Known, but not allowed (403).
    Forbidden,
    /// What was asked for does not exist, or the asker may not know that it does (404).
    NotFound,
    /// The endpoint exists, but not with this method (405).
    MethodNotAllowed,
    /// The change conflicts with what is already there (409).
    Conflict,
    /// The request body is over its limit (413).
    TooLarge,
    /// A byte range outside the content (416).
    RangeNotSatisfiable,
    /// The client must slow down (429).
    RateLimited,
    /// A failure of this server (500).
    Internal,
    /// The server does not do this (501).
    Unimplemented,
    /// Another server could not be reached or answered with a failure of its own (502).
    Upstream,
    /// Something waited for did not happen in time (504).
    Timeout,
    /// The server has no room left to store what was asked (507).
    InsufficientStorage,
}

impl ErrorKind {
    /// The kind of another server's answer with this HTTP status, so that its refusal
    /// reaches our client as the same kind of failure.
    pub fn of_remote_status(status: u16) -> Self {
        match status {
            401 => Self::Unauthenticated,
            403 => Self::Forbidden,
            404 => Self::NotFound,
            405 => Self::MethodNotAllowed,
            409 => Self::Conflict,
            413 => Self::TooLarge,
            416 => Self::RangeNotSatisfiable,
            429 => Self::RateLimited,
            400..=499 => Self::BadRequest,
            504 => Self::Timeout,
            _ => Self::Upstream,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Error {
    pub kind: ErrorKind,
    /// Empty for responses that carry no errcode (the first user-interactive auth step).
    pub errcode: &'static str,
    pub message: Cow<'static, str>,
    /// Extra top-level fields: `retry_after_ms`, `soft_logout`, UIA `flows`/`session`...
    pub extra: Option<Box<Map<String, Value>>>,
}

impl Error {
    pub fn new(
        kind: ErrorKind,
        errcode: &'static str,
        message: impl Into<Cow<'static, str>>,
    ) -> Self {
        Self { kind, errcode, message: message.into(), extra: None }
    }

    pub fn with_field(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.extra.get_or_insert_with(Default::default).insert(key.to_owned(), value.into());
        self
    }

    pub fn unrecognized(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorKind::NotFound, code::UNRECOGNIZED, message)
    }
    pub fn method_not_allowed() -> Self {
        Self::new(
            ErrorKind::MethodNotAllowed,
            code::UNRECOGNIZED,
            "Method not allowed for this endpoint",
        )
    }
    pub fn not_json(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorKind::BadRequest, code::NOT_JSON, message)
    }
    pub fn bad_json(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorKind::BadRequest, code::BAD_JSON, message)
    }
    pub fn too_large(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorKind::TooLarge, code::TOO_LARGE, message)
    }
    pub fn not_found(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorKind::NotFound, code::NOT_FOUND, message)
    }
    pub fn forbidden(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorKind::Forbidden, code::FORBIDDEN, message)
    }
    pub fn invalid_param(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorKind::BadRequest, code::INVALID_PARAM, message)
    }
    pub fn missing_param(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorKind::BadRequest, code::MISSING_PARAM, message)
    }
    pub fn missing_token() -> Self {
        Self::new(ErrorKind::Unauthenticated, code::MISSING_TOKEN, "Missing access token")
    }
    pub fn unknown_token() -> Self {
        Self::new(ErrorKind::Unauthenticated, code::UNKNOWN_TOKEN, "Unknown access token")
            .with_field("soft_logout", false)
    }
    /// An expired access token: `soft_logout` tells the client to refresh, not log out.
    pub fn expired_token() -> Self {
        Self::new(ErrorKind::Unauthenticated, code::UNKNOWN_TOKEN, "Access token has expired")
            .with_field("soft_logout", true)
    }
    pub fn user_locked() -> Self {
        Self::new(ErrorKind::Unauthenticated, code::USER_LOCKED, "This account has been locked")
            .with_field("soft_logout", true)
    }
    pub fn user_suspended() -> Self {
        Self::new(
            ErrorKind::Forbidden,
            code::USER_SUSPENDED,
            "You cannot perform this action while suspended",
        )
    }
    /// An endpoint guest accounts may not use.
    pub fn guest_forbidden() -> Self {
        Self::new(
            ErrorKind::Forbidden,
            code::GUEST_ACCESS_FORBIDDEN,
            "Guest accounts cannot do this; register a full account",
        )
    }
    pub fn user_deactivated() -> Self {
        Self::new(ErrorKind::Forbidden, code::USER_DEACTIVATED, "This account has been deactivated")
    }
    /// A per-user allowance (such as the media quota) is used up.
    pub fn resource_limit(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorKind::Forbidden, code::RESOURCE_LIMIT_EXCEEDED, message)
            .with_field("admin_contact", admin_contact())
    }
    /// The disk holding the database or media is full. The spec's code for a server that
    /// hit a resource limit, with 507 so that clients retry later instead of treating it
    /// as a refusal.
    pub fn out_of_space() -> Self {
        Self::new(
            ErrorKind::InsufficientStorage,
            code::RESOURCE_LIMIT_EXCEEDED,
            "The server is out of disk space, so this could not be saved; try again later",
        )
        .with_field("admin_contact", admin_contact())
        .with_field("limit_type", "org.trellis.disk_space")
    }
    /// A failed file operation: out of space when the disk is full, else internal.
    pub fn io(context: &str, err: std::io::Error) -> Self {
        if err.kind() == std::io::ErrorKind::StorageFull {
            tracing::warn!(%err, "{context}: out of disk space");
            return Self::out_of_space();
        }
        Self::internal(context, err)
    }
    pub fn cannot_overwrite_media() -> Self {
        Self::new(
            ErrorKind::Conflict,
            code::CANNOT_OVERWRITE_MEDIA,
            "Media has already been uploaded to this id",
        )
    }
    pub fn not_yet_uploaded() -> Self {
        Self::new(ErrorKind::Timeout, code::NOT_YET_UPLOADED, "Content has not yet been uploaded")
    }
    pub fn limit_exceeded(retry_after_ms: u64) -> Self {
        Self::new(ErrorKind::RateLimited, code::LIMIT_EXCEEDED, "Too many requests")
            .with_field("retry_after_ms", retry_after_ms)
    }

    /// An internal failure: logged in full here, shown to the client only as `M_UNKNOWN`
    /// so that storage paths and the like never leak.
    pub fn internal(context: &str, err: impl std::fmt::Display) -> Self {
        tracing::error!(%err, "{context}");
        Self::new(ErrorKind::Internal, code::UNKNOWN, "Internal server error")
    }

    /// The JSON body a client receives.
    pub fn body(&self) -> Value {
        let mut body = self.extra.as_deref().cloned().unwrap_or_default();
        if !self.errcode.is_empty() {
            body.insert("errcode".into(), Value::String(self.errcode.into()));
            body.insert("error".into(), Value::String(self.message.to_string()));
        }
        Value::Object(body)
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?} {}: {}", self.kind, self.errcode, self.message)
    }
}

impl std::error::Error for Error {}

static ADMIN_CONTACT: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Sets where `M_RESOURCE_LIMIT_EXCEEDED` errors send users (the spec requires an
/// `admin_contact`); the first call wins.
pub fn set_admin_contact(contact: String) {
    let _ = ADMIN_CONTACT.set(contact);
}

fn admin_contact() -> String {
    ADMIN_CONTACT.get().cloned().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_errcode_error_and_extras() {
        let body = Error::limit_exceeded(1500).body();
        assert_eq!(body["errcode"], "M_LIMIT_EXCEEDED");
        assert_eq!(body["retry_after_ms"], 1500);
        assert!(body["error"].is_string());
    }

    #[test]
    fn uia_body_without_errcode() {
        let e = Error::new(ErrorKind::Unauthenticated, "", "").with_field("session", "abc");
        assert_eq!(e.body(), serde_json::json!({"session": "abc"}));
    }
}
