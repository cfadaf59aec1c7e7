//! Application services (the spec's Application Service API), for bridges and bots: the
//! registrations, authentication with an `as_token` (acting as any user of the service's
//! namespaces), and what the homeserver sends to a service (`transactions`, queries,
//! pings).

pub mod delivery;
pub mod extensions;
pub mod queries;
pub mod registration;
pub mod stored;
pub mod thirdparty;

use std::{
    collections::HashSet,
    path::PathBuf,
    sync::{Arc, RwLock},
};

use trellis_core::{Error, ErrorKind, Result, error::code};
use trellis_store::Db;

use crate::{Services, accounts::Session, audit::Client};
pub use registration::Registration;

/// The registered services, replaced whole on reload.
pub struct Appservices {
    server_name: String,
    registered: RwLock<Arc<Vec<Arc<Registration>>>>,
}

impl Appservices {
    pub fn new(server_name: &str, registrations: Vec<Registration>) -> Self {
        let list = registrations.into_iter().map(Arc::new).collect();
        Self { server_name: server_name.to_owned(), registered: RwLock::new(Arc::new(list)) }
    }

    /// Reads and checks the registration files and those stored in `db` (added at
    /// runtime); ids and tokens must be unique across them all.
    pub fn load(files: &[PathBuf], db: &Db) -> std::result::Result<Vec<Registration>, String> {
        let mut registrations: Vec<Registration> =
            files.iter().map(|f| Registration::from_file(f)).collect::<Result<_, _>>()?;
        for (id, yaml) in stored::all(db).map_err(|e| e.to_string())? {
            registrations
                .push(Registration::from_yaml(&yaml, &format!("stored registration {id}"))?);
        }
        check_unique(&registrations)?;
        Ok(registrations)
    }
}

/// Ids and tokens must be unique: a token names one service, an id one queue.
fn check_unique(registrations: &[Registration]) -> std::result::Result<(), String> {
    let (mut ids, mut tokens) = (HashSet::new(), HashSet::new());
    for reg in registrations {
        if !ids.insert(reg.id.as_str()) {
            return Err(format!("two application services have the id {:?}", reg.id));
        }
        for token in [&reg.as_token, &reg.hs_token] {
            if !tokens.insert(token.as_str()) {
                return Err(format!(
                    "application service {:?} shares a token with another one",
                    reg.id
                ));
            }
        }
    }
    Ok(())
}

impl Appservices {
    /// Replaces the registered services (a reload).
    pub fn replace(&self, registrations: Vec<Registration>) {
        let list = registrations.into_iter().map(Arc::new).collect();
        *self.registered.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(list);
    }

    pub fn all(&self) -> Arc<Vec<Arc<Registration>>> {
        self.registered.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn by_token(&self, as_token: &str) -> Option<Arc<Registration>> {
        let all = self.all();
        all.iter().find(|r| r.as_token == as_token).cloned()
    }

    pub fn by_id(&self, id: &str) -> Option<Arc<Registration>> {
        self.all().iter().find(|r| r.id == id).cloned()
    }

    /// The service that holds `user_id` in an exclusive namespace, if any.
    pub fn exclusive_user_owner(&self, user_id: &str) -> Option<Arc<Registration>> {
        let all = self.all();
        all.iter().find(|r| r.claims_user_exclusively(user_id, &self.server_name)).cloned()
    }

    /// The service that holds `alias` in an exclusive namespace, if any.
    pub fn exclusive_alias_owner(&self, alias: &str) -> Option<Arc<Registration>> {
        self.all().iter().find(|r| r.claims_alias_exclusively(alias)).cloned()
    }

    pub fn server_name(&self) -> &str {
        &self.server_name
    }
}

/// Resolves the access token of a request: a user's token, or an application service's
/// `as_token` acting as the user in the `user_id` query parameter (its sender when
/// absent) and, with `device_id`, as one of that user's devices.
pub async fn authenticate(
    services: &Services,
    token: &str,
    query: Option<&str>,
    client: &Client,
) -> Result<Session> {
    let Some(reg) = services.appservices.by_token(token) else {
        return services.accounts.authenticate(token, client).await;
    };
    let param = |name: &str| {
        url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    };
    let accounts = &services.accounts;
    let user_id = param("user_id").unwrap_or_else(|| accounts.user_id(&reg.sender_localpart));
    if !reg.claims_user(&user_id, services.server_name()) {
        return Err(Error::forbidden("The application service cannot act as this user"));
    }
    let localpart = accounts
        .local_part(&user_id)
        .ok_or_else(|| Error::forbidden("The application service cannot act as this user"))?
        .to_owned();
    let user = match accounts.user(&localpart)? {
        Some(user) if !user.deactivated => user,
        _ => return Err(Error::forbidden("The application service has not registered this user")),
    };
    let device_id = match param("device_id").or_else(|| param("org.matrix.msc3202.device_id")) {
        Some(device) => {
            if accounts.device(&localpart, &device).is_err() {
                return Err(Error::new(
                    ErrorKind::BadRequest,
                    code::UNKNOWN_DEVICE,
                    "No such device of this user",
                ));
            }
            device
        }
        None => String::new(),
    };
    Ok(Session::of(localpart, device_id, &user, Some(reg.id.clone())))
}

/// Makes sure every service's sender user exists (without a password).
pub async fn ensure_senders(services: &Services) -> Result<()> {
    for reg in services.appservices.all().iter() {
        let localpart = services.accounts.parse_username(&reg.sender_localpart)?;
        services.accounts.ensure_service_user(&localpart).await?;
    }
    Ok(())
}

/// The service a request authenticated as, with the user it names (a localpart or user
/// id) checked against its user namespaces: the caller of `m.login.application_service`
/// registration and login.
pub fn vouch(services: &Services, session: Option<&Session>, user: &str) -> Result<String> {
    let reg = session
        .and_then(|s| s.appservice.as_deref())
        .and_then(|id| services.appservices.by_id(id))
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Unauthenticated,
                code::MISSING_TOKEN,
                "m.login.application_service needs the application service's as_token",
            )
        })?;
    let localpart = services.accounts.parse_username(user)?;
    let user_id = services.accounts.user_id(&localpart);
    let taken = services.appservices.exclusive_user_owner(&user_id).is_some_and(|o| o.id != reg.id);
    if !reg.claims_user(&user_id, services.server_name()) || taken {
        return Err(Error::new(
            ErrorKind::BadRequest,
            code::EXCLUSIVE,
            "The user is outside the application service's namespaces",
        ));
    }
    Ok(localpart)
}

