//! The CA journal as the file store keeps it (ca-journal.json): loaded through the real
//! FileStore, then turned into a signer as a starting server would. A journal that loads but
//! does not hold together must be refused, never served or panicked on.
#![no_main]
use citadel::identity::TrustDomain;
use citadel::store::{file::FileStore, Store};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(citadel::store::file::JOURNAL_FILE), data).unwrap();
    let store = FileStore::open(dir.path()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let Ok(Some(j)) = rt.block_on(store.load_journal()) else { return };
    let td = TrustDomain::new("cluster.local").unwrap();
    let _ = citadel::ca::bootstrap::signer_from_journal(&j.value, &td);
    let _ = citadel::ca::crl::bundle(&j.value);
});
