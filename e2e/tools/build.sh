#!/usr/bin/env bash
# Builds the pinned binaries the e2e suite runs (kube-apiserver, kube-controller-manager,
# kubectl, etcd, helm, csi-sanity, csi-provisioner, csi-resizer) from the Go module proxy.
#
# Each tool family is a small wrapper module beside this script (kube/, etcd/, helm/, csi/,
# csi-provisioner/) whose go.mod pins the upstream release through a `tool` directive; their
# dependency graphs conflict (different k8s.io/* minors), hence one module per family.
#
# Output: $TOMA_E2E_TOOLS_CACHE/<key>/bin (default cache: $HOME/.cache/toma-e2e-tools), where
# <key> hashes every go.mod/go.sum here, this script, and the Go version/platform. A clone in
# any folder reuses the same binaries; changing a pin rebuilds into a new key. Idempotent and
# safe against concurrent runs (flock); deleting the cache only costs a rebuild.
# Prints the bin directory on stdout as its last (and only) stdout line; progress goes to stderr.
#
#   build.sh                 # every family
#   build.sh kube etcd helm  # only these (what the control plane and the smoke test need)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if ! command -v go >/dev/null 2>&1 && [ -x /usr/local/go/bin/go ]; then
  PATH=$PATH:/usr/local/go/bin
fi
command -v go >/dev/null 2>&1 || { echo "build.sh: go not found (Go >= 1.26 is needed)" >&2; exit 1; }

export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=readonly
log() { echo "e2e-tools: $*" >&2; }

families=(kube etcd helm csi csi-provisioner)
wanted=("$@")
[ ${#wanted[@]} -gt 0 ] || wanted=("${families[@]}")
for w in "${wanted[@]}"; do
  [[ " ${families[*]} " == *" $w "* ]] || { echo "build.sh: unknown family '$w' (${families[*]})" >&2; exit 2; }
done

key=$(
  {
    go env GOVERSION GOOS GOARCH
    sha256sum "$here/build.sh" | cut -d' ' -f1
    for f in "${families[@]}"; do
      for g in go.mod go.sum; do
        printf '%s/%s ' "$f" "$g"
        sha256sum "$here/$f/$g" | cut -d' ' -f1
      done
    done
  } | sha256sum | cut -c1-16
)
cache=${TOMA_E2E_TOOLS_CACHE:-$HOME/.cache/toma-e2e-tools}
dir=$cache/$key
bin=$dir/bin

# name|family|package|version-module (for -X stamping; empty when none)
tools=(
  "kube-apiserver|kube|k8s.io/kubernetes/cmd/kube-apiserver|k8s.io/kubernetes"
  "kube-controller-manager|kube|k8s.io/kubernetes/cmd/kube-controller-manager|k8s.io/kubernetes"
  "kubectl|kube|k8s.io/kubernetes/cmd/kubectl|k8s.io/kubernetes"
  "etcd|etcd|go.etcd.io/etcd/server/v3|"
  "helm|helm|helm.sh/helm/v4/cmd/helm|helm.sh/helm/v4"
  "csi-sanity|csi|github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity|"
  "csi-resizer|csi|github.com/kubernetes-csi/external-resizer/v2/cmd/csi-resizer|github.com/kubernetes-csi/external-resizer/v2"
  "csi-provisioner|csi-provisioner|github.com/kubernetes-csi/external-provisioner/v6/cmd/csi-provisioner|github.com/kubernetes-csi/external-provisioner/v6"
)

family_done() { # FAMILY
  [ -f "$dir/.complete-$1" ] || return 1
  local t name family
  for t in "${tools[@]}"; do
    IFS='|' read -r name family _ <<<"$t"
    [ "$family" != "$1" ] || [ -x "$bin/$name" ] || return 1
  done
}
todo() { # the wanted families not built yet
  local f
  for f in "${wanted[@]}"; do family_done "$f" || echo "$f"; done
}

if [ -z "$(todo)" ]; then
  log "up to date ($bin)"
  echo "$bin"
  exit 0
fi

mkdir -p "$bin"
chmod 755 "$dir" "$bin"
exec 9>"$dir/.lock"
flock 9 # one build per key at a time; a second run waits, then finds the work done

tmp=$(mktemp -d "$dir/.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
start=$SECONDS
log "building $(todo | tr '\n' ' ')into $bin ($(go env GOVERSION), key $key)"

ldflags_for() { # name family vmodule
  local name=$1 family=$2 vmod=$3 v
  [ -n "$vmod" ] || { echo "-s -w"; return; }
  v=$(cd "$here/$family" && go list -m -f '{{.Version}}' "$vmod")
  case $name in
    kube-*|kubectl)
      local minor=${v#v1.}; minor=${minor%%.*}
      local x=""
      for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        x+=" -X $p.gitVersion=$v -X $p.gitMajor=1 -X $p.gitMinor=$minor"
        x+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
      done
      echo "-s -w$x" ;;
    helm) echo "-s -w -X helm.sh/helm/v4/internal/version.version=$v -X helm.sh/helm/v4/internal/version.gitTreeState=clean" ;;
    *) echo "-s -w -X main.version=$v" ;;
  esac
}

for f in $(todo); do
  for t in "${tools[@]}"; do
    IFS='|' read -r name family pkg vmod <<<"$t"
    [ "$family" = "$f" ] || continue
    t0=$SECONDS
    log "go build $name ($pkg)"
    (cd "$here/$family" && go build -trimpath -buildvcs=false \
      -ldflags "$(ldflags_for "$name" "$family" "$vmod")" -o "$tmp/$name" "$pkg")
    mv -f "$tmp/$name" "$bin/$name"
    log "  $name done in $((SECONDS - t0))s"
  done
  touch "$dir/.complete-$f"
done

log "built in $((SECONDS - start))s"
echo "$bin"
