//! The media repository through HTTP against the real binary: uploads (direct and
//! async), downloads with their headers and ranges, limits, thumbnails, URL previews,
//! admin actions, and the S3 backend against a real S3-compatible server (moto).

mod common;

use std::{
    io::Cursor,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use common::{Moto, OPEN, TestServer, free_port, json_of, noise, urlencode};
use image::{DynamicImage, ImageFormat, Rgb, RgbImage, Rgba, RgbaImage};
use serde_json::{Value, json};

const UPLOAD: &str = "/_matrix/media/v3/upload";
const MEDIA: &str = "/_matrix/client/v1/media";

fn encode(image: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    image.write_to(&mut out, format).unwrap();
    out.into_inner()
}

fn gradient(w: u32, h: u32) -> DynamicImage {
    DynamicImage::ImageRgb8(RgbImage::from_fn(w, h, |x, y| {
        Rgb([(x * 255 / w) as u8, (y * 255 / h) as u8, ((x + y) % 256) as u8])
    }))
}

async fn upload(
    s: &TestServer,
    token: &str,
    body: Vec<u8>,
    content_type: &str,
    filename: Option<&str>,
) -> (u16, Value) {
    let mut url = s.url(UPLOAD);
    if let Some(f) = filename {
        url = format!("{url}?filename={}", urlencode(f));
    }
    let resp = s
        .client
        .post(url)
        .bearer_auth(token)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    json_of(resp).await
}

async fn upload_ok(s: &TestServer, token: &str, body: Vec<u8>, content_type: &str) -> String {
    let (status, resp) = upload(s, token, body, content_type, None).await;
    assert_eq!(status, 200, "{resp}");
    resp["content_uri"].as_str().unwrap().to_owned()
}

/// `server/id` of an `mxc://` URI.
fn path_of(mxc: &str) -> &str {
    mxc.strip_prefix("mxc://").unwrap()
}

async fn get(s: &TestServer, token: Option<&str>, path: &str) -> reqwest::Response {
    let mut req = s.client.get(s.url(path));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    req.send().await.unwrap()
}

fn header<'a>(resp: &'a reqwest::Response, name: &str) -> &'a str {
    resp.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

async fn thumbnail(s: &TestServer, token: &str, mxc: &str, query: &str) -> reqwest::Response {
    get(s, Some(token), &format!("{MEDIA}/thumbnail/{}?{query}", path_of(mxc))).await
}

/// Fetches a thumbnail that must succeed and decodes it.
async fn thumbnail_image(s: &TestServer, token: &str, mxc: &str, query: &str) -> DynamicImage {
    let resp = thumbnail(s, token, mxc, query).await;
    assert_eq!(resp.status(), 200, "{query}");
    let bytes = resp.bytes().await.unwrap();
    image::load_from_memory(&bytes).unwrap_or_else(|e| panic!("{query}: not an image: {e}"))
}

