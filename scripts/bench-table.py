#!/usr/bin/env python3
"""Prints the markdown table of scripts/bench-compare from the JSON lines it left.

usage: bench-table.py DIR [SYNAPSE_VERSION]

DIR holds {trellis,synapse}.{scenario}.json, one `trellis bench` line each. The last
column says how many times better Trellis does (above 1: Trellis is better; "lower"
figures such as latencies compare as Synapse / Trellis, "higher" ones as Trellis /
Synapse).
"""

import json
import os
import sys

# (scenario file, figure, path in its JSON line, unit, which way is better)
ROWS = [
    ("start", "server RSS after start", "server.rss_mb", "MB", "lower"),
    ("register", "registrations", "users_per_second", "/s", "higher"),
    ("register", "registration p50", "register_latency.p50_ms", "ms", "lower"),
    ("login-storm", "logins (concurrent)", "logins_per_second", "/s", "higher"),
    ("login-storm", "whoami p99 during logins", "whoami_during_storm.p99_ms", "ms", "lower"),
    ("send-1-room", "send, 1 room", "messages_per_second", "msg/s", "higher"),
    ("send-1-room", "send latency p50", "send_latency.p50_ms", "ms", "lower"),
    ("send-1-room", "send latency p99", "send_latency.p99_ms", "ms", "lower"),
    ("send-1-room", "server CPU per message", "server_cpu_ms_per_message", "ms", "lower"),
    ("send-10-rooms", "send, 10 rooms", "messages_per_second", "msg/s", "higher"),
    ("send-10-rooms", "send latency p99", "send_latency.p99_ms", "ms", "lower"),
    ("messages", "/messages page p50", "page_latency.p50_ms", "ms", "lower"),
    ("messages", "/messages page p95", "page_latency.p95_ms", "ms", "lower"),
    ("join", "join p50", "join_latency.p50_ms", "ms", "lower"),
    ("join", "join p95", "join_latency.p95_ms", "ms", "lower"),
    ("initial-sync", "initial sync p50", "initial_sync.p50_ms", "ms", "lower"),
    ("initial-sync", "initial sync p95", "initial_sync.p95_ms", "ms", "lower"),
    ("incremental-sync", "incremental sync, nothing new, p50",
     "incremental_sync_nothing_new.p50_ms", "ms", "lower"),
    ("incremental-sync", "incremental sync, one message, p50",
     "incremental_sync_one_message.p50_ms", "ms", "lower"),
    ("delivery", "delivery p50", "delivery.p50_ms", "ms", "lower"),
    ("delivery", "delivery p99", "delivery.p99_ms", "ms", "lower"),
    ("delivery", "deliveries missed", "missed_deliveries", "", "lower"),
    ("delivery", "server CPU, sending phase", "server_cpu_seconds_sending_phase", "s", "lower"),
    ("idle", "RSS with the long-polls held", "server_rss_mb_held", "MB", "lower"),
    ("idle", "whoami p50 under held polls", "whoami_under_load.p50_ms", "ms", "lower"),
    ("idle", "whoami p99 under held polls", "whoami_under_load.p99_ms", "ms", "lower"),
    ("idle", "long-polls lost", "connections_lost", "", "lower"),
    ("media", "upload (median)", "upload.median_mb_s", "MB/s", "higher"),
    ("media", "download (median)", "download.median_mb_s", "MB/s", "higher"),
    ("media", "stored thumbnail p50", "thumbnail.stored_size.p50_ms", "ms", "lower"),
    ("media", "RSS peak, concurrent uploads", "concurrent_uploads.rss_peak_mb", "MB", "lower"),
    ("end", "server RSS at the end", "server.rss_mb", "MB", "lower"),
]

# Parameters shown once per scenario.
SIZES = ["register", "login-storm", "send-1-room", "send-10-rooms", "messages", "join",
         "initial-sync", "incremental-sync", "delivery", "idle", "media"]


def load(directory, server, scenario):
    try:
        with open(os.path.join(directory, f"{server}.{scenario}.json")) as f:
            return json.loads(f.read().strip() or "null")
    except (OSError, ValueError):
        return None


def pick(line, path):
    value = line
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value if isinstance(value, (int, float)) else None


def show(value, unit):
    if value is None:
        return "—"
    text = f"{value:.2f}".rstrip("0").rstrip(".") if isinstance(value, float) else str(value)
    return f"{text} {unit}".strip()


def ratio(trellis, synapse, better):
    if trellis is None or synapse is None:
        return "—"
    if trellis == synapse:
        return "1x"
    if better == "lower":
        num, den = synapse, trellis
    else:
        num, den = trellis, synapse
    if den == 0:
        return "—"
    r = num / den
    return f"{r:.0f}x" if r >= 10 else f"{r:.1f}x"


def main():
    directory = sys.argv[1]
    version = sys.argv[2] if len(sys.argv) > 2 else "?"
    print(f"| scenario | figure | Trellis | Synapse {version} | Trellis better by |")
    print("|---|---|---|---|---|")
    for scenario, figure, path, unit, better in ROWS:
        t, s = load(directory, "trellis", scenario), load(directory, "synapse", scenario)
        tv = pick(t, path) if t else None
        sv = pick(s, path) if s else None
        print(f"| {scenario} | {figure} | {show(tv, unit)} | {show(sv, unit)} | "
              f"{ratio(tv, sv, better)} |")
    print()
    print("Failures, errors and rate-limit answers (should all be none):")
    quiet = True
    for server in ("trellis", "synapse"):
        for scenario in SIZES:
            line = load(directory, server, scenario)
            if line is None:
                continue
            problems = {k: line[k] for k in ("failed", "errors", "fill_errors", "rate_limited")
                        if line.get(k)}
            if problems:
                quiet = False
                print(f"- {server} {scenario}: {problems}")
    if quiet:
        print("- none")


if __name__ == "__main__":
    main()
