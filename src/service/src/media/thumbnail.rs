//! Image work for thumbnails: probing sizes, decoding with EXIF orientation applied,
//! resizing and re-encoding. Re-encoding writes pixels only, so no metadata (EXIF, GPS)
//! of the original survives into a thumbnail. Everything here is CPU-bound and called
//! from blocking threads.

use std::io::{BufRead, Cursor, Seek};

use image::{
    DynamicImage, ImageDecoder, ImageReader, codecs::jpeg::JpegEncoder, codecs::png, imageops,
    metadata::Orientation,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    Crop,
    Scale,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Crop => "crop",
            Method::Scale => "scale",
        }
    }
}

/// What a client asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spec {
    pub width: u32,
    pub height: u32,
    pub method: Method,
}

impl Spec {
    pub const fn new(width: u32, height: u32, method: Method) -> Self {
        Self { width, height, method }
    }

    /// The name of this thumbnail among an image's stored variants.
    pub fn key(&self) -> String {
        format!("{}-{}x{}", self.method.as_str(), self.width, self.height)
    }
}

/// The sizes the spec asks servers to have ready; made in the background on upload.
pub const STANDARD: [Spec; 5] = [
    Spec::new(32, 32, Method::Crop),
    Spec::new(96, 96, Method::Crop),
    Spec::new(320, 240, Method::Scale),
    Spec::new(640, 480, Method::Scale),
    Spec::new(800, 600, Method::Scale),
];

/// Content types we decode. Everything else has no thumbnails.
pub fn can_thumbnail(content_type: &str) -> bool {
    matches!(content_type, "image/jpeg" | "image/png" | "image/gif" | "image/webp")
}

#[derive(Debug)]
pub enum ThumbError {
    /// More pixels than the configured limit.
    TooLarge,
    /// Not an image we can read.
    Undecodable(String),
    Encode(String),
}

/// An encoded image.
pub struct Encoded {
    pub bytes: Vec<u8>,
    pub content_type: &'static str,
    pub width: u32,
    pub height: u32,
}

fn swaps_sides(o: Orientation) -> bool {
    matches!(
        o,
        Orientation::Rotate90
            | Orientation::Rotate270
            | Orientation::Rotate90FlipH
            | Orientation::Rotate270FlipH
    )
}

/// The displayed size (after EXIF orientation) from the headers, without decoding pixels.
pub fn probe(reader: impl BufRead + Seek) -> Option<(u32, u32)> {
    let mut decoder = ImageReader::new(reader).with_guessed_format().ok()?.into_decoder().ok()?;
    let (w, h) = decoder.dimensions();
    let o = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    Some(if swaps_sides(o) { (h, w) } else { (w, h) })
}

/// Decodes the first frame, refusing images over `max_pixels` before any pixel is read.
pub fn decode(bytes: &[u8], max_pixels: u64) -> Result<DynamicImage, ThumbError> {
    let bad = |e: image::ImageError| ThumbError::Undecodable(e.to_string());
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ThumbError::Undecodable(e.to_string()))?;
    let mut decoder = reader.into_decoder().map_err(bad)?;
    let (w, h) = decoder.dimensions();
    if u64::from(w) * u64::from(h) > max_pixels {
        return Err(ThumbError::TooLarge);
    }
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    let mut image = DynamicImage::from_decoder(decoder).map_err(bad)?;
    image.apply_orientation(orientation);
    Ok(image)
}

/// The size to scale to and the size of the final thumbnail, for an original of
/// `orig` pixels. Never upscales; never smaller than asked unless the original is.
pub fn target(orig: (u32, u32), spec: Spec) -> ((u32, u32), (u32, u32)) {
    let (ow, oh) = (f64::from(orig.0.max(1)), f64::from(orig.1.max(1)));
    // Cover the requested box (both sides at least as asked), keeping the aspect.
    let factor = (f64::from(spec.width) / ow).max(f64::from(spec.height) / oh).min(1.0);
    let scaled = (
        ((ow * factor).ceil() as u32).clamp(1, orig.0.max(1)),
        ((oh * factor).ceil() as u32).clamp(1, orig.1.max(1)),
    );
    let final_size = match spec.method {
        Method::Scale => scaled,
        Method::Crop => (spec.width.min(scaled.0).max(1), spec.height.min(scaled.1).max(1)),
    };
    (scaled, final_size)
}

