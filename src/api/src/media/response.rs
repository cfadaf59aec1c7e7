//! How media is sent: the security headers the spec asks for, `Content-Disposition`
//! (inline only for the spec's safe content types), and single byte ranges for seeking.

use std::ops::Range;

use axum::{body::Body, response::Response};
use http::{HeaderValue, StatusCode, header};
use trellis_core::{Error, ErrorKind, Result, error::code};
use trellis_service::media::Content;

use crate::{AppState, response::error_response};

/// The policy the spec recommends for served content.
const CSP: &str = "sandbox; default-src 'none'; script-src 'none'; plugin-types application/pdf; \
                   style-src 'unsafe-inline'; object-src 'self';";

/// Content types the spec deems safe to serve `inline`.
const INLINE_SAFE: &[&str] = &[
    "text/css",
    "text/plain",
    "text/csv",
    "application/json",
    "application/ld+json",
    "image/jpeg",
    "image/gif",
    "image/png",
    "image/apng",
    "image/webp",
    "image/avif",
    "video/mp4",
    "video/webm",
    "video/ogg",
    "video/quicktime",
    "audio/mp4",
    "audio/webm",
    "audio/aac",
    "audio/mpeg",
    "audio/ogg",
    "audio/wave",
    "audio/wav",
    "audio/x-wav",
    "audio/x-pn-wav",
    "audio/flac",
    "audio/x-flac",
];

pub(super) fn inline_safe(content_type: &str) -> bool {
    let base = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    INLINE_SAFE.contains(&base.as_str())
}

/// `inline` or `attachment`, with the file name as a quoted ASCII fallback and, when it
/// is not plain ASCII, the exact name in RFC 5987 form.
pub(super) fn disposition(inline: bool, filename: Option<&str>) -> String {
    let kind = if inline { "inline" } else { "attachment" };
    // A name with path components (`../../etc/passwd`, `C:\\x\\y.exe`) keeps its last one:
    // browsers strip them too, but not every client that saves what it downloads does.
    let name = filename.and_then(|n| n.rsplit(['/', '\\']).next()).map(str::trim);
    let Some(name) = name.filter(|n| !n.is_empty() && *n != "." && *n != "..") else {
        return kind.to_owned();
    };
    let plain = |c: char| (c.is_ascii_graphic() || c == ' ') && c != '"' && c != '\\';
    let fallback: String = name.chars().map(|c| if plain(c) { c } else { '_' }).collect();
    if name.chars().all(plain) {
        return format!("{kind}; filename=\"{name}\"");
    }
    let mut encoded = String::new();
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&b) {
            encoded.push(char::from(b));
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    format!("{kind}; filename=\"{fallback}\"; filename*=utf-8''{encoded}")
}

enum Ranged {
    Full,
    Part(Range<u64>),
    Unsatisfiable,
}

/// One `bytes=` range; several ranges or other units get the whole content, which
/// RFC 9110 allows.
fn parse_range(header: Option<&HeaderValue>, size: u64) -> Ranged {
    let Some(spec) = header.and_then(|h| h.to_str().ok()).and_then(|h| h.strip_prefix("bytes="))
    else {
        return Ranged::Full;
    };
    if spec.contains(',') {
        return Ranged::Full;
    }
    let Some((start, end)) = spec.split_once('-') else { return Ranged::Unsatisfiable };
    let (start, end) = (start.trim(), end.trim());
    let number = |s: &str| s.parse::<u64>().ok();
    if start.is_empty() {
        // A suffix: the last `n` bytes.
        return match number(end) {
            Some(n) if n > 0 && size > 0 => Ranged::Part(size.saturating_sub(n)..size),
            _ => Ranged::Unsatisfiable,
        };
    }
    let Some(first) = number(start) else { return Ranged::Unsatisfiable };
    let last = if end.is_empty() { Some(size.saturating_sub(1)) } else { number(end) };
    match last {
        Some(last) if first < size && first <= last => Ranged::Part(first..last.min(size - 1) + 1),
        _ => Ranged::Unsatisfiable,
    }
}

