//! Active speakers from the audio level each publisher stamps on its packets (RFC 6464):
//! a participant speaks while enough of its recent packets are loud, the way LiveKit
//! decides it, and clients are told of changes only.

use std::{
    collections::HashMap,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

/// How often speakers are decided (and the window each decision looks at).
pub const INTERVAL: Duration = Duration::from_millis(500);
/// A packet at or above this loudness (-dBov at most this) counts as voice.
const LOUD_DBOV: u8 = 35;
/// Voice in this many packets of a window (20 ms each) makes a speaker.
const MIN_LOUD_PACKETS: u32 = 8;
/// While someone speaks, levels are sent again this often even if no one started or
/// stopped.
const LEVEL_REFRESH_TICKS: u32 = 2;

/// The loudness of one audio track over the current window, written per packet.
#[derive(Default)]
pub struct Meter {
    loud: AtomicU32,
    /// Sum of the loud packets' linear levels, in thousandths.
    level_sum: AtomicU32,
}

impl Meter {
    pub fn observe(&self, dbov: u8) {
        if dbov <= LOUD_DBOV {
            self.loud.fetch_add(1, Ordering::Relaxed);
            self.level_sum.fetch_add(linear_milli(dbov), Ordering::Relaxed);
        }
    }

    /// The window's level (0 to 1) if it held speech; the window starts again.
    pub fn take(&self) -> Option<f32> {
        let loud = self.loud.swap(0, Ordering::Relaxed);
        let sum = self.level_sum.swap(0, Ordering::Relaxed);
        (loud >= MIN_LOUD_PACKETS).then(|| sum as f32 / loud as f32 / 1000.0)
    }
}

/// -dBov as a linear level (1 at full scale), in thousandths.
fn linear_milli(dbov: u8) -> u32 {
    (10f32.powf(-f32::from(dbov) / 20.0) * 1000.0) as u32
}

/// One participant's state as last told to clients.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Speaker {
    pub level: f32,
}

/// The speakers clients were last told of.
#[derive(Default)]
pub struct Speakers {
    active: HashMap<String, Speaker>,
    ticks_since_sent: u32,
}

impl Speakers {
    /// Takes this window's levels (participant sid → level of its loudest track, `None`
    /// when silent) and returns what clients must be told: each participant whose state
    /// changed (active with its level, or inactive), empty when nothing did.
    pub fn update(&mut self, levels: HashMap<String, Option<f32>>) -> Vec<(String, Option<f32>)> {
        let mut changes = Vec::new();
        let mut now_active = HashMap::new();
        for (sid, level) in levels {
            if let Some(level) = level {
                // Smoothed so that a level does not jump between windows.
                let level = match self.active.get(&sid) {
                    Some(prev) => 0.7 * level + 0.3 * prev.level,
                    None => level,
                };
                now_active.insert(sid, Speaker { level });
            }
        }
        let started_or_stopped = now_active.len() != self.active.len()
            || now_active.keys().any(|sid| !self.active.contains_key(sid));
        self.ticks_since_sent += 1;
        let refresh = !now_active.is_empty() && self.ticks_since_sent >= LEVEL_REFRESH_TICKS;
        if started_or_stopped || refresh {
            for sid in self.active.keys() {
                if !now_active.contains_key(sid) {
                    changes.push((sid.clone(), None));
                }
            }
            for (sid, s) in &now_active {
                changes.push((sid.clone(), Some(s.level)));
            }
            self.ticks_since_sent = 0;
        }
        self.active = now_active;
        // Loudest first, the order clients show.
        changes.sort_by(|a, b| b.1.unwrap_or(0.0).total_cmp(&a.1.unwrap_or(0.0)));
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(meter: &Meter, loud: u32, dbov: u8) -> Option<f32> {
        for _ in 0..loud {
            meter.observe(dbov);
        }
        for _ in 0..10 {
            meter.observe(127);
        }
        meter.take()
    }

    #[test]
    fn a_meter_hears_speech_not_silence_or_a_click() {
        let m = Meter::default();
        let level = window(&m, 20, 20).unwrap();
        assert!((level - 0.1).abs() < 0.01, "{level}");
        assert_eq!(window(&m, 0, 0), None);
        assert_eq!(window(&m, 3, 0), None);
        assert_eq!(window(&m, 20, 60), None);
    }

    #[test]
    fn clients_hear_of_starts_and_stops() {
        let mut s = Speakers::default();
        let levels = |pairs: &[(&str, Option<f32>)]| {
            pairs.iter().map(|(sid, l)| ((*sid).to_owned(), *l)).collect::<HashMap<_, _>>()
        };
        let first = s.update(levels(&[("PA_a", Some(0.5)), ("PA_b", None)]));
        assert_eq!(first, vec![("PA_a".to_owned(), Some(0.5))]);
        // Nothing changed within the refresh: nothing sent.
        assert!(s.update(levels(&[("PA_a", Some(0.5)), ("PA_b", None)])).is_empty());
        let swap = s.update(levels(&[("PA_a", None), ("PA_b", Some(0.2))]));
        assert_eq!(swap, vec![("PA_b".to_owned(), Some(0.2)), ("PA_a".to_owned(), None)]);
        let quiet = s.update(levels(&[("PA_a", None), ("PA_b", None)]));
        assert_eq!(quiet, vec![("PA_b".to_owned(), None)]);
        assert!(s.update(levels(&[("PA_a", None)])).is_empty());
    }
}
