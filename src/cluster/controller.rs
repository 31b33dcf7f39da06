//! The controller runtime every Kubernetes behaviour of citadel runs on: kube-runtime's
//! `Controller` (watch, reconcile, error policy, requeue) started and stopped with our Lease.
//!
//! A controller here is a function that builds and drives one `kube::runtime::Controller`
//! until the future it is given resolves; [`while_leading`] runs it only while this replica
//! holds the Lease, stops it gracefully when leadership is lost, and starts a fresh one (with
//! fresh caches, so nothing stale is acted on) when it comes back. Adding a controller is a
//! reconcile function plus one `while_leading` call in `cluster::replica`.

use std::future::Future;
use std::pin::Pin;

use crate::shutdown::Shutdown;

/// The Kubernetes Event recorder every controller reports with: controller `citadel`, this
/// replica's pod (`POD_NAME`) as the instance.
pub fn recorder(client: kube::Client) -> kube::runtime::events::Recorder {
    kube::runtime::events::Recorder::new(
        client,
        kube::runtime::events::Reporter {
            controller: "citadel".into(),
            instance: std::env::var("POD_NAME").ok(),
        },
    )
}

/// Resolves when the controller it was given to must stop.
pub type Stop = Pin<Box<dyn Future<Output = ()> + Send + Sync>>;

/// Runs `start(stop)` whenever `leader` is true (always, when `leader` is `None`), until
/// `shutdown`. `stop` resolves when leadership is lost or on shutdown; the controller is
/// expected to finish its in-flight reconciles and return then.
pub async fn while_leading<F, Fut>(
    name: &'static str,
    leader: Option<crate::leadership::Leadership>,
    shutdown: Shutdown,
    mut start: F,
) where
    F: FnMut(Stop) -> Fut,
    Fut: Future<Output = ()>,
{
    let mut leader = leader.map(|l| l.changes());
    loop {
        // Wait to lead (or shutdown).
        if let Some(l) = leader.as_mut() {
            tokio::select! {
                r = l.wait_for(|v| *v) => if r.is_err() { return },
                _ = shutdown.wait() => return,
            }
        }
        if shutdown.is_triggered() {
            return;
        }
        tracing::debug!(controller = name, "starting: this replica leads");
        let stop: Stop = {
            let (mut l, sd) = (leader.clone(), shutdown.clone());
            Box::pin(async move {
                tokio::select! {
                    _ = async {
                        match l.as_mut() {
                            Some(l) => { let _ = l.wait_for(|v| !*v).await; }
                            None => std::future::pending().await,
                        }
                    } => {}
                    _ = sd.wait() => {}
                }
            })
        };
        start(stop).await;
        tracing::debug!(controller = name, "stopped");
        if shutdown.is_triggered() || leader.is_none() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// Started on gaining the lease, stopped on losing it, started again, stopped on
    /// shutdown: never two at once.
    #[tokio::test]
    async fn runs_only_while_leading() {
        let (tx, rx) = crate::leadership::channel();
        let (trigger, sd) = crate::shutdown::channel();
        let (started, running) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let task = tokio::spawn({
            let (started, running) = (started.clone(), running.clone());
            while_leading("test", Some(rx), sd, move |stop| {
                let (started, running) = (started.clone(), running.clone());
                async move {
                    started.fetch_add(1, Ordering::SeqCst);
                    assert_eq!(running.fetch_add(1, Ordering::SeqCst), 0, "two at once");
                    stop.await;
                    running.fetch_sub(1, Ordering::SeqCst);
                }
            })
        });
        let settle = || tokio::time::sleep(std::time::Duration::from_millis(20));
        settle().await;
        assert_eq!(started.load(Ordering::SeqCst), 0, "not leading yet");
        tx.set(true);
        settle().await;
        assert_eq!(running.load(Ordering::SeqCst), 1);
        tx.set(false);
        settle().await;
        assert_eq!(
            running.load(Ordering::SeqCst),
            0,
            "stopped on losing the lease"
        );
        tx.set(true);
        settle().await;
        assert_eq!(
            started.load(Ordering::SeqCst),
            2,
            "a fresh one on regaining it"
        );
        trigger.trigger();
        task.await.unwrap();
        assert_eq!(running.load(Ordering::SeqCst), 0);
    }
}