/// Resizes `source` (the original or a larger rendition of it, of any size) into the
/// thumbnail of `spec` for an original of `orig` pixels.
pub fn render(source: &DynamicImage, orig: (u32, u32), spec: Spec) -> DynamicImage {
    let ((sw, sh), (fw, fh)) = target(orig, spec);
    let scaled = if (source.width(), source.height()) == (sw, sh) {
        source.clone()
    } else {
        source.thumbnail_exact(sw, sh)
    };
    if (fw, fh) == (sw, sh) {
        return scaled;
    }
    let (x, y) = ((sw - fw) / 2, (sh - fh) / 2);
    scaled.crop_imm(x, y, fw, fh)
}

/// A smaller copy whose longer side is `max_side`, for images larger than that.
pub fn rendition(image: &DynamicImage, max_side: u32) -> Option<DynamicImage> {
    let (w, h) = (image.width(), image.height());
    if w.max(h) <= max_side {
        return None;
    }
    let factor = f64::from(max_side) / f64::from(w.max(h));
    let size = |side: u32| ((f64::from(side) * factor).round() as u32).max(1);
    Some(image.resize_exact(size(w), size(h), imageops::FilterType::Triangle))
}

/// PNG for images with transparency or from lossless sources, JPEG otherwise.
pub fn encode(image: &DynamicImage, lossless_source: bool) -> Result<Encoded, ThumbError> {
    let mut bytes = Vec::new();
    let fail = |e: image::ImageError| ThumbError::Encode(e.to_string());
    let content_type = if lossless_source || image.color().has_alpha() {
        let encoder = png::PngEncoder::new_with_quality(
            &mut bytes,
            png::CompressionType::Fast,
            png::FilterType::Adaptive,
        );
        DynamicImage::ImageRgba8(image.to_rgba8()).write_with_encoder(encoder).map_err(fail)?;
        "image/png"
    } else {
        let encoder = JpegEncoder::new_with_quality(&mut bytes, 85);
        DynamicImage::ImageRgb8(image.to_rgb8()).write_with_encoder(encoder).map_err(fail)?;
        "image/jpeg"
    };
    Ok(Encoded { bytes, content_type, width: image.width(), height: image.height() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_covers_the_box_and_keeps_aspect() {
        assert_eq!(
            target((1000, 500), Spec::new(320, 240, Method::Scale)),
            ((480, 240), (480, 240))
        );
        assert_eq!(target((100, 50), Spec::new(320, 240, Method::Scale)), ((100, 50), (100, 50)));
    }

    #[test]
    fn crop_is_exact_unless_the_original_is_smaller() {
        assert_eq!(target((1000, 500), Spec::new(96, 96, Method::Crop)).1, (96, 96));
        assert_eq!(target((50, 200), Spec::new(96, 96, Method::Crop)).1, (50, 96));
    }

    #[test]
    fn garbage_does_not_decode_or_panic() {
        assert!(decode(b"not an image", 1_000_000).is_err());
        assert!(probe(Cursor::new(b"\x89PNG\r\n\x1a\n garbage".to_vec())).is_none());
    }

    #[test]
    fn decompression_bombs_are_refused_before_decoding() {
        let image = DynamicImage::new_rgb8(100, 100);
        let png = encode(&image, true).unwrap();
        assert!(matches!(decode(&png.bytes, 5_000), Err(ThumbError::TooLarge)));
        assert_eq!(decode(&png.bytes, 10_000).unwrap().width(), 100);
    }
}
