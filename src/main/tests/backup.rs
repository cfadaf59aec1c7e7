//! Backups (docs/operations.md): a restore drill under load, incremental copies, verify,
//! prune, and a scheduled backup into S3-compatible storage (moto).

mod common;

use std::{
    path::Path,
    process::{Command, Output},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use common::{BIN, Moto, OPEN, TestServer, noise, urlencode};
use serde_json::{Value, json};

const BACKUPS: &str = "/_trellis/admin/v1/backups";

async fn upload(s: &TestServer, token: &str, data: Vec<u8>) -> String {
    s.upload_bytes(token, &data).await
}

async fn download(s: &TestServer, token: &str, mxc: &str) -> Vec<u8> {
    let path = format!("/_matrix/client/v1/media/download/{}", mxc.trim_start_matches("mxc://"));
    let resp = s.client.get(s.url(&path)).bearer_auth(token).send().await.unwrap();
    assert_eq!(resp.status(), 200, "downloading {mxc}");
    resp.bytes().await.unwrap().to_vec()
}

/// `trellis backup <args> --config <config>`, with `env`.
fn backup_cli(config: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(BIN)
        .arg("backup")
        .args(args)
        .arg("--config")
        .arg(config)
        .envs(env.iter().copied())
        .env_remove("TRELLIS_ADMIN_TOKEN")
        .output()
        .unwrap()
}

fn stdout_json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Waits for backup `id` to finish through the admin API; its final state.
async fn finished(s: &TestServer, admin: &str, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (status, body) = s.get_auth(&format!("{BACKUPS}/{id}"), admin).await;
        assert_eq!(status, 200, "{body}");
        if body["state"] != "running" {
            return body;
        }
        assert!(Instant::now() < deadline, "backup {id} still running");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Files stored in a local repository (each content once).
fn stored_files(repo: &Path) -> usize {
    fn walk(dir: &Path) -> usize {
        std::fs::read_dir(dir)
            .map(|d| d.flatten().map(|e| if e.path().is_dir() { walk(&e.path()) } else { 1 }).sum())
            .unwrap_or(0)
    }
    walk(&repo.join("files"))
}

fn manifest(repo: &Path, id: &str) -> Value {
    let text = std::fs::read_to_string(repo.join(format!("manifests/{id}.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn hashes(manifest: &Value) -> Vec<String> {
    let files = manifest["files"].as_array().unwrap();
    files.iter().map(|f| f["sha256"].as_str().unwrap().to_owned()).collect()
}

#[tokio::test]
async fn restore_drill_under_load() {
    let repo = tempfile::tempdir().unwrap();
    let config = format!("{OPEN}[backup]\ndestination = \"{}\"\n", repo.path().display());
    let mut s = TestServer::start(&config).await;
    let admin = common::admin_token(&mut s).await;
    let (_, token) = s.register("alice").await;
    let room = s.create_room(&token, json!({"name": "drill"})).await;
    let mut media = Vec::new();
    for seed in 1..=3u64 {
        let data = noise(150_000 + 50_000 * seed as usize, seed);
        media.push((upload(&s, &token, data.clone()).await, data));
    }
    let media_bytes: u64 = media.iter().map(|(_, d)| d.len() as u64).sum();

    // Messages go on being sent, and acknowledged, all through the backup.
    let s = Arc::new(s);
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (s, token, room, acked, stop) =
            (s.clone(), token.clone(), room.clone(), acked.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let id = s.send_text(&token, &room, &format!("message {n}")).await;
                acked.lock().unwrap().push(id);
                n += 1;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;

    // An online backup, asked for from the command line: the running server takes it.
    let before: Vec<String> = acked.lock().unwrap().clone();
    assert!(!before.is_empty());
    let (config_path, base) = (s.config_path.clone(), s.base.clone());
    let admin_env = admin.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .args(["backup", "create", "--server", &base, "--config"])
            .arg(&config_path)
            .env("TRELLIS_ADMIN_TOKEN", &admin_env)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let first = stdout_json(&out);
    assert_eq!(first["state"], "done", "{first}");
    let first_id = first["id"].as_str().unwrap().to_owned();
    assert_eq!(first["kind"], "manual");
    assert!(first["copied_bytes"].as_u64().unwrap() >= media_bytes, "{first}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    let during = acked.lock().unwrap().len() - before.len();
    assert!(during > 0, "the load went on while the backup was taken");

    // The disk is lost: the server dies, and a new data directory is filled from the
    // backup. The old one is refused as a target: it holds a server's data.
    let mut s = Arc::try_unwrap(s).ok().unwrap();
    s.kill9();
    let out = backup_cli(&s.config_path, &["restore", "latest"], &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("empty data directory"));
    let mut r = TestServer::prepare(&config, &[]);
    let renamed = [("TRELLIS_SERVER__SERVER_NAME", "elsewhere.example")];
    let out = backup_cli(&r.config_path, &["restore", "latest"], &renamed);
    assert!(!out.status.success(), "another server's backup");
    assert!(String::from_utf8_lossy(&out.stderr).contains("name cannot change"));
    let restored = stdout_json(&backup_cli(&r.config_path, &["restore", "latest"], &[]));
    assert_eq!(restored["id"], first_id.as_str());
    assert!(restored["database_keys"].as_u64().unwrap() > 0);
    r.launch().await;

    // Every message acknowledged before the backup was asked for is there; the access
    // token of the time works; media are byte-identical; the room takes new messages.
    for id in &before {
        let path = format!("/_matrix/client/v3/rooms/{room}/event/{}", urlencode(id));
        let (status, body) = r.get_auth(&path, &token).await;
        assert_eq!(status, 200, "{id} lost: {body}");
    }
    for (mxc, data) in &media {
        assert!(download(&r, &token, mxc).await == *data, "{mxc} differs after the restore");
    }
    r.send_text(&token, &room, "after the restore").await;

    let verified = stdout_json(&backup_cli(&r.config_path, &["verify", &first_id], &[]));
    assert_eq!(verified["damaged"], json!([]), "{verified}");
    assert!(verified["database_keys"].as_u64().unwrap() > 0);

    // A second backup, through the admin API: incremental. No media file and no
    // unchanged table file is copied again, and the repository holds each content once.
    let stored_before = stored_files(repo.path());
    let (status, started) = r.post_auth(BACKUPS, &admin, &json!({})).await;
    assert_eq!(status, 202, "{started}");
    let second = finished(&r, &admin, started["id"].as_str().unwrap()).await;
    assert_eq!(second["state"], "done", "{second}");
    let second_id = second["id"].as_str().unwrap().to_owned();
    let (copied, total) =
        (second["copied_bytes"].as_u64().unwrap(), second["total_bytes"].as_u64().unwrap());
    assert!(copied + media_bytes <= total, "media copied again: {second}");
    assert!(second["copied_files"].as_u64().unwrap() < second["files"].as_u64().unwrap());
    assert_eq!(
        stored_files(repo.path()),
        stored_before + second["copied_files"].as_u64().unwrap() as usize
    );
    let mut all = hashes(&manifest(repo.path(), &first_id));
    all.extend(hashes(&manifest(repo.path(), &second_id)));
    all.sort();
    all.dedup();
    assert_eq!(stored_files(repo.path()), all.len());

    let (status, list) = r.get_auth(BACKUPS, &admin).await;
    assert_eq!(status, 200, "{list}");
    let ids: Vec<&str> =
        list["backups"].as_array().unwrap().iter().map(|b| b["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [second_id.as_str(), first_id.as_str()], "newest first");

    // Prune to one: the older backup and the files only it held go.
    let (status, pruned) =
        r.post_auth(&format!("{BACKUPS}/prune"), &admin, &json!({"keep": 1})).await;
    assert_eq!(status, 200, "{pruned}");
    assert_eq!(pruned["removed_backups"], json!([first_id]));
    let mut kept = hashes(&manifest(repo.path(), &second_id));
    kept.sort();
    kept.dedup();
    assert_eq!(stored_files(repo.path()), kept.len());
    let (status, verified) =
        r.post_auth(&format!("{BACKUPS}/{second_id}/verify"), &admin, &json!({})).await;
    assert_eq!(status, 200, "{verified}");
    assert_eq!(verified["ok"], true, "{verified}");
    let (status, _) = r.get_auth(&format!("{BACKUPS}/{first_id}"), &admin).await;
    assert_eq!(status, 404);

    // Audited and counted.
    let (_, audit) = r.get_auth("/_trellis/admin/v1/audit?action=backup_create", &admin).await;
    let entries = audit["entries"].as_array().unwrap();
    assert!(
        entries
            .iter()
            .any(|e| e["outcome"] == "ok" && e["detail"].as_str().unwrap().contains(&second_id)),
        "{audit}"
    );
    assert!(r.metrics().await.contains("trellis_backups_total{outcome=\"ok\"} 1"));

    // With the server stopped, the command line takes the backup itself.
    r.terminate();
    let offline = stdout_json(&backup_cli(&r.config_path, &["create"], &[]));
    assert_eq!(offline["kind"], "cli");
    let listed = stdout_json(&backup_cli(&r.config_path, &["list"], &[]));
    assert_eq!(listed.as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn a_scheduled_backup_goes_to_s3_and_restores_from_there() {
    let moto = Moto::start().await;
    moto.bucket("trellis-backups").await;
    let config = format!(
        "{OPEN}[backup]\ndestination = \"s3://trellis-backups/nightly\"\ninterval_hours = 24\n\
         keep = 2\ns3_endpoint = \"{}\"\ns3_access_key_id = \"test\"\n\
         s3_secret_access_key = \"test\"\ns3_allow_http = true\n",
        moto.endpoint()
    );
    let mut s = TestServer::start(&config).await;
    let admin = common::admin_token(&mut s).await;
    // No backup existed at start, so the schedule takes one at once.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, list) = s.get_auth(BACKUPS, &admin).await;
        assert_eq!(status, 200, "{list}");
        let backups = list["backups"].as_array().unwrap();
        if list["running"].is_null() && backups.iter().any(|b| b["kind"] == "scheduled") {
            break;
        }
        assert!(Instant::now() < deadline, "no scheduled backup: {list}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, token) = s.register("bob").await;
    let room = s.create_room(&token, json!({})).await;
    let event = s.send_text(&token, &room, "kept in a bucket").await;
    let data = noise(20_000, 7);
    let mxc = upload(&s, &token, data.clone()).await;
    let (status, started) = s.post_auth(BACKUPS, &admin, &json!({})).await;
    assert_eq!(status, 202, "{started}");
    let done = finished(&s, &admin, started["id"].as_str().unwrap()).await;
    assert_eq!((done["state"].as_str(), done["kind"].as_str()), (Some("done"), Some("manual")));
    let listing = moto.list("trellis-backups", "nightly/manifests/").await;
    assert!(listing.contains(&format!("nightly/manifests/{}.json", done["id"].as_str().unwrap())));

    s.kill9();
    let mut r = TestServer::prepare(&config, &[]);
    stdout_json(&backup_cli(&r.config_path, &["restore", done["id"].as_str().unwrap()], &[]));
    r.launch().await;
    let path = format!("/_matrix/client/v3/rooms/{room}/event/{}", urlencode(&event));
    let (status, body) = r.get_auth(&path, &token).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["content"]["body"], "kept in a bucket");
    assert!(download(&r, &token, &mxc).await == data);

    // Bad requests get Matrix errors.
    let (status, body) = r.post_auth(&format!("{BACKUPS}/prune"), &admin, &json!({})).await;
    assert_eq!((status, body["errcode"].as_str()), (400, Some("M_MISSING_PARAM")));
    let (status, body) =
        r.post_auth(&format!("{BACKUPS}/prune"), &admin, &json!({"keep": 0})).await;
    assert_eq!((status, body["errcode"].as_str()), (400, Some("M_INVALID_PARAM")));
    let (status, body) = r.get_auth(&format!("{BACKUPS}/..%2Fsecrets"), &admin).await;
    assert_eq!((status, body["errcode"].as_str()), (404, Some("M_NOT_FOUND")));
    let (status, _) = r.get_auth(BACKUPS, &token).await;
    assert_eq!(status, 403, "only admins");
}
