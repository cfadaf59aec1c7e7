#!/usr/bin/env bash
# Runs scenario.mjs against a throw-away Synapse (installed by scripts/install-synapse) on
# loopback, to check the scenario itself against the reference homeserver:
#
#   src/main/tests/interop/appservice/run-against-synapse.sh [bridge|backlog|backlog-restart]
#
# backlog-restart runs `backlog --pause` and restarts Synapse while the appservice is down.
# Set KEEP=1 to keep the temporary directory (homeserver.log, registration.yaml).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
mode="${1:-bridge}"
venv="$("$here/../../../../../scripts/install-synapse")"
dir="$(mktemp -d)"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
hs_port="$(free_port)"
as_port="$(free_port)"
synapse_pid=""
cleanup() {
  [ -n "$synapse_pid" ] && kill "$synapse_pid" 2>/dev/null && wait "$synapse_pid" 2>/dev/null || true
  if [ "${KEEP:-0}" = 1 ]; then echo "kept $dir" >&2; else rm -rf "$dir"; fi
}
trap cleanup EXIT

node "$here/scenario.mjs" make-registration "$dir/registration.yaml" "$as_port"
"$venv/bin/python" -m synapse.app.homeserver --server-name localhost \
  --config-path "$dir/homeserver.yaml" --data-directory "$dir" \
  --generate-config --report-stats=no >/dev/null
limit='{per_second: 1000000, burst_count: 1000000}'
cat >"$dir/log.yaml" <<EOF
version: 1
formatters:
  precise:
    format: '%(asctime)s %(name)s %(levelname)s %(message)s'
handlers:
  file:
    class: logging.FileHandler
    formatter: precise
    filename: $dir/homeserver.log
root:
  level: INFO
  handlers: [file]
disable_existing_loggers: false
EOF
cat >"$dir/test.yaml" <<EOF
listeners:
  - port: $hs_port
    bind_addresses: ['127.0.0.1']
    type: http
    tls: false
    resources: [{names: [client], compress: false}]
database: {name: sqlite3, args: {database: $dir/homeserver.db}}
log_config: $dir/log.yaml
media_store_path: $dir/media
enable_registration: true
enable_registration_without_verification: true
report_stats: false
trusted_key_servers: []
suppress_key_server_warning: true
app_service_config_files: ['$dir/registration.yaml']
rc_message: $limit
rc_registration: $limit
rc_login: {address: $limit, account: $limit, failed_attempts: $limit}
rc_joins: {local: $limit, remote: $limit}
rc_joins_per_room: $limit
rc_invites: {per_room: $limit, per_user: $limit, per_issuer: $limit}
EOF

start_synapse() {
  (cd "$dir" && exec "$venv/bin/python" -m synapse.app.homeserver \
     -c "$dir/homeserver.yaml" -c "$dir/test.yaml" >/dev/null 2>"$dir/stderr.log") &
  synapse_pid=$!
  for _ in $(seq 240); do
    if curl -fsS "http://127.0.0.1:$hs_port/_matrix/client/versions" >/dev/null 2>&1; then return 0; fi
    if ! kill -0 "$synapse_pid" 2>/dev/null; then tail -40 "$dir/homeserver.log" "$dir/stderr.log" >&2; exit 1; fi
    sleep 0.25
  done
  echo "Synapse did not start" >&2; tail -40 "$dir/homeserver.log" >&2; exit 1
}
start_synapse
echo "Synapse on http://127.0.0.1:$hs_port, appservice port $as_port" >&2

cd "$here"
case "$mode" in
  bridge|backlog)
    node scenario.mjs "http://127.0.0.1:$hs_port" "$dir/registration.yaml" "$as_port" "$mode" ;;
  backlog-restart)
    # Restart Synapse when the scenario pauses, then let it continue.
    coproc SCEN { node scenario.mjs "http://127.0.0.1:$hs_port" "$dir/registration.yaml" "$as_port" backlog --pause; }
    scen_pid=$SCEN_PID
    while IFS= read -r line <&"${SCEN[0]}"; do
      echo "$line"
      if [[ "$line" == PAUSED:* ]]; then
        kill "$synapse_pid"; wait "$synapse_pid" 2>/dev/null || true
        echo "(Synapse stopped; starting it again)" >&2
        start_synapse
        echo >&"${SCEN[1]}"
      fi
    done
    wait "$scen_pid" ;;
  *) echo "unknown mode $mode" >&2; exit 2 ;;
esac
