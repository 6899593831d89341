#include "checkpoint/layout_codec.h"

#include <sstream>

#include "core/error.h"

namespace loom::snap {
namespace {

std::string shape_text(const Shape& s) {
  std::string out;
  for (int i = 0; i < s.ndim(); ++i) out += (i ? "," : "") + std::to_string(s[i]);
  return out;
}

Shape parse_shape(const std::string& text) {
  Shape s;
  std::stringstream ss(text);
  std::string part;
  while (std::getline(ss, part, ',')) s.push_back(std::stoll(part));
  return s;
}

}  // namespace

// One field per parameter: p<i> = name|global|local|axis|tp_rank|tp_size|offset|numel|decay
void encode_layout(const std::vector<LayoutEntry>& layout, Message& m) {
  m.set("layout_count", static_cast<int64_t>(layout.size()));
  for (size_t i = 0; i < layout.size(); ++i) {
    const LayoutEntry& e = layout[i];
    LOOM_CHECK(e.name.find('|') == std::string::npos, kConfig, "parameter name '" << e.name << "' contains '|'");
    std::ostringstream os;
    os << e.name << "|" << shape_text(e.global_shape) << "|" << shape_text(e.local_shape) << "|" << e.split.axis << "|"
       << e.split.rank << "|" << e.split.size << "|" << e.offset << "|" << e.numel << "|" << (e.weight_decay ? 1 : 0);
    m.set("p" + std::to_string(i), os.str());
  }
}

std::vector<LayoutEntry> decode_layout(const Message& m) {
  const int64_t n = m.i64("layout_count");
  std::vector<LayoutEntry> out;
  for (int64_t i = 0; i < n; ++i) {
    std::vector<std::string> f;
    std::stringstream ss(m.str("p" + std::to_string(i)));
    std::string part;
    while (std::getline(ss, part, '|')) f.push_back(part);
    LOOM_CHECK(f.size() == 9, kSnapshot, "malformed layout entry " << i << " in " << msg_type_name(m.type));
    LayoutEntry e;
    try {
      e.name = f[0];
      e.global_shape = parse_shape(f[1]);
      e.local_shape = parse_shape(f[2]);
      e.split = TpSplit{std::stoi(f[3]), std::stoi(f[4]), std::stoi(f[5])};
      e.offset = std::stoll(f[6]);
      e.numel = std::stoll(f[7]);
      e.weight_decay = f[8] == "1";
    } catch (const std::exception&) {
      LOOM_THROW(kSnapshot, "malformed layout entry " << i << " ('" << m.str("p" + std::to_string(i)) << "')");
    }
    out.push_back(e);
  }
  return out;
}

}  // namespace loom::snap
