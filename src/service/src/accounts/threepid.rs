//! Email addresses as third-party identifiers: validation sessions (a 6-digit code or a
//! link, mailed by us), binding addresses to accounts, and lookups for password resets.

use subtle_eq::constant_time_eq;
use trellis_core::{Error, ErrorKind, Result, error::code, now_millis};
use trellis_store::{Batch, Direction, Json};

use super::{Accounts, sessions::hash_token};
use crate::{
    commit, random,
    tables::{THREEPID_SESSIONS, THREEPIDS, ThreepidSession, USER_THREEPIDS, UserThreepid},
};

pub const EMAIL: &str = "email";
/// Wrong codes tolerated per session before it is void (a 6-digit code must not be
/// guessable by trying).
const MAX_CODE_ATTEMPTS: u32 = 5;
/// How long a validated session can still be used to finish the action.
const VALIDATED_TTL_MS: u64 = 24 * 3600 * 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Register,
    Add,
    Password,
}

impl Purpose {
    fn as_str(self) -> &'static str {
        match self {
            Purpose::Register => "register",
            Purpose::Add => "add",
            Purpose::Password => "password",
        }
    }
}

/// What a mail must contain, for the caller to send.
pub struct Validation {
    pub sid: String,
    /// `None` when this was a retry of an earlier request and nothing new must be sent.
    pub mail: Option<(String, String)>,
}

mod subtle_eq {
    /// Compares two hashes without an early exit.
    pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

fn auth_failed(msg: &'static str) -> Error {
    Error::new(ErrorKind::BadRequest, code::THREEPID_AUTH_FAILED, msg)
}

/// Lowercases and checks the shape of an address (the SMTP layer checks it again).
pub fn normalize_email(email: &str) -> Result<String> {
    let email = email.trim().to_lowercase();
    let valid = email.len() <= 254
        && email.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty()
                && domain.contains('.')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
        })
        && !email.chars().any(|c| c.is_whitespace() || c.is_control());
    if valid { Ok(email) } else { Err(Error::invalid_param("Invalid email address")) }
}

impl Accounts {
    /// The owner of an email address, if any.
    pub fn email_owner(&self, email: &str) -> Result<Option<String>> {
        Ok(THREEPIDS.get(&*self.db, &(EMAIL.to_owned(), email.to_owned()))?)
    }

