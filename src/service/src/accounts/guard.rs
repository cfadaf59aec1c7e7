//! Brute-force protection for logins: after a threshold of failures for an account or a
//! client address, each further attempt must wait, doubling up to a ceiling.

use std::{collections::HashMap, sync::Mutex};

use trellis_core::{Error, Result, now_millis};

const MAX_ENTRIES: usize = 100_000;
/// Failures older than this are forgotten.
const FORGET_AFTER_MS: u64 = 24 * 3600 * 1000;

pub(super) struct LoginGuard {
    threshold: u32,
    max_backoff_ms: u64,
    failures: Mutex<HashMap<String, (u32, u64)>>,
}

impl LoginGuard {
    pub fn new(threshold: u32, max_backoff_seconds: u64) -> Self {
        Self {
            threshold,
            max_backoff_ms: max_backoff_seconds.saturating_mul(1000),
            failures: Default::default(),
        }
    }

    fn wait_ms(&self, failures: u32) -> u64 {
        if failures < self.threshold {
            return 0;
        }
        let exp = (failures - self.threshold).min(30);
        (1000u64 << exp).min(self.max_backoff_ms)
    }

    /// Fails with 429 if any of `keys` is still backing off.
    pub fn check(&self, keys: &[&str]) -> Result<()> {
        let now = now_millis();
        let Ok(map) = self.failures.lock() else { return Ok(()) };
        for key in keys {
            if let Some(&(count, last)) = map.get(*key) {
                let until = last.saturating_add(self.wait_ms(count));
                if until > now {
                    return Err(Error::limit_exceeded(until - now));
                }
            }
        }
        Ok(())
    }

    pub fn failed(&self, keys: &[&str]) {
        let now = now_millis();
        let Ok(mut map) = self.failures.lock() else { return };
        if map.len() >= MAX_ENTRIES {
            map.retain(|_, (_, last)| now.saturating_sub(*last) < FORGET_AFTER_MS);
            if map.len() >= MAX_ENTRIES {
                map.clear();
            }
        }
        for key in keys {
            let entry = map.entry((*key).to_owned()).or_insert((0, now));
            entry.0 = entry.0.saturating_add(1);
            entry.1 = now;
        }
    }

    pub fn succeeded(&self, key: &str) {
        if let Ok(mut map) = self.failures.lock() {
            map.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backs_off_exponentially_after_threshold() {
        let g = LoginGuard::new(3, 60);
        assert_eq!(g.wait_ms(2), 0);
        assert_eq!(g.wait_ms(3), 1000);
        assert_eq!(g.wait_ms(4), 2000);
        assert_eq!(g.wait_ms(10), 60_000);
        assert_eq!(g.wait_ms(u32::MAX), 60_000);
        for _ in 0..3 {
            g.check(&["acct"]).unwrap();
            g.failed(&["acct"]);
        }
        let err = g.check(&["acct"]).unwrap_err();
        assert_eq!(err.errcode, "M_LIMIT_EXCEEDED");
        g.check(&["other"]).unwrap();
        g.succeeded("acct");
        g.check(&["acct"]).unwrap();
    }
}
