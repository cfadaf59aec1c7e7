#!/bin/sh
# Complement starts this image with SERVER_NAME set and its CA mounted at /complement/ca.
set -eu
SERVER_NAME="${SERVER_NAME:-hs1}"

# Mint a TLS certificate for the server name, signed by Complement's CA, for the
# federation listener on 8448.
if [ -f /complement/ca/ca.crt ] && [ -f /complement/ca/ca.key ]; then
  openssl req -new -newkey rsa:2048 -nodes -subj "/CN=${SERVER_NAME}" \
    -addext "subjectAltName=DNS:${SERVER_NAME}" \
    -keyout /conf/server.key -out /conf/server.csr 2>/dev/null
  openssl x509 -req -in /conf/server.csr -CA /complement/ca/ca.crt -CAkey /complement/ca/ca.key \
    -CAcreateserial -copy_extensions copy -days 2 -out /conf/server.crt 2>/dev/null
fi

export TRELLIS_SERVER__SERVER_NAME="${SERVER_NAME}"
export TRELLIS_SERVER__LISTEN="0.0.0.0:8008"
export TRELLIS_SERVER__DATA_DIR="/data"
export TRELLIS_METRICS__LISTEN="127.0.0.1:9108"
export TRELLIS_REGISTRATION__MODE="open"
# Tests register many users: cheap hashes, fsync off (still crash-safe for the process).
export TRELLIS_REGISTRATION__ARGON2_MEMORY_KIB=64
export TRELLIS_REGISTRATION__ARGON2_ITERATIONS=1
export TRELLIS_STORAGE__SYNC_WRITES=false
# Complement registers many users from one address in quick succession.
export TRELLIS_RATE_LIMITS__ENABLED=false
export TRELLIS_LOGGING__LEVEL="${TRELLIS_LOG:-info}"
exec trellis serve
