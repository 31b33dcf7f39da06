#!/usr/bin/env bash
# Signing throughput with the CA key in a PKCS#11 token (SoftHSM2) beside the software key,
# at the same load: docs/benchmarks.md, "CA keys in a PKCS#11 token".
#
#   scripts/bench-hsm.sh [TARGET_DIR]   # default target/release (cargo build --release first)
#
# Runs citadel-bench twice per load (closed loop at --concurrency 64, then open loop at a
# fixed rate): once against `citadel serve --dev` with a software key (citadel-bench starts
# that server itself), once against one with --ca-key-source pkcs11 on a fresh SoftHSM2 token
# in a temporary directory. Needs the Debian package softhsm2.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN_DIR="${1:-target/release}"
CITADEL="$BIN_DIR/citadel"
BENCH="$BIN_DIR/citadel-bench"
MODULE="${CITADEL_SOFTHSM2_MODULE:-/usr/lib/softhsm/libsofthsm2.so}"
REQUESTS="${REQUESTS:-20000}"
RATE="${RATE:-1000}"
DURATION="${DURATION:-20s}"
CONCURRENCY="${CONCURRENCY:-64}"
# The workloads' CSR key type; the CA key is P-256 on both sides (citadel-bench's own server
# runs with the --dev defaults).
KEY_TYPE="${KEY_TYPE:-ec-p256}"

for f in "$CITADEL" "$BENCH" "$MODULE"; do
  [ -e "$f" ] || { echo "missing $f" >&2; exit 1; }
done

tmp="$(mktemp -d)"
server_pid=""
cleanup() {
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT

echo "== machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "== software key (P-256): closed loop, --concurrency $CONCURRENCY"
CITADEL_BIN="$CITADEL" "$BENCH" --concurrency "$CONCURRENCY" --requests "$REQUESTS" --key-type "$KEY_TYPE"
echo "== software key: open loop, --rate $RATE for $DURATION"
CITADEL_BIN="$CITADEL" "$BENCH" --rate "$RATE" --duration "$DURATION" --key-type "$KEY_TYPE"

# A SoftHSM2 token of its own.
mkdir -p "$tmp/tokens"
printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' "$tmp/tokens" > "$tmp/softhsm2.conf"
export SOFTHSM2_CONF="$tmp/softhsm2.conf"
pin="$(head -c 8 /dev/urandom | od -An -tu8 | tr -d ' ' | cut -c1-8)"
softhsm2-util --init-token --free --label citadel-bench --pin "$pin" --so-pin "so$pin" >/dev/null
install -m 0600 /dev/null "$tmp/pin" && printf '%s\n' "$pin" > "$tmp/pin"

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$CITADEL" serve --dev --state-dir "$tmp/state" --listen "127.0.0.1:$port" --metrics-listen "127.0.0.1:$mport" \
  --ca-key-type ec-p256 --ca-key-source pkcs11 --pkcs11-module "$MODULE" \
  --pkcs11-token-label citadel-bench --pkcs11-pin-file "$tmp/pin" 2> "$tmp/serve.log" &
server_pid=$!
for _ in $(seq 1 200); do
  curl -fsS "http://127.0.0.1:$mport/healthz/ready" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -fsS "http://127.0.0.1:$mport/healthz/ready" >/dev/null || { cat "$tmp/serve.log" >&2; exit 1; }

echo "== PKCS#11 key (P-256) in SoftHSM2: closed loop, --concurrency $CONCURRENCY"
"$BENCH" --ca-addr "127.0.0.1:$port" --ca-root-cert "$tmp/state/root-cert.pem" --server-pid "$server_pid" \
  --concurrency "$CONCURRENCY" --requests "$REQUESTS" --key-type "$KEY_TYPE"
echo "== PKCS#11 key in SoftHSM2: open loop, --rate $RATE for $DURATION"
"$BENCH" --ca-addr "127.0.0.1:$port" --ca-root-cert "$tmp/state/root-cert.pem" --server-pid "$server_pid" \
  --rate "$RATE" --duration "$DURATION" --key-type "$KEY_TYPE"
echo "== token counters"
curl -fsS "http://127.0.0.1:$mport/metrics" | grep '^citadel_ca_key_'
