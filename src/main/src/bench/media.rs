//! Media scenario: upload and download throughput of a large file next to a plain file
//! copy on the same disk, thumbnail latency for a large JPEG, and the server's memory
//! while many clients upload at once (uploads must stream, not buffer).

use std::{
    io::Write,
    path::PathBuf,
    time::{Duration, Instant},
};

use bytes::Bytes;
use clap::Args;
use futures_util::StreamExt;
use serde_json::{Value, json};

use super::{Api, Common, ServerProbe, rss_mb, summary};

#[derive(Args)]
pub struct MediaArgs {
    #[command(flatten)]
    pub common: Common,
    /// Size of the file uploaded and downloaded, in MB (MiB).
    #[arg(long, default_value_t = 50)]
    pub size_mb: usize,
    /// Uploads and downloads measured (the best and median are reported).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Clients uploading `size_mb` each at once during the memory phase (0: skip).
    #[arg(long, default_value_t = 20)]
    pub clients: usize,
    /// Megapixels of the JPEG thumbnailed (4:3).
    #[arg(long, default_value_t = 12.0)]
    pub megapixels: f64,
    /// Directory for the plain-copy baseline: put it on the server's data disk.
    #[arg(long)]
    pub scratch_dir: Option<PathBuf>,
}

const MB: f64 = 1024.0 * 1024.0;

/// Cheap bytes that neither compress nor repeat (xorshift).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn round(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

/// Best and median of throughputs in MB/s.
fn rates(rates: &mut [f64]) -> Value {
    rates.sort_by(|a, b| b.total_cmp(a));
    json!({"best_mb_s": round(rates[0]), "median_mb_s": round(rates[rates.len() / 2])})
}

/// The plain-copy baseline: copying the file and making it durable, as an upload does.
fn plain_copy(dir: &std::path::Path, data: &[u8], repeats: usize) -> Result<Value, String> {
    let io = |e: std::io::Error| format!("plain copy in {}: {e}", dir.display());
    let src = dir.join("trellis-bench-src");
    let dst = dir.join("trellis-bench-dst");
    let mut f = std::fs::File::create(&src).map_err(io)?;
    f.write_all(data).map_err(io)?;
    f.sync_all().map_err(io)?;
    let mut samples = Vec::new();
    for _ in 0..repeats.max(1) {
        let _ = std::fs::remove_file(&dst);
        let started = Instant::now();
        std::fs::copy(&src, &dst).map_err(io)?;
        std::fs::File::open(&dst).and_then(|f| f.sync_all()).map_err(io)?;
        samples.push(data.len() as f64 / MB / started.elapsed().as_secs_f64());
    }
    let _ = std::fs::remove_file(&src);
    let _ = std::fs::remove_file(&dst);
    Ok(rates(&mut samples))
}

async fn upload(
    client: &reqwest::Client,
    base: &str,
    token: &str,
    body: reqwest::Body,
    length: usize,
    content_type: &str,
) -> Result<String, String> {
    // Streamed bodies get a length too: Synapse refuses uploads without one.
    let resp = client
        .post(format!("{base}/_matrix/media/v3/upload"))
        .bearer_auth(token)
        .header("content-type", content_type)
        .header("content-length", length)
        .body(body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    let body: Value = resp.json().await.map_err(|e| e.to_string())?;
    match body["content_uri"].as_str() {
        Some(mxc) if status.is_success() => Ok(mxc.trim_start_matches("mxc://").to_owned()),
        _ => Err(format!("upload: {status} {body}")),
    }
}

/// GETs `path` and counts the bytes without keeping them.
async fn fetch(client: &reqwest::Client, url: &str, token: &str) -> Result<usize, String> {
    let resp = client.get(url).bearer_auth(token).send().await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("GET {url}: {}", resp.status()));
    }
    let mut stream = resp.bytes_stream();
    let mut n = 0;
    while let Some(chunk) = stream.next().await {
        n += chunk.map_err(|e| e.to_string())?.len();
    }
    Ok(n)
}

/// A 4:3 JPEG of about `megapixels`, with detail (not a flat colour) so decoding works.
fn jpeg(megapixels: f64) -> Result<Vec<u8>, String> {
    let w = ((megapixels * 1e6 * 4.0 / 3.0).sqrt()) as u32;
    let h = w * 3 / 4;
    let grain = noise((w * h) as usize, 5);
    let image = image::RgbImage::from_fn(w, h, |x, y| {
        let g = grain[(y * w + x) as usize] / 8;
        image::Rgb([(x * 255 / w) as u8 ^ g, (y * 255 / h) as u8, ((x ^ y) & 0xff) as u8])
    });
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
        .encode_image(&image)
        .map_err(|e| e.to_string())?;
    Ok(out)
}

