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

pub mod account_data;
pub mod accounts;
pub mod audit;
pub mod directory;
pub mod durable;
pub mod e2ee;
pub mod federation;
pub mod filters;
pub mod keys;
pub mod live;
pub mod mailer;
pub mod media;
pub mod notify;
pub mod out;
pub mod password;
pub mod presence;
pub mod profile;
pub mod push_rules;
pub mod pushers;
mod random;
pub mod ratelimit;
pub mod receipts;
pub mod rooms;
pub mod sliding;
pub mod sync;
pub mod tables;
pub mod typing;
pub mod viewer;

use std::sync::Arc;

use tracing::Instrument;

use trellis_core::{Config, Error, Result, metrics::Metrics};
use trellis_store::{Batch, Db};

pub use account_data::AccountData;
pub use accounts::Accounts;
pub use audit::{Audit, Client};
pub use keys::ServerKeys;
pub use profile::Profiles;
pub use ratelimit::RateLimiter;

/// Every service, built once at start-up and shared by all requests.
pub struct Services {
    pub config: Config,
    pub db: Db,
    pub keys: Arc<ServerKeys>,
    pub rooms: rooms::append::Timeline,
    pub aliases: rooms::aliases::Aliases,
    pub public_rooms: rooms::public::PublicRooms,
    pub audit: Arc<Audit>,
    pub accounts: Accounts,
    pub profiles: Profiles,
    pub account_data: AccountData,
    pub push_rules: push_rules::PushRules,
    pub pushers: pushers::Pushers,
    pub presence: Arc<presence::Presence>,
    pub filters: filters::Filters,
    pub typing: Arc<typing::Typing>,
    pub receipts: receipts::Receipts,
    pub notifier: notify::Notifier,
    pub sliding: sliding::Connections,
    pub rate_limits: RateLimiter,
    pub mailer: Option<mailer::Mailer>,
    pub directory: directory::UserDirectory,
    pub e2ee: e2ee::E2ee,
    pub federation: federation::Federation,
    pub media: media::Media,
    pub metrics: Metrics,
}

impl Services {
    /// Builds every service; fails on configuration that can only be checked by loading
    /// files (such as a JWT public key).
    pub fn new(config: Config, db: Db, keys: ServerKeys) -> Result<Arc<Self>, String> {
        let audit = Arc::new(Audit::new(db.clone()));
        let jwt = accounts::jwt::JwtVerifier::from_config(&config.jwt)?;
        let accounts = Accounts::with_jwt(
            db.clone(),
            config.server.server_name.clone(),
            config.registration.clone(),
            config.auth.clone(),
            audit.clone(),
            jwt,
        )
        .with_email_code_lifetime(config.email.code_lifetime_seconds);
        let mailer = mailer::Mailer::from_config(&config.email, &config.server.server_name)?;
        let keys = Arc::new(keys);
        let rooms =
            rooms::append::Timeline::new(db.clone(), keys.clone(), &config.server.server_name)
                .map_err(|e| format!("loading rooms: {e}"))?;
        let stream = rooms.stream.clone();
        accounts.set_stream(stream.clone());
        let e2ee = e2ee::E2ee::new(db.clone(), stream.clone(), config.server.server_name.clone());
        let federation = federation::Federation::new(
            db.clone(),
            config.server.server_name.clone(),
            keys.clone(),
            config.federation.clone(),
        )?;
        let media = media::Media::new(&config, db.clone(), None)?;
        let services = Arc::new(Self {
            rooms,
            aliases: rooms::aliases::Aliases::new(db.clone(), config.server.server_name.clone()),
            public_rooms: rooms::public::PublicRooms::new(db.clone()),
            profiles: Profiles::new(db.clone()),
            account_data: AccountData::new(db.clone(), stream.clone()),
            push_rules: push_rules::PushRules::new(db.clone(), stream.clone()),
            pushers: pushers::Pushers::new(db.clone()),
            presence: presence::Presence::new(db.clone(), stream.clone(), &config.presence),
            filters: filters::Filters::new(db.clone()),
            typing: typing::Typing::new(stream.clone()),
            receipts: receipts::Receipts::new(db.clone(), stream),
            sliding: sliding::Connections::default(),
            notifier: notify::Notifier::new(db.clone()),
            rate_limits: RateLimiter::new(config.rate_limits.clone()),
            mailer,
            directory: directory::UserDirectory::new(
                db.clone(),
                config.user_directory.search_all_users,
            ),
            media,
            audit,
            accounts,
            e2ee,
            federation,
            keys,
            db,
            config,
            metrics: Metrics::new(),
        });
        // Push rules are evaluated for each appended event before it is visible; the hook
        // holds the services weakly (they own the timeline that holds the hook).
        let weak = Arc::downgrade(&services);
        let rooms_of = weak.clone();
        services.rooms.stream.set_rooms_of(Box::new(move |user| {
            rooms_of.upgrade().and_then(|s| s.rooms.rooms_of(user, "join").ok()).unwrap_or_default()
        }));
        services.rooms.set_hook(Arc::new(move |room_id, position, pdu, members| {
            let weak = weak.clone();
            Box::pin(async move {
                let services = weak.upgrade()?;
                let span = tracing::debug_span!("push_rules", room_id, position);
                let evaluated = services
                    .notifier
                    .evaluate(&services, &room_id, position, &pdu, members)
                    .instrument(span)
                    .await;
                let wal = match evaluated {
                    Ok(wal) => wal,
                    Err(e) => {
                        tracing::warn!(room_id, position, error = %e, "evaluating push rules failed");
                        None
                    }
                };
                if matches!(
                    pdu.kind,
                    ruma::events::TimelineEventType::RoomMember
                        | ruma::events::TimelineEventType::RoomServerAcl
                ) {
                    services.federation.outbox.membership_changed(&room_id);
                }
                // This server's own events go to the other servers in the room.
                if pdu.sender.server_name().as_str() == services.server_name()
                    && let Err(e) = federation::sender::send_pdu(&services, &room_id, &pdu).await
                {
                    tracing::warn!(error = %e, "queueing an event for federation failed");
                }
                wal
            })
        }));
        Ok(services)
    }

    pub fn server_name(&self) -> &str {
        &self.config.server.server_name
    }

    /// The base URL for links this server hands out (in mails, `submit_url`).
    pub fn public_base_url(&self) -> String {
        let configured = self.config.email.public_base_url.trim_end_matches('/');
        if configured.is_empty() {
            format!("http://{}", self.config.server.listen)
        } else {
            configured.to_owned()
        }
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
