//! Interop with a real end-to-end encryption client library: matrix-nio with libolm
//! (installed by `.ci/install-deps`) runs two users and a second device against the
//! real server; see `interop/e2ee_nio.py` for the scenario.

mod common;

use std::{process::Command, time::Duration};

use common::{OPEN, TestServer};

#[tokio::test]
async fn matrix_nio_clients_exchange_encrypted_messages_and_forward_keys() {
    let s = TestServer::start(OPEN).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/e2ee_nio.py");
    let base = s.base.clone();
    let output = tokio::task::spawn_blocking(move || {
        Command::new("python3").arg(script).arg(base).output().expect("python3 runs")
    });
    let output = tokio::time::timeout(Duration::from_secs(300), output)
        .await
        .expect("the interop scenario finishes in time")
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "matrix-nio scenario failed (is matrix-nio[e2e] installed? run .ci/install-deps)\n\
         stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    for line in [
        "bob decrypted alice's message",
        "alice decrypted bob's message",
        "bob's new device decrypted the history with a forwarded key",
        "OK",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
    }
}
