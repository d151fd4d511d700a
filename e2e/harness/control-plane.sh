#!/usr/bin/env bash
# A throwaway Kubernetes control plane on loopback for the e2e suite:
# etcd + kube-apiserver (TLS, client certs, Node,RBAC, ServiceAccount tokens) +
# kube-controller-manager. No kubelet, no container runtime, no cloud.
#
#   control-plane.sh start DIR   # generate certs, start, wait until ready; writes DIR/kubeconfig
#   control-plane.sh env DIR     # prints `export ...` lines: eval "$(control-plane.sh env DIR)"
#   control-plane.sh stop DIR    # stop everything started for DIR (safe after a failed start)
#   control-plane.sh restart DIR # stop etcd, kube-apiserver and kube-controller-manager and start
#                                # them again on the same data, certificates and ports
#
# APISERVER_BIND (default 127.0.0.1) is the address kube-apiserver listens on; the e2e nodes
# (network namespaces) reach it through their bridge with APISERVER_BIND=0.0.0.0 (their
# kubeconfig names the bridge address with tls-server-name localhost).
#
# Binaries: $TOMA_E2E_BIN if set, else whatever e2e/tools/build.sh prints (it builds once and
# caches). Ports: free ones picked at random below the ephemeral range and reserved under
# ${TMPDIR:-/tmp}/toma-e2e-ports, so two harnesses on one machine never collide.
# Every wait has a deadline; the *_TIMEOUT variables below (seconds) can be raised on slow hosts.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ETCD_TIMEOUT=${ETCD_TIMEOUT:-30}
APISERVER_TIMEOUT=${APISERVER_TIMEOUT:-120}
KCM_TIMEOUT=${KCM_TIMEOUT:-90}
STOP_TIMEOUT=${STOP_TIMEOUT:-15}
# Allocated, never routed: nothing here sends traffic to a Service IP (no kube-proxy, no pods).
SERVICE_CIDR=${SERVICE_CIDR:-10.96.0.0/24}
APISERVER_BIND=${APISERVER_BIND:-127.0.0.1}
PORTS_DIR=${TMPDIR:-/tmp}/toma-e2e-ports

log() { echo "control-plane: $*" >&2; }
die() { log "$*"; exit 1; }

usage() { die "usage: $0 start|stop|restart|env DIR"; }

