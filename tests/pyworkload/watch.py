"""A SPIFFE workload written with py-spiffe (PyPI `spiffe`), a Workload API client citadel
did not write. The integration tests run it against `citadel agent --workload-api-socket`
(socket from SPIFFE_ENDPOINT_SOCKET or --socket unix:///path):

    python watch.py x509 [--timeout 60]
        Streams X.509 contexts until the timeout, one JSON line per update: the default SVID
        (id, serial, notAfter), its trust domain's roots (SHA-256 fingerprints), and whether
        the leaf verifies to those roots (cryptography's client verifier).
    python watch.py jwt --audience AUD
        Fetches a JWT-SVID and the JWT bundles, validates the token locally and through
        ValidateJWTSVID, and prints one JSON line; exit 1 on any failure.
"""

import argparse
import datetime
import json
import sys
import threading
import time

from cryptography.hazmat.primitives import hashes
from cryptography.x509.verification import PolicyBuilder, Store
from spiffe import WorkloadApiClient
from spiffe.svid.jwt_svid import JwtSvid

lock = threading.Lock()


def emit(obj):
    with lock:
        print(json.dumps(obj), flush=True)


def fingerprint(cert):
    return cert.fingerprint(hashes.SHA256()).hex()


def on_context(ctx):
    svid = ctx.default_svid
    leaf = svid.leaf
    line = {
        "kind": "svid",
        "id": str(svid.spiffe_id),
        "serial": format(leaf.serial_number, "x"),
        "not_after": int(leaf.not_valid_after_utc.timestamp()),
        "chain": len(svid.cert_chain),
    }
    bundle = ctx.x509_bundle_set.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
    roots = list(bundle.x509_authorities) if bundle else []
    line["roots"] = sorted(fingerprint(r) for r in roots)
    try:
        verifier = (
            PolicyBuilder()
            .store(Store(roots))
            .time(datetime.datetime.now(datetime.timezone.utc))
            .build_client_verifier()
        )
        verifier.verify(leaf, svid.cert_chain[1:])
        line["verified"] = True
    except Exception as e:  # reported, the test decides
        line["verify_error"] = str(e)
    emit(line)


def on_error(err):
    emit({"kind": "error", "error": str(err)})


def x509_mode(client, timeout):
    handler = client.stream_x509_contexts(on_context, on_error)
    time.sleep(timeout)
    handler.cancel()


def jwt_mode(client, audience):
    svid = client.fetch_jwt_svid(audience={audience})
    bundles = client.fetch_jwt_bundles()
    bundle = bundles.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
    if bundle is None:
        raise SystemExit("no JWT bundle for " + str(svid.spiffe_id.trust_domain))
    local = JwtSvid.parse_and_validate(svid.token, bundle, {audience})
    remote = client.validate_jwt_svid(svid.token, audience)
    emit({"id": str(local.spiffe_id), "remote_id": str(remote.spiffe_id), "audience": sorted(local.audience)})


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["x509", "jwt"])
    p.add_argument("--socket", default=None)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--audience", default="")
    a = p.parse_args()
    with WorkloadApiClient(socket_path=a.socket) as client:
        if a.mode == "x509":
            x509_mode(client, a.timeout)
        else:
            jwt_mode(client, a.audience)


if __name__ == "__main__":
    sys.exit(main())
