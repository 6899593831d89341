#include "launch/monitor/protocol.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sstream>

#include "core/error.h"

namespace loom::mon {

const char* mon_type_name(MonType t) {
  switch (t) {
    case MonType::kHello: return "HELLO";
    case MonType::kHeartbeat: return "HEARTBEAT";
    case MonType::kTrace: return "TRACE";
    case MonType::kBye: return "BYE";
  }
  return "?";
}

MonMessage& MonMessage::set(const std::string& key, const std::string& value) {
  LOOM_CHECK(!key.empty() && key.find_first_of("=\n") == std::string::npos && value.find('\n') == std::string::npos,
             kInternal, "monitor field '" << key << "' has a character the frame cannot carry");
  fields[key] = value;
  return *this;
}

MonMessage& MonMessage::set_f(const std::string& key, double value) {
  char buf[40];
  std::snprintf(buf, sizeof buf, "%.9g", value);
  return set(key, buf);
}

const std::string& MonMessage::str(const std::string& key) const {
  auto it = fields.find(key);
  LOOM_CHECK(it != fields.end(), kComm, mon_type_name(type) << " message without field '" << key << "'");
  return it->second;
}

int64_t MonMessage::i64(const std::string& key) const {
  const std::string& v = str(key);
  char* end = nullptr;
  long long x = std::strtoll(v.c_str(), &end, 10);
  LOOM_CHECK(!v.empty() && *end == 0, kComm, mon_type_name(type) << " field '" << key << "' is not an integer");
  return x;
}

double MonMessage::f64(const std::string& key) const {
  const std::string& v = str(key);
  char* end = nullptr;
  double x = std::strtod(v.c_str(), &end);
  LOOM_CHECK(!v.empty() && *end == 0, kComm, mon_type_name(type) << " field '" << key << "' is not a number");
  return x;
}

std::string MonMessage::get(const std::string& key, const std::string& def) const {
  auto it = fields.find(key);
  return it == fields.end() ? def : it->second;
}

std::string encode_frame(const MonMessage& m) {
  std::string payload;
  for (const auto& [k, v] : m.fields) payload += k + "=" + v + "\n";
  LOOM_CHECK(payload.size() <= kMonMaxPayload, kInternal, "monitor message of " << payload.size() << " bytes");
  const uint32_t head[4] = {kMonMagic, kMonVersion, static_cast<uint32_t>(m.type),
                            static_cast<uint32_t>(payload.size())};
  std::string frame(kMonHeaderBytes, '\0');
  std::memcpy(frame.data(), head, sizeof head);
  return frame + payload;
}

std::optional<FrameHeader> decode_header(const unsigned char* bytes, std::string* why) {
  uint32_t head[4];
  std::memcpy(head, bytes, sizeof head);
  std::ostringstream os;
  if (head[0] != kMonMagic)
    os << "bad magic 0x" << std::hex << head[0];
  else if (head[1] != kMonVersion)
    os << "protocol version " << head[1] << " (this monitor speaks " << kMonVersion << ")";
  else if (head[2] < 1 || head[2] > static_cast<uint32_t>(MonType::kBye))
    os << "unknown message type " << head[2];
  else if (head[3] > kMonMaxPayload)
    os << "payload of " << head[3] << " bytes (limit " << kMonMaxPayload << ")";
  else
    return FrameHeader{static_cast<MonType>(head[2]), head[3]};
  if (why) *why = os.str();
  return std::nullopt;
}

std::optional<MonMessage> decode_payload(MonType type, const std::string& payload, std::string* why) {
  MonMessage m(type);
  size_t pos = 0;
  while (pos < payload.size()) {
    size_t nl = payload.find('\n', pos);
    size_t eq = payload.find('=', pos);
    if (nl == std::string::npos || eq == std::string::npos || eq >= nl || eq == pos) {
      if (why) *why = "payload is not key=value lines";
      return std::nullopt;
    }
    m.fields[payload.substr(pos, eq - pos)] = payload.substr(eq + 1, nl - eq - 1);
    pos = nl + 1;
  }
  return m;
}

namespace {

// Splits s at sep (no empty trailing item).
std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  size_t pos = 0;
  while (pos < s.size()) {
    size_t next = s.find(sep, pos);
    if (next == std::string::npos) next = s.size();
    out.push_back(s.substr(pos, next - pos));
    pos = next + 1;
  }
  return out;
}

double to_f64(const std::string& s, const char* what) {
  char* end = nullptr;
  double x = std::strtod(s.c_str(), &end);
  LOOM_CHECK(!s.empty() && *end == 0, kComm, "monitor: malformed " << what << " field '" << s << "'");
  return x;
}

int64_t to_i64(const std::string& s, const char* what) {
  char* end = nullptr;
  long long x = std::strtoll(s.c_str(), &end, 10);
  LOOM_CHECK(!s.empty() && *end == 0, kComm, "monitor: malformed " << what << " field '" << s << "'");
  return x;
}

std::vector<std::string> fields_of(const std::string& item, size_t n, const char* what) {
  std::vector<std::string> f = split(item, ',');
  LOOM_CHECK(f.size() == n, kComm, "monitor: " << what << " item '" << item << "' has " << f.size() << " fields, not " << n);
  return f;
}

}  // namespace

