//! Accounts: registration (with user-interactive auth), access tokens, devices.

use http::StatusCode;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;
use trellis_core::{
    Error, Result,
    config::{RegistrationConfig, RegistrationMode},
    error::code,
    now_millis,
};
use trellis_store::{Batch, Db, Json};

use crate::{
    random,
    tables::{
        ACCESS_TOKENS, DEVICES, DeviceRecord, TokenRecord, UIA_SESSIONS, USERS, UiaSession,
        UserRecord,
    },
};

/// The user interactive auth stage of open registration.
pub const DUMMY_STAGE: &str = "m.login.dummy";

pub struct Accounts {
    db: Db,
    server_name: String,
    config: RegistrationConfig,
    /// Serialises the check-then-create of a user id; registrations are rare enough that
    /// one lock costs nothing and it rules out two accounts racing for one name.
    create_lock: Mutex<()>,
}

/// Who a valid access token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub localpart: String,
    pub device_id: String,
}

#[derive(Debug, Clone, Default)]
pub struct RegisterRequest {
    pub username: Option<String>,
    pub password: Option<String>,
    pub device_id: Option<String>,
    pub initial_device_display_name: Option<String>,
    pub inhibit_login: bool,
    /// `auth.type` and `auth.session`, if the client sent an auth dict.
    pub auth_type: Option<String>,
    pub auth_session: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Registered {
    pub localpart: String,
    /// `None` with `inhibit_login`.
    pub login: Option<(String, String)>,
}

impl Accounts {
    pub fn new(db: Db, server_name: String, config: RegistrationConfig) -> Self {
        Self { db, server_name, config, create_lock: Mutex::new(()) }
    }

    pub fn user_id(&self, localpart: &str) -> String {
        format!("@{localpart}:{}", self.server_name)
    }

    /// Validates a requested username (a bare localpart or a full user id on this
    /// server) and returns the localpart.
    pub fn parse_username(&self, username: &str) -> Result<String> {
        let localpart = match username.strip_prefix('@') {
            Some(rest) => match rest.split_once(':') {
                Some((lp, server)) if server == self.server_name => lp,
                _ => {
                    return Err(Error::new(
                        StatusCode::BAD_REQUEST,
                        code::INVALID_USERNAME,
                        "User ID must be on this server",
                    ));
                }
            },
            None => username,
        };
        let localpart = localpart.to_lowercase();
        let valid_chars = localpart
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._=-/+".contains(&b));
        if localpart.is_empty() || !valid_chars {
            return Err(Error::new(
                StatusCode::BAD_REQUEST,
                code::INVALID_USERNAME,
                "Usernames may contain only a-z, 0-9, '.', '_', '=', '-', '/' and '+'",
            ));
        }
        if self.user_id(&localpart).len() > 255 {
            return Err(Error::new(
                StatusCode::BAD_REQUEST,
                code::INVALID_USERNAME,
                "Username is too long",
            ));
        }
        Ok(localpart)
    }

    pub fn check_available(&self, username: &str) -> Result<()> {
        let localpart = self.parse_username(username)?;
        if USERS.contains(&*self.db, &localpart)? {
            return Err(Error::new(
                StatusCode::BAD_REQUEST,
                code::USER_IN_USE,
                "User ID already taken",
            ));
        }
        Ok(())
    }

    pub async fn register(&self, req: RegisterRequest) -> Result<Registered> {
        if self.config.mode == RegistrationMode::Closed {
            return Err(Error::forbidden("Registration is disabled on this server"));
        }
        // Cheap checks before any user-interactive auth round trip, as clients expect.
        let localpart = match &req.username {
            Some(u) => {
                let lp = self.parse_username(u)?;
                self.check_available(&lp)?;
                Some(lp)
            }
            None => None,
        };
        if let Some(pw) = &req.password
            && pw.chars().count() < self.config.password_min_length
        {
            return Err(Error::new(
                StatusCode::BAD_REQUEST,
                code::WEAK_PASSWORD,
                format!("Password must be at least {} characters", self.config.password_min_length),
            ));
        }
        self.complete_uia(&req).await?;

        let password_hash = match req.password.clone() {
            Some(pw) => Some(self.hash_password(pw).await?),
            None => None,
        };

        let _guard = self.create_lock.lock().await;
        let localpart = match localpart {
            Some(lp) => {
                self.check_available(&lp)?;
                lp
            }
            None => self.fresh_localpart()?,
        };
        let now = now_millis();
        let mut batch = Batch::new();
        USERS.put(
            &mut batch,
            &localpart,
            &Json(UserRecord { password_hash, created_ms: now, deactivated: false, admin: false }),
        );
        let login = if req.inhibit_login {
            None
        } else {
            let device_id = req.device_id.clone().unwrap_or_else(new_device_id);
            let token = self.issue_device_token(
                &mut batch,
                &localpart,
                &device_id,
                req.initial_device_display_name.clone(),
            )?;
            Some((device_id, token))
        };
        if let Some(session) = &req.auth_session {
            UIA_SESSIONS.delete(&mut batch, session);
        }
        self.commit(batch).await?;
        tracing::info!(user = %self.user_id(&localpart), "registered");
        Ok(Registered { localpart, login })
    }