#[tokio::test]
async fn upload_download_round_trip_headers_and_ranges() {
    let s = TestServer::start(OPEN).await;
    let (_, token) = s.register("alice").await;
    let data = noise(5 * 1024 * 1024 + 123, 1);

    let (status, resp) =
        upload(&s, &token, data.clone(), "application/octet-stream", Some("big file.bin")).await;
    assert_eq!(status, 200, "{resp}");
    let mxc = resp["content_uri"].as_str().unwrap().to_owned();
    let id = mxc.rsplit('/').next().unwrap();
    assert!(mxc.starts_with("mxc://localhost/"), "{mxc}");
    assert!(id.len() >= 24 && id.chars().all(|c| c.is_ascii_alphanumeric()), "{id}");

    let resp = get(&s, Some(&token), &format!("{MEDIA}/download/{}", path_of(&mxc))).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "content-type"), "application/octet-stream");
    assert_eq!(header(&resp, "content-disposition"), "attachment; filename=\"big file.bin\"");
    assert!(header(&resp, "content-security-policy").starts_with("sandbox"));
    assert_eq!(header(&resp, "x-content-type-options"), "nosniff");
    assert_eq!(header(&resp, "cross-origin-resource-policy"), "cross-origin");
    assert_eq!(header(&resp, "accept-ranges"), "bytes");
    let body = resp.bytes().await.unwrap();
    assert!(body[..] == data[..], "downloaded bytes differ from the upload");

    // The file name in the path wins.
    let resp =
        get(&s, Some(&token), &format!("{MEDIA}/download/{}/r%C3%A9sum%C3%A9.bin", path_of(&mxc)))
            .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        header(&resp, "content-disposition"),
        "attachment; filename=\"r_sum_.bin\"; filename*=utf-8''r%C3%A9sum%C3%A9.bin"
    );

    // Ranges, for seeking.
    let ranged = |range: &'static str| {
        let url = s.url(&format!("{MEDIA}/download/{}", path_of(&mxc)));
        let req = s.client.get(url).bearer_auth(&token).header("range", range);
        async move { req.send().await.unwrap() }
    };
    let resp = ranged("bytes=1000-1999").await;
    assert_eq!(resp.status(), 206);
    assert_eq!(header(&resp, "content-range"), format!("bytes 1000-1999/{}", data.len()));
    assert!(resp.bytes().await.unwrap()[..] == data[1000..2000]);
    let resp = ranged("bytes=-10").await;
    assert_eq!(resp.status(), 206);
    assert!(resp.bytes().await.unwrap()[..] == data[data.len() - 10..]);
    let resp = ranged("bytes=99999999-").await;
    assert_eq!(resp.status(), 416);
    assert_eq!(header(&resp, "content-range"), format!("bytes */{}", data.len()));

    // Inline only for the spec's safe types.
    let png = encode(&gradient(8, 8), ImageFormat::Png);
    let png_mxc = upload_ok(&s, &token, png.clone(), "image/png").await;
    let resp = get(&s, Some(&token), &format!("{MEDIA}/download/{}", path_of(&png_mxc))).await;
    assert_eq!(header(&resp, "content-disposition"), "inline");
    assert_eq!(header(&resp, "content-type"), "image/png");
    let html_mxc = upload_ok(&s, &token, b"<script>alert(1)</script>".to_vec(), "text/html").await;
    let resp = get(&s, Some(&token), &format!("{MEDIA}/download/{}", path_of(&html_mxc))).await;
    assert_eq!(header(&resp, "content-disposition"), "attachment");

    // Authentication, unknown media, the frozen legacy endpoints.
    let resp = get(&s, None, &format!("{MEDIA}/download/{}", path_of(&mxc))).await;
    assert_eq!(resp.status(), 401);
    assert_eq!(json_of(resp).await.1["errcode"], "M_MISSING_TOKEN");
    let (status, body) = upload(&s, "not-a-token", b"x".to_vec(), "text/plain", None).await;
    assert_eq!((status, body["errcode"].as_str()), (401, Some("M_UNKNOWN_TOKEN")));
    for path in [
        format!("{MEDIA}/download/localhost/AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"),
        format!("{MEDIA}/download/localhost/bad.id"),
        format!("{MEDIA}/thumbnail/localhost/nothere?width=32&height=32"),
        format!("{MEDIA}/download/other.example/bad.id"),
    ] {
        let (status, body) = json_of(get(&s, Some(&token), &path).await).await;
        assert_eq!((status, body["errcode"].as_str()), (404, Some("M_NOT_FOUND")), "{path}");
    }
    // Another server's media is fetched over federation; one that cannot be reached is a
    // gateway error (tests/federation.rs covers the fetch itself).
    let path = format!("{MEDIA}/download/other.example/{id}");
    let (status, body) = json_of(get(&s, Some(&token), &path).await).await;
    assert_eq!((status, body["errcode"].as_str()), (502, Some("M_UNKNOWN")), "{path}");
    let (status, body) =
        json_of(get(&s, None, &format!("/_matrix/media/v3/download/{}", path_of(&mxc))).await)
            .await;
    assert_eq!((status, body["errcode"].as_str()), (404, Some("M_NOT_FOUND")));

    let (status, config) = s.get_auth(&format!("{MEDIA}/config"), &token).await;
    assert_eq!(status, 200);
    assert_eq!(config["m.upload.size"], 100 * 1024 * 1024);
    let (_, versions) = s.get("/_matrix/client/versions").await;
    assert!(versions["versions"].as_array().unwrap().contains(&json!("v1.11")));
    assert!(versions["versions"].as_array().unwrap().contains(&json!("v1.12")));
}

