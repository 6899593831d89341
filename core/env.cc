#include "core/env.h"

#include <cstdlib>
#include <cstring>

#include "core/error.h"

extern char** environ;

namespace loom::env {

std::optional<std::string> get(const std::string& name) {
  const char* v = std::getenv(name.c_str());
  if (!v) return std::nullopt;
  return std::string(v);
}

std::string get_string(const std::string& name, const std::string& fallback) {
  auto v = get(name);
  return v ? *v : fallback;
}

int64_t get_int(const std::string& name, int64_t fallback) {
  auto v = get(name);
  if (!v || v->empty()) return fallback;
  char* end = nullptr;
  long long x = std::strtoll(v->c_str(), &end, 10);
  LOOM_CHECK(end && *end == '\0', kConfig, "environment variable " << name << "='" << *v << "' is not an integer");
  return x;
}

std::vector<std::pair<std::string, std::string>> with_prefix(const std::string& prefix) {
  std::vector<std::pair<std::string, std::string>> out;
  for (char** e = environ; e && *e; ++e) {
    const char* eq = std::strchr(*e, '=');
    if (!eq) continue;
    std::string name(*e, static_cast<size_t>(eq - *e));
    if (name.rfind(prefix, 0) == 0) out.emplace_back(name, std::string(eq + 1));
  }
  return out;
}

}  // namespace loom::env
