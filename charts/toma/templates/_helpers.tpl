{{- define "toma.labels" -}}
app.kubernetes.io/part-of: toma
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}

{{- define "toma.image" -}}
{{- $root := index . 0 -}}{{- $name := index . 1 -}}
{{- $tag := default $root.Chart.AppVersion $root.Values.image.tag -}}
{{- if $root.Values.image.registry -}}{{ $root.Values.image.registry }}/{{- end -}}{{ $name }}:{{ $tag }}
{{- end -}}
