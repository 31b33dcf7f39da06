#!/usr/bin/env bash
# Citadel beside the CAs a user would pick instead, on the same machine, the same input and the
# same load generator (issue #26): istiod's CA (pilot-discovery of the Istio version our tests
# pin) and SPIRE server v1.13.3, each built from the Go module proxy and cached.
#
#   scripts/bench-peers.sh [--runs N] [--requests N] [--key-types "ec-p256 rsa-2048"]
#                          [--servers "citadel istiod spire"] [--csv FILE] [--open-seconds 5]
#
# For each key type (the CA's key AND the CSRs' keys) and each server, N runs of:
#   - saturation: 64 streams, closed loop (certificates/s, p50/p99, server CPU per certificate);
#   - open loop at 1,000/s and at 5,000/s (p50/p99 at that offered load);
# with the server's peak RSS. One load generator for all three (bench/peers/load, Go, on one
# thread like citadel-bench: GOMAXPROCS=1, so it takes at most one of the cores):
# distinct CSR per request (a distinct SPIFFE ID each) and, for Istio's protocol, a distinct
# RS256 token per request.
#
# How each server is run (what a user would run; see docs/benchmarks.md "Peers"):
#   - citadel: `citadel serve --dev --ca-key-type K` (release build): root -> intermediate,
#     tokens checked against the dev JWKS (local, as --jwks-file), audit line per certificate.
#   - istiod: pilot-discovery with a plugged-in CA (root -> intermediate of key type K in
#     ./etc/cacerts: its self-signed CA is RSA only) and JWT_RULE pointing at the same JWKS
#     over local HTTP (OIDC authenticator: no TokenReview per request). It needs a
#     kube-apiserver to start, so one runs (scripts/kube-test-env.sh), idle during the runs.
#   - SPIRE: spire-server with the SQLite datastore, an in-memory key manager
#     (ca_key_type K), the same root as an UpstreamAuthority "disk", and the MintX509SVID API
#     over its local socket. SPIRE has no endpoint where a workload presents a token per
#     certificate (its agents attest once and then batch-sign over mTLS), so SPIRE verifies
#     no token per request here: that favours SPIRE, and the table says so.
#
# Needs a quiet machine: nothing else running (check `uptime`). Output: one line per run to
# the CSV (default target/bench-peers.csv) and a Markdown table on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"

RUNS=3
REQUESTS=20000
KEY_TYPES="ec-p256 rsa-2048"
SERVERS="citadel istiod spire"
CSV="$ROOT/target/bench-peers.csv"
OPEN_SECONDS=5
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) RUNS="$2"; shift 2 ;;
    --requests) REQUESTS="$2"; shift 2 ;;
    --key-types) KEY_TYPES="$2"; shift 2 ;;
    --servers) SERVERS="$2"; shift 2 ;;
    --csv) CSV="$2"; shift 2 ;;
    --open-seconds) OPEN_SECONDS="$2"; shift 2 ;;
    -h|--help) sed -n '2,31p' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

log() { printf '==> %s\n' "$*" >&2; }
WORK="$(mktemp -d /tmp/bench-peers.XXXXXX)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  [ -f "$WORK/kube/env" ] && scripts/kube-test-env.sh stop "$WORK/kube" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { # port seconds
  for _ in $(seq 1 $(( $2 * 10 ))); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}

log "building what is missing (cached under ~/.cache/citadel)"
case " $SERVERS " in *" citadel "*) cargo build --release --quiet -p citadel ;; esac
CITADEL="$ROOT/target/release/citadel"
LOAD="$(scripts/spire.sh load)"
case " $SERVERS " in *" spire "*) SPIRE="$(scripts/spire.sh ensure)" ;; esac
case " $SERVERS " in *" istiod "*) DISCOVERY="$(scripts/istio-agent.sh discovery)" ;; esac

# A root and an intermediate of key type $1 in $2 (openssl), for istiod's cacerts and SPIRE's
# upstream authority: the same shape citadel builds for itself.
make_ca() {
  local kt="$1" dir="$2"
  mkdir -p "$dir"
  local alg=(-newkey ec -pkeyopt ec_paramgen_curve:P-256)
  [ "$kt" = rsa-2048 ] && alg=(-newkey rsa:2048)
  openssl req -x509 "${alg[@]}" -nodes -keyout "$dir/root-key.pem" -out "$dir/root-cert.pem" \
    -days 3650 -subj "/O=bench/CN=bench root" \
    -addext "basicConstraints=critical,CA:true" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  openssl req "${alg[@]}" -nodes -keyout "$dir/ca-key.pem" -out "$dir/ca.csr" \
    -subj "/O=bench/CN=bench intermediate" 2>/dev/null
  printf 'basicConstraints=critical,CA:true\nkeyUsage=critical,keyCertSign,cRLSign,digitalSignature\n' >"$dir/ext"
  openssl x509 -req -in "$dir/ca.csr" -CA "$dir/root-cert.pem" -CAkey "$dir/root-key.pem" \
    -CAcreateserial -days 365 -extfile "$dir/ext" -out "$dir/ca-cert.pem" 2>/dev/null
  cat "$dir/ca-cert.pem" "$dir/root-cert.pem" >"$dir/cert-chain.pem"
  # istiod reads PKCS#8 or SEC1/PKCS#1; openssl 3 writes PKCS#8.
}

