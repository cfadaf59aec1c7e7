//! Access, refresh and login tokens. Every token is random and stored only as its
//! SHA-256 hash, so a leaked database grants no sessions.

use std::collections::HashMap;

use sha2::{Digest, Sha256};
use trellis_core::{Error, Result, now_millis};
use trellis_store::{Batch, Json};

use super::Accounts;
use crate::{
    audit::Client,
    commit, random,
    tables::{
        ACCESS_TOKENS, DEVICES, DeviceRecord, LOGIN_TOKENS, LoginTokenRecord, OPENID_TOKENS,
        REFRESH_TOKENS, RateOverride, RefreshRecord, TokenRecord, USERS, UserRecord,
    },
};

/// Who a valid access token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub localpart: String,
    pub device_id: String,
    /// A guest account: only the endpoints the spec allows guests.
    pub guest: bool,
    /// Set when an application service acts as the user (its id).
    pub appservice: Option<String>,
    /// The account is a bot.
    pub bot: bool,
    /// The account is suspended: it reads but does not write (see `moderation`).
    pub suspended: bool,
    /// The account is shadow-banned: what it sends is dropped while it is told otherwise.
    pub shadow_banned: bool,
    /// An admin's override of the account's message rate limit.
    pub rate_override: Option<RateOverride>,
}

impl Session {
    /// The session of `user`'s device `device_id`, acting for itself or for `appservice`.
    pub fn of(
        localpart: String,
        device_id: String,
        user: &UserRecord,
        appservice: Option<String>,
    ) -> Self {
        Self {
            localpart,
            device_id,
            guest: user.guest && appservice.is_none(),
            bot: user.bot,
            suspended: user.suspended,
            shadow_banned: user.shadow_banned,
            rate_override: user.rate_override,
            appservice,
        }
    }
}

/// Tokens handed to a client at login, registration or refresh.
#[derive(Debug, Clone)]
pub struct Issued {
    pub device_id: String,
    pub access_token: String,
    pub refresh_token: Option<String>,
    /// Lifetime of the access token, when it expires.
    pub expires_in_ms: Option<u64>,
}

/// How often a device's "last seen" is written: at most once per interval per device.
const SEEN_WRITE_INTERVAL_MS: u64 = 5 * 60 * 1000;
const SEEN_CACHE_MAX: usize = 100_000;

#[derive(Default)]
pub(super) struct SeenCache(std::sync::Mutex<HashMap<(String, String), u64>>);

