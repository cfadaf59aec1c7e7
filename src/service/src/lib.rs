//! The domain: everything the server does, independent of HTTP.

/// A JSON object built from owned values, moved in. `serde_json::json!` serialises each
/// value it is given into a new tree: a deep copy of every `Value` nested in it, which
/// made a sync response cost several copies of itself.
#[macro_export]
macro_rules! object {
    ($($key:literal : $value:expr),* $(,)?) => {{
        #[allow(unused_mut)]
        let mut map = ::serde_json::Map::new();
        $( map.insert(::std::string::String::from($key), ::serde_json::Value::from($value)); )*
        ::serde_json::Value::Object(map)
    }};
}

pub mod accounts;
pub mod admin;
pub mod analytics;
pub mod appservice;
pub mod audit;
pub mod backup;
pub mod call_history;
pub mod call_leaves;
pub mod delayed_events;
pub mod durable;
pub mod e2ee;
pub mod export;
pub mod federation;
pub mod keys;
mod locks;
pub mod mailer;
pub mod media;
pub mod pipeline;
pub mod policy;
pub mod push;
mod random;
pub mod ratelimit;
pub mod realtime;
pub mod reports;
pub mod rooms;
pub mod rtc;
pub mod search;
pub mod tables;
pub mod voip;
pub mod webhooks;

use std::sync::Arc;

use tracing::Instrument;

use trellis_core::{Config, Error, Result, metrics::Metrics};
use trellis_store::{Batch, Db};

pub use accounts::Accounts;
pub use accounts::{account_data::AccountData, profile::Profiles};
pub use audit::{Audit, Client};
pub use keys::ServerKeys;
pub use ratelimit::RateLimiter;
pub use trellis_store::{FaultCause, WriteFault};

/// Every service, built once at start-up and shared by all requests.
pub struct Services {
    pub config: Config,
    pub db: Db,
    pub keys: Arc<ServerKeys>,
    /// Rooms as stored: what every read path reads.
    pub rooms: Arc<rooms::Rooms>,
    /// Appends to rooms (local events and events from other servers) and runs the event
    /// pipeline on each.
    pub timeline: rooms::append::Timeline,
    pub aliases: rooms::aliases::Aliases,
    pub public_rooms: rooms::public::PublicRooms,
    pub audit: Arc<Audit>,
    pub accounts: Accounts,
    pub profiles: Profiles,
    pub account_data: AccountData,
    pub push_rules: Arc<push::rules::PushRules>,
    pub pushers: push::pushers::Pushers,
    pub presence: Arc<realtime::presence::Presence>,
    pub filters: realtime::filters::Filters,
    pub typing: Arc<realtime::typing::Typing>,
    pub receipts: realtime::receipts::Receipts,
    pub notifier: Arc<push::notify::Notifier>,
    pub sliding: realtime::sliding::Connections,
    pub rate_limits: RateLimiter,
    pub mailer: Option<mailer::Mailer>,
    pub directory: accounts::directory::UserDirectory,
    pub e2ee: e2ee::E2ee,
    pub federation: Arc<federation::Federation>,
    /// Registered application services (bridges, bots).
    pub appservices: appservice::Appservices,
    /// What is sent to them (a pipeline step and a sender per service).
    pub appservice_delivery: Arc<appservice::delivery::Delivery>,
    /// Pushes to push gateways (a pipeline step and a sender per pusher).
    pub push_gateway: Arc<push::gateway::Gateway>,
    /// Message search (a pipeline step and an indexer task).
    pub search: Arc<search::Search>,
    pub media: media::Media,
    pub metrics: Metrics,
    /// The content policy messages in public rooms and new account names are held to.
    pub policy: policy::ContentPolicy,
    /// Daily usage aggregates (a pipeline step, flushed by a task of its own).
    pub analytics: Arc<analytics::Analytics>,
    /// Background jobs admins start.
    pub jobs: admin::jobs::Jobs,
    /// Backups taken while the server runs (by an admin or the schedule).
    pub backups: backup::Backups,
    /// Data exports ("download my data") of this process.
    pub exports: export::Exports,
    /// Delayed events (a pipeline step, posted by a scheduler task of its own).
    pub delayed_events: Arc<delayed_events::DelayedEvents>,
    /// Calls, read from their signalling (a pipeline step).
    pub call_history: Arc<call_history::CallHistory>,
    /// Delayed call leaves handed over to the server, sent when the SFU sees the member go.
    pub call_leaves: call_leaves::CallLeaves,
    /// The built-in TURN server, once it listens.
    pub builtin_turn: std::sync::OnceLock<voip::BuiltinTurn>,
}

