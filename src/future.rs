//! Async helpers shared across layers, with no dependencies of their own.

use std::future::Future;
use std::pin::Pin;

/// A boxed, sendable future: what object-safe async trait methods return (`Store`,
/// `Authenticator`, publishers).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
