#!/usr/bin/env python3
"""Reads Loom HDF5 snapshot files (docs/snapshot_format.md) with h5py and assembles the global tensors.

An independent reader of the format, written from its description rather than from Loom's C++ code: the test of
checkpoint/hdf5_format.cc checks that it gets exactly the tensors Loom wrote. Also handy by hand:

    /usr/bin/python3 tests/reference/read_snapshot_h5.py /ckpt/snapshot-v00000120-node*.h5
    /usr/bin/python3 tests/reference/read_snapshot_h5.py --bundle /tmp/state.bundle FILES...

Prints one line per parameter and kind (name, global shape, sum and sum of squares) and, with --bundle, writes
the global tensors to a tensor bundle (loom_bundle.py) named "<kind>:<parameter>", kind = master, adam_m, adam_v.
Needs numpy and h5py.
"""

import argparse
import os
import sys

import h5py
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import loom_bundle  # noqa: E402

KINDS = ("master", "adam_m", "adam_v")
ROOT_KEYS = ("version", "num_nodes", "tp_size", "dp_size", "padded_numel", "layout_hash", "config_hash", "seed")


class SnapshotError(ValueError):
    """Files that do not form one complete snapshot."""


def load_global(paths):
    """Returns (root attributes of the first file, {kind: {name: global array}}) for the files of one version."""
    root = None
    params = {}  # name -> {"attrs": ..., "copies": {tp_rank: {kind: flat array}, "count": coverage counts}}
    nodes = set()
    for path in paths:
        with h5py.File(path, "r") as f:
            attrs = {k: f.attrs[k] for k in f.attrs}
            fmt = attrs.get("format")
            if isinstance(fmt, bytes):
                fmt = fmt.decode()
            if fmt != "loom-snapshot" or int(attrs.get("format_version", -1)) != 1:
                raise SnapshotError(f"{path}: not a version 1 Loom snapshot (format {fmt!r})")
            if root is None:
                root = attrs
            for key in ROOT_KEYS:
                if int(attrs[key]) != int(root[key]):
                    raise SnapshotError(f"{path}: root attribute {key} = {attrs[key]}, first file has {root[key]}")
            nodes.add(int(attrs["node"]))
            for rank_name, rank_group in f.items():
                if not rank_name.startswith("rank"):
                    continue
                for name, group in rank_group.items():
                    a = group.attrs
                    local_shape = tuple(int(d) for d in a["local_shape"])
                    numel = int(np.prod(local_shape, dtype=np.int64))
                    desc = (tuple(int(d) for d in a["global_shape"]), local_shape, int(a["split_axis"]),
                            int(a["tp_size"]))
                    entry = params.setdefault(name, {"desc": desc, "copies": {}})
                    if entry["desc"] != desc:
                        raise SnapshotError(f"{path}:/{rank_name}/{name} describes the parameter as {desc}, "
                                            f"elsewhere {entry['desc']}")
                    copy = entry["copies"].setdefault(int(a["tp_rank"]), {
                        "count": np.zeros(numel, np.int32),
                        **{kind: np.zeros(numel, np.float32) for kind in KINDS},
                    })
                    begin, end = int(a["piece_begin"]), int(a["piece_end"])
                    copy["count"][begin:end] += 1
                    for kind in KINDS:
                        copy[kind][begin:end] = np.asarray(group[kind], dtype=np.float32).reshape(-1)
    if root is None:
        raise SnapshotError("no files given")
    missing_nodes = set(range(int(root["num_nodes"]))) - nodes
    if missing_nodes:
        raise SnapshotError(f"files of nodes {sorted(missing_nodes)} are missing")

    out = {kind: {} for kind in KINDS}
    for name, entry in sorted(params.items()):
        global_shape, local_shape, split_axis, tp_size = entry["desc"]
        copies = int(root["tp_size"]) if split_axis < 0 else tp_size
        for r in range(copies):
            copy = entry["copies"].get(r)
            if copy is None or not np.all(copy["count"] == 1):
                bad = np.arange(int(np.prod(local_shape, dtype=np.int64)))
                if copy is not None:
                    bad = np.nonzero(copy["count"] != 1)[0]
                raise SnapshotError(f"parameter {name!r} TP rank {r}: {len(bad)} elements not stored exactly once "
                                    f"(first {bad[:5].tolist()})")
        for kind in KINDS:
            shards = [entry["copies"][r][kind].reshape(local_shape) for r in range(copies)]
            out[kind][name] = shards[0] if split_axis < 0 else np.concatenate(shards, axis=split_axis)
            assert out[kind][name].shape == global_shape
    return root, out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="+", help="the node files of one version")
    parser.add_argument("--bundle", help="write the global tensors to this tensor bundle")
    args = parser.parse_args()
    root, tensors = load_global(args.files)
    print(f"version {int(root['version'])}: {len(tensors['master'])} parameters, tp_size {int(root['tp_size'])}, "
          f"dp_size {int(root['dp_size'])}, {int(root['num_nodes'])} nodes")
    for name in sorted(tensors["master"]):
        for kind in KINDS:
            t = tensors[kind][name].astype(np.float64)
            print(f"{kind}:{name} {list(t.shape)} sum {t.sum():.9g} sumsq {(t * t).sum():.9g}")
    if args.bundle:
        loom_bundle.write(args.bundle, [(f"{kind}:{name}", tensors[kind][name])
                                        for name in sorted(tensors["master"]) for kind in KINDS])


if __name__ == "__main__":
    try:
        main()
    except SnapshotError as e:
        sys.exit(f"read_snapshot_h5.py: {e}")
