//! Accounts: registration, login, tokens, devices, passwords, deactivation.

pub mod account_data;
pub mod admin;
pub mod deactivation;
pub mod devices;
pub mod directory;
mod guard;
mod guests;
pub mod jwt;
mod login;
pub mod moderation;
pub mod password;
pub mod profile;
mod reg_tokens;
pub mod sessions;
mod sweep;
pub mod threepid;
mod uia;

use std::sync::Arc;
use trellis_core::ErrorKind;

use tokio::sync::Mutex;
use trellis_core::{
    Error, Result,
    config::{AuthConfig, RegistrationConfig, RegistrationMode},
    error::code,
    now_millis,
};
use trellis_store::{Batch, Db, Direction, Json};

pub use devices::DeviceInfo;
pub use login::{Credential, LoginRequest};
pub use reg_tokens::RegistrationToken;
pub use sessions::{Issued, Session};
pub use uia::{AuthInput, DUMMY, EMAIL_IDENTITY, PASSWORD, REGISTRATION_TOKEN, UiaDone};

use crate::{
    audit::{Audit, Client},
    commit, random,
    tables::{ACCOUNT_DATA, PROFILES, RegistrationParams, UIA_SESSIONS, USERS, UserRecord},
};

pub struct Accounts {
    db: Db,
    server_name: String,
    registration: RegistrationConfig,
    auth: AuthConfig,
    audit: Arc<Audit>,
    /// Serialises the check-then-create of a user id; registrations are rare enough that
    /// one lock costs nothing and it rules out two accounts racing for one name.
    create_lock: Mutex<()>,
    guard: guard::LoginGuard,
    seen: sessions::SeenCache,
    jwt: Option<jwt::JwtVerifier>,
    email_code_lifetime_ms: u64,
    hasher: crate::accounts::password::HashPool,
    /// A hash to verify against for unknown users (see `login.rs`), made on first use.
    decoy_hash: tokio::sync::OnceCell<Option<String>>,
    /// The rooms whose members hear of device-list changes when devices go; unset in tools
    /// that manage accounts offline.
    device_changes: Option<Arc<crate::rooms::Rooms>>,
    /// Serialises admins' changes to user records (see `admin.rs`).
    admin_changes: Mutex<()>,
    /// Shadow-banned localparts, read from their table on first use.
    shadow_bans: std::sync::OnceLock<std::sync::RwLock<std::collections::HashSet<String>>>,
}

#[derive(Debug, Clone, Default)]
pub struct RegisterRequest {
    pub username: Option<String>,
    pub password: Option<String>,
    pub device_id: Option<String>,
    pub initial_device_display_name: Option<String>,
    pub inhibit_login: bool,
    pub refresh_token: bool,
    pub auth: Option<AuthInput>,
    /// A guest's access token: the registration upgrades that guest account.
    pub guest_access_token: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Registered {
    pub localpart: String,
    /// `None` with `inhibit_login`.
    pub login: Option<Issued>,
}

impl Accounts {
    pub fn new(
        db: Db,
        server_name: String,
        registration: RegistrationConfig,
        auth: AuthConfig,
        audit: Arc<Audit>,
    ) -> Self {
        Self::with_jwt(db, server_name, registration, auth, audit, None)
    }

    pub fn with_jwt(
        db: Db,
        server_name: String,
        registration: RegistrationConfig,
        auth: AuthConfig,
        audit: Arc<Audit>,
        jwt: Option<jwt::JwtVerifier>,
    ) -> Self {
        let hasher = crate::accounts::password::HashPool::new(auth.password_hash_threads);
        let guard = guard::LoginGuard::new(
            auth.failed_login_threshold,
            auth.failed_login_max_backoff_seconds,
        );
        Self {
            db,
            server_name,
            registration,
            auth,
            audit,
            create_lock: Mutex::new(()),
            guard,
            seen: Default::default(),
            jwt,
            email_code_lifetime_ms: 900_000,
            hasher,
            decoy_hash: Default::default(),
            device_changes: None,
            shadow_bans: Default::default(),
            admin_changes: Mutex::new(()),
        }
    }

    /// How long mailed validation codes stay valid.
    pub fn with_email_code_lifetime(mut self, seconds: u64) -> Self {
        self.email_code_lifetime_ms = seconds.saturating_mul(1000);
        self
    }

