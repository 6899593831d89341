#!/usr/bin/python3
"""PyTorch reference for Loom's Llama-style model: writes one tensor bundle (tests/reference/bundle.h) with the
initial weights, the batches, step 0's logits, loss and gradients, and the losses and final weights of a short
AdamW run, all computed in float64 so Loom's f32 results can be judged against values exact to f64.

Run with Debian's interpreter (python3-torch, torch 1.13):
    /usr/bin/python3 tests/reference/torch_gpt_reference.py --out /tmp/gpt_ref.bundle

The model, the optimizer and the LR schedule are defined here once; bench/torch_cpu_step.py imports them.
What Loom must match, exactly:
  - rmsnorm(x, w) = x * rsqrt(mean(x^2, last dim) + eps) * w
  - RoPE, rotate-half: for i < Dh/2, angle = t * base^(-2i/Dh) (t = position 0..T-1),
    out[i] = x[i] cos - x[i+Dh/2] sin, out[i+Dh/2] = x[i+Dh/2] cos + x[i] sin
  - causal softmax attention, scale 1/sqrt(Dh); SwiGLU MLP w2(silu(w1 n) * w3 n); no biases; lm_head untied
  - loss = mean cross-entropy over all B*T positions
  - AdamW (torch): weight decay only on parameters with ndim >= 2, clip_grad_norm_ before every step,
    the group LR set from lr_at(s) before every step.
"""

import argparse
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import loom_bundle  # noqa: E402

# Order of the values in the bundle's "config" tensor (f64); GptReferenceConfig in bundle.h mirrors it.
# The LR schedule's total step count S is `steps`.
CONFIG_KEYS = ["vocab", "dim", "layers", "heads", "ffn", "seq", "batch", "steps", "seed", "lr", "lr_min",
               "warmup", "wd", "beta1", "beta2", "eps", "clip", "norm_eps", "rope_base"]


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps) * self.weight


