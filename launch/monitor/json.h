// A small JSON writer for the monitor's documents (verdicts, status, summaries): objects and arrays built as
// strings, numbers printed with %.6g (integers exactly), strings escaped.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace loom::mon {

std::string json_string(const std::string& s);  // quoted and escaped
std::string json_number(double x);              // null for NaN/inf

class JsonObject {
 public:
  JsonObject& raw(const std::string& key, const std::string& json);  // value already JSON
  JsonObject& str(const std::string& key, const std::string& v) { return raw(key, json_string(v)); }
  JsonObject& num(const std::string& key, double v) { return raw(key, json_number(v)); }
  JsonObject& num(const std::string& key, int64_t v) { return raw(key, std::to_string(v)); }
  JsonObject& num(const std::string& key, int v) { return raw(key, std::to_string(v)); }
  JsonObject& boolean(const std::string& key, bool v) { return raw(key, v ? "true" : "false"); }
  std::string done() const { return "{" + body_ + "}"; }

 private:
  std::string body_;
};

// [a,b,...] of already-JSON items.
std::string json_array(const std::vector<std::string>& items);
std::string json_int_array(const std::vector<int>& items);

// Reading back what this writer wrote (verdicts for `loom inspect`): the string value of a top-level key ("" when
// absent), and the document indented two spaces per level.
std::string json_get_string(const std::string& doc, const std::string& key);
std::string json_pretty(const std::string& doc);

}  // namespace loom::mon