    /// Records device additions, renames and removals as device-list changes seen by the
    /// members of `rooms` (see [`Self::commit_device_change`]).
    pub fn with_device_changes(mut self, rooms: Arc<crate::rooms::Rooms>) -> Self {
        self.device_changes = Some(rooms);
        self
    }

    /// Commits a batch that adds, renames or removes devices of `localpart`, noting a
    /// device-list change in the same batch so that everyone sharing a room with the user
    /// re-reads the user's devices.
    pub(crate) async fn commit_device_change(&self, batch: Batch, localpart: &str) -> Result<()> {
        let Some(rooms) = &self.device_changes else { return commit(&self.db, batch).await };
        let changed = [self.user_id(localpart)];
        crate::e2ee::device_lists::commit_with_changes(&self.db, rooms, batch, &changed).await
    }

    pub fn user_id(&self, localpart: &str) -> String {
        format!("@{localpart}:{}", self.server_name)
    }

    /// The localpart of a user id on this server, if it is one.
    pub fn local_part<'a>(&self, user_id: &'a str) -> Option<&'a str> {
        let rest = user_id.strip_prefix('@')?;
        let (lp, server) = rest.split_once(':')?;
        (server == self.server_name).then_some(lp)
    }

    /// Validates a requested username (a bare localpart or a full user id on this
    /// server) and returns the localpart.
    pub fn parse_username(&self, username: &str) -> Result<String> {
        let invalid =
            |msg: &'static str| Error::new(ErrorKind::BadRequest, code::INVALID_USERNAME, msg);
        let localpart = if username.starts_with('@') {
            self.local_part(username).ok_or_else(|| invalid("User ID must be on this server"))?
        } else {
            username
        };
        let localpart = localpart.to_lowercase();
        let valid_chars = localpart
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._=-/+".contains(&b));
        if localpart.is_empty() || !valid_chars {
            return Err(invalid(
                "Usernames may contain only a-z, 0-9, '.', '_', '=', '-', '/' and '+'",
            ));
        }
        if self.user_id(&localpart).len() > 255 {
            return Err(invalid("Username is too long"));
        }
        Ok(localpart)
    }

    /// Checks a username a client wants to register: valid, not reserved, not taken.
    pub fn check_available(&self, username: &str) -> Result<String> {
        let localpart = self.parse_username(username)?;
        // `_` starts the namespaces of application services; all-digit names are what
        // the server generates.
        let reserved = localpart.starts_with('_')
            || localpart.bytes().all(|b| b.is_ascii_digit())
            || self
                .registration
                .reserved_usernames
                .iter()
                .any(|r| r.eq_ignore_ascii_case(&localpart));
        if reserved {
            return Err(Error::new(
                ErrorKind::BadRequest,
                code::INVALID_USERNAME,
                "This username is reserved",
            ));
        }
        if USERS.contains(&*self.db, &localpart)? {
            return Err(Error::new(
                ErrorKind::BadRequest,
                code::USER_IN_USE,
                "User ID already taken",
            ));
        }
        Ok(localpart)
    }

    pub fn user(&self, localpart: &str) -> Result<Option<UserRecord>> {
        Ok(USERS.get(&*self.db, &localpart.to_owned())?.map(|j| j.0))
    }

    pub fn jwt_enabled(&self) -> bool {
        self.jwt.is_some()
    }

    pub fn check_password_policy(&self, password: &str) -> Result<()> {
        if password.chars().count() < self.auth.password_min_length {
            return Err(Error::new(
                ErrorKind::BadRequest,
                code::WEAK_PASSWORD,
                format!("Password must be at least {} characters", self.auth.password_min_length),
            ));
        }
        Ok(())
    }

    pub async fn register(&self, req: RegisterRequest, client: &Client) -> Result<Registered> {
        let flows: &[&[&str]] = match self.registration.mode {
            RegistrationMode::Closed => {
                return Err(Error::forbidden("Registration is disabled on this server"));
            }
            RegistrationMode::Open => &[&[DUMMY]],
            RegistrationMode::Token => &[&[REGISTRATION_TOKEN]],
            RegistrationMode::Email => &[&[EMAIL_IDENTITY]],
        };
        // The session of a registration that already completed answers as it did then.
        if let Some(localpart) = self.registered_in_session(req.auth.as_ref())? {
            return self.log_in_registered(localpart, &req, None, client).await;
        }
        let upgrades_guest = match &req.guest_access_token {
            Some(token) => Some(self.guest_to_upgrade(token, req.username.as_deref()).await?),
            None => None,
        };
        // Cheap checks before any user-interactive auth round trip, as clients expect.
        let localpart = match (&req.username, &upgrades_guest) {
            (_, Some(guest)) => Some(guest.clone()),
            (Some(u), None) => Some(self.check_available(u)?),
            (None, None) => None,
        };
        let password_hash = match req.password.clone() {
            Some(pw) => {
                self.check_password_policy(&pw)?;
                Some(self.hash_password(pw).await?)
            }
            None => None,
        };
        let asked = RegistrationParams {
            username: localpart,
            password_hash,
            device_id: req.device_id.clone(),
            initial_device_display_name: req.initial_device_display_name.clone(),
            inhibit_login: req.inhibit_login,
            upgrades_guest,
        };
        let done =
            self.require_uia(flows, req.auth.as_ref(), None, "register", Some(&asked)).await?;
        // What this request leaves out, the flow's first request may have said.
        let first = done.session.as_ref().and_then(|(_, s)| s.registration.clone());
        let first = first.unwrap_or_default();
        let password_hash = asked.password_hash.or(first.password_hash);

        let _guard = self.create_lock.lock().await;
        let upgrades_guest = asked.upgrades_guest.or(first.upgrades_guest);
        let localpart = match (&upgrades_guest, asked.username.or(first.username)) {
            (Some(guest), _) => guest.clone(),
            (None, Some(lp)) => self.check_available(&lp)?,
            (None, None) => self.fresh_localpart()?,
        };
        let mut batch = Batch::new();
        if let Some(token) = &done.registration_token {
            self.spend_registration_token(&mut batch, token)?;
        }
        match upgrades_guest {
            Some(_) => self.upgrade_guest_into(&mut batch, &localpart, password_hash)?,
            None => self.put_new_user(&mut batch, &localpart, password_hash, false),
        }
        if let Some((email, sid)) = &done.email {
            self.bind_email_into(&mut batch, &localpart, email, sid)?;
        }
        if let Some((id, mut session)) = done.session {
            session.registered = Some(localpart.clone());
            UIA_SESSIONS.put(&mut batch, &id, &Json(session));
        }
        self.audit.add(&mut batch, Some(&localpart), "register", client, "ok", None);
        let first = RegisterRequest {
            device_id: req.device_id.clone().or(first.device_id),
            initial_device_display_name: req
                .initial_device_display_name
                .clone()
                .or(first.initial_device_display_name),
            inhibit_login: req.inhibit_login || first.inhibit_login,
            ..req
        };
        let registered = self.log_in_registered(localpart, &first, Some(batch), client).await?;
        tracing::info!(user = %self.user_id(&registered.localpart), "registered");
        Ok(registered)
    }

    /// The account a completed registration session (named by `auth`) created, if any.
    fn registered_in_session(&self, auth: Option<&AuthInput>) -> Result<Option<String>> {
        let Some(id) = auth.and_then(|a| a.session.as_ref()) else { return Ok(None) };
        let ttl_ms = self.auth.uia_session_ttl_seconds.saturating_mul(1000);
        let session = UIA_SESSIONS.get(&*self.db, id)?.map(|j| j.0);
        Ok(session
            .filter(|s| {
                s.purpose == "register:" && now_millis().saturating_sub(s.created_ms) <= ttl_ms
            })
            .and_then(|s| s.registered))
    }

    /// Ends a registration: signs the new account in (unless the request inhibits it) in
    /// the same batch that created it, if given.
    async fn log_in_registered(
        &self,
        localpart: String,
        req: &RegisterRequest,
        batch: Option<Batch>,
        client: &Client,
    ) -> Result<Registered> {
        let mut batch = batch.unwrap_or_default();
        let login = if req.inhibit_login {
            None
        } else {
            let device_id = req.device_id.clone().unwrap_or_else(new_device_id);
            Some(self.issue_tokens(
                &mut batch,
                &localpart,
                &device_id,
                req.initial_device_display_name.clone(),
                req.refresh_token,
                client,
            )?)
        };
        commit(&self.db, batch).await?;
        Ok(Registered { localpart, login })
    }

    /// Creates an account outside the API (the `trellis user create` command), where
    /// registration mode, reserved names and UIA do not apply.
    pub async fn create_user(
        &self,
        username: &str,
        password: Option<String>,
        admin: bool,
        client: &Client,
    ) -> Result<String> {
        let localpart = self.parse_username(username)?;
        if let Some(pw) = &password {
            self.check_password_policy(pw)?;
        }
        let hash = match password {
            Some(pw) => Some(self.hash_password(pw).await?),
            None => None,
        };
        let _guard = self.create_lock.lock().await;
        self.refuse_taken(&localpart)?;
        let mut batch = Batch::new();
        self.put_new_user(&mut batch, &localpart, hash, admin);
        self.audit.add(&mut batch, Some(&localpart), "user_create", client, "ok", None);
        commit(&self.db, batch).await?;
        Ok(self.user_id(&localpart))
    }

    /// 400 `M_USER_IN_USE` when `localpart` exists (call with `create_lock` held).
    fn refuse_taken(&self, localpart: &str) -> Result<()> {
        if USERS.contains(&*self.db, &localpart.to_owned())? {
            return Err(Error::new(
                ErrorKind::BadRequest,
                code::USER_IN_USE,
                "User ID already taken",
            ));
        }
        Ok(())
    }

    /// Marks an account as a bot: the flag, and `org.trellis.bot: true` in its profile
    /// so that clients can show it.
    pub async fn mark_bot(&self, localpart: &str) -> Result<()> {
        let mut user = self.user(localpart)?.ok_or_else(|| Error::not_found("No such user"))?;
        user.bot = true;
        let mut batch = Batch::new();
        USERS.put(&mut batch, &localpart.to_owned(), &Json(user));
        let field = (localpart.to_owned(), "org.trellis.bot".to_owned());
        PROFILES.put(&mut batch, &field, &Json(serde_json::Value::Bool(true)));
        commit(&self.db, batch).await
    }

    /// `m.login.application_service` registration: the user an application service
    /// vouched for (see `appservice::vouch`), without a password or user-interactive auth.
    pub async fn register_vouched(
        &self,
        localpart: String,
        req: RegisterRequest,
        client: &Client,
    ) -> Result<Registered> {
        let _guard = self.create_lock.lock().await;
        self.refuse_taken(&localpart)?;
        let mut batch = Batch::new();
        self.put_new_user(&mut batch, &localpart, None, false);
        self.audit.add(&mut batch, Some(&localpart), "register_appservice", client, "ok", None);
        self.log_in_registered(localpart, &req, Some(batch), client).await
    }

    /// Creates an application service's user (its sender, or a user of its namespace
    /// it registers) without a password, if it does not exist.
    pub async fn ensure_service_user(&self, localpart: &str) -> Result<()> {
        let _guard = self.create_lock.lock().await;
        if USERS.contains(&*self.db, &localpart.to_owned())? {
            return Ok(());
        }
        let mut batch = Batch::new();
        self.put_new_user(&mut batch, localpart, None, false);
        commit(&self.db, batch).await
    }

    fn put_new_user(
        &self,
        batch: &mut Batch,
        localpart: &str,
        password_hash: Option<String>,
        admin: bool,
    ) {
        crate::accounts::directory::index_new_user(batch, localpart);
        // Clients show a user without a display name by their full id: start from the
        // localpart, as users of other servers expect.
        let displayname = (localpart.to_owned(), "displayname".to_owned());
        PROFILES.put(batch, &displayname, &Json(serde_json::Value::from(localpart)));
        USERS.put(
            batch,
            &localpart.to_owned(),
            &Json(UserRecord {
                password_hash,
                created_ms: now_millis(),
                deactivated: false,
                admin,
                locked: false,
                suspended: false,
                guest: false,
                bot: false,
                shadow_banned: false,
                rate_override: None,
            }),
        );
    }

    /// Sets a new password. With `logout_devices`, every device except `keep_device` is
    /// deleted (and so signed out).
    pub async fn set_password(
        &self,
        localpart: &str,
        new_password: String,
        logout_devices: bool,
        keep_device: Option<&str>,
        client: &Client,
    ) -> Result<()> {
        self.check_password_policy(&new_password)?;
        let mut user = self.user(localpart)?.ok_or_else(|| Error::not_found("No such user"))?;
        user.password_hash = Some(self.hash_password(new_password).await?);
        let mut batch = Batch::new();
        USERS.put(&mut batch, &localpart.to_owned(), &Json(user));
        if logout_devices {
            for device in self.device_ids(localpart)? {
                if Some(device.as_str()) != keep_device {
                    self.delete_device_into(&mut batch, localpart, &device)?;
                }
            }
        }
        self.audit.add(&mut batch, Some(localpart), "password_change", client, "ok", None);
        if logout_devices {
            self.commit_device_change(batch, localpart).await
        } else {
            commit(&self.db, batch).await
        }
    }

    /// `/account/password`: with a session, the signed-in user changes their password
    /// after proving it is them; without one, a password reset proven by an email
    /// address validated through user-interactive auth.
    pub async fn change_password(
        &self,
        session: Option<&Session>,
        auth: Option<&AuthInput>,
        new_password: String,
        logout_devices: bool,
        client: &Client,
    ) -> Result<()> {
        self.check_password_policy(&new_password)?;
        let Some(session) = session else {
            let flows: &[&[&str]] = &[&[EMAIL_IDENTITY]];
            let done = self.require_uia(flows, auth, None, "password_reset", None).await?;
            let (email, sid) = done
                .email
                .ok_or_else(|| Error::forbidden("A validated email address is required"))?;
            self.reset_password_by_email(&email, &sid, new_password, logout_devices, client)
                .await?;
            return Ok(());
        };
        self.reauthenticate(&session.localpart, auth, "password").await?;
        let keep = Some(session.device_id.as_str());
        self.set_password(&session.localpart, new_password, logout_devices, keep, client).await
    }

    /// Deactivates an account: it can never log in again, all its devices and tokens are
    /// gone, and with `erase` its profile and account data too.
    pub async fn deactivate(&self, localpart: &str, erase: bool, client: &Client) -> Result<()> {
        let mut user = self.user(localpart)?.ok_or_else(|| Error::not_found("No such user"))?;
        user.deactivated = true;
        user.password_hash = None;
        let mut batch = Batch::new();
        USERS.put(&mut batch, &localpart.to_owned(), &Json(user));
        for device in self.device_ids(localpart)? {
            self.delete_device_into(&mut batch, localpart, &device)?;
        }
        // A deactivated account keeps no addresses: they can be used by a new account.
        self.unbind_all_into(&mut batch, localpart)?;
        let owner = localpart.to_owned();
        let display_name = PROFILES
            .get(&*self.db, &(owner.clone(), "displayname".to_owned()))?
            .and_then(|j| j.0.as_str().map(str::to_owned));
        crate::accounts::directory::remove_user(&mut batch, localpart, display_name.as_deref());
        // Display name and avatar go either way (spec: a deactivated user has no profile);
        // `erase` also removes everything else the user stored.
        for entry in PROFILES.scan_prefix(&*self.db, &owner, Direction::Forward)? {
            let (key, _) = entry?;
            PROFILES.delete(&mut batch, &key);
        }
        if erase {
            for entry in ACCOUNT_DATA.scan_prefix(&*self.db, &owner, Direction::Forward)? {
                let (key, _) = entry?;
                ACCOUNT_DATA.delete(&mut batch, &key);
            }
        }
        let detail = erase.then(|| "erase".to_owned());
        self.audit.add(&mut batch, Some(localpart), "deactivate", client, "ok", detail);
        self.commit_device_change(batch, localpart).await?;
        tracing::info!(user = %self.user_id(localpart), erase, "deactivated");
        Ok(())
    }

    fn fresh_localpart(&self) -> Result<String> {
        loop {
            // Generated names start with a letter, so they never collide with the
            // all-digit names reserved above.
            let candidate = format!("u{}", random::alphanumeric(11).to_lowercase());
            if !USERS.contains(&*self.db, &candidate)? {
                return Ok(candidate);
            }
        }
    }

    async fn hash_password(&self, password: String) -> Result<String> {
        let (m, t) = (self.auth.argon2_memory_kib, self.auth.argon2_iterations);
        self.hasher.run(move || crate::accounts::password::hash(&password, m, t)).await?
    }

    async fn verify_password(&self, password: String, phc: String) -> Result<bool> {
        self.hasher.run(move || crate::accounts::password::verify(&password, &phc)).await
    }
}

fn new_device_id() -> String {
    random::alphanumeric(10).to_uppercase()
}
