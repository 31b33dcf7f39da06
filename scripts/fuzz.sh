#!/usr/bin/env bash
# Runs every coverage-guided fuzz target in fuzz/ (cargo-fuzz + libFuzzer) for SECONDS each.
#
#   scripts/fuzz.sh              # 10 s per target (what scripts/test.sh runs in CI)
#   scripts/fuzz.sh 600          # the 10-minute campaign per target
#   scripts/fuzz.sh 60 csr jwt   # only these targets
#
# Seeds are the committed fuzz/corpus/<target>/ (read only); what libFuzzer finds goes to
# fuzz/target/work/<target>/ and is kept between runs. A crash, a panic, a timeout or an
# out-of-memory stops the run with the input saved under fuzz/artifacts/<target>/ and a
# non-zero exit: add that input as a regression test in the ordinary suite, then fix.
#
# Installs (cached under ~/.cache/citadel, keyed by version): cargo-fuzz from crates.io.
# Uses the nightly toolchain when one is installed; otherwise the stable one with
# RUSTC_BOOTSTRAP=1 (cargo-fuzz needs no nightly-only flag without a sanitizer).
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_EACH="${1:-10}"
shift || true
CACHE="${CITADEL_CACHE:-$HOME/.cache/citadel}"
CARGO_FUZZ_VERSION="0.13.2"
TARGETS=(csr jwt jwks spiffe pem_bundle cacerts journal_file journal_secret tokenreview istio_request sds_request spiffe_bundle)
[ "$#" -gt 0 ] && TARGETS=("$@")

log() { printf '==> %s\n' "$*" >&2; }

case "$SECONDS_EACH" in '' | *[!0-9]*) echo "SECONDS must be a whole number, not $SECONDS_EACH" >&2; exit 2 ;; esac

fuzz_bin="$CACHE/cargo-fuzz-$CARGO_FUZZ_VERSION/bin/cargo-fuzz"
if [ ! -x "$fuzz_bin" ]; then
  log "installing cargo-fuzz $CARGO_FUZZ_VERSION into $CACHE/cargo-fuzz-$CARGO_FUZZ_VERSION"
  nice -n 10 cargo install -q --locked cargo-fuzz --version "$CARGO_FUZZ_VERSION" \
    --root "$CACHE/cargo-fuzz-$CARGO_FUZZ_VERSION.tmp"
  rm -rf "$CACHE/cargo-fuzz-$CARGO_FUZZ_VERSION"
  mv "$CACHE/cargo-fuzz-$CARGO_FUZZ_VERSION.tmp" "$CACHE/cargo-fuzz-$CARGO_FUZZ_VERSION"
fi

toolchain=()
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  toolchain=(+nightly)
else
  log "no nightly toolchain: using stable with RUSTC_BOOTSTRAP=1"
  export RUSTC_BOOTSTRAP=1
fi

# -s none: the code under test forbids unsafe; what we hunt is panics, overflows (debug
# assertions are on), runaway allocation and hangs, and no sanitizer runtime doubles the
# executions per second.
fuzz() { (cd fuzz && PATH="$(dirname "$fuzz_bin"):$PATH" cargo "${toolchain[@]}" fuzz "$@"); }

log "building fuzz targets"
fuzz build -s none >&2

status=0
summary=()
for t in "${TARGETS[@]}"; do
  mkdir -p "fuzz/target/work/$t" "fuzz/artifacts/$t"
  log "fuzzing $t for ${SECONDS_EACH}s"
  out="fuzz/target/work/$t.log"
  if fuzz run -s none "$t" "target/work/$t" "corpus/$t" -- \
    -max_total_time="$SECONDS_EACH" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
    -print_final_stats=1 >"$out" 2>&1; then
    result=ok
  else
    result=FAILED
    status=1
    grep -E 'panicked|ERROR|SUMMARY|Test unit written' "$out" | head -n 20 >&2 || tail -n 30 "$out" >&2
  fi
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$out" | tail -n 1)
  speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$out" | tail -n 1)
  cov=$(grep -Eo 'cov: [0-9]+ ft: [0-9]+' "$out" | tail -n 1)
  summary+=("$(printf '%-15s %-7s %10s runs %8s exec/s  %s' "$t" "$result" "${execs:-?}" "${speed:-?}" "${cov:-}")")
done

printf '%s\n' "fuzz summary (${SECONDS_EACH}s per target):" "${summary[@]}"
exit "$status"
