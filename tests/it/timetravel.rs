//! The whole server on a ManualClock: a year of intermediate rotations, CRL re-signing and
//! leaf expiry in a few seconds of real time, through the real gRPC port. This is the proof
//! that the clock is injected all the way down: if any layer read the wall clock, the chains
//! below would not verify at the moved time, or nothing would rotate.

use std::sync::Arc;
use std::time::Duration;

use citadel::client::verify_response;
use citadel::clock::{Clock, ManualClock};
use citadel::journal::{Role, Status};
use citadel::pki::{chain, pem, KeyType};
use citadel::store::file::FileStore;
use citadel::store::Store;

use crate::support::*;

const DAY: i64 = 86_400;

fn intermediate_serial(chain_pem: &[String]) -> String {
    chain::describe(&pem::parse_certs(chain_pem[1].as_bytes()).unwrap()[0])
        .unwrap()
        .serial_hex
}

#[tokio::test]
async fn a_year_of_rotation_on_a_manual_clock_through_the_real_port() {
    let clock = Arc::new(ManualClock::new(time::OffsetDateTime::now_utc()));
    let ca = TestCa::start_on_clock(
        clock.clone(),
        &[
            "--plaintext",
            "--intermediate-ttl",
            "30d",
            "--max-ttl",
            "1d",
            "--crl-validity",
            "2d",
            "--reconcile-interval",
            "100ms",
        ],
    )
    .await;
    let state = ca.state_dir();
    let store = FileStore::open(&state).unwrap();
    let id = spiffe("shop", "cart");
    let (_, csr) = csr_for(KeyType::EcP256, &id);
    let mut client = ca.client().await;
    let first = call(
        &mut client,
        &csr,
        Some(&bearer(&token_at(&*clock, "shop", "cart"))),
        0,
        None,
    )
    .await
    .unwrap();
    verify_response(&first, Some(&id), clock.now()).unwrap();
    let mut seen = vec![intermediate_serial(&first)];

    // A year in steps of 5 days. Each step: wait (real time, bounded) for the scheduler to
    // act on the moved clock, then a fresh certificate must verify at the moved time.
    for step in 1..=73 {
        clock.advance(time::Duration::seconds(5 * DAY));
        let now = clock.now();
        let mut chain = None;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let j = store.load_journal().await.unwrap().unwrap().value;
            // Wait until nothing is overdue: every live CRL is current at the moved time.
            if j.crls.iter().all(|c| c.next_update > now.unix_timestamp()) {
                chain = Some(
                    call(
                        &mut client,
                        &csr,
                        Some(&bearer(&token_at(&*clock, "shop", "cart"))),
                        0,
                        None,
                    )
                    .await
                    .unwrap(),
                );
                break;
            }
        }
        let chain = chain
            .unwrap_or_else(|| panic!("step {step}: CRLs were not re-signed on the moved clock"));
        let v = verify_response(&chain, Some(&id), now).unwrap_or_else(|e| {
            panic!("step {step}: a fresh chain must verify at the moved time: {e}")
        });
        assert!(
            v.leaf.not_after > now && v.leaf.not_before <= now,
            "step {step}"
        );
        let int = intermediate_serial(&chain);
        if seen.last() != Some(&int) {
            seen.push(int);
        }
    }
    // 365 days with 30-day intermediates activated at 5/6 of their life: a new signer
    // every 25 days, so 14 or more in the year.
    assert!(
        seen.len() >= 14,
        "intermediates that signed: {}",
        seen.len()
    );
    // The first certificate is long expired at the moved time.
    assert!(verify_response(&first, Some(&id), clock.now()).is_err());
    // Old intermediates were retired once their last leaf expired; exactly one signs.
    let j = store.load_journal().await.unwrap().unwrap().value;
    let ints = |s: Status| {
        j.authorities
            .iter()
            .filter(|a| a.role == Role::Intermediate && a.status == s)
            .count()
    };
    assert_eq!(ints(Status::Active), 1);
    assert!(
        ints(Status::Retired) >= 12,
        "retired: {}",
        ints(Status::Retired)
    );
    ca.stop().await;
}