impl Services {
    /// Builds every service; fails on configuration that can only be checked by loading
    /// files (such as a JWT public key).
    pub fn new(config: Config, db: Db, keys: ServerKeys) -> Result<Arc<Self>, String> {
        let server_name = config.server.server_name.clone();
        let rooms = Arc::new(
            rooms::Rooms::open(db.clone(), &server_name)
                .map_err(|e| format!("loading rooms: {e}"))?,
        );
        rooms.set_retention(rooms::retention::Limits::from_config(&config.retention));
        let stream = rooms.stream.clone();
        let audit = Arc::new(Audit::new(db.clone()));
        let jwt = accounts::jwt::JwtVerifier::from_config(&config.jwt)?;
        let accounts = Accounts::with_jwt(
            db.clone(),
            server_name.clone(),
            config.registration.clone(),
            config.auth.clone(),
            audit.clone(),
            jwt,
        )
        .with_email_code_lifetime(config.email.code_lifetime_seconds)
        .with_device_changes(rooms.clone());
        let mailer = mailer::Mailer::from_config(&config.email, &server_name)?;
        let keys = Arc::new(keys);
        let e2ee = e2ee::E2ee::new(db.clone(), rooms.clone(), server_name.clone());
        let federation = Arc::new(federation::Federation::new(
            db.clone(),
            server_name.clone(),
            keys.clone(),
            config.federation.clone(),
        )?);
        let media = media::Media::new(&config, db.clone(), None)?;
        let appservices = appservice::Appservices::new(
            &server_name,
            appservice::Appservices::load(&config.appservice.registration_files, &db)?,
        );
        let push_rules = Arc::new(push::rules::PushRules::new(db.clone(), stream.clone()));
        let notifier = Arc::new(push::notify::Notifier::new(
            db.clone(),
            rooms.clone(),
            push_rules.clone(),
            &server_name,
        ));
        // The event pipeline, in order (see `pipeline.rs` for what comes next).
        let guest_eviction = Arc::new(rooms::guests::GuestEviction::default());
        let appservice_delivery = Arc::new(
            appservice::delivery::Delivery::new(&config.appservice).map_err(|e| e.to_string())?,
        );
        let push_gateway =
            Arc::new(push::gateway::Gateway::new(&config.push).map_err(|e| e.to_string())?);
        let search = Arc::new(
            search::Search::open(&config.search, &config.search_path())
                .map_err(|e| format!("opening the search index: {e}"))?,
        );
        let metrics = Metrics::new();
        let analytics = Arc::new(analytics::Analytics::new(db.clone(), &server_name, &metrics));
        let delayed_events = Arc::new(
            delayed_events::DelayedEvents::open(
                db.clone(),
                config.rooms.max_event_delay_ms,
                config.rooms.max_delayed_events_per_user,
            )
            .map_err(|e| format!("loading delayed events: {e}"))?,
        );
        let call_history = Arc::new(call_history::CallHistory::new(db.clone(), &server_name));
        let pipeline = pipeline::Pipeline::new(vec![
            notifier.clone(),
            Arc::new(federation::sender::FanOut::new(federation.clone(), rooms.clone())),
            guest_eviction.clone(),
            appservice_delivery.clone(),
            push_gateway.clone(),
            search.clone(),
            analytics.clone(),
            delayed_events.clone(),
            call_history.clone(),
            Arc::new(media::uses::MediaUses::new(db.clone(), &server_name)),
        ]);
        let timeline = rooms::append::Timeline::new(rooms.clone(), keys.clone(), pipeline);
        let services = Arc::new(Self {
            aliases: rooms::aliases::Aliases::new(db.clone(), server_name.clone()),
            public_rooms: rooms::public::PublicRooms::new(db.clone()),
            profiles: Profiles::new(db.clone()),
            account_data: AccountData::new(db.clone(), stream.clone()),
            push_rules,
            pushers: push::pushers::Pushers::new(db.clone())
                .map_err(|e| format!("loading pushers: {e}"))?,
            presence: realtime::presence::Presence::new(
                db.clone(),
                rooms.clone(),
                &config.presence,
            ),
            filters: realtime::filters::Filters::new(db.clone()),
            typing: realtime::typing::Typing::new(stream.clone()),
            receipts: realtime::receipts::Receipts::new(db.clone(), stream),
            sliding: realtime::sliding::Connections::default(),
            notifier,
            rate_limits: RateLimiter::new(config.rate_limits.clone()),
            mailer,
            directory: accounts::directory::UserDirectory::new(
                db.clone(),
                config.user_directory.search_all_users,
            )
            .map_err(|e| format!("loading the user directory: {e}"))?,
            media,
            appservices,
            appservice_delivery: appservice_delivery.clone(),
            push_gateway: push_gateway.clone(),
            search,
            audit,
            accounts,
            e2ee,
            federation,
            rooms,
            timeline,
            keys,
            db,
            policy: policy::ContentPolicy::from_config(&config.content_policy)?,
            config,
            metrics,
            analytics,
            jobs: Default::default(),
            backups: Default::default(),
            exports: Default::default(),
            delayed_events,
            builtin_turn: std::sync::OnceLock::new(),
            call_history,
            call_leaves: call_leaves::CallLeaves::default(),
        });
        guest_eviction.attach(&services);
        appservice_delivery.attach(&services);
        push_gateway.attach(&services);
        Ok(services)
    }

