# Sourced by the e2e scenarios: a Toma cluster on a real control plane.
#
# * the control plane (control-plane.sh) with kube-apiserver listening on every address;
# * a bridge and one network namespace per node, joined to it by a veth pair, on a subnet of
#   its own (no route out of it); agents (`toma-agent --node`) run inside, each on its own
#   file or loop-device disks;
# * two `toma-operator` replicas (one Lease, one leader) in the root namespace;
# * workload clients (`toma io`) in namespaces of their own;
# * fault tools: kill -9, SIGSTOP/SIGCONT, moving a disk to another node, one-way link drop
#   (iptables in a namespace), control plane restart;
# * cleanup (cluster_down, run from an EXIT trap) that leaves nothing behind: processes,
#   namespaces, links, loop devices, port reservations, temp files.
#
# Names carry a random id (TAG) and the subnet is picked at random among unused 10.x.y.0/24,
# so several runs (or other tests) can share the machine.
# shellcheck shell=bash

export NO_COLOR=1 # plain logs from toma-agent and toma-operator (grepped below)
E2E_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REPO=$(cd "$E2E_DIR/.." && pwd)
CP_SH=$E2E_DIR/harness/control-plane.sh

log() { echo "[$(date +%H:%M:%S)] $*" >&2; }
# die MESSAGE: fail; the message is also kept in $WORK/failures, which the suites print last
# (a CI log shows the end of the output).
die() {
  log "FATAL: $*"
  if [ -n "${WORK:-}" ] && [ -d "$WORK" ]; then echo "[$(date +%H:%M:%S)] $*" >>"$WORK/failures"; fi
  exit 1
}

# eventually SECONDS CMD...: retry CMD until it succeeds or the deadline passes.
eventually() {
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || return 1
    sleep 0.2
  done
}

k() { "$TOMA_E2E_BIN/kubectl" --kubeconfig="$WORK/kubeconfig" --request-timeout=10s "$@"; }

