#!/usr/bin/env python3
"""The fused all-reduce + RMSNorm benchmark of issue 5 in one command: the kernel benchmark and the training step.

Protocol
--------
1. `mpirun -np W fused_norm_bench --json OUT --tuning-out TUNING` (protocol at the top of bench/fused_norm_bench.cu):
   the kernels against NCCL + a separate norm, and the one-shot/two-shot table for W ranks.
2. e2e_step_speedup (W = 2 only; TP needs the reference model's 16 heads to divide): the reference model
   (`--preset ref-0.95b`, bf16, TP = W, DP = 1) trained for --steps steps twice under the same mpirun flags,
   with fusion + overlap on (`--fused-norm true --fused-kernel true --overlap true --fused-tuning TUNING`) and
   off (`--fused-norm false --fused-kernel false --overlap false`), alternating on/off for --rounds rounds; per
   run the median `step_time_s` of rank 0 over the steps after the first 5 (metrics file); speed-up = median of
   the off-runs / median of the on-runs. The losses of the two settings are recorded too (within bf16 rounding
   of each other, not bit for bit).
3. The result goes into OUT (e2e_step_speedup, e2e detail) next to the kernel figures.

Usage: python3 bench/fused_norm_e2e.py --ranks 2 [--bin DIR] [--tests DIR] [--out bench/results/fused_rmsnorm_h200x2.json]
                                       [--tuning bench/results/fused_norm_tuning.txt] [--steps 20] [--rounds 2]
                                       [--dataset PATH] [--quick]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MPI = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-x", "LD_LIBRARY_PATH", "-x", "NCCL_NVLS_ENABLE"]


def run(cmd, log):
    print("$ " + " ".join(cmd), flush=True)
    with open(log, "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        sys.exit(f"failed ({rc}): {' '.join(cmd)}; see {log}")


def train(args, ranks, on, metrics, log):
    flags = (["--fused-norm", "true", "--fused-kernel", "true", "--overlap", "true"]
             if on else ["--fused-norm", "false", "--fused-kernel", "false", "--overlap", "false"])
    if on and os.path.exists(args.tuning):  # the kernel run writes no table where ranks share GPUs
        flags += ["--fused-tuning", args.tuning]
    cmd = MPI + ["-np", str(ranks), os.path.join(args.bin, "gpt-train"), "--preset", "ref-0.95b", "--device", "cuda",
                 "--tp", str(ranks), "--steps", str(args.steps), "--snapshot-every", "0", "--eval-batches", "0",
                 "--metrics-file", metrics, "--log-every", "5"] + flags
    if args.dataset:
        cmd += ["--dataset", args.dataset]
    run(cmd, log)
    rows = [json.loads(line) for line in open(metrics)]
    times = [r["step_time_s"] for r in rows if r["step"] > 5]
    return statistics.median(times), [r["loss"] for r in rows]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--bin", default=os.path.join(ROOT, "build", "bin"), help="gpt-train's folder")
    ap.add_argument("--tests", default=None, help="fused_norm_bench's folder (default: --bin)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--tuning", default=os.path.join(ROOT, "bench", "results", "fused_norm_tuning.txt"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dataset", default="")
    ap.add_argument("--quick", action="store_true", help="the kernel benchmark's --quick, 1 round of 10 steps")
    args = ap.parse_args()
    out = args.out or os.path.join(ROOT, "bench", "results", f"fused_rmsnorm_{args.ranks}gpu.json")
    work = tempfile.mkdtemp(prefix="loom-fusedbench.")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    bench = [os.path.join(args.tests or args.bin, "fused_norm_bench"), "--json", out, "--tuning-out", args.tuning]
    if args.quick:
        bench.append("--quick")
        args.steps, args.rounds = 10, 1
    run(MPI + ["-np", str(args.ranks)] + bench, os.path.join(work, "kernels.log"))
    print(open(os.path.join(work, "kernels.log")).read())
    result = json.load(open(out))
    if args.ranks == 2:
        on_t, off_t = [], []
        losses = {}
        for r in range(args.rounds):
            for on in (True, False):
                name = f"{'on' if on else 'off'}{r}"
                t, loss = train(args, args.ranks, on, os.path.join(work, name + ".jsonl"),
                                os.path.join(work, name + ".log"))
                (on_t if on else off_t).append(t)
                losses[name] = loss
                print(f"  {name}: median step {t:.4f} s, last loss {loss[-1]:.5f}", flush=True)
        speedup = statistics.median(off_t) / statistics.median(on_t)
        result["e2e_step_speedup"] = speedup
        result["e2e"] = {"model": "ref-0.95b", "tp": args.ranks, "steps": args.steps, "rounds": args.rounds,
                         "median_step_s_on": statistics.median(on_t), "median_step_s_off": statistics.median(off_t),
                         "runs_on_s": on_t, "runs_off_s": off_t, "losses": losses,
                         "on": "--fused-norm true --fused-kernel true --overlap true --fused-tuning",
                         "off": "--fused-norm false --fused-kernel false --overlap false"}
        print(f"e2e step speed-up (fusion + overlap on vs off): {speedup:.3f} (goal >= 1.05)")
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out}; work folder {work}")


if __name__ == "__main__":
    main()
