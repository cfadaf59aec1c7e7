//! Account locking and suspension (spec v1.18 `/_matrix/client/v1/admin/{lock,suspend}`):
//! reversible, unlike deactivation. A locked account's tokens stay but answer 401
//! `M_USER_LOCKED` (except to log out); a suspended account reads but cannot join, invite,
//! send or change its profile (403 `M_USER_SUSPENDED`, enforced where requests enter).

use trellis_core::{Error, Result};
use trellis_store::{Batch, Json};

use super::Accounts;
use crate::{audit::Client, tables::USERS};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restriction {
    Lock,
    Suspend,
}

impl Restriction {
    fn name(self) -> &'static str {
        match self {
            Self::Lock => "lock",
            Self::Suspend => "suspend",
        }
    }
}

impl Accounts {
    /// The target's localpart, once the requester is an admin and the target a live
    /// account of this server.
    fn moderation_target<'a>(&self, requester: &str, target: &'a str) -> Result<&'a str> {
        if !self.user(requester)?.is_some_and(|u| u.admin) {
            return Err(Error::forbidden("Only server administrators may do this"));
        }
        let localpart = self
            .local_part(target)
            .ok_or_else(|| Error::invalid_param("The user does not belong to this server"))?;
        match self.user(localpart)? {
            Some(user) if !user.deactivated => Ok(localpart),
            _ => Err(Error::not_found("No such user")),
        }
    }

    /// Whether `target` is locked or suspended, for an admin asking.
    pub fn restricted(&self, requester: &str, target: &str, what: Restriction) -> Result<bool> {
        let localpart = self.moderation_target(requester, target)?;
        let user = self.user(localpart)?.ok_or_else(|| Error::not_found("No such user"))?;
        Ok(match what {
            Restriction::Lock => user.locked,
            Restriction::Suspend => user.suspended,
        })
    }

    /// Locks or suspends `target` (or lifts it); other admins are out of reach.
    pub async fn restrict(
        &self,
        requester: &str,
        target: &str,
        what: Restriction,
        on: bool,
        client: &Client,
    ) -> Result<bool> {
        let localpart = self.moderation_target(requester, target)?;
        let mut user = self.user(localpart)?.ok_or_else(|| Error::not_found("No such user"))?;
        if user.admin && localpart != requester {
            return Err(Error::forbidden("Another administrator cannot be locked or suspended"));
        }
        match what {
            Restriction::Lock => user.locked = on,
            Restriction::Suspend => user.suspended = on,
        }
        let mut batch = Batch::new();
        USERS.put(&mut batch, &localpart.to_owned(), &Json(user));
        let action = format!("{}{}", if on { "" } else { "un" }, what.name());
        self.audit.add(&mut batch, Some(requester), &action, client, "ok", Some(target.to_owned()));
        crate::commit(&self.db, batch).await?;
        tracing::info!(user = localpart, action, "account moderation");
        Ok(on)
    }
}