#[tokio::test]
async fn async_upload_create_then_put() {
    let s = TestServer::start(OPEN).await;
    let (_, alice) = s.register("alice").await;
    let (_, bob) = s.register("bob").await;

    let (status, created) = s.post_auth("/_matrix/media/v1/create", &alice, &json!({})).await;
    assert_eq!(status, 200, "{created}");
    let mxc = created["content_uri"].as_str().unwrap().to_owned();
    assert!(created["unused_expires_at"].as_u64().unwrap() > 0);

    // Not there yet.
    let path = format!("{MEDIA}/download/{}?timeout_ms=200", path_of(&mxc));
    let (status, body) = json_of(get(&s, Some(&alice), &path).await).await;
    assert_eq!((status, body["errcode"].as_str()), (504, Some("M_NOT_YET_UPLOADED")));

    // A download that waits sees the upload as soon as it lands.
    let waiting = {
        let url = s.url(&format!("{MEDIA}/download/{}?timeout_ms=20000", path_of(&mxc)));
        let req = s.client.get(url).bearer_auth(&bob);
        tokio::spawn(async move { req.send().await.unwrap() })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;

    let put = |token: &str, body: &'static [u8]| {
        let url = s.url(&format!("/_matrix/media/v3/upload/{}", path_of(&mxc)));
        let req = s.client.put(url).bearer_auth(token).header("content-type", "text/plain");
        async move { json_of(req.body(body).send().await.unwrap()).await }
    };
    let (status, body) = put(&bob, b"not yours").await;
    assert_eq!((status, body["errcode"].as_str()), (403, Some("M_FORBIDDEN")));
    let (status, body) = put(&alice, b"hello async").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = put(&alice, b"again").await;
    assert_eq!((status, body["errcode"].as_str()), (409, Some("M_CANNOT_OVERWRITE_MEDIA")));

    let resp = waiting.await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(&resp.bytes().await.unwrap()[..], b"hello async");

    let url = s.url("/_matrix/media/v3/upload/localhost/NoSuchIdNoSuchIdNoSuchId");
    let (status, body) =
        json_of(s.client.put(url).bearer_auth(&alice).body("x").send().await.unwrap()).await;
    assert_eq!((status, body["errcode"].as_str()), (404, Some("M_NOT_FOUND")));
}

