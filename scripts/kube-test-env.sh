#!/usr/bin/env bash
# A real kube-apiserver + etcd on loopback for citadel's integration tests.
#
#   scripts/kube-test-env.sh ensure       # install packages, build/cache kube-apiserver; print its path
#   scripts/kube-test-env.sh start DIR    # fresh etcd + kube-apiserver in DIR; print DIR/env
#   scripts/kube-test-env.sh stop DIR     # stop them (idempotent)
#   scripts/kube-test-env.sh status DIR   # show pids, ports and /readyz
#
# kube-apiserver v1.20.2 is built from Debian bookworm's `kubernetes` source
# package with Debian's Go 1.19 and cached under
# ${CITADEL_CACHE:-~/.cache/citadel}/kube-apiserver-v1.20.2/kube-apiserver.
# See docs/kube-test-env.md.
set -euo pipefail

KUBE_VERSION="v1.20.2"
KUBE_MAJOR="1"
KUBE_MINOR="20"
SRC_PACKAGE="kubernetes"
SUITE="bookworm"
GOROOT_DIR="/usr/lib/go-1.19"
REFLECT2_SRC="/usr/share/gocode/src/github.com/modern-go/reflect2"
BUILD_PKGS=(golang-1.19-go rsync golang-github-modern-go-reflect2-dev make dpkg-dev)
RUN_PKGS=(etcd-server openssl curl)
SA_ISSUER="https://kubernetes.default.svc.cluster.local"
API_AUDIENCES="${SA_ISSUER},istio-ca"
SERVICE_CIDR="10.0.0.0/24"
READY_TIMEOUT="${CITADEL_KUBE_READY_TIMEOUT:-60}"

CACHE="${CITADEL_CACHE:-$HOME/.cache/citadel}"
CACHE_DIR="$CACHE/kube-apiserver-$KUBE_VERSION"
CACHED_BIN="$CACHE_DIR/kube-apiserver"

log() { printf '==> %s\n' "$*" >&2; }
die() { printf '==> ERROR: %s\n' "$*" >&2; exit 1; }

usage() {
  cat <<EOF
Usage: $(basename "$0") COMMAND [DIR]

A real kube-apiserver ($KUBE_VERSION, built from Debian's source package) and
etcd on 127.0.0.1, for integration tests.

Commands:
  ensure       Install missing Debian packages; build kube-apiserver if it is
               not cached yet. Prints the binary path.
  start DIR    ensure, then start a fresh etcd + kube-apiserver with state in
               DIR (wiped of earlier state). Waits for /readyz, writes
               DIR/kubeconfig and DIR/env, prints the path of DIR/env.
               If DIR already runs a ready instance, just prints DIR/env.
  stop DIR     Stop the processes recorded in DIR/*.pid (TERM, then KILL).
               Idempotent.
  status DIR   Print process and readiness state; exit 0 only if ready.
  help         This text.

Environment:
  CITADEL_CACHE                cache root (default ~/.cache/citadel)
  CITADEL_KUBE_APISERVER       use this kube-apiserver binary instead of building
  CITADEL_KUBE_READY_TIMEOUT   seconds to wait for /readyz (default 60)
  CITADEL_DEBIAN_MIRROR        Debian mirror for the source package (default:
                               the one in /etc/apt/sources.list*)

Cached binary: $CACHED_BIN
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

# The mirror the machine already uses for Debian main (deb822 *.sources or
# one-line *.list). Security/updates suites are skipped.
debian_mirror() {
  if [ -n "${CITADEL_DEBIAN_MIRROR:-}" ]; then echo "$CITADEL_DEBIAN_MIRROR"; return; fi
  local f uri
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    uri=$(awk -v suite="$SUITE" '
      BEGIN { RS=""; FS="\n" }
      {
        uris=""; ok=0; deb=0
        for (i = 1; i <= NF; i++) {
          if ($i ~ /^[ \t]*#/) continue
          if ($i ~ /^Types:/ && $i ~ /(^|[ \t])deb([ \t]|$)/) deb=1
          if ($i ~ /^URIs:/) { sub(/^URIs:[ \t]*/, "", $i); uris=$i }
          if ($i ~ /^Suites:/) { n=split($i, s, /[ \t]+/); for (j = 2; j <= n; j++) if (s[j] == suite) ok=1 }
          if ($i ~ /^Enabled:[ \t]*no/) ok=0
        }
        if (deb && ok && uris != "") { split(uris, u, /[ \t]+/); print u[1]; exit }
      }' "$f")
    if [ -n "$uri" ]; then echo "$uri"; return; fi
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    uri=$(awk -v suite="$SUITE" '
      $1 == "deb" {
        i = 2
        if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
        if ($(i+1) == suite) { print $i; exit }
      }' "$f")
    if [ -n "$uri" ]; then echo "$uri"; return; fi
  done
  die "no Debian $SUITE mirror found in /etc/apt/sources.list*; set CITADEL_DEBIAN_MIRROR"
}

