//! `citadel-bench --revocation-scale` and `citadel-bench --index-entries N`: what revocation
//! state and the issuance index cost at the size a large mesh reaches. Nothing here talks to
//! a server; each figure is the time of the library call the server or the CLI makes.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use citadel::ca::bootstrap::{self, CaOptions};
use citadel::ca::{crl, revocation, Ca};
use citadel::identity::{ServiceAccount, TrustDomain};
use citadel::journal::{DeniedIdentity, Journal, Revocation};
use citadel::pki::{csr, random_serial, KeyType};
use citadel::store::index::{FileIndex, IssuanceIndex, IssuedEntry, INDEX_FILE};
use citadel::store::Store;

use crate::measure::{secs, timed, BenchResult};

/// A journal whose active intermediate has `revoked` revocations, and `denied` identities
/// denied (`w0`..), all under trust domain cluster.local.
fn big_journal(revoked: usize, denied: usize) -> Result<(Journal, TrustDomain, String), String> {
    let td = TrustDomain::new("cluster.local").map_err(|e| e.to_string())?;
    let now = citadel::clock::system().now();
    let mut j =
        bootstrap::new_journal(&CaOptions::new(td.clone()), now).map_err(|e| e.to_string())?;
    let issuer = j
        .active_signer()
        .ok_or("a new journal has an active intermediate")?
        .id
        .clone();
    let ts = now.unix_timestamp();
    j.revocations.extend((0..revoked).map(|i| Revocation {
        serial: citadel::pki::chain::serial_hex(&random_serial()),
        issuer: issuer.clone(),
        identity: Some(format!(
            "spiffe://cluster.local/ns/bench/sa/w{}",
            i % denied.max(1)
        )),
        not_after: ts + 86_400,
        revoked_at: ts,
        reason: "key-compromise".into(),
    }));
    j.denied.extend((0..denied).map(|i| DeniedIdentity {
        identity: format!("spiffe://cluster.local/ns/bench/sa/w{i}"),
        since: ts,
        reason: "key-compromise".into(),
        revocation: None,
    }));
    Ok((j, td, issuer))
}

