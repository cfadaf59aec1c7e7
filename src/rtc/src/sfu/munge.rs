//! Keeps one subscriber's stream continuous while the SFU switches it between a
//! publisher's simulcast layers: each layer numbers its packets and stamps its times
//! independently, so at a switch the sequence numbers and RTP timestamps are offset to
//! carry on from the last packet sent. Gaps and reordering within a layer stay as they
//! are (the subscriber's NACKs and jitter buffer need them).

use std::time::Instant;

#[derive(Debug)]
pub struct Munger {
    /// RTP clock ticks a millisecond (90 for video, 48 for Opus).
    ticks_per_ms: u32,
    last: Option<Sent>,
    seq_offset: u16,
    ts_offset: u32,
}

#[derive(Debug, Clone, Copy)]
struct Sent {
    seq: u16,
    ts: u32,
    at: Instant,
}

impl Munger {
    /// A munger for a stream whose RTP clock runs at `clock_rate` Hz.
    pub fn new(clock_rate: u32) -> Self {
        Self { ticks_per_ms: (clock_rate / 1000).max(1), last: None, seq_offset: 0, ts_offset: 0 }
    }

    /// The sequence number and timestamp to send for a packet that arrived with `seq`
    /// and `ts`; `switched` for the first packet taken from a new layer.
    pub fn rewrite(&mut self, seq: u16, ts: u32, switched: bool, now: Instant) -> (u16, u32) {
        if switched && let Some(last) = self.last {
            // The new layer continues one packet and (at least) one tick after the last
            // packet sent, as much later as time has passed.
            let elapsed = u32::try_from(now.duration_since(last.at).as_millis()).unwrap_or(0);
            let next_ts = last.ts.wrapping_add(elapsed.saturating_mul(self.ticks_per_ms).max(1));
            self.seq_offset = last.seq.wrapping_add(1).wrapping_sub(seq);
            self.ts_offset = next_ts.wrapping_sub(ts);
        }
        let out = (seq.wrapping_add(self.seq_offset), ts.wrapping_add(self.ts_offset));
        // Only the newest packet moves the reference: a late (reordered) one does not.
        let newer = self.last.is_none_or(|l| is_newer(out.0, l.seq));
        if newer {
            self.last = Some(Sent { seq: out.0, ts: out.1, at: now });
        }
        out
    }
}

/// RFC 1982 serial number order for 16-bit sequence numbers.
fn is_newer(a: u16, b: u16) -> bool {
    a != b && a.wrapping_sub(b) < 0x8000
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_stream_carries_on_across_a_switch() {
        let t0 = Instant::now();
        let mut m = Munger::new(90_000);
        // The first layer passes unchanged.
        assert_eq!(m.rewrite(100, 9000, true, t0), (100, 9000));
        assert_eq!(m.rewrite(101, 9000, false, t0), (101, 9000));
        assert_eq!(m.rewrite(102, 12000, false, t0 + Duration::from_millis(33)), (102, 12000));
        // A switch to a layer numbered elsewhere, 33 ms later: one on, 33 ms on.
        let later = t0 + Duration::from_millis(66);
        assert_eq!(m.rewrite(50_000, 777, true, later), (103, 12000 + 33 * 90));
        assert_eq!(m.rewrite(50_001, 777 + 3000, false, later), (104, 12000 + 33 * 90 + 3000));
        // A gap in the layer stays a gap; a late packet keeps its place.
        assert_eq!(m.rewrite(50_003, 6777, false, later), (106, 18000 + 33 * 90));
        assert_eq!(m.rewrite(50_002, 6777, false, later), (105, 18000 + 33 * 90));
        assert_eq!(m.rewrite(50_004, 6777, false, later).0, 107);
    }

    #[test]
    fn sequence_numbers_wrap() {
        let t0 = Instant::now();
        let mut m = Munger::new(90_000);
        m.rewrite(65_535, u32::MAX, true, t0);
        assert_eq!(m.rewrite(3, 10, true, t0), (0, u32::MAX.wrapping_add(1)));
        assert_eq!(m.rewrite(4, 10, false, t0), (1, 0));
        assert!(is_newer(0, 65_535));
        assert!(!is_newer(65_535, 0));
    }
}
