//! User-interactive authentication: flows of stages a client completes (possibly over
//! several requests, tied together by a persisted session) before a sensitive action.

use serde_json::json;
use trellis_core::{Error, ErrorKind, Result, error::code, now_millis};
use trellis_store::{Batch, Json};

use super::Accounts;
use crate::{
    commit, random,
    tables::{RegistrationParams, UIA_SESSIONS, UiaSession},
};

pub const DUMMY: &str = "m.login.dummy";
pub const PASSWORD: &str = "m.login.password";
pub const REGISTRATION_TOKEN: &str = "m.login.registration_token";
pub const EMAIL_IDENTITY: &str = "m.login.email.identity";

/// The `auth` object of a request, as far as the stages we offer need it.
#[derive(Debug, Clone, Default)]
pub struct AuthInput {
    pub session: Option<String>,
    pub kind: Option<String>,
    /// `identifier.user` (or the deprecated `user`) of a password stage.
    pub user: Option<String>,
    pub password: Option<String>,
    /// `token` of a registration token stage.
    pub token: Option<String>,
    /// `threepid_creds` of an email identity stage: (sid, client_secret).
    pub threepid_creds: Option<(String, String)>,
}

/// What one completed stage proved.
enum StageProof {
    Nothing,
    RegistrationToken(String),
    /// The address and its validation session id.
    Email(String, String),
}

/// What a completed flow proved beyond "the client is allowed".
#[derive(Debug, Clone, Default)]
pub struct UiaDone {
    /// The registration token the client presented, to be spent by the registration.
    pub registration_token: Option<String>,
    /// The email address a `m.login.email.identity` stage proved, with its session id.
    pub email: Option<(String, String)>,
    /// The completed session, and the registration parameters it remembered.
    pub session: Option<(String, UiaSession)>,
}

