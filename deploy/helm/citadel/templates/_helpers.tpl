{{/*
Labels on every object: who it belongs to. The Deployment's selector stays `app: citadel`
(immutable on a live Deployment, and what deploy/citadel.yaml has always used).
*/}}
{{- define "citadel.labels" -}}
app: citadel
app.kubernetes.io/name: citadel
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}

{{/* The ServiceAccount every binding names. */}}
{{- define "citadel.subject" -}}
- kind: ServiceAccount
  name: citadel
  namespace: {{ .Release.Namespace }}
{{- end }}

{{/* Whether the CA state lives in the API server (and so every cluster feature is on). */}}
{{- define "citadel.kube" -}}
{{- if eq .Values.store "kube" }}true{{ end }}
{{- end }}

{{/* Pod Certificates: asked for, and possible (store: kube). */}}
{{- define "citadel.podCertificates" -}}
{{- if and .Values.podCertificates.enabled (eq .Values.store "kube") }}true{{ end }}
{{- end }}

{{/* The bundle's name: the signer name with / as :, then :roots. */}}
{{- define "citadel.trustBundleName" -}}
{{ .Values.podCertificates.signerName | replace "/" ":" }}:roots
{{- end }}

{{/* istioRA: every signer name citadel answers CSRs for, own CA first, then the mapped. */}}
{{- define "citadel.istioRA.names" -}}
{{- $names := .Values.istioRA.signerNames | default list }}
{{- range .Values.istioRA.mappedSigners }}
{{- $names = append $names .name }}
{{- end }}
{{- toJson $names }}
{{- end }}

{{/* istioRA: the signer names as a flow list for an RBAC rule's resourceNames. */}}
{{- define "citadel.istioRA.resourceNames" -}}
[{{ range $i, $n := include "citadel.istioRA.names" . | fromJsonArray }}{{ if $i }}, {{ end }}{{ $n | quote }}{{ end }}]
{{- end }}

{{/* istioRA: the Secrets of mappedSigners, each once (one volume each). */}}
{{- define "citadel.istioRA.secrets" -}}
{{- $secrets := list }}
{{- range .Values.istioRA.mappedSigners }}
{{- $secrets = append $secrets .secret }}
{{- end }}
{{- toJson (uniq $secrets) }}
{{- end }}

{{/* Values that cannot work together fail the render, with the reason. */}}
{{- define "citadel.validate" -}}
{{- if not (has .Values.store (list "kube" "file")) }}
{{- fail (printf "store must be kube or file, not %q" .Values.store) }}
{{- end }}
{{- if and (eq .Values.store "file") (ne (int .Values.replicaCount) 1) }}
{{- fail (printf "store: file keeps the CA in one pod's volume: replicaCount must be 1, not %v (use store: kube for more)" .Values.replicaCount) }}
{{- end }}
{{- if lt (int .Values.replicaCount) 1 }}
{{- fail "replicaCount must be at least 1" }}
{{- end }}
{{- if not (regexMatch "^[a-z0-9._-]+$" .Values.trustDomain) }}
{{- fail (printf "trustDomain %q: lowercase letters, digits, '.', '_' and '-' only" .Values.trustDomain) }}
{{- end }}
{{- if and .Values.ambient.enabled (empty .Values.ambient.trustedNodeAccounts) }}
{{- fail "ambient.enabled needs at least one ambient.trustedNodeAccounts entry (NAMESPACE/NAME)" }}
{{- end }}
{{- with .Values.istioRA }}
{{- if .enabled }}
{{- if ne $.Values.store "kube" }}
{{- fail "istioRA (the CSR signer) needs store: kube" }}
{{- end }}
{{- $names := include "citadel.istioRA.names" $ | fromJsonArray }}
{{- if empty $names }}
{{- fail "istioRA.enabled needs at least one signer name (istioRA.signerNames or istioRA.mappedSigners)" }}
{{- end }}
{{- range $i, $n := $names }}
{{- if not (regexMatch "^[a-z0-9-]+(\\.[a-z0-9-]+)+/[a-z0-9.-]+$" (toString $n)) }}
{{- fail (printf "istioRA signer name %q must be <domain>/<name>, lowercase" $n) }}
{{- end }}
{{- if regexMatch "^([^/]*\\.)?(kubernetes|k8s)\\.io/" $n }}
{{- fail (printf "istioRA signer name %q: kubernetes.io and k8s.io names are reserved for Kubernetes" $n) }}
{{- end }}
{{- if has $n (slice $names 0 $i) }}
{{- fail (printf "istioRA signer name %q is given twice" $n) }}
{{- end }}
{{- end }}
{{- range .mappedSigners }}
{{- if not (regexMatch "^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$" (toString .secret)) }}
{{- fail (printf "istioRA.mappedSigners %q: secret must name a Secret (lowercase DNS name)" .name) }}
{{- end }}
{{- end }}
{{- if empty .istiodRequesters }}
{{- fail "istioRA.istiodRequesters needs at least one username (istiod's: system:serviceaccount:istio-system:istiod)" }}
{{- end }}
{{- range concat .istiodRequesters (.autoApprove | default list) }}
{{- if not (regexMatch "\\S" (toString .)) }}
{{- fail "istioRA.istiodRequesters and istioRA.autoApprove take usernames, not blanks" }}
{{- end }}
{{- end }}
{{- if and .rootSecret (not (regexMatch "^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$" .rootSecret)) }}
{{- fail (printf "istioRA.rootSecret %q must name a Secret (lowercase DNS name)" .rootSecret) }}
{{- end }}
{{- end }}
{{- end }}
{{- if not (regexMatch "^[a-z0-9.-]+/[a-zA-Z0-9._-]+$" .Values.podCertificates.signerName) }}
{{- fail (printf "podCertificates.signerName %q must be <domain>/<name>" .Values.podCertificates.signerName) }}
{{- end }}
{{- end }}
