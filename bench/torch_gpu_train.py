#!/usr/bin/env python3
"""PyTorch GPU baseline for the throughput comparison with Loom's CUDA backend: the reference model of the GPU
benchmarks (the ref-0.95b preset of examples/gpt/model.cc) trained with the standard PyTorch recipe.

Model (the same as Loom's examples/gpt/model.h): Llama-style decoder. Token embedding; L pre-norm blocks of
RMSNorm -> causal multi-head attention with RoPE (rotate-half) -> residual, RMSNorm -> SwiGLU MLP
w2(silu(w1 x) * w3 x) -> residual; final RMSNorm; untied LM head; no biases. Defaults are the reference config:
dim 2048, 16 layers, 16 heads, SwiGLU hidden 5632, vocab 32000, seq 2048, micro-batch 8 (all flags).

Recipe (the fastest standard single-GPU one, and the precision split Loom's CUDA backend uses):
  - fp32 parameters (the master weights); forward and backward under torch.autocast(dtype=bfloat16), so every
    matmul and the attention run in bf16 with fp32 accumulation, and the gradients land in fp32;
  - torch.optim.AdamW(fused=True) on the fp32 parameters (weight decay 0.1 on matrices, none on norms),
    torch.nn.utils.clip_grad_norm_(1.0) before every step, as Loom's step does;
  - F.scaled_dot_product_attention(is_causal=True) (the flash-attention kernel for bf16 on H100/H200);
  - torch.compile of every transformer block (and, single-GPU, of the final norm + LM head + loss), the per-block
    compilation of torchtitan; --no-compile turns it off.
  Pure bf16 parameters without an fp32 master would be a little faster but is not what Loom (or most training)
  does; activation checkpointing is off (the model fits: about 45 GiB at micro-batch 8 on one GPU).

Protocol:
  - Batches are random tokens drawn on the device before timing, a different one per step; every TP rank draws
    the same ones.
  - --warmup steps run untimed (they include torch.compile's compilation and the allocator's growth), then
    --steps steps are timed one by one with CUDA events recorded on the current stream around the whole step
    (zero_grad, forward, loss, backward, clipping, AdamW); the times are read after one final synchronize.
  - Reported: the median step time (and p10, p90), tokens/s = batch * seq / median (tokens of the global batch;
    TP ranks share one batch), MFU = tokens/s * flops_per_token / (peak * GPUs) with peak = --peak-tflops (989,
    dense bf16 of an H100/H200 SXM), and the peak memory torch.cuda.max_memory_allocated() over the run.
  - flops_per_token is Loom's GptConfig::flops_per_token (examples/gpt/model.cc), so MFU means the same in both:
        6 * (L * (4 D^2 + 3 D F) + V D)   every matmul, forward + backward (the LM head counted, the embedding
                                          lookup not)
      + 6 * L * T * D                     causal attention: half of the 12 L T D of full attention
    = 5.73e9 FLOPs per token for the reference config (0.953B parameters).
  - One JSON line on stdout (rank 0 only; progress goes to stderr); also appended to --out when given.

Usage:
    python3 bench/torch_gpu_train.py                                   # one GPU, the reference config
    torchrun --nproc-per-node 2 bench/torch_gpu_train.py --tp 2        # tensor parallel over 2 GPUs
    /usr/bin/python3 bench/torch_gpu_train.py --device cpu --no-compile --dim 64 --layers 2 --heads 4 \\
        --ffn 160 --vocab 256 --seq 32 --batch 2 --warmup 1 --steps 2  # smoke test of the code on a CPU

Tensor parallelism (--tp N, under torchrun): torch.distributed.tensor.parallel, Megatron-style like Loom's:
wq/wk/wv/w1/w3 ColwiseParallel, wo/w2 RowwiseParallel (heads and SwiGLU columns split), the embedding
RowwiseParallel over the vocabulary, the LM head ColwiseParallel with vocab-sharded logits and the loss computed
under loss_parallel() (no full-vocabulary logits). Norm weights stay replicated; gradient clipping counts the
sharded parameters' squares over the TP group and the replicated ones once.
"""

