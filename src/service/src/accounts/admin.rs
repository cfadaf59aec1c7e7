//! What a server admin changes on an account beyond locking and suspending it: the admin
//! and bot flags, shadow bans, rate-limit overrides, reactivation, email addresses, and
//! sessions issued for the user. Each change is one batch with its audit record.

use std::{collections::HashSet, sync::RwLock};

use trellis_core::{Error, Result, now_millis};
use trellis_store::{Batch, Direction, Json, Table, catalog};

use super::{Accounts, new_device_id, sessions};
use crate::{
    audit::Client,
    commit,
    tables::{
        ACCESS_TOKENS, DEVICES, DeviceRecord, PROFILES, RateOverride, THREEPIDS, TokenRecord,
        USER_THREEPIDS, USERS, UserRecord, UserThreepid,
    },
};

/// user localpart -> (): the shadow-banned, kept beside the flag in the user record so
/// that sends can ask memory
const SHADOW_BANS: Table<String, ()> = Table::new(&catalog::SHADOW_BANS);

/// A flag of an account that admins switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flag {
    Admin,
    Bot,
    ShadowBanned,
}

impl Flag {
    fn name(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Bot => "bot",
            Self::ShadowBanned => "shadow_ban",
        }
    }
}

impl Accounts {
    /// Changes `localpart`'s record with `change`, recording `action` by `admin`.
    async fn change_user(
        &self,
        admin: &str,
        localpart: &str,
        action: &str,
        client: &Client,
        change: impl FnOnce(&mut UserRecord, &mut Batch) -> Result<()>,
    ) -> Result<UserRecord> {
        // One admin change at a time: each reads, changes and writes the whole record.
        let _one = self.admin_changes.lock().await;
        let mut user = self.user(localpart)?.ok_or_else(|| Error::not_found("No such user"))?;
        let mut batch = Batch::new();
        change(&mut user, &mut batch)?;
        USERS.put(&mut batch, &localpart.to_owned(), &Json(user.clone()));
        let target = Some(self.user_id(localpart));
        self.audit.add(&mut batch, Some(admin), action, client, "ok", target);
        commit(&self.db, batch).await?;
        tracing::info!(user = localpart, action, "account changed by an admin");
        Ok(user)
    }

    /// Sets or clears a flag of the account. An admin cannot take their own admin flag.
    pub async fn set_flag(
        &self,
        admin: &str,
        localpart: &str,
        flag: Flag,
        on: bool,
        client: &Client,
    ) -> Result<()> {
        if flag == Flag::Admin && !on && admin == localpart {
            return Err(Error::invalid_param("You may not demote yourself"));
        }
        let action = format!("{}{}", if on { "" } else { "un" }, flag.name());
        let changed = self
            .change_user(admin, localpart, &action, client, |user, batch| {
                match flag {
                    Flag::Admin => user.admin = on,
                    Flag::ShadowBanned => {
                        user.shadow_banned = on;
                        if on {
                            SHADOW_BANS.put(batch, &localpart.to_owned(), &());
                        } else {
                            SHADOW_BANS.delete(batch, &localpart.to_owned());
                        }
                    }
                    Flag::Bot => {
                        user.bot = on;
                        // Shown in the profile so that clients can mark the account.
                        let field = (localpart.to_owned(), "org.trellis.bot".to_owned());
                        if on {
                            PROFILES.put(batch, &field, &Json(serde_json::Value::Bool(true)));
                        } else {
                            PROFILES.delete(batch, &field);
                        }
                    }
                }
                Ok(())
            })
            .await;
        if changed.is_ok() && flag == Flag::ShadowBanned {
            let mut set = self.shadow_bans().write().unwrap_or_else(|p| p.into_inner());
            if on {
                set.insert(localpart.to_owned());
            } else {
                set.remove(localpart);
            }
        }
        changed.map(|_| ())
    }

    /// Sets (or with `None` removes) the account's own message rate limit.
    pub async fn set_rate_override(
        &self,
        admin: &str,
        localpart: &str,
        limit: Option<RateOverride>,
        client: &Client,
    ) -> Result<()> {
        let action = if limit.is_some() { "rate_override" } else { "rate_override_delete" };
        self.change_user(admin, localpart, action, client, |user, _| {
            user.rate_override = limit;
            Ok(())
        })
        .await
        .map(|_| ())
    }

    /// Gives a deactivated account back its use: it is listed in the directory again and
    /// logs in with the password an admin sets next.
    pub async fn reactivate(&self, admin: &str, localpart: &str, client: &Client) -> Result<()> {
        self.change_user(admin, localpart, "reactivate", client, |user, batch| {
            if !user.deactivated {
                return Ok(());
            }
            user.deactivated = false;
            crate::accounts::directory::index_new_user(batch, localpart);
            let field = (localpart.to_owned(), "displayname".to_owned());
            PROFILES.put(batch, &field, &Json(serde_json::Value::from(localpart)));
            Ok(())
        })
        .await
        .map(|_| ())
    }

