// The trainer <-> snapshot daemon protocol over a Unix-domain stream socket (Boost.Asio).
//
// Frame: uint32 magic "LMSG", uint32 protocol version, uint32 message type, uint32 text length, uint64 data length,
// then the text: "key=value\n" lines (values may not contain newlines), then the data (binary: erasure-coding
// fragments between daemons). Text over 16 MiB, data over 64 GiB, an unknown magic, version or type are rejected
// (the connection is closed), never trusted.
//
//   trainer                              daemon
//   HELLO job, rank, identity, layout -> HELLO_OK segment=<shm name>        (or ERROR message=...)
//   STAGED buffer, version            -> (no reply; the daemon commits: CRC, state committed)
//   QUERY                             -> VERSIONS v0=<version>:<buffer>:<crc ok 0|1> ...  (commits staged first)
//   FINISH                            -> OK   (this rank ended cleanly; when every rank has, the daemon exits)
//   STATUS                            -> STATUS_REPLY ranks=..., bytes=..., persisted=...   (loom inspect)
//   PEERS group, parity, index, peer<i>=host:port   -> OK   (the node's EC group, from the trainers)
//   EC_QUERY                          -> EC_VERSIONS versions with complete parity on this node
//   REBUILD version                   -> OK | ERROR   (rebuild this node's ranks from the EC group)
// daemon <-> daemon (TCP):
//   EC_CHUNK version, stripe, fragment + data          (a data chunk for the stripe's parity holder)
//   EC_FETCH version, stripe, fragment  -> EC_DATA + data | ERROR   (a fragment for a rebuild)
#pragma once

#include <utility>  // before Asio: Boost 1.74's awaitable.hpp uses std::exchange without including it

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/write.hpp>
#include <cstdint>
#include <map>
#include <string>

namespace loom::snap {

enum class MsgType : uint32_t {
  kHello = 1,
  kHelloOk = 2,
  kStaged = 3,
  kQuery = 4,
  kVersions = 5,
  kFinish = 6,
  kOk = 7,
  kError = 8,
  kStatus = 9,
  kStatusReply = 10,
  kPeers = 11,
  kEcQuery = 12,
  kEcVersions = 13,
  kRebuild = 14,
  kEcChunk = 15,
  kEcFetch = 16,
  kEcData = 17,
};
const char* msg_type_name(MsgType t);

inline constexpr uint32_t kMsgMagic = 0x47534d4c;  // "LMSG"
inline constexpr uint32_t kProtocolVersion = 1;
inline constexpr uint32_t kMaxPayload = 16u << 20;
inline constexpr uint64_t kMaxData = uint64_t{64} << 30;

struct Message {
  MsgType type = MsgType::kOk;
  std::map<std::string, std::string> fields;
  std::string data;  // binary body (fragments); empty for most messages

  Message() = default;
  explicit Message(MsgType t) : type(t) {}
  Message& set(const std::string& key, const std::string& value);
  Message& set(const std::string& key, int64_t value);
  bool has(const std::string& key) const { return fields.count(key) > 0; }
  // Throw kSnapshot naming the message type and key when absent or malformed.
  const std::string& str(const std::string& key) const;
  int64_t i64(const std::string& key) const;
  uint64_t u64(const std::string& key) const;
};

using Socket = boost::asio::local::stream_protocol::socket;
using TcpSocket = boost::asio::ip::tcp::socket;

// Blocking I/O on a Unix-domain or TCP stream; throw kSnapshot (with the reason) on a closed connection or a
// malformed frame.
template <class Stream>
void write_message(Stream& s, const Message& m);
template <class Stream>
Message read_message(Stream& s);

// Encoding helpers (tested directly).
std::string encode_frame(const Message& m);
Message decode_payload(MsgType type, const std::string& payload);

}  // namespace loom::snap
