//! Leader election on a `coordination.k8s.io/v1` Lease. Only the leader writes (CA creation,
//! rotation, CRLs, ConfigMaps); every replica signs.
//!
//! The holder renews every third of the lease duration. Anyone may take the lease once
//! `renewTime + leaseDurationSeconds` has passed; every update is compare-and-swap on
//! `resourceVersion`, so two candidates cannot both win. A leader that stops cleanly
//! releases the lease so the next one takes over at once.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, PostParams};

use crate::clock::SharedClock;
use crate::shutdown::Shutdown;

/// The name of the Lease replicas compete for, in citadel's namespace.
pub const LEASE_NAME: &str = "citadel-leader";

/// (holder, renewTime in µs) and when this replica first saw the lease in that state.
type Observation = ((String, Option<i64>), tokio::time::Instant);

/// One replica's candidacy for the Lease; publishes whether it leads.
pub struct Elector {
    api: Api<Lease>,
    identity: String,
    duration: Duration,
    clock: SharedClock,
    leader: crate::leadership::LeadershipWriter,
    /// Our own reader of `leader`, for [`Elector::is_leader`].
    reader: crate::leadership::Leadership,
    /// The other holder's lease as last seen (holder, renewTime in µs) and when we first saw
    /// it so. Expiry is judged on OUR monotonic clock, like client-go: comparing another
    /// replica's wall-clock renewTime with ours would let clock skew steal the lease.
    observed: std::sync::Mutex<Option<Observation>>,
}

fn micro(t: time::OffsetDateTime) -> MicroTime {
    MicroTime(
        k8s_openapi::jiff::Timestamp::from_microsecond((t.unix_timestamp_nanos() / 1000) as i64)
            .unwrap_or_default(),
    )
}

impl Elector {
    /// A candidate in `namespace` under `identity` (the holder name written in the Lease); a lease
    /// lasts `duration`.
    pub fn new(
        client: kube::Client,
        namespace: &str,
        identity: String,
        duration: Duration,
        clock: SharedClock,
    ) -> Arc<Self> {
        let (leader, reader) = crate::leadership::channel();
        Arc::new(Self {
            api: Api::namespaced(client, namespace),
            identity,
            duration,
            clock,
            leader,
            reader,
            observed: std::sync::Mutex::new(None),
        })
    }

    /// The holder name this replica writes in the Lease.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Whether this replica holds the Lease right now.
    pub fn is_leader(&self) -> bool {
        self.reader.leading()
    }

    /// Follows leadership: leading while this replica holds the Lease and its last renewal
    /// is still valid.
    pub fn subscribe(&self) -> crate::leadership::Leadership {
        self.leader.subscribe()
    }

    /// How long a renewal lets this replica act as leader, from the moment the renewal was
    /// sent: less than the lease, so it stops before anyone else may start.
    fn validity(&self) -> Duration {
        self.duration * 4 / 5
    }

    fn spec(&self, transitions: i32, acquired: Option<MicroTime>) -> LeaseSpec {
        let now = micro(self.clock.now());
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration.as_secs().max(1) as i32),
            acquire_time: Some(acquired.unwrap_or_else(|| now.clone())),
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// One attempt to acquire or renew. Returns whether we lead afterwards.
    pub async fn try_lead(&self) -> Result<bool, kube::Error> {
        let Some(mut lease) = self.api.get_opt(LEASE_NAME).await? else {
            let mut l = Lease {
                spec: Some(self.spec(0, None)),
                ..Default::default()
            };
            l.metadata.name = Some(LEASE_NAME.into());
            return match self.api.create(&PostParams::default(), &l).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let ours = holder == self.identity;
        let expired = {
            let seen = (
                holder.clone(),
                spec.renew_time.as_ref().map(|r| r.0.as_microsecond()),
            );
            let duration = spec
                .lease_duration_seconds
                .map_or(self.duration, |d| Duration::from_secs(d.max(1) as u64));
            let mut observed = self.observed.lock().unwrap_or_else(|p| p.into_inner());
            match observed.as_ref() {
                Some((s, since)) if *s == seen => since.elapsed() > duration,
                _ => {
                    *observed = Some((seen, tokio::time::Instant::now()));
                    spec.renew_time.is_none()
                }
            }
        };
        if !ours && !holder.is_empty() && !expired {
            return Ok(false);
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!ours);
        let acquired = if ours {
            spec.acquire_time.clone()
        } else {
            None
        };
        lease.spec = Some(self.spec(transitions, acquired));
        match self
            .api
            .replace(LEASE_NAME, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => {
                if !ours {
                    tracing::info!(identity = %self.identity, previous = %holder, "became the leader");
                }
                Ok(true)
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives the lease up (on clean shutdown) so another replica takes over at once.
    pub async fn release(&self) {
        if let Ok(Some(mut lease)) = self.api.get_opt(LEASE_NAME).await {
            if lease
                .spec
                .as_ref()
                .and_then(|s| s.holder_identity.as_deref())
                == Some(self.identity.as_str())
            {
                if let Some(s) = lease.spec.as_mut() {
                    s.holder_identity = None;
                    s.renew_time = None;
                }
                let _ = self
                    .api
                    .replace(LEASE_NAME, &PostParams::default(), &lease)
                    .await;
                tracing::info!(identity = %self.identity, "released the leader lease");
            }
        }
    }

    /// Campaigns and renews until shutdown. A leader that cannot renew within the lease
    /// duration steps down rather than risk two writers.
    pub async fn run(self: Arc<Self>, shutdown: Shutdown) {
        let mut last_renewed = tokio::time::Instant::now();
        loop {
            let sent = tokio::time::Instant::now();
            // A blackholed API call must not keep us "leader" forever.
            let attempt = tokio::time::timeout(self.duration / 3, self.try_lead()).await;
            let lead = match attempt
                .unwrap_or_else(|_| Err(kube::Error::Service("lease request timed out".into())))
            {
                Ok(true) => {
                    last_renewed = sent;
                    self.leader.renewed(sent + self.validity());
                    true
                }
                Ok(false) => false,
                Err(e) => {
                    tracing::warn!(error = %e, "leader election: the API server did not answer");
                    self.leader.flag() && last_renewed.elapsed() < self.duration
                }
            };
            if self.leader.set(lead) {
                tracing::info!(identity = %self.identity, leader = lead, "leadership changed");
            }
            tokio::select! {
                _ = tokio::time::sleep(self.duration / 3) => {}
                _ = shutdown.wait() => break,
            }
        }
        if self.leader.flag() {
            self.leader.set(false);
            self.release().await;
        }
    }
}
