#!/usr/bin/env bash
# Builds and caches Istio's own sidecar agent (pilot-agent) from the Go module proxy, for
# the interoperability test in tests/it/pilot_agent.rs. No Istio source is kept in this repo.
#
#   scripts/istio-agent.sh ensure    # build if missing, print the binary's path
#   scripts/istio-agent.sh version   # the pinned pseudo-version
#
# Pin: istio/istio commit eed52ebb66ad (2026-08-27, release-1.31 branch, VERSION 1.31; its
# go.mod requires istio.io/api at the commit tagged v1.31.0). Istio's tags carry no "v", so
# the proxy serves a release only as a commit pseudo-version. See docs/istio-agent.md.
#
# Cached under ${CITADEL_CACHE:-~/.cache/citadel}/pilot-agent-<pseudo-version>/pilot-agent.
# A cold build takes several minutes on two cores (CGO_ENABLED=0, nice -n 19).
set -euo pipefail

ISTIO_PSEUDO_VERSION="v0.0.0-20260827124520-eed52ebb66ad"
ISTIO_COMMIT="eed52ebb66ad"
ISTIO_RELEASE="1.31"

CACHE="${CITADEL_CACHE:-$HOME/.cache/citadel}"
DIR="$CACHE/pilot-agent-$ISTIO_PSEUDO_VERSION"
BIN="$DIR/pilot-agent"

log() { printf '==> %s\n' "$*" >&2; }

ensure() {
  if [ -x "$BIN" ] && "$BIN" version -s >/dev/null 2>&1; then
    echo "$BIN"
    return
  fi
  command -v go >/dev/null || { echo "go is required to build pilot-agent" >&2; exit 1; }
  log "building pilot-agent istio.io/istio@$ISTIO_PSEUDO_VERSION (several minutes, cached after)"
  mkdir -p "$DIR"
  local tmp="$DIR/.build"
  rm -rf "$tmp"
  mkdir -p "$tmp"
  local start=$SECONDS
  # The version package's variables are set at link time, as Istio's own build does, so
  # `pilot-agent version` names what we built.
  local v="istio.io/istio/pkg/version"
  CGO_ENABLED=0 GOBIN="$tmp" GOFLAGS=-buildvcs=false nice -n 19 \
    go install -trimpath \
      -ldflags "-s -w -X $v.buildVersion=$ISTIO_RELEASE-$ISTIO_PSEUDO_VERSION -X $v.buildGitRevision=$ISTIO_COMMIT -X $v.buildTag=$ISTIO_PSEUDO_VERSION -X $v.buildStatus=Clean" \
      "istio.io/istio/pilot/cmd/pilot-agent@$ISTIO_PSEUDO_VERSION"
  mv "$tmp/pilot-agent" "$BIN"
  rm -rf "$tmp"
  log "built pilot-agent in $((SECONDS - start))s"
  echo "$BIN"
}

case "${1:-ensure}" in
  ensure) ensure ;;
  version) echo "$ISTIO_PSEUDO_VERSION" ;;
  *) echo "usage: $0 ensure|version" >&2; exit 2 ;;
esac
