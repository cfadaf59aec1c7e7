//! Interop with a real application-service framework: matrix-bot-sdk's `Appservice` class
//! from npm (`@vector-im/matrix-bot-sdk`, Element's maintained fork that
//! matrix-appservice-bridge 10 and matrix-hookshot build on) runs a bridge against the real
//! server: the homeserver's ping, puppet registration, masquerading with `user_id=`,
//! transactions (events and ephemeral), user and alias queries, and delivery of a backlog
//! after the appservice and the server were both down; see `interop/appservice/scenario.mjs`
//! for the scenario (and `run-against-synapse.sh` there to check it against Synapse). Its
//! `node_modules` is installed by `.ci/install-deps` (`npm ci` in `interop/appservice`,
//! pinned by the committed `package-lock.json`).

mod common;

use std::{
    io::{BufRead, BufReader, Read, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use common::{OPEN, TestServer, free_port};

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/appservice");

/// The registration the scenario is written for (what `node scenario.mjs make-registration`
/// writes too): the appservice listens on `127.0.0.1:{as_port}`.
fn write_registration(dir: &Path, as_port: u16) -> PathBuf {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
    let yaml = format!(
        "id: trellis-interop-bridge\n\
         url: http://127.0.0.1:{as_port}\n\
         as_token: as-{nanos:x}-{as_port}\n\
         hs_token: hs-{nanos:x}-{as_port}\n\
         sender_localpart: _bridge_bot\n\
         namespaces:\n\
         \x20 users:\n\
         \x20   - exclusive: true\n\
         \x20     regex: '@_bridge_.*'\n\
         \x20 aliases:\n\
         \x20   - exclusive: true\n\
         \x20     regex: '#_bridge_.*'\n\
         \x20 rooms: []\n\
         rate_limited: false\n\
         receive_ephemeral: true\n"
    );
    let path = dir.join("registration.yaml");
    std::fs::write(&path, yaml).unwrap();
    path
}

/// A server with open registration and the scenario's appservice registered; the temporary
/// directory holding the registration file must outlive the server.
async fn start_with_appservice() -> (TestServer, tempfile::TempDir, PathBuf, u16) {
    let reg_dir = tempfile::tempdir().unwrap();
    let as_port = free_port();
    let registration = write_registration(reg_dir.path(), as_port);
    let config =
        format!("{OPEN}[appservice]\nregistration_files = [\"{}\"]\n", registration.display());
    let s = TestServer::start(&config).await;
    (s, reg_dir, registration, as_port)
}

#[tokio::test]
async fn matrix_bot_sdk_appservice_bridges_puppets_transactions_and_queries() {
    let (s, _reg_dir, registration, as_port) = start_with_appservice().await;
    let base = s.base.clone();
    // Node resolves `@vector-im/matrix-bot-sdk` from the scenario's own `node_modules`.
    let output = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg("scenario.mjs")
            .arg(base)
            .arg(registration)
            .arg(as_port.to_string())
            .current_dir(DIR)
            .output()
            .expect("node runs (is Node.js installed? run .ci/install-deps)")
    });
    let output = tokio::time::timeout(Duration::from_secs(300), output)
        .await
        .expect("the appservice scenario finishes in time")
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "appservice scenario failed (is its node_modules installed? run .ci/install-deps)\n\
         stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    for line in [
        "appservice listening on 127.0.0.1:",
        "is usable",
        "homeserver pinged the appservice",
        "registered through the appservice; whoami with user_id= is the puppet",
        "the bot joined on its invite; the puppet joined by masquerading",
        "puppet's message reached the human with sender = puppet",
        "appservice received the human's message in a transaction",
        "appservice received the human's typing notification as an ephemeral event",
        "it was created; profile lookup succeeds",
        "the bot created the room; the alias resolves and the human joined it",
        "OK",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}\nstderr:\n{stderr}");
    }
}

#[tokio::test]
async fn appservice_receives_backlog_in_order_after_it_and_the_server_restart() {
    let (mut s, _reg_dir, registration, as_port) = start_with_appservice().await;
    // `backlog --pause`: the scenario stops its appservice, sends messages, prints
    // "PAUSED: ..." and waits for a line on stdin; meanwhile the server restarts.
    let mut child = Command::new("node")
        .arg("scenario.mjs")
        .arg(&s.base)
        .arg(&registration)
        .arg(as_port.to_string())
        .args(["backlog", "--pause"])
        .current_dir(DIR)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node runs (is Node.js installed? run .ci/install-deps)");
    let (tx, mut lines_rx) = tokio::sync::mpsc::unbounded_channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut stderr_pipe = child.stderr.take().unwrap();
    let stderr_reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr_pipe.read_to_string(&mut text);
        text
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    let mut lines = Vec::new();
    let mut restarted = false;
    loop {
        let line = match tokio::time::timeout_at(deadline, lines_rx.recv()).await {
            Ok(Some(line)) => line,
            Ok(None) => break,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "the backlog scenario did not finish in time; so far:\n{}",
                    lines.join("\n")
                );
            }
        };
        if line.starts_with("PAUSED:") {
            assert!(s.terminate().success(), "trellis exits cleanly on SIGTERM");
            s.launch().await;
            restarted = true;
            let mut stdin = child.stdin.take().unwrap();
            writeln!(stdin).unwrap();
        }
        lines.push(line);
    }
    let status = child.wait().unwrap();
    let stdout = lines.join("\n");
    let stderr = stderr_reader.join().unwrap();
    assert!(
        status.success(),
        "appservice backlog scenario failed (is its node_modules installed? run .ci/install-deps)\n\
         stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(restarted, "the scenario never paused for the restart:\n{stdout}");
    for line in [
        "appservice is in the human's room and receiving transactions",
        "appservice stopped listening; human sent 5 messages",
        "appservice received all 5 messages after listening again, in order, none duplicated, before the next one",
        "OK",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}\nstderr:\n{stderr}");
    }
}
