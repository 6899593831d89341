#!/usr/bin/env python3
"""Training step time for tensor-parallel sizes: gpt-train with --tp T on T ranks (DP=1), same model and global
batch for every T, on CPU ranks or on GPUs.

Protocol:
  - One gpt-train run per TP size through mpirun (-np T --tp T), --warmup untimed steps then --repeat timed
    steps; the trainer times every step (step_time_s in its metrics file, around the whole step: forward,
    backward, gradient all-reduces, optimizer). Figure = median of the timed steps; p10/p90 also recorded.
  - Peer: TP=1 in the same run of this program; reported as speed-up and parallel efficiency
    (speed-up / T). On CPU every rank gets --threads 1, so TP=T uses T cores (on a machine with fewer cores
    than ranks the ranks share cores: the table says so).
  - Output: a table and bench/results/tp_step_<device>.json (machine, command, per-T medians).

    python3 bench/tp_step.py --device cpu --tp 1 2 4            # CPU ranks
    python3 bench/tp_step.py --device cuda --tp 1 2 --preset ref-0.95b --warmup 3 --repeat 10   # GPUs
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", default=os.path.join(ROOT, "build", "bin"))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--preset", default="")
    p.add_argument("--model", nargs="*", default=["--dim", "256", "--n-layers", "4", "--n-heads", "8",
                                                  "--ffn-hidden", "704", "--seq-len", "256", "--batch-size", "8"])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--mpirun", default="mpirun --oversubscribe --allow-run-as-root")
    p.add_argument("--out", default="")
    args = p.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for tp in args.tp:
            metrics = os.path.join(tmp, f"tp{tp}.jsonl")
            forward_env = ["-x", "LD_LIBRARY_PATH", "-x", "NCCL_NVLS_ENABLE"] if args.device == "cuda" else []
            cmd = args.mpirun.split() + ["-np", str(tp)] + forward_env + [os.path.join(args.bin, "gpt-train"), "--device", args.device, "--tp",
                                                             str(tp), "--steps", str(args.warmup + args.repeat), "--eval-batches", "0",
                                         "--log-level", "warn", "--metrics-file", metrics]
            if args.preset:
                cmd += ["--preset", args.preset]
            else:
                cmd += args.model
            if args.device == "cpu":
                cmd += ["--threads", "1"]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            times = [json.loads(l)["step_time_s"] for l in open(metrics) if '"step_time_s"' in l][args.warmup:]
            times.sort()
            rows.append({"tp": tp, "median_step_s": statistics.median(times), "p10_step_s": times[len(times) // 10],
                         "p90_step_s": times[(9 * len(times)) // 10], "steps_timed": len(times)})
    base = rows[0]["median_step_s"]
    for r in rows:
        r["speedup_vs_tp1"] = base / r["median_step_s"]
        r["efficiency"] = r["speedup_vs_tp1"] / r["tp"]
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    if args.device == "cuda":
        try:
            machine = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                     text=True).stdout.strip().replace("\n", " + ")
        except OSError:
            pass
    doc = {"benchmark": "tp_step", "device": args.device, "machine": machine, "cores": os.cpu_count(),
           "model": args.preset or " ".join(args.model), "warmup": args.warmup, "repeat": args.repeat,
           "command": "python3 bench/tp_step.py --device %s --tp %s" % (args.device, " ".join(map(str, args.tp))),
           "results": rows}
    out = args.out or os.path.join(HERE, "results", f"tp_step_{args.device}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(doc, f, indent=2)
    print(f"{machine}; model {doc['model']}")
    print(f"{'tp':>3} {'median s/step':>14} {'p90':>8} {'speed-up':>9} {'efficiency':>11}")
    for r in rows:
        print(f"{r['tp']:>3} {r['median_step_s']:>14.4f} {r['p90_step_s']:>8.4f} {r['speedup_vs_tp1']:>9.2f}"
              f" {r['efficiency']:>11.2f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
