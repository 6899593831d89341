#!/usr/bin/python3
"""PyTorch CPU baseline for one training step of Loom's Llama-style model (float32), to compare with Loom's CPU
backend on the same machine, config and thread count.

Protocol:
  - The model, optimizer and LR schedule are those of tests/reference/torch_gpt_reference.py (imported, not
    copied), in float32 on CPU, with torch.set_num_threads(--threads); weights from init_weights(--seed).
  - One step = zero_grad, forward, mean cross-entropy, backward, clip_grad_norm_(--clip), set the LR, AdamW step
    (weight decay on matrices only) -- the whole of a training step, as Loom's step is timed.
  - Batches are random tokens, all drawn before timing, a different one per step.
  - --warmup steps run untimed (allocator, caches, thread pool), then --repeat steps are timed one by one with
    time.perf_counter.
  - Reported: median, p10 and p90 of the timed steps, and tokens/s = batch * seq / median step time, as one JSON
    line on stdout (also appended to --out when given). Nothing else goes to stdout.

Run with Debian's interpreter (python3-torch):
    /usr/bin/python3 bench/torch_cpu_step.py --threads 2 --dim 256 --layers 4 --heads 8 --ffn 688
"""

import argparse
import json
import os
import platform
import sys
import time
import types

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "reference"))
from torch_gpt_reference import LlamaModel, make_optimizer, train_step  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description="PyTorch CPU training-step benchmark (see the protocol at the top).")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--ffn", type=int, default=688)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps")
    p.add_argument("--repeat", type=int, default=10, help="timed steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--out", help="also append the JSON line to this file (e.g. bench/results/torch_cpu.jsonl)")
    args = p.parse_args()
    if args.repeat < 1 or args.warmup < 0 or args.threads < 1:
        p.error("--repeat and --threads must be at least 1, --warmup at least 0")
    return args


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = LlamaModel(args.vocab, args.dim, args.layers, args.heads, args.ffn, args.seq)
    model.init_weights(args.seed)
    opt = make_optimizer(model, args.lr, (0.9, 0.95), 1e-8, 0.1)
    total = args.warmup + args.repeat
    # train_step reads the schedule and clipping from an argparse-like object.
    sched = types.SimpleNamespace(clip=args.clip, warmup=max(1, args.warmup), steps=total, lr=args.lr,
                                  lr_min=args.lr / 10)
    gen = torch.Generator().manual_seed(args.seed + 1)
    seqs = torch.randint(0, args.vocab, (total, args.batch, args.seq + 1), generator=gen)

    times, loss = [], float("nan")
    for step in range(total):
        start = time.perf_counter()
        loss, _, _ = train_step(model, opt, seqs[step, :, :-1], seqs[step, :, 1:], step, sched)
        elapsed = time.perf_counter() - start
        if step >= args.warmup:
            times.append(elapsed)

    t = np.array(times)
    median = float(np.median(t))
    result = {
        "impl": "pytorch",
        "torch_version": torch.__version__,
        "threads": args.threads,
        "config": {k: getattr(args, k) for k in ("vocab", "dim", "layers", "heads", "ffn", "seq", "batch")},
        "params": sum(p.numel() for p in model.parameters()),
        "dtype": "float32",
        "warmup_steps": args.warmup,
        "timed_steps": args.repeat,
        "median_step_s": median,
        "p10_step_s": float(np.percentile(t, 10)),
        "p90_step_s": float(np.percentile(t, 90)),
        "tokens_per_s": args.batch * args.seq / median,
        "step_times_s": [float(x) for x in times],
        "last_loss": float(loss),
        "cpu": cpu_model(),
        "cpus_available": len(os.sched_getaffinity(0)),
        "host": platform.node(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    line = json.dumps(result)
    print(line)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