    pub fn server_name(&self) -> &str {
        &self.config.server.server_name
    }

    /// The base URL for links this server hands out (in mails, `submit_url`).
    pub fn public_base_url(&self) -> String {
        self.config.public_base_url()
    }

    /// Refreshes the storage gauges; called when metrics are scraped.
    pub fn update_storage_metrics(&self) {
        for stat in self.db.stats() {
            self.metrics
                .storage
                .get_or_create(&trellis_core::metrics::StorageLabels {
                    family: stat.family,
                    stat: stat.stat.to_string(),
                })
                .set(stat.value);
        }
        let health = &self.metrics.storage_health;
        health.writable.set(i64::from(self.db.write_fault().is_none()));
        let errors = self.db.write_errors();
        health.set_write_errors(FaultCause::OutOfSpace.as_str(), errors.out_of_space);
        health.set_write_errors(FaultCause::Io.as_str(), errors.io);
    }

    /// Whether storage takes writes: `Err` with the cause while it does not. While a fault
    /// is recorded this tries an empty write, so a recovered engine reads as healthy.
    pub fn storage_health(&self) -> std::result::Result<(), WriteFault> {
        if self.db.write_fault().is_none() {
            return Ok(());
        }
        let _ = self.db.probe_write();
        self.db.write_fault().map_or(Ok(()), Err)
    }
}

/// How often a storage fault is re-checked when nothing else writes.
const STORAGE_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// While storage refuses writes, checks every few seconds whether it takes them again,
/// so that the fault, `/health` and the log end when the engine recovers, not at the
/// next client write. Runs until the process ends.
pub async fn watch_storage(services: Arc<Services>) {
    let mut ticker = tokio::time::interval(STORAGE_CHECK_INTERVAL);
    loop {
        ticker.tick().await;
        if services.db.write_fault().is_some() {
            let s = services.clone();
            let _ = tokio::task::spawn_blocking(move || s.storage_health())
                .instrument(tracing::info_span!("storage_watch"))
                .await;
        }
    }
}

/// How often expired short-lived records are swept.
const SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(600);

/// Background upkeep: sweeps expired UIA sessions, email validations and login tokens,
/// media ids reserved by `/create` and never used, and stale URL previews.
/// Runs until the process ends.
pub async fn run_janitor(services: Arc<Services>) {
    let mut ticker = tokio::time::interval(SWEEP_INTERVAL);
    loop {
        ticker.tick().await;
        let swept =
            services.accounts.sweep_expired().instrument(tracing::info_span!("janitor")).await;
        match swept {
            Ok(0) => {}
            Ok(n) => tracing::info!(removed = n, "swept expired records"),
            Err(e) => tracing::warn!(error = %e, "sweeping expired records failed"),
        }
        let swept = services.media.sweep().instrument(tracing::info_span!("media_janitor")).await;
        match swept {
            Ok(0) => {}
            Ok(n) => tracing::info!(removed = n, "swept unused media ids and stale previews"),
            Err(e) => tracing::warn!(error = %e, "sweeping media records failed"),
        }
        let media = &services.config.media;
        let swept = async {
            let avatars = admin::media::avatars(&services)?;
            services
                .media
                .expire_unused(
                    trellis_core::now_millis(),
                    media.local_retention_days,
                    media.remote_retention_days,
                    &avatars,
                )
                .await
        }
        .instrument(tracing::info_span!("media_retention"))
        .await;
        match swept {
            Ok(0) => {}
            Ok(n) => tracing::info!(removed = n, "deleted media nobody asked for in a while"),
            Err(e) => tracing::warn!(error = %e, "media retention failed"),
        }
        let retention = services.config.admin.audit_retention_days;
        let swept = admin::audit_log::sweep(&services, retention)
            .instrument(tracing::info_span!("audit_janitor"))
            .await;
        match swept {
            Ok(0) => {}
            Ok(n) => tracing::info!(removed = n, "removed audit records past their retention"),
            Err(e) => tracing::warn!(error = %e, "sweeping the audit log failed"),
        }
    }
}

/// Once at start, with media encryption at rest: seals files stored before it was turned
/// on and reseals those under a retired key.
pub async fn reseal_media(services: Arc<Services>) {
    let resealed = services.media.reseal().instrument(tracing::info_span!("media_reseal")).await;
    match resealed {
        Ok(0) => {}
        Ok(n) => tracing::info!(resealed = n, "media files sealed under the current key"),
        Err(e) => {
            tracing::warn!(error = %e, "resealing media files stopped; the next start goes on")
        }
    }
}

/// A random alphanumeric token of `len` characters from the OS CSPRNG.
pub fn random_token(len: usize) -> String {
    random::alphanumeric(len)
}

/// Writes a batch off the async workers: with `sync_writes` it waits for an fsync.
pub(crate) async fn commit(db: &Db, batch: Batch) -> Result<()> {
    let db = db.clone();
    tokio::task::spawn_blocking(move || db.write(batch))
        .await
        .map_err(|e| Error::internal("storage task", e))?
        .map_err(Into::into)
}
