//! The flags of `citadel-bench`: those of the former `citadel bench`, plus `--citadel-bin`.

use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, clap::Parser)]
#[command(
    name = "citadel-bench",
    version,
    about = "Measure citadel: CreateCertificate throughput and latency, renewal storms, the soak, the in-process issue path",
    after_long_help = "\
By default it starts `citadel serve --dev` as a child process on free loopback ports,
pre-generates distinct CSRs and RS256 dev tokens, warms up, then measures. Server CPU time
comes from /proc/<pid>/stat, so 'certificates per server CPU-second' excludes the client.
The citadel binary is the one beside citadel-bench (cargo build --release builds both into
target/release/), or --citadel-bin FILE / CITADEL_BIN.

With --rate the load is open-loop: requests leave on a fixed schedule whether or not answers
have come back, and each latency counts from when its request was due, so a stall shows up
in the percentiles instead of slowing the generator down (no coordinated omission).

--soak runs the whole lifecycle under steady load: the server gets an 8-minute intermediate
and 2-minute leaves (an intermediate rotation happens a few minutes in), and half-way through
one identity is denied with `citadel revoke --identity`; its later requests are counted as
denied, not failed. With --samples the server's RSS and open descriptors are written every
second, and a per-minute summary is printed.

--identities N is a renewal storm: N distinct workloads, each with its own service account,
token and key, ask once each within one window (--concurrency at a time), retrying what
istio-agent retries. With --auth tokenreview --kubeconfig FILE the service accounts and their
tokens (TokenRequest) are made on that API server, the server reviews each token there, and
the API server's own apiserver_request_total{resource=\"tokenreviews\"} is reported.

--revocation-scale and --index-entries time the revocation state and the issuance index at
mesh size, in process (no server). scripts/bench.sh runs every measurement in sequence.

Examples:
  cargo build --release
  target/release/citadel-bench --concurrency 64 --requests 20000
  target/release/citadel-bench --rate 3000 --duration 20s --csv sweep.csv
  target/release/citadel-bench --identities 20000 --concurrency 256
  target/release/citadel-bench --identities 20000 --auth tokenreview --kubeconfig kube/kubeconfig
  target/release/citadel-bench --revocation-scale --revoked 100000 --denied 10000
  target/release/citadel-bench --index-entries 10000000 --state-dir /tmp/index-bench
  target/release/citadel-bench --rate 5000 --duration 30s
  target/release/citadel-bench --soak --rate 500 --duration 10m --samples soak.csv
  target/release/citadel-bench --micro"
)]
/// Flags of `citadel-bench` (the same as the former `citadel bench`, plus --citadel-bin).
pub struct Args {
    /// Run the in-process micro-benchmark of the issue path instead.
    #[arg(long)]
    pub micro: bool,
    /// Concurrent in-flight requests (gRPC streams).
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// HTTP/2 connections the streams are spread over.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Requests measured, after the warm-up.
    #[arg(long, default_value_t = 20_000)]
    pub requests: usize,
    /// Requests sent before measuring.
    #[arg(long, default_value_t = 1_000)]
    pub warmup: usize,
    /// Distinct CSR and token pairs generated up front; requests cycle through them.
    #[arg(long, default_value_t = 2_000)]
    pub distinct: usize,
    /// CSR key type.
    #[arg(long, default_value = "ec-p256", value_parser = ["ec-p256", "ec-p384", "rsa-2048"])]
    pub key_type: String,
    /// Use a running server started with --dev instead of starting one.
    #[arg(long, value_name = "HOST:PORT", requires = "ca_root_cert")]
    pub ca_addr: Option<String>,
    /// Roots of that server.
    #[arg(long, value_name = "FILE")]
    pub ca_root_cert: Option<PathBuf>,
    /// PID of that server, to report its CPU time.
    #[arg(long, value_name = "PID")]
    pub server_pid: Option<u32>,
    /// TLS server name to check that server's certificate against (default: the host of
    /// --ca-addr). istiod's serving certificate names `istiod.istio-system.svc`, not an IP.
    #[arg(long, value_name = "NAME", requires = "ca_addr")]
    pub server_name: Option<String>,
    /// Measure for this long instead of a fixed number of --requests.
    #[arg(long, value_parser = citadel::duration::clap_parse, value_name = "DUR")]
    pub duration: Option<Duration>,
    /// Open loop: this many requests per second on a fixed schedule (see below), instead of
    /// --concurrency tasks each sending its next request when the last one is answered.
    #[arg(long, value_name = "PER_SEC")]
    pub rate: Option<f64>,
    /// Write the server's RSS and open file descriptors, sampled every second, to this CSV.
    #[arg(long, value_name = "FILE")]
    pub samples: Option<PathBuf>,
    /// The lifecycle soak: short-lived CA and leaves so an intermediate rotates under load,
    /// and one identity denied half-way (needs the server this command starts).
    #[arg(long, conflicts_with = "ca_addr")]
    pub soak: bool,
    /// Append one summary row (offered rate, percentiles, server CPU per certificate) to this
    /// CSV; scripts/plot-latency.py turns a sweep of rates into docs/latency-vs-load.png.
    #[arg(long, value_name = "FILE")]
    pub csv: Option<PathBuf>,
    /// Renewal storm: N distinct workloads (service account, token and key each) all asking
    /// once, within one window; reports the time to serve all N (see below).
    #[arg(long, value_name = "N", conflicts_with_all = ["ca_addr", "soak", "rate"])]
    pub identities: Option<usize>,
    /// How the storm's server checks tokens: local JWKS (dev RS256 tokens) or a TokenReview
    /// per token against the API server of --kubeconfig.
    #[arg(long, value_enum, default_value = "jwks", requires = "identities")]
    pub auth: crate::storm::StormAuth,
    /// The API server for --auth tokenreview (service accounts and tokens are made there).
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// The storm server's --kube-qps (TokenReviews per second it allows itself).
    #[arg(long, default_value_t = 2000.0, value_name = "QPS")]
    pub kube_qps: f64,
    /// The storm server's --kube-burst.
    #[arg(long, default_value_t = 2000, value_name = "N")]
    pub kube_burst: u32,
    /// Revocation at scale, in process: CRL signing time and size, signer rebuild, the denial
    /// sweep, and the issue path with and without that state (--revoked, --denied).
    #[arg(long)]
    pub revocation_scale: bool,
    /// Revoked serials for --revocation-scale.
    #[arg(long, default_value_t = 100_000, value_name = "N")]
    pub revoked: usize,
    /// Denied identities for --revocation-scale.
    #[arg(long, default_value_t = 10_000, value_name = "N")]
    pub denied: usize,
    /// Build an issuance index of N entries in --state-dir and time `revoke --identity` and
    /// the prune on it (10,000,000 entries take ~1.5 GB of disk).
    #[arg(long, value_name = "N", requires = "state_dir")]
    pub index_entries: Option<u64>,
    /// Where --index-entries builds its state directory (journal + issued.log).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// The citadel binary to start (`serve --dev`) and, for --soak, to revoke with; default:
    /// `citadel` in the directory of this executable.
    #[arg(long, env = "CITADEL_BIN", value_name = "FILE")]
    pub citadel_bin: Option<PathBuf>,
}

impl Args {
    /// The citadel binary this run starts (see `--citadel-bin`).
    pub fn citadel(&self) -> Result<PathBuf, String> {
        let exe = std::env::current_exe().ok();
        crate::measure::citadel_bin(self.citadel_bin.as_deref(), exe.as_deref())
    }
}
