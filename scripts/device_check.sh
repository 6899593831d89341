#!/usr/bin/env bash
# The one script to run on the GPU machine: the CUDA tests, a memcheck of the kernel tests, and the throughput
# benchmark of Loom against PyTorch on the reference model, with a summary. Stages are independent: a failure
# or timeout in one is reported and the next still runs; each has its own timeout, and all of them share one
# time budget (default 460 s, under the 10-minute limit of one device command).
#
#   source .device/env.sh && bash scripts/device_check.sh [--budget S] [--bench-steps N] [--stages LIST]
#     --stages   comma-separated subset of info,tests,memcheck,bench,opsplit,snapshot, run in that order
#                (default: info,tests,memcheck,bench; opsplit = .device/tests/op_split, the per-op-class time
#                split of one step; snapshot = bench/snapshot_bench.sh with the time left)
#
# Assumes: the working directory is the repository root; Loom is installed under .device/prefix (gpt-train on
# PATH through .device/env.sh); the CUDA test binary, built with CUDA on the development machine, is at
# .device/tests/loom_cuda_tests (LOOM_CUDA_TESTS overrides); python3 has torch; $OUT is the folder whose files
# come back (default ./device_out). Writes into $OUT:
#   nvidia_smi.txt, cuda_tests.{json,log}, memcheck.log, loom_1gpu.{jsonl,log}, loom_1gpu_mem.csv,
#   torch_1gpu.{json,log}, gpu_step.json (the figures of both for bench/results/gpu_step_<gpu>.json),
#   op_split.{json,log}, snapshot.json and snap/ (bench/snapshot_bench.sh), summary.md (the tables printed last).
set -uo pipefail

budget=460
bench_steps=20
stages=info,tests,memcheck,bench
while [ $# -gt 0 ]; do
  case $1 in
    --budget) budget=$2; shift 2 ;;
    --bench-steps) bench_steps=$2; shift 2 ;;
    --stages) stages=$2; shift 2 ;;
    -h | --help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "device_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

export OUT=${OUT:-$PWD/device_out}
export TESTS=${LOOM_CUDA_TESTS:-.device/tests/loom_cuda_tests}
export BENCH_STEPS=$bench_steps
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
start_s=$(date +%s)
status_lines=()

remaining() { echo $((budget - ($(date +%s) - start_s))); }
wants() { case ",$stages," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
record() { status_lines+=("$(printf '| %-14s | %s |' "$1" "$2")"); }

# run_stage NAME MAX_S MIN_S FUNCTION: runs FUNCTION under a timeout of min(MAX_S, budget left); skips it when
# less than MIN_S is left. The function runs in its own bash (timeout cannot run shell functions), so it and
# everything it uses is exported.
run_stage() {
  local name=$1 max=$2 min=$3 fn=$4 left limit t0 rc st
  left=$(remaining)
  limit=$((left < max ? left : max))
  if [ "$limit" -lt "$min" ]; then
    record "$name" "skipped: ${limit}s available, ${min}s needed (${left}s of the ${budget}s budget left)"
    return
  fi
  echo
  echo "======== $name (timeout ${limit}s, ${left}s of the budget left) ========"
  t0=$(date +%s)
  timeout --kill-after=15 "$limit" bash -o pipefail -c "$fn"
  rc=$?
  case $rc in
    0) st="ok" ;;
    124 | 137) st="TIMEOUT after ${limit}s" ;;
    *) st="FAILED (exit $rc)" ;;
  esac
  record "$name" "$st, $(($(date +%s) - t0))s"
}

# ---- stages ---------------------------------------------------------------------------------------------------

stage_info() {
  {
    nvidia-smi
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))' ||
      echo "(python3 cannot use torch on the GPU: the PyTorch benchmark will fail)"
  } 2>&1 | tee "$OUT/nvidia_smi.txt"
}