/// A JPEG with EXIF orientation 6 (rotate 90° clockwise) and a GPS tag.
fn jpeg_with_exif(w: u32, h: u32) -> Vec<u8> {
    let jpeg = encode(&gradient(w, h), ImageFormat::Jpeg);
    let mut tiff = b"MM\0\x2a\0\0\0\x08".to_vec();
    tiff.extend_from_slice(&[0, 2]); // two IFD0 entries
    tiff.extend_from_slice(&[0x01, 0x12, 0, 3, 0, 0, 0, 1, 0, 6, 0, 0]); // orientation = 6
    tiff.extend_from_slice(&[0x88, 0x25, 0, 4, 0, 0, 0, 1, 0, 0, 0, 38]); // GPS IFD at 38
    tiff.extend_from_slice(&[0, 0, 0, 0]);
    tiff.extend_from_slice(&[0, 1]); // GPS IFD: one entry
    tiff.extend_from_slice(&[0, 1, 0, 2, 0, 0, 0, 2, b'N', 0, 0, 0]); // GPSLatitudeRef "N"
    tiff.extend_from_slice(&[0, 0, 0, 0]);
    let mut app1 = b"Exif\0\0".to_vec();
    app1.extend_from_slice(&tiff);
    let len = (app1.len() + 2) as u16;
    let mut out = jpeg[..2].to_vec();
    out.extend_from_slice(&[0xFF, 0xE1]);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&app1);
    out.extend_from_slice(&jpeg[2..]);
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn thumbnails_sizes_orientation_animation_and_limits() {
    let config = format!("{OPEN}[media]\nmax_image_pixels = 1000000\nrendition_max_side = 1000\n");
    let s = TestServer::start(&config).await;
    let (_, token) = s.register("alice").await;

    let photo =
        upload_ok(&s, &token, encode(&gradient(1200, 800), ImageFormat::Jpeg), "image/jpeg").await;
    for (query, w, h) in [
        ("width=32&height=32&method=crop", 32, 32),
        ("width=96&height=96&method=crop", 96, 96),
        ("width=320&height=240&method=scale", 360, 240),
        ("width=640&height=480&method=scale", 720, 480),
        ("width=800&height=600&method=scale", 900, 600),
        ("width=150&height=100&method=crop", 150, 100),
        ("width=200&height=100", 200, 134),
    ] {
        let image = thumbnail_image(&s, &token, &photo, query).await;
        assert_eq!((image.width(), image.height()), (w, h), "{query}");
    }
    let resp = thumbnail(&s, &token, &photo, "width=32&height=32&method=crop").await;
    assert_eq!(header(&resp, "content-type"), "image/jpeg");
    assert!(header(&resp, "content-disposition").starts_with("inline"));

    // EXIF orientation is applied, and no metadata survives into the thumbnail.
    let exif = jpeg_with_exif(400, 200);
    assert!(contains(&exif, b"Exif"));
    let rotated = upload_ok(&s, &token, exif, "image/jpeg").await;
    let resp = thumbnail(&s, &token, &rotated, "width=96&height=96&method=scale").await;
    assert_eq!(resp.status(), 200);
    let bytes = resp.bytes().await.unwrap();
    assert!(!contains(&bytes, b"Exif"), "thumbnail kept EXIF data");
    let image = image::load_from_memory(&bytes).unwrap();
    assert_eq!((image.width(), image.height()), (96, 192), "orientation not applied");

    // Transparent images stay PNG; images smaller than asked come back as they are.
    let alpha = DynamicImage::ImageRgba8(RgbaImage::from_pixel(300, 300, Rgba([0, 0, 255, 100])));
    let alpha_mxc = upload_ok(&s, &token, encode(&alpha, ImageFormat::Png), "image/png").await;
    let resp = thumbnail(&s, &token, &alpha_mxc, "width=96&height=96&method=crop").await;
    assert_eq!(header(&resp, "content-type"), "image/png");
    let small = encode(&gradient(20, 20), ImageFormat::Png);
    let small_mxc = upload_ok(&s, &token, small.clone(), "image/png").await;
    let resp = thumbnail(&s, &token, &small_mxc, "width=96&height=96").await;
    assert!(resp.bytes().await.unwrap()[..] == small[..]);

    // A small animated GIF is its own animated thumbnail; without animation, a still.
    let mut gif = Vec::new();
    {
        let mut encoder = image::codecs::gif::GifEncoder::new(&mut gif);
        let frames = [Rgba([255, 0, 0, 255]), Rgba([0, 255, 0, 255])].map(|c| {
            image::Frame::from_parts(
                RgbaImage::from_pixel(200, 150, c),
                0,
                0,
                image::Delay::from_numer_denom_ms(100, 1),
            )
        });
        encoder.encode_frames(frames).unwrap();
    }
    let gif_mxc = upload_ok(&s, &token, gif.clone(), "image/gif").await;
    let resp =
        thumbnail(&s, &token, &gif_mxc, "width=96&height=96&method=crop&animated=true").await;
    assert_eq!(header(&resp, "content-type"), "image/gif");
    assert!(resp.bytes().await.unwrap()[..] == gif[..]);
    let resp =
        thumbnail(&s, &token, &gif_mxc, "width=96&height=96&method=crop&animated=false").await;
    assert_eq!(header(&resp, "content-type"), "image/png");
    let still = image::load_from_memory(&resp.bytes().await.unwrap()).unwrap();
    assert_eq!((still.width(), still.height()), (96, 96));

    // Decompression bombs (over max_image_pixels), non-images and bad parameters.
    let big =
        upload_ok(&s, &token, encode(&gradient(1100, 1000), ImageFormat::Png), "image/png").await;
    let (status, body) = json_of(thumbnail(&s, &token, &big, "width=32&height=32").await).await;
    assert_eq!((status, body["errcode"].as_str()), (413, Some("M_TOO_LARGE")));
    let text = upload_ok(&s, &token, b"just text".to_vec(), "text/plain").await;
    let (status, _) = json_of(thumbnail(&s, &token, &text, "width=32&height=32").await).await;
    assert_eq!(status, 400);
    let bogus = upload_ok(&s, &token, b"\x89PNG\r\n\x1a\nnot really".to_vec(), "image/png").await;
    let (status, _) = json_of(thumbnail(&s, &token, &bogus, "width=32&height=32").await).await;
    assert_eq!(status, 400);
    for query in ["width=0&height=10", "width=10", "width=10&height=10&method=zoom"] {
        let (status, _) = json_of(thumbnail(&s, &token, &photo, query).await).await;
        assert_eq!(status, 400, "{query}");
    }
}

