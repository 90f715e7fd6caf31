{{/*
Names, labels, images and the pieces every workload shares. Each workload template calls
these, so the security contexts, the settings and the secret mounts are written once.
*/}}

{{- define "faas-async.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "faas-async.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* A component's object name: <fullname>-<component>. */}}
{{- define "faas-async.component" -}}
{{- printf "%s-%s" (include "faas-async.fullname" .root) .component | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "faas-async.selectorLabels" -}}
app.kubernetes.io/name: {{ include "faas-async.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "faas-async.labels" -}}
{{ include "faas-async.selectorLabels" . }}
app.kubernetes.io/part-of: faas-async
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "faas-async.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/* The NATS URL both binaries are given: the chart's own NATS Service, or nats.externalUrl. */}}
{{- define "faas-async.natsUrl" -}}
{{- if .Values.nats.enabled -}}
{{- printf "nats://%s:%d" (include "faas-async.component" (dict "root" . "component" "nats")) (int .Values.nats.clientPort) -}}
{{- else -}}
{{- required "nats.externalUrl is required when nats.enabled is false" .Values.nats.externalUrl -}}
{{- end -}}
{{- end -}}

{{/* Stream and KV replicas: nats.streamReplicas, else 3 for a cluster of 3 or more, else 1. */}}
{{- define "faas-async.streamReplicas" -}}
{{- if .Values.nats.streamReplicas -}}
{{- int .Values.nats.streamReplicas -}}
{{- else if and .Values.nats.enabled (ge (int .Values.nats.replicas) 3) -}}
3
{{- else -}}
1
{{- end -}}
{{- end -}}

{{/*
The pod-level security context: the chart's restricted defaults merged with the values'
podSecurityContext (which adds fsGroup or a UID where a platform needs one; OpenShift
assigns both itself).
*/}}
{{- define "faas-async.podSecurityContext" -}}
{{- $base := dict "runAsNonRoot" true "seccompProfile" (dict "type" "RuntimeDefault") -}}
{{- toYaml (mergeOverwrite $base (deepCopy (default (dict) .))) -}}
{{- end -}}

{{/*
The container-level security context of the Pod Security "restricted" profile and of
OpenShift's restricted-v2 SCC. The fields below are fixed: values can add to them
(containerSecurityContext), never loosen them.
*/}}
{{- define "faas-async.containerSecurityContext" -}}
{{- $extra := deepCopy (default (dict) .) -}}
{{- $fixed := dict "allowPrivilegeEscalation" false "readOnlyRootFilesystem" true "runAsNonRoot" true "privileged" false "capabilities" (dict "drop" (list "ALL")) "seccompProfile" (dict "type" "RuntimeDefault") -}}
{{- toYaml (mergeOverwrite $extra $fixed) -}}
{{- end -}}

{{/* Environment from a settings map (variable: value), sorted, every value a string. */}}
{{- define "faas-async.settingsEnv" -}}
{{- range $k, $v := . }}
- name: {{ $k }}
  value: {{ $v | toString | quote }}
{{- end }}
{{- end -}}

{{/* Topology spread across nodes (and zones where the nodes carry zone labels). */}}
{{- define "faas-async.topologySpread" -}}
{{- $spread := .spread -}}
{{- if $spread.enabled }}
topologySpreadConstraints:
  - maxSkew: {{ $spread.maxSkew }}
    topologyKey: kubernetes.io/hostname
    whenUnsatisfiable: {{ $spread.whenUnsatisfiable }}
    labelSelector:
      matchLabels:
        {{- include "faas-async.selectorLabels" (dict "root" .root "component" .component) | nindent 8 }}
  - maxSkew: {{ $spread.maxSkew }}
    topologyKey: topology.kubernetes.io/zone
    whenUnsatisfiable: ScheduleAnyway
    labelSelector:
      matchLabels:
        {{- include "faas-async.selectorLabels" (dict "root" .root "component" .component) | nindent 8 }}
{{- end }}
{{- end -}}

{{/* The secret files (auth, signing, encryption): a volume from an existing Secret. */}}
{{- define "faas-async.secretVolume" -}}
{{- if .Values.secretFiles.existingSecret }}
- name: secret-files
  secret:
    secretName: {{ .Values.secretFiles.existingSecret }}
    defaultMode: 0440
{{- end }}
{{- end -}}

{{- define "faas-async.secretMount" -}}
{{- if .Values.secretFiles.existingSecret }}
- name: secret-files
  mountPath: {{ .Values.secretFiles.mountPath }}
  readOnly: true
{{- end }}
{{- end -}}

{{- define "faas-async.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- end -}}

{{/* nats.conf of the chart's NATS cluster. */}}
{{- define "faas-async.natsConf" -}}
{{- $n := .Values.nats -}}
{{- $name := include "faas-async.component" (dict "root" . "component" "nats") -}}
{{- $headless := printf "%s-headless" $name -}}
# NATS with JetStream for faas-async. server_name comes from the pod's name.
server_name: $SERVER_NAME
port: {{ $n.clientPort }}
http_port: {{ $n.monitorPort }}
pid_file: /var/run/nats/nats.pid
max_payload: {{ int $n.maxPayload }}
lame_duck_duration: {{ $n.lameDuckSeconds }}s
lame_duck_grace_period: 10s
jetstream {
  store_dir: /data/jetstream
  max_memory_store: {{ $n.jetstream.maxMemoryStore }}
  max_file_store: {{ $n.jetstream.maxFileStore }}
}
{{- if gt (int $n.replicas) 1 }}
cluster {
  name: {{ $n.clusterName }}
  port: {{ $n.clusterPort }}
  routes: [
    {{- range $i := until (int $n.replicas) }}
    nats://{{ $name }}-{{ $i }}.{{ $headless }}.{{ $.Release.Namespace }}.svc.{{ $.Values.clusterDomain }}:{{ $n.clusterPort }}
    {{- end }}
  ]
  connect_retries: 120
}
{{- end }}
{{- end -}}
