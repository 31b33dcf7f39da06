#!/usr/bin/env bash
# Builds and caches SPIRE server from the Go module proxy, the peer that scripts/bench-peers.sh
# measures citadel against (issue #26), and peers-load, the one load generator that drives
# citadel, istiod and SPIRE (bench/peers/load). No SPIRE source is kept here: the wrapper
# module bench/peers/spire names SPIRE as a `tool` (the proxy refuses `go install
# github.com/spiffe/spire/cmd/spire-server@v1.13.3` directly: its deprecation lookup gets 403).
#
#   scripts/spire.sh ensure    # build if missing, print the spire-server binary's path
#   scripts/spire.sh load      # build if missing, print the peers-load binary's path
#   scripts/spire.sh version   # the pinned version
#
# Cached under ${CITADEL_CACHE:-~/.cache/citadel}/spire-<version>/spire-server. SPIRE's default
# datastore is SQLite through go-sqlite3, which needs cgo (gcc): CGO_ENABLED=1. A cold build
# takes 10-20 minutes on two busy cores (nice -n 19).
set -euo pipefail

SPIRE_VERSION="v1.13.3"

CACHE="${CITADEL_CACHE:-$HOME/.cache/citadel}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DIR="$CACHE/spire-$SPIRE_VERSION"
BIN="$DIR/spire-server"

log() { printf '==> %s\n' "$*" >&2; }

ensure() {
  if [ -x "$BIN" ] && "$BIN" --version >/dev/null 2>&1; then
    echo "$BIN"
    return
  fi
  command -v go >/dev/null || { echo "go is required to build spire-server" >&2; exit 1; }
  command -v gcc >/dev/null || { echo "gcc is required to build spire-server (cgo SQLite)" >&2; exit 1; }
  log "building github.com/spiffe/spire/cmd/spire-server@$SPIRE_VERSION (cached after)"
  mkdir -p "$DIR"
  local tmp="$DIR/.build"
  rm -rf "$tmp"
  mkdir -p "$tmp"
  local start=$SECONDS
  grep -q "github.com/spiffe/spire $SPIRE_VERSION" "$ROOT/bench/peers/spire/go.mod" \
    || { echo "bench/peers/spire/go.mod must pin SPIRE $SPIRE_VERSION" >&2; exit 1; }
  (cd "$ROOT/bench/peers/spire" && CGO_ENABLED=1 GOFLAGS=-buildvcs=false nice -n 19 \
    go build -mod=readonly -trimpath -ldflags "-s -w" -o "$tmp/spire-server" \
      github.com/spiffe/spire/cmd/spire-server) >&2
  mv "$tmp/spire-server" "$BIN"
  rm -rf "$tmp"
  log "built spire-server in $((SECONDS - start))s"
  echo "$BIN"
}

# peers-load, cached by a hash of its sources.
load() {
  local src="$ROOT/bench/peers/load" hash
  hash="$(cat "$src/go.mod" "$src/go.sum" "$src"/*.go | sha256sum | cut -c1-12)"
  local bin="$CACHE/peers-load-$hash"
  if [ ! -x "$bin" ]; then
    log "building $bin"
    (cd "$src" && CGO_ENABLED=0 nice -n 19 go build -mod=readonly -trimpath -o "$bin.tmp" .) >&2
    mv "$bin.tmp" "$bin"
  fi
  echo "$bin"
}

case "${1:-ensure}" in
  ensure) ensure ;;
  load) load ;;
  version) echo "$SPIRE_VERSION" ;;
  *) echo "usage: $0 ensure|load|version" >&2; exit 2 ;;
esac
