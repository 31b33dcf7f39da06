//! `citadel-bench --micro`: each stage of the issue path timed in this process, on one core
//! (JWT verify, CSR parse and verify, sign, and the whole path with the chain).

use std::time::{Duration, Instant};

use citadel::auth::jwks::Jwks;
use citadel::auth::jwt::{self, JwtPolicy};
use citadel::ca::bootstrap::{self, CaOptions};
use citadel::devkeys;
use citadel::identity::{ServiceAccount, TrustDomain};
use citadel::pki::{csr, KeyType};

use crate::measure::{workloads, BenchResult, BENCH_NAMESPACE};

/// Times each stage of the issue path in this process, on one core.
pub fn run(distinct: usize, iterations: usize, key_type: KeyType) -> BenchResult {
    let td = TrustDomain::new("cluster.local").map_err(|e| e.to_string())?;
    let now = citadel::clock::system().now();
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
    let work = workloads(BENCH_NAMESPACE, distinct, key_type, None)?;
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
    println!("citadel-bench --micro: {iterations} iterations per stage, {key_type} CSRs, RS256 tokens, {} CA", signer.key_kind());
    time_it("JWT verify (RS256, claims)", &mut |i| {
        jwt::verify(&work[i % distinct].token, &keys, &policy, ts).expect("token verifies");
    });
    time_it("CSR parse + self-signature verify", &mut |i| {
        csr::parse_pem(work[i % distinct].csr.as_bytes()).expect("CSR verifies");
    });
    time_it("sign leaf + PEM encode", &mut |i| {
        let c = &parsed[i % distinct];
        let sa = ServiceAccount::new(BENCH_NAMESPACE, &format!("w{}", i % distinct)).expect("name");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_stage_runs_on_a_few_workloads() {
        run(3, 5, KeyType::EcP256).unwrap();
    }
}
