{{/* Chart name, truncated to 63 characters (a DNS label). */}}
{{- define "finetune-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: <release>-<chart>, or the release name when it already contains the chart name. */}}
{{- define "finetune-operator.fullname" -}}
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

{{- define "finetune-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object except the component. */}}
{{- define "finetune-operator.commonLabels" -}}
helm.sh/chart: {{ include "finetune-operator.chart" . }}
app.kubernetes.io/name: {{ include "finetune-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: finetune
{{- end }}

{{/* Labels of the operator's objects. */}}
{{- define "finetune-operator.labels" -}}
{{ include "finetune-operator.commonLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{/* Selector labels of the operator pod (immutable once deployed: keep them stable). */}}
{{- define "finetune-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "finetune-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "finetune-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "finetune-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "finetune-operator.trainerServiceAccountName" -}}
{{- default (printf "%s-trainer" (include "finetune-operator.fullname" .) | trunc 63 | trimSuffix "-") .Values.trainer.serviceAccount.name }}
{{- end }}

{{/* Namespaces the operator watches when not cluster-wide (default: the release namespace). */}}
{{- define "finetune-operator.watchNamespaces" -}}
{{- if .Values.watchNamespaces }}
{{- join "," (uniq .Values.watchNamespaces) }}
{{- else }}
{{- .Release.Namespace }}
{{- end }}
{{- end }}

{{/* repository[:tag][@digest] */}}
{{- define "finetune-operator.imageRef" -}}
{{- $img := index . 0 }}{{- $appVersion := index . 1 }}
{{- if $img.digest }}
{{- printf "%s@%s" $img.repository $img.digest }}
{{- else }}
{{- printf "%s:%s" $img.repository (default $appVersion $img.tag) }}
{{- end }}
{{- end }}

{{- define "finetune-operator.image" -}}
{{- include "finetune-operator.imageRef" (list .Values.image .Chart.AppVersion) }}
{{- end }}

{{- define "finetune-operator.trainerImage" -}}
{{- include "finetune-operator.imageRef" (list .Values.trainer.image .Chart.AppVersion) }}
{{- end }}

{{- define "finetune-operator.serveImage" -}}
{{- include "finetune-operator.imageRef" (list .Values.serving.image .Chart.AppVersion) }}
{{- end }}

{{- define "finetune-operator.progressURL" -}}
{{- default (printf "http://%s.%s.svc:%d" (include "finetune-operator.fullname" .) .Release.Namespace (int .Values.server.port)) .Values.server.progressURL }}
{{- end }}
