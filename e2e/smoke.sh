#!/usr/bin/env bash
# e2e smoke test: the harness itself works. Builds (or finds cached) tools, starts a loopback
# control plane in a temp dir, and checks that ServiceAccount tokens and RBAC behave as on a
# real cluster, that helm runs and reaches the cluster, then stops and checks nothing is left.
# Set TOMA_E2E_KEEP=1 to keep the temp dir (certs, logs) after the run.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cp_sh=$here/harness/control-plane.sh
passed=0
failed=0

log() { echo "smoke: $*" >&2; }
pass() { passed=$((passed + 1)); echo "  ok   $*"; }
fail() { failed=$((failed + 1)); echo "  FAIL $*"; }

BIN=$("$here/tools/build.sh" kube etcd helm)
export TOMA_E2E_BIN=$BIN

work=$(mktemp -d "${TMPDIR:-/tmp}/toma-e2e-smoke.XXXXXX")
cleanup() {
  local rc=$?
  "$cp_sh" stop "$work" >/dev/null 2>&1 || true
  if [ $rc -ne 0 ] || [ $failed -ne 0 ]; then
    for f in "$work"/logs/*.log; do
      [ -f "$f" ] || continue
      echo "----- last lines of $(basename "$f")" >&2
      tail -n 20 "$f" >&2
    done
  fi
  if [ "${TOMA_E2E_KEEP:-0}" = 1 ]; then log "kept $work"; else rm -rf "$work"; fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

"$cp_sh" start "$work"
eval "$("$cp_sh" env "$work")"
k() { kubectl --request-timeout=10s "$@"; }
# As the ServiceAccount: no kubeconfig, only the bearer token.
as_sa() {
  kubectl --kubeconfig=/dev/null --request-timeout=10s --server="$TOMA_E2E_APISERVER" \
    --certificate-authority="$TOMA_E2E_CA" --token="$token" "$@"
}
# eventually SECONDS CMD...: retry CMD until it succeeds or the deadline passes.
eventually() {
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || return 1
    sleep 0.25
  done
}

echo "smoke checks:"
k create namespace smoke >/dev/null && pass "create namespace" || fail "create namespace"
k -n smoke create serviceaccount reader >/dev/null && pass "create ServiceAccount" || fail "create ServiceAccount"

token=$(k -n smoke create token reader --duration=10m) && [ -n "$token" ] \
  && pass "kubectl create token (TokenRequest API)" || fail "kubectl create token"

who=$(as_sa auth whoami -o jsonpath='{.status.userInfo.username}' 2>&1 || true)
[ "$who" = system:serviceaccount:smoke:reader ] && pass "token authenticates as $who" \
  || fail "token authenticates as the ServiceAccount (got: $who)"

out=$(as_sa -n smoke get pods 2>&1 || true)
if grep -q 'forbidden' <<<"$out"; then pass "listing pods without RBAC is forbidden"
else fail "listing pods without RBAC should be forbidden (got: $out)"; fi

k -n smoke create role pod-reader --verb=get,list,watch --resource=pods >/dev/null \
  && k -n smoke create rolebinding reader --role=pod-reader --serviceaccount=smoke:reader >/dev/null \
  && pass "create Role + RoleBinding" || fail "create Role + RoleBinding"

if eventually 30 as_sa -n smoke get pods; then pass "listing pods after the RoleBinding is allowed"
else fail "listing pods after the RoleBinding (got: $(as_sa -n smoke get pods 2>&1 || true))"; fi

out=$(as_sa -n default get pods 2>&1 || true)
if grep -q 'forbidden' <<<"$out"; then pass "the RoleBinding does not reach other namespaces"
else fail "listing pods in default should stay forbidden (got: $out)"; fi

# kube-controller-manager at work: the serviceaccount and root-ca-cert-publisher controllers.
if eventually 30 k -n smoke get serviceaccount default \
  && eventually 30 k -n smoke get configmap kube-root-ca.crt; then
  pass "controller-manager created ServiceAccount default and ConfigMap kube-root-ca.crt"
else fail "controller-manager did not populate namespace smoke"; fi

v=$(helm version --short 2>&1 || true)
[[ $v == v* ]] && pass "helm version: $v" || fail "helm version (got: $v)"
out=$(helm list --all-namespaces 2>&1) && pass "helm reaches the cluster (helm list)" \
  || fail "helm list (got: $out)"

pids=$(awk '{ print $2 }' "$work/pids")
"$cp_sh" stop "$work"
left=""
for p in $pids; do
  if [ -r "/proc/$p/cmdline" ] && tr '\0' ' ' <"/proc/$p/cmdline" | grep -qF "$work/"; then left+=" $p"; fi
done
[ -z "$left" ] && [ ! -e "$work/ports" ] && pass "stop leaves no process and no port reservation behind" \
  || fail "stop left processes:$left"

echo "$passed passed, $failed failed"
[ $failed -eq 0 ]
