// EcGroup: a daemon's part in its erasure-coding group (checkpoint/erasure.h has the code and the placement).
//
// The G daemons of a group protect each other's node blobs (a node's blob = its local ranks' snapshot buffers of
// one version, back to back in rank order). After every committed version that is due, each daemon sends the
// data chunks it owes to each stripe's parity holders over TCP (EC_CHUNK); a holder encodes the stripe's parity
// (ISA-L Reed-Solomon, Cauchy) once all k chunks are in. The traffic runs on the daemons' threads, off the training
// path. When a node is lost (its ranks, daemon and memory), its replacement daemon rebuilds the blob of a
// version from k surviving fragments of each stripe (EC_FETCH to the peers), so any `parity` lost nodes of a
// group are recoverable at a memory overhead of parity/(G - parity).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "checkpoint/erasure.h"
#include "checkpoint/protocol.h"

namespace loom::snap {

// How an EcGroup reads and writes this node's blob (implemented by the daemon over its segments).
class BlobStore {
 public:
  virtual ~BlobStore() = default;
  virtual size_t blob_bytes() = 0;
  // Copies [offset, offset + len) of the blob of `version` (bytes past the blob read as zero); false when the
  // version is not held intact by every local rank.
  virtual bool read(int64_t version, size_t offset, size_t len, uint8_t* out) = 0;
  // Rebuild output: starts a version, writes bytes of it, then commits it (CRC) in every local rank's segment.
  virtual void begin_write(int64_t version) = 0;
  virtual void write(size_t offset, size_t len, const uint8_t* data) = 0;
  virtual void commit_write() = 0;
};

struct EcPeer {
  std::string host;
  int port = 0;
};

class EcGroup {
 public:
  explicit EcGroup(BlobStore& store);
  ~EcGroup();
  EcGroup(const EcGroup&) = delete;
  EcGroup& operator=(const EcGroup&) = delete;

  // Listens on TCP (all interfaces, an ephemeral port); returns the port.
  int listen();
  int port() const { return port_; }
  // The group: size G, parity p, this node's index in it, and every member's endpoint (by index).
  void configure(int group_size, int parity, int index, std::vector<EcPeer> peers, int64_t every);
  bool configured() const;
  // After `version` committed on every local rank: sends this node's chunks to the parity holders, if due.
  void on_committed(int64_t version);
  // Versions for which this node holds all its parity chunks (newest first).
  std::vector<int64_t> complete_versions();
  // Rebuilds this node's blob of `version` from the group (throws kSnapshot when too few fragments survive).
  void rebuild(int64_t version);
  std::string describe();

 private:
  struct Pending {
    std::vector<std::string> chunks;  // by fragment index within the stripe's data
    int received = 0;
  };
  void accept_loop();
  void serve(std::shared_ptr<TcpSocket> sock);
  void on_chunk(const Message& m);
  Message on_fetch(const Message& m);
  Message call_peer(int index, const Message& m, bool expect_reply);
  size_t chunk_bytes();

  BlobStore& store_;
  boost::asio::io_context io_;
  std::unique_ptr<boost::asio::ip::tcp::acceptor> acceptor_;
  int port_ = 0;
  std::thread accept_thread_;
  std::vector<std::thread> connection_threads_;
  bool stopping_ = false;

  std::mutex mu_;
  std::unique_ptr<ec::GroupLayout> layout_;
  int index_ = 0;
  int64_t every_ = 1;
  std::vector<EcPeer> peers_;
  std::map<std::pair<int64_t, int>, Pending> pending_;          // (version, stripe) -> chunks so far
  std::map<int64_t, std::vector<uint8_t>> parity_;             // version -> this node's parity area
  std::map<int64_t, std::set<int>> parity_done_;               // version -> stripes whose parity is here
  std::set<int64_t> complete_;
  std::map<int, std::unique_ptr<TcpSocket>> out_;              // connections to peers, by index
  std::mutex out_mu_;
};

}  // namespace loom::snap
