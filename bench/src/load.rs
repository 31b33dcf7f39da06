//! CreateCertificate over TLS gRPC against a `citadel serve --dev` child (or a running
//! server): closed loop (`--concurrency` streams) or open loop (`--rate`, no coordinated
//! omission), and the lifecycle soak (`--soak`: rotation under load, a denial half-way,
//! RSS and descriptors sampled).

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use citadel::client::{self, CaClient, ConnectOptions};
use citadel::pki::KeyType;

use crate::args::Args;
use crate::measure::{
    ms, open_fds, percentile, read_file, rss_kib, server_cpu, spawn_load, start_server, workloads,
    BenchResult, Work, BENCH_NAMESPACE,
};

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

/// Runs the load test (or the soak) and prints the results.
pub async fn run(args: &Args, key_type: KeyType) -> BenchResult {
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
    let work = Arc::new(workloads(
        BENCH_NAMESPACE,
        args.distinct.max(1),
        key_type,
        None,
    )?);

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
    // With no --ca-addr this starts the server, and the citadel binary it runs is also the
    // one --soak revokes with.
    let (child, addr, root, pid, citadel) = match &args.ca_addr {
        Some(a) => (
            None,
            a.clone(),
            args.ca_root_cert.clone().unwrap_or_default(),
            args.server_pid,
            None,
        ),
        None => {
            let bin = args.citadel()?;
            let s = start_server(&bin, soak_flags).await?;
            let (a, r, pid) = (s.addr.clone(), s.root.clone(), s.proc.id());
            (Some(s), a, r, Some(pid), Some(bin))
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
    let revoker = match (&child, &citadel, args.soak) {
        (Some(c), Some(bin), true) => {
            let (state, bin) = (c.dir.join("state"), bin.clone());
            let after = args.duration.unwrap_or(Duration::from_secs(60)) / 2;
            Some(std::thread::spawn(move || -> Result<(), String> {
                std::thread::sleep(after);
                let out = std::process::Command::new(bin)
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
    let opts = ConnectOptions {
        addr: addr.clone(),
        root_pem,
        server_name: args.server_name.clone(),
        ..Default::default()
    };
    let warmup = args.warmup;
    let load_progress = progress.clone();
    let load = spawn_load(opts, args.connections, move |channels| async move {
        // Check one response end to end before trusting the numbers.
        let first = client::create_certificate(
            &mut channels[0].clone(),
            work[0].csr.clone(),
            Some(&work[0].token),
            0,
        )
        .await
        .map_err(|e| e.to_string())?;
        client::verify_response(&first, None, citadel::clock::system().now())
            .map_err(|e| e.to_string())?;
        let warm = Plan {
            total: warmup,
            duration: None,
            rate: None,
            ..plan
        };
        drive(&channels, &work, warm, &Arc::new(Progress::default())).await;
        Ok(server_cpu(pid, drive(&channels, &work, plan, &load_progress)).await)
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
        "citadel-bench: {} requests over TLS gRPC, {mode} on {} connections, {} CSRs, RS256 tokens",
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
        append_csv(path, args, &outcome, wall, cpu)?;
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
