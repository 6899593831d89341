#!/usr/bin/env bash
# The monitor on a GPU job: two ranks, TP=2 (one node), with a slow link injected 30 s in
# (2 ms on each of rank 0's sends to rank 1). Named as the link 0 -> 1 within 60 s of the injection, and nothing
# named before it (30 s fault-free, the baselines' learning included). Where each rank has a GPU, the TP group
# runs on NCCL, whose collectives are opaque: the evidence comes from the link probes (parallel/link_probe.h),
# which the log must show; where the ranks share a GPU, the host-staged communicator's ring times its own
# transfers, as on the CPU. Skipped (77) without a usable GPU.
source "$(dirname "$0")/lib.sh"
gpu=$("$LOOM_BIN/loom" info | sed -n 's/^  GPU *: //p')
if [ "$gpu" != available ]; then
  echo "skipped: no usable GPU ($gpu)"
  exit 77
fi

NP=2 TP=2 RPN=2 FAULT_AFTER_S=30 monitored_fault gpu_link slow_link 0 --fault-peer 1 --fault-delay-ms 2 \
  --device cuda --log-level info
verdict_check gpu_link 'v["kind"] == "slow_link" and v.get("link") == {"src": 0, "dst": 1} and 0 < t <= 60.0'
log=$WORK/gpu_link/run.log
if grep -q "host-staged MPI communicator instead of NCCL" "$log"; then
  echo "ranks share a GPU: the host-staged ring's own transfer times were the evidence"
  grep -q "link probes on" "$log" && fail "link probes ran on a group that times its own transfers"
else
  grep -q "link probes on tp (NCCL)" "$log" || fail "no link probes on the NCCL group: $(grep -i probe "$log" | head -3)"
  echo "NCCL: the link probes were the evidence"
fi
echo "ok"