    /// Starts (or, for a retry with the same `send_attempt`, repeats) the validation of
    /// `email`; returns the session id and the mail to send.
    pub async fn start_email_validation(
        &self,
        purpose: Purpose,
        email: &str,
        client_secret: &str,
        send_attempt: u64,
        next_link: Option<String>,
        link_base: &str,
    ) -> Result<Validation> {
        let email = normalize_email(email)?;
        let owner = self.email_owner(&email)?;
        match purpose {
            Purpose::Register | Purpose::Add if owner.is_some() => {
                return Err(Error::new(
                    ErrorKind::BadRequest,
                    code::THREEPID_IN_USE,
                    "This email address is already in use",
                ));
            }
            Purpose::Password if owner.is_none() => {
                return Err(Error::new(
                    ErrorKind::BadRequest,
                    code::THREEPID_NOT_FOUND,
                    "No account has this email address",
                ));
            }
            _ => {}
        }
        // The session id is derived from what identifies the request, so a client that
        // repeats it (same secret, address and attempt) gets the same session, unsent.
        let sid =
            hex(&hash_token(&format!("{client_secret}\u{0}{email}\u{0}{}", purpose.as_str())))
                [..32]
                .to_owned();
        let existing = THREEPID_SESSIONS.get(&*self.db, &sid)?.map(|j| j.0);
        if let Some(s) = &existing
            && send_attempt <= s.send_attempt
            && s.expires_ms > now_millis()
        {
            return Ok(Validation { sid, mail: None });
        }
        let code = format!("{:06}", u32::from_be_bytes(random::bytes::<4>()) % 1_000_000);
        let link_token = random::alphanumeric(32);
        let now = now_millis();
        let session = ThreepidSession {
            client_secret: client_secret.to_owned(),
            email: email.clone(),
            purpose: purpose.as_str().to_owned(),
            send_attempt,
            created_ms: now,
            expires_ms: now.saturating_add(self.email_code_lifetime_ms),
            code_hash: Some(hash_token(&code)),
            link_hash: Some(hash_token(&link_token)),
            failed_attempts: 0,
            validated_ms: None,
            next_link,
        };
        let mut batch = Batch::new();
        THREEPID_SESSIONS.put(&mut batch, &sid, &Json(session));
        commit(&self.db, batch).await?;

        let link = format!(
            "{link_base}/_trellis/client/v1/email/validate?sid={sid}&client_secret={}&token={link_token}",
            urlencode(client_secret)
        );
        let minutes = self.email_code_lifetime_ms / 60_000;
        let what = match purpose {
            Purpose::Register => "to finish creating your account",
            Purpose::Add => "to add this address to your account",
            Purpose::Password => "to reset your password",
        };
        let body = format!(
            "Your code {what} on {server} is:\r\n\r\n    {code}\r\n\r\nor open this link:\r\n\r\n{link}\r\n\r\n\
             The code is valid for {minutes} minutes and can be used once. If you did not ask \
             for it, ignore this mail.\r\n",
            server = self.server_name,
        );
        let subject = format!("Your verification code for {}", self.server_name);
        Ok(Validation { sid, mail: Some((subject, body)) })
    }

    /// Checks a code (or link token) for a session; on success the session is validated
    /// and the code is spent. Returns the session's `next_link`.
    pub async fn submit_email_token(
        &self,
        sid: &str,
        client_secret: &str,
        token: &str,
    ) -> Result<Option<String>> {
        let key = sid.to_owned();
        let Json(mut s) = THREEPID_SESSIONS
            .get(&*self.db, &key)?
            .ok_or_else(|| auth_failed("Unknown validation session"))?;
        if !constant_time_eq(s.client_secret.as_bytes(), client_secret.as_bytes()) {
            return Err(auth_failed("Unknown validation session"));
        }
        if s.validated_ms.is_some() {
            return Err(auth_failed("This code has already been used"));
        }
        if s.expires_ms <= now_millis() || s.failed_attempts >= MAX_CODE_ATTEMPTS {
            return Err(auth_failed("This code has expired; request a new one"));
        }
        let given = hash_token(token.trim());
        let matches =
            |h: &Option<Vec<u8>>| h.as_deref().is_some_and(|h| constant_time_eq(h, &given));
        let ok = matches(&s.code_hash) || matches(&s.link_hash);
        let mut batch = Batch::new();
        if ok {
            s.validated_ms = Some(now_millis());
            s.code_hash = None;
            s.link_hash = None;
        } else {
            s.failed_attempts += 1;
        }
        let next_link = s.next_link.clone();
        THREEPID_SESSIONS.put(&mut batch, &key, &Json(s));
        commit(&self.db, batch).await?;
        if ok { Ok(next_link) } else { Err(auth_failed("Wrong code")) }
    }

    /// The address a validated session proved, for `purpose`.
    pub fn validated_email(
        &self,
        sid: &str,
        client_secret: &str,
        purpose: Purpose,
    ) -> Result<String> {
        let not_validated = || {
            Error::new(
                ErrorKind::Unauthenticated,
                code::THREEPID_AUTH_FAILED,
                "The email address has not been validated",
            )
        };
        let Json(s) =
            THREEPID_SESSIONS.get(&*self.db, &sid.to_owned())?.ok_or_else(not_validated)?;
        let fresh =
            s.validated_ms.is_some_and(|t| now_millis().saturating_sub(t) < VALIDATED_TTL_MS);
        if !fresh
            || s.purpose != purpose.as_str()
            || !constant_time_eq(s.client_secret.as_bytes(), client_secret.as_bytes())
        {
            return Err(not_validated());
        }
        Ok(s.email)
    }