std::string encode_records(const std::vector<TraceRecord>& recs) {
  std::string out;
  char buf[160];
  for (const TraceRecord& r : recs) {
    std::snprintf(buf, sizeof buf, "%u,%llu,%u,%llu,%.6f,%.6f;", r.group_id, static_cast<unsigned long long>(r.seq),
                  static_cast<unsigned>(r.op), static_cast<unsigned long long>(r.bytes), r.start_s, r.end_s);
    out += buf;
  }
  return out;
}

std::vector<TraceRecord> decode_records(const std::string& s) {
  std::vector<TraceRecord> out;
  for (const std::string& item : split(s, ';')) {
    auto f = fields_of(item, 6, "trace record");
    TraceRecord r;
    r.group_id = static_cast<uint32_t>(to_i64(f[0], "group"));
    r.seq = static_cast<uint64_t>(to_i64(f[1], "seq"));
    const int64_t op = to_i64(f[2], "op");
    LOOM_CHECK(op >= 0 && op <= static_cast<int64_t>(CollectiveOp::kBarrier), kComm, "monitor: unknown op " << op);
    r.op = static_cast<CollectiveOp>(op);
    r.bytes = static_cast<uint64_t>(to_i64(f[3], "bytes"));
    r.start_s = to_f64(f[4], "start");
    r.end_s = to_f64(f[5], "end");
    out.push_back(r);
  }
  return out;
}

std::string encode_links(const std::vector<LinkStats>& links) {
  std::string out;
  char buf[160];
  for (const LinkStats& l : links) {
    std::snprintf(buf, sizeof buf, "%d,%llu,%llu,%.9g,%.9g;", l.src, static_cast<unsigned long long>(l.transfers),
                  static_cast<unsigned long long>(l.bytes), l.sum_s, l.max_s);
    out += buf;
  }
  return out;
}

std::vector<LinkStats> decode_links(const std::string& s) {
  std::vector<LinkStats> out;
  for (const std::string& item : split(s, ';')) {
    auto f = fields_of(item, 5, "link");
    LinkStats l;
    l.src = static_cast<int>(to_i64(f[0], "src"));
    l.transfers = static_cast<uint64_t>(to_i64(f[1], "transfers"));
    l.bytes = static_cast<uint64_t>(to_i64(f[2], "bytes"));
    l.sum_s = to_f64(f[3], "sum");
    l.max_s = to_f64(f[4], "max");
    out.push_back(l);
  }
  return out;
}

std::string encode_transfer(const TransferState& x) {
  if (!x.active) return "";
  char buf[200];
  std::snprintf(buf, sizeof buf, "%u,%llu,%d,%d,%d,%d,%.6f", x.group_id, static_cast<unsigned long long>(x.seq), x.step,
                x.recv_src, x.send_dst, x.recv_done ? 1 : 0, x.since_s);
  return buf;
}

TransferState decode_transfer(const std::string& s) {
  TransferState x;
  if (s.empty()) return x;
  auto f = fields_of(s, 7, "transfer");
  x.active = true;
  x.group_id = static_cast<uint32_t>(to_i64(f[0], "group"));
  x.seq = static_cast<uint64_t>(to_i64(f[1], "seq"));
  x.step = static_cast<int>(to_i64(f[2], "step"));
  x.recv_src = static_cast<int>(to_i64(f[3], "src"));
  x.send_dst = static_cast<int>(to_i64(f[4], "dst"));
  x.recv_done = to_i64(f[5], "recv_done") != 0;
  x.since_s = to_f64(f[6], "since");
  return x;
}

double wall_now_s() {
  return wall_clock_s();
}

}  // namespace loom::mon