pub async fn media(args: MediaArgs) -> Result<Value, String> {
    let pid = args.common.server_pid;
    let api = Api::new(&args.common, args.clients)?;
    let (client, base) = (api.client.clone(), api.base.clone());
    let token = api.register(&format!("bench_media_{}", std::process::id())).await?;
    let probe = ServerProbe::start(pid);
    let size = args.size_mb * 1024 * 1024;
    let data = noise(size, 1);
    let scratch = args.scratch_dir.clone().unwrap_or_else(std::env::temp_dir);
    let copy = plain_copy(&scratch, &data, args.repeats)?;

    // Upload and download, each repeat with different bytes (no deduplication).
    let (mut up, mut down) = (Vec::new(), Vec::new());
    for i in 0..args.repeats.max(1) {
        let mut bytes = data.clone();
        bytes[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
        let started = Instant::now();
        let path =
            upload(&client, &base, &token, Bytes::from(bytes).into(), size, "video/mp4").await?;
        up.push(size as f64 / MB / started.elapsed().as_secs_f64());
        let started = Instant::now();
        let url = format!("{base}/_matrix/client/v1/media/download/{path}");
        let n = fetch(&client, &url, &token).await?;
        if n != size {
            return Err(format!("downloaded {n} bytes of {size}"));
        }
        down.push(size as f64 / MB / started.elapsed().as_secs_f64());
    }

    // Thumbnails of a large JPEG: the first right after upload (from the original), then
    // new sizes once the rendition exists, then stored sizes.
    let jpeg = jpeg(args.megapixels)?;
    let jpeg_bytes = jpeg.len();
    let photo = upload(&client, &base, &token, jpeg.into(), jpeg_bytes, "image/jpeg").await?;
    let thumb = |w: u32, h: u32| {
        format!(
            "{base}/_matrix/client/v1/media/thumbnail/{photo}?width={w}&height={h}&method=scale"
        )
    };
    let started = Instant::now();
    fetch(&client, &thumb(400, 300), &token).await?;
    let first = started.elapsed();
    // Let the background pre-generation (and the rendition) finish.
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs(20) {
        let started = Instant::now();
        fetch(&client, &thumb(800, 600), &token).await?;
        if started.elapsed() < Duration::from_millis(20) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut on_demand = Vec::new();
    for i in 0..10u32 {
        let started = Instant::now();
        fetch(&client, &thumb(420 + i * 20, 315 + i * 15), &token).await?;
        on_demand.push(started.elapsed());
    }
    let mut stored = Vec::new();
    for _ in 0..20 {
        let started = Instant::now();
        fetch(&client, &thumb(320, 240), &token).await?;
        stored.push(started.elapsed());
    }

    // Memory while `clients` upload at once, bodies generated as they are sent.
    let mut memory = json!(null);
    let mut errors = 0;
    if args.clients > 0 {
        let before = rss_mb(pid);
        let started = Instant::now();
        let mut uploads = Vec::new();
        for c in 0..args.clients {
            let (client, base, token) = (client.clone(), base.clone(), token.clone());
            let chunks = futures_util::stream::iter((0..size.div_ceil(1 << 20)).map(move |i| {
                let len = (size - i * (1 << 20)).min(1 << 20);
                Ok::<_, std::io::Error>(Bytes::from(noise(len, (c * 100_000 + i + 7) as u64)))
            }));
            uploads.push(tokio::spawn(async move {
                let body = reqwest::Body::wrap_stream(chunks);
                upload(&client, &base, &token, body, size, "application/octet-stream").await
            }));
        }
        let mut peak = before.unwrap_or(0.0);
        while !uploads.iter().all(|u| u.is_finished()) {
            peak = peak.max(rss_mb(pid).unwrap_or(0.0));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for u in uploads {
            match u.await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    errors += 1;
                    eprintln!("concurrent upload: {e}");
                }
                Err(e) => {
                    errors += 1;
                    eprintln!("concurrent upload: {e}");
                }
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        memory = json!({
            "clients": args.clients,
            "rss_before_mb": before,
            "rss_peak_mb": pid.map(|_| peak),
            "rss_after_mb": rss_mb(pid),
            "aggregate_mb_s": round((args.clients * size) as f64 / MB / elapsed),
            "errors": errors,
        });
    }

    Ok(json!({
        "scenario": "media",
        "params": {"size_mb": args.size_mb, "repeats": args.repeats, "clients": args.clients,
                   "megapixels": args.megapixels, "scratch_dir": scratch.display().to_string()},
        "plain_copy": copy,
        "upload": rates(&mut up),
        "download": rates(&mut down),
        "thumbnail": {
            "jpeg_bytes": jpeg_bytes,
            "first_after_upload_ms": round(first.as_secs_f64() * 1000.0),
            "new_size": summary(&mut on_demand),
            "stored_size": summary(&mut stored),
        },
        "concurrent_uploads": memory,
        "errors": errors,
        "server": probe.report(),
    }))
}
