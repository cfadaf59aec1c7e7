//! A full-disk drill: the data directory is a small tmpfs, filled up under a running
//! server. Writes get a clear out-of-space error while reads go on, `/health` and the
//! metrics say so, and once space is freed writes resume without a restart; nothing
//! acknowledged is lost, before or after a restart.

mod common;

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use common::{OPEN, TestServer, txn_id};
use serde_json::json;

/// A tmpfs mounted over a directory for the life of the value.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts, or says why it cannot (mounting needs root, as on CI and the dev machine).
    fn mount(dir: &Path, size_mb: u32) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mb}m"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(Self(dir.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Writes zeros to `path` until the file system refuses.
fn fill(path: &Path) {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 1 << 20];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_resume_after_the_disk_fills_and_space_returns() {
    let mut s = TestServer::prepare(OPEN, &[]);
    // Declared after the server, so it is unmounted after the server is killed.
    let mount = match Tmpfs::mount(&s.data_dir(), 200) {
        Ok(m) => m,
        Err(why) if why.contains("permission denied") || why.contains("must be superuser") => {
            eprintln!("skipped: mounting a tmpfs needs root ({why})");
            return;
        }
        Err(why) => panic!("mounting a tmpfs: {why}"),
    };
    s.launch().await;

    let (_, token) = s.register("alice").await;
    let room = s.create_room(&token, json!({})).await;
    let mut acked = vec![s.send_text(&token, &room, "before the disk filled").await];

    let filler = mount.0.join("filler");
    fill(&filler);
    // RocksDB's write-ahead log keeps a preallocated stretch, so sends may still go
    // through for a while; large ones use it up quickly.
    let big = "x".repeat(50_000);
    let send = |i: usize| {
        let path = format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/{}", txn_id());
        let body = json!({"msgtype": "m.text", "body": format!("{i} {big}")});
        let token = token.clone();
        let s = &s;
        async move { s.put_auth(&path, &token, &body).await }
    };
    let mut refusal = None;
    for i in 0..2_000 {
        let (status, body) = send(i).await;
        if status == 200 {
            acked.push(body["event_id"].as_str().unwrap().to_owned());
        } else {
            refusal = Some((status, body));
            break;
        }
    }
    let (status, body) = refusal.expect("a send was refused once the disk was full");
    assert_eq!(status, 507, "{body}");
    assert_eq!(body["errcode"], "M_RESOURCE_LIMIT_EXCEEDED", "{body}");
    assert!(body["error"].as_str().unwrap().contains("out of disk space"), "{body}");
    assert!(body["admin_contact"].as_str().is_some_and(|c| c.starts_with("mailto:")), "{body}");
    // The same again: the server keeps refusing while the disk is full.
    assert_eq!(send(9_999).await.0, 507);

    let health = s.client.get(s.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 503);
    assert!(health.text().await.unwrap().contains("out of disk space"));
    let metrics = s.metrics().await;
    assert!(metrics.contains("trellis_storage_writable 0"), "{metrics}");
    let refused = metrics
        .lines()
        .find(|l| l.starts_with("trellis_storage_write_errors_total{cause=\"out_of_space\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(refused >= 2.0, "{metrics}");

    // Reads are still served.
    let last = acked.last().unwrap().clone();
    let (status, event) =
        s.get_auth(&format!("/_matrix/client/v3/rooms/{room}/event/{last}"), &token).await;
    assert_eq!(status, 200, "{event}");

    std::fs::remove_file(&filler).unwrap();
    // RocksDB checks for free space every few seconds and resumes by itself.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let health = s.client.get(s.url("/health")).send().await.unwrap();
        if health.status() == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "/health still failing a minute after space returned");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    acked.push(s.send_text(&token, &room, "after space returned").await);
    assert!(s.metrics().await.contains("trellis_storage_writable 1"));

    let check_all = |s: &TestServer| {
        let acked = acked.clone();
        let (room, token) = (room.clone(), token.clone());
        let s = s.base.clone();
        async move {
            let client = reqwest::Client::new();
            for id in &acked {
                let resp = client
                    .get(format!("{s}/_matrix/client/v3/rooms/{room}/event/{id}"))
                    .bearer_auth(&token)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(resp.status(), 200, "acknowledged event {id} lost");
            }
        }
    };
    check_all(&s).await;
    let (status, page) = s
        .get_auth(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=1"), &token)
        .await;
    assert_eq!(status, 200);
    assert_eq!(page["chunk"][0]["content"]["body"], "after space returned", "{page}");

    // And the database opens clean after a restart, with everything in it.
    assert!(s.terminate().success());
    s.launch().await;
    check_all(&s).await;
    s.send_text(&token, &room, "after a restart").await;
}
