//! The CRL distribution point (`serve --crl-endpoint ADDR`): plain HTTP, for relying
//! parties outside the mesh that fetch CRLs the RFC 5280 way (the URL in a certificate's
//! CRL Distribution Points extension, `serve --crl-distribution-url`). Serves the CRLs of the
//! installed signer, the same ones the `istio-ca-crl` ConfigMaps and `citadel ca crl` carry,
//! so every replica answers with what it installed from the journal.
//!
//! - `GET /crl/<authority-id>.crl`: that authority's current CRL, DER, `application/pkix-crl`
//!   (the id is the authority's serial in hex, as `citadel ca status` shows it). A root's CRL
//!   lists revoked intermediates, an intermediate's the revoked leaves it issued.
//! - `GET /crl/`: one line per authority, `<id>.crl`, to discover them.
//!
//! Plain HTTP on purpose (RFC 5280 section 4.2.1.13: an HTTPS CRL fetch would need a
//! certificate check that itself needs the CRL); CRLs are signed, so the transport needs no
//! integrity of its own.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;

use crate::ca::Ca;
use crate::shutdown::Shutdown;

/// The path prefix every CRL is served under.
pub const PREFIX: &str = "/crl/";

/// Serves the CRLs of `ca`'s installed signer on `listener` until shutdown.
pub async fn serve(listener: TcpListener, ca: Arc<Ca>, shutdown: Shutdown) -> std::io::Result<()> {
    let app = Router::new()
        .route("/crl/", get(index))
        .route("/crl/{file}", get(crl))
        .with_state(ca);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.wait().await })
        .await
}

fn text(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

async fn index(State(ca): State<Arc<Ca>>) -> Response {
    let Some(signer) = ca.current() else {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "no CA installed yet\n".into(),
        );
    };
    let body: String = signer
        .revocations()
        .crls
        .iter()
        .map(|(id, _)| format!("{id}.crl\n"))
        .collect();
    text(StatusCode::OK, body)
}

async fn crl(State(ca): State<Arc<Ca>>, Path(file): Path<String>) -> Response {
    let Some(id) = file.strip_suffix(".crl") else {
        return text(
            StatusCode::NOT_FOUND,
            format!("no such CRL {file:?}: paths are {PREFIX}<authority-id>.crl\n"),
        );
    };
    let Some(signer) = ca.current() else {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "no CA installed yet\n".into(),
        );
    };
    let view = signer.revocations();
    let Some((_, der)) = view.crls.iter().find(|(i, _)| i == id) else {
        return text(
            StatusCode::NOT_FOUND,
            format!("no current CRL of authority {id:?}; GET {PREFIX} lists them\n"),
        );
    };
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/pkix-crl")],
        der.clone(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::bootstrap::{new_journal, signer_from_journal, CaOptions};
    use crate::identity::TrustDomain;
    use x509_parser::prelude::*;

    /// A CA minted with `--crl-distribution-url`: its intermediate names the root's CRL at
    /// that URL, and the endpoint serves exactly that CRL (DER, `application/pkix-crl`), the
    /// intermediate's too; an unknown id or file name is a 404 that says where CRLs are, and
    /// before any CA is installed the answer is 503.
    #[tokio::test]
    async fn serves_each_authoritys_crl_where_the_intermediate_points() {
        let td = TrustDomain::new("cluster.local").unwrap();
        let mut opts = CaOptions::new(td.clone());
        opts.crl_distribution_url = Some("http://crl.example/crl/".into());
        let now = ::time::OffsetDateTime::from_unix_timestamp(1_900_000_000).unwrap();
        let mut j = new_journal(&opts, now).unwrap();
        let ids: Vec<String> = j.authorities.iter().map(|a| a.id.clone()).collect();
        for id in &ids {
            crate::ca::crl::sign(&mut j, id, now, std::time::Duration::from_secs(3600)).unwrap();
        }
        let ca = Ca::new();
        let none = crl(State(ca.clone()), Path(format!("{}.crl", ids[0]))).await;
        assert_eq!(none.status(), StatusCode::SERVICE_UNAVAILABLE);
        ca.install(signer_from_journal(&j, &td).unwrap());

        let root = j.active_root().unwrap().clone();
        let int = j.active_signer().unwrap().clone();
        let int_der = x509_parser::pem::parse_x509_pem(int.cert_pem.as_bytes())
            .unwrap()
            .1
            .contents;
        let (_, cert) = X509Certificate::from_der(&int_der).unwrap();
        let cdp = cert
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::CRLDistributionPoints(p) => Some(p.clone()),
                _ => None,
            })
            .expect("the intermediate has a CRL distribution point");
        let uri = match &cdp.points[0].distribution_point {
            Some(DistributionPointName::FullName(names)) => match &names[0] {
                GeneralName::URI(u) => u.to_string(),
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        };
        assert_eq!(uri, format!("http://crl.example/crl/{}.crl", root.id));

        for a in [&root, &int] {
            let file = uri.rsplit('/').next().unwrap().replace(&root.id, &a.id);
            let res = crl(State(ca.clone()), Path(file)).await;
            assert_eq!(res.status(), StatusCode::OK);
            assert_eq!(res.headers()[header::CONTENT_TYPE], "application/pkix-crl");
            let body = axum::body::to_bytes(res.into_body(), 1 << 20)
                .await
                .unwrap();
            let (_, parsed) = CertificateRevocationList::from_der(&body).unwrap();
            let issuer_der = x509_parser::pem::parse_x509_pem(a.cert_pem.as_bytes())
                .unwrap()
                .1
                .contents;
            let (_, issuer) = X509Certificate::from_der(&issuer_der).unwrap();
            assert_eq!(parsed.issuer(), issuer.subject(), "the CRL of {}", a.id);
        }
        for bad in ["nope.crl".to_string(), ids[0].clone()] {
            let res = crl(State(ca.clone()), Path(bad)).await;
            assert_eq!(res.status(), StatusCode::NOT_FOUND);
        }
        let res = index(State(ca)).await;
        let body = axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .unwrap();
        let listed = String::from_utf8(body.to_vec()).unwrap();
        for id in &ids {
            assert!(listed.contains(&format!("{id}.crl")), "{listed}");
        }
    }
}
