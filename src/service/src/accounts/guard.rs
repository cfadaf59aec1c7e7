//! Brute-force protection for logins: after a threshold of failures for an account or a
//! client address, each further attempt must wait, doubling up to a ceiling. An
//! account's wait binds only addresses that have failed logins themselves: guessing from
//! anywhere slows every guessing address, while the owner, from an address that has
//! not failed, still gets in with the right password (an attacker cannot lock them out).

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

    /// Fails with 429 if the address is backing off, or the account is and the address
    /// has failed logins of its own.
    pub fn check(&self, account: &str, address: &str) -> Result<()> {
        let now = now_millis();
        let Ok(map) = self.failures.lock() else { return Ok(()) };
        let waiting =
            |key: &str| map.get(key).map(|&(count, last)| last.saturating_add(self.wait_ms(count)));
        if let Some(until) = waiting(address).filter(|until| *until > now) {
            return Err(Error::limit_exceeded(until - now));
        }
        let address_failed = map
            .get(address)
            .is_some_and(|&(count, last)| count > 0 && now.saturating_sub(last) < FORGET_AFTER_MS);
        if let Some(until) = waiting(account).filter(|until| *until > now && address_failed) {
            return Err(Error::limit_exceeded(until - now));
        }
        Ok(())
    }

    /// Counts a failure for the account and the address; true when it is the one that
    /// makes the account start backing off (worth an audit entry).
    pub fn failed(&self, account: &str, address: &str) -> bool {
        let now = now_millis();
        let Ok(mut map) = self.failures.lock() else { return false };
        if map.len() >= MAX_ENTRIES {
            map.retain(|_, (_, last)| now.saturating_sub(*last) < FORGET_AFTER_MS);
            if map.len() >= MAX_ENTRIES {
                map.clear();
            }
        }
        let mut locked = false;
        for key in [account, address] {
            let entry = map.entry(key.to_owned()).or_insert((0, now));
            // Failures a day old start the count again.
            if now.saturating_sub(entry.1) >= FORGET_AFTER_MS {
                entry.0 = 0;
            }
            entry.0 = entry.0.saturating_add(1);
            entry.1 = now;
            locked |= key == account && entry.0 == self.threshold;
        }
        locked
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
        let mut locked = Vec::new();
        for _ in 0..3 {
            g.check("acct", "ip:a").unwrap();
            locked.push(g.failed("acct", "ip:a"));
        }
        assert_eq!(locked, [false, false, true], "the lockout is reported once");
        let err = g.check("acct", "ip:a").unwrap_err();
        assert_eq!(err.errcode, "M_LIMIT_EXCEEDED");
        // Another address that never failed is not held back by the account's wait...
        g.check("acct", "ip:b").unwrap();
        // ...until it fails too.
        g.failed("acct", "ip:b");
        assert!(g.check("acct", "ip:b").is_err());
        g.check("other", "ip:c").unwrap();
        g.succeeded("acct");
        g.check("acct", "ip:c").unwrap();
        // The guessing address still waits for its own failures.
        assert!(g.check("other", "ip:a").is_err());
    }
}