    /// Resolves an access token to its session.
    pub fn authenticate(&self, token: &str) -> Result<Session> {
        let record =
            ACCESS_TOKENS.get(&*self.db, &hash_token(token))?.ok_or_else(Error::unknown_token)?;
        let record = record.0;
        if record.expires_ms.is_some_and(|exp| exp <= now_millis()) {
            return Err(Error::unknown_token());
        }
        Ok(Session { localpart: record.localpart, device_id: record.device_id })
    }

    /// Writes a device and a fresh access token for it into `batch`, revoking the
    /// device's previous token.
    fn issue_device_token(
        &self,
        batch: &mut Batch,
        localpart: &str,
        device_id: &str,
        display_name: Option<String>,
    ) -> Result<String> {
        let key = (localpart.to_owned(), device_id.to_owned());
        let existing = DEVICES.get(&*self.db, &key)?.map(|j| j.0);
        if let Some(old) = existing.as_ref().and_then(|d| d.token_hash.clone()) {
            ACCESS_TOKENS.delete(batch, &old);
        }
        let token = format!("trl_{}", random::alphanumeric(40));
        let token_hash = hash_token(&token);
        ACCESS_TOKENS.put(
            batch,
            &token_hash,
            &Json(TokenRecord {
                localpart: localpart.to_owned(),
                device_id: device_id.to_owned(),
                expires_ms: None,
            }),
        );
        let record = DeviceRecord {
            display_name: display_name
                .or_else(|| existing.as_ref().and_then(|d| d.display_name.clone())),
            created_ms: existing.as_ref().map_or_else(now_millis, |d| d.created_ms),
            token_hash: Some(token_hash),
        };
        DEVICES.put(batch, &key, &Json(record));
        Ok(token)
    }

    /// Open registration has one stage, `m.login.dummy`. A request without it starts (or
    /// continues) a session and gets the 401 that tells the client what to do.
    async fn complete_uia(&self, req: &RegisterRequest) -> Result<()> {
        let ttl_ms = self.config.uia_session_ttl_seconds.saturating_mul(1000);
        if let Some(session) = &req.auth_session {
            let found = UIA_SESSIONS.get(&*self.db, session)?.map(|j| j.0);
            match found {
                Some(s) if now_millis().saturating_sub(s.created_ms) <= ttl_ms => {}
                _ => {
                    return Err(Error::new(
                        StatusCode::BAD_REQUEST,
                        code::UNKNOWN,
                        "Unknown or expired user-interactive auth session",
                    ));
                }
            }
        }
        match req.auth_type.as_deref() {
            Some(DUMMY_STAGE) => Ok(()),
            Some(other) => Err(self
                .uia_challenge(req.auth_session.clone())
                .await?
                .with_errcode(code::UNRECOGNIZED, format!("Unsupported auth stage {other}"))),
            None => Err(self.uia_challenge(req.auth_session.clone()).await?),
        }
    }

    async fn uia_challenge(&self, session: Option<String>) -> Result<Error> {
        let session = match session {
            Some(s) => s,
            None => {
                let id = random::alphanumeric(24);
                let mut batch = Batch::new();
                UIA_SESSIONS.put(
                    &mut batch,
                    &id,
                    &Json(UiaSession { created_ms: now_millis(), completed: Vec::new() }),
                );
                self.commit(batch).await?;
                id
            }
        };
        Ok(Error::new(StatusCode::UNAUTHORIZED, "", "")
            .with_field("flows", json!([{ "stages": [DUMMY_STAGE] }]))
            .with_field("params", json!({}))
            .with_field("session", session))
    }

    fn fresh_localpart(&self) -> Result<String> {
        loop {
            let candidate = random::alphanumeric(12).to_lowercase();
            if !USERS.contains(&*self.db, &candidate)? {
                return Ok(candidate);
            }
        }
    }

    async fn hash_password(&self, password: String) -> Result<String> {
        let (m, t) = (self.config.argon2_memory_kib, self.config.argon2_iterations);
        // argon2 is deliberately slow; keep it off the async workers.
        tokio::task::spawn_blocking(move || crate::password::hash(&password, m, t))
            .await
            .map_err(|e| Error::internal("password hashing task", e))?
    }

    /// Writes a batch off the async workers: with `sync_writes` it waits for an fsync.
    async fn commit(&self, batch: Batch) -> Result<()> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.write(batch))
            .await
            .map_err(|e| Error::internal("storage task", e))?
            .map_err(Into::into)
    }
}

fn new_device_id() -> String {
    random::alphanumeric(10).to_uppercase()
}

/// Tokens are stored only as SHA-256 hashes: a leaked database grants no sessions.
pub fn hash_token(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

trait WithErrcode {
    fn with_errcode(self, errcode: &'static str, message: String) -> Self;
}

impl WithErrcode for Error {
    fn with_errcode(mut self, errcode: &'static str, message: String) -> Self {
        self.errcode = errcode;
        self.message = message.into();
        self
    }
}
