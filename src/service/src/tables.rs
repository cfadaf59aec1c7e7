//! Typed views of the store's tables as the services use them.

use serde::{Deserialize, Serialize};
use trellis_store::{Json, Table, catalog};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UserRecord {
    /// argon2id PHC string; `None` for accounts without a password.
    pub password_hash: Option<String>,
    pub created_ms: u64,
    #[serde(default)]
    pub deactivated: bool,
    #[serde(default)]
    pub admin: bool,
    /// Locked accounts cannot log in or use their tokens (admin action).
    #[serde(default)]
    pub locked: bool,
    /// Suspended accounts can read but not write (admin action; enforced by writers).
    #[serde(default)]
    pub suspended: bool,
    /// A guest account (`register?kind=guest`) until it is upgraded.
    #[serde(default)]
    pub guest: bool,
    /// A bot (`trellis user create --bot`): shown in its profile, and exempt from rate
    /// limits when `rate_limits.exempt_bots` says so.
    #[serde(default)]
    pub bot: bool,
    /// Shadow-banned (admin action): the user's events, invites and typing go nowhere,
    /// while the user is told they succeeded.
    #[serde(default)]
    pub shadow_banned: bool,
    /// A per-user message rate set by an admin; `0/0` exempts the user from rate limits.
    #[serde(default)]
    pub rate_override: Option<RateOverride>,
}

