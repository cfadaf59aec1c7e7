//! Which simulcast layer each subscriber gets: the best one that is flowing, no better
//! than the subscriber asked for (a quality, or the size it shows the video at) and
//! fitting its share of the bandwidth its connection reports.

use livekit_protocol as lk;

/// `VideoQuality` as an index: LOW, MEDIUM, HIGH.
pub type Quality = u8;
pub const LOW: Quality = 0;
pub const HIGH: Quality = 2;

/// Going up a layer needs this much headroom over its bitrate, so that an estimate
/// hovering at a layer's rate does not flip between layers.
const UPGRADE_HEADROOM: f64 = 1.15;

/// A layer as the choice sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerView {
    pub quality: Quality,
    /// What the publisher declared it sends at, in bits per second (0: not said).
    pub bitrate: u32,
    /// Packets arrived recently.
    pub live: bool,
}

/// What a subscriber wants of one track.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wants {
    pub max_quality: Quality,
    /// Its share of its connection's estimated bandwidth, bits per second.
    pub budget: Option<u64>,
}

impl Default for Wants {
    fn default() -> Self {
        Self { max_quality: HIGH, budget: None }
    }
}

/// The layer to forward: `None` when no layer is flowing.
pub fn choose(layers: &[LayerView], wants: Wants, current: Option<Quality>) -> Option<Quality> {
    let mut live: Vec<LayerView> = layers.iter().copied().filter(|l| l.live).collect();
    live.sort_by_key(|l| l.quality);
    let lowest = live.first()?.quality;
    let fits = |l: &LayerView| {
        let Some(budget) = wants.budget else { return true };
        if l.bitrate == 0 {
            return true;
        }
        let headroom = if current.is_some_and(|c| l.quality > c) { UPGRADE_HEADROOM } else { 1.0 };
        f64::from(l.bitrate) * headroom <= budget as f64
    };
    Some(
        live.iter()
            .rev()
            .find(|l| l.quality <= wants.max_quality && fits(l))
            .map_or(lowest, |l| l.quality),
    )
}

/// The quality a `VideoQuality` value names (OFF and unknown values: HIGH).
pub fn quality(value: i32) -> Quality {
    match lk::VideoQuality::try_from(value) {
        Ok(lk::VideoQuality::Low) => LOW,
        Ok(lk::VideoQuality::Medium) => 1,
        _ => HIGH,
    }
}

/// The smallest declared layer at least as large as a video shown at `width` x
/// `height` (the largest when none is), as a quality.
pub fn quality_for_size(declared: &[lk::VideoLayer], width: u32, height: u32) -> Quality {
    let wanted = width.max(height);
    let mut by_size: Vec<&lk::VideoLayer> = declared.iter().collect();
    by_size.sort_by_key(|l| l.width.max(l.height));
    by_size
        .iter()
        .find(|l| l.width.max(l.height) >= wanted)
        .or(by_size.last())
        .map_or(HIGH, |l| quality(l.quality))
}

/// The quality of a simulcast stream by its RTP stream id: as the publisher declared it,
/// else by the names clients use (`q`/`h`/`f`, or low/medium/high); a single stream is
/// HIGH.
pub fn quality_of_rid(rid: &str, declared: &[lk::VideoLayer]) -> Quality {
    if rid.is_empty() {
        return HIGH;
    }
    if let Some(layer) = declared.iter().find(|l| l.rid == rid) {
        return quality(layer.quality);
    }
    match rid.to_ascii_lowercase().as_str() {
        "q" | "l" | "low" | "0" => LOW,
        "h" | "m" | "mid" | "medium" | "1" => 1,
        _ => HIGH,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layers(live: [bool; 3]) -> Vec<LayerView> {
        [(0, 150_000), (1, 500_000), (2, 1_700_000)]
            .iter()
            .zip(live)
            .map(|(&(quality, bitrate), live)| LayerView { quality, bitrate, live })
            .collect()
    }

    #[test]
    fn the_best_flowing_layer_within_what_was_asked() {
        let all = layers([true; 3]);
        assert_eq!(choose(&all, Wants::default(), None), Some(2));
        assert_eq!(choose(&all, Wants { max_quality: 1, budget: None }, None), Some(1));
        assert_eq!(choose(&all, Wants { max_quality: LOW, budget: None }, Some(2)), Some(0));
        // The high layer stopped: the best flowing one.
        assert_eq!(choose(&layers([true, true, false]), Wants::default(), Some(2)), Some(1));
        // Only a better layer than asked is flowing: that one rather than nothing.
        assert_eq!(
            choose(&layers([false, false, true]), Wants { max_quality: 0, budget: None }, None),
            Some(2)
        );
        assert_eq!(choose(&layers([false; 3]), Wants::default(), Some(1)), None);
    }

    #[test]
    fn bandwidth_caps_the_layer_with_headroom_to_go_up() {
        let all = layers([true; 3]);
        let budget = |b| Wants { max_quality: HIGH, budget: Some(b) };
        assert_eq!(choose(&all, budget(1_000_000), Some(2)), Some(1));
        assert_eq!(choose(&all, budget(100_000), Some(1)), Some(0));
        // Staying on a layer needs its rate; going up needs 15 % more.
        assert_eq!(choose(&all, budget(1_800_000), Some(2)), Some(2));
        assert_eq!(choose(&all, budget(1_800_000), Some(1)), Some(1));
        assert_eq!(choose(&all, budget(2_000_000), Some(1)), Some(2));
    }

    #[test]
    fn sizes_and_stream_ids_name_qualities() {
        let declared: Vec<lk::VideoLayer> =
            [(0, 320, 180, "q"), (1, 640, 360, "h"), (2, 1280, 720, "f")]
                .iter()
                .map(|&(q, width, height, rid)| lk::VideoLayer {
                    quality: q,
                    width,
                    height,
                    rid: rid.to_owned(),
                    ..Default::default()
                })
                .collect();
        assert_eq!(quality_for_size(&declared, 300, 170), 0);
        assert_eq!(quality_for_size(&declared, 400, 225), 1);
        assert_eq!(quality_for_size(&declared, 1920, 1080), 2);
        assert_eq!(quality_for_size(&[], 100, 100), HIGH);
        assert_eq!(quality_of_rid("h", &declared), 1);
        assert_eq!(quality_of_rid("q", &[]), 0);
        assert_eq!(quality_of_rid("", &declared), HIGH);
        assert_eq!(quality(lk::VideoQuality::Off as i32), HIGH);
    }
}
