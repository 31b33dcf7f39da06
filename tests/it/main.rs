//! Integration tests: one binary (link time on 2 cores), one module per area.
//! Every test starts a real server on 127.0.0.1:0 and talks TLS gRPC to it.
//!
//! Tests may read the wall clock (clippy.toml forbids it in the library): the TLS peers and
//! third-party validators they check against (rustls, openssl, Envoy, go-spiffe) all use it.
#![forbid(unsafe_code)]
#![allow(clippy::disallowed_methods)]

mod agent;
mod ambient;
mod broker;
mod ca_resource;
mod cli;
mod crl_endpoint;
mod csr_signer;
mod envoy;
mod errors;
mod federation;
mod hsm;
mod issue;
mod istiod_ra;
mod jwt_svid;
mod kit;
mod kube;
mod kube_abuse;
mod kube_faults;
mod lifecycle;
mod limits;
mod linkerd;
mod live_spec;
mod multicluster;
mod pilot_agent;
mod plugged_swap;
mod podcert;
mod properties;
mod rbac;
mod revocation;
mod revocation_kube;
mod rotation;
mod scale;
mod storage;
mod support;
mod thirdparty;
mod timetravel;
mod workload_api;
