#!/usr/bin/env bash
# e2e fault scenarios against a real control plane: nodes in network namespaces running
# toma-agent, two toma-operator replicas, `toma io` verifying every read and, at the end,
# every block on every mirror. Each scenario runs under continuous I/O and must end Normal
# with 0 I/O errors.
#
#   e2e/scenarios.sh [a b c d e f]    # default: all of them
#
# (a) kill -9 a disk's agent                  (b) kill -9 the leader operator during a rebuild
# (c) move a disk to another node             (d) one-way link loss client -> disk
# (e) kill -9 a client that holds locks       (f) restart etcd + kube-apiserver while degraded
# (g) SIGSTOP the leader operator: the standby takes the Lease; the resumed one steps down and
#     writes nothing
#
# Per scenario it reports the longest I/O stall and fault -> Degraded / fault -> Normal,
# measured by the workload on its own clock. Needs root (namespaces, iptables, loop devices).
# TOMA_E2E_KEEP=1 keeps the work directory (logs) after the run.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=harness/cluster.sh
source "$here/harness/cluster.sh"

[ "$(id -u)" = 0 ] || die "needs root (network namespaces, iptables, loop devices)"
scenarios=${*:-a b c d e f g}

export TOMA_E2E_BIN=${TOMA_E2E_BIN:-$("$here/tools/build.sh" kube etcd)}
target=${CARGO_TARGET_DIR:-$REPO/target}
(cd "$REPO" && cargo build -q -p toma-agent -p toma-operator -p toma-cli) || die "cargo build failed"

work=$(mktemp -d "${TMPDIR:-/tmp}/toma-e2e-scenarios.XXXXXX")
# Our own copies: a shared target directory may be rebuilt from another tree meanwhile.
BIN=$work/bin
mkdir -p "$BIN"
cp "$target/debug/toma-agent" "$target/debug/toma-operator" "$target/debug/toma" "$BIN/"
"$BIN/toma" io --help >/dev/null 2>&1 || die "$target/debug/toma has no 'io' (rebuilt from another tree?)"
results=$work/results
failed=0
finish() {
  local rc=$?
  cluster_down
  if [ $rc -ne 0 ] || [ $failed -ne 0 ]; then
    for f in "$work"/logs/*.log; do
      [ -f "$f" ] || continue
      echo "----- last lines of $(basename "$f")" >&2
      tail -n 15 "$f" >&2
    done
  fi
  # The table and the reasons come last: a CI log shows the end of the output.
  if [ -f "$results" ]; then
    echo
    echo "scenario                                  io-errors  longest-stall-ms  fault->Degraded-s  fault->Normal-s  result"
    cat "$results"
  fi
  if [ -s "$work/failures" ]; then
    echo "----- why:" >&2
    cat "$work/failures" >&2
  fi
  if [ "${TOMA_E2E_KEEP:-0}" = 1 ]; then log "kept $work"; else rm -rf "$work"; fi
  [ $failed -eq 0 ] || exit 1
  exit $rc
}
trap finish EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

T=90 # deadline (s) for anything the cluster does on its own

cluster_up "$work"
node_add n1 11
node_add n2 12
node_add n3 13 loop
node_add n4 14
node_add n5 15
for n in n1 n2 n3 n4 n5; do agent_start "$n"; done
operator_start op-1
operator_start op-2
eventually $T sh -c "[ \$(\"$TOMA_E2E_BIN/kubectl\" --kubeconfig=$WORK/kubeconfig get tomadisks -o name | wc -l) -ge 5 ]" \
  || die "agents did not register their disks"
eventually $T test -n "$(leader)" || die "no operator took the Lease"
log "5 agents registered, leader $(leader)"

# record NAME WORKLOAD RESULT
record() {
  printf '%-41s %-10s %-17s %-18s %-16s %s\n' "$1" "$(summary_field "$2" io-errors)" \
    "$(summary_field "$2" longest-stall-ms)" "$(summary_field "$2" fault-to-degraded-s)" \
    "$(summary_field "$2" fault-to-normal-s)" "$3" >>"$results"
}

# run_scenario LETTER TITLE WORKLOAD FUNCTION
run_scenario() {
  local letter=$1 title=$2 wl=$3 fn=$4 rc=0
  log "scenario ($letter) $title"
  # The scenario runs as a plain command: inside an `if` or a `||` list bash ignores `set -e`,
  # and a step that ran out of time would not stop it. A step that fails without a message of
  # its own (an `eventually` that ran out, say) is named in $WORK/failures by the ERR trap.
  set +e
  (
    set -eE
    trap 'echo "[$(date +%H:%M:%S)] ($letter) ${FUNCNAME[0]:-?}, line $LINENO: $(sed -n "${LINENO}p" "${BASH_SOURCE[0]}" | sed "s/^ *//")" >>"$WORK/failures"' ERR
    "$fn"
  )
  rc=$?
  set -e
  if [ $rc -eq 0 ] && ! workload_finish "$wl"; then
    echo "[$(date +%H:%M:%S)] ($letter) workload $wl did not end ok: $(tail -n 1 "$WORK/logs/io-$wl.log")" >>"$WORK/failures"
    rc=1
  fi
  if [ $rc -eq 0 ]; then
    record "($letter) $title" "$wl" ok
  else
    rc=1
    alive "io-$wl" && workload_finish "$wl" || true
    record "($letter) $title" "$wl" FAILED
    failed=$((failed + 1))
  fi
  sed -n '/^summary/,$p' "$WORK/logs/io-$wl.log" >&2 || true
  return 0
}

