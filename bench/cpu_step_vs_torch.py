#!/usr/bin/python3
"""CPU training step: Loom (gpt-train, CPU backend) against PyTorch (python3-torch) on the same model, batch and
thread count, in one run on one machine.

Protocol:
  - Models: Loom's Llama-style GPT and the same model in PyTorch float32 (tests/reference/torch_gpt_reference.py
    through bench/torch_cpu_step.py): same shapes, AdamW with clipping, one rank / one process.
  - Threads: --threads for both (Loom --threads, torch.set_num_threads).
  - A step is the whole training step (forward, backward, clipping, AdamW) on a fresh batch.
  - Each implementation runs --warmup untimed steps then --repeat timed steps; Loom's step times come from its
    metrics file (step_time_s, timed inside the trainer around the whole step), PyTorch's from perf_counter.
  - The two alternate for --rounds rounds (Loom, PyTorch, Loom, PyTorch, ...) so drift on a shared machine hits
    both; the figure of each is the median over all its timed steps. Ratio = PyTorch median / Loom median
    (> 1: Loom is faster).
  - Output: a table on stdout and bench/results/cpu_step.json (machine, versions, configs, medians, ratios).

    /usr/bin/python3 bench/cpu_step_vs_torch.py [--build build] [--threads 2]
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

CONFIGS = {
    # name: (vocab, dim, layers, heads, ffn, seq, batch)
    "tiny": (256, 128, 4, 4, 384, 128, 16),
    "d256": (2048, 256, 4, 8, 688, 128, 8),
}


def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def run_loom(args, cfg, token_file, metrics):
    vocab, dim, layers, heads, ffn, seq, batch = cfg
    cmd = [os.path.join(args.build, "bin", "gpt-train"), "--device", "cpu", "--threads", str(args.threads),
           "--dataset", token_file, "--vocab-size", str(vocab), "--dim", str(dim), "--n-layers", str(layers),
           "--n-heads", str(heads), "--ffn-hidden", str(ffn), "--seq-len", str(seq), "--batch-size", str(batch),
           "--steps", str(args.warmup + args.repeat), "--eval-batches", "0", "--log-level", "warn",
           "--metrics-file", metrics]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    times = [json.loads(l)["step_time_s"] for l in open(metrics) if '"step_time_s"' in l]
    return times[args.warmup:]


def run_torch(args, cfg):
    vocab, dim, layers, heads, ffn, seq, batch = cfg
    cmd = [sys.executable, os.path.join(HERE, "torch_cpu_step.py"), "--threads", str(args.threads),
           "--vocab", str(vocab), "--dim", str(dim), "--layers", str(layers), "--heads", str(heads),
           "--ffn", str(ffn), "--seq", str(seq), "--batch", str(batch), "--warmup", str(args.warmup),
           "--repeat", str(args.repeat)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    return json.loads(out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build", default=os.path.join(ROOT, "build"))
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=os.path.join(HERE, "results", "cpu_step.json"))
    args = p.parse_args()

    import torch
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg in CONFIGS.items():
            vocab = cfg[0]
            token_file = os.path.join(tmp, f"tokens_{vocab}.bin")  # header-less uint16, random tokens
            rng = np.random.default_rng(0)
            rng.integers(0, vocab, size=400_000, dtype=np.uint16).tofile(token_file)
            loom_t, torch_t, torch_info = [], [], None
            for _ in range(args.rounds):
                loom_t += run_loom(args, cfg, token_file, os.path.join(tmp, "m.jsonl"))
                torch_info = run_torch(args, cfg)
                torch_t += torch_info["step_times_s"]
            lm, tm = statistics.median(loom_t), statistics.median(torch_t)
            tokens = cfg[5] * cfg[6]
            results.append({
                "config": name, "vocab": cfg[0], "dim": cfg[1], "layers": cfg[2], "heads": cfg[3], "ffn": cfg[4],
                "seq": cfg[5], "batch": cfg[6], "params": torch_info.get("params"),
                "loom_median_step_s": lm, "torch_median_step_s": tm,
                "loom_tokens_per_s": tokens / lm, "torch_tokens_per_s": tokens / tm,
                "speedup_vs_pytorch": tm / lm, "loom_steps_timed": len(loom_t), "torch_steps_timed": len(torch_t),
            })
    doc = {
        "benchmark": "cpu_step_vs_torch", "machine": f"{cpu_model()}, {os.cpu_count()} cores",
        "threads": args.threads, "torch_version": torch.__version__, "warmup": args.warmup,
        "repeat": args.repeat, "rounds": args.rounds,
        "command": "/usr/bin/python3 bench/cpu_step_vs_torch.py --threads %d" % args.threads,
        "results": results,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=2)
    print(f"machine: {doc['machine']}; threads {args.threads}; torch {torch.__version__}")
    print(f"{'config':8} {'params':>9} {'Loom s/step':>12} {'PyTorch s/step':>15} {'Loom tok/s':>11} {'ratio':>6}")
    for r in results:
        print(f"{r['config']:8} {r['params'] or 0:>9} {r['loom_median_step_s']:>12.4f} {r['torch_median_step_s']:>15.4f}"
              f" {r['loom_tokens_per_s']:>11.0f} {r['speedup_vs_pytorch']:>6.2f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
