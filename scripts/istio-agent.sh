#!/usr/bin/env bash
# Builds and caches Istio's own sidecar agent (pilot-agent) from the Go module proxy, for
# the interoperability test in tests/it/pilot_agent.rs, and istiod (pilot-discovery) from the
# SAME module version, for the RA-mode test in tests/it/istiod_ra.rs. No Istio source is kept
# in this repo.
#
#   scripts/istio-agent.sh ensure     # build pilot-agent if missing, print the binary's path
#   scripts/istio-agent.sh discovery  # build pilot-discovery if missing, print its path
#   scripts/istio-agent.sh version    # the pinned pseudo-version
#
# Pin: istio/istio commit eed52ebb66ad (2026-08-27, release-1.31 branch, VERSION 1.31; its
# go.mod requires istio.io/api at the commit tagged v1.31.0). Istio's tags carry no "v", so
# the proxy serves a release only as a commit pseudo-version. See docs/istio-agent.md.
#
# Cached under ${CITADEL_CACHE:-~/.cache/citadel}/pilot-agent-<pseudo-version>/pilot-agent and
# .../pilot-discovery-<pseudo-version>/pilot-discovery. A cold build takes several minutes on
# two cores (CGO_ENABLED=0, nice -n 19); pilot-discovery is the larger of the two.
set -euo pipefail

ISTIO_PSEUDO_VERSION="v0.0.0-20260827124520-eed52ebb66ad"
ISTIO_COMMIT="eed52ebb66ad"
ISTIO_RELEASE="1.31"

CACHE="${CITADEL_CACHE:-$HOME/.cache/citadel}"

log() { printf '==> %s\n' "$*" >&2; }

# build NAME: builds istio.io/istio/pilot/cmd/NAME at the pinned version into
# $CACHE/NAME-<pseudo-version>/NAME unless a working binary is already there; prints its path.
build() {
  local name="$1"
  local dir="$CACHE/$name-$ISTIO_PSEUDO_VERSION"
  local bin="$dir/$name"
  if [ -x "$bin" ] && "$bin" version -s >/dev/null 2>&1; then
    echo "$bin"
    return
  fi
  command -v go >/dev/null || { echo "go is required to build $name" >&2; exit 1; }
  log "building $name istio.io/istio@$ISTIO_PSEUDO_VERSION (several minutes, cached after)"
  mkdir -p "$dir"
  local tmp="$dir/.build"
  rm -rf "$tmp"
  mkdir -p "$tmp"
  local start=$SECONDS
  # The version package's variables are set at link time, as Istio's own build does, so
  # `NAME version` names what we built.
  local v="istio.io/istio/pkg/version"
  CGO_ENABLED=0 GOBIN="$tmp" GOFLAGS=-buildvcs=false nice -n 19 \
    go install -trimpath \
      -ldflags "-s -w -X $v.buildVersion=$ISTIO_RELEASE-$ISTIO_PSEUDO_VERSION -X $v.buildGitRevision=$ISTIO_COMMIT -X $v.buildTag=$ISTIO_PSEUDO_VERSION -X $v.buildStatus=Clean" \
      "istio.io/istio/pilot/cmd/$name@$ISTIO_PSEUDO_VERSION"
  mv "$tmp/$name" "$bin"
  rm -rf "$tmp"
  log "built $name in $((SECONDS - start))s"
  echo "$bin"
}

case "${1:-ensure}" in
  ensure) build pilot-agent ;;
  discovery) build pilot-discovery ;;
  version) echo "$ISTIO_PSEUDO_VERSION" ;;
  *) echo "usage: $0 ensure|discovery|version" >&2; exit 2 ;;
esac
