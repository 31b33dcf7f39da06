//! Waiting on what citadel writes to the API server: a condition in an object's status, an
//! Event about an object. Built on `poll::until`, so each is bounded real time, and on a
//! timeout each says what it DID see (the object's last conditions, the namespace's Events),
//! which is what a failing kube test needs to be read without a rerun.

use std::fmt::Debug;

use k8s_openapi::api::events::v1::Event;
use kube::api::Api;
use kube::Client;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::poll::until;

/// One condition, as citadel's resources and Kubernetes' own write them (`type`, `status`,
/// `reason`, `message`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cond {
    pub type_: String,
    pub status: String,
    pub reason: String,
    pub message: String,
}

/// The `status.conditions` of any object, read through its JSON: one reader for every
/// resource (CertificateAuthority, Revocation, PodCertificateRequest, ...) whatever Rust type
/// holds its conditions.
pub fn conditions<K: Serialize>(obj: &K) -> Vec<Cond> {
    let v = serde_json::to_value(obj).unwrap_or_default();
    let field = |c: &serde_json::Value, k: &str| c[k].as_str().unwrap_or_default().to_string();
    v["status"]["conditions"]
        .as_array()
        .map(|cs| {
            cs.iter()
                .map(|c| Cond {
                    type_: field(c, "type"),
                    status: field(c, "status"),
                    reason: field(c, "reason"),
                    message: field(c, "message"),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The condition `type_` of `obj`, if it has one.
pub fn condition<K: Serialize>(obj: &K, type_: &str) -> Option<Cond> {
    conditions(obj).into_iter().find(|c| c.type_ == type_)
}

/// `Type=Status (Reason: message)` for each condition, for timeout messages.
fn show(conds: &[Cond]) -> String {
    if conds.is_empty() {
        return "no conditions".into();
    }
    conds
        .iter()
        .map(|c| format!("{}={} ({}: {})", c.type_, c.status, c.reason, c.message))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Waits until the object `name` has condition `type_` with `status` ("True", "False"), and
/// returns it. On timeout: the conditions it last had, or why it could not be read.
pub async fn wait_condition<K>(api: &Api<K>, name: &str, type_: &str, status: &str, secs: u64) -> K
where
    K: Clone + DeserializeOwned + Serialize + Debug,
{
    let what = format!("{name}: condition {type_}={status}");
    wait_object(api, name, &what, secs, |obj| {
        condition(obj, type_).is_some_and(|c| c.status == status)
    })
    .await
}

/// Waits until `done` holds for the object `name`, and returns it. On timeout: the
/// conditions it last had, or why it could not be read.
pub async fn wait_object<K>(
    api: &Api<K>,
    name: &str,
    what: &str,
    secs: u64,
    mut done: impl FnMut(&K) -> bool,
) -> K
where
    K: Clone + DeserializeOwned + Serialize + Debug,
{
    until(what, secs, async || match api.get(name).await {
        Ok(obj) if done(&obj) => Ok(obj),
        Ok(obj) => Err(show(&conditions(&obj))),
        Err(e) => Err(format!("cannot read {name}: {e}")),
    })
    .await
}

/// The Events in `ns` about the object `name` (their `regarding`) with `reason`, oldest first.
pub async fn events_about(client: &Client, ns: &str, name: &str, reason: &str) -> Vec<Event> {
    let mut evs: Vec<Event> = Api::<Event>::namespaced(client.clone(), ns)
        .list(&Default::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default()
        .into_iter()
        .filter(|e| regarding(e) == name && e.reason.as_deref() == Some(reason))
        .collect();
    evs.sort_by(|a, b| {
        a.event_time
            .as_ref()
            .map(|t| t.0)
            .cmp(&b.event_time.as_ref().map(|t| t.0))
    });
    evs
}

fn regarding(e: &Event) -> &str {
    e.regarding
        .as_ref()
        .and_then(|r| r.name.as_deref())
        .unwrap_or_default()
}

/// Waits for an Event in `ns` about the object `name` with `reason`, and returns every such
/// Event. On timeout: every Event of the namespace (object, type, reason, note).
pub async fn wait_event(
    client: &Client,
    ns: &str,
    name: &str,
    reason: &str,
    secs: u64,
) -> Vec<Event> {
    wait_events(client, ns, name, reason, secs, |evs| !evs.is_empty()).await
}

/// Waits until `done` holds for the Events in `ns` about `name` with `reason` (a count, a
/// note), and returns them. On timeout: every Event of the namespace.
pub async fn wait_events(
    client: &Client,
    ns: &str,
    name: &str,
    reason: &str,
    secs: u64,
    mut done: impl FnMut(&[Event]) -> bool,
) -> Vec<Event> {
    let what = format!("Events {reason} about {ns}/{name}");
    until(&what, secs, async || {
        let evs = events_about(client, ns, name, reason).await;
        if done(&evs) {
            return Ok(evs);
        }
        Err(all_events(client, ns).await)
    })
    .await
}

/// Every Event of `ns`, one a line, for timeout messages.
async fn all_events(client: &Client, ns: &str) -> String {
    let list = match Api::<Event>::namespaced(client.clone(), ns)
        .list(&Default::default())
        .await
    {
        Ok(l) => l.items,
        Err(e) => return format!("cannot list the Events of {ns}: {e}"),
    };
    if list.is_empty() {
        return format!("no Events in {ns}");
    }
    let lines: Vec<String> = list
        .iter()
        .map(|e| {
            format!(
                "  {}/{} {} {}: {}",
                e.regarding
                    .as_ref()
                    .and_then(|r| r.kind.as_deref())
                    .unwrap_or("?"),
                regarding(e),
                e.type_.as_deref().unwrap_or("?"),
                e.reason.as_deref().unwrap_or("?"),
                e.note.as_deref().unwrap_or_default()
            )
        })
        .collect();
    format!("{} Events in {ns}:\n{}", lines.len(), lines.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_are_read_from_any_objects_status() {
        let obj = serde_json::json!({"status": {"conditions": [
            {"type": "Applied", "status": "False", "reason": "JournalFull", "message": "over"},
            {"type": "Ready", "status": "True", "reason": "Serving", "message": ""}
        ]}});
        assert_eq!(
            condition(&obj, "Applied"),
            Some(Cond {
                type_: "Applied".into(),
                status: "False".into(),
                reason: "JournalFull".into(),
                message: "over".into()
            })
        );
        assert_eq!(condition(&obj, "Degraded"), None);
        assert_eq!(
            show(&conditions(&obj)),
            "Applied=False (JournalFull: over); Ready=True (Serving: )"
        );
        assert!(conditions(&serde_json::json!({"status": {}})).is_empty());
        assert_eq!(show(&[]), "no conditions");
    }
}
