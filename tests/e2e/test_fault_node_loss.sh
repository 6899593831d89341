#!/usr/bin/env bash
# Node loss with erasure coding, 4 emulated nodes of one rank each in an EC group of 4 with 1 parity:
#  - one node loses everything (its rank, its snapshot daemon and its shared memory): the restarted job rebuilds
#    that node's snapshots from the other daemons' data and parity and continues bit-identically;
#  - two nodes lose everything (more than parity covers): the job says so and falls back to HDF5.
source "$(dirname "$0")/lib.sh"
gpt=$LOOM_BIN/gpt-train
args=("${SMALL[@]}" --steps 30 --ranks-per-node 1 --ec-group 4 --ec-parity 1 --persist-every 10 --log-level info)
mpi 4 "$gpt" "${args[@]}" --snapshot-job nref$$ --snapshot-dir "$WORK/ref" --metrics-file "$WORK/reference.jsonl" >/dev/null

lose_node() {  # job node: its daemon and its rank's shared memory are gone, as if the machine died
  local pid
  pid=$(cat /tmp/loom-$(id -u)/"$1"-node"$2".sock.lock 2>/dev/null || true)
  [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null
  rm -f /dev/shm/loom-$(id -u)-"$1"-r"$2"
}

# One node lost.
job=node$$
m=$WORK/one.jsonl
if mpi 4 "$gpt" "${args[@]}" --snapshot-job "$job" --snapshot-dir "$WORK/one" --metrics-file "$m" --fault-kind crash \
  --fault-rank 2 --fault-step 17 >"$WORK/crash1.log" 2>&1; then fail "the crash run exited 0"; fi
grep -q "erasure coding: groups of 4 nodes, parity 1" "$WORK/crash1.log" || fail "erasure coding was not set up"
sleep 1
"$LOOM_BIN/loom" inspect "job:$job:0" | grep "ec:" || true
lose_node "$job" 2
mpi 4 "$gpt" "${args[@]}" --snapshot-job "$job" --snapshot-dir "$WORK/one" --metrics-file "$m" >"$WORK/resume1.log" 2>&1 ||
  { cat "$WORK/resume1.log"; fail "the restart after losing node 2 failed"; }
grep -E "lost|rebuild|resumed|falling" "$WORK/resume1.log"
grep -q "node(s) 2 lost their snapshots: rebuilding step" "$WORK/resume1.log" || fail "node 2 was not rebuilt from the EC group"
grep -q "resumed from the in-memory snapshot of step 1[5-7]" "$WORK/resume1.log" || fail "no resume from memory after the rebuild"
same_run "$m" "$WORK/reference.jsonl" || fail "the run rebuilt from parity diverged"
echo "one node lost: rebuilt from parity, continuation identical"

# Two nodes lost: more than one parity covers; HDF5 (step 10) takes over.
job=node2$$
m=$WORK/two.jsonl
if mpi 4 "$gpt" "${args[@]}" --snapshot-job "$job" --snapshot-dir "$WORK/two" --metrics-file "$m" --fault-kind crash \
  --fault-rank 1 --fault-step 17 >/dev/null 2>&1; then fail "the crash run exited 0"; fi
sleep 1
lose_node "$job" 1
lose_node "$job" 3
mpi 4 "$gpt" "${args[@]}" --snapshot-job "$job" --snapshot-dir "$WORK/two" --metrics-file "$m" >"$WORK/resume2.log" 2>&1 ||
  { cat "$WORK/resume2.log"; fail "the restart after losing nodes 1 and 3 failed"; }
grep -E "lost|rebuild|resumed|falling" "$WORK/resume2.log"
grep -q "cannot rebuild from erasure coding: 2 of the 4 nodes of EC group 0 lost .*parity covers 1; falling back to HDF5" \
  "$WORK/resume2.log" || fail "the fallback to HDF5 was not announced"
grep -q "resumed from the HDF5 snapshot of step 10" "$WORK/resume2.log" || fail "no resume from HDF5 step 10"
same_run "$m" "$WORK/reference.jsonl" || fail "the run resumed from HDF5 diverged"
echo "two nodes lost: beyond parity, resumed from HDF5 step 10, continuation identical"
