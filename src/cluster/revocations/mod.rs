//! The `Revocation` custom resource (`citadel.dev/v1alpha1`) and its controller: revocation
//! that works with `--store kube` across N replicas.
//!
//! Each replica keeps its own issuance index (`issued.log` in its state directory), so no
//! single process knows every certificate. The design: **every replica reconciles every
//! Revocation against its own index**, and the journal stays the record of truth.
//!
//! - **Identity:** any replica writes the denial to the journal (compare-and-swap; a second
//!   writer finds it there and changes nothing) together with the live certificates of that
//!   identity in its own index. Every other replica revokes its own when it reconciles the
//!   resource, and its scheduler sweeps its index when it installs a journal with a new
//!   denial ([`crate::ca::scheduler`]), so a replica that restarts later catches up at start.
//! - **Serial:** the replica whose index holds the serial revokes it precisely (its issuer's
//!   CRL). If no replica has revoked it [`FALLBACK_AFTER`] after the resource was created (a
//!   replica's disk was lost, or the serial was never ours), it is listed on the CRL of every
//!   unexpired intermediate: a serial revocation never silently does nothing, and listing a
//!   foreign 128-bit random serial on a CRL harms no one.
//! - **Status** is computed from the journal (how many certificates carry that identity or
//!   serial on a CRL, which CRL numbers list them) plus one report per replica in a map keyed
//!   by replica name, so two replicas' merge patches never clobber each other.
//!
//! The controller runs on every replica, leader or not (each owns an index). Reconciles are
//! idempotent: re-applying the same Revocation finds the journal already saying so and writes
//! nothing. A crash between the journal write and the status patch is finished by the next
//! reconcile (the watch's initial list at start), because status is derived from the journal.
//!
//! One file per concern: [`resource`] (types, CRD, validation), [`apply`] (the pure journal
//! changes), [`status`] (conditions and the status patch), [`controller`] (the loops).

mod apply;
mod controller;
mod resource;
mod status;

pub use apply::*;
pub use controller::*;
pub use resource::*;
pub use status::*;
