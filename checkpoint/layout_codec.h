// The parameter layout table (core/param_arena.h) as fields of a protocol message: the daemon needs it to write
// HDF5 files with one dataset per parameter.
#pragma once

#include <vector>

#include "checkpoint/protocol.h"
#include "core/param_arena.h"

namespace loom::snap {

void encode_layout(const std::vector<LayoutEntry>& layout, Message& m);
std::vector<LayoutEntry> decode_layout(const Message& m);

}  // namespace loom::snap
