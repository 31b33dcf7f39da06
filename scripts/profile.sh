#!/usr/bin/env bash
# Instruction counts of the CA server's over-the-wire issue path, robust to machine noise:
# `citadel serve --dev` runs under valgrind's callgrind, `citadel-bench` (not profiled) sends
# distinct P-256 CSRs and RS256 tokens over TLS gRPC at --concurrency streams, and only the
# measured requests are counted (the counters are zeroed after start-up and warm-up).
#
#   scripts/profile.sh [OUT_DIR] [REQUESTS]      # defaults: target/profile, 2000
#
# Prints instructions per certificate and the top functions (inclusive and self); keeps the
# raw callgrind.out in OUT_DIR for callgrind_annotate / kcachegrind. Needs a release build
# (cargo build --release: both target/release/citadel and target/release/citadel-bench; or
# CITADEL_BIN and CITADEL_BENCH) and valgrind (apt-get install valgrind). Takes ~2-4 minutes.
set -euo pipefail
OUT="${1:-target/profile}"
N="${2:-2000}"
BIN="${CITADEL_BIN:-target/release/citadel}"
BENCH="${CITADEL_BENCH:-$(dirname "$BIN")/citadel-bench}"
command -v valgrind >/dev/null || { echo "valgrind is not installed (apt-get install valgrind)" >&2; exit 1; }
for b in "$BIN" "$BENCH"; do
  [ -x "$b" ] || { echo "$b is missing: cargo build --release" >&2; exit 1; }
done
rm -rf "$OUT" && mkdir -p "$OUT"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PORT=$(free_port); MPORT=$(free_port)
valgrind --tool=callgrind --callgrind-out-file="$OUT/callgrind.out" \
  "$BIN" serve --dev --state-dir "$OUT/state" --listen "127.0.0.1:$PORT" \
  --metrics-listen "127.0.0.1:$MPORT" 2>"$OUT/server.log" &
VG=$!
trap 'kill $VG 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do
  [ -f "$OUT/state/root-cert.pem" ] && (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
  sleep 0.2
done
bench() {
  "$BENCH" --ca-addr "127.0.0.1:$PORT" --ca-root-cert "$OUT/state/root-cert.pem" \
    --concurrency 64 --connections 4 --distinct 4000 "$@"
}
# Warm-up: connections, the allocator's arenas, the index file.
bench --requests 500 --warmup 0 >"$OUT/warmup.txt"
callgrind_control -z "$VG" >/dev/null
bench --requests "$N" --warmup 0 | tee "$OUT/bench.txt"
callgrind_control -d "$VG" >/dev/null
kill "$VG"; wait "$VG" 2>/dev/null || true
trap - EXIT
DUMP=$(ls -t "$OUT"/callgrind.out.* 2>/dev/null | head -1)
[ -n "$DUMP" ] || { echo "no callgrind dump was written" >&2; exit 1; }
# The measured run sent N requests plus the one it verifies end to end.
IR=$(callgrind_annotate "$DUMP" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",","",$1); print $1; exit}')
echo "instructions: $IR over $((N + 1)) certificates = $((IR / (N + 1))) per certificate" | tee "$OUT/summary.txt"
# Self counts per function (rows at 100% are thread-entry frames that were on the stack when
# the counters were zeroed), then summed per component.
callgrind_annotate --threshold=100 "$DUMP" 2>/dev/null >"$OUT/annotate.txt"
# (callgrind_annotate puts a dashed rule under the header line: skip it, stop at the next.)
awk '/file:function/ {t=1; getline; next} t && /^-----/ {exit} t' "$OUT/annotate.txt" \
  | { grep -vE '\((99\.[0-9]+|100\.0)%\)' || true; } | sed -n '1,40p' >"$OUT/top-self.txt"
scripts/callgrind-categories.py $((N + 1)) <"$OUT/annotate.txt" | tee "$OUT/components.txt"
echo "top functions by own instructions ($OUT/top-self.txt):"
head -25 "$OUT/top-self.txt" | cut -c1-200
