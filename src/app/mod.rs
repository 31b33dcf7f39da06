//! The application layer: a validated configuration, and `run`, which wires the CA, its
//! stores, authenticators, controllers and servers from it. The clock and the shutdown signal
//! come from the caller, so the whole server runs on a `ManualClock` in tests.

pub mod config;
pub mod serve;

pub use config::ServeConfig;
pub use serve::{run, Listeners};
