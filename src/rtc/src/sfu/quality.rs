//! Connection quality as LiveKit clients show it (excellent, good, poor, lost): a mean
//! opinion score from the packet loss and round trip a participant's connections see,
//! by the ITU-T G.107 E-model in the simplified form VoIP monitors use.

use std::time::Duration;

use livekit_protocol as lk;

/// How often each call's participants are rated.
pub const INTERVAL: Duration = Duration::from_secs(2);

/// At or above: excellent; at or above [`GOOD`]: good; below: poor.
const EXCELLENT: f32 = 4.1;
const GOOD: f32 = 3.6;

/// What a participant's receivers reported since it was last rated.
#[derive(Debug, Default, Clone, Copy)]
pub struct Reception {
    /// The worst share of packets lost a report gave.
    pub loss: f32,
    /// The latest round trip.
    pub rtt: Option<Duration>,
}

impl Reception {
    pub fn add(&mut self, loss: f32, rtt: Option<Duration>) {
        self.loss = self.loss.max(loss);
        if rtt.is_some() {
            self.rtt = rtt;
        }
    }
}

/// The score (1 to 4.5) of a connection losing `loss` of its packets with round trip
/// `rtt` (none known: as on a local network).
pub fn score(loss: f32, rtt: Option<Duration>) -> f32 {
    // One way, plus a jitter buffer's worth.
    let latency_ms = rtt.map_or(0.0, |r| r.as_secs_f32() * 500.0) + 10.0;
    let delay = if latency_ms < 160.0 { latency_ms / 40.0 } else { (latency_ms - 120.0) / 10.0 };
    let r = (93.2 - delay - loss.clamp(0.0, 1.0) * 250.0).clamp(0.0, 100.0);
    let mos = 1.0 + 0.035 * r + 0.000_007 * r * (r - 60.0) * (100.0 - r);
    mos.clamp(1.0, 4.5)
}

/// The quality a score is shown as.
pub fn quality(score: f32) -> lk::ConnectionQuality {
    if score >= EXCELLENT {
        lk::ConnectionQuality::Excellent
    } else if score >= GOOD {
        lk::ConnectionQuality::Good
    } else {
        lk::ConnectionQuality::Poor
    }
}

/// Packets in a row that seem far behind the newest before they are taken as the
/// stream's numbering starting again.
const RESYNC_AFTER: u32 = 64;

/// Counts the packets a stream should have delivered, from their sequence numbers.
#[derive(Debug, Default)]
pub struct Sequence {
    newest: Option<u16>,
    behind: u32,
}

impl Sequence {
    /// What the packet numbered `seq` adds to those expected: how far past the newest
    /// it is, 0 for one reordered or repeated.
    pub fn advance(&mut self, seq: u16) -> u64 {
        let Some(newest) = self.newest else {
            self.newest = Some(seq);
            return 1;
        };
        let ahead = seq.wrapping_sub(newest);
        // Less than half the sequence space ahead: newer.
        if ahead != 0 && ahead < 0x8000 {
            self.newest = Some(seq);
            self.behind = 0;
            return u64::from(ahead);
        }
        self.behind += 1;
        if self.behind > RESYNC_AFTER {
            self.newest = Some(seq);
            self.behind = 0;
            return 1;
        }
        0
    }
}

/// The share of `expected` packets that did not arrive (`received` may exceed it, with
/// duplicates).
pub fn loss(received: u64, expected: u64) -> f32 {
    if expected == 0 {
        return 0.0;
    }
    (expected.saturating_sub(received) as f64 / expected as f64) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_and_delay_lower_the_rating() {
        assert_eq!(quality(score(0.0, None)), lk::ConnectionQuality::Excellent);
        let lan = Some(Duration::from_millis(2));
        assert_eq!(quality(score(0.01, lan)), lk::ConnectionQuality::Excellent);
        assert_eq!(quality(score(0.06, lan)), lk::ConnectionQuality::Good);
        assert_eq!(quality(score(0.15, lan)), lk::ConnectionQuality::Poor);
        let far = Some(Duration::from_millis(900));
        assert!(score(0.0, far) < score(0.0, lan));
        assert_eq!(quality(score(0.0, far)), lk::ConnectionQuality::Poor);
        assert!((1.0..=4.5).contains(&score(1.0, far)));
    }

    #[test]
    fn sequence_numbers_count_what_should_have_arrived() {
        let mut s = Sequence::default();
        let expected: u64 = [10u16, 11, 13, 12, 13, 14].iter().map(|&n| s.advance(n)).sum();
        // 10 to 14: five, whatever the order and the repeat.
        assert_eq!(expected, 5);
        // Across the wrap.
        let mut s = Sequence::default();
        let expected: u64 = [65534u16, 65535, 0, 2].iter().map(|&n| s.advance(n)).sum();
        assert_eq!(expected, 5);
        // A numbering that starts again far away is followed after a run of packets.
        let mut s = Sequence::default();
        s.advance(100);
        let mut after = 0;
        for n in 0..200u16 {
            after += s.advance(40_000 + n);
        }
        assert!(after >= 200 - u64::from(RESYNC_AFTER) - 1 && after <= 200, "{after}");
    }

    #[test]
    fn loss_is_counted_from_sequence_numbers() {
        assert_eq!(loss(0, 0), 0.0);
        assert_eq!(loss(90, 100), 0.1);
        assert_eq!(loss(105, 100), 0.0);
        let mut r = Reception::default();
        r.add(0.02, Some(Duration::from_millis(40)));
        r.add(0.01, None);
        assert_eq!(r.loss, 0.02);
        assert_eq!(r.rtt, Some(Duration::from_millis(40)));
    }
}
