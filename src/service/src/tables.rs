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
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeviceRecord {
    pub display_name: Option<String>,
    pub created_ms: u64,
    /// sha256 of the device's current access token, so deleting the device can revoke it.
    pub token_hash: Option<Vec<u8>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TokenRecord {
    pub localpart: String,
    pub device_id: String,
    /// Milliseconds since epoch after which the token is refused; `None` never expires.
    pub expires_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UiaSession {
    pub created_ms: u64,
    /// Stage types completed so far.
    pub completed: Vec<String>,
}

/// user localpart -> account
pub const USERS: Table<String, Json<UserRecord>> = Table::new(&catalog::USERS);
/// (localpart, device id) -> device
pub const DEVICES: Table<(String, String), Json<DeviceRecord>> = Table::new(&catalog::DEVICES);
/// sha256(token) -> owner
pub const ACCESS_TOKENS: Table<Vec<u8>, Json<TokenRecord>> = Table::new(&catalog::ACCESS_TOKENS);
/// session id -> UIA progress
pub const UIA_SESSIONS: Table<String, Json<UiaSession>> = Table::new(&catalog::UIA_SESSIONS);
