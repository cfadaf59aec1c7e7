//! The domain: everything the server does, independent of HTTP.

pub mod accounts;
pub mod keys;
pub mod password;
mod random;
pub mod tables;

use std::sync::Arc;

use trellis_core::{Config, metrics::Metrics};
use trellis_store::Db;

pub use accounts::Accounts;
pub use keys::ServerKeys;

/// Every service, built once at start-up and shared by all requests.
pub struct Services {
    pub config: Config,
    pub db: Db,
    pub keys: ServerKeys,
    pub accounts: Accounts,
    pub metrics: Metrics,
}

impl Services {
    pub fn new(config: Config, db: Db, keys: ServerKeys) -> Arc<Self> {
        let accounts = Accounts::new(
            db.clone(),
            config.server.server_name.clone(),
            config.registration.clone(),
        );
        Arc::new(Self { config, db, keys, accounts, metrics: Metrics::new() })
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
