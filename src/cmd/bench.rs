//! `citadel bench`: a load generator for CreateCertificate over TLS gRPC, and an in-process
//! micro-benchmark of the issue path. Benchmarks live here, not in timed tests.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::auth::jwks::Jwks;
use crate::auth::jwt::{self, JwtPolicy};
use crate::ca::bootstrap::{self, CaOptions};
use crate::client::{self, CaClient, ConnectOptions};
use crate::devkeys;
use crate::identity::{ServiceAccount, TrustDomain};
use crate::pki::{csr, KeyType};

use super::{dev_token, read_file, CmdResult};

#[derive(Debug, clap::Args)]
#[command(after_long_help = "\
By default it starts `citadel serve --dev` as a child process on free loopback ports,
pre-generates distinct CSRs and RS256 dev tokens, warms up, then measures. Server CPU time
comes from /proc/<pid>/stat, so 'certificates per server CPU-second' excludes the client.

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
  target/release/citadel bench --concurrency 64 --requests 20000
  target/release/citadel bench --rate 3000 --duration 20s --csv sweep.csv
  target/release/citadel bench --identities 20000 --concurrency 256
  target/release/citadel bench --identities 20000 --auth tokenreview --kubeconfig kube/kubeconfig
  target/release/citadel bench --revocation-scale --revoked 100000 --denied 10000
  target/release/citadel bench --index-entries 10000000 --state-dir /tmp/index-bench
  target/release/citadel bench --rate 5000 --duration 30s
  target/release/citadel bench --soak --rate 500 --duration 10m --samples soak.csv
  target/release/citadel bench --micro")]
/// Flags of `citadel bench`.
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
    /// Measure for this long instead of a fixed number of --requests.
    #[arg(long, value_parser = crate::duration::clap_parse, value_name = "DUR")]
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
    pub auth: super::bench_storm::StormAuth,
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
}

/// The identity `--soak` denies half-way through.
const SOAK_DENIED: &str = "spiffe://cluster.local/ns/bench/sa/w7";

/// How much load, for how long.
#[derive(Debug, Clone, Copy)]
struct Plan {
    /// Stop after this many requests (closed loop without --duration).
    total: usize,
    /// Or stop when this much time has passed.
    duration: Option<Duration>,
    /// Open loop at this rate; closed loop with `concurrency` tasks when `None`.
    rate: Option<f64>,
    concurrency: usize,
}

/// What came back.
#[derive(Debug, Default)]
struct Outcome {
    latencies: Vec<Duration>,
    errors: usize,
    /// PermissionDenied answers: expected for the identity --soak denies.
    denied: usize,
    /// Open loop only: requests not sent because too many were outstanding.
    dropped: usize,
    /// The distinct intermediates that signed (the chain's second entry): two after a
    /// rotation under load.
    intermediates: std::collections::BTreeSet<String>,
}

/// Live counters the sampler reads.
#[derive(Debug, Default)]
struct Progress {
    ok: AtomicUsize,
    errors: AtomicUsize,
}

pub(crate) struct Work {
    pub(crate) csr: String,
    pub(crate) token: String,
}

fn generate(n: usize, key_type: KeyType) -> Result<Vec<Work>, String> {
    let key = devkeys::signing_key();
    let now = crate::clock::system().now().unix_timestamp();
    let td = TrustDomain::new("cluster.local").map_err(|e| e.to_string())?;
    (0..n)
        .map(|i| {
            let sa = ServiceAccount::new("bench", &format!("w{i}")).map_err(|e| e.to_string())?;
            let token = key.sign(&dev_token::claims(
                &sa,
                &["istio-ca".into()],
                now,
                Duration::from_secs(3600),
                None,
            ));
            let kp = key_type.generate().map_err(|e| e.to_string())?;
            let csr = csr::build(&kp, &td.service_account_id(&sa).to_string())
                .map_err(|e| e.to_string())?;
            Ok(Work { csr, token })
        })
        .collect()
}

/// utime + stime of a process, from /proc (USER_HZ is 100 on Linux).
pub(crate) fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_comm = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after_comm.split(' ').collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

pub(crate) fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