[ $# -eq 2 ] || usage
cmd=$1
mkdir -p "$2"
DIR=$(cd "$2" && pwd)
PKI=$DIR/pki
LOGS=$DIR/logs
PIDS=$DIR/pids

# ---------------------------------------------------------------- processes

# Is $1 a live process started for this DIR? (guards against pid reuse)
ours() {
  local pid=$1
  [ -r "/proc/$pid/cmdline" ] || return 1
  { tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null | grep -qF -- "$DIR/"
}

# stop_one NAME PID: SIGTERM, wait up to STOP_TIMEOUT, then SIGKILL.
stop_one() {
  local name=$1 pid=$2 deadline
  ours "$pid" || return 0
  log "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  deadline=$((SECONDS + STOP_TIMEOUT))
  while ours "$pid" && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
  if ours "$pid"; then
    log "$name (pid $pid) still running ${STOP_TIMEOUT}s after SIGTERM; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    deadline=$((SECONDS + 5))
    while ours "$pid" && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
  fi
}

stop_all() {
  local name pid
  if [ -f "$PIDS" ]; then
    # One at a time in reverse start order (controller-manager, apiserver, etcd): an apiserver
    # whose etcd vanishes under it retries for a long while before it exits.
    while read -r name pid; do
      [ -n "$pid" ] && stop_one "$name" "$pid"
    done < <(tac "$PIDS")
    rm -f "$PIDS"
  fi
  release_ports
}

# start NAME CMD... : run detached (own session), log to $LOGS/NAME.log, record the pid.
start_proc() {
  local name=$1; shift
  setsid "$@" </dev/null >"$LOGS/$name.log" 2>&1 &
  local pid=$!
  # Until the fork execs, /proc/PID/cmdline is this script's, and `ours`/`alive` would take
  # a process that has not started yet for one that died (seen in 2-4 % of immediate checks
  # on a loaded machine). Wait for the exec, or for the process to be gone, with a deadline.
  local deadline=$((SECONDS + 10))
  while [ -e "/proc/$pid" ] && ! ours "$pid" && [ $SECONDS -lt $deadline ]; do
    sleep 0.01
  done
  echo "$name $pid" >>"$PIDS"
  log "started $name (pid $pid, log $LOGS/$name.log)"
}

alive() { # NAME
  local pid
  pid=$(awk -v n="$1" '$1 == n { print $2 }' "$PIDS")
  [ -n "$pid" ] && ours "$pid"
}

fail_with_log() { # NAME MESSAGE
  log "$2"
  if [ -f "$LOGS/$1.log" ]; then
    log "last lines of $LOGS/$1.log:"
    tail -n 40 "$LOGS/$1.log" >&2 || true
  fi
  return 1
}

# wait_for NAME TIMEOUT DESCRIPTION CHECK... : poll CHECK until it succeeds, the process dies,
# or the deadline passes.
wait_for() {
  local name=$1 timeout=$2 what=$3; shift 3
  local deadline=$((SECONDS + timeout))
  while true; do
    if "$@" >/dev/null 2>&1; then
      log "$what: ok after $((SECONDS - t_start))s"
      return 0
    fi
    alive "$name" || { fail_with_log "$name" "$name exited while waiting for: $what"; return 1; }
    [ $SECONDS -lt $deadline ] || { fail_with_log "$name" "timed out after ${timeout}s waiting for: $what"; return 1; }
    sleep 0.25
  done
}

# ---------------------------------------------------------------- ports

release_ports() {
  local p
  [ -f "$DIR/ports" ] || return 0
  for p in $(cut -d= -f2 "$DIR/ports"); do
    if [ "$(cat "$PORTS_DIR/$p/owner" 2>/dev/null)" = "$DIR" ]; then
      rm -rf "$PORTS_DIR/$p"
    fi
  done
  rm -f "$DIR/ports"
}

# pick_port NAME: a port nobody listens on or uses, reserved for this DIR.
pick_port() {
  local name=$1 lo hi p i
  read -r lo _ </proc/sys/net/ipv4/ip_local_port_range
  hi=$((lo - 1)); lo=10000
  [ $hi -gt $lo ] || hi=30000
  mkdir -p "$PORTS_DIR"
  for ((i = 0; i < 500; i++)); do
    p=$((lo + (RANDOM * 32768 + RANDOM) % (hi - lo)))
    [ -z "$(ss -Htan "( sport = :$p )" 2>/dev/null)" ] || continue
    if ! mkdir "$PORTS_DIR/$p" 2>/dev/null; then # atomic reservation
      # Reclaim a reservation whose owner's folder is gone (a harness user that never stopped).
      local owner
      owner=$(cat "$PORTS_DIR/$p/owner" 2>/dev/null || true)
      [ -n "$owner" ] && [ ! -d "$owner" ] || continue
      rm -rf "$PORTS_DIR/$p"
      mkdir "$PORTS_DIR/$p" 2>/dev/null || continue
    fi
    echo "$DIR" >"$PORTS_DIR/$p/owner"
    echo "$name=$p" >>"$DIR/ports"
    echo "$p"
    return 0
  done
  die "no free port found after 500 tries"
}

# ---------------------------------------------------------------- certificates

gen_certs() {
  mkdir -p "$PKI"
  local o=(-days 30 -sha256)
  openssl req -x509 -newkey rsa:2048 -nodes -keyout "$PKI/ca.key" -out "$PKI/ca.crt" "${o[@]}" \
    -subj "/CN=toma-e2e-ca" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" 2>/dev/null

  # issue NAME SUBJECT EXTENSIONS
  issue() {
    openssl req -newkey rsa:2048 -nodes -keyout "$PKI/$1.key" -out "$PKI/$1.csr" -subj "$2" 2>/dev/null
    printf '%s\n' "$3" >"$PKI/$1.ext"
    openssl x509 -req -in "$PKI/$1.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial \
      -out "$PKI/$1.crt" "${o[@]}" -extfile "$PKI/$1.ext" 2>/dev/null
    rm -f "$PKI/$1.csr" "$PKI/$1.ext"
  }
  local client="basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
  issue apiserver "/CN=kube-apiserver" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc"
  issue admin "/O=system:masters/CN=toma-e2e-admin" "$client"
  issue controller-manager "/CN=system:kube-controller-manager" "$client"
  # Front proxy (aggregation layer): its own CA and the apiserver's proxy client cert.
  openssl req -x509 -newkey rsa:2048 -nodes -keyout "$PKI/front-proxy-ca.key" -out "$PKI/front-proxy-ca.crt" \
    "${o[@]}" -subj "/CN=toma-e2e-front-proxy-ca" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -keyout "$PKI/front-proxy-client.key" -out "$PKI/front-proxy-client.csr" \
    -subj "/CN=front-proxy-client" 2>/dev/null
  printf '%s\n' "$client" >"$PKI/front-proxy-client.ext"
  openssl x509 -req -in "$PKI/front-proxy-client.csr" -CA "$PKI/front-proxy-ca.crt" -CAkey "$PKI/front-proxy-ca.key" \
    -CAcreateserial -out "$PKI/front-proxy-client.crt" "${o[@]}" -extfile "$PKI/front-proxy-client.ext" 2>/dev/null
  rm -f "$PKI/front-proxy-client.csr" "$PKI/front-proxy-client.ext"

  openssl genrsa -out "$PKI/sa.key" 2048 2>/dev/null
  openssl rsa -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null
  chmod 600 "$PKI"/*.key
}

write_kubeconfig() { # FILE USER
  local f=$1 user=$2
  rm -f "$f"
  "$BIN/kubectl" config --kubeconfig="$f" set-cluster toma-e2e --server="https://127.0.0.1:$API_PORT" \
    --certificate-authority="$PKI/ca.crt" --embed-certs=true >/dev/null
  "$BIN/kubectl" config --kubeconfig="$f" set-credentials "$user" \
    --client-certificate="$PKI/$user.crt" --client-key="$PKI/$user.key" --embed-certs=true >/dev/null
  "$BIN/kubectl" config --kubeconfig="$f" set-context toma-e2e --cluster=toma-e2e --user="$user" >/dev/null
  "$BIN/kubectl" config --kubeconfig="$f" use-context toma-e2e >/dev/null
  chmod 600 "$f"
}

# ---------------------------------------------------------------- readiness checks

etcd_healthy() { curl -sf --max-time 2 "http://127.0.0.1:$ETCD_PORT/health" | grep -q '"health":"true"'; }
apiserver_ready() {
  [ "$(curl -s --max-time 3 --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key" \
    "https://127.0.0.1:$API_PORT/readyz")" = ok ]
}
default_ns() { "$BIN/kubectl" --kubeconfig="$DIR/kubeconfig" --request-timeout=5s get ns default; }
kcm_healthy() { [ "$(curl -sk --max-time 3 "https://127.0.0.1:$KCM_PORT/healthz")" = ok ]; }
# The serviceaccount controller (in kube-controller-manager) creates "default" in every namespace.
default_sa() { "$BIN/kubectl" --kubeconfig="$DIR/kubeconfig" --request-timeout=5s -n default get sa default; }

# ---------------------------------------------------------------- processes of the control plane

start_etcd() {
  start_proc etcd "$BIN/etcd" \
    --name toma-e2e \
    --data-dir "$DIR/etcd/data" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "toma-e2e=http://127.0.0.1:$ETCD_PEER_PORT" \
    --unsafe-no-fsync \
    --quota-backend-bytes $((1024 * 1024 * 1024)) \
    --log-level warn
  wait_for etcd "$ETCD_TIMEOUT" "etcd /health" etcd_healthy

}

start_apiserver() {
  # --endpoint-reconciler-type none: the `kubernetes` Service's Endpoints would name 127.0.0.1,
  # which Endpoints validation rejects; nothing here (no pods) reaches the apiserver that way.
  start_proc kube-apiserver "$BIN/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
    --bind-address "$APISERVER_BIND" \
    --advertise-address 127.0.0.1 \
    --secure-port "$API_PORT" \
    --cert-dir "$PKI" \
    --tls-cert-file "$PKI/apiserver.crt" \
    --tls-private-key-file "$PKI/apiserver.key" \
    --client-ca-file "$PKI/ca.crt" \
    --authorization-mode Node,RBAC \
    --enable-admission-plugins NodeRestriction \
    --service-account-issuer "https://127.0.0.1:$API_PORT" \
    --service-account-key-file "$PKI/sa.pub" \
    --service-account-signing-key-file "$PKI/sa.key" \
    --service-cluster-ip-range "$SERVICE_CIDR" \
    --requestheader-client-ca-file "$PKI/front-proxy-ca.crt" \
    --requestheader-allowed-names front-proxy-client \
    --requestheader-username-headers X-Remote-User \
    --requestheader-group-headers X-Remote-Group \
    --requestheader-extra-headers-prefix X-Remote-Extra- \
    --proxy-client-cert-file "$PKI/front-proxy-client.crt" \
    --proxy-client-key-file "$PKI/front-proxy-client.key" \
    --endpoint-reconciler-type none \
    --allow-privileged=true \
    --profiling=false \
    --v=1
  wait_for kube-apiserver "$APISERVER_TIMEOUT" "kube-apiserver /readyz" apiserver_ready

}

start_kcm() {
  start_proc kube-controller-manager "$BIN/kube-controller-manager" \
    --kubeconfig "$DIR/controller-manager.kubeconfig" \
    --authentication-kubeconfig "$DIR/controller-manager.kubeconfig" \
    --authorization-kubeconfig "$DIR/controller-manager.kubeconfig" \
    --bind-address 127.0.0.1 \
    --secure-port "$KCM_PORT" \
    --cert-dir "$DIR/kcm-certs" \
    --leader-elect=false \
    --controllers '*,-cloud-node-lifecycle-controller,-node-route-controller,-service-lb-controller' \
    --use-service-account-credentials=true \
    --root-ca-file "$PKI/ca.crt" \
    --service-account-private-key-file "$PKI/sa.key" \
    --cluster-signing-cert-file "$PKI/ca.crt" \
    --cluster-signing-key-file "$PKI/ca.key" \
    --service-cluster-ip-range "$SERVICE_CIDR" \
    --cluster-name toma-e2e \
    --profiling=false \
    --v=1
  wait_for kube-controller-manager "$KCM_TIMEOUT" "kube-controller-manager /healthz" kcm_healthy
  wait_for kube-controller-manager "$KCM_TIMEOUT" "ServiceAccount default/default" default_sa

}

# ---------------------------------------------------------------- commands

locate_bin() {
  if [ -n "${TOMA_E2E_BIN:-}" ]; then
    BIN=$TOMA_E2E_BIN
  else
    BIN=$("$here/../tools/build.sh" kube etcd)
  fi
  local t
  for t in etcd kube-apiserver kube-controller-manager kubectl; do
    [ -x "$BIN/$t" ] || die "$BIN/$t missing (run e2e/tools/build.sh)"
  done
}

do_start() {
  if [ -f "$PIDS" ]; then
    local name pid
    while read -r name pid; do
      ours "$pid" && die "a control plane is already running for $DIR ($name pid $pid); stop it first"
    done <"$PIDS"
    stop_all # leftovers of a dead run
  fi
  locate_bin
  started_ok=0
  trap 'if [ "$started_ok" != 1 ]; then log "start failed; cleaning up"; stop_all; fi' EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  t_start=$SECONDS
  rm -rf "$PKI" "$DIR/etcd" "$DIR/kcm-certs" "$DIR/cache" "$DIR/config" "$DIR/data" "$DIR/kubeconfig" "$DIR"/*.kubeconfig "$DIR/ports" "$DIR/env"
  mkdir -p "$LOGS" "$DIR/etcd" "$DIR/kcm-certs"
  chmod 700 "$DIR/etcd"
  : >"$PIDS"

  ETCD_PORT=$(pick_port etcd)
  ETCD_PEER_PORT=$(pick_port etcd-peer)
  API_PORT=$(pick_port apiserver)
  KCM_PORT=$(pick_port controller-manager)
  gen_certs

  echo "$APISERVER_BIND" >"$DIR/bind"
  start_etcd
  start_apiserver

  write_kubeconfig "$DIR/kubeconfig" admin
  write_kubeconfig "$DIR/controller-manager.kubeconfig" controller-manager
  wait_for kube-apiserver 30 "kubectl get ns default" default_ns

  start_kcm
  {
    printf 'export KUBECONFIG=%q\n' "$DIR/kubeconfig"
    printf 'export TOMA_E2E_BIN=%q\n' "$BIN"
    printf 'export PATH=%q:"$PATH"\n' "$BIN"
    printf 'export TOMA_E2E_APISERVER=%q\n' "https://127.0.0.1:$API_PORT"
    printf 'export TOMA_E2E_ETCD=%q\n' "http://127.0.0.1:$ETCD_PORT"
    printf 'export TOMA_E2E_CA=%q\n' "$PKI/ca.crt"
    # Keep kubectl's and helm's caches and config out of $HOME.
    printf 'export KUBECACHEDIR=%q\n' "$DIR/cache/kube"
    printf 'export HELM_CACHE_HOME=%q\n' "$DIR/cache/helm"
    printf 'export HELM_CONFIG_HOME=%q\n' "$DIR/config/helm"
    printf 'export HELM_DATA_HOME=%q\n' "$DIR/data/helm"
  } >"$DIR/env"
  started_ok=1
  log "control plane ready in $((SECONDS - t_start))s: KUBECONFIG=$DIR/kubeconfig"
}

port_of() { awk -F= -v n="$1" '$1 == n { print $2 }' "$DIR/ports"; }

# Stops the processes (ports stay reserved, data and certificates stay) and starts them again.
do_restart() {
  [ -f "$DIR/ports" ] && [ -f "$DIR/kubeconfig" ] || die "no control plane was started in $DIR"
  locate_bin
  local name pid
  if [ -f "$PIDS" ]; then
    while read -r name pid; do
      [ -n "$pid" ] && stop_one "$name" "$pid"
    done < <(tac "$PIDS")
  fi
  : >"$PIDS"
  ETCD_PORT=$(port_of etcd)
  ETCD_PEER_PORT=$(port_of etcd-peer)
  API_PORT=$(port_of apiserver)
  KCM_PORT=$(port_of controller-manager)
  APISERVER_BIND=$(cat "$DIR/bind" 2>/dev/null || echo 127.0.0.1)
  t_start=$SECONDS
  start_etcd
  start_apiserver
  wait_for kube-apiserver 30 "kubectl get ns default" default_ns
  start_kcm
  log "control plane restarted in $((SECONDS - t_start))s"
}

case $cmd in
  start) do_start ;;
  restart) do_restart ;;
  stop) stop_all; log "stopped ($DIR)" ;;
  env)
    [ -f "$DIR/env" ] || die "no running control plane in $DIR (start it first)"
    cat "$DIR/env"
    ;;
  *) usage ;;
esac
