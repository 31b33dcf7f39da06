#!/usr/bin/env bash
# A real kube-apiserver + etcd on loopback for citadel's integration tests.
#
#   scripts/kube-test-env.sh ensure       # build/cache kube-apiserver and etcd; print the apiserver path
#   scripts/kube-test-env.sh start DIR    # fresh etcd + kube-apiserver in DIR; print DIR/env
#   scripts/kube-test-env.sh stop DIR     # stop them (idempotent)
#   scripts/kube-test-env.sh status DIR   # show pids, ports and /readyz
#
# kube-apiserver v1.37.2 and etcd v3.7.3 are built with the machine's Go from
# the Go module proxy, through wrapper modules generated in a temp dir, and
# cached under ${CITADEL_CACHE:-~/.cache/citadel}/{kube-apiserver-v1.37.2,etcd-v3.7.3}/.
# See docs/kube-test-env.md.
set -euo pipefail

KUBE_VERSION="v1.37.2"
KUBE_MODULE="k8s.io/kubernetes"
# The staging modules (k8s.io/api, client-go, ...) are published as v0.<minor>.<patch>.
STAGING_VERSION="v0.${KUBE_VERSION#v1.}"
ETCD_VERSION="v3.7.3"
ETCD_MODULE="go.etcd.io/etcd/server/v3"
RUN_PKGS=(openssl curl procps)
BUILD_PKGS=(jq)
SA_ISSUER="https://kubernetes.default.svc.cluster.local"
API_AUDIENCES="${SA_ISSUER},istio-ca"
SERVICE_CIDR="10.0.0.0/24"
NODE_NAME="${CITADEL_KUBE_NODE_NAME:-node-a}"
READY_TIMEOUT="${CITADEL_KUBE_READY_TIMEOUT:-60}"

CACHE="${CITADEL_CACHE:-$HOME/.cache/citadel}"
CACHE_DIR="$CACHE/kube-apiserver-$KUBE_VERSION"
CACHED_BIN="$CACHE_DIR/kube-apiserver"
ETCD_CACHE_DIR="$CACHE/etcd-$ETCD_VERSION"
CACHED_ETCD="$ETCD_CACHE_DIR/etcd"

log() { printf '==> %s\n' "$*" >&2; }
die() { printf '==> ERROR: %s\n' "$*" >&2; exit 1; }

