// The one mechanism through which Loom reads environment variables. Every knob is a LOOM_* variable (plus the
// MPI launcher's own, read in parallel/). Config keys map to LOOM_<KEY> (core/config.h); the few knobs read
// before the config exists (LOOM_LOG_LEVEL) use these helpers directly.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace loom::env {

std::optional<std::string> get(const std::string& name);
std::string get_string(const std::string& name, const std::string& fallback);
// Throws a config error naming the variable when the value is not an integer.
int64_t get_int(const std::string& name, int64_t fallback);
// All variables whose name starts with prefix, as (name, value).
std::vector<std::pair<std::string, std::string>> with_prefix(const std::string& prefix);

}  // namespace loom::env
