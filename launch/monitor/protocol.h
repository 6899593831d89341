// The trainer -> monitor protocol (TCP). One connection per rank; the rank talks, the monitor only listens
// (and closes the connection on a message it refuses).
//
// Frame: uint32 magic "LMON", uint32 protocol version, uint32 message type, uint32 payload length, then the
// payload: "key=value\n" lines. A frame with another magic, version or an unknown type, a payload over 1 MiB or
// a payload that is not key=value lines is malformed: the monitor drops the connection and counts it. HTTP
// requests ("GET ...") on the same port are served the status page and metrics instead (launch/monitor/server.h).
//
// Every message carries job, epoch, token and rank. The monitor refuses (and counts) messages whose token is
// not the job's (unauthenticated peers) or whose epoch is not the current incarnation's (ranks of an earlier
// incarnation that outlived an abort).
//
//   HELLO      world, node, host, pid, tp_rank, dp_rank, clock_offset
//   HEARTBEAT  every monitor.heartbeat_s: step, start (the step this incarnation resumed from), loss, tokens_per_s, snapshot, launched, completed, busy_s, wall_s,
//              runq_s (optional: run-queue delay of the collective-issuing threads outside collectives, cumulative, any origin, may be negative),
//              xfer (the transfer in flight), links (per-source transfer stats since the last heartbeat)
//   TRACE      recs: the collectives completed since the last TRACE, "group,seq,op,bytes,start,end;..."
//   BYE        reason = done | error, message: the rank ends (no crash verdict for it)
// Times are wall-clock seconds (CLOCK_REALTIME), comparable across the ranks of a host and, to NTP's accuracy,
// across hosts.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "parallel/link_trace.h"
#include "parallel/trace.h"

namespace loom::mon {

enum class MonType : uint32_t { kHello = 1, kHeartbeat = 2, kTrace = 3, kBye = 4 };
const char* mon_type_name(MonType t);

inline constexpr uint32_t kMonMagic = 0x4e4f4d4c;  // "LMON" little-endian
inline constexpr uint32_t kMonVersion = 1;
inline constexpr uint32_t kMonMaxPayload = 1u << 20;
inline constexpr size_t kMonHeaderBytes = 16;

struct MonMessage {
  MonType type = MonType::kHeartbeat;
  std::map<std::string, std::string> fields;

  MonMessage() = default;
  explicit MonMessage(MonType t) : type(t) {}
  MonMessage& set(const std::string& key, const std::string& value);
  MonMessage& set(const std::string& key, int64_t value) { return set(key, std::to_string(value)); }
  MonMessage& set_f(const std::string& key, double value);
  const std::string& str(const std::string& key) const;  // throws kComm when absent
  int64_t i64(const std::string& key) const;             // throws kComm when absent or not an integer
  double f64(const std::string& key) const;              // throws kComm when absent or not a number
  std::string get(const std::string& key, const std::string& def = "") const;
  bool has(const std::string& key) const { return fields.count(key) > 0; }
};

std::string encode_frame(const MonMessage& m);

struct FrameHeader {
  MonType type;
  uint32_t payload_bytes;
};
// Checks the 16 header bytes; nullopt (with the reason) for a malformed header.
std::optional<FrameHeader> decode_header(const unsigned char* bytes, std::string* why);
// Parses the payload; nullopt (with the reason) when it is not key=value lines.
std::optional<MonMessage> decode_payload(MonType type, const std::string& payload, std::string* why);

// Field encodings.
std::string encode_records(const std::vector<TraceRecord>& recs);
std::vector<TraceRecord> decode_records(const std::string& s);  // throws kComm on a malformed list
std::string encode_links(const std::vector<LinkStats>& links);
std::vector<LinkStats> decode_links(const std::string& s);
std::string encode_transfer(const TransferState& x);  // "" when none is active
TransferState decode_transfer(const std::string& s);

// Wall-clock seconds (CLOCK_REALTIME) of the monitor protocol.
double wall_now_s();

}  // namespace loom::mon
