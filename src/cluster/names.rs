//! The names of the objects citadel publishes and looks up across its controllers, in one place
//! below them all, so a controller that needs another's object name or kind imports this
//! rather than the other controller (`ca_resource` counts the bundle ConfigMaps `publish`
//! writes; `publish` records drift Events on the `CertificateAuthority`).

use kube::core::{ApiResource, GroupVersionKind};

/// The trust bundle ConfigMap, the name istio-agent mounts.
pub const ROOT_CONFIGMAP: &str = "istio-ca-root-cert";
/// The key of the bundle in that ConfigMap.
pub const ROOT_KEY: &str = "root-cert.pem";
/// The CRL ConfigMap.
pub const CRL_CONFIGMAP: &str = "istio-ca-crl";
/// The key of the CRLs in that ConfigMap.
pub const CRL_KEY: &str = "ca-crl.pem";
/// Linkerd's trust anchors ConfigMap, in its control-plane namespace only: its proxy injector
/// inlines it into each injected pod, and the control plane's own proxies read it through a
/// `configMapKeyRef`, both when the pod is created (`--linkerd-identity-domain`).
pub const LINKERD_ANCHORS_CONFIGMAP: &str = "linkerd-identity-trust-roots";
/// The key of the anchors (PEM) in that ConfigMap.
pub const LINKERD_ANCHORS_KEY: &str = "ca-bundle.crt";

/// The JWT bundle ConfigMap, in the CA's namespace only: a JWK Set of the JWT-SVID keys.
pub const JWKS_CONFIGMAP: &str = "citadel-jwt-bundle";
/// The key of the JWK Set in that ConfigMap.
pub const JWKS_KEY: &str = "jwks.json";

/// The `CertificateAuthority` kind, for controllers that only put Events on it and so need no
/// typed access (the type is `ca_resource`'s; its unit test checks the two agree).
pub fn certificate_authority() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("citadel.dev", "v1alpha1", "CertificateAuthority"),
        "certificateauthorities",
    )
}
