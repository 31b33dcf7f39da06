//! The roots istiod verifies our answers against, kept in a Secret (default
//! `external-ca-cert` in `--namespace`, key `root-cert.pem`), to be mounted into istiod at
//! `/etc/external-ca-cert`, the file it reads in RA mode. istiod checks every chain it gets from a CSR
//! against that file, whichever signer name it asked, and hands the file's content to the
//! proxy as its roots, so it holds the roots of EVERY CA a signer name maps to (citadel's own
//! bundle, rotations included, and each mapped CA's).
//!
//! The leader writes it when it differs from what the CAs' bundles say: at start and whenever
//! a CA installs a new signer (the main CA rotates), and every minute to repair an edit.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::{Api, PostParams};

use crate::ca::Ca;
use crate::cluster::controller::Stop;
use crate::pki::pem;

/// The key of the roots in the Secret (the file name istiod reads).
pub const KEY: &str = "root-cert.pem";

/// The roots of every CA in `cas`, each certificate once, in the CAs' order.
pub fn bundle(cas: &[Arc<Ca>]) -> String {
    let mut seen: Vec<Vec<u8>> = vec![];
    let mut out = String::new();
    for ca in cas {
        let Some(signer) = ca.current() else { continue };
        for root in signer.roots_der() {
            if !seen.iter().any(|s| s.as_slice() == root.as_ref()) {
                seen.push(root.as_ref().to_vec());
                out.push_str(&pem::cert_to_pem(root));
            }
        }
    }
    out
}

/// Keeps the Secret `name` in `namespace` equal to [`bundle`] until `stop`.
pub async fn keep(
    client: kube::Client,
    namespace: String,
    name: String,
    cas: Vec<Arc<Ca>>,
    stop: Stop,
) {
    let api: Api<Secret> = Api::namespaced(client, &namespace);
    let mut changes: Vec<_> = cas.iter().map(|c| c.subscribe()).collect();
    let mut stop = stop;
    loop {
        let want = bundle(&cas);
        if !want.is_empty() {
            match write(&api, &name, &want).await {
                Ok(true) => {
                    tracing::info!(secret = %format!("{namespace}/{name}"), "published the CSR signers' roots for istiod")
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(secret = %format!("{namespace}/{name}"), error = %e, "could not publish the CSR signers' roots; retrying")
                }
            }
        }
        let changed =
            futures_util::future::select_all(changes.iter_mut().map(|c| Box::pin(c.changed())));
        tokio::select! {
            _ = changed => {}
            _ = tokio::time::sleep(Duration::from_secs(60)) => {}
            _ = &mut stop => return,
        }
    }
}

/// Creates or updates the Secret when its roots differ; true when it wrote.
async fn write(api: &Api<Secret>, name: &str, want: &str) -> Result<bool, kube::Error> {
    let data = BTreeMap::from([(KEY.to_string(), ByteString(want.as_bytes().to_vec()))]);
    match api.get_opt(name).await? {
        Some(s)
            if s.data
                .as_ref()
                .and_then(|d| d.get(KEY))
                .map(|b| b.0.as_slice())
                == Some(want.as_bytes()) =>
        {
            Ok(false)
        }
        Some(mut s) => {
            s.data
                .get_or_insert_default()
                .insert(KEY.into(), data[KEY].clone());
            api.replace(name, &PostParams::default(), &s).await?;
            Ok(true)
        }
        None => {
            let mut s = Secret::default();
            s.metadata.name = Some(name.into());
            s.metadata.labels = Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_string(),
                "citadel".to_string(),
            )]));
            s.data = Some(data);
            api.create(&PostParams::default(), &s).await?;
            Ok(true)
        }
    }
}