stage_tests() {
  [ -x "$TESTS" ] || { echo "no CUDA test binary at $TESTS (build loom_cuda_tests with CUDA and carry it)"; return 3; }
  "$TESTS" --gtest_output="json:$OUT/cuda_tests.json" 2>&1 | tee "$OUT/cuda_tests.log"
}

# The kernel tests under compute-sanitizer's memcheck: out-of-bounds and misaligned accesses, and errors that
# would otherwise only show as wrong numbers. Left out: the 2048^3 matmul and the training tests (time), and the
# test that makes cudaMalloc fail on purpose (memcheck would count the API error).
stage_memcheck() {
  local cs c
  cs=$(command -v compute-sanitizer)
  for c in /usr/local/cuda*/bin/compute-sanitizer /usr/local/cuda*/compute-sanitizer/compute-sanitizer; do
    [ -z "$cs" ] && [ -x "$c" ] && cs=$c
  done
  [ -n "$cs" ] || { echo "compute-sanitizer not found on PATH or under /usr/local/cuda*"; return 3; }
  [ -x "$TESTS" ] || { echo "no CUDA test binary at $TESTS"; return 3; }
  "$cs" --tool memcheck --error-exitcode 86 "$TESTS" \
    --gtest_filter='CudaBackend.*:Shapes/CudaBackendAttention.*:-*Big*:*FailureNamesTheSize*' 2>&1 | tee "$OUT/memcheck.log"
}

# Loom on one GPU: the ref-0.95b preset (d 2048, 16 layers, seq 2048, batch 8), training alone (in-memory snapshots,
# on by default, are off here: bench/snapshot_bench.sh measures them); BENCH_LOOM_ARGS adds flags. The corpus is
# BENCH_DATASET (default .device/fortunes.bin when present: the GPU machine has no fortunes package). GPU memory
# is sampled with nvidia-smi every 0.5 s (device memory in use, CUDA context included) since Loom reports none.
stage_loom() {
  local bin sampler
  bin=$(command -v gpt-train || echo .device/prefix/bin/gpt-train)
  [ -x "$bin" ] || { echo "gpt-train not found (install Loom into .device/prefix)"; return 3; }
  rm -f "$OUT/loom_1gpu.jsonl"
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 -lms 500 >"$OUT/loom_1gpu_mem.csv" 2>/dev/null &
  sampler=$!
  trap 'kill $sampler 2>/dev/null' EXIT
  local data=${BENCH_DATASET:-fortunes}
  [ -z "${BENCH_DATASET:-}" ] && [ -f .device/fortunes.bin ] && data=.device/fortunes.bin
  "$bin" --preset ref-0.95b --device cuda --steps "$BENCH_STEPS" --log-every 1 --eval-batches 0 --snapshot-every 0 \
    --dataset "$data" --cache-dir /tmp/loom-cache --metrics-file "$OUT/loom_1gpu.jsonl" ${BENCH_LOOM_ARGS:-} 2>&1 |
    tee "$OUT/loom_1gpu.log"
}

# PyTorch on one GPU, the same model and batch (bench/torch_gpu_train.py says how it is measured).
stage_torch() {
  rm -f "$OUT/torch_1gpu.json"
  python3 bench/torch_gpu_train.py --warmup 5 --steps "$BENCH_STEPS" --out "$OUT/torch_1gpu.json" 2>&1 |
    tee "$OUT/torch_1gpu.log"
}

# The time split of one step per op class (bench/op_split.cc says how), at the reference shapes.
stage_opsplit() {
  local bin=${LOOM_OP_SPLIT:-.device/tests/op_split}
  [ -x "$bin" ] || { echo "no op_split binary at $bin (build it with CUDA and carry it)"; return 3; }
  "$bin" --warmup 3 --repeat 10 --json "$OUT/op_split.json" 2>&1 | tee "$OUT/op_split.log"
}