    /// Binds a validated address to an account (in `batch`) and spends the session.
    pub(super) fn bind_email_into(
        &self,
        batch: &mut Batch,
        localpart: &str,
        email: &str,
        sid: &str,
    ) -> Result<()> {
        if let Some(owner) = self.email_owner(email)?
            && owner != localpart
        {
            return Err(Error::new(
                ErrorKind::BadRequest,
                code::THREEPID_IN_USE,
                "This email address is already in use",
            ));
        }
        let now = now_millis();
        THREEPIDS.put(batch, &(EMAIL.to_owned(), email.to_owned()), &localpart.to_owned());
        USER_THREEPIDS.put(
            batch,
            &(localpart.to_owned(), EMAIL.to_owned(), email.to_owned()),
            &Json(UserThreepid { added_ms: now, validated_ms: now }),
        );
        THREEPID_SESSIONS.delete(batch, &sid.to_owned());
        Ok(())
    }

    pub async fn add_email(&self, localpart: &str, sid: &str, client_secret: &str) -> Result<()> {
        let email = self.validated_email(sid, client_secret, Purpose::Add)?;
        let _guard = self.create_lock.lock().await;
        let mut batch = Batch::new();
        self.bind_email_into(&mut batch, localpart, &email, sid)?;
        commit(&self.db, batch).await
    }

    /// The user's addresses: (medium, address, added, validated).
    pub fn threepids(&self, localpart: &str) -> Result<Vec<(String, String, UserThreepid)>> {
        USER_THREEPIDS
            .scan_prefix(&*self.db, &localpart.to_owned(), Direction::Forward)?
            .map(|e| {
                e.map(|((_, medium, address), Json(t))| (medium, address, t)).map_err(Into::into)
            })
            .collect()
    }

    pub async fn delete_threepid(
        &self,
        localpart: &str,
        medium: &str,
        address: &str,
    ) -> Result<()> {
        let address = address.trim().to_lowercase();
        let key = (localpart.to_owned(), medium.to_owned(), address.clone());
        if !USER_THREEPIDS.contains(&*self.db, &key)? {
            return Err(Error::not_found("This address is not on your account"));
        }
        let mut batch = Batch::new();
        USER_THREEPIDS.delete(&mut batch, &key);
        THREEPIDS.delete(&mut batch, &(medium.to_owned(), address));
        commit(&self.db, batch).await
    }

    /// Adds the removal of all of a user's addresses to `batch` (deactivation).
    pub(super) fn unbind_all_into(&self, batch: &mut Batch, localpart: &str) -> Result<()> {
        for (medium, address, _) in self.threepids(localpart)? {
            USER_THREEPIDS.delete(batch, &(localpart.to_owned(), medium.clone(), address.clone()));
            THREEPIDS.delete(batch, &(medium, address));
        }
        Ok(())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Accounts {
    /// Password reset through a validated address (`POST /account/password` without an
    /// access token): the address names the account.
    pub async fn reset_password_by_email(
        &self,
        email: &str,
        sid: &str,
        new_password: String,
        logout_devices: bool,
        client: &crate::Client,
    ) -> Result<String> {
        let localpart = self.email_owner(email)?.ok_or_else(|| {
            Error::new(
                ErrorKind::BadRequest,
                code::THREEPID_NOT_FOUND,
                "No account has this email address",
            )
        })?;
        self.set_password(&localpart, new_password, logout_devices, None, client).await?;
        // The validation is spent: it cannot reset the password a second time.
        let mut batch = Batch::new();
        THREEPID_SESSIONS.delete(&mut batch, &sid.to_owned());
        commit(&self.db, batch).await?;
        Ok(localpart)
    }
}
