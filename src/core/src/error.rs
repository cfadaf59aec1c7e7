//! The one error type of the server. Every failure a client can see maps to a Matrix
//! error JSON: an HTTP status, an `errcode` and a human-readable `error`.

use std::borrow::Cow;

use http::StatusCode;
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
}

#[derive(Debug, Clone)]
pub struct Error {
    pub status: StatusCode,
    /// Empty for responses that carry no errcode (the first user-interactive auth step).
    pub errcode: &'static str,
    pub message: Cow<'static, str>,
    /// Extra top-level fields: `retry_after_ms`, `soft_logout`, UIA `flows`/`session`...
    pub extra: Option<Box<Map<String, Value>>>,
}

impl Error {
    pub fn new(
        status: StatusCode,
        errcode: &'static str,
        message: impl Into<Cow<'static, str>>,
    ) -> Self {
        Self { status, errcode, message: message.into(), extra: None }
    }

    pub fn with_field(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.extra.get_or_insert_with(Default::default).insert(key.to_owned(), value.into());
        self
    }

    pub fn unrecognized(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code::UNRECOGNIZED, message)
    }
    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            code::UNRECOGNIZED,
            "Method not allowed for this endpoint",
        )
    }
    pub fn not_json(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code::NOT_JSON, message)
    }
    pub fn bad_json(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code::BAD_JSON, message)
    }
    pub fn too_large(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, code::TOO_LARGE, message)
    }
    pub fn not_found(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code::NOT_FOUND, message)
    }
    pub fn forbidden(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::FORBIDDEN, code::FORBIDDEN, message)
    }
    pub fn invalid_param(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code::INVALID_PARAM, message)
    }
    pub fn missing_token() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, code::MISSING_TOKEN, "Missing access token")
    }
    pub fn unknown_token() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, code::UNKNOWN_TOKEN, "Unknown access token")
            .with_field("soft_logout", false)
    }
    /// An expired access token: `soft_logout` tells the client to refresh, not log out.
    pub fn expired_token() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, code::UNKNOWN_TOKEN, "Access token has expired")
            .with_field("soft_logout", true)
    }
    pub fn user_locked() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, code::USER_LOCKED, "This account has been locked")
            .with_field("soft_logout", true)
    }
    pub fn user_deactivated() -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            code::USER_DEACTIVATED,
            "This account has been deactivated",
        )
    }
    /// A per-user allowance (such as the media quota) is used up.
    pub fn resource_limit(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::FORBIDDEN, code::RESOURCE_LIMIT_EXCEEDED, message)
    }
    pub fn cannot_overwrite_media() -> Self {
        Self::new(
            StatusCode::CONFLICT,
            code::CANNOT_OVERWRITE_MEDIA,
            "Media has already been uploaded to this id",
        )
    }
    pub fn not_yet_uploaded() -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            code::NOT_YET_UPLOADED,
            "Content has not yet been uploaded",
        )
    }
    pub fn limit_exceeded(retry_after_ms: u64) -> Self {
        Self::new(StatusCode::TOO_MANY_REQUESTS, code::LIMIT_EXCEEDED, "Too many requests")
            .with_field("retry_after_ms", retry_after_ms)
    }

    /// An internal failure: logged in full here, shown to the client only as `M_UNKNOWN`
    /// so that storage paths and the like never leak.
    pub fn internal(context: &str, err: impl std::fmt::Display) -> Self {
        tracing::error!(%err, "{context}");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, code::UNKNOWN, "Internal server error")
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
        write!(f, "{} {}: {}", self.status.as_u16(), self.errcode, self.message)
    }
}

impl std::error::Error for Error {}

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
        let e = Error::new(StatusCode::UNAUTHORIZED, "", "").with_field("session", "abc");
        assert_eq!(e.body(), serde_json::json!({"session": "abc"}));
    }
}
