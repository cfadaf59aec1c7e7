//! `POST /login`: password and `m.login.token` logins, with brute-force protection and
//! an audit record for every attempt.

use trellis_core::{Error, ErrorKind, Result};
use trellis_store::Batch;

use super::{Accounts, Issued, new_device_id};
use crate::{audit::Client, commit};

#[derive(Debug, Clone)]
pub enum Credential {
    /// `user` is the `m.id.user` identifier (or deprecated `user` field).
    Password {
        user: Option<String>,
        password: String,
    },
    Token(String),
    /// `org.matrix.login.jwt`.
    Jwt(String),
    /// A user an application service logs in as (`m.login.application_service`), its
    /// `as_token` and namespace already checked.
    Vouched(String),
}

#[derive(Debug, Clone)]
pub struct LoginRequest {
    pub credential: Credential,
    pub device_id: Option<String>,
    pub initial_device_display_name: Option<String>,
    pub refresh_token: bool,
}

fn bad_credentials() -> Error {
    Error::forbidden("Invalid username or password")
}

impl Accounts {
    pub async fn login(&self, req: LoginRequest, client: &Client) -> Result<(String, Issued)> {
        let localpart = match req.credential {
            Credential::Password { user, password } => {
                let user = user
                    .ok_or_else(|| Error::bad_json("A user identifier (m.id.user) is required"))?;
                self.password_login(&user, password, client).await?
            }
            Credential::Jwt(token) => self.jwt_login(&token, client).await?,
            Credential::Vouched(localpart) => localpart,
            Credential::Token(token) => match self.take_login_token(&token).await? {
                Some(lp) => lp,
                None => {
                    self.audit.log(None, "login_token", client, "failed", None).await;
                    return Err(Error::forbidden("Invalid or expired login token"));
                }
            },
        };
        let user = self.user(&localpart)?.ok_or_else(bad_credentials)?;
        if user.deactivated {
            return Err(Error::user_deactivated());
        }
        if user.locked {
            return Err(Error::user_locked());
        }

        let device_id = req.device_id.unwrap_or_else(new_device_id);
        let mut batch = Batch::new();
        let issued = self.issue_tokens(
            &mut batch,
            &localpart,
            &device_id,
            req.initial_device_display_name,
            req.refresh_token,
            client,
        )?;
        self.audit.add(&mut batch, Some(&localpart), "login", client, "ok", Some(device_id));
        // A new device (or one re-logged in, with new keys to come): co-members re-read
        // the user's device list.
        self.commit_device_change(batch, &localpart).await?;
        Ok((localpart, issued))
    }

    /// Verifies the token and returns its user, creating the account on first login.
    async fn jwt_login(&self, token: &str, client: &Client) -> Result<String> {
        let verifier = self.jwt.as_ref().ok_or_else(|| {
            Error::new(
                ErrorKind::BadRequest,
                trellis_core::error::code::UNKNOWN,
                "JWT login is not enabled",
            )
        })?;
        let subject = match verifier.subject(token) {
            Ok(s) => s,
            Err(e) => {
                self.audit
                    .log(None, "login_jwt", client, "failed", Some(e.message.to_string()))
                    .await;
                return Err(e);
            }
        };
        let localpart = self
            .parse_username(&subject)
            .map_err(|_| Error::forbidden("The token names an invalid user"))?;
        let _guard = self.create_lock.lock().await;
        if self.user(&localpart)?.is_none() {
            let mut batch = Batch::new();
            self.put_new_user(&mut batch, &localpart, None, false);
            self.audit.add(&mut batch, Some(&localpart), "register_jwt", client, "ok", None);
            commit(&self.db, batch).await?;
        }
        Ok(localpart)
    }

    async fn decoy_hash(&self) -> Option<String> {
        let (m, t) = (self.auth.argon2_memory_kib, self.auth.argon2_iterations);
        self.decoy_hash
            .get_or_init(|| async move {
                let made = self
                    .hasher
                    .run(move || crate::accounts::password::hash("decoy password", m, t));
                made.await.ok().and_then(Result::ok)
            })
            .await
            .clone()
    }

    async fn password_login(
        &self,
        user: &str,
        password: String,
        client: &Client,
    ) -> Result<String> {
        let ip_key = format!("ip:{}", client.ip.as_deref().unwrap_or("-"));
        let localpart = self.parse_username(user).map_err(|_| bad_credentials())?;
        let account_key = format!("user:{localpart}");
        self.guard.check(&account_key, &ip_key)?;

        let record = self.user(&localpart)?;
        if record.as_ref().is_some_and(|u| u.deactivated) {
            return Err(Error::user_deactivated());
        }
        // For an unknown user, verify against a decoy hash so that a wrong username costs
        // as much time as a wrong password and does not reveal which accounts exist.
        let hash = match record.and_then(|u| u.password_hash) {
            Some(h) => Some(h),
            None => self.decoy_hash().await,
        };
        let ok = match hash {
            Some(h) => self.verify_password(password, h).await? && self.user(&localpart)?.is_some(),
            None => false,
        };
        if !ok {
            let locked = self.guard.failed(&account_key, &ip_key);
            self.audit
                .log(Some(&localpart), "login", client, "failed", Some("bad password".into()))
                .await;
            if locked {
                let why = "failed logins reached the threshold; addresses that failed now wait";
                self.audit
                    .log(Some(&localpart), "login_lockout", client, "ok", Some(why.into()))
                    .await;
            }
            return Err(bad_credentials());
        }
        self.guard.succeeded(&account_key);
        Ok(localpart)
    }
}
