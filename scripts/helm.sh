#!/usr/bin/env bash
# Builds and caches Helm (v4) from the Go module proxy, to render and test the chart in
# deploy/helm/citadel (tests/it/kit.rs, scripts/render-deploy.sh). No Helm source is kept here.
#
#   scripts/helm.sh ensure    # build if missing, print the binary's path
#   scripts/helm.sh version   # the pinned version
#
# Cached under ${CITADEL_CACHE:-~/.cache/citadel}/helm-<version>/helm. A cold build takes a
# few minutes on two cores (CGO_ENABLED=0, nice -n 19).
set -euo pipefail

HELM_VERSION="v4.3.2"

CACHE="${CITADEL_CACHE:-$HOME/.cache/citadel}"
DIR="$CACHE/helm-$HELM_VERSION"
BIN="$DIR/helm"

log() { printf '==> %s\n' "$*" >&2; }

ensure() {
  if [ -x "$BIN" ] && "$BIN" version --short >/dev/null 2>&1; then
    echo "$BIN"
    return
  fi
  command -v go >/dev/null || { echo "go is required to build helm" >&2; exit 1; }
  log "building helm helm.sh/helm/v4@$HELM_VERSION (a few minutes, cached after)"
  mkdir -p "$DIR"
  local tmp="$DIR/.build"
  rm -rf "$tmp"
  mkdir -p "$tmp"
  local start=$SECONDS
  # Helm's version package is set at link time, as its own Makefile does, so `helm version`
  # names what we built (and charts' kubeVersion checks see a real version).
  CGO_ENABLED=0 GOBIN="$tmp" GOFLAGS=-buildvcs=false nice -n 19 \
    go install -trimpath \
      -ldflags "-s -w -X helm.sh/helm/v4/internal/version.version=$HELM_VERSION" \
      "helm.sh/helm/v4/cmd/helm@$HELM_VERSION"
  mv "$tmp/helm" "$BIN"
  rm -rf "$tmp"
  log "built helm in $((SECONDS - start))s"
  echo "$BIN"
}

case "${1:-ensure}" in
  ensure) ensure ;;
  version) echo "$HELM_VERSION" ;;
  *) echo "usage: $0 ensure|version" >&2; exit 2 ;;
esac