/// The response for `content`, honouring a `Range` header.
pub async fn serve(
    state: &AppState,
    content: &Content,
    filename: Option<&str>,
    range: Option<&HeaderValue>,
) -> Result<Response> {
    let size = content.size;
    let range = match parse_range(range, size) {
        Ranged::Full => None,
        Ranged::Part(r) if r.start == 0 && r.end == size => None,
        Ranged::Part(r) => Some(r),
        Ranged::Unsatisfiable => {
            let e = Error::new(
                ErrorKind::RangeNotSatisfiable,
                code::UNKNOWN,
                "The requested range is not satisfiable",
            );
            let mut resp = error_response(&e);
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                resp.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return Ok(resp);
        }
    };
    let body = match &content.inline {
        Some(bytes) => {
            let r = range.clone().unwrap_or(0..size);
            Body::from(bytes.slice(r.start as usize..r.end as usize))
        }
        None => Body::from_stream(state.media.open(content, range.clone()).await?),
    };
    let mut resp = Response::new(body);
    let headers = resp.headers_mut();
    let content_type = HeaderValue::from_str(&content.content_type)
        .unwrap_or(HeaderValue::from_static("application/octet-stream"));
    let inline = inline_safe(&content.content_type);
    headers.insert(header::CONTENT_TYPE, content_type);
    if let Ok(v) = HeaderValue::from_str(&disposition(inline, filename)) {
        headers.insert(header::CONTENT_DISPOSITION, v);
    } else {
        headers.insert(
            header::CONTENT_DISPOSITION,
            HeaderValue::from_static(if inline { "inline" } else { "attachment" }),
        );
    }
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert("cross-origin-resource-policy", HeaderValue::from_static("cross-origin"));
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("private, max-age=86400"));
    let length = match &range {
        Some(r) => {
            let v = format!("bytes {}-{}/{size}", r.start, r.end - 1);
            if let Ok(v) = HeaderValue::from_str(&v) {
                headers.insert(header::CONTENT_RANGE, v);
            }
            *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
            r.end - r.start
        }
        None => size,
    };
    resp.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(h: &str, size: u64) -> Option<Range<u64>> {
        match parse_range(Some(&HeaderValue::from_str(h).unwrap()), size) {
            Ranged::Part(r) => Some(r),
            Ranged::Full => Some(0..u64::MAX),
            Ranged::Unsatisfiable => None,
        }
    }

    #[test]
    fn ranges() {
        assert_eq!(range("bytes=0-9", 100), Some(0..10));
        assert_eq!(range("bytes=90-", 100), Some(90..100));
        assert_eq!(range("bytes=-10", 100), Some(90..100));
        assert_eq!(range("bytes=50-500", 100), Some(50..100));
        assert_eq!(range("bytes=100-", 100), None);
        assert_eq!(range("bytes=9-3", 100), None);
        assert_eq!(range("bytes=x-3", 100), None);
        assert_eq!(range("bytes=0-1,5-6", 100), Some(0..u64::MAX));
        assert_eq!(range("items=0-1", 100), Some(0..u64::MAX));
    }

    #[test]
    fn dispositions() {
        assert_eq!(disposition(true, Some("cat.png")), "inline; filename=\"cat.png\"");
        assert_eq!(disposition(false, None), "attachment");
        // Path components are dropped, whichever separator.
        assert_eq!(disposition(false, Some("../../etc/passwd")), "attachment; filename=\"passwd\"");
        assert_eq!(
            disposition(false, Some("C:\\tmp\\run.exe")),
            "attachment; filename=\"run.exe\""
        );
        assert_eq!(disposition(false, Some("dir/..")), "attachment");
        assert_eq!(
            disposition(false, Some("naïve \"x\".html")),
            "attachment; filename=\"na_ve _x_.html\"; filename*=utf-8''na%C3%AFve%20%22x%22.html"
        );
        assert!(inline_safe("image/PNG"));
        assert!(inline_safe("text/plain; charset=utf-8"));
        assert!(!inline_safe("text/html"));
        assert!(!inline_safe("image/svg+xml"));
    }
}
