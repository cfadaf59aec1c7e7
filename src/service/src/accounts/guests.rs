//! Guest accounts (the spec's guest access module): made without credentials, limited to
//! the endpoints the spec allows guests (checked at the API edge from
//! `Session::guest`) and to rooms that admit guests, and upgraded in place to a full
//! account by a registration that carries the guest's access token.

use trellis_core::{Error, ErrorKind, Result, error::code, now_millis};
use trellis_store::{Batch, Json};

use super::{Accounts, Registered, new_device_id};
use crate::{
    audit::Client,
    commit, random,
    tables::{ACCESS_TOKENS, PROFILES, USERS, UserRecord},
};

impl Accounts {
    /// `POST /register?kind=guest`: a new guest account, signed in on a new device.
    pub async fn register_guest(
        &self,
        initial_device_display_name: Option<String>,
        client: &Client,
    ) -> Result<Registered> {
        // A server closed to registration is closed to guests too.
        if !self.registration.guest_access
            || self.registration.mode == trellis_core::config::RegistrationMode::Closed
        {
            return Err(Error::forbidden("Guest access is disabled on this server"));
        }
        let _guard = self.create_lock.lock().await;
        let localpart = self.fresh_guest_localpart()?;
        let mut batch = Batch::new();
        let record = UserRecord {
            password_hash: None,
            created_ms: now_millis(),
            deactivated: false,
            admin: false,
            locked: false,
            suspended: false,
            guest: true,
            bot: false,
            shadow_banned: false,
            rate_override: None,
        };
        USERS.put(&mut batch, &localpart, &Json(record));
        let device_id = new_device_id();
        let issued = self.issue_tokens(
            &mut batch,
            &localpart,
            &device_id,
            initial_device_display_name,
            false,
            client,
        )?;
        self.audit.add(&mut batch, Some(&localpart), "register_guest", client, "ok", None);
        commit(&self.db, batch).await?;
        tracing::info!(user = %self.user_id(&localpart), "guest registered");
        Ok(Registered { localpart, login: Some(issued) })
    }

    /// Whether `localpart` is a guest account.
    pub fn is_guest(&self, localpart: &str) -> Result<bool> {
        Ok(self.user(localpart)?.is_some_and(|u| u.guest))
    }

    /// The guest account a registration carrying `token` upgrades; the spec has the
    /// client repeat the guest's localpart as `username`, which must then match.
    pub(super) async fn guest_to_upgrade(
        &self,
        token: &str,
        username: Option<&str>,
    ) -> Result<String> {
        let hash = super::sessions::hash_token(token);
        let record = ACCESS_TOKENS.get(&*self.db, &hash)?.ok_or_else(Error::unknown_token)?.0;
        let user = self.user(&record.localpart)?.ok_or_else(Error::unknown_token)?;
        if !user.guest || user.deactivated {
            return Err(Error::forbidden("The access token is not a guest's"));
        }
        if let Some(name) = username
            && self.parse_username(name)? != record.localpart
        {
            return Err(Error::new(
                ErrorKind::BadRequest,
                code::INVALID_USERNAME,
                "An upgraded guest keeps their username",
            ));
        }
        Ok(record.localpart)
    }

    /// Makes guest `localpart` a full account with `password_hash`, keeping its devices,
    /// rooms and data.
    pub(super) fn upgrade_guest_into(
        &self,
        batch: &mut Batch,
        localpart: &str,
        password_hash: Option<String>,
    ) -> Result<()> {
        let mut user = self.user(localpart)?.ok_or_else(|| Error::not_found("No such guest"))?;
        if !user.guest {
            return Err(Error::new(ErrorKind::BadRequest, code::USER_IN_USE, "Already upgraded"));
        }
        user.guest = false;
        user.password_hash = password_hash;
        USERS.put(batch, &localpart.to_owned(), &Json(user));
        let displayname = (localpart.to_owned(), "displayname".to_owned());
        let name = PROFILES.get(&*self.db, &displayname)?.map(|j| j.0);
        let name = name.as_ref().and_then(serde_json::Value::as_str);
        crate::accounts::directory::index_new_user(batch, localpart);
        crate::accounts::directory::rename(batch, localpart, None, name);
        if name.is_none() {
            PROFILES.put(batch, &displayname, &Json(serde_json::Value::from(localpart)));
        }
        Ok(())
    }

    fn fresh_guest_localpart(&self) -> Result<String> {
        loop {
            // All digits, a form registration refuses, so a guest id never collides with
            // a chosen or generated name.
            let n = u64::from_le_bytes(random::bytes::<8>()) % 10_000_000_000;
            let candidate = format!("{n:010}");
            if !USERS.contains(&*self.db, &candidate)? {
                return Ok(candidate);
            }
        }
    }
}
