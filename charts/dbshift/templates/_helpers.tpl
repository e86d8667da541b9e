{{/* Chart name, truncated to 63 characters (a label value's limit). */}}
{{- define "dbshift.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name of the release's objects: fullnameOverride, else the release name when it already
contains the chart name, else "<release>-<chart>".
*/}}
{{- define "dbshift.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "dbshift.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels every object carries. */}}
{{- define "dbshift.labels" -}}
helm.sh/chart: {{ include "dbshift.chart" . }}
app.kubernetes.io/name: {{ include "dbshift.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: dbshift
{{- end }}

{{/* Labels that select the controller's pods (immutable once deployed). */}}
{{- define "dbshift.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dbshift.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: controller
{{- end }}

{{- define "dbshift.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "dbshift.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The controller image: repository@digest, or repository:tag (tag defaults to appVersion). */}}
{{- define "dbshift.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The per-tenant Jobs' default image: runnerImage, else the controller image. */}}
{{- define "dbshift.runnerImage" -}}
{{- default (include "dbshift.image" .) .Values.runnerImage }}
{{- end }}

{{/* Name of the leader-election Lease (in the release namespace). */}}
{{- define "dbshift.leaseName" -}}
{{- printf "%s-controller" (include "dbshift.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
PodDisruptionBudget API: policy/v1 when the API server serves it (Kubernetes 1.21+),
policy/v1beta1 otherwise (1.20). Offline rendering (`helm template`) assumes policy/v1 unless
--kube-version is below 1.21.
*/}}
{{- define "dbshift.pdbApiVersion" -}}
{{- if and (.Capabilities.APIVersions.Has "policy/v1") (semverCompare ">=1.21-0" .Capabilities.KubeVersion.Version) -}}
policy/v1
{{- else -}}
policy/v1beta1
{{- end }}
{{- end }}

{{/* Metadata of the CRD beyond its name: labels, keep policy, extra annotations. */}}
{{- define "dbshift.crdMetadata" -}}
labels:
  {{- include "dbshift.labels" . | nindent 2 }}
{{- $annotations := dict }}
{{- if .Values.crds.keep }}
{{- $_ := set $annotations "helm.sh/resource-policy" "keep" }}
{{- end }}
{{- $annotations = merge $annotations (.Values.crds.annotations | default dict) }}
{{- with $annotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
