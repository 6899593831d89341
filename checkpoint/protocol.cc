#include "checkpoint/protocol.h"

#include <array>
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
    case MsgType::kPeers: return "PEERS";
    case MsgType::kEcQuery: return "EC_QUERY";
    case MsgType::kEcVersions: return "EC_VERSIONS";
    case MsgType::kRebuild: return "REBUILD";
    case MsgType::kEcChunk: return "EC_CHUNK";
    case MsgType::kEcFetch: return "EC_FETCH";
    case MsgType::kEcData: return "EC_DATA";
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
  const uint64_t data_len = m.data.size();
  std::string frame(sizeof head + sizeof data_len, '\0');
  std::memcpy(frame.data(), head, sizeof head);
  std::memcpy(frame.data() + sizeof head, &data_len, sizeof data_len);
  return frame + payload;  // the data follows separately (no copy of large bodies)
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

template <class Stream>
void write_message(Stream& s, const Message& m) {
  std::string frame = encode_frame(m);
  boost::system::error_code ec;
  std::array<boost::asio::const_buffer, 2> parts = {boost::asio::buffer(frame), boost::asio::buffer(m.data)};
  boost::asio::write(s, parts, ec);
  LOOM_CHECK(!ec, kSnapshot, "snapshot connection: sending " << msg_type_name(m.type) << " failed: " << ec.message());
}

template <class Stream>
Message read_message(Stream& s) {
  uint32_t head[4];
  uint64_t data_len = 0;
  boost::system::error_code ec;
  std::array<boost::asio::mutable_buffer, 2> parts = {boost::asio::buffer(head, sizeof head),
                                                       boost::asio::buffer(&data_len, sizeof data_len)};
  boost::asio::read(s, parts, ec);
  LOOM_CHECK(!ec, kSnapshot, "snapshot connection closed (" << ec.message() << ")");
  LOOM_CHECK(head[0] == kMsgMagic && head[1] == kProtocolVersion, kSnapshot,
             "snapshot connection: frame with magic " << std::hex << head[0] << " version " << std::dec << head[1]
                                                      << " (expected protocol " << kProtocolVersion << ")");
  LOOM_CHECK(head[3] <= kMaxPayload && data_len <= kMaxData, kSnapshot,
             "snapshot connection: frame of " << head[3] << " + " << data_len << " bytes refused");
  LOOM_CHECK(head[2] >= 1 && head[2] <= static_cast<uint32_t>(MsgType::kEcData), kSnapshot,
             "snapshot connection: unknown message type " << head[2]);
  std::string payload(head[3], '\0');
  if (head[3] > 0) {
    boost::asio::read(s, boost::asio::buffer(payload.data(), payload.size()), ec);
    LOOM_CHECK(!ec, kSnapshot, "snapshot connection closed mid-frame (" << ec.message() << ")");
  }
  Message m = decode_payload(static_cast<MsgType>(head[2]), payload);
  if (data_len > 0) {
    m.data.resize(data_len);
    boost::asio::read(s, boost::asio::buffer(m.data.data(), m.data.size()), ec);
    LOOM_CHECK(!ec, kSnapshot, "snapshot connection closed mid-frame (" << ec.message() << ")");
  }
  return m;
}

template void write_message<Socket>(Socket&, const Message&);
template Message read_message<Socket>(Socket&);
template void write_message<TcpSocket>(TcpSocket&, const Message&);
template Message read_message<TcpSocket>(TcpSocket&);

}  // namespace loom::snap
