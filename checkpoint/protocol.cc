#include "checkpoint/protocol.h"

#include <cstring>

#include "core/error.h"

namespace loom::snap {

const char* msg_type_name(MsgType t) {
  switch (t) {
    case MsgType::kHello: return "HELLO";
    case MsgType::kHelloOk: return "HELLO_OK";
    case MsgType::kStaged: return "STAGED";
    case MsgType::kQuery: return "QUERY";
    case MsgType::kVersions: return "VERSIONS";
    case MsgType::kFinish: return "FINISH";
    case MsgType::kOk: return "OK";
    case MsgType::kError: return "ERROR";
    case MsgType::kStatus: return "STATUS";
    case MsgType::kStatusReply: return "STATUS_REPLY";
  }
  return "?";
}

Message& Message::set(const std::string& key, const std::string& value) {
  LOOM_CHECK(key.find_first_of("=\n") == std::string::npos && value.find('\n') == std::string::npos, kInternal,
             "protocol field '" << key << "' has a character the frame cannot carry");
  fields[key] = value;
  return *this;
}

Message& Message::set(const std::string& key, int64_t value) { return set(key, std::to_string(value)); }

const std::string& Message::str(const std::string& key) const {
  auto it = fields.find(key);
  LOOM_CHECK(it != fields.end(), kSnapshot, msg_type_name(type) << " message without field '" << key << "'");
  return it->second;
}

int64_t Message::i64(const std::string& key) const {
  const std::string& v = str(key);
  char* end = nullptr;
  long long x = std::strtoll(v.c_str(), &end, 10);
  LOOM_CHECK(!v.empty() && end && *end == 0, kSnapshot,
             msg_type_name(type) << " field '" << key << "' is not an integer: '" << v << "'");
  return x;
}

uint64_t Message::u64(const std::string& key) const {
  const std::string& v = str(key);
  char* end = nullptr;
  unsigned long long x = std::strtoull(v.c_str(), &end, 10);
  LOOM_CHECK(!v.empty() && end && *end == 0, kSnapshot,
             msg_type_name(type) << " field '" << key << "' is not an unsigned integer: '" << v << "'");
  return x;
}

std::string encode_frame(const Message& m) {
  std::string payload;
  for (const auto& [k, v] : m.fields) payload += k + "=" + v + "\n";
  LOOM_CHECK(payload.size() <= kMaxPayload, kInternal, "protocol message of " << payload.size() << " bytes is too big");
  uint32_t head[4] = {kMsgMagic, kProtocolVersion, static_cast<uint32_t>(m.type), static_cast<uint32_t>(payload.size())};
  std::string frame(sizeof head, '\0');
  std::memcpy(frame.data(), head, sizeof head);
  return frame + payload;
}

Message decode_payload(MsgType type, const std::string& payload) {
  Message m(type);
  size_t pos = 0;
  while (pos < payload.size()) {
    size_t nl = payload.find('\n', pos);
    LOOM_CHECK(nl != std::string::npos, kSnapshot, "malformed " << msg_type_name(type) << " frame: unterminated line");
    size_t eq = payload.find('=', pos);
    LOOM_CHECK(eq != std::string::npos && eq < nl && eq > pos, kSnapshot,
               "malformed " << msg_type_name(type) << " frame: line without key=value");
    m.fields[payload.substr(pos, eq - pos)] = payload.substr(eq + 1, nl - eq - 1);
    pos = nl + 1;
  }
  return m;
}

void write_message(Socket& s, const Message& m) {
  std::string frame = encode_frame(m);
  boost::system::error_code ec;
  boost::asio::write(s, boost::asio::buffer(frame), ec);
  LOOM_CHECK(!ec, kSnapshot, "snapshot daemon connection: sending " << msg_type_name(m.type) << " failed: " << ec.message());
}

Message read_message(Socket& s) {
  uint32_t head[4];
  boost::system::error_code ec;
  boost::asio::read(s, boost::asio::buffer(head, sizeof head), ec);
  LOOM_CHECK(!ec, kSnapshot, "snapshot daemon connection closed (" << ec.message() << ")");
  LOOM_CHECK(head[0] == kMsgMagic && head[1] == kProtocolVersion, kSnapshot,
             "snapshot daemon connection: frame with magic " << std::hex << head[0] << " version " << std::dec << head[1]
                                                             << " (expected protocol " << kProtocolVersion << ")");
  LOOM_CHECK(head[3] <= kMaxPayload, kSnapshot, "snapshot daemon connection: frame of " << head[3] << " bytes refused");
  LOOM_CHECK(head[2] >= 1 && head[2] <= static_cast<uint32_t>(MsgType::kStatusReply), kSnapshot,
             "snapshot daemon connection: unknown message type " << head[2]);
  std::string payload(head[3], '\0');
  if (head[3] > 0) {
    boost::asio::read(s, boost::asio::buffer(payload.data(), payload.size()), ec);
    LOOM_CHECK(!ec, kSnapshot, "snapshot daemon connection closed mid-frame (" << ec.message() << ")");
  }
  return decode_payload(static_cast<MsgType>(head[2]), payload);
}

}  // namespace loom::snap
