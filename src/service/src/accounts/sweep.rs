//! Removal of expired short-lived records (UIA sessions, email validations, login
//! and OpenID tokens), so abandoned ones cannot pile up without bound.

use trellis_core::{Result, now_millis};
use trellis_store::{Batch, Direction, Json, KeyCodec, Table, ValueCodec};

use super::Accounts;
use crate::{
    commit,
    tables::{LOGIN_TOKENS, OPENID_TOKENS, THREEPID_SESSIONS, UIA_SESSIONS},
};

/// Deletes written per batch.
const CHUNK: usize = 1000;
/// How long a validated email session may still be used (matches threepid.rs).
const VALIDATED_TTL_MS: u64 = 24 * 3600 * 1000;

impl Accounts {
    /// Deletes every expired record; returns how many went.
    pub async fn sweep_expired(&self) -> Result<usize> {
        let now = now_millis();
        let uia_ttl = self.auth.uia_session_ttl_seconds.saturating_mul(1000);
        let mut removed =
            self.sweep(UIA_SESSIONS, |Json(s)| s.created_ms.saturating_add(uia_ttl) < now).await?;
        removed += self
            .sweep(THREEPID_SESSIONS, |Json(s)| match s.validated_ms {
                Some(v) => v.saturating_add(VALIDATED_TTL_MS) < now,
                None => s.expires_ms < now,
            })
            .await?;
        removed += self.sweep(LOGIN_TOKENS, |Json(t)| t.expires_ms < now).await?;
        removed += self.sweep(OPENID_TOKENS, |Json(t)| t.expires_ms < now).await?;
        Ok(removed)
    }

    async fn sweep<K, V>(&self, table: Table<K, V>, expired: impl Fn(&V) -> bool) -> Result<usize>
    where
        K: KeyCodec + 'static,
        V: ValueCodec + 'static,
    {
        let mut doomed = Vec::new();
        for entry in table.scan_range(
            &*self.db,
            std::ops::Bound::Unbounded,
            std::ops::Bound::Unbounded,
            Direction::Forward,
        )? {
            let (key, value) = entry?;
            if expired(&value) {
                doomed.push(key);
            }
        }
        let removed = doomed.len();
        for chunk in doomed.chunks(CHUNK) {
            let mut batch = Batch::new();
            for key in chunk {
                table.delete(&mut batch, key);
            }
            commit(&self.db, batch).await?;
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use trellis_core::config::{AuthConfig, RegistrationConfig, RegistrationMode, StorageConfig};

    use crate::{Accounts, Audit, Client, accounts::RegisterRequest};

    #[tokio::test]
    async fn abandoned_uia_sessions_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = StorageConfig { block_cache_mb: 8, sync_writes: false, ..Default::default() };
        let db = trellis_store::open(dir.path(), &cfg).unwrap();
        let auth = AuthConfig { uia_session_ttl_seconds: 0, ..Default::default() };
        let registration =
            RegistrationConfig { mode: RegistrationMode::Open, ..Default::default() };
        let accounts = Accounts::new(
            db.clone(),
            "example.org".into(),
            registration,
            auth,
            Arc::new(Audit::new(db)),
        );
        // Each unauthenticated registration attempt leaves a session behind.
        for _ in 0..3 {
            let err = accounts
                .register(RegisterRequest::default(), &Client::default())
                .await
                .unwrap_err();
            assert_eq!(err.kind, trellis_core::ErrorKind::Unauthenticated);
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        assert_eq!(accounts.sweep_expired().await.unwrap(), 3);
        assert_eq!(accounts.sweep_expired().await.unwrap(), 0);
    }
}