# A new volume under a workload in namespace WL: start, wait for Normal.
start_io() { # WL VOLUME IOPS [ARGS...]
  local wl=$1 vol=$2 iops=$3; shift 3
  workload_start "$wl" "$vol" --create --mirrors 2 --size-mib 32 --iops "$iops" --workers 4 "$@"
  eventually $T phase_is "$vol" Normal || die "$vol not Normal"
}

io_for_a_while() { sleep 2; } # more verified I/O after Normal (workload time, not a wait)

scenario_a() {
  start_io wa va 400
  k get tomatopologies va -w --output-watch-events=false >"$WORK/logs/watch-va.txt" 2>&1 &
  echo $! >"$WORK/pids/watch-va"
  disown $!
  local g node
  g=$(gen va); node=$(member_node va 1)
  signal_proc io-wa USR1
  kill9 "agent-$node"
  log "(a) killed agent $node"
  eventually $T phase_is va Degraded
  sleep 1
  agent_start "$node"
  eventually $T normal_after va "$g"
  io_for_a_while
  kill9 watch-va
  log "(a) kubectl get tomatopologies -w during the scenario:"
  cat "$WORK/logs/watch-va.txt" >&2
  cp "$WORK/logs/watch-va.txt" "$results.watch-a"
}

scenario_b() {
  start_io wb vb 800
  local g node lead
  g=$(gen vb); node=$(member_node vb 1)
  kill9 "agent-$node"
  eventually $T phase_is vb Degraded
  sleep 2 # degraded writes: dirty chunks for the rebuild to copy
  signal_proc io-wb USR1
  agent_start "$node"
  eventually $T sh -c "p=\$(\"$TOMA_E2E_BIN/kubectl\" --kubeconfig=$WORK/kubeconfig get tomatopology vb -o jsonpath='{.spec.phase}'); [ \"\$p\" = RebuildInit ] || [ \"\$p\" = Rebuilding ] || [ \"\$p\" = DualLock ]"
  lead=$(leader)
  log "(b) killing the leader $lead in phase $(tt vb '{.spec.phase}')"
  kill9 "$lead"
  eventually $T sh -c "h=\$(\"$TOMA_E2E_BIN/kubectl\" --kubeconfig=$WORK/kubeconfig -n toma-system get lease toma-operator-leader -o jsonpath='{.spec.holderIdentity}'); [ -n \"\$h\" ] && [ \"\$h\" != $lead ]"
  log "(b) the Lease moved to $(leader)"
  eventually $T normal_after vb "$g"
  operator_start "$lead"
  io_for_a_while
}

