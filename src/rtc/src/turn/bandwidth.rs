//! Per-user bandwidth as a token bucket: a user may burst up to one second's worth and
//! is held to the rate over time; what does not fit is dropped, as a congested link
//! would, and the media stack's congestion control backs off from there.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::ledger::lock;

/// The burst never goes below one full-size datagram, so a very low rate still passes
/// traffic now and then instead of nothing at all.
const MIN_BURST: f64 = 1500.0;

pub(crate) struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub(crate) fn new(bytes_per_sec: u64, now: Instant) -> Self {
        let rate = bytes_per_sec as f64;
        let burst = rate.max(MIN_BURST);
        TokenBucket { rate, burst, tokens: burst, last: now }
    }

    /// Takes `bytes` if the bucket holds them.
    pub(crate) fn take(&mut self, bytes: usize, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now.max(self.last);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        let bytes = bytes as f64;
        if self.tokens >= bytes {
            self.tokens -= bytes;
            true
        } else {
            false
        }
    }
}

/// One user's bucket, shared by the relay sockets of all their allocations.
#[derive(Clone)]
pub(crate) struct SharedBucket(Arc<Mutex<TokenBucket>>);

impl SharedBucket {
    pub(crate) fn new(bytes_per_sec: u64) -> Self {
        SharedBucket(Arc::new(Mutex::new(TokenBucket::new(bytes_per_sec, Instant::now()))))
    }

    pub(crate) fn take(&self, bytes: usize) -> bool {
        lock(&self.0).take(bytes, Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn bursts_one_second_then_refills_at_the_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(10_000, start);
        assert!(bucket.take(6_000, start));
        assert!(bucket.take(4_000, start));
        assert!(!bucket.take(1, start));
        let later = start + Duration::from_millis(100);
        assert!(bucket.take(1_000, later));
        assert!(!bucket.take(1, later));
        // Idle time refills no further than the burst.
        let much_later = later + Duration::from_secs(60);
        assert!(bucket.take(10_000, much_later));
        assert!(!bucket.take(1, much_later));
    }

    #[test]
    fn low_rates_still_pass_one_datagram() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(100, start);
        assert!(bucket.take(1200, start));
        assert!(!bucket.take(1200, start));
    }
}
