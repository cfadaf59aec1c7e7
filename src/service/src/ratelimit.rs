//! Token-bucket rate limits per action class and per user or client address.

use std::{collections::HashMap, sync::Mutex, time::Instant};

use trellis_core::{
    Error, Result,
    config::{RateLimit, RateLimitsConfig},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    Register,
    Login,
    Default,
    Message,
    Join,
    MediaUpload,
}

/// Buckets kept at most; beyond it full (idle) buckets are dropped first.
const MAX_BUCKETS: usize = 200_000;

pub struct RateLimiter {
    config: RateLimitsConfig,
    buckets: Mutex<HashMap<(Class, String), Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl RateLimiter {
    pub fn new(config: RateLimitsConfig) -> Self {
        Self { config, buckets: Default::default() }
    }

    fn limit(&self, class: Class) -> RateLimit {
        let c = &self.config;
        match class {
            Class::Register => c.register,
            Class::Login => c.login,
            Class::Default => c.default,
            Class::Message => c.message,
            Class::Join => c.join,
            Class::MediaUpload => c.media_upload,
        }
    }

    /// Takes one token for `key` (a user or a client address) or fails with 429.
    pub fn check(&self, class: Class, key: &str) -> Result<()> {
        self.check_with(class, key, self.limit(class))
    }

    /// As [`Self::check`], with a limit of this key's own (an admin's override).
    pub fn check_with(&self, class: Class, key: &str, limit: RateLimit) -> Result<()> {
        if !self.config.enabled {
            return Ok(());
        }
        let now = Instant::now();
        let Ok(mut buckets) = self.buckets.lock() else { return Ok(()) };
        if buckets.len() >= MAX_BUCKETS {
            buckets.retain(|(class, _), b| {
                let l = self.limit(*class);
                b.tokens + now.duration_since(b.updated).as_secs_f64() * l.per_second
                    < f64::from(l.burst)
            });
        }
        let bucket = buckets
            .entry((class, key.to_owned()))
            .or_insert(Bucket { tokens: f64::from(limit.burst), updated: now });
        let elapsed = now.duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * limit.per_second).min(f64::from(limit.burst));
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            // A bucket that never refills still names a finite wait.
            let per_second = limit.per_second.max(1.0 / 86_400.0);
            let wait_ms = ((1.0 - bucket.tokens) / per_second * 1000.0).ceil() as u64;
            Err(Error::limit_exceeded(wait_ms.max(1)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_limited_then_refilled() {
        let config = RateLimitsConfig { login: RateLimit::new(50.0, 3), ..Default::default() };
        let rl = RateLimiter::new(config);
        for _ in 0..3 {
            rl.check(Class::Login, "1.2.3.4").unwrap();
        }
        let err = rl.check(Class::Login, "1.2.3.4").unwrap_err();
        assert_eq!(err.kind, trellis_core::ErrorKind::RateLimited);
        assert!(err.body()["retry_after_ms"].as_u64().unwrap() >= 1);
        // Other keys and classes have their own buckets.
        rl.check(Class::Login, "5.6.7.8").unwrap();
        rl.check(Class::Register, "1.2.3.4").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(60));
        rl.check(Class::Login, "1.2.3.4").unwrap();
    }

    #[test]
    fn disabled_never_limits() {
        let config = RateLimitsConfig {
            enabled: false,
            login: RateLimit::new(0.001, 1),
            ..Default::default()
        };
        let rl = RateLimiter::new(config);
        for _ in 0..100 {
            rl.check(Class::Login, "x").unwrap();
        }
    }
}