/// Refuses a user id that an application service holds exclusively, for anyone but
/// that service (ordinary registration, `register/available`).
pub fn check_not_exclusive(services: &Services, localpart: &str) -> Result<()> {
    let user_id = services.accounts.user_id(localpart);
    if services.appservices.exclusive_user_owner(&user_id).is_some() {
        return Err(Error::new(
            ErrorKind::BadRequest,
            code::EXCLUSIVE,
            "This user id is reserved by an application service",
        ));
    }
    Ok(())
}

/// Re-reads the registrations (SIGHUP, or one added or removed at runtime): the new set
/// replaces the old only if every one is valid, and the senders restart for it.
pub async fn reload(services: &Arc<Services>) -> std::result::Result<usize, String> {
    let files = &services.config.appservice.registration_files;
    let registrations = Appservices::load(files, &services.db)?;
    let count = registrations.len();
    services.appservices.replace(registrations);
    ensure_senders(services).await.map_err(|e| e.to_string())?;
    services.appservice_delivery.start(services);
    Ok(count)
}

/// Refuses an alias that an application service holds exclusively to anyone but that
/// service.
pub fn check_alias_not_exclusive(
    services: &Services,
    session: &Session,
    alias: &str,
) -> Result<()> {
    match services.appservices.exclusive_alias_owner(alias) {
        Some(owner) if session.appservice.as_deref() != Some(owner.id.as_str()) => Err(Error::new(
            ErrorKind::BadRequest,
            code::EXCLUSIVE,
            "This alias is reserved by an application service",
        )),
        _ => Ok(()),
    }
}

/// Adds a registration at runtime (admin API): checked like a file, unique among all,
/// stored, and in effect at once. Answers its id.
pub async fn add(services: &Arc<Services>, yaml: &str) -> Result<String> {
    let reg = Registration::from_yaml(yaml, "the registration").map_err(Error::invalid_param)?;
    let mut all: Vec<Registration> =
        services.appservices.all().iter().map(|r| (**r).clone()).collect();
    all.push(reg.clone());
    check_unique(&all).map_err(Error::invalid_param)?;
    stored::put(&services.db, &reg.id, yaml).await?;
    reload(services).await.map_err(|e| Error::internal("reloading application services", e))?;
    Ok(reg.id)
}

/// Removes a registration added at runtime; those from files stay until their file goes.
pub async fn remove(services: &Arc<Services>, id: &str) -> Result<()> {
    if !stored::remove(&services.db, id).await? {
        return Err(match services.appservices.by_id(id) {
            Some(_) => Error::invalid_param(
                "This registration comes from a file named in the configuration",
            ),
            None => Error::not_found("No such application service"),
        });
    }
    reload(services).await.map_err(|e| Error::internal("reloading application services", e))?;
    // Its queue would never be sent again.
    delivery::forget(&services.db, id).await
}