#[tokio::test]
async fn limits_quota_types_and_legacy_switch() {
    let config = format!(
        "{OPEN}[media]\nmax_upload_bytes = 1048576\nuser_quota_bytes = 2000000\n\
         allowed_content_types = [\"image/*\", \"text/plain\", \"application/octet-stream\"]\n\
         legacy_unauthenticated = true\n"
    );
    let s = TestServer::start(&config).await;
    let (_, token) = s.register("alice").await;
    let (_, config) = s.get_auth(&format!("{MEDIA}/config"), &token).await;
    assert_eq!(config["m.upload.size"], 1048576);

    // Too large, announced and streamed (no Content-Length).
    let (status, body) =
        upload(&s, &token, noise(1048577, 2), "application/octet-stream", None).await;
    assert_eq!((status, body["errcode"].as_str()), (413, Some("M_TOO_LARGE")));
    let chunks = futures_util::stream::iter(
        (0..20).map(|i| Ok::<_, std::io::Error>(bytes::Bytes::from(noise(64 * 1024, i + 10)))),
    );
    let resp = s
        .client
        .post(s.url(UPLOAD))
        .bearer_auth(&token)
        .header("content-type", "application/octet-stream")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    let (status, body) = json_of(resp).await;
    assert_eq!((status, body["errcode"].as_str()), (413, Some("M_TOO_LARGE")));

    let (status, body) = upload(&s, &token, b"<b>".to_vec(), "text/html", None).await;
    assert_eq!((status, body["errcode"].as_str()), (403, Some("M_FORBIDDEN")));

    // The quota: 2 MB in all.
    let first = upload_ok(&s, &token, noise(900_000, 3), "application/octet-stream").await;
    upload_ok(&s, &token, noise(900_000, 4), "application/octet-stream").await;
    let (status, body) =
        upload(&s, &token, noise(900_000, 5), "application/octet-stream", None).await;
    assert_eq!((status, body["errcode"].as_str()), (403, Some("M_RESOURCE_LIMIT_EXCEEDED")));
    let (_, bob) = s.register("bob").await;
    upload_ok(&s, &bob, noise(900_000, 5), "application/octet-stream").await;

    // With the legacy switch on, the old unauthenticated endpoint serves media.
    let resp = get(&s, None, &format!("/_matrix/media/v3/download/{}", path_of(&first))).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.unwrap().len(), 900_000);

    // Previews of loopback are refused without an allow-list entry.
    let site = TestSite::start().await;
    let path = format!("{MEDIA}/preview_url?url={}", urlencode(&site.url("/page")));
    let (status, body) = s.get_auth(&path, &token).await;
    assert_eq!((status, body["errcode"].as_str()), (403, Some("M_FORBIDDEN")), "{body}");
    assert_eq!(site.hits.load(Ordering::SeqCst), 0, "the server connected anyway");
}

