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

Examples:
  cargo build --release
  target/release/citadel bench --concurrency 64 --requests 20000
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
}

struct Work {
    csr: String,
    token: String,
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
fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_comm = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after_comm.split(' ').collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

struct Child {
    proc: std::process::Child,
    dir: PathBuf,
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

async fn start_server() -> Result<(Child, String, PathBuf), String> {
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
    if args.concurrency == 0 || args.connections == 0 || args.requests == 0 {
        return Err("--concurrency, --connections and --requests must be positive".into());
    }
    eprintln!(
        "generating {} distinct {} CSRs and RS256 tokens...",
        args.distinct, key_type
    );
    let work = Arc::new(generate(args.distinct.max(1), key_type)?);

    let (_child, addr, root, pid) = match &args.ca_addr {
        Some(a) => (
            None,
            a.clone(),
            args.ca_root_cert.clone().unwrap_or_default(),
            args.server_pid,
        ),
        None => {
            let (c, a, r) = start_server().await?;
            let pid = c.proc.id();
            (Some(c), a, r, Some(pid))
        }
    };
    let root_pem = read_file(&root, "CA root certificate")?;
    // The load generator runs on ONE thread (a current-thread runtime), so on a small machine
    // it takes at most one core from the server it measures.
    let (opts, conns, warmup, requests, concurrency) = (
        ConnectOptions {
            addr: addr.clone(),
            root_pem,
            ..Default::default()
        },
        args.connections,
        args.warmup,
        args.requests,
        args.concurrency,
    );
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
            drive(&channels, &work, warmup, concurrency).await;
            let cpu0 = pid.and_then(cpu_time);
            let t0 = Instant::now();
            let (lat, errors) = drive(&channels, &work, requests, concurrency).await;
            let wall = t0.elapsed();
            let cpu = match (cpu0, pid.and_then(cpu_time)) {
                (Some(a), Some(b)) => Some(b - a),
                _ => None,
            };
            Ok((lat, errors, wall, cpu))
        })
    });
    let (mut lat, errors, wall, cpu) = load
        .join()
        .map_err(|_| "the load generator panicked".to_string())??;
    lat.sort_unstable();
    let ok = lat.len();
    println!(
        "citadel bench: {} requests over TLS gRPC, {} streams on {} connections, {} CSRs, RS256 tokens",
        args.requests, args.concurrency, args.connections, key_type
    );
    println!("succeeded:               {ok} ({errors} errors)");
    println!(
        "throughput (wall clock): {:.0} certificates/s",
        ok as f64 / wall.as_secs_f64()
    );
    println!(
        "latency p50 / p99 / max: {} / {} / {}",
        ms(percentile(&lat, 0.50)),
        ms(percentile(&lat, 0.99)),
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
    if errors > 0 {
        return Err(format!("{errors} requests failed"));
    }
    Ok(())
}

/// Sends `total` requests with `concurrency` tasks; returns latencies of successes and the
/// error count.
async fn drive(
    channels: &[CaClient],
    work: &Arc<Vec<Work>>,
    total: usize,
    concurrency: usize,
) -> (Vec<Duration>, usize) {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for t in 0..concurrency {
        let mut ch = channels[t % channels.len()].clone();
        let (next, work) = (next.clone(), work.clone());
        tasks.push(tokio::spawn(async move {
            let (mut lat, mut errs) = (Vec::new(), 0usize);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let w = &work[i % work.len()];
                let t0 = Instant::now();
                match client::create_certificate(&mut ch, w.csr.clone(), Some(&w.token), 0).await {
                    Ok(_) => lat.push(t0.elapsed()),
                    Err(e) => {
                        if errs == 0 {
                            eprintln!("request failed: {e}");
                        }
                        errs += 1;
                    }
                }
            }
            (lat, errs)
        }));
    }
    let (mut all, mut errors) = (Vec::with_capacity(total), 0);
    for t in tasks {
        if let Ok((l, e)) = t.await {
            all.extend(l);
            errors += e;
        }
    }
    (all, errors)
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