# In-memory snapshots against PyTorch checkpointing (bench/snapshot_bench.sh says how); SNAP_BUDGET is its time.
stage_snapshot() {
  OUT="$OUT" bash bench/snapshot_bench.sh --budget "$SNAP_BUDGET" 2>&1 | tee "$OUT/snapshot_bench.log"
}

# The comparison table from whatever the two runs left (a run cut short by its timeout still has its steps).
stage_summary() {
  python3 - "$OUT" <<'EOF'
import json, os, statistics, sys
out = sys.argv[1]
L, D, F, V, T, B = 16, 2048, 5632, 32000, 2048, 8  # the ref-0.95b preset
fpt = 6.0 * (L * (4 * D * D + 3 * D * F) + V * D) + 6.0 * L * T * D  # GptConfig::flops_per_token
peak = 989e12
rows = []

def fmt(x, f):
    return "-" if x is None else format(x, f)

path = os.path.join(out, "loom_1gpu.jsonl")
if os.path.exists(path):
    steps = [json.loads(l) for l in open(path) if l.strip()]
    skip = min(3, len(steps) // 4)  # warm-up: first step builds GEMM plans and grows the arenas
    timed = [s["step_time_s"] for s in steps[skip:]]
    mem = None
    mpath = os.path.join(out, "loom_1gpu_mem.csv")
    if os.path.exists(mpath):
        vals = [float(v) for v in open(mpath).read().split() if v.strip().replace(".", "").isdigit()]
        if vals:
            mem = (max(vals) - vals[0]) / 1024  # MiB above what was in use before the run
    if timed:
        med = statistics.median(timed)
        tps = B * T / med
        rows.append(("loom", len(timed), med, tps, tps * fpt / peak, mem, steps[-1]["loss"]))
    else:
        rows.append(("loom (no timed step)", 0, None, None, None, mem, None))
path = os.path.join(out, "torch_1gpu.json")
if os.path.exists(path) and os.path.getsize(path) > 0:
    r = json.loads(open(path).read().strip().splitlines()[-1])
    rows.append(("pytorch" + ("" if r["compile"] else " (eager)"), r["timed_steps"], r["median_step_s"],
                 r["tokens_per_s"], r["mfu"], r["peak_mem_gib"], r["last_loss"]))
lines = ["Throughput, ref-0.95b (0.95B params, seq 2048, batch 8), one GPU; MFU against 989 TFLOP/s with "
         f"{fpt / 1e9:.3f} GFLOP/token (GptConfig::flops_per_token)", "",
         "| impl | timed steps | median step (s) | tokens/s | MFU | peak mem (GiB) | last loss |",
         "| --- | --- | --- | --- | --- | --- | --- |"]
for name, n, med, tps, mfu, mem, loss in rows:
    lines.append(f"| {name} | {n} | {fmt(med, '.3f')} | {fmt(tps, '.0f')} | {fmt(mfu, '.3f')} | {fmt(mem, '.1f')} "
                 f"| {fmt(loss, '.4f')} |")
tp = {r[0].split()[0]: r[3] for r in rows if r[3]}
if "loom" in tp and "pytorch" in tp:
    lines += ["", f"Loom / PyTorch tokens/s: {tp['loom'] / tp['pytorch']:.2f}"]
lines += ["", "peak mem: Loom = nvidia-smi device memory in use above the idle level (includes the CUDA context "
          "and cuBLASLt workspace); PyTorch = torch.cuda.max_memory_allocated (allocator peak)"]
path = os.path.join(out, "cuda_tests.json")
if os.path.exists(path):
    res = {"passed": 0, "failed": 0, "skipped": 0}
    failed = []
    for suite in json.load(open(path)).get("testsuites", []):
        for t in suite.get("testsuite", []):
            if t.get("failures"):
                res["failed"] += 1
                failed.append(suite["name"] + "." + t["name"])
            elif t.get("result") == "SKIPPED":
                res["skipped"] += 1
            else:
                res["passed"] += 1
    lines = [f"CUDA tests: {res['passed']} passed, {res['failed']} failed, {res['skipped']} skipped"
             + ("; failed: " + ", ".join(failed) if failed else ""), ""] + lines
# The JSON behind bench/results/gpu_step_<gpu>.json: both implementations of this run, their ratio.
res = {"benchmark": "gpu_step", "command": "source .device/env.sh && bash scripts/device_check.sh --stages bench",
       "protocol": "one invocation: Loom gpt-train then bench/torch_gpu_train.py on the same GPU; Loom: median "
                   "step_time_s over the logged steps after the first 3 (warm-up), snapshots off; PyTorch: 5 warm-up "
                   "steps (torch.compile), median of the timed steps, CUDA events (see bench/torch_gpu_train.py)",
       "model": "ref-0.95b: Llama-style, dim 2048, 16 layers, 16 heads, SwiGLU 5632, vocab 32000, seq 2048, "
                "micro-batch 8 (0.953B parameters)",
       "flops_per_token": fpt, "peak_tflops": peak / 1e12, "tp": 1, "gpus": 1,
       "tp2": "not measured: only 1-GPU machines were lent for this run (the issue's TP=2 goal needs 2 GPUs)",
       "peak_mem_note": lines[-1], "results": []}
try:
    res["machine"] = open(os.path.join(out, "nvidia_smi.txt")).read().strip().splitlines()[-1]
except (OSError, IndexError):
    res["machine"] = None
for name, n, med, tps, mfu, mem, loss in rows:
    res["results"].append({"impl": name, "timed_steps": n, "median_step_s": med, "tokens_per_s": tps, "mfu": mfu,
                           "peak_mem_gib": mem, "last_loss": loss})
if "loom" in tp and "pytorch" in tp:
    res["speedup_vs_pytorch"] = tp["loom"] / tp["pytorch"]
    res["mfu"] = next(r[4] for r in rows if r[0] == "loom")
with open(os.path.join(out, "gpu_step.json"), "w") as f:
    json.dump(res, f, indent=1)
with open(os.path.join(out, "summary.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
}

export -f stage_info stage_tests stage_memcheck stage_loom stage_torch stage_opsplit stage_snapshot stage_summary

# ---- run -------------------------------------------------------------------------------------------------------

# Time kept for the benchmark while the earlier stages run (Loom's start-up and steps, PyTorch's compilation).
bench_reserve=0
wants bench && bench_reserve=300

wants info && run_stage info 30 5 stage_info
wants tests && run_stage tests 240 30 stage_tests
if wants memcheck; then
  avail=$(($(remaining) - bench_reserve))  # what the benchmark does not need
  run_stage memcheck $((avail < 150 ? avail : 150)) 30 stage_memcheck
fi
# Time kept for the stages after the benchmark.
later=0
wants opsplit && later=$((later + 90))
wants snapshot && later=$((later + 240))
if wants bench; then
  # Loom gets up to 45% of what is left (its steps are logged one by one, so a cut-off run still reports),
  # PyTorch the rest (about 1-2 minutes of it is torch.compile).
  run_stage loom_1gpu $((($(remaining) - later) * 45 / 100)) 60 stage_loom
  run_stage torch_1gpu $(($(remaining) - later - 10)) 60 stage_torch
fi
wants opsplit && run_stage opsplit $(($(remaining) - later + 90)) 30 stage_opsplit
if wants snapshot; then
  export SNAP_BUDGET=$(($(remaining) - 15))
  run_stage snapshot $((SNAP_BUDGET + 10)) 120 stage_snapshot
fi
echo
echo "======== summary ========"
stage_summary
{
  echo
  echo "| stage          | status |"
  echo "| --- | --- |"
  printf '%s\n' "${status_lines[@]}"
  echo
  echo "total $(($(date +%s) - start_s))s of a ${budget}s budget"
} | tee -a "$OUT/summary.md"
