//! What every driver measures with, once: percentiles, a process's CPU time, RSS and open
//! descriptors from /proc, the distinct workloads (key, CSR, token) it sends, and a
//! `citadel serve --dev` child on free loopback ports.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use citadel::client::{self, CaClient, ConnectOptions};
use citadel::identity::{ServiceAccount, TrustDomain};
use citadel::pki::{csr, KeyType};

/// A driver's failure: printed as `error: ...`, exit status 1 (as the citadel commands do).
pub type BenchResult = Result<(), String>;

/// utime + stime of a process, from /proc/<pid>/stat (USER_HZ is 100 on Linux).
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_cpu_time(&stat)
}

/// Fields 14 and 15 (utime, stime) of a /proc/<pid>/stat line, counted after the command
/// name, which is in parentheses and may itself contain spaces and parentheses.
fn parse_cpu_time(stat: &str) -> Option<Duration> {
    let after_comm = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = after_comm.split(' ').collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// Resident set size of a process in KiB (VmRSS of /proc/<pid>/status).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Open file descriptors of a process.
pub fn open_fds(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// The `p` quantile (0..=1) of sorted latencies, nearest rank; zero for none.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// `1.23 ms`.
pub fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// Microseconds below 10 ms, seconds above (the scale runs span both).
pub fn secs(d: Duration) -> String {
    if d < Duration::from_millis(10) {
        format!("{:.1} µs", d.as_secs_f64() * 1e6)
    } else {
        format!("{:.3} s", d.as_secs_f64())
    }
}

/// Runs `f` once and says how long it took.
pub fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let t0 = Instant::now();
    let out = f();
    (out, t0.elapsed())
}

/// The wall time of `run` and the CPU time the process `pid` used meanwhile (`None` where
/// there is no pid or /proc does not say): "certificates per server CPU-second" is the figure
/// every driver reports, so the two are taken around the same span.
pub async fn server_cpu<T>(
    pid: Option<u32>,
    run: impl std::future::Future<Output = T>,
) -> (T, Duration, Option<Duration>) {
    let cpu0 = pid.and_then(cpu_time);
    let t0 = Instant::now();
    let out = run.await;
    let wall = t0.elapsed();
    let cpu = match (cpu0, pid.and_then(cpu_time)) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
        _ => None,
    };
    (out, wall, cpu)
}

/// Starts the load generator: `load` runs on ONE thread of its own (a current-thread
/// runtime), so on a small machine it takes at most one core from the server it measures,
/// over `connections` HTTP/2 connections to `opts` opened before it starts.
pub fn spawn_load<T, F, Fut>(
    opts: ConnectOptions,
    connections: usize,
    load: F,
) -> std::thread::JoinHandle<Result<T, String>>
where
    T: Send + 'static,
    F: FnOnce(Vec<CaClient>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async move {
            let mut channels = Vec::with_capacity(connections);
            for _ in 0..connections {
                channels.push(client::connect(&opts).await.map_err(|e| e.to_string())?);
            }
            load(channels).await
        })
    })
}

/// One workload's request: its CSR and its bearer token.
pub struct Work {
    /// PEM CSR with the workload's SPIFFE ID.
    pub csr: String,
    /// A dev RS256 token (accepted by `serve --dev`) or one from the TokenRequest API.
    pub token: String,
}

/// The namespace of the workloads the load test, the soak and --micro send as.
pub const BENCH_NAMESPACE: &str = "bench";

/// `n` distinct workloads `<namespace>/w0..`, each with its own key, CSR and token (`tokens[i]`
/// when given, else a one-hour dev token), made on every core: an RS256 signature and an
/// RSA key take long enough that 20,000 of them on one core take minutes.
pub fn workloads(
    namespace: &str,
    n: usize,
    key_type: KeyType,
    tokens: Option<&[String]>,
) -> Result<Vec<Work>, String> {
    if tokens.is_some_and(|t| t.len() < n) {
        return Err(format!("{n} workloads need {n} tokens"));
    }
    let td = TrustDomain::new("cluster.local").map_err(|e| e.to_string())?;
    let threads = std::thread::available_parallelism().map_or(1, |p| p.get());
    let chunk = n.div_ceil(threads).max(1);
    let now = citadel::clock::system().now().unix_timestamp();
    let parts: Vec<Result<Vec<Work>, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .step_by(chunk)
            .map(|start| {
                let td = &td;
                s.spawn(move || {
                    let key = citadel::devkeys::signing_key();
                    (start..(start + chunk).min(n))
                        .map(|i| {
                            let sa = ServiceAccount::new(namespace, &format!("w{i}"))
                                .map_err(|e| e.to_string())?;
                            let token = match tokens {
                                Some(t) => t[i].clone(),
                                None => key.sign(&citadel::cmd::dev_token::claims(
                                    &sa,
                                    &["istio-ca".into()],
                                    now,
                                    Duration::from_secs(3600),
                                    None,
                                )),
                            };
                            let kp = key_type.generate().map_err(|e| e.to_string())?;
                            let csr = csr::build(&kp, &td.service_account_id(&sa).to_string())
                                .map_err(|e| e.to_string())?;
                            Ok(Work { csr, token })
                        })
                        .collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("a generator thread panicked".into()))
            })
            .collect()
    });
    let mut all = Vec::with_capacity(n);
    for p in parts {
        all.extend(p?);
    }
    Ok(all)
}

/// Reads a file the driver needs, saying which and why in the error.
pub fn read_file(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {what} {}: {e}", path.display()))
}