def rope_tables(seq, head_dim, base, dtype):
    """cos, sin of shape [T, Dh/2], computed in float64 and then cast, so an f64 model gets exact tables."""
    i = torch.arange(head_dim // 2, dtype=torch.float64)
    inv_freq = torch.pow(torch.tensor(base, dtype=torch.float64), -2.0 * i / head_dim)
    angle = torch.arange(seq, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cos(angle).to(dtype), torch.sin(angle).to(dtype)


def apply_rope(x, cos, sin):
    """x [B, T, H, Dh]; cos, sin [T, Dh/2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(self, x, cos, sin):
        b, t, d = x.shape
        dh = d // self.heads
        q = apply_rope(self.wq(x).view(b, t, self.heads, dh), cos, sin).transpose(1, 2)  # [B, H, T, Dh]
        k = apply_rope(self.wk(x).view(b, t, self.heads, dh), cos, sin).transpose(1, 2)
        v = self.wv(x).view(b, t, self.heads, dh).transpose(1, 2)
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(dh))  # [B, H, T, T]
        future = torch.triu(torch.ones(t, t, dtype=torch.bool, device=x.device), diagonal=1)
        scores = scores.masked_fill(future, float("-inf"))
        a = torch.softmax(scores, dim=-1) @ v  # [B, H, T, Dh]
        return self.wo(a.transpose(1, 2).reshape(b, t, d))


class SwiGLU(nn.Module):
    def __init__(self, dim, ffn):
        super().__init__()
        self.w1 = nn.Linear(dim, ffn, bias=False)  # gate
        self.w3 = nn.Linear(dim, ffn, bias=False)  # up
        self.w2 = nn.Linear(ffn, dim, bias=False)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, dim, heads, ffn, norm_eps):
        super().__init__()
        self.attn_norm = RMSNorm(dim, norm_eps)
        self.attn = Attention(dim, heads)
        self.mlp_norm = RMSNorm(dim, norm_eps)
        self.mlp = SwiGLU(dim, ffn)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class LlamaModel(nn.Module):
    """Parameter names are Loom's: tok_emb.weight, blocks.{i}.attn.wq.weight, ..., norm.weight, lm_head.weight."""

    def __init__(self, vocab, dim, layers, heads, ffn, seq, norm_eps=1e-5, rope_base=10000.0):
        super().__init__()
        if dim % heads != 0 or (dim // heads) % 2 != 0:
            raise ValueError(f"dim {dim} must split into {heads} heads of even size")
        self.seq, self.head_dim, self.rope_base = seq, dim // heads, rope_base
        self.tok_emb = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList([Block(dim, heads, ffn, norm_eps) for _ in range(layers)])
        self.norm = RMSNorm(dim, norm_eps)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self._rope = {}  # dtype -> (cos, sin); not buffers, so .double() cannot round them through f32

    def init_weights(self, seed):
        """Matrices and embeddings ~ N(0, 1/fan_in) (fan_in = last dimension), norm weights 1 + 0.1 N(0, 1).

        Larger than the usual 0.02 on purpose: at a test's tiny width, 0.02 leaves attention almost uniform, so
        the logits would barely depend on RoPE or the causal mask; this way they do, and the norm weights too."""
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, p in self.named_parameters():
                noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
                p.copy_(1.0 + 0.1 * noise if p.ndim == 1 else noise / math.sqrt(p.shape[-1]))

    def forward(self, tokens):
        """tokens [B, T] int64 -> logits [B, T, V]."""
        t = tokens.shape[1]
        dtype = self.tok_emb.weight.dtype
        if dtype not in self._rope:
            self._rope[dtype] = rope_tables(self.seq, self.head_dim, self.rope_base, dtype)
        cos, sin = (x[:t] for x in self._rope[dtype])
        x = self.tok_emb(tokens)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.lm_head(self.norm(x))


def loss_fn(logits, targets):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def make_optimizer(model, lr, betas, eps, weight_decay):
    """AdamW with weight decay on matrices and embeddings only (ndim >= 2), none on norm weights."""
    params = list(model.parameters())
    return torch.optim.AdamW(
        [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
         {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
        lr=lr, betas=betas, eps=eps)


def lr_at(step, warmup, total, lr_max, lr_min):
    """Linear warmup to lr_max over `warmup` steps, then cosine to lr_min at step `total`; step is 0-based."""
    if step < warmup:
        return lr_max * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return lr_min + 0.5 * (lr_max - lr_min) * (1.0 + math.cos(math.pi * progress))


def train_step(model, opt, tokens, targets, step, args):
    """One step: forward, backward, clip, set the LR, AdamW. Returns (loss, grad norm before clipping)."""
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model(tokens), targets)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
    lr = lr_at(step, args.warmup, args.steps, args.lr, args.lr_min)
    for group in opt.param_groups:
        group["lr"] = lr
    opt.step()
    return loss.detach(), grad_norm.detach(), lr


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="path of the bundle to write")
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=88)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--batch", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--lr-min", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--wd", type=float, default=0.1)
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--beta2", type=float, default=0.95)
    p.add_argument("--eps", type=float, default=1e-8)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--norm-eps", type=float, default=1e-5)
    p.add_argument("--rope-base", type=float, default=10000.0)
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 1:
        p.error("--steps and --warmup must be at least 1")
    return args


def f32(t):
    return t.detach().to(torch.float32).numpy()


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    model = LlamaModel(args.vocab, args.dim, args.layers, args.heads, args.ffn, args.seq, args.norm_eps,
                       args.rope_base).double()
    model.init_weights(args.seed)
    # Loom starts from the f32 values the bundle stores, so the f64 run must start from them too.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.float().double())
    names = [name for name, _ in model.named_parameters()]

    # A different random sequence per step; targets are the tokens shifted by one.
    gen = torch.Generator().manual_seed(args.seed + 1)
    seqs = torch.randint(0, args.vocab, (args.steps, args.batch, args.seq + 1), generator=gen)
    tokens, targets = seqs[..., :-1], seqs[..., 1:]

    out = [("config", np.array([float(getattr(args, k.replace("-", "_"))) for k in CONFIG_KEYS], np.float64))]
    out += [(name, f32(p)) for name, p in model.named_parameters()]
    out += [("tokens", tokens.to(torch.int32).numpy()), ("targets", targets.to(torch.int32).numpy())]

    # Step 0 at the initial weights: logits, loss and gradients (before clipping).
    logits = model(tokens[0])
    loss0 = loss_fn(logits, targets[0])
    grads = torch.autograd.grad(loss0, list(model.parameters()))
    out += [("logits", f32(logits.reshape(-1, args.vocab))), ("loss0", np.array([loss0.item()], np.float64))]
    out += [("grad." + name, f32(g)) for name, g in zip(names, grads)]

    opt = make_optimizer(model, args.lr, (args.beta1, args.beta2), args.eps, args.wd)
    losses, grad_norms, lrs = [], [], []
    for step in range(args.steps):
        loss, grad_norm, lr = train_step(model, opt, tokens[step], targets[step], step, args)
        losses.append(loss.item())
        grad_norms.append(grad_norm.item())
        lrs.append(lr)
        print(f"step {step}: loss {loss.item():.6f} grad norm {grad_norm.item():.4f} lr {lr:.6f}")
    out += [("losses", np.array(losses, np.float64)), ("grad_norms", np.array(grad_norms, np.float64)),
            ("lrs", np.array(lrs, np.float64))]
    out += [("final." + name, f32(p)) for name, p in model.named_parameters()]

    loom_bundle.write(args.out, out)
    print(f"wrote {len(out)} tensors to {args.out}")


if __name__ == "__main__":
    main()
