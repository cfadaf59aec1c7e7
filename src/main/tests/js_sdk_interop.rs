//! Interop with a real third-party client library: matrix-js-sdk from npm, with its Rust
//! crypto (`@matrix-org/matrix-sdk-crypto-wasm`), runs two users against the real server:
//! registration, sync, `/messages` from a sync token, back-pagination, authenticated media,
//! delayed events (MSC4140) and an encrypted conversation; see `interop/js-sdk/scenario.mjs` for the scenario. Its
//! `node_modules` is installed by `.ci/install-deps` (`npm ci` in `interop/js-sdk`, pinned
//! by the committed `package-lock.json`).

mod common;

use std::{process::Command, time::Duration};

use common::{OPEN, TestServer};

#[tokio::test]
async fn matrix_js_sdk_clients_sync_paginate_share_media_and_exchange_encrypted_messages() {
    let s = TestServer::start(OPEN).await;
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/js-sdk");
    let base = s.base.clone();
    // Node resolves `matrix-js-sdk` from the scenario's own directory's `node_modules`.
    let output = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg("scenario.mjs")
            .arg(base)
            .current_dir(dir)
            .output()
            .expect("node runs (is Node.js installed? run .ci/install-deps)")
    });
    let output = tokio::time::timeout(Duration::from_secs(300), output)
        .await
        .expect("the js-sdk scenario finishes in time")
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "matrix-js-sdk scenario failed (is its node_modules installed? run .ci/install-deps)\n\
         stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    for line in [
        "clients started with rust crypto",
        "alice sees bob's device keys",
        "bob joined alice's room",
        "bob received alice's message through sync",
        "/messages from the sync token starts with the newest message",
        "bob's new session paginated back to the room's creation",
        "bob downloaded alice's image with authenticated media, bytes match",
        "delayed events sent, listed, restarted, cancelled and posted",
        "encryption enabled in a room with bob",
        "bob decrypted alice's message",
        "alice decrypted bob's reply",
        "OK",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
    }
}
