#!/usr/bin/env bash
# Every timing measurement of docs/benchmarks.md, in sequence, from a release build, with the
# raw output of each kept in one directory and the latency-vs-load plot regenerated.
# Run it on a QUIET machine: wall-clock latency taken beside builds and tests is noise.
#
#   scripts/bench.sh [-o DIR] [SECTION ...]
#
# Sections (default: the first seven, about 11-13 minutes on 2 cores):
#   micro       citadel-bench --micro (in-process issue path, per stage)             ~20 s
#   closed      64 streams, 30,000 requests, three runs                              ~30 s
#   sweep       open loop at 1,000 .. 8,000 certificates/s, 20 s each, into
#               sweep.csv; then docs/latency-vs-load.png                              ~4 min
#   storm       --identities 20000, local JWKS (dev RS256 tokens)                    ~40 s
#   revocation  --revocation-scale: 100,000 revoked, 10,000 denied                   ~30 s
#   index       --index-entries 10000000 (needs ~1.5 GB free in DIR)                 ~2-3 min
#   profile     scripts/profile.sh: callgrind instruction counts, 2,000 requests     ~3 min
# Sections that start a real kube-apiserver + etcd (scripts/kube-test-env.sh):
#   storm-kube  --identities 20000 --auth tokenreview (20,000 service accounts and
#               TokenRequests are made first)                                        ~3-5 min
#   fanout      the ignored integration test scale::bundle_fan_out (1,000 namespaces;
#               builds the debug test binary if it is stale)                         ~3-5 min
#   all         every section above
#
# Examples:
#   scripts/bench.sh                         # the default sections into bench-results/<date>/
#   scripts/bench.sh -o /tmp/b sweep         # only the latency sweep and its plot
#   scripts/bench.sh storm-kube fanout       # the API-server scale runs
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="bench-results/$(date -u +%Y%m%dT%H%M%SZ)"
if [ "${1:-}" = "-o" ]; then OUT="$2"; shift 2; fi
case "${1:-}" in -h|--help|help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0;; esac
DEFAULT=(micro closed sweep storm revocation index profile)
SECTIONS=("$@")
[ ${#SECTIONS[@]} -eq 0 ] && SECTIONS=("${DEFAULT[@]}")
[ "${SECTIONS[0]}" = "all" ] && SECTIONS=("${DEFAULT[@]}" storm-kube fanout)
MPL_VERSION=3.11.2
VENV="${CITADEL_CACHE:-$HOME/.cache/citadel}/venv-matplotlib-$MPL_VERSION"
# The load tools are their own binary (bench/ in the workspace); it starts target/release/citadel
# beside it as the server.
BENCH=target/release/citadel-bench

mkdir -p "$OUT"
log() { printf '==> %s\n' "$*" | tee -a "$OUT/bench.log" >&2; }
log "scripts/bench.sh into $OUT: ${SECTIONS[*]}"
{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "nproc: $(nproc)"
  lscpu | grep -E '^(Model name|Thread|Core|Socket)' || true
  grep MemTotal /proc/meminfo
  uname -sr
  rustc --version
  echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
} >"$OUT/machine.txt"
cat "$OUT/machine.txt" >&2
nice -n 10 cargo build --release --bin citadel --bin citadel-bench 2>&1 | tail -2 >&2

run() { # NAME CMD...: runs, tees into NAME.txt, times it
  local name=$1; shift
  log "$name: $*"
  local t0=$SECONDS
  "$@" 2>&1 | tee "$OUT/$name.txt"
  log "$name took $((SECONDS - t0)) s"
}

for s in "${SECTIONS[@]}"; do
  case "$s" in
    micro) run micro "$BENCH" --micro --requests 20000 ;;
    closed)
      for i in 1 2 3; do
        run "closed-64-$i" "$BENCH" --concurrency 64 --requests 30000 --distinct 4000 --csv "$OUT/closed.csv"
      done ;;
    sweep)
      for r in 1000 2000 3000 4000 5000 6000 7000 8000; do
        run "open-$r" "$BENCH" --rate "$r" --duration 20s --distinct 4000 --csv "$OUT/sweep.csv" || true
      done
      if [ ! -x "$VENV/bin/python" ]; then
        log "making $VENV (matplotlib==$MPL_VERSION)"
        python3 -m venv "$VENV" && "$VENV/bin/pip" install -q "matplotlib==$MPL_VERSION"
      fi
      "$VENV/bin/python" scripts/plot-latency.py "$OUT/sweep.csv" docs/latency-vs-load.png "$(nproc) vCPU, $(date -u +%F), load average $(cut -d" " -f1 /proc/loadavg) when plotted"
      cp docs/latency-vs-load.png "$OUT/" ;;
    storm) run storm-jwks "$BENCH" --identities 20000 --concurrency 256 ;;
    revocation) run revocation "$BENCH" --revocation-scale --revoked 100000 --denied 10000 ;;
    index)
      run index "$BENCH" --index-entries 10000000 --state-dir "$OUT/index-state"
      rm -rf "$OUT/index-state" ;;
    profile) run profile scripts/profile.sh "$OUT/profile" 2000 ;;
    storm-kube)
      KDIR="$OUT/kube"
      scripts/kube-test-env.sh start "$KDIR" >/dev/null
      trap 'scripts/kube-test-env.sh stop "$KDIR" >/dev/null 2>&1 || true' EXIT
      run storm-tokenreview "$BENCH" --identities 20000 --concurrency 256 \
        --auth tokenreview --kubeconfig "$KDIR/kubeconfig" --kube-qps 5000 --kube-burst 5000 || true
      scripts/kube-test-env.sh stop "$KDIR" >/dev/null 2>&1 || true
      trap - EXIT ;;
    fanout)
      log "fanout: scripts/test.sh -- --test it -- scale::bundle_fan_out -- --ignored --nocapture"
      CI=true scripts/test.sh -- --test it -- scale::bundle_fan_out --ignored --nocapture 2>&1 \
        | tee "$OUT/fanout.txt" | grep -E 'BENCH|created|first publication|test result' || true ;;
    *) echo "unknown section $s (see scripts/bench.sh --help)" >&2; exit 2 ;;
  esac
done
log "done: $OUT"
