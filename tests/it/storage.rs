//! Storage faults on a REAL small filesystem: the state directory on a size-limited tmpfs
//! (mounting needs root; under CI=true not being able to is a failure, not a skip).
//!
//! Filled to ENOSPC, then made read-only, while a rotation and a revocation are due: each step
//! fails cleanly and is retried, signing continues with the current CA (the issuance index
//! has its reserve), nothing is half-written, and everything completes by itself once the
//! space (or write access) is back.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use citadel::clock::ManualClock;
use citadel::pki::{chain, pem, KeyType};
use citadel::store::{file::FileStore, Store};

use crate::support::*;

/// A tmpfs mounted for one test, unmounted on drop.
struct Tmpfs {
    dir: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Self> {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("fs");
        std::fs::create_dir(&dir).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(&dir)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Self { dir, _tmp: tmp }),
            other => {
                let why = format!("{other:?}");
                assert!(
                    std::env::var("CI").as_deref() != Ok("true"),
                    "storage fault tests need to mount a tmpfs (run as root): {why}"
                );
                eprintln!("SKIPPED: cannot mount a tmpfs here: {why}");
                None
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-R")
            .arg("-l")
            .arg(&self.dir)
            .status();
    }
}

fn sh(args: &[&str]) {
    let st = Command::new(args[0]).args(&args[1..]).status().unwrap();
    assert!(st.success(), "{args:?}");
}

/// Writes a filler file until the filesystem refuses another byte.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![0u8; 4096];
    while f.write_all(&chunk).is_ok() {}
    while f.write_all(&chunk[..1]).is_ok() {}
    path
}

fn serial(pem_text: &str) -> String {
    chain::describe(&pem::parse_certs(pem_text.as_bytes()).unwrap()[0])
        .unwrap()
        .serial_hex
}

/// Names of leftover temporary files in `dir`.
fn temp_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.contains(".tmp."))
        .collect()
}

#[tokio::test]
async fn a_full_or_read_only_state_dir_fails_steps_cleanly_keeps_signing_and_recovers() {
    let Some(fs) = Tmpfs::mount("8m") else {
        return;
    };
    const DAY: i64 = 86_400;
    let clock = Arc::new(ManualClock::new(time::OffsetDateTime::now_utc()));
    let ca = TestCa::try_start_with(
        &fs.dir,
        &[
            "--plaintext",
            "--intermediate-ttl",
            "30d",
            "--max-ttl",
            "1d",
            "--reconcile-interval",
            "100ms",
        ],
        "127.0.0.1:0".parse().unwrap(),
        clock.clone(),
    )
    .await
    .expect("server starts");
    let state = ca.state_dir();
    let journal_path = state.join(citadel::store::file::JOURNAL_FILE);
    let store = FileStore::open(&state).unwrap();
    let id = spiffe("shop", "cart");
    let (_, csr) = csr_for(KeyType::EcP256, &id);
    let mut client = ca.client().await;
    let mut issue_now = async || {
        let chain = call(
            &mut client,
            &csr,
            Some(&bearer(&token_at(&*clock, "shop", "cart"))),
            0,
            None,
        )
        .await
        .expect("the CA keeps signing");
        (serial(&chain[0]), serial(&chain[1]))
    };
    let (victim, first_intermediate) = issue_now().await;

    // 1. The disk fills up.
    let filler = fill(&fs.dir);
    let before = std::fs::read(&journal_path).unwrap();
    for _ in 0..50 {
        let (_, inter) = issue_now().await;
        assert_eq!(inter, first_intermediate);
    }
    // A revocation cannot be journaled: the command says so, naming the file and the cause.
    let (ok, out) = cli(&["revoke", "--serial", &victim], &state);
    assert!(!ok, "{out}");
    assert!(
        out.contains("No space left on device") && out.contains(JOURNAL_NAME),
        "{out}"
    );
    // The intermediate is due for rotation: the step fails and is retried, nothing is written.
    let failed = step_failures(&ca).await;
    clock.advance(time::Duration::seconds(25 * DAY));
    eventually(
        "the scheduler to try (and fail) three times",
        10,
        async || step_failures(&ca).await >= failed + 3,
    )
    .await;
    let (_, inter) = issue_now().await;
    assert_eq!(
        inter, first_intermediate,
        "still signing with the current CA"
    );
    assert_eq!(
        std::fs::read(&journal_path).unwrap(),
        before,
        "journal untouched"
    );
    assert_eq!(
        temp_files(&state),
        Vec::<String>::new(),
        "no half-written file left"
    );

    // 2. Space returns: the rotation completes by itself, and the revocation goes through.
    std::fs::remove_file(&filler).unwrap();
    eventually(
        "the intermediate rotation after space returned",
        15,
        async || issue_now().await.1 != first_intermediate,
    )
    .await;
    citadel_ok(&["revoke", "--serial", &victim], &state);
    eventually("the revocation journaled", 5, async || {
        let j = store.load_journal().await.unwrap().unwrap().value;
        j.is_revoked(&victim).is_some()
    })
    .await;
    let (_, second_intermediate) = issue_now().await;

    // 3. The state directory turns read-only (a bind mount over it, as a remount would be).
    let s = state.to_str().unwrap();
    sh(&["mount", "--bind", s, s]);
    sh(&["mount", "-o", "remount,bind,ro", s]);
    let before = std::fs::read(&journal_path).unwrap();
    let (ok, out) = cli(
        &[
            "revoke",
            "--identity",
            "spiffe://cluster.local/ns/shop/sa/other",
        ],
        &state,
    );
    assert!(!ok, "{out}");
    assert!(out.contains("Read-only file system"), "{out}");
    let failed = step_failures(&ca).await;
    clock.advance(time::Duration::seconds(25 * DAY));
    eventually(
        "the scheduler to try (and fail) three times",
        10,
        async || step_failures(&ca).await >= failed + 3,
    )
    .await;
    let (_, inter) = issue_now().await;
    assert_eq!(
        inter, second_intermediate,
        "still signing with the current CA"
    );
    assert_eq!(
        std::fs::read(&journal_path).unwrap(),
        before,
        "journal untouched"
    );
    sh(&["umount", s]);
    eventually("the rotation after write access returned", 15, async || {
        issue_now().await.1 != second_intermediate
    })
    .await;
    assert_eq!(temp_files(&state), Vec::<String>::new());

    // Every certificate handed out is in the index, each on a whole line.
    let index = std::fs::read_to_string(state.join("issued.log")).unwrap();
    assert!(
        index.lines().count() >= 54,
        "{} lines",
        index.lines().count()
    );
    for line in index.lines() {
        assert_eq!(line.split(' ').count(), 4, "a torn index line: {line:?}");
    }
    ca.stop().await;
}

/// `citadel_ca_step_failures_total` from the server's metrics.
async fn step_failures(ca: &TestCa) -> u64 {
    let (_, m) = http_get(ca.metrics_addr, "/metrics").await.unwrap();
    m.lines()
        .find_map(|l| l.strip_prefix("citadel_ca_step_failures_total "))
        .expect("the metric is exported")
        .parse()
        .unwrap()
}

const JOURNAL_NAME: &str = citadel::store::file::JOURNAL_FILE;
