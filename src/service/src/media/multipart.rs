//! The `multipart/mixed` bodies of the federation media endpoints (spec v1.11): a JSON
//! metadata part, then the content itself or a `Location` to fetch it from.

use bytes::Bytes;

/// The second part of a federation media response.
#[derive(Debug, PartialEq, Eq)]
pub enum MediaPart {
    Content { content_type: Option<String>, disposition: Option<String>, body: Bytes },
    Redirect(String),
}

/// The `boundary` parameter of a `multipart/mixed` content type.
pub fn boundary(content_type: &str) -> Option<String> {
    let (kind, params) = content_type.split_once(';')?;
    if !kind.trim().eq_ignore_ascii_case("multipart/mixed") {
        return None;
    }
    params.split(';').find_map(|p| {
        let (name, value) = p.split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| value.trim().trim_matches('"').to_owned())
    })
}

fn find(haystack: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if needle.is_empty() || haystack.len() < needle.len() {
        return None;
    }
    (from..=haystack.len() - needle.len()).find(|&i| &haystack[i..i + needle.len()] == needle)
}

/// Splits a multipart body into its parts as (header text, body).
fn parts<'a>(body: &'a [u8], boundary: &str) -> Option<Vec<(String, &'a [u8])>> {
    let delimiter = format!("--{boundary}");
    let mut pos = find(body, delimiter.as_bytes(), 0)? + delimiter.len();
    let mut out = Vec::new();
    loop {
        if body[pos..].starts_with(b"--") {
            return Some(out);
        }
        // The rest of the delimiter line.
        let line_end = find(body, b"\n", pos)? + 1;
        let next = find(body, delimiter.as_bytes(), line_end)?;
        let mut part = &body[line_end..next];
        // The line break before a delimiter belongs to the delimiter.
        part = part.strip_suffix(b"\r\n").or_else(|| part.strip_suffix(b"\n")).unwrap_or(part);
        let (headers, content) = match find(part, b"\r\n\r\n", 0) {
            Some(i) => (&part[..i], &part[i + 4..]),
            None => match find(part, b"\n\n", 0) {
                Some(i) => (&part[..i], &part[i + 2..]),
                // No headers at all: the part starts with its blank line.
                None if part.starts_with(b"\r\n") => (&part[..0], &part[2..]),
                None => return None,
            },
        };
        out.push((String::from_utf8_lossy(headers).into_owned(), content));
        pos = next + delimiter.len();
    }
}

fn header<'a>(headers: &'a str, name: &str) -> Option<&'a str> {
    headers.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// The media part of a federation media response.
pub fn media_part(body: &Bytes, boundary: &str) -> Option<MediaPart> {
    let parts = parts(body, boundary)?;
    let (headers, content) = parts.get(1)?;
    if let Some(location) = header(headers, "location") {
        return Some(MediaPart::Redirect(location.to_owned()));
    }
    let start = content.as_ptr() as usize - body.as_ptr() as usize;
    Some(MediaPart::Content {
        content_type: header(headers, "content-type").map(str::to_owned),
        disposition: header(headers, "content-disposition").map(str::to_owned),
        body: body.slice(start..start + content.len()),
    })
}

/// The file name of a `Content-Disposition` value (the plain `filename=` form).
pub fn filename(disposition: &str) -> Option<String> {
    disposition.split(';').find_map(|p| {
        let (k, v) = p.split_once('=')?;
        (k.trim() == "filename").then(|| v.trim().trim_matches('"').to_owned())
    })
}

/// A federation media response body around content of `content_type`: the caller sends
/// `head`, then the content, then `tail`.
pub fn envelope(boundary: &str, content_type: &str, disposition: &str) -> (String, String) {
    let head = format!(
        "--{boundary}\r\nContent-Type: application/json\r\n\r\n{{}}\r\n--{boundary}\r\n\
         Content-Type: {content_type}\r\nContent-Disposition: {disposition}\r\n\r\n"
    );
    (head, format!("\r\n--{boundary}--\r\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_envelope_parses_back() {
        let (head, tail) = envelope("b0undary", "image/png", "inline; filename=\"a.png\"");
        let body = Bytes::from(format!("{head}\r\n--not a boundary\r\n{tail}"));
        match media_part(&body, "b0undary") {
            Some(MediaPart::Content { content_type, disposition, body }) => {
                assert_eq!(content_type.as_deref(), Some("image/png"));
                assert_eq!(filename(&disposition.unwrap()).as_deref(), Some("a.png"));
                assert_eq!(&body[..], b"\r\n--not a boundary\r\n");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_spec_example_and_redirects() {
        let body = Bytes::from_static(
            b"--gc0p\r\nContent-Type: application/json\r\n\r\n{}\r\n--gc0p\r\n\
              Content-Type: text/plain\r\n\r\nThis media is plain text.\r\n--gc0p--\r\n",
        );
        assert_eq!(
            media_part(&body, "gc0p"),
            Some(MediaPart::Content {
                content_type: Some("text/plain".into()),
                disposition: None,
                body: Bytes::from_static(b"This media is plain text."),
            })
        );
        let body = Bytes::from_static(
            b"--x\r\nContent-Type: application/json\r\n\r\n{}\r\n--x\r\n\
              Location: https://cdn.example.org/a\r\n\r\n\r\n--x--",
        );
        assert_eq!(
            media_part(&body, "x"),
            Some(MediaPart::Redirect("https://cdn.example.org/a".into()))
        );
        assert_eq!(boundary("multipart/mixed; boundary=\"abc\""), Some("abc".into()));
        assert_eq!(boundary("text/plain; boundary=abc"), None);
        assert_eq!(media_part(&Bytes::from_static(b"garbage"), "x"), None);
    }
}
