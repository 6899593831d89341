#!/usr/bin/env python3
"""The PyTorch side of the snapshot benchmark (bench/snapshot_bench.sh runs it in the same invocation as Loom):

  --part copy   the copy limits Loom's staging is measured against: device-to-host into pinned memory
                (cudaHostAlloc through pin_memory=True) in 64 MiB chunks on a side stream (as Loom stages), the
                same as one whole copy, pageable device-to-host, and pinned host-to-device (the restore path).
  --part ckpt   the same state as Loom's snapshot (three f32 tensors of --numel elements on the GPU: master
                weights, Adam m and v) saved and restored with torch.save / torch.load and with
                torch.distributed.checkpoint (DCP, single process, no process group), to --dir on local disk.

Protocol:
  copy: a --copy-gib GiB buffer of random values (not zeros); --warmup 2 untimed copies, then --repeat timed
        copies, CUDA events around each on the copying stream; the median; GB/s = 1e9 bytes per second.
  ckpt: the tensors are filled with random values; one warm-up save + load is NOT done (a checkpoint is written
        once and read once in practice, and a second write of 11 GB would double the disk time); each figure is
        one timed operation, which the JSON says. save = from the call until the file is on disk (torch.save then
        os.fsync of the file; DCP then fsync of every file it wrote), the training-blocking time of a synchronous
        checkpoint. load = from the call until the tensors are on the GPU and synchronized, with the page cache
        dropped first (echo 3 > /proc/sys/vm/drop_caches) when --drop-caches is given and permitted ("cold"),
        else "warm" and said so. The loaded values are compared with the saved ones (exact).
Output: one JSON object appended to --out (and printed).
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch


def cuda_time(fn, stream, warmup, repeat):
    times = []
    for i in range(warmup + repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        fn()
        end.record(stream)
        end.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def part_copy(args):
    n = int(args.copy_gib * (1 << 30)) // 4
    nbytes = n * 4
    dev = torch.rand(n, device="cuda")
    pinned = torch.empty(n, dtype=torch.float32, pin_memory=True)
    pageable = torch.empty(n, dtype=torch.float32)
    side = torch.cuda.Stream()
    chunk = (64 << 20) // 4

    def d2h_chunks():
        with torch.cuda.stream(side):
            for off in range(0, n, chunk):
                pinned[off:off + chunk].copy_(dev[off:off + chunk], non_blocking=True)

    def d2h_whole():
        with torch.cuda.stream(side):
            pinned.copy_(dev, non_blocking=True)

    def h2d_whole():
        with torch.cuda.stream(side):
            dev.copy_(pinned, non_blocking=True)

    def d2h_pageable():
        with torch.cuda.stream(side):
            pageable.copy_(dev, non_blocking=False)

    res = {}
    cases = (("pinned_d2h_64mib_chunks", d2h_chunks, args.repeat), ("pinned_d2h_whole", d2h_whole, args.repeat),
             ("pinned_h2d_whole", h2d_whole, args.repeat), ("pageable_d2h_whole", d2h_pageable, 3))
    for name, fn, reps in cases:
        s = cuda_time(fn, side, args.warmup, reps)
        res[name + "_GBps"] = nbytes / s / 1e9
        res[name + "_median_s"] = s
    torch.cuda.synchronize()
    ok = torch.equal(pinned.to("cuda"), dev)
    return {"part": "copy", "bytes": nbytes, "warmup": args.warmup, "repeat": args.repeat, "statistic": "median",
            "check_equal": bool(ok), **res}


def drop_caches(want):
    if not want:
        return "warm"
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "cold"
    except OSError as e:
        print(f"cannot drop the page cache ({e}); the load is warm", file=sys.stderr)
        return "warm"


def fsync_tree(path):
    paths = [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    return sum(os.path.getsize(p) for p in paths)


def part_ckpt(args):
    import shutil
    gen = torch.Generator(device="cuda").manual_seed(0)
    state = {k: torch.rand(args.numel, device="cuda", generator=gen) for k in ("master", "adam_m", "adam_v")}
    nbytes = 3 * args.numel * 4
    os.makedirs(args.dir, exist_ok=True)
    res = {"part": "ckpt", "numel": args.numel, "state_bytes": nbytes, "dir": args.dir, "repeat": 1,
           "statistic": "single timed operation each"}

    # torch.save / torch.load
    path = os.path.join(args.dir, "state.pt")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    torch.save(state, path)
    size = fsync_tree(path)
    res["torch_save_s"] = time.perf_counter() - t0
    res["torch_save_file_bytes"] = size
    res["torch_load_cache"] = drop_caches(args.drop_caches)
    t0 = time.perf_counter()
    loaded = torch.load(path, map_location="cuda", weights_only=True)
    torch.cuda.synchronize()
    res["torch_load_s"] = time.perf_counter() - t0
    res["torch_load_equal"] = all(torch.equal(loaded[k], state[k]) for k in state)
    del loaded
    os.remove(path)

    # torch.distributed.checkpoint, one process (no process group: DCP runs without one)
    try:
        import torch.distributed.checkpoint as dcp
        ddir = os.path.join(args.dir, "dcp")
        shutil.rmtree(ddir, ignore_errors=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dcp.save(state, checkpoint_id=ddir)
        size = fsync_tree(ddir)
        res["dcp_save_s"] = time.perf_counter() - t0
        res["dcp_save_bytes"] = size
        target = {k: torch.empty_like(v) for k, v in state.items()}
        res["dcp_load_cache"] = drop_caches(args.drop_caches)
        t0 = time.perf_counter()
        dcp.load(target, checkpoint_id=ddir)
        torch.cuda.synchronize()
        res["dcp_load_s"] = time.perf_counter() - t0
        res["dcp_load_equal"] = all(torch.equal(target[k], state[k]) for k in state)
        shutil.rmtree(ddir, ignore_errors=True)
    except Exception as e:  # report, keep the torch.save figures
        res["dcp_error"] = f"{type(e).__name__}: {e}"
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=["copy", "ckpt"], required=True)
    p.add_argument("--copy-gib", type=float, default=4.0)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--numel", type=int, default=953223168, help="elements per tensor (Loom's padded parameter count)")
    p.add_argument("--dir", default="/tmp/torch_ckpt")
    p.add_argument("--drop-caches", action="store_true")
    p.add_argument("--out")
    args = p.parse_args()
    r = part_copy(args) if args.part == "copy" else part_ckpt(args)
    r.update({"torch_version": torch.__version__, "device": torch.cuda.get_device_name(0)})
    sinks = [sys.stdout] + ([open(args.out, "a")] if args.out else [])
    for f in sinks:
        f.write(json.dumps(r) + "\n")
        f.flush()


if __name__ == "__main__":
    main()