# Starts server $1 for key type $2; sets ADDR, PID, TARGET_ARGS.
start_server() {
  local server="$1" kt="$2" dir="$WORK/$1-$2-$RANDOM"
  mkdir -p "$dir"
  case "$server" in
    citadel)
      local port mport
      port="$(free_port)"; mport="$(free_port)"
      "$CITADEL" serve --dev --state-dir "$dir/state" --ca-key-type "$kt" \
        --listen "127.0.0.1:$port" --metrics-listen "127.0.0.1:$mport" 2>"$dir/log" &
      PID=$!
      wait_port "$port" 60 || { tail "$dir/log" >&2; exit 1; }
      for _ in $(seq 50); do [ -f "$dir/state/root-cert.pem" ] && break; sleep 0.1; done
      TARGET_ARGS=(-target istio -addr "127.0.0.1:$port" -root "$dir/state/root-cert.pem")
      ;;
    istiod)
      if [ ! -f "$WORK/kube/env" ]; then
        log "starting kube-apiserver + etcd for istiod (idle during the runs)"
        scripts/kube-test-env.sh start "$WORK/kube" >/dev/null
        JWKS_PORT="$(free_port)"
        (cd certs-dev && exec python3 -m http.server "$JWKS_PORT" --bind 127.0.0.1 >/dev/null 2>&1) &
        PIDS+=($!)
      fi
      make_ca "$kt" "$dir/etc/cacerts"
      local g s h m w
      g="$(free_port)"; s="$(free_port)"; h="$(free_port)"; m="$(free_port)"; w="$(free_port)"
      # istiod serves its CA port with --tlsCertFile when given: a certificate for its
      # Service name, from the same bench root.
      openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$dir/tls.key" \
        -out "$dir/tls.csr" -subj "/CN=istiod" 2>/dev/null
      printf 'subjectAltName=DNS:istiod.istio-system.svc\nextendedKeyUsage=serverAuth,clientAuth\n' >"$dir/tls.ext"
      openssl x509 -req -in "$dir/tls.csr" -CA "$dir/etc/cacerts/root-cert.pem" \
        -CAkey "$dir/etc/cacerts/root-key.pem" -CAcreateserial -days 2 -extfile "$dir/tls.ext" \
        -out "$dir/tls.crt" 2>/dev/null
      cp "$dir/etc/cacerts/root-cert.pem" "$dir/ca.crt"
      (cd "$dir" && exec env -i PATH="$PATH" POD_NAMESPACE=istio-system POD_NAME=istiod-bench \
        REVISION=default CLUSTER_ID=Kubernetes JWT_POLICY=third-party-jwt \
        INJECTION_WEBHOOK_CONFIG_NAME= VALIDATION_WEBHOOK_CONFIG_NAME= \
        JWT_RULE="{\"issuer\":\"https://citadel.dev.invalid\",\"jwks_uri\":\"http://127.0.0.1:$JWKS_PORT/jwks.json\",\"audiences\":[\"istio-ca\"]}" \
        "$DISCOVERY" discovery --kubeconfig "$WORK/kube/kubeconfig" \
          --httpAddr "127.0.0.1:$h" --httpsAddr "127.0.0.1:$w" --grpcAddr "127.0.0.1:$g" \
          --secureGRPCAddr "127.0.0.1:$s" --monitoringAddr "127.0.0.1:$m" \
          --tlsCertFile tls.crt --tlsKeyFile tls.key --caCertFile ca.crt \
          --log_output_level default:warn >"$dir/log" 2>&1) &
      PID=$!
      wait_port "$s" 120 || { tail "$dir/log" >&2; exit 1; }
      TARGET_ARGS=(-target istio -addr "127.0.0.1:$s" -root "$dir/etc/cacerts/root-cert.pem"
                   -server-name istiod.istio-system.svc)
      ;;
    spire)
      make_ca "$kt" "$dir/upstream"
      local port
      port="$(free_port)"
      cat >"$dir/server.conf" <<EOF