    /// Replaces the account's email addresses with `emails` (normalised), as validated
    /// now: an admin vouches for them. An address of another account is refused.
    pub async fn replace_emails(
        &self,
        admin: &str,
        localpart: &str,
        emails: &[String],
        client: &Client,
    ) -> Result<()> {
        let emails = emails
            .iter()
            .map(|e| super::threepid::normalize_email(e))
            .collect::<Result<Vec<_>>>()?;
        let _guard = self.create_lock.lock().await;
        for email in &emails {
            if self.email_owner(email)?.is_some_and(|owner| owner != localpart) {
                return Err(Error::new(
                    trellis_core::ErrorKind::BadRequest,
                    trellis_core::error::code::THREEPID_IN_USE,
                    format!("{email} is already in use by another account"),
                ));
            }
        }
        let mut batch = Batch::new();
        let now = now_millis();
        let current = self.threepids(localpart)?;
        for (medium, address, _) in &current {
            if medium != "email" || !emails.contains(address) {
                USER_THREEPIDS
                    .delete(&mut batch, &(localpart.to_owned(), medium.clone(), address.clone()));
                THREEPIDS.delete(&mut batch, &(medium.clone(), address.clone()));
            }
        }
        for email in &emails {
            if current.iter().any(|(m, a, _)| m == "email" && a == email) {
                continue;
            }
            THREEPIDS.put(&mut batch, &("email".to_owned(), email.clone()), &localpart.to_owned());
            USER_THREEPIDS.put(
                &mut batch,
                &(localpart.to_owned(), "email".to_owned(), email.clone()),
                &Json(UserThreepid { added_ms: now, validated_ms: now }),
            );
        }
        let target = Some(self.user_id(localpart));
        self.audit.add(&mut batch, Some(admin), "set_threepids", client, "ok", target);
        commit(&self.db, batch).await
    }

    /// An access token for `localpart` issued to an admin ("log in as the user"), on a new
    /// device named for it so the user can see and revoke it; it expires at
    /// `valid_until_ms` when given.
    pub async fn admin_login(
        &self,
        admin: &str,
        localpart: &str,
        valid_until_ms: Option<u64>,
        client: &Client,
    ) -> Result<String> {
        if admin == localpart {
            return Err(Error::invalid_param("Cannot use the admin API to log in as yourself"));
        }
        let user = self.user(localpart)?.ok_or_else(|| Error::not_found("No such user"))?;
        if user.deactivated {
            return Err(Error::user_deactivated());
        }
        if valid_until_ms.is_some_and(|t| t <= now_millis()) {
            return Err(Error::invalid_param("valid_until_ms is in the past"));
        }
        let device_id = new_device_id();
        let token = sessions::new_token("trl");
        let mut batch = Batch::new();
        ACCESS_TOKENS.put(
            &mut batch,
            &sessions::hash_token(&token),
            &Json(TokenRecord {
                localpart: localpart.to_owned(),
                device_id: device_id.clone(),
                expires_ms: valid_until_ms,
                supersedes_refresh: None,
            }),
        );
        DEVICES.put(
            &mut batch,
            &(localpart.to_owned(), device_id),
            &Json(DeviceRecord {
                display_name: Some(format!("Admin login by {}", self.user_id(admin))),
                created_ms: now_millis(),
                token_hash: Some(sessions::hash_token(&token)),
                refresh_hash: None,
                last_seen_ms: None,
                last_seen_ip: None,
                last_seen_user_agent: None,
            }),
        );
        let target = Some(self.user_id(localpart));
        self.audit.add(&mut batch, Some(admin), "login_as_user", client, "ok", target);
        self.commit_device_change(batch, localpart).await?;
        Ok(token)
    }

    /// Whether the account is shadow-banned (what it sends goes nowhere): asked on every
    /// send, so answered from memory.
    pub fn shadow_banned(&self, localpart: &str) -> Result<bool> {
        let set = self.shadow_bans().read().unwrap_or_else(|p| p.into_inner());
        Ok(!set.is_empty() && set.contains(localpart))
    }

    fn shadow_bans(&self) -> &RwLock<HashSet<String>> {
        self.shadow_bans.get_or_init(|| {
            let mut set = HashSet::new();
            match SHADOW_BANS.scan_prefix(&*self.db, &(), Direction::Forward) {
                Ok(rows) => set.extend(rows.filter_map(|r| r.ok().map(|(lp, ())| lp))),
                Err(e) => tracing::error!(error = %e, "reading the shadow bans"),
            }
            RwLock::new(set)
        })
    }
}
