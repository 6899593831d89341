// Text helpers shared by the writers of TOML (core/config.cc) and JSON (launch/monitor/json.cc).
#pragma once

#include <string>

namespace loom {

// s in double quotes with ", \, newline, tab and CR backslash-escaped and other control characters as \uXXXX:
// a valid TOML basic string and a valid JSON string alike.
std::string quote_escaped(const std::string& s);

}  // namespace loom
