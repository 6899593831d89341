// Per-rank logging. Every line carries the rank, the node and the seconds since start:
//   [loom r1 n0 12.4s] step 10/200 loss 3.2101 ...
// Lines are written whole with one write() so lines of ranks sharing a terminal do not interleave mid-line.
// Info goes to stdout, warnings and errors to stderr. LOOM_LOG_LEVEL=debug|info|warn|error sets the level.
//
//   LOOM_INFO("loaded " << n << " tokens");     // every rank
//   LOOM_INFO0("config hash " << hash);         // rank 0 only
#pragma once

#include <sstream>
#include <string>

namespace loom::log {

enum class Level { kDebug = 0, kInfo = 1, kWarn = 2, kError = 3 };

// Called once the rank is known (loom/runtime.cc). Before that, lines show "r?".
void set_identity(int rank, int node);
int rank();
void set_level(Level level);
Level level();
// Parses "debug", "info", "warn", "error"; throws a config error otherwise.
Level parse_level(const std::string& name);
inline bool enabled(Level l) {
  return static_cast<int>(l) >= static_cast<int>(level());
}
void write(Level level, const std::string& message);
// Seconds since the process started logging (monotonic).
double uptime_s();

}  // namespace loom::log

#define LOOM_LOG(lvl, msg)                                          \
  do {                                                              \
    if (::loom::log::enabled(::loom::log::Level::lvl)) {            \
      std::ostringstream loom_log_;                                 \
      loom_log_ << msg;                                             \
      ::loom::log::write(::loom::log::Level::lvl, loom_log_.str()); \
    }                                                               \
  } while (0)
#define LOOM_DEBUG(msg) LOOM_LOG(kDebug, msg)
#define LOOM_INFO(msg) LOOM_LOG(kInfo, msg)
#define LOOM_WARN(msg) LOOM_LOG(kWarn, msg)
#define LOOM_ERROR(msg) LOOM_LOG(kError, msg)
#define LOOM_INFO0(msg)                                 \
  do {                                                  \
    if (::loom::log::rank() <= 0) LOOM_LOG(kInfo, msg); \
  } while (0)
#define LOOM_WARN0(msg)                                 \
  do {                                                  \
    if (::loom::log::rank() <= 0) LOOM_LOG(kWarn, msg); \
  } while (0)