pub fn hash_token(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// How long an OpenID token may be checked: an hour, as other servers give.
const OPENID_TOKEN_LIFETIME_MS: u64 = 3600 * 1000;

pub(super) fn new_token(prefix: &str) -> String {
    format!("{prefix}_{}", random::alphanumeric(40))
}

impl Accounts {
    /// Writes a device (new or existing) and fresh tokens for it into `batch`, revoking
    /// the device's previous tokens.
    pub(super) fn issue_tokens(
        &self,
        batch: &mut Batch,
        localpart: &str,
        device_id: &str,
        display_name: Option<String>,
        with_refresh: bool,
        client: &Client,
    ) -> Result<Issued> {
        let key = (localpart.to_owned(), device_id.to_owned());
        let existing = DEVICES.get(&*self.db, &key)?.map(|j| j.0);
        if let Some(old) = &existing {
            if let Some(h) = &old.token_hash {
                ACCESS_TOKENS.delete(batch, h);
            }
            if let Some(h) = &old.refresh_hash {
                REFRESH_TOKENS.delete(batch, h);
            }
        }
        let now = now_millis();
        let (access_hash, refresh_hash, issued) =
            self.new_token_pair(batch, localpart, device_id, with_refresh, None);
        let record = DeviceRecord {
            display_name: display_name
                .or_else(|| existing.as_ref().and_then(|d| d.display_name.clone())),
            created_ms: existing.as_ref().map_or(now, |d| d.created_ms),
            token_hash: Some(access_hash),
            refresh_hash,
            last_seen_ms: Some(now),
            last_seen_ip: client.ip.clone(),
            last_seen_user_agent: client.user_agent.clone(),
        };
        DEVICES.put(batch, &key, &Json(record));
        crate::analytics::note_active(batch, localpart);
        Ok(issued)
    }

    fn new_token_pair(
        &self,
        batch: &mut Batch,
        localpart: &str,
        device_id: &str,
        with_refresh: bool,
        supersedes_refresh: Option<Vec<u8>>,
    ) -> (Vec<u8>, Option<Vec<u8>>, Issued) {
        let access_token = new_token("trl");
        let access_hash = hash_token(&access_token);
        let lifetime_ms = self.auth.access_token_lifetime_seconds.saturating_mul(1000);
        let expires_ms = with_refresh.then(|| now_millis().saturating_add(lifetime_ms));
        ACCESS_TOKENS.put(
            batch,
            &access_hash,
            &Json(TokenRecord {
                localpart: localpart.to_owned(),
                device_id: device_id.to_owned(),
                expires_ms,
                supersedes_refresh,
            }),
        );
        let refresh_token = with_refresh.then(|| new_token("trr"));
        let refresh_hash = refresh_token.as_deref().map(hash_token);
        if let Some(h) = &refresh_hash {
            REFRESH_TOKENS.put(
                batch,
                h,
                &Json(RefreshRecord {
                    localpart: localpart.to_owned(),
                    device_id: device_id.to_owned(),
                }),
            );
        }
        let issued = Issued {
            device_id: device_id.to_owned(),
            access_token,
            refresh_token,
            expires_in_ms: with_refresh.then_some(lifetime_ms),
        };
        (access_hash, refresh_hash, issued)
    }

    /// Resolves an access token to its session (a locked account's: 401 `M_USER_LOCKED`).
    pub async fn authenticate(&self, token: &str, client: &Client) -> Result<Session> {
        self.authenticate_as(token, client, false).await
    }

    /// As [`Self::authenticate`], for logging out, which a locked account may do.
    pub async fn authenticate_to_log_out(&self, token: &str, client: &Client) -> Result<Session> {
        self.authenticate_as(token, client, true).await
    }

    async fn authenticate_as(
        &self,
        token: &str,
        client: &Client,
        locked_ok: bool,
    ) -> Result<Session> {
        let hash = hash_token(token);
        let record = ACCESS_TOKENS.get(&*self.db, &hash)?.ok_or_else(Error::unknown_token)?.0;
        if record.expires_ms.is_some_and(|exp| exp <= now_millis()) {
            return Err(Error::expired_token());
        }
        let user = USERS.get(&*self.db, &record.localpart)?.ok_or_else(Error::unknown_token)?.0;
        if user.deactivated {
            return Err(Error::unknown_token());
        }
        if user.locked && !locked_ok {
            return Err(Error::user_locked());
        }
        if let Some(old_refresh) = &record.supersedes_refresh {
            // First use of a refreshed token: the refresh token it replaced is now spent.
            let mut batch = Batch::new();
            REFRESH_TOKENS.delete(&mut batch, old_refresh);
            ACCESS_TOKENS.put(
                &mut batch,
                &hash,
                &Json(TokenRecord { supersedes_refresh: None, ..record.clone() }),
            );
            commit(&self.db, batch).await?;
        }
        self.note_seen(&record.localpart, &record.device_id, client).await?;
        Ok(Session::of(record.localpart, record.device_id, &user, None))
    }

    /// Distinct users whose requests were seen since `since_ms` (to within the five
    /// minutes "last seen" is written at), since start-up.
    pub fn active_since(&self, since_ms: u64) -> usize {
        let Ok(seen) = self.seen.0.lock() else { return 0 };
        let users: std::collections::HashSet<&str> =
            seen.iter().filter(|(_, t)| **t >= since_ms).map(|((lp, _), _)| lp.as_str()).collect();
        users.len()
    }

    /// Records "last seen" for a device, writing at most once per interval.
    async fn note_seen(&self, localpart: &str, device_id: &str, client: &Client) -> Result<()> {
        let now = now_millis();
        let key = (localpart.to_owned(), device_id.to_owned());
        {
            let Ok(mut seen) = self.seen.0.lock() else { return Ok(()) };
            if seen.get(&key).is_some_and(|&t| now.saturating_sub(t) < SEEN_WRITE_INTERVAL_MS) {
                return Ok(());
            }
            if seen.len() >= SEEN_CACHE_MAX {
                seen.clear();
            }
            seen.insert(key.clone(), now);
        }
        if let Some(Json(mut device)) = DEVICES.get(&*self.db, &key)? {
            device.last_seen_ms = Some(now);
            device.last_seen_ip = client.ip.clone();
            device.last_seen_user_agent = client.user_agent.clone();
            let mut batch = Batch::new();
            DEVICES.put(&mut batch, &key, &Json(device));
            crate::analytics::note_active(&mut batch, localpart);
            commit(&self.db, batch).await?;
        }
        Ok(())
    }

    /// Exchanges a refresh token for a new access/refresh pair. The old refresh token
    /// stays valid until the new access token is first used.
    pub async fn refresh(&self, refresh_token: &str) -> Result<Issued> {
        let hash = hash_token(refresh_token);
        let record = REFRESH_TOKENS.get(&*self.db, &hash)?.ok_or_else(Error::unknown_token)?.0;
        let key = (record.localpart.clone(), record.device_id.clone());
        let Some(Json(mut device)) = DEVICES.get(&*self.db, &key)? else {
            return Err(Error::unknown_token());
        };
        let mut batch = Batch::new();
        if let Some(h) = &device.token_hash {
            ACCESS_TOKENS.delete(&mut batch, h);
        }
        // A refresh token issued by an earlier refresh of this one is superseded too.
        if let Some(h) = device.refresh_hash.as_ref().filter(|h| **h != hash) {
            REFRESH_TOKENS.delete(&mut batch, h);
        }
        let (access_hash, refresh_hash, issued) =
            self.new_token_pair(&mut batch, &record.localpart, &record.device_id, true, Some(hash));
        device.token_hash = Some(access_hash);
        device.refresh_hash = refresh_hash;
        DEVICES.put(&mut batch, &key, &Json(device));
        commit(&self.db, batch).await?;
        Ok(issued)
    }

    /// `POST /logout`: the device and all its tokens go.
    pub async fn logout(&self, session: &Session, client: &Client) -> Result<()> {
        let mut batch = Batch::new();
        self.delete_device_into(&mut batch, &session.localpart, &session.device_id)?;
        self.audit.add(&mut batch, Some(&session.localpart), "logout", client, "ok", None);
        self.commit_device_change(batch, &session.localpart).await
    }

    /// `POST /logout/all`: every device of the user goes.
    pub async fn logout_all(&self, localpart: &str, client: &Client) -> Result<()> {
        let mut batch = Batch::new();
        for device in self.device_ids(localpart)? {
            self.delete_device_into(&mut batch, localpart, &device)?;
        }
        self.audit.add(&mut batch, Some(localpart), "logout_all", client, "ok", None);
        self.commit_device_change(batch, localpart).await
    }

    /// A single-use `m.login.token` for signing in another device.
    pub async fn create_login_token(&self, localpart: &str) -> Result<(String, u64)> {
        let token = new_token("trl_login");
        let lifetime_ms = self.auth.login_token_lifetime_seconds.saturating_mul(1000);
        let mut batch = Batch::new();
        LOGIN_TOKENS.put(
            &mut batch,
            &hash_token(&token),
            &Json(LoginTokenRecord {
                localpart: localpart.to_owned(),
                expires_ms: now_millis().saturating_add(lifetime_ms),
            }),
        );
        commit(&self.db, batch).await?;
        Ok((token, lifetime_ms))
    }

    /// An OpenID token: proof of the user's identity for another service (an
    /// integration manager, a widget), which asks this server's federation API whose it
    /// is. It grants nothing on this server.
    pub async fn create_openid_token(&self, localpart: &str) -> Result<(String, u64)> {
        let token = new_token("trl_openid");
        let mut batch = Batch::new();
        OPENID_TOKENS.put(
            &mut batch,
            &hash_token(&token),
            &Json(LoginTokenRecord {
                localpart: localpart.to_owned(),
                expires_ms: now_millis().saturating_add(OPENID_TOKEN_LIFETIME_MS),
            }),
        );
        commit(&self.db, batch).await?;
        Ok((token, OPENID_TOKEN_LIFETIME_MS))
    }

    /// The owner of an unexpired OpenID token (it stays valid until it expires), while
    /// the account is active.
    pub fn openid_owner(&self, token: &str) -> Result<Option<String>> {
        let Some(Json(record)) = OPENID_TOKENS.get(&*self.db, &hash_token(token))? else {
            return Ok(None);
        };
        if record.expires_ms <= now_millis()
            || self.user(&record.localpart)?.is_none_or(|u| u.deactivated)
        {
            return Ok(None);
        }
        Ok(Some(record.localpart))
    }

    /// Spends a login token; `None` if it is unknown, used or expired.
    pub(super) async fn take_login_token(&self, token: &str) -> Result<Option<String>> {
        let hash = hash_token(token);
        // Read and delete under a lock: two concurrent logins must not both spend it.
        let _single_use = self.create_lock.lock().await;
        let Some(Json(record)) = LOGIN_TOKENS.get(&*self.db, &hash)? else { return Ok(None) };
        let mut batch = Batch::new();
        LOGIN_TOKENS.delete(&mut batch, &hash);
        commit(&self.db, batch).await?;
        Ok((record.expires_ms > now_millis()).then_some(record.localpart))
    }
}
