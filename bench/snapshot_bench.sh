#!/usr/bin/env bash
# Snapshot benchmark (issue 6) on one GPU: what in-memory snapshots cost a training step and how fast they bring a
# job back, against the limits measured in the same invocation and against PyTorch's checkpointing of the same
# state. Writes $OUT/snapshot.json (and logs under $OUT/snap/); prints a summary table last.
#
#   source .device/env.sh && OUT=... bash bench/snapshot_bench.sh [--budget S] [--steps N] [--parts LIST]
#     --parts  comma-separated subset of copy,steps,restore,torch,ec,ecbench (default: all, in that order; restore
#              needs the HDF5 file and the daemon job that steps leaves)
#   Each gpt-train start of the 0.95B model took about 80 s before its first step on the H100 machine when these
#   figures were taken: ~58 s of serial parameter initialisation (fixed since: ~8 s) and ~20 s to create,
#   prefault and page-lock the snapshot buffers; the part timeouts allow for it.
#
# Protocol (every part in this one invocation, one after another, nothing else on the GPU):
#   1. machine: /dev/shm size and free memory decide the model. The reference model (ref-0.95b, TP=1) keeps
#      3 x 12 B x 0.953 G = 34.3 GB of snapshot buffers in /dev/shm; when /dev/shm cannot hold that plus 10 %,
#      the model keeps dim 2048 and loses layers until it fits, and the JSON says so ("model").
#   2. copy limits (bench/torch_snapshot_peer.py --part copy): pinned device-to-host in 64 MiB chunks on a side
#      stream (what Loom's staging does), 4 GiB, 2 warm-up + 10 timed copies, median.
#   3. step time, snapshots off: gpt-train, N steps (default 25), --snapshot-every 0. The first 3 steps are
#      warm-up (GEMM plans, arena growth); the figure is the median (and mean) step_time_s of the rest.
#   4. step time, snapshot after every step: the same run with --snapshot-every 1 (daemon started by the
#      trainer, buffers page-locked once), HDF5 persistence of the last version only (--persist-every N), so the
#      disk write happens after training and never overlaps the timed steps. stall_fraction = (median step on -
#      median step off) / median step off. On CUDA the optimizer's wait for the copy is a stream wait, invisible
#      to the host, so the step-time difference is the stall ("optimizer waited" in the log is host time only).
#      staging_GBps = bytes per version / mean copy time (the trainer's "GB per version, copied in" line: from the
#      copy's enqueue until the staging thread sees it complete).
#   5. persist: seconds from the trainer's exit until its daemon exits, which it does only after the last HDF5
#      file is written and fsynced (CRC + HDF5 write + fsync + rename of one version).
#   6. restore from HDF5: a restart of the same job after its daemon is gone (no memory): the page cache is
#      dropped first (echo 3 > /proc/sys/vm/drop_caches; the JSON says whether that was allowed); it runs 3
#      steps and is SIGKILLed after the third (fault injection), so its daemon keeps versions in memory.
#   7. restore from memory: a restart of the same job; the daemon still holds the newest committed version.
#      Restore times are the trainer's "restore: resumed from X in S s" line: the whole ladder (MPI agreement on
#      the version, CRC re-check of the buffer, copy to the GPU, weights derived from the master).
#   8. the peer: torch.save / torch.load and torch.distributed.checkpoint save / load of three f32 tensors of the
#      same element count (bench/torch_snapshot_peer.py --part ckpt), to the same local disk, cold page cache.
#   9. erasure coding (4 emulated nodes of one rank, EC group 4 with 1 parity, a smaller model on the CPU device
#      since 4 ranks of the reference model do not fit one GPU): restore from memory, then after one node's
#      daemon and shared memory are removed (as tests/e2e/test_fault_node_loss.sh does) the rebuild from parity;
#      and, in a job of its own with the same model and layout, the restore from HDF5 (cold cache).
#  10. ec_bench (one core, ISA-L Reed-Solomon; 64 MiB, 1 warm-up + 5 timed, median) on this machine's CPU.
# Single timed runs (3-9) are single measurements; a part that does not finish in its timeout is reported as
# missing, not guessed.
set -uo pipefail

budget=540
steps=25
parts=copy,steps,restore,torch,ec,ecbench
while [ $# -gt 0 ]; do
  case $1 in
    --budget) budget=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --parts) parts=$2; shift 2 ;;
    -h | --help) sed -n '2,46p' "$0"; exit 0 ;;
    *) echo "snapshot_bench.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
done

