#!/usr/bin/env bash
# Writes the plain manifests in deploy/ from the Helm chart deploy/helm/citadel, so the
# `kubectl apply -f` path and the `helm install` path cannot drift (tests/it/kit.rs renders
# again and compares byte for byte):
#
#   deploy/citadel.yaml                  the chart's defaults: the Namespace, the CRDs, citadel
#   deploy/ambient.yaml                  the RBAC ambient.enabled adds
#   deploy/multicluster.yaml             the RBAC multicluster.enabled adds
#   deploy/podcertificate-policy.yaml    the admission policy (also in deploy/citadel.yaml)
#   deploy/istio-ra.yaml                 the RBAC istioRA.enabled adds (istiod's RA mode), for
#                                        the signer names citadel.dev/spiffe and citadel.dev/legacy
#   deploy/istio-ra-auto-approve.yaml    the RBAC istioRA.autoApprove adds on top
#
#   scripts/render-deploy.sh             # rewrite them
#   scripts/render-deploy.sh --print F   # print what deploy/F should hold, change nothing
#
# Helm is $CITADEL_HELM, or built and cached by scripts/helm.sh. Every render uses release
# name `citadel` and namespace `istio-system`. The CRDs come from the chart's crds/ directory
# (deploy/crds is a link to it), which the Rust types generate (src/cluster/crds.rs).
set -euo pipefail
cd "$(dirname "$0")/.."

CHART=deploy/helm/citadel
HELM="${CITADEL_HELM:-}"
[ -n "$HELM" ] || HELM="$(scripts/helm.sh ensure)"

template() {
  "$HELM" template citadel "$CHART" --namespace istio-system "$@"
}

# The header naming where a file comes from.
generated() {
  printf '# GENERATED from the Helm chart deploy/helm/citadel by scripts/render-deploy.sh\n'
  printf '# (helm template citadel deploy/helm/citadel --namespace istio-system%s).\n' "$1"
  printf '# Do not edit: change the chart and run scripts/render-deploy.sh.\n'
}

citadel_yaml() {
  generated ""
  cat <<'HEAD'
#
# citadel as N replicas sharing one CA through the Kubernetes API (--store kube). Every rule
# below is explained in docs/kubernetes.md. Replace the image with your build. With Helm the
# namespace comes from `--namespace istio-system --create-namespace`; here it is created.
apiVersion: v1
kind: Namespace
metadata:
  name: istio-system
HEAD
  # The CRDs: Helm installs the chart's crds/ before anything else and never deletes them;
  # here they come first too. The BEGIN/END lines are how the CRD unit tests find them
  # (src/cluster/crds.rs, check_deployed).
  local f
  for f in "$CHART"/crds/*.yaml; do
    f="$(basename "$f")"
    printf -- '---\n# BEGIN crds/%s (generated; the unit tests crds_in_deploy_* keep it equal)\n' "$f"
    cat "$CHART/crds/$f"
    printf '# END crds/%s\n' "$f"
  done
  template
}

addon() { # FILE SET-FLAG HOW-TO-TURN-IT-ON...
  local file="$1" set="$2" shown="$2"
  shift 2
  # Quoted in the header when the shell would expand it ({a,b} lists).
  case "$set" in *[{}\[\]]*) shown="'$set'" ;; esac
  generated " --set $shown --show-only templates/$file"
  printf '#\n'
  printf '# %s\n' "$@"
  template --set "$set" --show-only "templates/$file"
}

# The signer names deploy/istio-ra*.yaml grant: citadel's own and one plugged-in CA.
ISTIO_RA="istioRA.enabled=true,istioRA.signerNames={citadel.dev/spiffe,citadel.dev/legacy}"

render() {
  case "$1" in
    citadel.yaml) citadel_yaml ;;
    ambient.yaml)
      addon ambient.yaml ambient.enabled=true \
        "On top of deploy/citadel.yaml; then turn ambient mode on:" \
        "  kubectl apply -f deploy/ambient.yaml" \
        "  kubectl -n istio-system set env deployment/citadel CA_TRUSTED_NODE_ACCOUNTS=istio-system/ztunnel" ;;
    multicluster.yaml)
      addon multicluster.yaml multicluster.enabled=true \
        "On top of deploy/citadel.yaml, only with --multicluster:" \
        "  kubectl apply -f deploy/multicluster.yaml" \
        "  kubectl -n istio-system patch deployment citadel --type=json \\" \
        "    -p '[{\"op\":\"add\",\"path\":\"/spec/template/spec/containers/0/args/-\",\"value\":\"--multicluster\"}]'" ;;
    podcertificate-policy.yaml)
      addon podcertificate-policy.yaml podCertificates.admissionPolicy=true \
        "deploy/citadel.yaml includes it; this file is for installs that predate that:" \
        "  kubectl apply -f deploy/podcertificate-policy.yaml" \
        "With another --pod-cert-signer-name, render the chart with podCertificates.signerName." ;;
    istio-ra.yaml)
      addon istio-ra.yaml "$ISTIO_RA" \
        "On top of deploy/citadel.yaml, for istiod in RA mode (docs/istio-ra.md):" \
        "  kubectl apply -f deploy/istio-ra.yaml" \
        "and add one --csr-signer to citadel's args for each signer name granted \`sign\` below:" \
        "  --csr-signer=citadel.dev/spiffe" \
        "  --csr-signer=citadel.dev/legacy=/etc/legacy-ca   # a plugged-in CA mounted there" \
        "For other names, render the chart with istioRA.signerNames and istioRA.mappedSigners." ;;
    istio-ra-auto-approve.yaml)
      addon istio-ra-auto-approve.yaml "$ISTIO_RA,istioRA.autoApprove={USER}" \
        "Only with --csr-auto-approve USER, on top of deploy/istio-ra.yaml: citadel approves" \
        "USER's CSRs for the signer names below. istiod approves its own and needs none of it." \
        "  kubectl apply -f deploy/istio-ra-auto-approve.yaml" ;;
    *) echo "unknown file $1" >&2; exit 2 ;;
  esac
}

FILES=(citadel.yaml ambient.yaml multicluster.yaml podcertificate-policy.yaml istio-ra.yaml
  istio-ra-auto-approve.yaml)

if [ "${1:-}" = "--print" ]; then
  render "${2:?--print FILE}"
  exit 0
fi
for f in "${FILES[@]}"; do
  render "$f" > "deploy/$f.tmp"
  mv "deploy/$f.tmp" "deploy/$f"
  echo "wrote deploy/$f" >&2
done