scenario_c() {
  start_io wc vc 400
  local g src dst disk path
  g=$(gen vc); src=$(member_node vc 1); disk=$(member_disk vc 1)
  for dst in n1 n2 n3 n4 n5; do
    [ "$dst" != "$src" ] && [ "$dst" != "$(member_node vc 0)" ] && break
  done
  signal_proc io-wc USR1
  # Unplug: the source node loses its disk (its agent restarts without it); plug the same
  # disk into dst (its agent restarts with it).
  kill9 "agent-$src"
  path=$(head -n1 "$WORK/disks/$src.list")
  : >"$WORK/disks/$src.list"
  agent_start "$src"
  echo "$path" >>"$WORK/disks/$dst.list"
  kill9 "agent-$dst"
  agent_start "$dst"
  log "(c) disk $disk ($path) moved from $src to $dst"
  eventually $T sh -c "[ \"\$(\"$TOMA_E2E_BIN/kubectl\" --kubeconfig=$WORK/kubeconfig get tomatopology vc -o jsonpath='{.spec.members[1].node}')\" = $dst ]"
  eventually $T normal_after vc "$g"
  [ "$(member_disk vc 1)" = "$disk" ] || die "member 1 is no longer disk $disk"
  io_for_a_while
}

scenario_d() {
  start_io wd vd 400
  local g node ip ns
  g=$(gen vd); node=$(member_node vd 1); ip=$(cat "$WORK/disks/$node.ip"); ns=$(ns_of wd)
  signal_proc io-wd USR1
  ip netns exec "$ns" iptables -A OUTPUT -d "$ip" -j DROP
  log "(d) client -> $node ($ip) dropped"
  eventually $T phase_is vd Degraded
  ip netns exec "$ns" iptables -D OUTPUT -d "$ip" -j DROP
  log "(d) link restored"
  eventually $T normal_after vd "$g"
  io_for_a_while
}

scenario_e() {
  # Two clients share chunk 2 (blocks 32..47; a chunk is 16 blocks, one lock): the victim
  # writes blocks 32..39, the verified workload blocks 40..63. The victim is killed while
  # it holds chunk 2's lock; the main workload's writes there wait until the agents fence it
  # (its final check also finds every mirror identical in the victim's blocks).
  start_io we ve 400 --first-block 40 --blocks 24
  signal_proc io-we USR1
  # Whether the victim holds the lock at the instant of the kill is chance: a victim killed
  # between two writes holds none. Kill victims (at most 5) until the agents report that they
  # fenced one and recovered the chunks it held locked.
  local attempt recovered=0
  recovered_count() { sed 's/\x1b\[[0-9;]*m//g' "$WORK"/logs/agent-*.log | grep -c 'recovering stale locks volume=ve' || true; }
  for attempt in 1 2 3 4 5; do
    local before
    before=$(recovered_count)
    workload_start "we$attempt" ve --first-block 32 --blocks 8 --iops 2000 --workers 8 --no-verify
    sleep 1 # let it write (workload time)
    kill9 "io-we$attempt"
    log "(e) killed client we$attempt"
    # The agents fence it after their reconnect grace (3 s).
    if eventually 15 sh -c "[ \$(sed 's/\x1b\[[0-9;]*m//g' $WORK/logs/agent-*.log | grep -c 'recovering stale locks volume=ve') -gt $before ]"; then
      recovered=1
      break
    fi
    log "(e) client we$attempt held no lock when it was killed; again"
  done
  [ $recovered = 1 ] || die "no killed client's locks were recovered in 5 attempts"
  sed 's/\x1b\[[0-9;]*m//g' "$WORK"/logs/agent-*.log | grep -E '(fencing client|recovering stale locks) volume=ve' \
    | cut -c1-200 >&2
  io_for_a_while
  phase_is ve Normal
}

