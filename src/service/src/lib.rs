//! The domain: everything the server does, independent of HTTP.

pub mod account_data;
pub mod accounts;
pub mod audit;
pub mod keys;
pub mod password;
pub mod profile;
mod random;
pub mod ratelimit;
pub mod tables;

use std::sync::Arc;

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
    pub keys: ServerKeys,
    pub audit: Arc<Audit>,
    pub accounts: Accounts,
    pub profiles: Profiles,
    pub account_data: AccountData,
    pub rate_limits: RateLimiter,
    pub metrics: Metrics,
}

impl Services {
    pub fn new(config: Config, db: Db, keys: ServerKeys) -> Arc<Self> {
        let audit = Arc::new(Audit::new(db.clone()));
        let accounts = Accounts::new(
            db.clone(),
            config.server.server_name.clone(),
            config.registration.clone(),
            config.auth.clone(),
            audit.clone(),
        );
        Arc::new(Self {
            profiles: Profiles::new(db.clone()),
            account_data: AccountData::new(db.clone()),
            rate_limits: RateLimiter::new(config.rate_limits.clone()),
            audit,
            accounts,
            keys,
            db,
            config,
            metrics: Metrics::new(),
        })
    }

    pub fn server_name(&self) -> &str {
        &self.config.server.server_name
    }

    /// Refreshes the storage gauges; called when metrics are scraped.
    pub fn update_storage_metrics(&self) {
        for stat in self.db.stats() {
            self.metrics
                .storage
                .get_or_create(&trellis_core::metrics::StorageLabels {
                    table: stat.table,
                    stat: stat.stat.to_string(),
                })
                .set(stat.value);
        }
    }
}

/// Writes a batch off the async workers: with `sync_writes` it waits for an fsync.
pub(crate) async fn commit(db: &Db, batch: Batch) -> Result<()> {
    let db = db.clone();
    tokio::task::spawn_blocking(move || db.write(batch))
        .await
        .map_err(|e| Error::internal("storage task", e))?
        .map_err(Into::into)
}