/// A tiny website on loopback for previews: a page with OpenGraph tags, its image, and
/// a redirect to an address that is not allowed.
struct TestSite {
    port: u16,
    hits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl TestSite {
    async fn start() -> Self {
        use axum::{Router, response::IntoResponse, routing::get};
        let hits = Arc::new(AtomicUsize::new(0));
        let port = free_port();
        let png = encode(&gradient(64, 48), ImageFormat::Png);
        let counter = hits.clone();
        let app = Router::new()
            .route(
                "/page",
                get(move || {
                    counter.fetch_add(1, Ordering::SeqCst);
                    async {
                        (
                            [("content-type", "text/html; charset=utf-8")],
                            "<html><head><title>Fallback</title>\
                             <meta property=\"og:title\" content=\"Trellis &amp; friends\">\
                             <meta property=\"og:description\" content=\"A test page\">\
                             <meta property=\"og:image\" content=\"/img.png\">\
                             </head><body>hello</body></html>",
                        )
                    }
                }),
            )
            .route("/img.png", get(move || async move { ([("content-type", "image/png")], png) }))
            .route(
                "/redirect",
                get(move || async move {
                    (
                        axum::http::StatusCode::FOUND,
                        [("location", format!("http://127.0.0.2:{port}/page"))],
                    )
                        .into_response()
                }),
            );
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { port, hits, task }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

impl Drop for TestSite {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn url_previews_with_allow_list() {
    let config = format!("{OPEN}[media]\nurl_preview_ip_allow = [\"127.0.0.1/32\"]\n");
    let s = TestServer::start(&config).await;
    let (_, token) = s.register("alice").await;
    let site = TestSite::start().await;

    let path = format!("{MEDIA}/preview_url?url={}&ts=0", urlencode(&site.url("/page")));
    let (status, og) = s.get_auth(&path, &token).await;
    assert_eq!(status, 200, "{og}");
    assert_eq!(og["og:title"], "Trellis & friends");
    assert_eq!(og["og:description"], "A test page");
    assert_eq!(og["og:image:width"], 64);
    assert_eq!(og["og:image:height"], 48);
    assert_eq!(og["og:image:type"], "image/png");
    assert!(og["matrix:image:size"].as_u64().unwrap() > 0);
    let image_mxc = og["og:image"].as_str().unwrap();
    assert!(image_mxc.starts_with("mxc://localhost/"), "{og}");
    let resp = get(&s, Some(&token), &format!("{MEDIA}/download/{}", path_of(image_mxc))).await;
    assert_eq!(resp.status(), 200);
    let image = image::load_from_memory(&resp.bytes().await.unwrap()).unwrap();
    assert_eq!((image.width(), image.height()), (64, 48));

    // Cached: the page is not fetched again.
    let (status, again) = s.get_auth(&path, &token).await;
    assert_eq!((status, &again), (200, &og));
    assert_eq!(site.hits.load(Ordering::SeqCst), 1);

    // A redirect to an address outside the allow-list is refused.
    let path = format!("{MEDIA}/preview_url?url={}", urlencode(&site.url("/redirect")));
    let (status, body) = s.get_auth(&path, &token).await;
    assert_eq!((status, body["errcode"].as_str()), (403, Some("M_FORBIDDEN")), "{body}");
    assert_eq!(site.hits.load(Ordering::SeqCst), 1);

    let (status, _) = s.get_auth(&format!("{MEDIA}/preview_url?url=notaurl"), &token).await;
    assert_eq!(status, 400);
    let resp = get(&s, None, &format!("{MEDIA}/preview_url?url=http://example.org/")).await;
    assert_eq!(resp.status(), 401);
}

fn count_files(dir: &std::path::Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries.flatten().map(|e| if e.path().is_dir() { count_files(&e.path()) } else { 1 }).sum()
}

#[tokio::test]
async fn admin_quarantine_and_delete() {
    let mut s = TestServer::start(OPEN).await;
    s.terminate();
    let pwfile = s.dir.path().join("pw");
    std::fs::write(&pwfile, "boss password 1\n").unwrap();
    let config = s.config_path.to_str().unwrap().to_owned();
    let out = common::run_cli(
        &[
            "user",
            "--config",
            &config,
            "create",
            "boss",
            "--admin",
            "--password-file",
            pwfile.to_str().unwrap(),
        ],
        s.dir.path(),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    s.launch().await;
    let (status, login) = s
        .post(
            "/_matrix/client/v3/login",
            &json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "boss"},
                    "password": "boss password 1"}),
        )
        .await;
    assert_eq!(status, 200, "{login}");
    let admin = login["access_token"].as_str().unwrap().to_owned();
    let (_, alice) = s.register("alice").await;
    let blobs = s.data_dir().join("media/blobs");

    // Two uploads of the same bytes share one file.
    let data = noise(300_000, 7);
    let a = upload_ok(&s, &alice, data.clone(), "application/octet-stream").await;
    let b = upload_ok(&s, &alice, data.clone(), "application/octet-stream").await;
    assert_eq!(count_files(&blobs), 1);

    let delete = |token: String, mxc: String| {
        let url = s.url(&format!("/_synapse/admin/v1/media/{}", path_of(&mxc)));
        let req = s.client.delete(url).bearer_auth(token);
        async move { json_of(req.send().await.unwrap()).await }
    };
    let (status, _) = delete(alice.clone(), a.clone()).await;
    assert_eq!(status, 403, "only admins");
    let (status, body) = delete(admin.clone(), a.clone()).await;
    assert_eq!(status, 200, "{body}");
    let resp = get(&s, Some(&alice), &format!("{MEDIA}/download/{}", path_of(&a))).await;
    assert_eq!(resp.status(), 404);
    let resp = get(&s, Some(&alice), &format!("{MEDIA}/download/{}", path_of(&b))).await;
    assert!(resp.bytes().await.unwrap()[..] == data[..], "the other item keeps the file");
    assert_eq!(count_files(&blobs), 1);
    let (status, _) = delete(admin.clone(), b.clone()).await;
    assert_eq!(status, 200);
    assert_eq!(count_files(&blobs), 0, "the last reference took the file with it");

    // Quarantine: gone for everyone, thumbnails included.
    let photo =
        upload_ok(&s, &alice, encode(&gradient(400, 300), ImageFormat::Jpeg), "image/jpeg").await;
    thumbnail_image(&s, &alice, &photo, "width=96&height=96&method=crop").await;
    let (status, body) = s
        .post_auth(
            &format!("/_synapse/admin/v1/media/quarantine/{}", path_of(&photo)),
            &admin,
            &json!({}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    for path in [
        format!("{MEDIA}/download/{}", path_of(&photo)),
        format!("{MEDIA}/thumbnail/{}?width=96&height=96&method=crop", path_of(&photo)),
    ] {
        let (status, body) = json_of(get(&s, Some(&alice), &path).await).await;
        assert_eq!((status, body["errcode"].as_str()), (404, Some("M_NOT_FOUND")), "{path}");
    }
    // Deleting an image removes its thumbnails' files too.
    let (status, _) = delete(admin.clone(), photo.clone()).await;
    assert_eq!(status, 200);
    // Background pre-generation may still be writing; wait for it to settle, then check.
    let deadline = Instant::now() + Duration::from_secs(10);
    while count_files(&blobs) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(count_files(&blobs), 0);
}

#[tokio::test]
async fn s3_backend_round_trip() {
    let moto = Moto::start().await;
    let endpoint = moto.endpoint();
    moto.bucket("trellis-media").await;
    let config = format!(
        "{OPEN}[media]\nbackend = \"s3\"\ns3_bucket = \"trellis-media\"\ns3_endpoint = \"{endpoint}\"\n\
         s3_access_key_id = \"test\"\ns3_secret_access_key = \"test\"\ns3_allow_http = true\n\
         s3_prefix = \"media\"\n"
    );
    let s = TestServer::start(&config).await;
    let (_, token) = s.register("alice").await;

    // Larger than one part: goes up as a multipart upload.
    let data = noise(12 * 1024 * 1024 + 5, 9);
    let mxc = upload_ok(&s, &token, data.clone(), "video/mp4").await;
    let resp = get(&s, Some(&token), &format!("{MEDIA}/download/{}", path_of(&mxc))).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "content-disposition"), "inline");
    assert!(resp.bytes().await.unwrap()[..] == data[..], "S3 round trip differs");
    let resp = s
        .client
        .get(s.url(&format!("{MEDIA}/download/{}", path_of(&mxc))))
        .bearer_auth(&token)
        .header("range", "bytes=10000000-10000099")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 206);
    assert!(resp.bytes().await.unwrap()[..] == data[10_000_000..10_000_100]);

    // Nothing of it is on local disk; it is in the bucket.
    assert_eq!(count_files(&s.data_dir().join("media/blobs")), 0);
    let listing = moto.list("trellis-media", "media/").await;
    assert!(listing.contains("<Key>media/"), "{listing}");

    let photo =
        upload_ok(&s, &token, encode(&gradient(640, 480), ImageFormat::Jpeg), "image/jpeg").await;
    let image = thumbnail_image(&s, &token, &photo, "width=96&height=96&method=crop").await;
    assert_eq!((image.width(), image.height()), (96, 96));
}