import argparse
import inspect
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn


def parse_args():
    p = argparse.ArgumentParser(description="PyTorch GPU training benchmark of Loom's reference model "
                                            "(see the protocol at the top of the file).")
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--ffn", type=int, default=5632, help="SwiGLU hidden size")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8, help="micro-batch in sequences (the whole batch of a step)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps (include compilation)")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0, help="max global gradient norm; 0 disables clipping")
    p.add_argument("--norm-eps", type=float, default=1e-5)
    p.add_argument("--rope-base", type=float, default=10000.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="run eagerly (no torch.compile)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size; > 1 needs torchrun --nproc-per-node TP")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU for the MFU")
    p.add_argument("--out", help="also append the JSON line to this file")
    a = p.parse_args()
    if a.steps < 1 or a.warmup < 0 or a.tp < 1:
        p.error("--steps and --tp must be at least 1, --warmup at least 0")
    if a.dim % a.heads or (a.dim // a.heads) % 2:
        p.error(f"--dim {a.dim} must split into --heads {a.heads} heads of an even size")
    if a.heads % a.tp or a.ffn % a.tp or a.vocab % a.tp:
        p.error(f"--tp {a.tp} must divide --heads {a.heads}, --ffn {a.ffn} and --vocab {a.vocab}")
    if a.tp > 1 and a.device != "cuda":
        p.error("--tp needs --device cuda")
    return a


def log(*parts):
    print("[torch_gpu_train]", *parts, file=sys.stderr, flush=True)


# ---- the model ------------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_tables(seq, head_dim, base, device):
    """cos, sin [T, Dh/2] in fp32: angle = t * base^(-2i/Dh), as in Loom's RoPE."""
    i = torch.arange(head_dim // 2, dtype=torch.float64)
    inv_freq = base ** (-2.0 * i / head_dim)
    angle = torch.arange(seq, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cos(angle).float().to(device), torch.sin(angle).float().to(device)


def apply_rope(x, cos, sin):
    """Rotate-half RoPE of x [B, T, H, Dh]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).type_as(x)


def causal_attention(q, k, v):
    """q, k, v [B, H, T, Dh] -> [B, H, T, Dh]; the flash kernel when this torch has SDPA."""
    if hasattr(F, "scaled_dot_product_attention"):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    t = q.shape[-2]  # torch < 2.0 (the CPU smoke test only)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    mask = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
    return scores.masked_fill(mask, float("-inf")).softmax(-1).type_as(v) @ v


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.head_dim = dim // heads
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        # -1 heads: all of them, or this rank's share under tensor parallelism.
        q = apply_rope(self.wq(x).view(b, t, -1, self.head_dim), cos, sin).transpose(1, 2)
        k = apply_rope(self.wk(x).view(b, t, -1, self.head_dim), cos, sin).transpose(1, 2)
        v = self.wv(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        o = causal_attention(q, k, v).transpose(1, 2).reshape(b, t, -1)
        return self.wo(o)


class FeedForward(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.attention_norm = RMSNorm(a.dim, a.norm_eps)
        self.attention = Attention(a.dim, a.heads)
        self.ffn_norm = RMSNorm(a.dim, a.norm_eps)
        self.feed_forward = FeedForward(a.dim, a.ffn)

    def forward(self, x, cos, sin):
        h = x + self.attention(self.attention_norm(x), cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))


class Llama(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.tok_embeddings = nn.Embedding(a.vocab, a.dim)
        self.layers = nn.ModuleList(Block(a) for _ in range(a.layers))
        self.norm = RMSNorm(a.dim, a.norm_eps)
        self.output = nn.Linear(a.dim, a.vocab, bias=False)

    def init_weights(self, layers, std=0.02):
        # Loom's initialisation: N(0, 0.02), output projections into the residual stream N(0, 0.02 / sqrt(2 L)).
        for name, p in self.named_parameters():
            if p.ndim < 2:
                continue
            residual = name.endswith("attention.wo.weight") or name.endswith("feed_forward.w2.weight")
            nn.init.normal_(p, std=std / math.sqrt(2 * layers) if residual else std)

    def hidden(self, tokens, cos, sin):
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return x

    def head_loss(self, h, targets):
        logits = self.output(self.norm(h))
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(0, 1))


def num_parameters(a):
    """Loom's GptConfig::num_parameters."""
    return 2 * a.vocab * a.dim + a.layers * (4 * a.dim * a.dim + 3 * a.dim * a.ffn + 2 * a.dim) + a.dim


def flops_per_token(a):
    """Loom's GptConfig::flops_per_token (examples/gpt/model.cc)."""
    matmul_params = a.layers * (4 * a.dim * a.dim + 3 * a.dim * a.ffn) + a.vocab * a.dim
    return 6.0 * matmul_params + 6.0 * a.layers * a.seq * a.dim


# ---- tensor parallelism ---------------------------------------------------------------------------------------

def parallelize(model, tp):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cuda", (tp,))
    parallelize_module(model, mesh, {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        "output": ColwiseParallel(input_layouts=Replicate(), output_layouts=Shard(-1), use_local_output=False),
    })
    for block in model.layers:
        parallelize_module(block, mesh, {
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w3": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(),
        })
    return mesh


def clip_grads_tp(params, max_norm, group):
    """Global-norm clipping under TP: squares of sharded gradients summed over the group, replicated once."""
    from torch.distributed.tensor import DTensor

    sharded, replicated = [], []
    for p in params:
        g = p.grad
        if isinstance(g, DTensor):
            (sharded if any(pl.is_shard() for pl in g.placements) else replicated).append(g.to_local())
        else:
            replicated.append(g)

    def sum_sq(grads):
        if not grads:
            return torch.zeros((), device="cuda")
        return torch.stack(torch._foreach_norm(grads)).float().pow(2).sum()

    sq = sum_sq(sharded)
    torch.distributed.all_reduce(sq, group=group)
    sq = sq + sum_sq(replicated)
    coef = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(sharded + replicated, coef)


# ---- the benchmark --------------------------------------------------------------------------------------------

def main():
    a = parse_args()
    rank = 0
    if a.tp > 1:
        if "LOCAL_RANK" not in os.environ:
            sys.exit("--tp > 1 must be launched by torchrun --nproc-per-node TP")
        torch.distributed.init_process_group("nccl")
        rank = torch.distributed.get_rank()
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        if torch.distributed.get_world_size() != a.tp:
            sys.exit(f"--tp {a.tp} needs exactly {a.tp} ranks, got {torch.distributed.get_world_size()}")
    device = torch.device("cuda", torch.cuda.current_device()) if a.device == "cuda" else torch.device("cpu")
    if a.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(a.seed)

    # Built directly on the device where torch.device is a context manager (torch >= 2.0), else moved there.
    with device if hasattr(device, "__enter__") else _nullcontext():
        model = Llama(a)
    model = model.to(device)
    model.init_weights(a.layers)
    counted = sum(p.numel() for p in model.parameters())
    assert counted == num_parameters(a), f"model has {counted} parameters, Loom's formula says {num_parameters(a)}"
    mesh = parallelize(model, a.tp) if a.tp > 1 else None
    cos, sin = rope_tables(a.seq, a.dim // a.heads, a.rope_base, device)

    if a.compile:
        if not hasattr(torch, "compile"):
            sys.exit("this torch has no torch.compile; pass --no-compile")
        for i, block in enumerate(model.layers):
            model.layers.register_module(str(i), torch.compile(block, fullgraph=True))
    head_loss = torch.compile(model.head_loss) if a.compile and a.tp == 1 else model.head_loss

    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": a.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt_kwargs = {"lr": a.lr, "betas": (0.9, 0.95), "eps": 1e-8}
    if a.device == "cuda":
        opt_kwargs["fused"] = True
    opt = torch.optim.AdamW(groups, **opt_kwargs)

    total = a.warmup + a.steps
    gen = torch.Generator(device=device).manual_seed(a.seed + 1)
    data = torch.randint(0, a.vocab, (total, a.batch, a.seq + 1), device=device, generator=gen)
    params = list(model.parameters())

    if a.tp > 1:
        from torch.distributed.tensor.parallel import loss_parallel
        loss_ctx = loss_parallel
    else:
        loss_ctx = _nullcontext

    clip_kwargs = {"foreach": True} if "foreach" in inspect.signature(torch.nn.utils.clip_grad_norm_).parameters else {}

    def step(s):
        tokens, targets = data[s, :, :-1], data[s, :, 1:]
        opt.zero_grad(set_to_none=True)
        with loss_ctx():
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                loss = head_loss(model.hidden(tokens, cos, sin), targets)
            loss.backward()
        if a.clip > 0:
            if a.tp > 1:
                clip_grads_tp(params, a.clip, mesh.get_group())
            else:
                torch.nn.utils.clip_grad_norm_(params, a.clip, **clip_kwargs)
        opt.step()
        return loss.detach()

    if a.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    log(f"{num_parameters(a) / 1e9:.3f}B parameters, tp {a.tp}, compile {a.compile}, "
        f"{a.warmup} warm-up + {a.steps} timed steps of {a.batch} x {a.seq} tokens on {device}")
    start = time.perf_counter()
    for s in range(a.warmup):
        step(s)
        if a.device == "cuda":
            torch.cuda.synchronize()
        log(f"warm-up step {s + 1}/{a.warmup} done at {time.perf_counter() - start:.1f}s")

    losses, times = [], []
    if a.device == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(a.steps)]
        for i in range(a.steps):
            events[i][0].record()
            losses.append(step(a.warmup + i))
            events[i][1].record()
        torch.cuda.synchronize()
        times = [b.elapsed_time(e) / 1e3 for b, e in events]
    else:
        for i in range(a.steps):
            t0 = time.perf_counter()
            losses.append(step(a.warmup + i))
            times.append(time.perf_counter() - t0)
    last_loss = losses[-1]
    if hasattr(last_loss, "full_tensor"):
        last_loss = last_loss.full_tensor()
    last_loss = float(last_loss)

    median = statistics.median(times)
    q = statistics.quantiles(times, n=10) if len(times) > 1 else [median] * 9
    tokens_per_s = a.batch * a.seq / median
    fpt = flops_per_token(a)
    gpus = a.tp if a.device == "cuda" else 1
    result = {
        "impl": "pytorch",
        "torch_version": torch.__version__,
        "device": torch.cuda.get_device_name(device) if a.device == "cuda" else platform.processor() or "cpu",
        "recipe": "fp32 params + autocast bf16 + AdamW(" + ("fused" if a.device == "cuda" else "for-loop") + ")"
                  + " + global-norm clipping, SDPA causal"
                  + (", torch.compile per block" if a.compile else ", eager"),
        "compile": a.compile,
        "tp": a.tp,
        "gpus": gpus,
        "config": {k: getattr(a, k) for k in ("vocab", "dim", "layers", "heads", "ffn", "seq", "batch")},
        "params": num_parameters(a),
        "flops_per_token": fpt,
        "warmup_steps": a.warmup,
        "timed_steps": a.steps,
        "median_step_s": median,
        "p10_step_s": q[0],
        "p90_step_s": q[-1],
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_gpu": tokens_per_s / gpus,
        "mfu": tokens_per_s * fpt / (a.peak_tflops * 1e12 * gpus),
        "peak_tflops_per_gpu": a.peak_tflops,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if a.device == "cuda" else None,
        "last_loss": last_loss,
        "step_times_s": times,
        "host": platform.node(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if rank == 0:
        line = json.dumps(result)
        print(line, flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(line + "\n")
    if a.tp > 1:
        torch.distributed.destroy_process_group()


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    main()
