#![forbid(unsafe_code)]
//! `citadel-bench` as scripts/bench.sh runs it: the real binary, finding the real `citadel`
//! beside itself and driving a `citadel serve --dev` child, at a size that proves the wiring
//! (not a measurement: nothing here asserts a time).
//!
//! `cargo test` at the workspace root builds target/debug/citadel in the same run (the
//! citadel package's integration tests need it), so it is beside target/debug/citadel-bench.

use std::path::{Path, PathBuf};
use std::process::Command;

const BENCH: &str = env!("CARGO_BIN_EXE_citadel-bench");

/// The citadel binary this build made, beside citadel-bench.
fn citadel() -> PathBuf {
    let p = Path::new(BENCH).with_file_name(format!("citadel{}", std::env::consts::EXE_SUFFIX));
    assert!(
        p.is_file(),
        "{} is missing: run `cargo test` at the workspace root (or `cargo build --bin citadel`)",
        p.display()
    );
    p
}

/// `citadel-bench ARGS` (with CITADEL_BIN unset): exit code, stdout, stderr.
fn bench(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BENCH)
        .args(args)
        .env_remove("CITADEL_BIN")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn closed_and_open_loop_runs_serve_every_request_of_the_citadel_beside_it() {
    citadel();
    let (code, out, err) = bench(&[
        "--concurrency",
        "2",
        "--connections",
        "1",
        "--requests",
        "20",
        "--warmup",
        "2",
        "--distinct",
        "4",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("succeeded:               20 (0 errors, 0 denied, 0 dropped)"),
        "{out}"
    );
    // CPU time of the child it started, read from /proc.
    assert!(out.contains("µs per certificate"), "{out}");
    let (code, out, err) = bench(&[
        "--rate",
        "200",
        "--requests",
        "20",
        "--warmup",
        "0",
        "--distinct",
        "4",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("open loop at 200/s"), "{out}");
    assert!(
        out.contains("succeeded:               20 (0 errors"),
        "{out}"
    );
}

#[test]
fn a_small_storm_serves_every_workload_once() {
    citadel();
    let (code, out, err) = bench(&[
        "--identities",
        "6",
        "--concurrency",
        "3",
        "--connections",
        "1",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("served:                  6 of 6"), "{out}");
    assert!(out.contains("0 for good; 0 retryable"), "{out}");
}

#[test]
fn a_named_citadel_binary_is_used_and_a_missing_one_is_an_error() {
    let out = Command::new(BENCH)
        .args(["--requests", "1", "--warmup", "0", "--distinct", "1"])
        .env("CITADEL_BIN", "/nonexistent/citadel")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("CITADEL_BIN /nonexistent/citadel is not a file"),
        "{err}"
    );
    let out = Command::new(BENCH)
        .args(["--requests", "1", "--warmup", "0", "--distinct", "1"])
        .env("CITADEL_BIN", citadel())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
