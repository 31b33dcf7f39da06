#![forbid(unsafe_code)]
//! citadel: a mesh certificate authority and mTLS identity service, wire-compatible with
//! Istio's CA protocol. See docs/architecture.md for the module map.
//!
//! Dependencies point one way: `cmd` -> `app` -> `server`/`agent`/`cluster` -> `auth` -> `ca`
//! -> `store` -> `journal` -> `pki` -> `identity`, with `clock` and the other leaves underneath
//! everything. `scripts/layers.py` checks it.

pub mod agent;
pub mod app;
pub mod auth;
pub mod ca;
pub mod client;
pub mod clock;
pub mod cluster;
pub mod cmd;
pub mod devkeys;
pub mod duration;
pub mod fsutil;
pub mod future;
pub mod identity;
pub mod journal;
pub mod pki;
pub mod server;
pub mod shutdown;
pub mod store;

/// Generated from proto/ca.proto.
pub mod proto {
    tonic::include_proto!("istio.v1.auth");
}

/// Installs ring as the process-wide rustls provider. With two providers compiled in rustls
/// panics on first use, so every entry point calls this once.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