# ---------------------------------------------------------------- build

apiserver_ok() { [ -x "$1" ] && "$1" --version 2>/dev/null | grep -q "Kubernetes $KUBE_VERSION"; }

build_apiserver() {
  ensure_pkgs "${BUILD_PKGS[@]}"
  [ -d "$REFLECT2_SRC" ] || die "$REFLECT2_SRC missing (golang-github-modern-go-reflect2-dev)"
  [ -x "$GOROOT_DIR/bin/go" ] || die "$GOROOT_DIR/bin/go missing (golang-1.19-go)"

  local tmp start mirror
  start=$(date +%s)
  # Inside the cache root so the final mv is an atomic rename on one filesystem.
  tmp=$(mktemp -d "$CACHE/.build-kube-apiserver.XXXXXX")
  # shellcheck disable=SC2064
  trap "rm -rf '$tmp'" EXIT

  # 1. Source package via a private apt configuration: the system's sources,
  #    lists and caches are not touched.
  mirror=$(debian_mirror)
  log "fetching Debian source package '$SRC_PACKAGE' ($SUITE main) from $mirror"
  mkdir -p "$tmp/apt/lists/partial" "$tmp/apt/cache/archives/partial" "$tmp/src"
  printf 'deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] %s %s main\n' \
    "$mirror" "$SUITE" >"$tmp/apt/sources.list"
  local apt_opts=(
    -o "Dir::Etc::SourceList=$tmp/apt/sources.list"
    -o "Dir::Etc::SourceParts=/dev/null"
    -o "Dir::State::Lists=$tmp/apt/lists"
    -o "Dir::Cache=$tmp/apt/cache"
    -o "Dir::Cache::pkgcache="
    -o "Dir::Cache::srcpkgcache="
    -o "APT::Sandbox::User=root"
  )
  apt-get "${apt_opts[@]}" -qq update >&2
  (cd "$tmp/src" && apt-get "${apt_opts[@]}" -qq source --download-only "$SRC_PACKAGE" >&2)
  local dsc
  dsc=$(ls "$tmp/src"/*.dsc)
  log "source: $(basename "$dsc")"
  # apt already verified the files against the signed Release; dpkg-source
  # applies Debian's patches (kubectl printing fixes, CVE-2021-25743).
  (cd "$tmp/src" && dpkg-source -q -x "$dsc" kubernetes >/dev/null 2>&1) \
    || die "dpkg-source -x $dsc failed"
  local k="$tmp/src/kubernetes"
  case "$(basename "$dsc")" in
    *"${KUBE_VERSION#v}"*) ;;
    *) die "unexpected source version $(basename "$dsc"); expected upstream ${KUBE_VERSION#v}" ;;
  esac

  # 2. reflect2 1.0.1 (vendored) crashes under Go 1.19 when a map is
  #    serialized; use Debian's 1.0.2.
  log "replacing vendored reflect2 with $(dpkg-query -W -f='${Version}' golang-github-modern-go-reflect2-dev) from $REFLECT2_SRC"
  rm -rf "$k/vendor/github.com/modern-go/reflect2"
  mkdir -p "$k/vendor/github.com/modern-go/reflect2"
  # The empty *.s files must come along: they let the bodyless go:linkname
  # declarations compile. go.mod and tests are left out, as in 1.0.1.
  (cd "$REFLECT2_SRC" && find . -maxdepth 1 -type f \( -name '*.go' -o -name '*.s' \) ! -name '*_test.go' \
      -exec cp -L {} "$k/vendor/github.com/modern-go/reflect2/" \;)
  [ -f "$REFLECT2_SRC/LICENSE" ] && cp -L "$REFLECT2_SRC/LICENSE" "$k/vendor/github.com/modern-go/reflect2/"

  # 3. Build, niced so the machine stays responsive.
  log "building kube-apiserver $KUBE_VERSION with $("$GOROOT_DIR/bin/go" version | awk '{print $3}') (about 10-15 min on 2 cores; log: $tmp/build.log)"
  local rc=0
  (
    cd "$k"
    env GOROOT="$GOROOT_DIR" PATH="$GOROOT_DIR/bin:$PATH" GOPROXY=off GOFLAGS= CGO_ENABLED=0 \
      GOCACHE="$tmp/gocache" GOTMPDIR= \
      KUBE_GIT_VERSION="$KUBE_VERSION" KUBE_GIT_MAJOR="$KUBE_MAJOR" KUBE_GIT_MINOR="$KUBE_MINOR" \
      KUBE_GIT_TREE_STATE=clean \
      nice -n 19 make WHAT=cmd/kube-apiserver
  ) >"$tmp/build.log" 2>&1 &
  local bpid=$! n=0
  while kill -0 "$bpid" 2>/dev/null; do
    sleep 5
    n=$((n + 5))
    if [ $((n % 60)) -eq 0 ]; then log "  ... still building ($((n / 60)) min): $(tail -n1 "$tmp/build.log" | cut -c1-100)"; fi
  done
  wait "$bpid" || rc=$?
  if [ "$rc" -ne 0 ] || ! apiserver_ok "$k/_output/bin/kube-apiserver"; then
    tail -n 40 "$tmp/build.log" >&2
    die "kube-apiserver build failed (make exit $rc)"
  fi

  # 4. Publish atomically.
  mkdir -p "$CACHE_DIR"
  cp "$k/_output/bin/kube-apiserver" "$CACHE_DIR/.kube-apiserver.tmp.$$"
  chmod 0755 "$CACHE_DIR/.kube-apiserver.tmp.$$"
  {
    echo "version=$KUBE_VERSION"
    echo "source=$(basename "$dsc")"
    echo "mirror=$mirror"
    echo "go=$("$GOROOT_DIR/bin/go" version)"
    echo "reflect2=$(dpkg-query -W -f='${Version}' golang-github-modern-go-reflect2-dev)"
    echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "build_seconds=$(($(date +%s) - start))"
  } >"$CACHE_DIR/BUILD-INFO"
  mv -f "$CACHE_DIR/.kube-apiserver.tmp.$$" "$CACHED_BIN"
  rm -rf "$tmp"
  trap - EXIT
  log "built in $(($(date +%s) - start)) s: $CACHED_BIN ($(du -h "$CACHED_BIN" | cut -f1))"
}

cmd_ensure() {
  ensure_pkgs "${RUN_PKGS[@]}"
  if [ -n "${CITADEL_KUBE_APISERVER:-}" ]; then
    apiserver_ok "$CITADEL_KUBE_APISERVER" || die "CITADEL_KUBE_APISERVER=$CITADEL_KUBE_APISERVER is not kube-apiserver $KUBE_VERSION"
    echo "$CITADEL_KUBE_APISERVER"
    return
  fi
  mkdir -p "$CACHE"
  if ! apiserver_ok "$CACHED_BIN"; then
    # One builder at a time; the others wait and then reuse its result.
    exec 9>"$CACHE/.kube-apiserver-$KUBE_VERSION.lock"
    flock -n 9 || { log "another ensure is building; waiting for it"; flock 9; }
    if ! apiserver_ok "$CACHED_BIN"; then
      build_apiserver
    fi
    exec 9>&-
  fi
  log "kube-apiserver: $CACHED_BIN"
  echo "$CACHED_BIN"
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
      CITADEL_ETCD_ENDPOINT "$3" \
      CITADEL_KUBE_APISERVER_PID "$(cat "$dir/kube-apiserver.pid")" \
      CITADEL_ETCD_PID "$(cat "$dir/etcd.pid")"
  } >"$f"
  chmod 600 "$f"
  mv -f "$f" "$dir/env"
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
  local bin etcd_bin
  bin=$(cmd_ensure)
  etcd_bin=$(command -v etcd || echo /usr/bin/etcd)
  [ -x "$etcd_bin" ] || die "etcd not found (etcd-server package)"

  # Fresh state every start.
  cmd_stop "$dir" 2>/dev/null
  rm -rf "$dir/etcd" "$dir/pki" "$dir/env" "$dir/kubeconfig" "$dir"/*.log
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
    pid_alive "$dir/etcd.pid" etcd || { tail -n 30 "$dir/etcd.log" >&2; die "etcd exited"; }
    sleep 0.1
  done
  curl -fsS --max-time 1 "$etcd_url/health" 2>/dev/null | grep -q '"health":"true"' \
    || { tail -n 30 "$dir/etcd.log" >&2; die "etcd not healthy after 10 s"; }

  log "starting kube-apiserver on $server"
  setsid "$bin" \
    --etcd-servers="$etcd_url" \
    --bind-address=127.0.0.1 \
    --advertise-address=127.0.0.1 \
    --secure-port="$api_port" \
    --insecure-port=0 \
    --cert-dir="$dir/pki" \
    --tls-cert-file="$dir/pki/apiserver.crt" \
    --tls-private-key-file="$dir/pki/apiserver.key" \
    --client-ca-file="$dir/pki/client-ca.crt" \
    --token-auth-file="$dir/pki/tokens.csv" \
    --authorization-mode=Node,RBAC \
    --service-account-issuer="$SA_ISSUER" \
    --service-account-jwks-uri="$server/openid/v1/jwks" \
    --service-account-key-file="$dir/pki/sa.pub" \
    --service-account-signing-key-file="$dir/pki/sa.key" \
    --api-audiences="$API_AUDIENCES" \
    --service-cluster-ip-range="$SERVICE_CIDR" \
    --allow-privileged=true \
    --endpoint-reconciler-type=none \
    --profiling=false \
    --logtostderr=true \
    </dev/null >"$dir/kube-apiserver.log" 2>&1 &
  echo $! >"$dir/kube-apiserver.pid"
  printf "export CITADEL_KUBE_SERVER='%s'\n" "$server" >"$dir/env"

  local deadline=$(($(date +%s) + READY_TIMEOUT))
  until readyz "$dir"; do
    if ! pid_alive "$dir/kube-apiserver.pid" kube-apiserver; then
      tail -n 40 "$dir/kube-apiserver.log" >&2
      die "kube-apiserver exited (log: $dir/kube-apiserver.log)"
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
      tail -n 40 "$dir/kube-apiserver.log" >&2
      die "kube-apiserver not ready after ${READY_TIMEOUT}s (log: $dir/kube-apiserver.log)"
    fi
    sleep 0.2
  done

  # /readyz passes even on a binary built with the vendored reflect2 1.0.1;
  # that one panics on the first JSON body with a map (any ObjectMeta), so
  # prove decoding works with a dry-run create.
  local code
  code=$(curl -sS --max-time 10 -o /dev/null -w '%{http_code}' --cacert "$dir/pki/serving-ca.crt" \
    -H "Authorization: Bearer $(cat "$dir/pki/admin.token")" -H 'Content-Type: application/json' \
    -d '{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"citadel-smoke","labels":{"a":"b"}}}' \
    "$server/api/v1/namespaces?dryRun=All" 2>/dev/null) || true
  if [ "$code" != 201 ]; then
    grep -m1 -A8 -E 'Observed a panic|^fatal error' "$dir/kube-apiserver.log" >&2 || tail -n 20 "$dir/kube-apiserver.log" >&2
    die "kube-apiserver cannot decode a JSON create (HTTP $code): broken build? (see docs/kube-test-env.md, reflect2)"
  fi

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
  status) need_dir "${2:-}"; cmd_status "$(cd "$2" 2>/dev/null && pwd || echo "$2")" ;;
  help | -h | --help) usage ;;
  *) usage >&2; die "unknown command: $1" ;;
esac