usage() {
  cat <<EOF
Usage: $(basename "$0") COMMAND [DIR]

A real kube-apiserver ($KUBE_VERSION) and etcd ($ETCD_VERSION) on 127.0.0.1,
for integration tests. Both are built from the Go module proxy with the
machine's Go and cached.

Commands:
  ensure       Install missing Debian packages (openssl, curl; jq to build);
               build kube-apiserver and etcd if they are not cached yet.
               Prints the kube-apiserver path.
  start DIR    ensure, then start a fresh etcd + kube-apiserver with state in
               DIR (wiped of earlier state). Waits for /readyz, writes
               DIR/kubeconfig, DIR/node-kubeconfig and DIR/env, prints the
               path of DIR/env. If DIR already runs a ready instance, just
               prints DIR/env.
  stop DIR     Stop the processes recorded in DIR/*.pid (TERM, then KILL).
               Idempotent.
  stop-apiserver DIR   Kill only kube-apiserver (etcd and its data stay).
  start-apiserver DIR  Start it again on the same port, and wait for /readyz.
  status DIR   Print process and readiness state; exit 0 only if ready.
  help         This text.

Environment:
  CITADEL_CACHE                cache root (default ~/.cache/citadel)
  CITADEL_KUBE_APISERVER       use this kube-apiserver binary instead of building
  CITADEL_ETCD                 use this etcd binary instead of building
  CITADEL_KUBE_NODE_NAME       node name of the kubelet client cert (default node-a)
  CITADEL_KUBE_READY_TIMEOUT   seconds to wait for /readyz (default 60)
  GOPROXY, GOMODCACHE, GOTOOLCHAIN  as for any go command (GOTOOLCHAIN
                               defaults to local: no toolchain download)

Cached binaries: $CACHED_BIN
                 $CACHED_ETCD
EOF
}

# ---------------------------------------------------------------- packages

pkg_installed() {
  dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

apt_updated=""
ensure_pkgs() {
  local missing=() p
  for p in "$@"; do pkg_installed "$p" || missing+=("$p"); done
  [ "${#missing[@]}" -eq 0 ] && return 0
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  if [ -z "$apt_updated" ]; then
    log "apt-get update"
    $sudo apt-get update -qq >&2 || die "apt-get update failed"
    apt_updated=1
  fi
  log "installing Debian packages: ${missing[*]}"
  local out
  out=$(mktemp)
  if ! DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >"$out" 2>&1; then
    tail -n 30 "$out" >&2
    rm -f "$out"
    die "apt-get install ${missing[*]} failed"
  fi
  rm -f "$out"
}

# ---------------------------------------------------------------- build

apiserver_ok() { [ -x "$1" ] && [ "$("$1" --version 2>/dev/null)" = "Kubernetes $KUBE_VERSION" ]; }
etcd_ok() {
  local v
  [ -x "$1" ] && v=$("$1" --version 2>/dev/null) && [ "${v%%$'\n'*}" = "etcd Version: ${ETCD_VERSION#v}" ]
}

# The go command for the builds: the machine's GOPROXY/GOMODCACHE, no cgo, no
# workspace, none of the caller's GOFLAGS (no VCS stamping: the temp dir may sit
# inside a git checkout), no toolchain download unless GOTOOLCHAIN says so, and
# a private build cache ($tmp/gocache) so ~/.cache/go-build is not filled with
# ~2 GB. Go's work dirs go to $tmp/gotmp, so an interrupted build leaves
# nothing in /tmp.
GOENV=()
set_goenv() { # tmp
  GOENV=(env GOTOOLCHAIN="${GOTOOLCHAIN:-local}" GOFLAGS=-buildvcs=false GOWORK=off CGO_ENABLED=0
    GOCACHE="$1/gocache" GOTMPDIR="$1/gotmp" go)
  mkdir -p "$1/gotmp"
}
gocmd() { "${GOENV[@]}" "$@"; }

need_go() {
  command -v go >/dev/null || die "go not found on PATH (Go >= $1 is needed to build from the module proxy)"
}

# Runs "$@" in DIR, niced, in its own process group, with its output in LOG,
# reporting progress every minute; returns its exit status. The script waits
# in `sleep 1`, not on the build, so an INT/TERM is handled within a second
# and cleanup_build can stop the whole group (go and its compile processes).
run_niced() { # dir log what cmd...
  local dir=$1 logf=$2 what=$3
  shift 3
  (cd "$dir" && exec setsid nice -n 19 "$@") >>"$logf" 2>&1 &
  RUN_PID=$!
  local bpid=$RUN_PID t0=$SECONDS next=60 rc=0
  while kill -0 "$bpid" 2>/dev/null; do
    sleep 1
    if [ $((SECONDS - t0)) -ge "$next" ]; then
      log "  ... still $what ($((next / 60)) min)"
      next=$((next + 60))
    fi
  done
  log "  $what took $((SECONDS - t0)) s"
  wait "$bpid" || rc=$?
  RUN_PID=
  return "$rc"
}

# EXIT trap of a build: stop a go command still running (interrupted ensure),
# then remove the temp dir.
RUN_PID=
cleanup_build() { # tmp
  if [ -n "${RUN_PID:-}" ]; then kill -TERM -- "-$RUN_PID" 2>/dev/null || true; fi
  chmod -R u+w "$1" 2>/dev/null
  rm -rf "$1"
}

# Atomic install: $tmp/out (binary + BUILD-INFO + wrapper go.mod/go.sum) is
# renamed to the version directory; tmp is inside $CACHE, so one filesystem.
publish() { # tmp final-dir
  local tmp=$1 final=$2
  if [ -e "$final" ]; then mv -T "$final" "$tmp/stale"; fi
  mv -T "$tmp/out" "$final"
  rm -f "$CACHE/$(basename "$final").build-failed.log"
}

build_failed() { # tmp name message
  cp "$1/build.log" "$CACHE/$2.build-failed.log" 2>/dev/null || true
  tail -n 40 "$1/build.log" >&2
  die "$3 (full log: $CACHE/$2.build-failed.log)"
}

build_apiserver() {
  ensure_pkgs "${BUILD_PKGS[@]}"
  local tmp start
  start=$(date +%s)
  tmp=$(mktemp -d "$CACHE/.build-kube-apiserver.XXXXXX")
  # shellcheck disable=SC2064
  trap "cleanup_build '$tmp'" EXIT
  trap 'exit 130' INT TERM
  mkdir -p "$tmp/out" "$tmp/wrap"
  : >"$tmp/build.log"
  set_goenv "$tmp"

  # 1. The pinned k8s.io/kubernetes: its go.mod is the source of the staging list.
  log "downloading $KUBE_MODULE@$KUBE_VERSION from ${GOPROXY:-$(go env GOPROXY)}"
  local dl gomod
  dl=$(cd "$tmp" && gocmd mod download -json "$KUBE_MODULE@$KUBE_VERSION" 2>>"$tmp/build.log") \
    || build_failed "$tmp" "kube-apiserver-$KUBE_VERSION" "go mod download $KUBE_MODULE@$KUBE_VERSION failed: $(jq -r '.Error // empty' <<<"$dl" 2>/dev/null)"
  gomod=$(jq -r '.GoMod' <<<"$dl")
  [ -f "$gomod" ] || die "no go.mod for $KUBE_MODULE@$KUBE_VERSION in: $dl"

  # 2. Its replaces: every one must point into ./staging (a replace of any
  #    other kind would be silently lost in a wrapper, so refuse it).
  local edit gover staging other
  edit=$(gocmd mod edit -json "$gomod")
  gover=$(jq -r '.Go' <<<"$edit")
  staging=$(jq -r '.Replace[] | select(.New.Path | startswith("./staging/")) | .Old.Path' <<<"$edit")
  other=$(jq -r '.Replace[] | select(.New.Path | startswith("./staging/") | not) | "\(.Old.Path) => \(.New.Path) \(.New.Version // "")"' <<<"$edit")
  [ -z "$other" ] || die "$KUBE_MODULE@$KUBE_VERSION has replaces outside ./staging; the wrapper cannot reproduce: $other"
  [ -n "$staging" ] || die "no ./staging replaces in $gomod: has the module layout changed?"
  log "$(wc -l <<<"$staging") staging modules in $KUBE_MODULE@$KUBE_VERSION's go.mod, pinned to $STAGING_VERSION"

  # 3. The wrapper module: requires k8s.io/kubernetes, replaces each staging
  #    module (v0.0.0 upstream) with its published $STAGING_VERSION, and keeps
  #    upstream's go version and godebug defaults.
  (
    cd "$tmp/wrap"
    printf 'module citadel.test/kube-apiserver-build\n\ngo %s\n' "$gover" >go.mod
    gocmd mod edit -require="$KUBE_MODULE@$KUBE_VERSION"
    local m kv
    for m in $staging; do gocmd mod edit -replace="$m=$m@$STAGING_VERSION"; done
    for kv in $(jq -r '(.GoDebug // [])[] | "\(.Key)=\(.Value)"' <<<"$edit"); do
      gocmd mod edit -godebug="$kv"
    done
  ) || die "writing the wrapper go.mod failed"

  # 4. Resolve (fills go.sum, adds the staging requires) and check nothing
  #    moved: the wrapper must select exactly the pinned version.
  log "resolving dependencies (go get $KUBE_MODULE/cmd/kube-apiserver@$KUBE_VERSION; log: $tmp/build.log)"
  run_niced "$tmp/wrap" "$tmp/build.log" downloading "${GOENV[@]}" get "$KUBE_MODULE/cmd/kube-apiserver@$KUBE_VERSION" \
    || build_failed "$tmp" "kube-apiserver-$KUBE_VERSION" "go get for the kube-apiserver wrapper failed"
  local selected
  selected=$(cd "$tmp/wrap" && gocmd list -m "$KUBE_MODULE" | awk '{print $2}')
  [ "$selected" = "$KUBE_VERSION" ] || die "wrapper selected $KUBE_MODULE $selected, not $KUBE_VERSION"

  # 5. Build, niced, with the version stamps hack/lib/version.sh sets (there is
  #    no git tree here, so no gitCommit).
  local minor=${KUBE_VERSION#v1.}
  minor=${minor%%.*}
  local ld="-s -w" pkg
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ld+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  done
  log "building kube-apiserver $KUBE_VERSION with $(go env GOVERSION) (10-25 min on 2 cores, depending on load)"
  run_niced "$tmp/wrap" "$tmp/build.log" compiling "${GOENV[@]}" build -trimpath -ldflags="$ld" \
    -o "$tmp/out/kube-apiserver" "$KUBE_MODULE/cmd/kube-apiserver" \
    || build_failed "$tmp" "kube-apiserver-$KUBE_VERSION" "kube-apiserver build failed"
  apiserver_ok "$tmp/out/kube-apiserver" \
    || build_failed "$tmp" "kube-apiserver-$KUBE_VERSION" "built kube-apiserver reports '$("$tmp/out/kube-apiserver" --version 2>&1 | head -n1)', not Kubernetes $KUBE_VERSION"

  # 6. Publish atomically, with what it was built from.
  cp "$tmp/wrap/go.mod" "$tmp/out/go.mod.wrapper"
  cp "$tmp/wrap/go.sum" "$tmp/out/go.sum.wrapper"
  {
    echo "version=$KUBE_VERSION"
    echo "module=$KUBE_MODULE@$KUBE_VERSION ($(jq -r '.Sum' <<<"$dl"))"
    echo "staging=$STAGING_VERSION: $(tr '\n' ' ' <<<"$staging")"
    echo "goproxy=$(go env GOPROXY)"
    echo "go=$(go version)"
    echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "build_seconds=$(($(date +%s) - start))"
  } >"$tmp/out/BUILD-INFO"
  publish "$tmp" "$CACHE_DIR"
  chmod -R u+w "$tmp" 2>/dev/null || true
  rm -rf "$tmp"
  trap - EXIT
  log "built in $(($(date +%s) - start)) s: $CACHED_BIN ($(du -h "$CACHED_BIN" | cut -f1))"
}

build_etcd() {
  ensure_pkgs "${BUILD_PKGS[@]}"
  local tmp start
  start=$(date +%s)
  tmp=$(mktemp -d "$CACHE/.build-etcd.XXXXXX")
  # shellcheck disable=SC2064
  trap "cleanup_build '$tmp'" EXIT
  trap 'exit 130' INT TERM
  mkdir -p "$tmp/out" "$tmp/wrap"
  : >"$tmp/build.log"
  set_goenv "$tmp"

  # go.etcd.io/etcd/server/v3 has its own main package, but its go.mod
  # replaces the sibling modules with ../ paths, so `go install` refuses it.
  # A wrapper main calling the real entry point, etcdmain.Main, builds the
  # same program with the published sibling modules (server/v3 requires them
  # at the same version).
  (
    cd "$tmp/wrap"
    cat >main.go <<'EOF'
// Generated by citadel's scripts/kube-test-env.sh: the etcd binary, as
// go.etcd.io/etcd/server/v3's own main.go builds it.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
EOF
    printf 'module citadel.test/etcd-build\n\ngo 1.26.0\n' >go.mod
  )
  log "resolving $ETCD_MODULE@$ETCD_VERSION (log: $tmp/build.log)"
  run_niced "$tmp/wrap" "$tmp/build.log" downloading "${GOENV[@]}" get "$ETCD_MODULE/etcdmain@$ETCD_VERSION" \
    || build_failed "$tmp" "etcd-$ETCD_VERSION" "go get $ETCD_MODULE@$ETCD_VERSION failed"
  local m v
  for m in go.etcd.io/etcd/server/v3 go.etcd.io/etcd/api/v3; do
    v=$(cd "$tmp/wrap" && gocmd list -m "$m" | awk '{print $2}')
    [ "$v" = "$ETCD_VERSION" ] || die "etcd wrapper selected $m $v, not $ETCD_VERSION"
  done
  log "building etcd $ETCD_VERSION with $(go env GOVERSION)"
  run_niced "$tmp/wrap" "$tmp/build.log" compiling "${GOENV[@]}" build -trimpath -ldflags="-s -w" -o "$tmp/out/etcd" . \
    || build_failed "$tmp" "etcd-$ETCD_VERSION" "etcd build failed"
  etcd_ok "$tmp/out/etcd" \
    || build_failed "$tmp" "etcd-$ETCD_VERSION" "built etcd reports '$("$tmp/out/etcd" --version 2>&1 | head -n1)', not etcd Version: ${ETCD_VERSION#v}"

  cp "$tmp/wrap/go.mod" "$tmp/out/go.mod.wrapper"
  cp "$tmp/wrap/go.sum" "$tmp/out/go.sum.wrapper"
  cp "$tmp/wrap/main.go" "$tmp/out/main.go.wrapper"
  {
    echo "version=$ETCD_VERSION"
    echo "module=$ETCD_MODULE@$ETCD_VERSION"
    echo "goproxy=$(go env GOPROXY)"
    echo "go=$(go version)"
    echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "build_seconds=$(($(date +%s) - start))"
  } >"$tmp/out/BUILD-INFO"
  publish "$tmp" "$ETCD_CACHE_DIR"
  chmod -R u+w "$tmp" 2>/dev/null || true
  rm -rf "$tmp"
  trap - EXIT
  log "built in $(($(date +%s) - start)) s: $CACHED_ETCD ($(du -h "$CACHED_ETCD" | cut -f1))"
}

# ensure_one NAME CACHED_PATH OK_FN BUILD_FN: one builder at a time; the
# others wait on the lock and then reuse its result.
ensure_one() {
  local name=$1 path=$2 ok=$3 build=$4
  "$ok" "$path" && return 0
  need_go 1.26
  local fd
  exec {fd}>"$CACHE/.$name.lock"
  flock -n "$fd" || { log "another ensure is building $name; waiting for it"; flock "$fd"; }
  if ! "$ok" "$path"; then
    "$build"
  fi
  exec {fd}>&-
}

# Both binaries (prebuilt ones from the environment win); sets APISERVER_BIN
# and ETCD_BIN.
ensure_bins() {
  ensure_pkgs "${RUN_PKGS[@]}"
  mkdir -p "$CACHE"
  if [ -n "${CITADEL_KUBE_APISERVER:-}" ]; then
    apiserver_ok "$CITADEL_KUBE_APISERVER" || die "CITADEL_KUBE_APISERVER=$CITADEL_KUBE_APISERVER is not kube-apiserver $KUBE_VERSION"
    APISERVER_BIN=$CITADEL_KUBE_APISERVER
  else
    ensure_one "kube-apiserver-$KUBE_VERSION" "$CACHED_BIN" apiserver_ok build_apiserver
    APISERVER_BIN=$CACHED_BIN
  fi
  if [ -n "${CITADEL_ETCD:-}" ]; then
    etcd_ok "$CITADEL_ETCD" || die "CITADEL_ETCD=$CITADEL_ETCD is not etcd $ETCD_VERSION"
    ETCD_BIN=$CITADEL_ETCD
  else
    ensure_one "etcd-$ETCD_VERSION" "$CACHED_ETCD" etcd_ok build_etcd
    ETCD_BIN=$CACHED_ETCD
  fi
  log "kube-apiserver: $APISERVER_BIN"
  log "etcd: $ETCD_BIN"
}

cmd_ensure() {
  ensure_bins
  echo "$APISERVER_BIN"
}

# ---------------------------------------------------------------- runtime

port_free() {
  ! ss -Hltn "sport = :$1" 2>/dev/null | grep -q . &&
    ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Free ports below the Linux ephemeral range, distinct from each other.
pick_ports() {
  local want=$1 got=() p tries=0
  while [ "${#got[@]}" -lt "$want" ]; do
    tries=$((tries + 1))
    [ "$tries" -lt 500 ] || die "no free loopback port found"
    p=$((20000 + RANDOM % 12000))
    [[ " ${got[*]:-} " == *" $p "* ]] && continue
    port_free "$p" && got+=("$p")
  done
  echo "${got[@]}"
}

pid_alive() { # pidfile expected-exe-basename
  local pid
  [ -f "$1" ] || return 1
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  # Guard against a recycled pid.
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | awk '{print $1}' | grep -q "$2\$"
}

stop_one() { # pidfile exe-name
  local pid i
  if pid_alive "$1" "$2"; then
    pid=$(cat "$1")
    log "stopping $2 (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      log "$2 (pid $pid) ignored TERM; sending KILL"
      kill -KILL "$pid" 2>/dev/null || true
      for i in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
  fi
  rm -f "$1"
}

cmd_stop() {
  local dir=$1
  [ -d "$dir" ] || { log "$dir does not exist; nothing to stop"; return 0; }
  stop_one "$dir/kube-apiserver.pid" kube-apiserver
  stop_one "$dir/etcd.pid" etcd
  log "stopped ($dir)"
}

env_server() { sed -n "s/^export CITADEL_KUBE_SERVER='\{0,1\}\([^']*\)'\{0,1\}\$/\1/p" "$1/env"; }

readyz() { # dir
  local server token ca
  [ -f "$1/env" ] || return 1
  server=$(env_server "$1")
  token=$(cat "$1/pki/admin.token" 2>/dev/null) || return 1
  ca="$1/pki/serving-ca.crt"
  curl -fsS --max-time 3 --cacert "$ca" -H "Authorization: Bearer $token" "$server/readyz" 2>/dev/null | grep -qx ok
}

cmd_status() {
  local dir=$1 rc=0 name
  for name in etcd kube-apiserver; do
    if pid_alive "$dir/$name.pid" "$name"; then
      log "$name: running (pid $(cat "$dir/$name.pid"))"
    else
      log "$name: not running"; rc=1
    fi
  done
  if [ -f "$dir/env" ]; then
    log "server: $(env_server "$dir")"
    if readyz "$dir"; then log "/readyz: ok"; else log "/readyz: not ok"; rc=1; fi
  fi
  return "$rc"
}

gen_pki() { # dir
  local p="$1/pki"
  rm -rf "$p"
  mkdir -p "$p"
  chmod 700 "$p"
  (
    cd "$p"
    # Serving CA + apiserver serving cert (P-256; SANs for loopback and the in-cluster names).
    openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
      -keyout serving-ca.key -out serving-ca.crt -days 30 -subj "/CN=citadel-test-serving-ca" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
      2>/dev/null
    openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
      -keyout apiserver.key -out apiserver.csr -subj "/CN=kube-apiserver" 2>/dev/null
    cat >apiserver.ext <<'EOF'
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,DNS:localhost,IP:10.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid
EOF
    openssl x509 -req -in apiserver.csr -CA serving-ca.crt -CAkey serving-ca.key -CAcreateserial \
      -out apiserver.crt -days 30 -extfile apiserver.ext 2>/dev/null
    # Client CA (for --client-ca-file) and an admin client cert (O=system:masters).
    openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
      -keyout client-ca.key -out client-ca.crt -days 30 -subj "/CN=citadel-test-client-ca" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
      2>/dev/null
    openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
      -keyout admin.key -out admin.csr -subj "/O=system:masters/CN=citadel-admin" 2>/dev/null
    printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n' >admin.ext
    openssl x509 -req -in admin.csr -CA client-ca.crt -CAkey client-ca.key -CAcreateserial \
      -out admin.crt -days 30 -extfile admin.ext 2>/dev/null
    # A kubelet-like client cert for node $NODE_NAME (the Node authorizer and
    # NodeRestriction identify nodes by exactly this subject).
    openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
      -keyout node.key -out node.csr -subj "/O=system:nodes/CN=system:node:$NODE_NAME" 2>/dev/null
    openssl x509 -req -in node.csr -CA client-ca.crt -CAkey client-ca.key -CAcreateserial \
      -out node.crt -days 30 -extfile admin.ext 2>/dev/null
    # Service-account token signing key pair (RSA, RS256).
    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out sa.key 2>/dev/null
    openssl pkey -in sa.key -pubout -out sa.pub 2>/dev/null
    # Static admin token.
    openssl rand -hex 32 >admin.token
    printf '%s,citadel-admin,citadel-admin,"system:masters"\n' "$(cat admin.token)" >tokens.csv
    rm -f ./*.csr ./*.ext ./*.srl
    chmod 600 ./*.key admin.token tokens.csv
  )
}

write_kubeconfig() { # dir server
  local dir=$1 server=$2
  cat >"$dir/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: citadel-test
  cluster:
    server: $server
    certificate-authority-data: $(base64 -w0 <"$dir/pki/serving-ca.crt")
users:
- name: citadel-admin
  user:
    token: $(cat "$dir/pki/admin.token")
contexts:
- name: citadel-test
  context:
    cluster: citadel-test
    user: citadel-admin
    namespace: default
current-context: citadel-test
EOF
  chmod 600 "$dir/kubeconfig"
  # The same server as the kubelet of node $NODE_NAME (client cert).
  cat >"$dir/node-kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: citadel-test
  cluster:
    server: $server
    certificate-authority-data: $(base64 -w0 <"$dir/pki/serving-ca.crt")
users:
- name: system:node:$NODE_NAME
  user:
    client-certificate-data: $(base64 -w0 <"$dir/pki/node.crt")
    client-key-data: $(base64 -w0 <"$dir/pki/node.key")
contexts:
- name: citadel-test-node
  context:
    cluster: citadel-test
    user: system:node:$NODE_NAME
    namespace: default
current-context: citadel-test-node
EOF
  chmod 600 "$dir/node-kubeconfig"
}

write_env() { # dir server etcd-url
  local dir=$1 f="$1/env.tmp"
  {
    echo "# Written by scripts/kube-test-env.sh start; source it."
    printf "export %s='%s'\n" \
      KUBECONFIG "$dir/kubeconfig" \
      CITADEL_KUBE_DIR "$dir" \
      CITADEL_KUBE_SERVER "$2" \
      CITADEL_KUBE_TOKEN "$(cat "$dir/pki/admin.token")" \
      CITADEL_KUBE_CA "$dir/pki/serving-ca.crt" \
      CITADEL_KUBE_CLIENT_CA "$dir/pki/client-ca.crt" \
      CITADEL_KUBE_CLIENT_CERT "$dir/pki/admin.crt" \
      CITADEL_KUBE_CLIENT_KEY "$dir/pki/admin.key" \
      CITADEL_KUBE_SA_ISSUER "$SA_ISSUER" \
      CITADEL_KUBE_SA_JWKS_URI "$2/openid/v1/jwks" \
      CITADEL_KUBE_SA_PUBLIC_KEY "$dir/pki/sa.pub" \
      CITADEL_KUBE_API_AUDIENCES "$API_AUDIENCES" \
      CITADEL_KUBE_VERSION "$KUBE_VERSION" \
      CITADEL_KUBE_NODE_NAME "$NODE_NAME" \
      CITADEL_KUBE_NODE_CERT "$dir/pki/node.crt" \
      CITADEL_KUBE_NODE_KEY "$dir/pki/node.key" \
      CITADEL_KUBE_NODE_KUBECONFIG "$dir/node-kubeconfig" \
      CITADEL_ETCD_VERSION "$ETCD_VERSION" \
      CITADEL_ETCD_ENDPOINT "$3" \
      CITADEL_KUBE_APISERVER_PID "$(cat "$dir/kube-apiserver.pid")" \
      CITADEL_ETCD_PID "$(cat "$dir/etcd.pid")"
  } >"$f"
  chmod 600 "$f"
  mv -f "$f" "$dir/env"
}

launch_apiserver() { # dir bin etcd-url port
  local dir=$1 bin=$2 etcd_url=$3 api_port=$4
  local server="https://127.0.0.1:$api_port"
  log "starting kube-apiserver on $server"
  setsid "$bin" \
    --etcd-servers="$etcd_url" \
    --bind-address=127.0.0.1 \
    --advertise-address=127.0.0.1 \
    --secure-port="$api_port" \
    --cert-dir="$dir/pki" \
    --tls-cert-file="$dir/pki/apiserver.crt" \
    --tls-private-key-file="$dir/pki/apiserver.key" \
    --client-ca-file="$dir/pki/client-ca.crt" \
    --token-auth-file="$dir/pki/tokens.csv" \
    --authorization-mode=Node,RBAC \
    --enable-admission-plugins=NodeRestriction \
    --service-account-issuer="$SA_ISSUER" \
    --service-account-jwks-uri="$server/openid/v1/jwks" \
    --service-account-key-file="$dir/pki/sa.pub" \
    --service-account-signing-key-file="$dir/pki/sa.key" \
    --api-audiences="$API_AUDIENCES" \
    --service-cluster-ip-range="$SERVICE_CIDR" \
    --allow-privileged=true \
    --endpoint-reconciler-type=none \
    --profiling=false \
    </dev/null >>"$dir/kube-apiserver.log" 2>&1 &
  local pid=$! i real
  # setsid forks when it happens to lead a process group, and then $! is a wrapper that has
  # already exited: record the process actually serving the port.
  for i in $(seq 1 20); do
    # `|| true`: under pipefail a pgrep that finds nothing yet (a busy machine, the child
    # not exec'd) failed the assignment, and set -e ended the script without a word.
    real=$(pgrep -f -- "kube-apiserver .*--secure-port=$api_port( |$)" | head -n 1 || true)
    [ -n "$real" ] && { pid=$real; break; }
    sleep 0.1
  done
  echo "$pid" >"$dir/kube-apiserver.pid"
}

wait_apiserver_ready() { # dir
  local dir=$1
  local deadline=$(($(date +%s) + READY_TIMEOUT))
  until readyz "$dir"; do
    if ! pid_alive "$dir/kube-apiserver.pid" kube-apiserver; then
      grep -E '^[EF][0-9]{4} |^(panic|fatal error|Error)' "$dir/kube-apiserver.log" | tail -n 20 >&2
      tail -n 10 "$dir/kube-apiserver.log" >&2
      die "kube-apiserver exited (log: $dir/kube-apiserver.log)"
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
      tail -n 40 "$dir/kube-apiserver.log" >&2
      die "kube-apiserver not ready after ${READY_TIMEOUT}s (log: $dir/kube-apiserver.log)"
    fi
    sleep 0.2
  done

}

# Stops only kube-apiserver (KILL, as a crash would), leaving etcd and its data: tests use
# it to take the API away in the middle of a write, then bring it back.
cmd_stop_apiserver() {
  local dir=$1 pid
  pid_alive "$dir/kube-apiserver.pid" kube-apiserver || { log "kube-apiserver is not running"; return 0; }
  pid=$(cat "$dir/kube-apiserver.pid")
  kill -KILL "$pid" 2>/dev/null || true
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  log "killed kube-apiserver (pid $pid)"
}

# Starts kube-apiserver again on the same port and etcd, after stop-apiserver.
cmd_start_apiserver() {
  local dir=$1 server etcd_url
  pid_alive "$dir/etcd.pid" etcd || die "etcd is not running in $dir (use start)"
  pid_alive "$dir/kube-apiserver.pid" kube-apiserver && { log "already running"; return 0; }
  ensure_bins
  server=$(sed -n "s/^export CITADEL_KUBE_SERVER='\(.*\)'$/\1/p" "$dir/env")
  etcd_url=$(sed -n "s/^export CITADEL_ETCD_ENDPOINT='\(.*\)'$/\1/p" "$dir/env")
  [ -n "$server" ] && [ -n "$etcd_url" ] || die "no server or etcd endpoint in $dir/env"
  launch_apiserver "$dir" "$APISERVER_BIN" "$etcd_url" "${server##*:}"
  wait_apiserver_ready "$dir"
  log "kube-apiserver back on $server"
}

cmd_start() {
  local dir=$1
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  case "$dir" in *[\'\ ]*) die "DIR must not contain quotes or spaces: $dir" ;; esac
  if pid_alive "$dir/kube-apiserver.pid" kube-apiserver && pid_alive "$dir/etcd.pid" etcd && readyz "$dir"; then
    log "already running and ready in $dir"
    echo "$dir/env"
    return 0
  fi
  ensure_bins
  local bin=$APISERVER_BIN etcd_bin=$ETCD_BIN

  # Fresh state every start.
  cmd_stop "$dir" 2>/dev/null
  rm -rf "$dir/etcd" "$dir/pki" "$dir/env" "$dir/kubeconfig" "$dir/node-kubeconfig" "$dir"/*.log
  local t0
  t0=$(date +%s.%N)
  log "generating PKI in $dir/pki"
  gen_pki "$dir"

  local ports etcd_client etcd_peer api_port
  read -r etcd_client etcd_peer api_port <<<"$(pick_ports 3)"
  local etcd_url="http://127.0.0.1:$etcd_client"
  local server="https://127.0.0.1:$api_port"

  # On failure or interrupt, leave nothing running.
  trap 'cmd_stop "'"$dir"'" 2>/dev/null || true' EXIT
  trap 'exit 130' INT TERM

  log "starting etcd on $etcd_url (peer :$etcd_peer)"
  setsid "$etcd_bin" \
    --name citadel-test \
    --data-dir "$dir/etcd" \
    --listen-client-urls "$etcd_url" \
    --advertise-client-urls "$etcd_url" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer" \
    --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
    --initial-cluster "citadel-test=http://127.0.0.1:$etcd_peer" \
    --initial-cluster-state new \
    --logger zap --log-outputs stderr \
    </dev/null >"$dir/etcd.log" 2>&1 &
  echo $! >"$dir/etcd.pid"
  local i
  for i in $(seq 1 100); do
    curl -fsS --max-time 1 "$etcd_url/health" 2>/dev/null | grep -q '"health":"true"' && break
    # kill -0, not pid_alive: right after the fork the child is still bash/setsid (not yet
    # exec'd into etcd, its log maybe not yet opened), which pid_alive's name check took for
    # "exited" on a busy machine (seen starting a second environment in one test).
    kill -0 "$(cat "$dir/etcd.pid")" 2>/dev/null || { tail -n 30 "$dir/etcd.log" >&2; die "etcd exited"; }
    sleep 0.1
  done
  curl -fsS --max-time 1 "$etcd_url/health" 2>/dev/null | grep -q '"health":"true"' \
    || { tail -n 30 "$dir/etcd.log" >&2; die "etcd not healthy after 10 s"; }

  launch_apiserver "$dir" "$bin" "$etcd_url" "$api_port"
  printf "export CITADEL_KUBE_SERVER='%s'\n" "$server" >"$dir/env"
  wait_apiserver_ready "$dir"

  # /readyz does not prove that writes decode (a 1.20 build once panicked on
  # the first JSON body with a map), so do one dry-run create with labels.
  local code
  code=$(curl -sS --max-time 10 -o /dev/null -w '%{http_code}' --cacert "$dir/pki/serving-ca.crt" \
    -H "Authorization: Bearer $(cat "$dir/pki/admin.token")" -H 'Content-Type: application/json' \
    -d '{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"citadel-smoke","labels":{"a":"b"}}}' \
    "$server/api/v1/namespaces?dryRun=All" 2>/dev/null) || true
  if [ "$code" != 201 ]; then
    grep -m1 -A8 -E 'Observed a panic|^fatal error' "$dir/kube-apiserver.log" >&2 || tail -n 20 "$dir/kube-apiserver.log" >&2
    die "kube-apiserver cannot decode a JSON create (HTTP $code): broken build?"
  fi
  # What later tests rely on: Pod Certificates and ClusterTrustBundles in
  # certificates.k8s.io/v1 (GA and on by default in 1.37).
  local certs r
  certs=$(curl -fsS --max-time 10 --cacert "$dir/pki/serving-ca.crt" \
    -H "Authorization: Bearer $(cat "$dir/pki/admin.token")" \
    "$server/apis/certificates.k8s.io/v1" 2>/dev/null) || true
  for r in podcertificaterequests podcertificaterequests/status clustertrustbundles; do
    grep -Eq "\"name\": *\"$r\"" <<<"$certs" || die "kube-apiserver does not serve certificates.k8s.io/v1 $r"
  done

  write_kubeconfig "$dir" "$server"
  write_env "$dir" "$server" "$etcd_url"
  trap - EXIT INT TERM
  log "ready in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s: $server (source $dir/env)"
  echo "$dir/env"
}

# ---------------------------------------------------------------- main

need_dir() { [ -n "${1:-}" ] || { usage >&2; die "missing DIR"; }; }

case "${1:-help}" in
  ensure) cmd_ensure ;;
  start) need_dir "${2:-}"; cmd_start "$2" ;;
  stop) need_dir "${2:-}"; cmd_stop "$(cd "$2" 2>/dev/null && pwd || echo "$2")" ;;
  stop-apiserver) need_dir "${2:-}"; cmd_stop_apiserver "$(cd "$2" && pwd)" ;;
  start-apiserver) need_dir "${2:-}"; cmd_start_apiserver "$(cd "$2" && pwd)" ;;
  status) need_dir "${2:-}"; cmd_status "$(cd "$2" 2>/dev/null && pwd || echo "$2")" ;;
  help | -h | --help) usage ;;
  *) usage >&2; die "unknown command: $1" ;;
esac