/// 100,000 revoked serials and 10,000 denied identities (by default): CRL signing, CRL size,
/// the signer rebuild every replica does on each journal change, the denial sweep, and what
/// the deny and revoked checks add to the issue path.
pub fn revocation_scale(revoked: usize, denied: usize, iterations: usize) -> BenchResult {
    println!("citadel-bench --revocation-scale: {revoked} revoked serials, {denied} denied identities, P-256 CA");
    let (built, t) = timed(|| big_journal(revoked, denied));
    let (mut j, td, issuer) = built?;
    eprintln!("journal built in {}", secs(t));
    let now = citadel::clock::system().now();
    let validity = Duration::from_secs(86_400);
    for run in 1..=3 {
        let (r, t) = timed(|| crl::sign(&mut j, &issuer, now, validity));
        r.map_err(|e| e.to_string())?;
        println!("CRL signing (run {run}):     {}", secs(t));
    }
    let pem_len = crl::bundle(&j).len();
    let der_len = pem::parse_many(crl::bundle(&j).as_bytes())
        .ok()
        .map(|v| v.iter().map(|p| p.contents().len()).sum::<usize>());
    println!(
        "CRL size:                 {:.2} MiB DER{} / {:.2} MiB PEM (ca-crl.pem)",
        der_len.unwrap_or(0) as f64 / 1048576.0,
        if der_len.is_none() { " (unknown)" } else { "" },
        pem_len as f64 / 1048576.0
    );
    let (json, t) = timed(|| serde_json::to_vec(&j));
    let json = json.map_err(|e| e.to_string())?;
    println!(
        "journal serialisation:    {} for {:.2} MiB (every journal write)",
        secs(t),
        json.len() as f64 / 1048576.0
    );
    let (signer, t) = timed(|| bootstrap::signer_from_journal(&j, &td));
    let full = signer.map_err(|e| e.to_string())?;
    println!(
        "signer rebuild:           {} (each replica, each journal change)",
        secs(t)
    );

    // A new denial while 10,000 are in force: the sweep over the denied identities' live
    // certificates (two each, already revoked) that every replica runs once it installs it.
    let ts = now.unix_timestamp();
    let live: Vec<IssuedEntry> = j
        .revocations
        .iter()
        .take(2 * denied)
        .map(|r| IssuedEntry {
            serial: r.serial.clone(),
            identity: r.identity.clone().unwrap_or_default(),
            not_after: ts + 86_400,
            issuer: issuer.clone(),
        })
        .chain(std::iter::once(IssuedEntry {
            serial: citadel::pki::chain::serial_hex(&random_serial()),
            identity: "spiffe://cluster.local/ns/bench/sa/new".into(),
            not_after: ts + 86_400,
            issuer: issuer.clone(),
        }))
        .collect();
    let (r, t) = timed(|| {
        revocation::deny_identity(
            &mut j,
            "spiffe://cluster.local/ns/bench/sa/new",
            &live,
            "key-compromise",
            now,
            validity,
        )
    });
    let newly = r.map_err(|e| e.to_string())?;
    println!(
        "deny one more identity:   {} (sweep of {} live entries, {newly} newly revoked, CRL re-signed)",
        secs(t),
        live.len()
    );

    // The issue path with and without that state: the same CSRs and identities, runs
    // interleaved so drift on a shared machine hits both alike.
    let empty_journal = {
        let mut e = j.clone();
        e.revocations.clear();
        e.denied.clear();
        e.crls.clear();
        e
    };
    let empty = bootstrap::signer_from_journal(&empty_journal, &td).map_err(|e| e.to_string())?;
    let keys: Vec<_> = (0..256)
        .map(|i| {
            let sa = ServiceAccount::new("shop", &format!("w{i}")).map_err(|e| e.to_string())?;
            let id = td.service_account_id(&sa);
            let kp = KeyType::EcP256.generate().map_err(|e| e.to_string())?;
            let c = csr::parse_pem(
                csr::build(&kp, &id.to_string())
                    .map_err(|e| e.to_string())?
                    .as_bytes(),
            )
            .map_err(|e| e.to_string())?;
            Ok((id, c.key))
        })
        .collect::<Result<_, String>>()?;
    let sweep = revocation::SweepRequest::default();
    let (ca_empty, ca_full) = (Ca::new(), Ca::new());
    ca_empty.install(empty);
    ca_full.install(full);
    let full = ca_full.current().ok_or("installed")?;
    let run = |ca: &Ca| -> Result<Duration, String> {
        let t0 = Instant::now();
        for i in 0..iterations {
            let (id, key) = &keys[i % keys.len()];
            let (s, issued) =
                citadel::ca::issue::sign_svid(ca, None, &sweep, key, id, now, validity, false)
                    .map_err(|e| e.to_string())?;
            std::hint::black_box(s.response_chain(issued.pem));
        }
        Ok(t0.elapsed() / iterations.max(1) as u32)
    };
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        without.push(run(&ca_empty)?);
        with.push(run(&ca_full)?);
    }
    with.sort();
    without.sort();
    println!(
        "sign path, no revocations:       median {} per certificate (5 runs of {iterations}: {} .. {})",
        secs(without[2]),
        secs(without[0]),
        secs(without[4])
    );
    println!(
        "sign path, with the state above: median {} per certificate (5 runs of {iterations}: {} .. {})",
        secs(with[2]),
        secs(with[0]),
        secs(with[4])
    );
    let probe = "spiffe://cluster.local/ns/shop/sa/w1";
    let n = 1_000_000;
    let (_, t) = timed(|| {
        for _ in 0..n {
            std::hint::black_box(full.is_denied(std::hint::black_box(probe)));
        }
    });
    println!(
        "deny check alone:         {:.0} ns per request ({denied} denied identities, a hash lookup)",
        t.as_secs_f64() * 1e9 / n as f64
    );
    Ok(())
}