server {
  bind_address = "127.0.0.1"
  bind_port = "$port"
  socket_path = "$dir/api.sock"
  trust_domain = "cluster.local"
  data_dir = "$dir/data"
  log_level = "WARN"
  ca_key_type = "$kt"
  default_x509_svid_ttl = "24h"
}
plugins {
  DataStore "sql" { plugin_data { database_type = "sqlite3" connection_string = "$dir/data/datastore.sqlite3" } }
  NodeAttestor "join_token" { plugin_data {} }
  KeyManager "memory" { plugin_data {} }
  UpstreamAuthority "disk" { plugin_data { key_file_path = "$dir/upstream/root-key.pem" cert_file_path = "$dir/upstream/root-cert.pem" } }
}
EOF
      "$SPIRE" run -config "$dir/server.conf" >"$dir/log" 2>&1 &
      PID=$!
      for _ in $(seq 600); do [ -S "$dir/api.sock" ] && break; sleep 0.1; done
      [ -S "$dir/api.sock" ] || { tail "$dir/log" >&2; exit 1; }
      TARGET_ARGS=(-target spire -socket "$dir/api.sock")
      ;;
  esac
  PIDS+=("$PID")
}

stop_server() { kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; }

# One measurement: prints "cps p50 p99 cpu_us rss_kib errors".
measure() {
  local out
  out="$(GOMAXPROCS=1 "$LOAD" "${TARGET_ARGS[@]}" -key-type "$1" -server-pid "$PID" -requests "$2" "${@:3}")" \
    || { echo "peers-load failed" >&2; exit 1; }
  echo "$out" >&2
  local cps p50 p99 cpu rss errs
  cps="$(sed -n 's/^throughput (wall clock): \([0-9]*\).*/\1/p' <<<"$out")"
  p50="$(sed -n 's#^latency p50 / p99 / max: \([0-9.]*\) ms / \([0-9.]*\) ms.*#\1#p' <<<"$out")"
  p99="$(sed -n 's#^latency p50 / p99 / max: \([0-9.]*\) ms / \([0-9.]*\) ms.*#\2#p' <<<"$out")"
  cpu="$(sed -n 's/.*= \([0-9.]*\) µs per certificate.*/\1/p' <<<"$out")"
  rss="$(sed -n 's/^server peak RSS: *\([0-9]*\) KiB/\1/p' <<<"$out")"
  errs="$(sed -n 's/^succeeded: *[0-9]* (\([0-9]*\) errors.*/\1/p' <<<"$out")"
  echo "$cps $p50 $p99 $cpu $rss $errs"
}

mkdir -p "$(dirname "$CSV")"
[ -f "$CSV" ] || echo "date,host_cores,server,key_type,run,mode,cps,p50_ms,p99_ms,cpu_us_per_cert,peak_rss_kib,errors" >"$CSV"
log "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
for kt in $KEY_TYPES; do
  for server in $SERVERS; do
    for run in $(seq "$RUNS"); do
      log "$server, $kt, run $run of $RUNS"
      start_server "$server" "$kt"
      for mode in saturation 1000 5000; do
        case "$mode" in
          saturation) r="$(measure "$kt" "$REQUESTS" -concurrency 64)" ;;
          *) r="$(measure "$kt" $(( mode * OPEN_SECONDS )) -rate "$mode" -warmup 500)" ;;
        esac
        echo "$(date -u +%FT%TZ),$(nproc),$server,$kt,$run,$mode,${r// /,}" >>"$CSV"
      done
      stop_server
    done
  done
done

# The table: median of the runs, and their spread (min-max).
python3 - "$CSV" <<'EOF'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
keys = sorted({(r["key_type"], r["server"]) for r in rows})
def col(kt, s, mode, f):
    v = [float(r[f]) for r in rows if (r["key_type"], r["server"], r["mode"]) == (kt, s, mode) and r[f]]
    if not v: return "n/a"
    return f"{statistics.median(v):.1f} ({min(v):.1f}-{max(v):.1f})" if len(v) > 1 else f"{v[0]:.1f}"
print("| key type | server | µs CPU/cert (sat.) | certs/s (sat.) | p50/p99 ms @1k/s | p50/p99 ms @5k/s | peak RSS MiB |")
print("|---|---|---|---|---|---|---|")
for kt, s in keys:
    rss = [float(r["peak_rss_kib"]) / 1024 for r in rows if (r["key_type"], r["server"]) == (kt, s) and r["peak_rss_kib"]]
    print(f"| {kt} | {s} | {col(kt,s,'saturation','cpu_us_per_cert')} | {col(kt,s,'saturation','cps')} | "
          f"{col(kt,s,'1000','p50_ms')} / {col(kt,s,'1000','p99_ms')} | {col(kt,s,'5000','p50_ms')} / {col(kt,s,'5000','p99_ms')} | "
          f"{max(rss):.0f} |" if rss else "n/a |")
EOF
