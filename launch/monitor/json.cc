#include "launch/monitor/json.h"

#include <cmath>
#include <cstdio>

#include "core/text.h"

namespace loom::mon {

std::string json_string(const std::string& s) {
  return quote_escaped(s);
}

std::string json_number(double x) {
  if (!std::isfinite(x)) return "null";
  char buf[40];
  if (x == std::floor(x) && std::fabs(x) < 1e15)
    std::snprintf(buf, sizeof buf, "%.0f", x);
  else
    std::snprintf(buf, sizeof buf, "%.15g", x);
  return buf;
}

JsonObject& JsonObject::raw(const std::string& key, const std::string& json) {
  if (!body_.empty()) body_ += ",";
  body_ += json_string(key) + ":" + json;
  return *this;
}

std::string json_array(const std::vector<std::string>& items) {
  std::string out = "[";
  for (size_t i = 0; i < items.size(); ++i) out += (i ? "," : "") + items[i];
  return out + "]";
}

std::string json_int_array(const std::vector<int>& items) {
  std::vector<std::string> s;
  for (int i : items) s.push_back(std::to_string(i));
  return json_array(s);
}

std::string json_get_string(const std::string& doc, const std::string& key) {
  const std::string needle = json_string(key) + ":\"";
  size_t pos = doc.find(needle);
  if (pos == std::string::npos) return "";
  std::string out;
  for (size_t i = pos + needle.size(); i < doc.size() && doc[i] != '"'; ++i) {
    if (doc[i] == '\\' && i + 1 < doc.size()) {
      const char e = doc[++i];
      out += e == 'n' ? '\n' : e == 't' ? '\t' : e;
    } else {
      out += doc[i];
    }
  }
  return out;
}

std::string json_pretty(const std::string& doc) {
  std::string out;
  int depth = 0;
  bool in_string = false;
  auto newline = [&] { out += "\n" + std::string(static_cast<size_t>(2 * depth), ' '); };
  for (size_t i = 0; i < doc.size(); ++i) {
    const char c = doc[i];
    if (in_string) {
      out += c;
      if (c == '\\' && i + 1 < doc.size()) out += doc[++i];
      else if (c == '"') in_string = false;
      continue;
    }
    switch (c) {
      case '"': in_string = true; out += c; break;
      case '{': case '[':
        out += c;
        if (i + 1 < doc.size() && (doc[i + 1] == '}' || doc[i + 1] == ']')) break;
        ++depth;
        newline();
        break;
      case '}': case ']':
        if (i > 0 && (doc[i - 1] == '{' || doc[i - 1] == '[')) { out += c; break; }
        --depth;
        newline();
        out += c;
        break;
      case ',': out += c; newline(); break;
      case ':': out += ": "; break;
      case '\n': break;
      default: out += c;
    }
  }
  return out + "\n";
}

}  // namespace loom::mon
