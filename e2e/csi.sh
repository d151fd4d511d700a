#!/usr/bin/env bash
# e2e for the CSI driver (csi-driver/README.md): csi-sanity (mount and block), a member's
# agent killed under a mounted volume, a node-plugin restart under writes, volume expansion
# through the node path, and the Helm chart installed into the harness apiserver with
# external-provisioner/resizer as processes.
# Each test starts its own control plane in a temp dir and cleans up (even on failure).
# Needs root (mounts, loop devices, FUSE); TOMA_E2E_REQUIRED=1 makes a missing tool a failure.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BIN=$("$here/tools/build.sh" kube etcd helm csi csi-provisioner)
export TOMA_E2E_BIN=$BIN TOMA_E2E_REQUIRED=1 TOMA_E2E_CSI=1
cd "$here/.."
exec ${CARGO:-cargo} nextest run -p toma-csi --locked --no-fail-fast --test-threads 1 \
  --test e2e_sanity --test e2e_faults --test e2e_expand --test e2e_helm