/// An admin's override of a user's message rate limit.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct RateOverride {
    pub messages_per_second: u32,
    pub burst_count: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeviceRecord {
    pub display_name: Option<String>,
    pub created_ms: u64,
    /// sha256 of the device's current access token, so deleting the device revokes it.
    pub token_hash: Option<Vec<u8>>,
    /// sha256 of the device's current refresh token.
    #[serde(default)]
    pub refresh_hash: Option<Vec<u8>>,
    #[serde(default)]
    pub last_seen_ms: Option<u64>,
    #[serde(default)]
    pub last_seen_ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen_user_agent: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TokenRecord {
    pub localpart: String,
    pub device_id: String,
    /// Milliseconds since epoch after which the token is refused; `None` never expires.
    pub expires_ms: Option<u64>,
    /// The refresh token this access token replaced: it stays usable until this access
    /// token is first used (so a lost refresh response does not log the client out).
    #[serde(default)]
    pub supersedes_refresh: Option<Vec<u8>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RefreshRecord {
    pub localpart: String,
    pub device_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LoginTokenRecord {
    pub localpart: String,
    pub expires_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UiaSession {
    pub created_ms: u64,
    /// Stage types completed so far.
    pub completed: Vec<String>,
    /// What the session authorises (e.g. `delete_devices:alice`): a session completed
    /// for one request cannot authorise another.
    #[serde(default)]
    pub purpose: String,
    /// The registration token validated in this session, spent when registration ends.
    #[serde(default)]
    pub registration_token: Option<String>,
    /// A registration's parameters as its first request gave them: later requests of
    /// the flow may carry only `auth`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration: Option<RegistrationParams>,
    /// The account a completed registration session created: the same request again
    /// answers with it instead of failing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registered: Option<String>,
}

/// What a registration request asked for, kept through its user-interactive auth.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct RegistrationParams {
    pub username: Option<String>,
    pub password_hash: Option<String>,
    pub device_id: Option<String>,
    pub initial_device_display_name: Option<String>,
    pub inhibit_login: bool,
    /// The guest account this registration upgrades, once its token was checked.
    #[serde(default)]
    pub upgrades_guest: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RegistrationTokenRecord {
    /// How many registrations it may complete; `None` is unlimited.
    pub uses_allowed: Option<u32>,
    pub completed: u32,
    /// Milliseconds since epoch after which it is invalid.
    pub expiry_time: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ThreepidSession {
    pub client_secret: String,
    pub email: String,
    /// `register`, `add` or `password`: what the validation may be used for.
    pub purpose: String,
    pub send_attempt: u64,
    pub created_ms: u64,
    pub expires_ms: u64,
    /// sha256 of the 6-digit code and of the link token; cleared once validated.
    pub code_hash: Option<Vec<u8>>,
    pub link_hash: Option<Vec<u8>>,
    pub failed_attempts: u32,
    pub validated_ms: Option<u64>,
    pub next_link: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UserThreepid {
    pub added_ms: u64,
    pub validated_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AuditRecord {
    /// The acting user (localpart) or the name tried, if known.
    pub actor: Option<String>,
    pub action: String,
    pub client_ip: Option<String>,
    pub outcome: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// user localpart -> account
pub const USERS: Table<String, Json<UserRecord>> = Table::new(&catalog::USERS);
/// (localpart, device id) -> device
pub const DEVICES: Table<(String, String), Json<DeviceRecord>> = Table::new(&catalog::DEVICES);
/// sha256(token) -> owner
pub const ACCESS_TOKENS: Table<Vec<u8>, Json<TokenRecord>> = Table::new(&catalog::ACCESS_TOKENS);
/// sha256(refresh token) -> owner
pub const REFRESH_TOKENS: Table<Vec<u8>, Json<RefreshRecord>> =
    Table::new(&catalog::REFRESH_TOKENS);
/// sha256(login token) -> owner
pub const LOGIN_TOKENS: Table<Vec<u8>, Json<LoginTokenRecord>> = Table::new(&catalog::LOGIN_TOKENS);
/// sha256(OpenID token) -> owner and expiry (same record as a login token)
pub const OPENID_TOKENS: Table<Vec<u8>, Json<LoginTokenRecord>> =
    Table::new(&catalog::OPENID_TOKENS);
/// session id -> UIA progress
pub const UIA_SESSIONS: Table<String, Json<UiaSession>> = Table::new(&catalog::UIA_SESSIONS);
/// (localpart, field) -> value
pub const PROFILES: Table<(String, String), Json<serde_json::Value>> =
    Table::new(&catalog::PROFILES);
/// (localpart, room id or "", type) -> content
pub const ACCOUNT_DATA: Table<(String, String, String), Json<serde_json::Value>> =
    Table::new(&catalog::ACCOUNT_DATA);
/// token -> record
pub const REGISTRATION_TOKENS: Table<String, Json<RegistrationTokenRecord>> =
    Table::new(&catalog::REGISTRATION_TOKENS);
/// sid -> email validation session
pub const THREEPID_SESSIONS: Table<String, Json<ThreepidSession>> =
    Table::new(&catalog::THREEPID_SESSIONS);
/// (medium, address) -> localpart
pub const THREEPIDS: Table<(String, String), String> = Table::new(&catalog::THREEPIDS);
/// (localpart, medium, address) -> details
pub const USER_THREEPIDS: Table<(String, String, String), Json<UserThreepid>> =
    Table::new(&catalog::USER_THREEPIDS);
/// (word, localpart) -> ()
pub const USER_DIRECTORY: Table<(String, String), ()> = Table::new(&catalog::USER_DIRECTORY);
/// (ms, seq) -> audit record
pub const AUDIT_LOG: Table<(u64, u64), Json<AuditRecord>> = Table::new(&catalog::AUDIT_LOG);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MediaRecord {
    /// The uploader's localpart; empty for media the server stored itself (preview images).
    pub owner: String,
    pub created_ms: u64,
    /// Hex SHA-256 of the content; `None` while an id from `/create` awaits its upload.
    pub sha256: Option<String>,
    #[serde(default)]
    pub size: u64,
    pub content_type: Option<String>,
    pub filename: Option<String>,
    /// For ids from `/create`: when the id expires if nothing was uploaded to it.
    #[serde(default)]
    pub expires_ms: Option<u64>,
    /// Quarantined media is served to nobody (admin action).
    #[serde(default)]
    pub quarantined: bool,
    /// The admin who quarantined it.
    #[serde(default)]
    pub quarantined_by: Option<String>,
    /// Protected media is left alone by quarantines of a whole user or room.
    #[serde(default)]
    pub protected: bool,
    /// Displayed pixel size (after EXIF orientation) of images we can decode.
    #[serde(default)]
    pub dimensions: Option<(u32, u32)>,
    /// When it was last served (to within a day), for media retention; `None` until
    /// first served or looked at by the retention sweep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_access_ms: Option<u64>,
}

/// A file derived from an upload's content: a thumbnail or the downscaled rendition.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MediaVariant {
    pub sha256: String,
    pub content_type: String,
    pub width: u32,
    pub height: u32,
    pub size: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UrlPreviewRecord {
    pub fetched_ms: u64,
    pub og: serde_json::Value,
}

/// (server name, media id) -> media
pub const MEDIA: Table<(String, String), Json<MediaRecord>> = Table::new(&catalog::MEDIA);
/// (content sha256, variant name) -> derived file
pub const MEDIA_VARIANTS: Table<(String, String), Json<MediaVariant>> =
    Table::new(&catalog::MEDIA_VARIANTS);
/// (file sha256, referrer) -> ()
pub const MEDIA_BLOB_REFS: Table<(String, String), ()> = Table::new(&catalog::MEDIA_BLOB_REFS);
/// localpart -> bytes uploaded
pub const MEDIA_USAGE: Table<String, u64> = Table::new(&catalog::MEDIA_USAGE);
/// URL -> cached preview
pub const URL_PREVIEWS: Table<String, Json<UrlPreviewRecord>> = Table::new(&catalog::URL_PREVIEWS);