impl Accounts {
    /// Succeeds once the client has completed one of `flows`; otherwise fails with the
    /// 401 challenge that tells it what is left. `user` is the account a password stage
    /// must prove; `purpose` binds the session to this kind of request.
    pub async fn require_uia(
        &self,
        flows: &[&[&'static str]],
        auth: Option<&AuthInput>,
        user: Option<&str>,
        purpose: &str,
        registration: Option<&RegistrationParams>,
    ) -> Result<UiaDone> {
        let ttl_ms = self.auth.uia_session_ttl_seconds.saturating_mul(1000);
        let purpose = format!("{purpose}:{}", user.unwrap_or(""));
        let Some(auth) = auth else {
            let id = match registration {
                Some(params) => Some(self.new_session(&[], &purpose, None, params).await?),
                None => None,
            };
            return Err(self.challenge(flows, id, &[], &purpose).await?);
        };

        let mut session = match &auth.session {
            Some(id) => match UIA_SESSIONS.get(&*self.db, id)?.map(|j| j.0) {
                Some(s)
                    if now_millis().saturating_sub(s.created_ms) <= ttl_ms
                        && s.purpose == purpose =>
                {
                    Some((id.clone(), s))
                }
                _ => {
                    return Err(Error::new(
                        ErrorKind::BadRequest,
                        code::UNKNOWN,
                        "Unknown or expired user-interactive auth session",
                    ));
                }
            },
            None => None,
        };
        let mut completed: Vec<String> =
            session.as_ref().map(|(_, s)| s.completed.clone()).unwrap_or_default();
        let mut registration_token =
            session.as_ref().and_then(|(_, s)| s.registration_token.clone());
        let mut email = None;

        if let Some(kind) = auth.kind.as_deref() {
            // A stage type this request does not offer is a client's mistake to report as
            // such (400): `M_UNRECOGNIZED` would read as "this endpoint does not exist".
            if !flows.iter().any(|f| f.contains(&kind)) {
                let offered: Vec<&str> = flows.iter().flat_map(|f| f.iter().copied()).collect();
                return Err(Error::invalid_param(format!(
                    "Auth stage {kind} is not offered here; offered: {}",
                    offered.join(", ")
                )));
            }
            // A failed stage answers with the challenge plus the error, so the client can
            // try again within the same session.
            match self.check_stage(kind, flows, auth, user, &purpose).await? {
                Ok(StageProof::Nothing) => {}
                Ok(StageProof::RegistrationToken(token)) => registration_token = Some(token),
                Ok(StageProof::Email(address, sid)) => email = Some((address, sid)),
                Err((errcode, message)) => {
                    let id = session.as_ref().map(|(id, _)| id.clone());
                    let err = self.challenge(flows, id, &completed, &purpose).await?;
                    return Err(with_error(err, errcode, message));
                }
            }
            if !completed.iter().any(|c| c == kind) {
                completed.push(kind.to_owned());
            }
        }

        let done =
            flows.iter().any(|flow| flow.iter().all(|stage| completed.iter().any(|c| c == stage)));
        if done {
            if registration.is_none()
                && let Some((id, _)) = &session
            {
                let mut batch = Batch::new();
                UIA_SESSIONS.delete(&mut batch, id);
                commit(&self.db, batch).await?;
            }
            // A registration's session stays: the registration records its account there.
            return Ok(UiaDone { registration_token, email, session });
        }
        // Progress made but a flow is not finished: remember it in the session.
        let id = match session.take() {
            Some((id, mut s)) => {
                s.completed = completed.clone();
                s.registration_token = registration_token;
                let mut batch = Batch::new();
                UIA_SESSIONS.put(&mut batch, &id, &Json(s));
                commit(&self.db, batch).await?;
                id
            }
            None => {
                let params = registration.cloned().unwrap_or_default();
                self.new_session(&completed, &purpose, registration_token, &params).await?
            }
        };
        Err(self.challenge(flows, Some(id), &completed, &purpose).await?)
    }

    /// Checks one stage; the inner error is the errcode and message of a failed stage.
    async fn check_stage(
        &self,
        kind: &str,
        flows: &[&[&'static str]],
        auth: &AuthInput,
        user: Option<&str>,
        purpose: &str,
    ) -> Result<Result<StageProof, (&'static str, String)>> {
        if !flows.iter().any(|f| f.contains(&kind)) {
            return Ok(Err((code::UNRECOGNIZED, format!("Auth stage {kind} is not offered here"))));
        }
        Ok(match kind {
            PASSWORD if !self.password_stage_ok(auth, user).await? => {
                Err((code::FORBIDDEN, "Invalid password".into()))
            }
            REGISTRATION_TOKEN => {
                let token = auth.token.clone().unwrap_or_default();
                if self.registration_token_valid(&token)? {
                    Ok(StageProof::RegistrationToken(token))
                } else {
                    Err((code::FORBIDDEN, "Invalid registration token".into()))
                }
            }
            EMAIL_IDENTITY => {
                let (sid, secret) = auth.threepid_creds.clone().unwrap_or_default();
                let email_purpose = if purpose.starts_with("register") {
                    super::threepid::Purpose::Register
                } else {
                    super::threepid::Purpose::Password
                };
                match self.validated_email(&sid, &secret, email_purpose) {
                    Ok(address) => Ok(StageProof::Email(address, sid)),
                    Err(e) => Err((e.errcode, e.message.to_string())),
                }
            }
            // Dummy stages need no check.
            _ => Ok(StageProof::Nothing),
        })
    }

    async fn password_stage_ok(&self, auth: &AuthInput, user: Option<&str>) -> Result<bool> {
        let (Some(expected), Some(password)) = (user, auth.password.clone()) else {
            return Ok(false);
        };
        // The identifier, if given, must name the account being acted on.
        if let Some(given) = &auth.user {
            let given = self.parse_username(given).ok();
            if given.as_deref() != Some(expected) {
                return Ok(false);
            }
        }
        let Some(hash) = self.user(expected)?.and_then(|u| u.password_hash) else {
            return Ok(false);
        };
        self.verify_password(password, hash).await
    }

    async fn new_session(
        &self,
        completed: &[String],
        purpose: &str,
        registration_token: Option<String>,
        registration: &RegistrationParams,
    ) -> Result<String> {
        let id = random::alphanumeric(24);
        let mut batch = Batch::new();
        UIA_SESSIONS.put(
            &mut batch,
            &id,
            &Json(UiaSession {
                created_ms: now_millis(),
                completed: completed.to_vec(),
                purpose: purpose.to_owned(),
                registration_token,
                registration: Some(registration.clone()).filter(|r| *r != Default::default()),
                registered: None,
            }),
        );
        commit(&self.db, batch).await?;
        Ok(id)
    }

    async fn challenge(
        &self,
        flows: &[&[&'static str]],
        session: Option<String>,
        completed: &[String],
        purpose: &str,
    ) -> Result<Error> {
        let session = match session {
            Some(s) => s,
            None => self.new_session(completed, purpose, None, &Default::default()).await?,
        };
        let flows: Vec<_> = flows.iter().map(|f| json!({ "stages": f })).collect();
        let mut err = Error::new(ErrorKind::Unauthenticated, "", "")
            .with_field("flows", flows)
            .with_field("params", json!({}))
            .with_field("session", session);
        if !completed.is_empty() {
            err = err.with_field("completed", completed.to_vec());
        }
        Ok(err)
    }

    /// The flows for re-authenticating `localpart`: a password if the account has one,
    /// otherwise (accounts made without a password) a dummy stage.
    /// Re-authenticates a signed-in user before a sensitive action (their password, or
    /// a dummy stage for accounts without one).
    pub async fn reauthenticate(
        &self,
        localpart: &str,
        auth: Option<&AuthInput>,
        purpose: &str,
    ) -> Result<()> {
        let flows = self.reauth_flows(localpart)?;
        self.require_uia(flows, auth, Some(localpart), purpose, None).await.map(drop)
    }

    pub fn reauth_flows(&self, localpart: &str) -> Result<&'static [&'static [&'static str]]> {
        let has_password = self.user(localpart)?.is_some_and(|u| u.password_hash.is_some());
        Ok(if has_password { &[&[PASSWORD]] } else { &[&[DUMMY]] })
    }
}

fn with_error(mut err: Error, errcode: &'static str, message: String) -> Error {
    err.errcode = errcode;
    err.message = message.into();
    err
}