OUT=${OUT:-$PWD/device_out}
S=$OUT/snap
mkdir -p "$S"
W=${SNAP_WORK:-/tmp/loom-snapbench}
rm -rf "$W"
mkdir -p "$W"
GPT=${GPT:-$(command -v gpt-train || echo .device/prefix/bin/gpt-train)}
EC_BENCH=${EC_BENCH:-$(command -v ec_bench || echo .device/tests/ec_bench)}
DATASET=${DATASET:-.device/fortunes.bin}
MPIRUN=${MPIRUN:-mpirun --oversubscribe --allow-run-as-root}
export LOOM_CACHE_DIR=$W/cache PYTHONUNBUFFERED=1
start_s=$(date +%s)
wants() { case ",$parts," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
remaining() { echo $((budget - ($(date +%s) - start_s))); }
note() { echo "[snapshot_bench $(($(date +%s) - start_s))s] $*" | tee -a "$S/notes.txt"; }

# run_part NAME MAX_S MIN_S CMD...: CMD under timeout min(MAX_S, budget left); skipped when less than MIN_S is left.
run_part() {
  local name=$1 max=$2 min=$3 left limit rc
  shift 3
  left=$(remaining)
  limit=$((left < max ? left : max))
  if [ "$limit" -lt "$min" ]; then
    note "$name: skipped (${limit}s available, ${min}s needed)"
    return 99
  fi
  note "$name: start (timeout ${limit}s)"
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  note "$name: exit $rc"
  return $rc
}

# Waits (up to $2 s) until the daemon of job $1 node ${3:-0} has exited; prints the seconds waited.
wait_daemon_gone() {
  local lock=/tmp/loom-$(id -u)/$1-node${3:-0}.sock.lock t0=$(date +%s.%N) i
  for ((i = 0; i < $2 * 10; i++)); do
    [ -e "$lock" ] || break
    pid=$(cat "$lock" 2>/dev/null)
    { [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; } || break
    sleep 0.1
  done
  awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f\n", b - a }'
}

lose_node() {  # job node: its daemon and its ranks' shared memory are gone, as if the machine died
  local pid
  pid=$(cat /tmp/loom-$(id -u)/"$1"-node"$2".sock.lock 2>/dev/null || true)
  [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null
  rm -f /dev/shm/loom-$(id -u)-"$1"-r"$2"
  sleep 0.5
}

drop_caches() {
  sync
  if echo 3 >/proc/sys/vm/drop_caches 2>/dev/null; then echo cold; else echo warm; fi
}

# ---- 1. machine -------------------------------------------------------------------------------------------------
{
  echo "== df -h /dev/shm $W"; df -h /dev/shm "$W"
  echo "== free -g"; free -g
  echo "== cpu"; grep -m1 "model name" /proc/cpuinfo; nproc; grep Cpus_allowed_list /proc/self/status
  echo "OMP_NUM_THREADS before: ${OMP_NUM_THREADS:-unset}"
  echo "== gpu"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
} 2>&1 | tee "$S/machine.txt"
shm_avail_kb=$(df -k --output=avail /dev/shm | tail -1 | tr -d ' ')
layers=16
# 36 B per parameter (3 buffers of master, m, v in f32) + 10 %; params = 2*32000*2048 + L*(4*2048^2 + 3*2048*5632)
params_of() { echo $((2 * 32000 * 2048 + $1 * (4 * 2048 * 2048 + 3 * 2048 * 5632))); }
while [ "$layers" -gt 2 ] && [ $(($(params_of $layers) * 36 * 11 / 10 / 1024)) -gt "$shm_avail_kb" ]; do
  layers=$((layers - 2))
done
model_note="ref-0.95b (dim 2048, 16 layers, 16 heads, SwiGLU 5632, vocab 32000, seq 2048, micro-batch 8), TP=1"
[ "$layers" -lt 16 ] && model_note="ref-0.95b with $layers layers instead of 16 (/dev/shm has \
$((shm_avail_kb / 1048576)) GiB free, too little for 3 buffers of the 0.95B model)"
note "model: $model_note"
budget_mb=$(($(params_of $layers) * 36 * 11 / 10 / 1048576 + 1024))
REF=(--preset ref-0.95b --n-layers "$layers" --device cuda --dataset "$DATASET" --eval-batches 0 --log-every 5
  --snapshot-dir "$W/h5" --snapshot-budget-mb "$budget_mb" --snapshot-idle-timeout 120)
job=snapbench$$ ecjob=snapec$$ h5job=snaph5$$

# ---- 2. copy limits ---------------------------------------------------------------------------------------------
if wants copy; then
  run_part copy_limits 60 20 python3 bench/torch_snapshot_peer.py --part copy --out "$S/torch_peer.jsonl" \
    2>&1 | tee "$S/copy.log"
fi

# ---- 3. / 4. step time off and on, 5. persist ---------------------------------------------------------------------
if wants steps; then
  run_part steps_off 120 40 "$GPT" "${REF[@]}" --steps "$steps" --snapshot-every 0 --metrics-file "$S/off.jsonl" \
    >"$S/off.log" 2>&1
  run_part steps_on 180 60 "$GPT" "${REF[@]}" --steps "$steps" --snapshot-every 1 --persist-every "$steps" \
    --snapshot-job "$job" --metrics-file "$S/on.jsonl" >"$S/on.log" 2>&1
  grep -E "snapshot|restore|daemon" "$S/on.log" | tail -5

  # ---- 5. persist -----------------------------------------------------------------------------------------------
  persist_s=$(wait_daemon_gone "$job" "$(($(remaining) > 150 ? 150 : $(remaining)))")
  echo "$persist_s" >"$S/persist_s.txt"
  note "daemon gone ${persist_s}s after the trainer exited; HDF5: $(ls -l "$W/h5" 2>&1 | tail -n +2 | tr '\n' ' ')"
fi

# ---- 6. restore from HDF5, 7. from memory -------------------------------------------------------------------------
if wants restore; then
  drop_caches >"$S/hdf5_cache.txt"
  run_part restore_hdf5 150 40 "$GPT" "${REF[@]}" --steps $((steps + 3)) --snapshot-every 1 --persist-every 1000 \
    --snapshot-job "$job" --fault-kind crash --fault-rank 0 --fault-step $((steps + 3)) >"$S/hdf5.log" 2>&1
  grep -E "resumed|restore" "$S/hdf5.log"
  sleep 3  # the daemon commits (CRC) the last staged version

  # ---- 7. restore from memory -----------------------------------------------------------------------------------
  run_part restore_memory 150 40 "$GPT" "${REF[@]}" --steps $((steps + 4)) --snapshot-every 1 --persist-every 1000 \
    --snapshot-job "$job" >"$S/memory.log" 2>&1
  grep -E "resumed|restore" "$S/memory.log"
  wait_daemon_gone "$job" 60 >/dev/null
fi
[ -n "${KEEP_WORK:-}" ] || rm -rf "$W/h5"

# ---- 8. the peer --------------------------------------------------------------------------------------------------
if wants torch; then
  numel=$(sed -n 's/.*model: \([0-9]*\) parameters.*/\1/p' "$S/off.log" | head -1)
  run_part torch_ckpt 200 60 python3 bench/torch_snapshot_peer.py --part ckpt --numel "${numel:-953223168}" \
    --dir "$W/torch" --drop-caches --out "$S/torch_peer.jsonl" 2>&1 | tee "$S/ckpt.log"
  rm -rf "$W/torch"
fi

# ---- 9. erasure coding, 4 emulated nodes --------------------------------------------------------------------------
read -r -a ec_model <<<"${EC_MODEL:---dim 768 --n-layers 6 --n-heads 12 --ffn-hidden 2048 --seq-len 128 --threads 4}"
EC=("${ec_model[@]}" --vocab-size 32000 --batch-size 4 --device cpu --dataset "$DATASET" --eval-batches 0
  --log-every 1 --ranks-per-node 1 --ec-group 4 --ec-parity 1 --snapshot-dir "$W/ec_h5" --snapshot-idle-timeout 120)
ec_run() {  # name job steps [extra...]
  local name=$1 j=$2 n=$3
  shift 3
  run_part "ec_$name" 120 20 $MPIRUN --bind-to none -np 4 -x LD_LIBRARY_PATH -x NCCL_NVLS_ENABLE "$GPT" "${EC[@]}" \
    --steps "$n" --snapshot-job "$j" "$@" >"$S/ec_$name.log" 2>&1
  grep -E "resumed|restore|lost|rebuild|falling|erasure" "$S/ec_$name.log" | head -6
}
if wants ec; then
# Rank 0 is killed one step before the end, while the other ranks wait in the next step's collectives (mpirun
# then ends them): had they finished cleanly, their daemons would have released their memory.
ec_run fill "$ecjob" 5 --persist-every 1000 --fault-kind crash --fault-rank 0 --fault-step 4
sleep 3  # the daemons commit and erasure-code the last staged version
ec_run memory "$ecjob" 7 --persist-every 1000 --fault-kind crash --fault-rank 0 --fault-step 6
sleep 3
lose_node "$ecjob" 2
ec_run rebuild "$ecjob" 9 --persist-every 1000 --fault-kind crash --fault-rank 0 --fault-step 8
for n in 0 1 2 3; do lose_node "$ecjob" "$n"; done
# HDF5 on the same model and layout, from a job of its own: one run persists version 4 and ends cleanly (its
# daemons write the files, then exit), the next finds no memory and reads the files with a cold page cache. (A
# version whose node files come from two runs of one job with different settings, e.g. train.steps or fault.*,
# is rejected as inconsistent: the config hash in each file covers every key.)
ec_run persist "$h5job" 4 --persist-every 4
for n in 0 1 2 3; do wait_daemon_gone "$h5job" 60 "$n" >/dev/null; done
ls -l "$W/ec_h5" >"$S/ec_h5_ls.txt" 2>&1
drop_caches >"$S/ec_hdf5_cache.txt"
ec_run hdf5 "$h5job" 5 --persist-every 1000
for n in 0 1 2 3; do wait_daemon_gone "$h5job" 20 "$n" >/dev/null; done
[ -n "${KEEP_WORK:-}" ] || rm -rf "$W/ec_h5"
fi

# ---- 10. ec_bench -------------------------------------------------------------------------------------------------
wants ecbench &&
  run_part ec_bench 60 15 "$EC_BENCH" --json "$S/ec_device.json" --mib 64 --warmup 1 --repeat 5 >"$S/ec_bench.log" 2>&1

cp /tmp/loom-$(id -u)/{"$job","$ecjob","$h5job"}-node*.log "$S/" 2>/dev/null  # the daemons' logs

# ---- summary ------------------------------------------------------------------------------------------------------
python3 - "$S" "$OUT/snapshot.json" "$model_note" "$steps" "$layers" "${ec_model[*]}" <<'EOF'
import json, os, re, statistics, sys
S, out, model_note, steps, layers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
ec_model = sys.argv[6]

def read(name):
    p = os.path.join(S, name)
    return open(p, errors="replace").read() if os.path.exists(p) else ""

def steps_of(name):
    p = os.path.join(S, name)
    if not os.path.exists(p):
        return []
    rows = [json.loads(l) for l in open(p) if l.strip().startswith("{\"step\"")]
    return [r["step_time_s"] for r in rows[3:]]

def restore_s(log):
    m = re.search(r"restore: resumed from (\w+) in ([0-9.eE+-]+) s", log)
    return (m.group(1), float(m.group(2))) if m else (None, None)

def num(x, f=".3f"):
    return "-" if x is None else format(x, f)

r = {"benchmark": "snapshot_bench", "command": "source .device/env.sh && OUT=... bash bench/snapshot_bench.sh",
     "protocol": "see the header of bench/snapshot_bench.sh", "model": model_note, "layers": layers,
     "tp": 1, "gpus": 1,
     "tp2_note": "TP=2 (the issue's configuration) not measured: only 1-GPU machines are lent; at TP=2 each GPU "
                 "stages half the state"}
r["machine"] = read("machine.txt").strip().splitlines()
off, on = steps_of("off.jsonl"), steps_of("on.jsonl")
if off and on:
    mo, mn = statistics.median(off), statistics.median(on)
    r.update(step_off_median_s=mo, step_on_median_s=mn, step_off_mean_s=statistics.mean(off),
             step_on_mean_s=statistics.mean(on), timed_steps_off=len(off), timed_steps_on=len(on),
             stall_s_per_step=mn - mo, stall_fraction=(mn - mo) / mo,
             stall_fraction_mean=(statistics.mean(on) - statistics.mean(off)) / statistics.mean(off),
             step_times_off_s=off, step_times_on_s=on)
on_log = read("on.log")
m = re.search(r"snapshots: ([0-9.eE+-]+) GB per version, copied in ([0-9.eE+-]+) s on average \(([0-9.eE+-]+) GB/s",
              on_log)
if m:
    r.update(state_GB_per_version=float(m.group(1)), copy_s_per_version=float(m.group(2)),
             staging_GBps=float(m.group(3)))
m = re.search(r"snapshots: (\d+) staged; optimizer waited ([0-9.eE+-]+) s", on_log)
if m:
    r.update(versions_staged=int(m.group(1)), host_wait_s_total=float(m.group(2)))
for line in read("torch_peer.jsonl").splitlines():
    d = json.loads(line)
    if d.get("part") == "copy":
        r["copy_limits"] = d
        r["pinned_d2h_GBps"] = d["pinned_d2h_64mib_chunks_GBps"]
    elif d.get("part") == "ckpt":
        r["pytorch_peer"] = d
if "staging_GBps" in r and "pinned_d2h_GBps" in r:
    r["staging_vs_pinned_limit"] = r["staging_GBps"] / r["pinned_d2h_GBps"]
try:
    r["persist_s"] = float(read("persist_s.txt").strip())
except ValueError:
    pass
src, s = restore_s(read("hdf5.log"))
r["restore_hdf5"] = {"from": src, "s": s, "page_cache": read("hdf5_cache.txt").strip()}
src, s = restore_s(read("memory.log"))
r["restore_memory"] = {"from": src, "s": s}
if r["restore_hdf5"]["s"] and r["restore_memory"]["s"] and r["restore_hdf5"]["from"] == "hdf5" and src == "memory":
    r["restore_speedup_vs_hdf5"] = r["restore_hdf5"]["s"] / r["restore_memory"]["s"]
pp = r.get("pytorch_peer", {})
if r["restore_memory"]["s"] and pp.get("torch_load_s"):
    r["restore_speedup_vs_torch_load"] = pp["torch_load_s"] / r["restore_memory"]["s"]
ec = {"model": ec_model + " --vocab-size 32000 --batch-size 4 (the default: 91.7M params, 1.1 GB of master+Adam "
               "state); 4 emulated nodes of 1 rank (DP=4, each node holds a quarter), CPU device, EC group 4, parity 1"}
for name in ("memory", "rebuild", "hdf5"):
    log = read(f"ec_{name}.log")
    src, s = restore_s(log)
    ec[name] = {"from": src, "s": s, "rebuilt": "lost their snapshots: rebuilding" in log}
ec["hdf5"]["page_cache"] = read("ec_hdf5_cache.txt").strip()
r["ec_emulated_nodes"] = ec
if os.path.exists(os.path.join(S, "ec_device.json")):
    e = json.load(open(os.path.join(S, "ec_device.json")))
    r["ec_encode_per_core"] = {"machine": e.get("machine"), "isal_version": e.get("isal_version"),
                               "results": [{k: x[k] for k in ("k", "p", "isal_encode_gbps", "isal_reconstruct_gbps")}
                                           for x in e.get("results", [])]}
    r["ec_encode_GBps_per_core_k3p1"] = next(
        (x["isal_encode_gbps"] for x in e["results"] if x["k"] == 3 and x["p"] == 1), None)
r["startup_s"] = {}  # seconds from process start to the first step (logged), per gpt-train run
for name in ("off", "on", "hdf5", "memory"):
    m = re.search(r"\[loom r0 n0 ([0-9.]+)s\] training for", read(name + ".log"))
    if m:
        r["startup_s"][name] = float(m.group(1))
r["goals"] = {"stall_fraction_max": 0.01, "staging_GBps_min": 50, "restore_speedup_vs_hdf5_min": 10}
json.dump(r, open(out, "w"), indent=1)
print("\nSnapshot benchmark:", model_note)
print("| figure | value |\n| --- | --- |")
rows = [("step, snapshots off (median s)", num(r.get("step_off_median_s"), ".4f")),
        ("step, snapshot every step (median s)", num(r.get("step_on_median_s"), ".4f")),
        ("stall fraction (goal <= 0.01)", num(r.get("stall_fraction"), ".4f")),
        ("staging GB/s (goal >= 50)", num(r.get("staging_GBps"), ".1f")),
        ("pinned D2H limit GB/s (64 MiB chunks)", num(r.get("pinned_d2h_GBps"), ".1f")),
        ("persist one version to HDF5 (s)", num(r.get("persist_s"), ".1f")),
        ("restore from HDF5 (s, " + r["restore_hdf5"]["page_cache"] + " cache)", num(r["restore_hdf5"]["s"], ".2f")),
        ("restore from memory (s)", num(r["restore_memory"]["s"], ".2f")),
        ("restore speed-up vs HDF5 (goal >= 10)", num(r.get("restore_speedup_vs_hdf5"), ".1f")),
        ("torch.save / torch.load (s)",
         num(pp.get("torch_save_s"), ".1f") + " / " + num(pp.get("torch_load_s"), ".1f")),
        ("DCP save / load (s)", num(pp.get("dcp_save_s"), ".1f") + " / " + num(pp.get("dcp_load_s"), ".1f")),
        ("EC nodes: memory / rebuild / HDF5 restore (s)",
         " / ".join(num(ec[n]["s"], ".2f") for n in ("memory", "rebuild", "hdf5"))),
        ("ISA-L encode GB/s per core (k3 p1)", num(r.get("ec_encode_GBps_per_core_k3p1"), ".1f"))]
for k, v in rows:
    print(f"| {k} | {v} |")
EOF