pub(crate) struct Child {
    pub(crate) proc: std::process::Child,
    pub(crate) dir: PathBuf,
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.proc.kill();
        let _ = self.proc.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("cannot find a free port: {e}"))
}

pub(crate) async fn start_server(extra: &[&str]) -> Result<(Child, String, PathBuf), String> {
    let dir = std::env::temp_dir().join(format!("citadel-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let (port, mport) = (free_port()?, free_port()?);
    let log = std::fs::File::create(dir.join("server.log")).map_err(|e| e.to_string())?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let proc = std::process::Command::new(exe)
        .args(["serve", "--dev", "--state-dir"])
        .arg(dir.join("state"))
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--metrics-listen",
            &format!("127.0.0.1:{mport}"),
        ])
        .args(extra)
        // Default log level: the audit line per certificate is part of the measured cost.
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("cannot start the server: {e}"))?;
    let child = Child {
        proc,
        dir: dir.clone(),
    };
    let root = dir.join("state").join("root-cert.pem");
    let addr = format!("127.0.0.1:{port}");
    for _ in 0..200 {
        if root.exists() && tokio::net::TcpStream::connect(&addr).await.is_ok() {
            return Ok((child, addr, root));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!(
        "the server did not start; see {}",
        dir.join("server.log").display()
    ))
}

