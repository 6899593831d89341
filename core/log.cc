#include "core/log.h"

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>

#include "core/env.h"
#include "core/error.h"

namespace loom::log {
namespace {

std::atomic<int> g_rank{-1};
std::atomic<int> g_node{-1};
const auto g_start = std::chrono::steady_clock::now();

Level initial_level() {
  std::string name = env::get_string("LOOM_LOG_LEVEL", "info");
  try {
    return parse_level(name);
  } catch (const Error&) {
    return Level::kInfo;  // a bad level must not stop logging; the config table reports it
  }
}

std::atomic<Level>& level_ref() {
  static std::atomic<Level> l{initial_level()};
  return l;
}

}  // namespace

void set_identity(int rank, int node) {
  g_rank = rank;
  g_node = node;
}
int rank() {
  return g_rank;
}
void set_level(Level l) {
  level_ref() = l;
}
Level level() {
  return level_ref();
}

Level parse_level(const std::string& name) {
  if (name == "debug") return Level::kDebug;
  if (name == "info") return Level::kInfo;
  if (name == "warn" || name == "warning") return Level::kWarn;
  if (name == "error") return Level::kError;
  LOOM_THROW(kConfig, "log level '" << name << "' is not one of debug, info, warn, error");
}

double uptime_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - g_start).count();
}

void write(Level l, const std::string& message) {
  static const char* kTags[] = {"debug: ", "", "warning: ", "error: "};
  char prefix[96];
  int r = g_rank, n = g_node;
  if (r >= 0 && n >= 0) {
    std::snprintf(prefix, sizeof prefix, "[loom r%d n%d %.1fs] ", r, n, uptime_s());
  } else if (r >= 0) {
    std::snprintf(prefix, sizeof prefix, "[loom r%d %.1fs] ", r, uptime_s());
  } else {
    std::snprintf(prefix, sizeof prefix, "[loom %.1fs] ", uptime_s());
  }
  std::string line = std::string(prefix) + kTags[static_cast<int>(l)] + message + "\n";
  int fd = l >= Level::kWarn ? STDERR_FILENO : STDOUT_FILENO;
  if (fd == STDOUT_FILENO) std::fflush(stdout);  // keep order with printf-style output of the program
  size_t off = 0;
  while (off < line.size()) {
    ssize_t w = ::write(fd, line.data() + off, line.size() - off);
    if (w <= 0) break;
    off += static_cast<size_t>(w);
  }
}

}  // namespace loom::log