/// Builds an issuance index of `entries` lines in `dir` (100,000 identities, half the entries
/// expired), with a CA journal beside it, then times what `revoke --identity` and the hourly
/// prune do with it.
pub async fn index_scale(entries: u64, dir: &Path) -> BenchResult {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let store = citadel::store::file::FileStore::open(dir).map_err(|e| e.to_string())?;
    let td = TrustDomain::new("cluster.local").map_err(|e| e.to_string())?;
    let now = citadel::clock::system().now();
    let journal = match store.load_journal().await.map_err(|e| e.to_string())? {
        Some(j) => j.value,
        None => {
            let j = bootstrap::new_journal(&CaOptions::new(td), now).map_err(|e| e.to_string())?;
            store
                .save_journal(&j, None)
                .await
                .map_err(|e| e.to_string())?;
            j
        }
    };
    let issuer = journal
        .active_signer()
        .ok_or("the journal has no active intermediate")?
        .id
        .clone();
    let path = dir.join(INDEX_FILE);
    let ts = now.unix_timestamp();
    println!(
        "citadel-bench --index-entries {entries}: issuance index in {}",
        path.display()
    );
    let (r, t) = timed(|| -> std::io::Result<()> {
        let f = std::fs::File::create(&path)?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
        for i in 0..entries {
            // Half expired an hour ago, half valid for a day.
            let not_after = if i % 2 == 0 { ts - 3600 } else { ts + 86_400 };
            writeln!(
                w,
                "{} spiffe://cluster.local/ns/bench/sa/w{} {not_after} {issuer}",
                citadel::pki::chain::serial_hex(&random_serial()),
                i % 100_000
            )?;
        }
        w.flush()
    });
    r.map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    let size = std::fs::metadata(&path).map_err(|e| e.to_string())?.len();
    println!(
        "written in {} : {:.1} MiB on disk ({:.0} bytes per entry)",
        secs(t),
        size as f64 / 1048576.0,
        size as f64 / entries.max(1) as f64
    );
    let index = FileIndex::new(dir);
    let wanted = "spiffe://cluster.local/ns/bench/sa/w7";
    let (live, t) = timed(|| index.live(ts, &|e| e.identity == wanted));
    let live = live.map_err(|e| e.to_string())?;
    println!(
        "scan for one identity:    {} ({} live entries found; the read `revoke --identity` makes)",
        secs(t),
        live.len()
    );
    // The command itself, in process: scan, journal compare-and-swap, CRL re-signed.
    let t0 = Instant::now();
    // Parsed as the command line would be, so the defaults are the CLI's own.
    #[derive(clap::Parser)]
    struct Revoke {
        #[command(flatten)]
        args: citadel::cmd::revoke::Args,
    }
    let state = dir.display().to_string();
    let cmd = <Revoke as clap::Parser>::try_parse_from([
        "revoke",
        "--identity",
        wanted,
        "--reason",
        "key-compromise",
        "--state-dir",
        state.as_str(),
        "--crl-validity",
        "24h",
    ])
    .map_err(|e| format!("revoke arguments: {e}"))?;
    citadel::cmd::revoke::run(cmd.args)
        .await
        .map_err(|e| format!("revoke --identity failed: {e}"))?;
    println!(
        "revoke --identity:        {} (the whole command: scan, journal update, CRL)",
        secs(t0.elapsed())
    );
    let (kept, t) = timed(|| index.prune(ts));
    let kept = kept.map_err(|e| e.to_string())?;
    let after = std::fs::metadata(&path).map_err(|e| e.to_string())?.len();
    println!(
        "prune:                    {} ({kept} of {entries} kept; {:.1} MiB left)",
        secs(t),
        after as f64 / 1048576.0
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revocation_scale_runs_small() {
        revocation_scale(200, 20, 10).unwrap();
    }

    #[tokio::test]
    async fn index_scale_builds_revokes_and_prunes() {
        let dir = tempfile::tempdir().unwrap();
        index_scale(2_000, dir.path()).await.unwrap();
        // Half the entries were expired and are pruned; the rest remain.
        let kept = std::fs::read_to_string(dir.path().join(INDEX_FILE))
            .unwrap()
            .lines()
            .count();
        assert_eq!(kept, 1_000);
        // The denial landed in the journal.
        let store = citadel::store::file::FileStore::open(dir.path()).unwrap();
        let j = store.load_journal().await.unwrap().unwrap().value;
        assert!(j
            .is_denied("spiffe://cluster.local/ns/bench/sa/w7")
            .is_some());
    }
}
