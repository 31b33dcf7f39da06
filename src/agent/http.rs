//! The agent's monitoring port: `/healthz/ready` (200 while a valid certificate is held) and
//! `/metrics`.

use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;

use super::{AgentStats, CredentialsRx};
use crate::clock::SharedClock;
use crate::shutdown::Shutdown;

#[derive(Clone)]
struct AgentState {
    rx: CredentialsRx,
    stats: Arc<AgentStats>,
    clock: SharedClock,
}

/// Serves `/healthz/ready`, `/healthz/live` and `/metrics` on `listener` until shutdown.
pub async fn serve(
    listener: TcpListener,
    rx: CredentialsRx,
    stats: Arc<AgentStats>,
    clock: SharedClock,
    shutdown: Shutdown,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz/ready", get(ready))
        .route("/healthz/live", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .with_state(AgentState { rx, stats, clock });
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.wait().await })
        .await
}

async fn ready(State(s): State<AgentState>) -> (StatusCode, String) {
    let now = s.clock.now();
    match s.rx.borrow().as_ref() {
        Some(c) if c.not_after > now => (
            StatusCode::OK,
            format!("ready: {} until {}\n", c.identity, c.not_after),
        ),
        Some(c) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: certificate expired at {}\n", c.not_after),
        ),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: no certificate yet\n".into(),
        ),
    }
}

async fn metrics(State(s): State<AgentState>) -> String {
    let mut out = String::new();
    let mut put = |name: &str, kind: &str, help: &str, v: i64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
        );
    };
    let creds = s.rx.borrow().clone();
    if let Some(c) = &creds {
        put(
            "citadel_agent_cert_expiry_timestamp",
            "gauge",
            "Unix time the served certificate expires.",
            c.not_after.unix_timestamp(),
        );
        put(
            "citadel_agent_cert_version",
            "gauge",
            "Version of the served credentials (SDS version).",
            c.version as i64,
        );
    }
    let st = &s.stats;
    put(
        "citadel_agent_last_renewal_result",
        "gauge",
        "1 if the last fetch succeeded, 0 if it failed, -1 before the first.",
        st.last_result.load(Ordering::Relaxed),
    );
    put(
        "citadel_agent_last_renewal_attempt_timestamp",
        "gauge",
        "Unix time of the last fetch attempt.",
        st.last_attempt.load(Ordering::Relaxed),
    );
    put(
        "citadel_agent_renewal_retries",
        "gauge",
        "Consecutive failed fetches since the last success.",
        st.retries.load(Ordering::Relaxed) as i64,
    );
    put(
        "citadel_agent_renewals_total",
        "counter",
        "Successful fetches.",
        st.renewals_ok.load(Ordering::Relaxed) as i64,
    );
    put(
        "citadel_agent_renewal_failures_total",
        "counter",
        "Failed fetches.",
        st.renewals_failed.load(Ordering::Relaxed) as i64,
    );
    put(
        "citadel_agent_sds_streams",
        "gauge",
        "Open SDS streams.",
        st.sds_streams.load(Ordering::Relaxed),
    );
    put(
        "citadel_agent_sds_pushes_total",
        "counter",
        "SDS responses sent.",
        st.sds_pushes.load(Ordering::Relaxed) as i64,
    );
    put(
        "citadel_agent_sds_nacks_total",
        "counter",
        "SDS responses Envoy rejected.",
        st.sds_nacks.load(Ordering::Relaxed) as i64,
    );
    put(
        "citadel_agent_sds_refused_total",
        "counter",
        "SDS calls refused by a limit (streams, resource names).",
        st.sds_refused.load(Ordering::Relaxed) as i64,
    );
    put(
        "citadel_agent_workload_api_streams",
        "gauge",
        "Open SPIFFE Workload API streams.",
        st.workload_streams.load(Ordering::Relaxed),
    );
    put(
        "citadel_agent_workload_api_pushes_total",
        "counter",
        "SPIFFE Workload API stream messages sent.",
        st.workload_pushes.load(Ordering::Relaxed) as i64,
    );
    put(
        "citadel_agent_workload_api_refused_total",
        "counter",
        "SPIFFE Workload API calls refused (header, caller, limits).",
        st.workload_refused.load(Ordering::Relaxed) as i64,
    );
    out
}
