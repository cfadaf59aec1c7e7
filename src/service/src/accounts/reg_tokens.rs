//! Registration tokens (`m.login.registration_token`): made by admins, each good for a
//! number of registrations until an expiry time.

use serde::Serialize;
use trellis_core::{Error, ErrorKind, Result, error::code, now_millis};
use trellis_store::{Batch, Direction, Json};

use super::Accounts;
use crate::{
    commit, random,
    tables::{REGISTRATION_TOKENS, RegistrationTokenRecord},
};

/// A token as the admin API shows it (the same shape Synapse's admin API uses, so its
/// tooling works).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RegistrationToken {
    pub token: String,
    pub uses_allowed: Option<u32>,
    /// Always 0: a token is only counted when a registration completes.
    pub pending: u32,
    pub completed: u32,
    pub expiry_time: Option<u64>,
}

impl RegistrationToken {
    fn from_record(token: String, r: RegistrationTokenRecord) -> Self {
        Self {
            token,
            uses_allowed: r.uses_allowed,
            pending: 0,
            completed: r.completed,
            expiry_time: r.expiry_time,
        }
    }
}

fn usable(r: &RegistrationTokenRecord) -> bool {
    r.expiry_time.is_none_or(|t| t > now_millis()) && r.uses_allowed.is_none_or(|n| r.completed < n)
}

fn invalid_param(msg: impl Into<std::borrow::Cow<'static, str>>) -> Error {
    Error::new(ErrorKind::BadRequest, code::INVALID_PARAM, msg)
}

const MAX_TOKEN_LEN: usize = 64;

impl Accounts {
    pub fn registration_token_valid(&self, token: &str) -> Result<bool> {
        if token.is_empty() || token.len() > MAX_TOKEN_LEN {
            return Ok(false);
        }
        Ok(REGISTRATION_TOKENS.get(&*self.db, &token.to_owned())?.is_some_and(|Json(r)| usable(&r)))
    }

    /// All tokens, or only the usable (`Some(true)`) or used-up (`Some(false)`) ones.
    pub fn registration_tokens(&self, valid: Option<bool>) -> Result<Vec<RegistrationToken>> {
        let mut out = Vec::new();
        for entry in REGISTRATION_TOKENS.scan_range(
            &*self.db,
            std::ops::Bound::Unbounded,
            std::ops::Bound::Unbounded,
            Direction::Forward,
        )? {
            let (token, Json(r)) = entry?;
            if valid.is_none_or(|v| v == usable(&r)) {
                out.push(RegistrationToken::from_record(token, r));
            }
        }
        Ok(out)
    }

    pub fn registration_token(&self, token: &str) -> Result<RegistrationToken> {
        let Json(r) = REGISTRATION_TOKENS
            .get(&*self.db, &token.to_owned())?
            .ok_or_else(|| Error::not_found("No such registration token"))?;
        Ok(RegistrationToken::from_record(token.to_owned(), r))
    }

    pub async fn create_registration_token(
        &self,
        token: Option<String>,
        length: Option<u32>,
        uses_allowed: Option<u32>,
        expiry_time: Option<u64>,
    ) -> Result<RegistrationToken> {
        let token = match token {
            Some(t) => {
                let ok_chars = t.bytes().all(|b| b.is_ascii_alphanumeric() || b"._~-".contains(&b));
                if t.is_empty() || t.len() > MAX_TOKEN_LEN || !ok_chars {
                    return Err(invalid_param("token must be 1-64 characters of [A-Za-z0-9._~-]"));
                }
                t
            }
            None => {
                let length = length.unwrap_or(16) as usize;
                if !(1..=MAX_TOKEN_LEN).contains(&length) {
                    return Err(invalid_param("length must be between 1 and 64"));
                }
                random::alphanumeric(length)
            }
        };
        if expiry_time.is_some_and(|t| t <= now_millis()) {
            return Err(invalid_param("expiry_time must be in the future"));
        }
        let _guard = self.create_lock.lock().await;
        if REGISTRATION_TOKENS.contains(&*self.db, &token)? {
            return Err(invalid_param("This registration token already exists"));
        }
        let record = RegistrationTokenRecord { uses_allowed, completed: 0, expiry_time };
        let mut batch = Batch::new();
        REGISTRATION_TOKENS.put(&mut batch, &token, &Json(record.clone()));
        commit(&self.db, batch).await?;
        Ok(RegistrationToken::from_record(token, record))
    }

    /// Changes limits; `Some(None)` removes a limit, `None` leaves it.
    pub async fn update_registration_token(
        &self,
        token: &str,
        uses_allowed: Option<Option<u32>>,
        expiry_time: Option<Option<u64>>,
    ) -> Result<RegistrationToken> {
        let _guard = self.create_lock.lock().await;
        let key = token.to_owned();
        let Json(mut r) = REGISTRATION_TOKENS
            .get(&*self.db, &key)?
            .ok_or_else(|| Error::not_found("No such registration token"))?;
        if let Some(u) = uses_allowed {
            r.uses_allowed = u;
        }
        if let Some(e) = expiry_time {
            r.expiry_time = e;
        }
        let mut batch = Batch::new();
        REGISTRATION_TOKENS.put(&mut batch, &key, &Json(r.clone()));
        commit(&self.db, batch).await?;
        Ok(RegistrationToken::from_record(key, r))
    }

    pub async fn delete_registration_token(&self, token: &str) -> Result<()> {
        let _guard = self.create_lock.lock().await;
        let key = token.to_owned();
        if !REGISTRATION_TOKENS.contains(&*self.db, &key)? {
            return Err(Error::not_found("No such registration token"));
        }
        let mut batch = Batch::new();
        REGISTRATION_TOKENS.delete(&mut batch, &key);
        commit(&self.db, batch).await
    }

    /// Counts one completed registration against `token`, in the registration's batch.
    /// Call with `create_lock` held so concurrent registrations cannot overspend it.
    pub(super) fn spend_registration_token(&self, batch: &mut Batch, token: &str) -> Result<()> {
        let key = token.to_owned();
        let Some(Json(mut r)) = REGISTRATION_TOKENS.get(&*self.db, &key)? else {
            return Err(Error::forbidden("Invalid registration token"));
        };
        if !usable(&r) {
            return Err(Error::forbidden(
                "This registration token has been used up or has expired",
            ));
        }
        r.completed = r.completed.saturating_add(1);
        REGISTRATION_TOKENS.put(batch, &key, &Json(r));
        Ok(())
    }
}
