//! The command line: config checking, defaults, version, and start-up with no config.

mod common;

use std::time::{Duration, Instant};

use common::{BIN, free_port, run_cli, signal, wait_exit};

#[test]
fn version_flag() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_cli(&["--version"], dir.path());
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("trellis {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn check_reports_every_invalid_key_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        "typo_section_key = 1\n[server]\nlisten = \"nowhere\"\nserver_name = \"bad name\"\n\
         [storage]\ncompression = \"gzip\"\nblock_cache_mb = -5\n[logging]\nformat = \"xml\"\n\
         [metrics]\nenabled = \"yes\"\n",
    )
    .unwrap();
    let out = run_cli(&["config", "check", file.to_str().unwrap()], dir.path());
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    for key in [
        "typo_section_key",
        "server.listen",
        "storage.compression",
        "storage.block_cache_mb",
        "logging.format",
        "metrics.enabled",
    ] {
        assert!(stderr.contains(key), "{key} not reported:\n{stderr}");
    }

    // Once the type errors are fixed, semantic ones are named too.
    std::fs::write(&file, "[server]\nserver_name = \"bad name\"\n").unwrap();
    let out = run_cli(&["config", "check", file.to_str().unwrap()], dir.path());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("server.server_name"));

    let out = run_cli(&["config", "check", "/nonexistent/trellis.toml"], dir.path());
    assert!(!out.status.success());
}

#[test]
fn printed_defaults_pass_the_check() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_cli(&["config", "print-defaults"], dir.path());
    assert!(out.status.success());
    let file = dir.path().join("defaults.toml");
    std::fs::write(&file, &out.stdout).unwrap();
    let out = run_cli(&["config", "check", file.to_str().unwrap()], dir.path());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn serve_refuses_an_invalid_config() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[server]\nlisten = 5\n").unwrap();
    let out = run_cli(&["serve", "--config", file.to_str().unwrap()], dir.path());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("server.listen"));
}

/// No config file at all: the server runs on defaults, keeps its data in ./data and
/// creates a private signing key. Only the ports are moved (by environment override) so
/// tests can run in parallel.
#[tokio::test]
async fn serve_with_no_config_uses_defaults_in_cwd() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let started = Instant::now();
    let mut child = std::process::Command::new(BIN)
        .arg("serve")
        .current_dir(dir.path())
        .env("TRELLIS_SERVER__LISTEN", format!("127.0.0.1:{port}"))
        .env("TRELLIS_METRICS__LISTEN", format!("127.0.0.1:{}", free_port()))
        .env_remove("TRELLIS_CONFIG")
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    common::wait_ready(&reqwest::Client::new(), &base, &mut child).await;
    eprintln!("ready after {:?}", started.elapsed());

    let body: serde_json::Value =
        reqwest::get(format!("{base}/_matrix/key/v2/server")).await.unwrap().json().await.unwrap();
    assert_eq!(body["server_name"], "localhost");
    assert!(dir.path().join("data/signing.key").is_file());
    assert!(dir.path().join("data/db").is_dir());

    // SIGTERM: an orderly exit with status 0.
    signal(&child, "TERM");
    let status = wait_exit(&mut child, Duration::from_secs(30));
    assert!(status.success(), "{status}");
}