scenario_f() {
  start_io wf vf 400
  local g node
  g=$(gen vf); node=$(member_node vf 1)
  signal_proc io-wf USR1
  kill9 "agent-$node"
  eventually $T phase_is vf Degraded
  log "(f) degraded; restarting etcd, kube-apiserver and kube-controller-manager"
  STOP_TIMEOUT=5 "$CP_SH" restart "$WORK/cp" >>"$WORK/logs/control-plane.log" 2>&1
  agent_start "$node"
  eventually $T normal_after vf "$g"
  io_for_a_while
}

scenario_g() {
  start_io wg vg 400
  local g node lead standby epoch resumed
  g=$(gen vg); node=$(member_node vg 1); lead=$(leader)
  if [ "$lead" = op-1 ]; then standby=op-2; else standby=op-1; fi
  signal_proc "$lead" STOP
  log "(g) paused the leader $lead (SIGSTOP)"
  eventually $T sh -c "[ \"\$(\"$TOMA_E2E_BIN/kubectl\" --kubeconfig=$WORK/kubeconfig -n toma-system get lease toma-operator-leader -o jsonpath='{.spec.holderIdentity}')\" = $standby ]" \
    || die "the standby $standby did not take the Lease"
  epoch=$(k -n toma-system get lease toma-operator-leader -o jsonpath='{.spec.leaseTransitions}')
  log "(g) $standby holds the Lease (transitions $epoch); killing agent $node while $lead is paused"
  signal_proc io-wg USR1
  kill9 "agent-$node"
  eventually $T phase_is vg Degraded
  resumed=$(date -u +%Y-%m-%dT%H:%M:%S)
  # It may have lost the Lease before (scenario (f)): wait for a new line.
  local lost_before
  lost_before=$(grep -c "lost the Lease" "$WORK/logs/$lead.log" || true)
  signal_proc "$lead" CONT
  log "(g) resumed $lead"
  eventually $T sh -c "[ \$(grep -c 'lost the Lease' '$WORK/logs/$lead.log') -gt $lost_before ]" \
    || die "$lead never noticed it lost the Lease"
  agent_start "$node"
  eventually $T normal_after vg "$g"
  io_for_a_while
  # Every topology carries the successor's epoch, and nothing the resumed leader tried to
  # write after it woke up went through.
  local epochs
  epochs=$(k get tomatopologies -o jsonpath='{range .items[*]}{.spec.leaderEpoch}{"\n"}{end}' | sort -u)
  [ "$epochs" = "$epoch" ] || die "leaderEpoch of the topologies: $epochs, want $epoch"
  if awk -v t="$resumed" '$1 >= t' "$WORK/logs/$lead.log" | grep -q "topology change"; then
    die "the deposed leader $lead changed a topology after it resumed"
  fi
  awk -v t="$resumed" '$1 >= t' "$WORK/logs/$lead.log" \
    | grep -E "lost the Lease|Deposed|deposed|conflict|stepping down" | cut -c1-220 >&2 || true
}

for s in $scenarios; do
  case $s in
    a) run_scenario a "kill a disk's agent" wa scenario_a ;;
    b) run_scenario b "kill the leader operator during a rebuild" wb scenario_b ;;
    c) run_scenario c "move a disk to another node" wc scenario_c ;;
    d) run_scenario d "one-way link loss client -> disk" wd scenario_d ;;
    e) run_scenario e "kill a client that holds locks" we scenario_e ;;
    f) run_scenario f "restart etcd + apiserver while degraded" wf scenario_f ;;
    g) run_scenario g "SIGSTOP the leader; standby takes over" wg scenario_g ;;
    *) die "unknown scenario $s (a-g)" ;;
  esac
done