cluster_up() { # WORK_DIR
  WORK=$1
  mkdir -p "$WORK"/{logs,disks,pids}
  TAG=$(printf '%05x' $((RANDOM * 32 + RANDOM % 32)))
  BR=tmb$TAG
  local i a b
  for i in $(seq 1 50); do
    a=$((100 + RANDOM % 100)); b=$((RANDOM % 250 + 1))
    if ! ip -4 addr show | grep -q "inet 10\.$a\.$b\." && ! ip route show | grep -q "^10\.$a\.$b\."; then
      break
    fi
  done
  NET=10.$a.$b
  echo "$TAG $NET" >"$WORK/net"
  log "cluster $TAG: bridge $BR on $NET.0/24, files in $WORK"
  ip link add "$BR" type bridge
  ip addr add "$NET.1/24" dev "$BR"
  ip link set "$BR" up

  APISERVER_BIND=0.0.0.0 "$CP_SH" start "$WORK/cp" >"$WORK/logs/control-plane.log" 2>&1 \
    || { cat "$WORK/logs/control-plane.log" >&2; die "control plane did not start"; }
  eval "$("$CP_SH" env "$WORK/cp")"
  cp "$WORK/cp/kubeconfig" "$WORK/kubeconfig"
  # What nodes use: the apiserver through the bridge; its certificate names localhost.
  local port=${TOMA_E2E_APISERVER##*:}
  cp "$WORK/kubeconfig" "$WORK/node.kubeconfig"
  "$TOMA_E2E_BIN/kubectl" config --kubeconfig="$WORK/node.kubeconfig" set-cluster toma-e2e \
    --server="https://$NET.1:$port" --tls-server-name=localhost >/dev/null
  k apply -f "$REPO/crds" >/dev/null
  k wait --for=condition=established --timeout=60s crd/tomanodes.toma.io crd/tomadisks.toma.io \
    crd/tomavolumes.toma.io crd/tomatopologies.toma.io >/dev/null
  k create namespace toma-system >/dev/null
  CLUSTER_UUID=$(cat /proc/sys/kernel/random/uuid)
}

# netns_add NAME HOST_NUMBER: a namespace on the bridge at $NET.HOST_NUMBER.
netns_add() {
  local name=$1 n=$2 ns=tm$TAG$1
  ip netns add "$ns"
  ip link add "tv$TAG$n" type veth peer name eth0 netns "$ns"
  ip link set "tv$TAG$n" master "$BR" up
  ip netns exec "$ns" ip addr add "$NET.$n/24" dev eth0
  ip netns exec "$ns" ip link set eth0 up
  ip netns exec "$ns" ip link set lo up
  echo "$ns" >>"$WORK/netns"
}

ns_of() { echo "tm$TAG$1"; }

# node_add NAME HOST_NUMBER [loop]: a node with one 256 MiB disk (a file, or a loop device on one).
node_add() {
  local name=$1 n=$2 kind=${3:-file}
  netns_add "$name" "$n"
  local f=$WORK/disks/$name-0.img
  truncate -s 256M "$f"
  if [ "$kind" = loop ]; then
    local dev
    dev=$(losetup -f --show "$f")
    echo "$dev" >>"$WORK/loops"
    echo "$dev" >"$WORK/disks/$name.list"
  else
    echo "$f" >"$WORK/disks/$name.list"
  fi
  echo "$NET.$n" >"$WORK/disks/$name.ip"
}

# agent_start NAME: start NAME's agent on the disks listed in disks/NAME.list.
agent_start() {
  local name=$1 args=() d
  while read -r d; do [ -n "$d" ] && args+=(--disk "$d"); done <"$WORK/disks/$name.list"
  setsid ip netns exec "$(ns_of "$name")" "$BIN/toma-agent" --cluster "$CLUSTER_UUID" "${args[@]}" \
    --node "$name" --kubeconfig "$WORK/node.kubeconfig" --listen "$(cat "$WORK/disks/$name.ip"):7100" \
    --tick-ms 300 --ack-timeout-ms 3000 --reconnect-grace-ms 3000 --restart-grace-ms 3000 \
    --api-timeout-ms 4000 </dev/null >>"$WORK/logs/agent-$name.log" 2>&1 &
  echo $! >"$WORK/pids/agent-$name"
  disown $!
}

pid_of() { cat "$WORK/pids/$1" 2>/dev/null; }
alive() { local p; p=$(pid_of "$1"); [ -n "$p" ] && kill -0 "$p" 2>/dev/null; }

# signal_proc NAME SIGNAL
signal_proc() { local p; p=$(pid_of "$1"); [ -n "$p" ] && kill "-$2" "$p"; }

# kill9 NAME: kill -9 and wait until it is gone.
kill9() {
  local p; p=$(pid_of "$1")
  [ -n "$p" ] || return 0
  kill -KILL "$p" 2>/dev/null || true
  eventually 20 sh -c "! kill -0 $p" || die "$1 (pid $p) did not die"
  rm -f "$WORK/pids/$1"
}

operator_start() { # NAME
  local name=$1
  setsid "$BIN/toma-operator" --kubeconfig "$WORK/kubeconfig" --name "$name" \
    --metrics-addr 127.0.0.1:0 --lease-duration 6 --interval 1 --node-timeout 4 \
    --readmit-after 5 </dev/null >>"$WORK/logs/$name.log" 2>&1 &
  echo $! >"$WORK/pids/$name"
  disown $!
}

leader() { k -n toma-system get lease toma-operator-leader -o jsonpath='{.spec.holderIdentity}' 2>/dev/null; }

tt() { k get tomatopology "$1" -o jsonpath="$2" 2>/dev/null; }
phase_is() { [ "$(tt "$1" '{.spec.phase}')" = "$2" ]; }
gen() { tt "$1" '{.spec.generation}'; }
normal_after() { [ "$(tt "$1" '{.spec.phase}')" = Normal ] && [ "$(gen "$1")" -gt "$2" ]; }
member_node() { tt "$1" "{.spec.members[$2].node}"; }
member_disk() { tt "$1" "{.spec.members[$2].disk}"; }

# workload_start NAME VOLUME ARGS...: `toma io` in namespace NAME (created on first use).
workload_start() {
  local name=$1 vol=$2; shift 2
  if ! [ -e "/run/netns/$(ns_of "$name")" ]; then
    netns_add "$name" $((200 + $(wc -l <"$WORK/netns")))
  fi
  : >"$WORK/logs/io-$name.log"
  setsid ip netns exec "$(ns_of "$name")" "$BIN/toma" io --kubeconfig "$WORK/node.kubeconfig" \
    --volume "$vol" --node "$name" "$@" </dev/null >>"$WORK/logs/io-$name.log" 2>&1 &
  echo $! >"$WORK/pids/io-$name"
  disown $!
  eventually 120 grep -q 'running:' "$WORK/logs/io-$name.log" \
    || { cat "$WORK/logs/io-$name.log" >&2; die "workload $name did not start"; }
}

# workload_finish NAME: stop it (SIGTERM) and wait for its verification; succeeds if it
# ended with "ok" (no I/O error, every block verified).
workload_finish() {
  local name=$1 p
  p=$(pid_of "io-$name")
  [ -n "$p" ] && kill -TERM "$p" 2>/dev/null
  if ! eventually 180 sh -c "! kill -0 $p"; then
    log "workload $name did not finish its verification in 180 s"
    kill -KILL "$p" 2>/dev/null || true
    return 1
  fi
  rm -f "$WORK/pids/io-$name"
  [ "$(tail -n 1 "$WORK/logs/io-$name.log")" = ok ]
}

summary_field() { awk -v k="$2" '$1 == k { print $2 }' "$WORK/logs/io-$1.log"; }

cluster_down() {
  local f p
  [ -n "${WORK:-}" ] || return 0
  # Best effort all the way: a process already gone must not stop the rest of the cleanup.
  set +e
  for f in "$WORK"/pids/*; do
    [ -f "$f" ] || continue
    p=$(cat "$f")
    if [ -n "$p" ]; then
      kill -CONT "$p" 2>/dev/null
      kill -KILL "$p" 2>/dev/null
    fi
    rm -f "$f"
  done
  # Processes started in our namespaces (nothing else may run there).
  if [ -f "$WORK/netns" ]; then
    while read -r ns; do
      for p in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$p" 2>/dev/null || true; done
    done <"$WORK/netns"
  fi
  "$CP_SH" stop "$WORK/cp" >/dev/null 2>&1 || true
  if [ -f "$WORK/netns" ]; then
    while read -r ns; do ip netns del "$ns" 2>/dev/null || true; done <"$WORK/netns"
  fi
  [ -n "${BR:-}" ] && ip link del "$BR" 2>/dev/null || true
  if [ -f "$WORK/loops" ]; then
    while read -r d; do
      for _ in 1 2 3 4 5; do losetup -d "$d" 2>/dev/null && break; sleep 0.5; done
    done <"$WORK/loops"
  fi
  return 0
}
