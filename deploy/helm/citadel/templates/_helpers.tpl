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
{{- if not (regexMatch "^[a-z0-9.-]+/[a-zA-Z0-9._-]+$" .Values.podCertificates.signerName) }}
{{- fail (printf "podCertificates.signerName %q must be <domain>/<name>" .Values.podCertificates.signerName) }}
{{- end }}
{{- end }}
