// The persistent form of a snapshot: one HDF5 file per node and version, readable by h5py and h5dump, loadable
// at any TP and DP size (resharding). The slow rung of the restore ladder (ARCHITECTURE.md §5); the in-memory
// snapshot and its erasure coding live elsewhere in checkpoint/. Full description: docs/snapshot_format.md.
//
// What a rank contributes: its data-parallel slice [slice_begin, slice_end) of the f32 master, Adam m and Adam v
// regions of its parameter arena (core/param_arena.h). A slice is a flat element range, so a parameter may be
// split between two ranks' slices (and so between two files); each rank stores, per parameter its slice meets,
// the piece of the parameter's flattened local TP shard that lies in the slice.
//
// File <dir>/snapshot-v<version, 8 digits>-node<node, 4 digits>.h5, written as <name>.tmp.<pid>, flushed,
// fsynced and renamed into place, so a reader sees a whole file or none:
//
//   /                        attrs format = "loom-snapshot", format_version = 1, version (the step), node,
//                                  num_nodes, tp_size, dp_size, padded_numel, layout_hash, config_hash (uint64),
//                                  seed (uint64), config_toml (string, only when given)
//   /rank<r>                 one group per rank staged on this node (r = the global rank);
//                                  attrs tp_rank, dp_rank, slice_begin, slice_end, padded_numel
//   /rank<r>/<param name>    one group per parameter that meets the slice (names keep their dots);
//                                  attrs global_shape (int64[]), local_shape (int64[]), split_axis (-1 when
//                                  replicated), tp_rank, tp_size, piece_begin, piece_end (element range of the
//                                  flattened local shard stored here), weight_decay (0/1)
//   /rank<r>/<param>/master, adam_m, adam_v    f32 datasets: local_shape when the piece is the whole local shard,
//                                  else 1-D [piece_end - piece_begin]
//
// Integers are int64 except the hashes and the seed (uint64). Datasets are chunked (at most 4 MiB per chunk) with
// HDF5's Fletcher-32 checksum filter and no compression, and the file uses HDF5 1.10's object format, whose
// metadata is checksummed (readers need HDF5 >= 1.10): a flipped byte is an error when read (by Loom, h5py or
// h5dump), never wrong numbers.
// A replicated parameter (split_axis -1) is held in full by every TP rank; its tp_rank attribute says whose copy.
//
// Errors: a failed HDF5 call or syscall is loom::Error kIo naming the file (and errno, as a full disk's
// "No space left on device"); content that is inconsistent (missing pieces, disagreeing attributes, a parameter
// the target model lacks) is kSnapshot naming the parameter or file.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "core/param_arena.h"

namespace loom::snap {

inline constexpr const char* kFormatName = "loom-snapshot";
inline constexpr int64_t kFormatVersion = 1;

// One rank's slice as staged. The three pointers each hold slice_end - slice_begin floats: elements
// [slice_begin, slice_end) of the master, Adam m and Adam v regions.
struct SliceData {
  int rank = 0, tp_rank = 0, dp_rank = 0;
  int64_t slice_begin = 0, slice_end = 0;
  const float* master = nullptr;
  const float* adam_m = nullptr;
  const float* adam_v = nullptr;
};

struct SnapshotMeta {
  int64_t version = 0;  // the optimizer step the state is after
  int node = 0;         // -1 in a GlobalState (assembled from every node)
  int num_nodes = 1, tp_size = 1, dp_size = 1;
  uint64_t layout_hash = 0, config_hash = 0, seed = 0;
  std::string config_toml;   // the resolved config, for `loom inspect`; empty: not stored
  int64_t padded_numel = 0;  // length of each arena region
};

// "<dir>/snapshot-v00000120-node0001.h5"
std::string snapshot_file_path(const std::string& dir, int64_t version, int node);

// Writes one node's file atomically and returns its path. `layout` is the layout table of any of the slices'
// ranks: offsets and local shapes are the same on every TP rank, and each slice's tp_rank says which TP shard
// its pieces are. The directory must exist. Throws kIo (naming the path, with errno's text) when the file cannot
// be written, leaving no temp file behind; kSnapshot on inconsistent arguments (a slice outside the regions,
// a rank outside tp_size x dp_size, a parameter name with '/').
std::string write_node_file(const std::string& dir, const SnapshotMeta& meta, const std::vector<LayoutEntry>& layout,
                            const std::vector<SliceData>& slices);

// Versions in `dir` whose files exist for every node 0..num_nodes-1 and open cleanly with consistent root
// attributes (format, version, node, num_nodes, tp/dp size, hashes, seed), newest first. Missing, truncated or
// corrupt files exclude their version (with a warning for an unreadable file); temp files are ignored. A missing
// directory has no versions. The contents of the datasets are checked only by load_global.
std::vector<int64_t> complete_versions(const std::string& dir);

// The full (unsharded) f32 state of one version, by parameter name.
struct GlobalState {
  SnapshotMeta meta;  // node = -1; config_toml from node 0's file
  std::map<std::string, std::vector<float>> master, adam_m, adam_v;
  std::map<std::string, Shape> global_shape;
};

// Reads every piece of every rank of every node's file of `version` and assembles the global tensors
// (insert_shard). Verifies that every element of every TP shard of every parameter is covered exactly once (for a
// replicated parameter, each TP rank's copy; copy 0 is kept and the others compared, with a warning on a
// difference); else kSnapshot naming the parameter, the TP rank and the missing or doubly stored range. Also
// kSnapshot when the version is incomplete. kIo when a file cannot be read (a failed Fletcher-32 check included).
//
// Memory: the whole model's master, m and v in f32 at once, about 11 GB for a 0.95B model. Acceptable here: HDF5
// is the slow rung of the restore ladder, taken only when no in-memory snapshot survives.
GlobalState load_global(const std::string& dir, int64_t version);

// Fills this rank's slice [slice_begin, slice_end) of the master, Adam m and Adam v regions (each pointer holds
// slice_end - slice_begin floats) for ANY target layout: for each target entry that meets the slice, its TP shard
// is cut from the global tensor and the part in the slice copied; gaps and padding become zero. Throws kSnapshot
// naming the parameter when the snapshot lacks it or its global shape differs.
void fill_slice(const GlobalState& state, const std::vector<LayoutEntry>& target_layout, int64_t slice_begin,
                int64_t slice_end, float* master, float* adam_m, float* adam_v);

// For `loom inspect`: root attributes, ranks with their slices, parameter counts and sizes, several lines.
std::string describe_file(const std::string& path);

}  // namespace loom::snap
