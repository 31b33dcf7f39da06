//! The `CertificateAuthority` custom resource (`citadel.dev/v1alpha1`): the operator's way to
//! declare the CA's policy and to request a root rotation, and the status that says where
//! the CA stands (conditions `Ready`, `RootRotationInProgress`, `BundlePublished`,
//! `Degraded`, and every root and intermediate with its expiry).
//!
//! The journal stays the record of truth: the resource's spec is read at start (settings it
//! sets win over flags) and followed while serving by every replica (`live`: the policy is
//! swapped in place, and each replica reports the generation it runs); a rotation request is
//! acted on in the same journal write that records it as handled (so a re-apply, a crash or
//! a new leader never starts a second rotation), and the status is derived from the journal,
//! written only when it changes. The pure parts (spec -> policy, journal -> status) are plain
//! functions; [`Reconciler`] runs them, the leader's part under the Lease.
//!
//! One concern a file: `resource` (the types, schema and CRD), `validate` (what a spec may
//! set: parsing, caps, combinations), `policy` (the spec over the flags), `live` (one
//! replica's reading of the spec and its `status.replicas` entry), `status`
//! (journal -> status, conditions and Events) and `reconcile` (the controller).

mod live;
mod policy;
mod reconcile;
mod resource;
mod status;
mod validate;

pub use live::SPEC_APPLIED;
pub use policy::{effective_policy, Sources};
pub use reconcile::{get, Pass, Reconciler};
pub use resource::*;
pub use status::{merge_patch, signature_event, stage_event, status_for, Observed};
pub use validate::{
    SpecCaps, MAX_SPEC_CRL_VALIDITY, MAX_SPEC_INTERMEDIATE_TTL, MAX_SPEC_ROOT_TTL,
    MAX_SPEC_WORKLOAD_TTL,
};