/// Where the `citadel` binary is: `explicit` (--citadel-bin or CITADEL_BIN) if given, else
/// `citadel` beside this executable (`cargo build --release` puts target/release/citadel next
/// to target/release/citadel-bench), so a run always measures the build it came with.
pub fn citadel_bin(explicit: Option<&Path>, exe: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(format!(
                "--citadel-bin / CITADEL_BIN {} is not a file",
                p.display()
            ))
        };
    }
    let beside = exe
        .and_then(Path::parent)
        .map(|d| d.join(format!("citadel{}", std::env::consts::EXE_SUFFIX)));
    match beside {
        Some(p) if p.is_file() => Ok(p),
        Some(p) => Err(format!(
            "there is no citadel binary at {} (build both: cargo build --release; or pass \
             --citadel-bin FILE / CITADEL_BIN)",
            p.display()
        )),
        None => Err("cannot tell where this executable is; pass --citadel-bin FILE".into()),
    }
}

/// A `citadel serve --dev` child: killed, waited for and its directory removed on drop.
pub struct Server {
    /// The child process.
    pub proc: std::process::Child,
    /// Its scratch directory: `state/` (the CA) and `server.log`.
    pub dir: PathBuf,
    /// Its CreateCertificate address, `127.0.0.1:<port>`.
    pub addr: String,
    /// Its root certificate (PEM file).
    pub root: PathBuf,
}

impl Drop for Server {
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

/// Starts `<citadel> serve --dev` with `extra` flags on free loopback ports, in a fresh
/// directory under the temp dir, and waits until it answers TCP and has written its root.
pub async fn start_server(citadel: &Path, extra: &[&str]) -> Result<Server, String> {
    // Unique per process and per call, so two drivers (or two tests) never share a CA.
    static STARTED: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "citadel-bench-{}-{}",
        std::process::id(),
        STARTED.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let (port, mport) = (free_port()?, free_port()?);
    let log = std::fs::File::create(dir.join("server.log")).map_err(|e| e.to_string())?;
    let proc = std::process::Command::new(citadel)
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
        .map_err(|e| format!("cannot start {}: {e}", citadel.display()))?;
    let mut server = Server {
        proc,
        dir: dir.clone(),
        addr: format!("127.0.0.1:{port}"),
        root: dir.join("state").join("root-cert.pem"),
    };
    for _ in 0..200 {
        if server.root.exists() && tokio::net::TcpStream::connect(&server.addr).await.is_ok() {
            return Ok(server);
        }
        if let Ok(Some(status)) = server.proc.try_wait() {
            let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
            return Err(format!("the server exited ({status}): {}", log.trim()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!(
        "the server did not start; see {}",
        dir.join("server.log").display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank_and_safe_on_nothing() {
        let lat: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&lat, 0.0), Duration::from_millis(1));
        assert_eq!(percentile(&lat, 0.5), Duration::from_millis(51));
        assert_eq!(percentile(&lat, 0.99), Duration::from_millis(99));
        assert_eq!(percentile(&lat, 1.0), Duration::from_millis(100));
        assert_eq!(percentile(&[], 0.99), Duration::ZERO);
    }

    #[test]
    fn cpu_time_counts_utime_and_stime_past_a_command_name_with_spaces() {
        // pid (comm) state ppid ... utime=14th stime=15th field.
        let stat = "42 (citadel (x) y) S 1 42 42 0 -1 4194560 100 0 0 0 250 130 0 0 20 0 3 0";
        assert_eq!(parse_cpu_time(stat), Some(Duration::from_millis(3800)));
        assert_eq!(parse_cpu_time("garbage"), None);
        assert_eq!(parse_cpu_time("1 (x)"), None);
        // This process has used some CPU, and /proc says so.
        assert!(cpu_time(std::process::id()).is_some());
        assert!(rss_kib(std::process::id()).is_some_and(|k| k > 0));
    }

    #[test]
    fn the_citadel_binary_is_the_one_beside_this_executable_unless_named() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("citadel-bench");
        let err = citadel_bin(None, Some(&exe)).unwrap_err();
        assert!(err.contains("cargo build --release") && err.contains("--citadel-bin"));
        let citadel = dir
            .path()
            .join(format!("citadel{}", std::env::consts::EXE_SUFFIX));
        std::fs::write(&citadel, b"").unwrap();
        assert_eq!(citadel_bin(None, Some(&exe)).unwrap(), citadel);
        let other = dir.path().join("elsewhere");
        assert!(citadel_bin(Some(&other), Some(&exe))
            .unwrap_err()
            .contains("not a file"));
        std::fs::write(&other, b"").unwrap();
        assert_eq!(citadel_bin(Some(&other), Some(&exe)).unwrap(), other);
        assert!(citadel_bin(None, None).is_err());
    }

    #[test]
    fn workloads_are_distinct_and_take_given_tokens() {
        let w = workloads("citadel-bench", 6, KeyType::EcP256, None).unwrap();
        let csrs: std::collections::HashSet<_> = w.iter().map(|w| &w.csr).collect();
        let tokens: std::collections::HashSet<_> = w.iter().map(|w| &w.token).collect();
        assert_eq!((csrs.len(), tokens.len()), (6, 6));
        let given: Vec<String> = (0..3).map(|i| format!("t{i}")).collect();
        let w = workloads("bench", 3, KeyType::EcP256, Some(&given)).unwrap();
        assert_eq!(
            w.iter().map(|w| w.token.as_str()).collect::<Vec<_>>(),
            ["t0", "t1", "t2"]
        );
        assert!(workloads("bench", 4, KeyType::EcP256, Some(&given)).is_err());
    }
}
