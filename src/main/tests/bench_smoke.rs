//! Keeps `trellis bench` working: every scenario runs at tiny sizes against a real
//! server and prints one JSON line with its parameters, figures, error counts and the
//! server probe. No timing is asserted: figures come from real runs, not tests.

mod common;

use std::process::Command;

use common::{BIN, OPEN, TestServer};
use serde_json::Value;

/// Every scenario with tiny sizes, and a figure its line must carry.
const SCENARIOS: &[(&str, &[&str], &str)] = &[
    ("register", &["--users", "4", "--concurrency", "2"], "users_per_second"),
    (
        "login-storm",
        &["--logins", "4", "--concurrency", "2", "--idle-probes", "3"],
        "whoami_during_storm",
    ),
    ("send", &["--senders", "2", "--messages", "10", "--rooms", "2"], "messages_per_second"),
    (
        "messages",
        &["--events", "20", "--page", "5", "--pages", "5", "--fill-concurrency", "2"],
        "page_latency",
    ),
    ("join", &["--members", "2", "--joins", "2"], "join_latency"),
    (
        "initial-sync",
        &["--rooms", "2", "--messages-per-room", "2", "--samples", "2"],
        "initial_sync",
    ),
    (
        "incremental-sync",
        &["--rooms", "2", "--messages-per-room", "1", "--samples", "2"],
        "incremental_sync_one_message",
    ),
    ("delivery", &["--receivers", "2", "--rate", "5", "--seconds", "1", "--idle", "2"], "delivery"),
    (
        "idle",
        &["--connections", "5", "--users", "2", "--probes", "5", "--ramp-seconds", "1"],
        "whoami_under_load",
    ),
    (
        "media",
        &["--size-mb", "1", "--repeats", "1", "--clients", "2", "--megapixels", "0.1"],
        "upload",
    ),
    (
        "push",
        &["--members", "4", "--pushers", "2", "--senders", "2", "--rate", "10", "--seconds", "1"],
        "send_to_push",
    ),
    (
        "search",
        &[
            "--senders",
            "2",
            "--messages",
            "30",
            "--rooms",
            "2",
            "--vocabulary",
            "200",
            "--queries",
            "3",
        ],
        "search_latency",
    ),
];

#[tokio::test(flavor = "multi_thread")]
async fn every_scenario_runs_and_prints_one_json_line() {
    // The push scenario plays a push gateway on loopback.
    let server =
        TestServer::start(&format!("{OPEN}[push]\ngateway_ip_allow = [\"127.0.0.0/8\"]\n")).await;
    let pid = server.child.as_ref().expect("running").id().to_string();
    let scratch = server.dir.path().join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    for (scenario, args, figure) in SCENARIOS {
        let mut command = Command::new(BIN);
        command
            .args(["bench", scenario, "--base-url", &server.base, "--server-pid", &pid])
            .args(["--max-seconds", "60"])
            .args(*args);
        if *scenario == "media" {
            command.arg("--scratch-dir").arg(&scratch);
        }
        if *scenario == "push" {
            command.args(["--listen", &format!("127.0.0.1:{}", common::free_port())]);
        }
        let output = command.output().expect("run trellis bench");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{scenario} failed: {stderr}");
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(lines.len(), 1, "{scenario} printed {stdout}");
        let line: Value = serde_json::from_str(lines[0]).expect("a JSON line");
        assert_eq!(line["scenario"], *scenario);
        assert!(line["params"].is_object(), "{scenario}: {line}");
        assert!(!line[*figure].is_null(), "{scenario} lacks {figure}: {line}");
        assert_eq!(line["errors"], 0, "{scenario}: {line}");
        assert_eq!(line["rate_limited"], 0, "{scenario}: {line}");
        // Given the server's pid, every scenario reports its CPU time and memory.
        assert!(line["server"]["cpu_seconds"].is_number(), "{scenario}: {line}");
        assert!(line["server"]["rss_mb"].as_f64().is_some_and(|mb| mb > 0.0), "{line}");
    }

    // The help documents every scenario and says the federation one is not there yet.
    let help = Command::new(BIN).args(["bench", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for (scenario, _, _) in SCENARIOS {
        assert!(help.contains(scenario), "bench --help lacks {scenario}: {help}");
    }
    assert!(help.contains("federation"), "{help}");
}