/// Runs the load test (or the in-process micro benchmark) and prints the results.
pub async fn run(args: Args) -> CmdResult {
    let key_type: KeyType = args.key_type.parse()?;
    if args.micro {
        return micro(args.distinct.max(1), args.requests.max(1), key_type);
    }
    if args.revocation_scale {
        return super::bench_scale::revocation_scale(
            args.revoked,
            args.denied,
            args.requests.clamp(1, 20_000),
        );
    }
    if let (Some(n), Some(dir)) = (args.index_entries, &args.state_dir) {
        return super::bench_scale::index_scale(n, dir).await;
    }
    if let Some(n) = args.identities {
        return super::bench_storm::run(super::bench_storm::StormPlan {
            identities: n,
            concurrency: args.concurrency,
            connections: args.connections,
            key_type,
            auth: args.auth,
            kubeconfig: args.kubeconfig.clone(),
            kube_qps: args.kube_qps,
            kube_burst: args.kube_burst,
        })
        .await;
    }
    if args.concurrency == 0 || args.connections == 0 || args.requests == 0 {
        return Err("--concurrency, --connections and --requests must be positive".into());
    }
    if let Some(r) = args.rate {
        if !(r.is_finite() && r > 0.0) {
            return Err(format!(
                "--rate must be a positive number of requests per second, not {r}"
            ));
        }
    }
    if args.duration.is_some_and(|d| d.is_zero()) {
        return Err("--duration must be positive".into());
    }
    eprintln!(
        "generating {} distinct {} CSRs and RS256 tokens...",
        args.distinct, key_type
    );
    let work = Arc::new(generate(args.distinct.max(1), key_type)?);

    // Soak: leaves live 2 minutes and the intermediate 8, so its successor is made at 4
    // minutes and signs from 6m40s, all under load.
    let soak_flags: &[&str] = if args.soak {
        &[
            "--intermediate-ttl",
            "8m",
            "--max-ttl",
            "2m",
            "--default-ttl",
            "2m",
        ]
    } else {
        &[]
    };
    let (child, addr, root, pid) = match &args.ca_addr {
        Some(a) => (
            None,
            a.clone(),
            args.ca_root_cert.clone().unwrap_or_default(),
            args.server_pid,
        ),
        None => {
            let (c, a, r) = start_server(soak_flags).await?;
            let pid = c.proc.id();
            (Some(c), a, r, Some(pid))
        }
    };
    let root_pem = read_file(&root, "CA root certificate")?;
    let plan = Plan {
        total: args.requests,
        duration: args.duration,
        rate: args.rate,
        concurrency: args.concurrency,
    };
    let progress = Arc::new(Progress::default());
    let stop_sampling = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = match (&args.samples, pid) {
        (Some(path), Some(pid)) => Some(spawn_sampler(
            path.clone(),
            pid,
            progress.clone(),
            stop_sampling.clone(),
        )?),
        (Some(_), None) => return Err("--samples needs the server's pid (--server-pid)".into()),
        _ => None,
    };
    // Half-way through a soak, an operator denies one identity.
    let revoker = match (&child, args.soak) {
        (Some(c), true) => {
            let state = c.dir.join("state");
            let after = args.duration.unwrap_or(Duration::from_secs(60)) / 2;
            Some(std::thread::spawn(move || -> Result<(), String> {
                std::thread::sleep(after);
                let exe = std::env::current_exe().map_err(|e| e.to_string())?;
                let out = std::process::Command::new(exe)
                    .args(["revoke", "--identity", SOAK_DENIED, "--state-dir"])
                    .arg(&state)
                    .output()
                    .map_err(|e| e.to_string())?;
                eprintln!(
                    "soak: denied {SOAK_DENIED} at {after:?}: {}",
                    String::from_utf8_lossy(&out.stdout).trim()
                );
                out.status
                    .success()
                    .then_some(())
                    .ok_or_else(|| String::from_utf8_lossy(&out.stderr).into_owned())
            }))
        }
        _ => None,
    };
    // The load generator runs on ONE thread (a current-thread runtime), so on a small machine
    // it takes at most one core from the server it measures.
    let (opts, conns, warmup) = (
        ConnectOptions {
            addr: addr.clone(),
            root_pem,
            ..Default::default()
        },
        args.connections,
        args.warmup,
    );
    let load_progress = progress.clone();
    let load = std::thread::spawn(move || -> Result<_, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async move {
            let mut channels = Vec::new();
            for _ in 0..conns {
                channels.push(client::connect(&opts).await.map_err(|e| e.to_string())?);
            }
            // Check one response end to end before trusting the numbers.
            let first = client::create_certificate(
                &mut channels[0].clone(),
                work[0].csr.clone(),
                Some(&work[0].token),
                0,
            )
            .await
            .map_err(|e| e.to_string())?;
            client::verify_response(&first, None, crate::clock::system().now())
                .map_err(|e| e.to_string())?;
            let warm = Plan {
                total: warmup,
                duration: None,
                rate: None,
                ..plan
            };
            drive(&channels, &work, warm, &Arc::new(Progress::default())).await;
            let cpu0 = pid.and_then(cpu_time);
            let t0 = Instant::now();
            let outcome = drive(&channels, &work, plan, &load_progress).await;
            let wall = t0.elapsed();
            let cpu = match (cpu0, pid.and_then(cpu_time)) {
                (Some(a), Some(b)) => Some(b - a),
                _ => None,
            };
            Ok((outcome, wall, cpu))
        })
    });
    let joined = load.join();
    stop_sampling.store(true, Ordering::Relaxed);
    let samples = sampler.map(|h| h.join().unwrap_or_default());
    let (mut outcome, wall, cpu) =
        joined.map_err(|_| "the load generator panicked".to_string())??;
    if let Some(r) = revoker {
        r.join()
            .map_err(|_| "the revoking thread panicked".to_string())?
            .map_err(|e| format!("soak: the revocation failed: {e}"))?;
    }
    drop(child);
    outcome.latencies.sort_unstable();
    let lat = &outcome.latencies;
    let ok = lat.len();
    let mode = match args.rate {
        Some(r) => format!("open loop at {r:.0}/s"),
        None => format!("{} streams", args.concurrency),
    };
    println!(
        "citadel bench: {} requests over TLS gRPC, {mode} on {} connections, {} CSRs, RS256 tokens",
        ok + outcome.errors + outcome.denied + outcome.dropped,
        args.connections,
        key_type
    );
    println!(
        "succeeded:               {ok} ({} errors, {} denied, {} dropped)",
        outcome.errors, outcome.denied, outcome.dropped
    );
    println!("intermediates that signed: {}", outcome.intermediates.len());
    println!(
        "throughput (wall clock): {:.0} certificates/s over {:.1} s",
        ok as f64 / wall.as_secs_f64(),
        wall.as_secs_f64()
    );
    println!(
        "latency p50 / p99 / max: {} / {} / {}",
        ms(percentile(lat, 0.50)),
        ms(percentile(lat, 0.99)),
        ms(lat.last().copied().unwrap_or_default())
    );
    match cpu {
        Some(cpu) if ok > 0 => println!(
            "server CPU:              {:.2} s = {:.1} µs per certificate = {:.0} certificates per server CPU-second",
            cpu.as_secs_f64(),
            cpu.as_secs_f64() * 1e6 / ok as f64,
            ok as f64 / cpu.as_secs_f64().max(1e-9)
        ),
        _ => println!("server CPU:              unknown (pass --server-pid)"),
    }
    if let Some(samples) = samples {
        print_samples(&samples);
    }
    if let Some(path) = &args.csv {
        append_csv(path, &args, &outcome, wall, cpu)?;
    }
    // Denials are expected only for the identity a soak denies.
    let unexpected_denials = if args.soak { 0 } else { outcome.denied };
    if outcome.errors + unexpected_denials + outcome.dropped > 0 {
        return Err(format!(
            "{} requests failed, {} were dropped",
            outcome.errors + unexpected_denials,
            outcome.dropped
        ));
    }
    Ok(())
}

