//! What the SFU reads of a packet it forwards without decoding: whether it starts a
//! keyframe (a subscriber may only change simulcast layer there) and the audio level a
//! publisher stamps on its audio (for active speakers).

/// The codecs whose keyframes the SFU can recognise, by MIME type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VideoCodec {
    Vp8,
    Vp9,
    H264,
    Av1,
    Other,
}

impl VideoCodec {
    pub fn from_mime(mime: &str) -> Self {
        match mime.to_ascii_lowercase().as_str() {
            "video/vp8" => Self::Vp8,
            "video/vp9" => Self::Vp9,
            "video/h264" => Self::H264,
            "video/av1" => Self::Av1,
            _ => Self::Other,
        }
    }

    /// Whether layers can be switched: only where keyframes can be told.
    pub fn switchable(self) -> bool {
        self != Self::Other
    }

    /// Whether `payload` (an RTP payload of this codec) is the first packet of a
    /// keyframe. Malformed payloads are not.
    pub fn starts_keyframe(self, payload: &[u8]) -> bool {
        match self {
            Self::Vp8 => vp8_keyframe_start(payload),
            Self::Vp9 => vp9_keyframe_start(payload),
            Self::H264 => h264_keyframe(payload),
            Self::Av1 => av1_sequence_start(payload),
            Self::Other => false,
        }
    }
}

/// RFC 7741: the payload descriptor, then the VP8 frame header whose first bit is 0 on a
/// keyframe; only the packet that starts partition 0 carries it.
fn vp8_keyframe_start(p: &[u8]) -> bool {
    let Some(&first) = p.first() else { return false };
    let extended = first & 0x80 != 0;
    let start = first & 0x10 != 0;
    let partition = first & 0x07;
    if !start || partition != 0 {
        return false;
    }
    let mut at = 1;
    if extended {
        let Some(&x) = p.get(1) else { return false };
        at = 2;
        if x & 0x80 != 0 {
            // Picture id: one byte, or two when its first bit says so.
            let Some(&pid) = p.get(at) else { return false };
            at += if pid & 0x80 != 0 { 2 } else { 1 };
        }
        if x & 0x40 != 0 {
            at += 1; // TL0PICIDX
        }
        if x & 0x30 != 0 {
            at += 1; // TID / KEYIDX
        }
    }
    p.get(at).is_some_and(|header| header & 0x01 == 0)
}

/// RFC 9628: the first packet of a picture (B) that is not predicted from an earlier
/// one (P clear), in the lowest spatial layer when layers are signalled.
fn vp9_keyframe_start(p: &[u8]) -> bool {
    let Some(&first) = p.first() else { return false };
    let predicted = first & 0x40 != 0;
    let begins = first & 0x08 != 0;
    if predicted || !begins {
        return false;
    }
    let layered = first & 0x20 != 0;
    if !layered {
        return true;
    }
    let mut at = 1;
    if first & 0x80 != 0 {
        let Some(&pid) = p.get(at) else { return false };
        at += if pid & 0x80 != 0 { 2 } else { 1 };
    }
    // Layer indices: TID(3) U(1) SID(3) D(1).
    p.get(at).is_some_and(|layers| (layers >> 1) & 0x07 == 0)
}

/// RFC 6184: an IDR slice or a sequence parameter set, alone, aggregated (STAP-A) or at
/// the start of a fragment (FU-A).
fn h264_keyframe(p: &[u8]) -> bool {
    const IDR: u8 = 5;
    const SPS: u8 = 7;
    let Some(&first) = p.first() else { return false };
    match first & 0x1f {
        IDR | SPS => true,
        24 => {
            let mut at = 1;
            while at + 2 < p.len() {
                let size = usize::from(u16::from_be_bytes([p[at], p[at + 1]]));
                let Some(&nal) = p.get(at + 2) else { return false };
                if matches!(nal & 0x1f, IDR | SPS) {
                    return true;
                }
                at += 2 + size;
            }
            false
        }
        28 => p.get(1).is_some_and(|fu| fu & 0x80 != 0 && fu & 0x1f == IDR),
        _ => false,
    }
}

/// The AV1 RTP aggregation header's N bit: the first packet of a coded video sequence.
fn av1_sequence_start(p: &[u8]) -> bool {
    p.first().is_some_and(|header| header & 0x08 != 0)
}

/// RFC 6464: the level in -dBov (0 loudest, 127 silence) from the extension's payload.
pub fn audio_level(extension: &[u8]) -> Option<u8> {
    extension.first().map(|b| b & 0x7f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vp8_keyframes_are_told_from_delta_frames() {
        // Descriptor without extensions, start of partition 0, then a keyframe header.
        assert!(vp8_keyframe_start(&[0x10, 0x00, 0x9d, 0x01, 0x2a]));
        // The same with a delta-frame header.
        assert!(!vp8_keyframe_start(&[0x10, 0x01, 0x9d]));
        // Extended: 15-bit picture id, TL0PICIDX and TID present.
        assert!(vp8_keyframe_start(&[0x90, 0xe0, 0x81, 0x23, 0x05, 0x20, 0x00]));
        assert!(!vp8_keyframe_start(&[0x90, 0xe0, 0x81, 0x23, 0x05, 0x20, 0x01]));
        // A middle packet of a keyframe (no S bit) does not start one.
        assert!(!vp8_keyframe_start(&[0x00, 0x00]));
        // Truncated descriptors are not keyframes and do not panic.
        assert!(!vp8_keyframe_start(&[]));
        assert!(!vp8_keyframe_start(&[0x90, 0xe0, 0x81]));
    }

    #[test]
    fn vp9_h264_and_av1_keyframes() {
        assert!(vp9_keyframe_start(&[0x08]));
        assert!(!vp9_keyframe_start(&[0x48]));
        assert!(!vp9_keyframe_start(&[0x00]));
        // Layered, spatial layer 0 and 1.
        assert!(vp9_keyframe_start(&[0x28, 0x00]));
        assert!(!vp9_keyframe_start(&[0x28, 0x02]));
        assert!(h264_keyframe(&[0x65, 0x88]));
        assert!(h264_keyframe(&[0x67, 0x42]));
        assert!(!h264_keyframe(&[0x41, 0x9a]));
        // STAP-A holding an SPS; FU-A starting an IDR, and one continuing it.
        assert!(h264_keyframe(&[0x78, 0x00, 0x02, 0x67, 0x42, 0x00, 0x01, 0x68]));
        assert!(h264_keyframe(&[0x7c, 0x85]));
        assert!(!h264_keyframe(&[0x7c, 0x05]));
        assert!(!h264_keyframe(&[0x78, 0xff]));
        assert!(av1_sequence_start(&[0x18]));
        assert!(!av1_sequence_start(&[0x10]));
    }

    #[test]
    fn audio_levels_drop_the_voice_bit() {
        assert_eq!(audio_level(&[0x80 | 30]), Some(30));
        assert_eq!(audio_level(&[127]), Some(127));
        assert_eq!(audio_level(&[]), None);
    }
}