/// The header of `--csv`; one row per run.
const CSV_HEADER: &str = "mode,offered_per_sec,concurrency,connections,key_type,succeeded,errors,dropped,wall_s,throughput_per_sec,p50_ms,p90_ms,p99_ms,p999_ms,max_ms,server_cpu_us_per_cert";

/// Appends this run's summary to `path` (writing the header first if the file is new).
fn append_csv(
    path: &std::path::Path,
    args: &Args,
    o: &Outcome,
    wall: Duration,
    cpu: Option<Duration>,
) -> Result<(), String> {
    use std::io::Write;
    let new = !path.exists();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    let lat = &o.latencies;
    let msf = |d: Duration| format!("{:.3}", d.as_secs_f64() * 1e3);
    let row = format!(
        "{},{},{},{},{},{},{},{},{:.3},{:.1},{},{},{},{},{},{}",
        if args.rate.is_some() {
            "open"
        } else {
            "closed"
        },
        args.rate.map(|r| format!("{r:.0}")).unwrap_or_default(),
        args.concurrency,
        args.connections,
        args.key_type,
        lat.len(),
        o.errors + o.denied,
        o.dropped,
        wall.as_secs_f64(),
        lat.len() as f64 / wall.as_secs_f64().max(1e-9),
        msf(percentile(lat, 0.50)),
        msf(percentile(lat, 0.90)),
        msf(percentile(lat, 0.99)),
        msf(percentile(lat, 0.999)),
        msf(lat.last().copied().unwrap_or_default()),
        cpu.filter(|_| !lat.is_empty())
            .map(|c| format!("{:.1}", c.as_secs_f64() * 1e6 / lat.len() as f64))
            .unwrap_or_default(),
    );
    let text = if new {
        format!("{CSV_HEADER}\n{row}\n")
    } else {
        format!("{row}\n")
    };
    f.write_all(text.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// One sample of the server process.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    secs: u64,
    rss_kib: u64,
    fds: usize,
}

pub(crate) fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn open_fds(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// Samples the server every second into `path` (CSV) until `stop`.
fn spawn_sampler(
    path: PathBuf,
    pid: u32,
    progress: Arc<Progress>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Result<std::thread::JoinHandle<Vec<Sample>>, String> {
    use std::io::Write;
    let mut out = std::fs::File::create(&path)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(std::thread::spawn(move || {
        let _ = writeln!(out, "seconds,rss_kib,open_fds,certificates,errors");
        let (t0, mut all) = (Instant::now(), Vec::new());
        let mut next = t0;
        while !stop.load(Ordering::Relaxed) {
            let s = Sample {
                secs: t0.elapsed().as_secs(),
                rss_kib: rss_kib(pid).unwrap_or(0),
                fds: open_fds(pid).unwrap_or(0),
            };
            let _ = writeln!(
                out,
                "{},{},{},{},{}",
                s.secs,
                s.rss_kib,
                s.fds,
                progress.ok.load(Ordering::Relaxed),
                progress.errors.load(Ordering::Relaxed)
            );
            all.push(s);
            next += Duration::from_secs(1);
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
        all
    }))
}

/// Per-minute RSS and descriptors, and the drift after the first minute.
fn print_samples(samples: &[Sample]) {
    if samples.is_empty() {
        return;
    }
    println!("server memory and descriptors, per minute (last sample of each):");
    println!("  minute   RSS MiB   open fds");
    let mut minutes: Vec<Sample> = Vec::new();
    for s in samples {
        match minutes.last_mut() {
            Some(m) if m.secs / 60 == s.secs / 60 => *m = *s,
            _ => minutes.push(*s),
        }
    }
    for m in &minutes {
        println!(
            "  {:>6}   {:>7.1}   {:>8}",
            m.secs / 60 + 1,
            m.rss_kib as f64 / 1024.0,
            m.fds
        );
    }
    if minutes.len() >= 2 {
        let (a, b) = (minutes[0], minutes[minutes.len() - 1]);
        println!(
            "drift from minute 1 to minute {}: RSS {:+.1} MiB ({:+.1}%), open fds {:+}",
            minutes.len(),
            (b.rss_kib as f64 - a.rss_kib as f64) / 1024.0,
            (b.rss_kib as f64 / a.rss_kib.max(1) as f64 - 1.0) * 100.0,
            b.fds as i64 - a.fds as i64
        );
    }
}

/// Sends one request; records its latency from `due` (when it should have left).
async fn one(ch: &mut CaClient, w: &Work, due: Instant, out: &mut Outcome, progress: &Progress) {
    match client::create_certificate(ch, w.csr.clone(), Some(&w.token), 0).await {
        Ok(chain) => {
            out.latencies.push(due.elapsed());
            if let Some(i) = chain.get(1) {
                if !out.intermediates.contains(i) {
                    out.intermediates.insert(i.clone());
                }
            }
            progress.ok.fetch_add(1, Ordering::Relaxed);
        }
        Err(client::ClientError::Rpc {
            code: tonic::Code::PermissionDenied,
            ..
        }) => out.denied += 1,
        Err(e) => {
            if out.errors == 0 {
                eprintln!("request failed: {e}");
            }
            out.errors += 1;
            progress.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Runs `plan`: closed loop (`concurrency` tasks, each sending its next request when the
/// last is answered) or open loop (requests leave on a schedule).
async fn drive(
    channels: &[CaClient],
    work: &Arc<Vec<Work>>,
    plan: Plan,
    progress: &Arc<Progress>,
) -> Outcome {
    let until = plan.duration.map(|d| Instant::now() + d);
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    let mut dropped = 0;
    match plan.rate {
        None => {
            for t in 0..plan.concurrency {
                let mut ch = channels[t % channels.len()].clone();
                let (next, work, progress) = (next.clone(), work.clone(), progress.clone());
                tasks.push(tokio::spawn(async move {
                    let mut out = Outcome::default();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let done = match until {
                            Some(u) => Instant::now() >= u,
                            None => i >= plan.total,
                        };
                        if done {
                            break;
                        }
                        one(
                            &mut ch,
                            &work[i % work.len()],
                            Instant::now(),
                            &mut out,
                            &progress,
                        )
                        .await;
                    }
                    out
                }));
            }
        }
        Some(rate) => {
            // At most this many requests outstanding; beyond it the server has fallen so far
            // behind that the run is reported as failed (dropped), not silently slowed.
            const MAX_OUTSTANDING: usize = 50_000;
            let outstanding = Arc::new(AtomicUsize::new(0));
            // Results are folded in as they arrive: a 10-minute run keeps no handle per request.
            let shared = Arc::new(std::sync::Mutex::new(Outcome::default()));
            let finished = Arc::new(tokio::sync::Notify::new());
            let t0 = Instant::now();
            for i in 0.. {
                let due = t0 + Duration::from_secs_f64(i as f64 / rate);
                let done = match until {
                    Some(u) => due >= u,
                    None => i >= plan.total,
                };
                if done {
                    break;
                }
                tokio::time::sleep_until(due.into()).await;
                if outstanding.load(Ordering::Relaxed) >= MAX_OUTSTANDING {
                    dropped += 1;
                    continue;
                }
                outstanding.fetch_add(1, Ordering::Relaxed);
                let mut ch = channels[i % channels.len()].clone();
                let (work, progress, outstanding, shared, finished) = (
                    work.clone(),
                    progress.clone(),
                    outstanding.clone(),
                    shared.clone(),
                    finished.clone(),
                );
                tokio::spawn(async move {
                    let mut out = Outcome::default();
                    one(&mut ch, &work[i % work.len()], due, &mut out, &progress).await;
                    let mut all = shared.lock().unwrap_or_else(|p| p.into_inner());
                    all.latencies.extend(out.latencies);
                    all.errors += out.errors;
                    all.denied += out.denied;
                    all.intermediates.extend(out.intermediates);
                    drop(all);
                    if outstanding.fetch_sub(1, Ordering::Relaxed) == 1 {
                        finished.notify_one();
                    }
                });
            }
            while outstanding.load(Ordering::Relaxed) > 0 {
                let _ = tokio::time::timeout(Duration::from_millis(100), finished.notified()).await;
            }
            let mut all = std::mem::take(&mut *shared.lock().unwrap_or_else(|p| p.into_inner()));
            all.dropped = dropped;
            return all;
        }
    }
    let mut all = Outcome {
        dropped,
        ..Outcome::default()
    };
    for t in tasks {
        if let Ok(o) = t.await {
            all.latencies.extend(o.latencies);
            all.errors += o.errors;
            all.denied += o.denied;
            all.intermediates.extend(o.intermediates);
        }
    }
    all
}

/// Times each stage of the issue path in this process, on one core.
fn micro(distinct: usize, iterations: usize, key_type: KeyType) -> CmdResult {
    let td = TrustDomain::new("cluster.local").map_err(|e| e.to_string())?;
    let now = crate::clock::system().now();
    let journal =
        bootstrap::new_journal(&CaOptions::new(td.clone()), now).map_err(|e| e.to_string())?;
    let signer = bootstrap::signer_from_journal(&journal, &td).map_err(|e| e.to_string())?;
    let keys = Jwks::from_json(devkeys::jwks_json().as_bytes()).map_err(|e| e.to_string())?;
    let policy = JwtPolicy {
        issuer: Some(devkeys::DEV_ISSUER.into()),
        audiences: vec!["istio-ca".into()],
        leeway: jwt::DEFAULT_LEEWAY,
    };
    eprintln!("generating {distinct} distinct {key_type} CSRs and RS256 tokens...");
    let work = generate(distinct, key_type)?;
    let ts = now.unix_timestamp();
    let parsed: Vec<_> = work
        .iter()
        .map(|w| csr::parse_pem(w.csr.as_bytes()))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let ttl = Duration::from_secs(86_400);

    let time_it = |name: &str, f: &mut dyn FnMut(usize)| {
        let t0 = Instant::now();
        for i in 0..iterations {
            f(i);
        }
        let per = t0.elapsed() / iterations as u32;
        println!(
            "{name:<42} {:>8.1} µs/op {:>10.0} ops/s",
            per.as_secs_f64() * 1e6,
            1.0 / per.as_secs_f64()
        );
    };
    println!("citadel bench --micro: {iterations} iterations per stage, {key_type} CSRs, RS256 tokens, {} CA", signer.key_kind());
    time_it("JWT verify (RS256, claims)", &mut |i| {
        jwt::verify(&work[i % distinct].token, &keys, &policy, ts).expect("token verifies");
    });
    time_it("CSR parse + self-signature verify", &mut |i| {
        csr::parse_pem(work[i % distinct].csr.as_bytes()).expect("CSR verifies");
    });
    time_it("sign leaf + PEM encode", &mut |i| {
        let c = &parsed[i % distinct];
        let sa = ServiceAccount::new("bench", &format!("w{}", i % distinct)).expect("name");
        signer
            .issue_workload(&c.key, &td.service_account_id(&sa), now, ttl)
            .expect("signs");
    });
    time_it("whole issue path (all of the above + chain)", &mut |i| {
        let w = &work[i % distinct];
        let id = jwt::verify(&w.token, &keys, &policy, ts).expect("token verifies");
        let c = csr::parse_pem(w.csr.as_bytes()).expect("CSR verifies");
        let issued = signer
            .issue_workload(
                &c.key,
                &td.service_account_id(&id.service_account),
                now,
                ttl,
            )
            .expect("signs");
        std::hint::black_box(signer.response_chain(issued.pem));
    });
    Ok(())
}
