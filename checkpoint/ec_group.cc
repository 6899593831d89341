#include "checkpoint/ec_group.h"

#include <sys/socket.h>

#include <algorithm>
#include <cstring>
#include <sstream>

#include <boost/asio/connect.hpp>

#include "core/error.h"
#include "core/log.h"

namespace loom::snap {

EcGroup::EcGroup(BlobStore& store) : store_(store) {}

EcGroup::~EcGroup() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  // A thread blocked in accept() does not wake when another thread closes the socket; shutdown() wakes it (the
  // accept fails), then the thread can be joined and the socket closed.
  if (acceptor_) ::shutdown(acceptor_->native_handle(), SHUT_RDWR);
  io_.stop();
  if (accept_thread_.joinable()) accept_thread_.join();
  if (acceptor_) {
    boost::system::error_code ec;
    acceptor_->close(ec);
  }
  for (auto& t : connection_threads_) t.detach();  // blocked reads end with the process
}

int EcGroup::listen() {
  using boost::asio::ip::tcp;
  acceptor_ = std::make_unique<tcp::acceptor>(io_, tcp::endpoint(tcp::v4(), 0));
  port_ = acceptor_->local_endpoint().port();
  accept_thread_ = std::thread([this] { accept_loop(); });
  return port_;
}

void EcGroup::accept_loop() {
  for (;;) {
    auto sock = std::make_shared<TcpSocket>(io_);
    boost::system::error_code ec;
    acceptor_->accept(*sock, ec);
    if (ec) return;  // closed
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) return;
    connection_threads_.emplace_back([this, sock] { serve(sock); });
  }
}

void EcGroup::configure(int group_size, int parity, int index, std::vector<EcPeer> peers, int64_t every) {
  LOOM_CHECK(static_cast<int>(peers.size()) == group_size && index >= 0 && index < group_size, kSnapshot,
             "EC group of " << group_size << " with " << peers.size() << " peers and index " << index);
  std::lock_guard<std::mutex> lock(mu_);
  layout_ = std::make_unique<ec::GroupLayout>(group_size, parity);
  index_ = index;
  peers_ = std::move(peers);
  every_ = std::max<int64_t>(1, every);
}

bool EcGroup::configured() const { return layout_ != nullptr; }

size_t EcGroup::chunk_bytes() { return layout_->chunk_bytes(store_.blob_bytes()); }

std::string EcGroup::describe() {
  std::lock_guard<std::mutex> lock(mu_);
  if (!layout_) return "no EC group";
  std::ostringstream os;
  os << "EC group of " << layout_->group_size() << " nodes, parity " << layout_->parity() << (layout_->mirroring() ? " (mirroring)" : "")
     << ", this node index " << index_ << ", complete versions";
  for (auto it = complete_.rbegin(); it != complete_.rend(); ++it) os << " " << *it;
  return os.str();
}

// A connection per peer, opened on first use and re-opened after a failure.
Message EcGroup::call_peer(int index, const Message& m, bool expect_reply) {
  std::lock_guard<std::mutex> lock(out_mu_);
  for (int attempt = 0;; ++attempt) {
    try {
      auto& sock = out_[index];
      if (!sock) {
        using boost::asio::ip::tcp;
        tcp::resolver resolver(io_);
        auto endpoints = resolver.resolve(peers_[static_cast<size_t>(index)].host,
                                          std::to_string(peers_[static_cast<size_t>(index)].port));
        auto s = std::make_unique<TcpSocket>(io_);
        boost::asio::connect(*s, endpoints);
        s->set_option(tcp::no_delay(true));
        sock = std::move(s);
      }
      write_message(*sock, m);
      return expect_reply ? read_message(*sock) : Message(MsgType::kOk);
    } catch (const std::exception& e) {
      out_[index].reset();
      if (attempt >= 1)
        LOOM_THROW(kSnapshot, "EC peer " << index << " (" << peers_[static_cast<size_t>(index)].host << ":"
                                         << peers_[static_cast<size_t>(index)].port << ") unreachable: " << e.what());
    }
  }
}

void EcGroup::on_committed(int64_t version) {
  std::vector<std::pair<int, Message>> sends;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!layout_ || version % every_ != 0 || layout_->parity_slots() == 0) return;
  }
  const size_t cb = chunk_bytes();
  for (int j = 0; j < layout_->group_size(); ++j) {
    const auto& data = layout_->stripe_data(j);
    for (size_t i = 0; i < data.size(); ++i) {
      if (data[i].node != index_) continue;
      Message m(MsgType::kEcChunk);
      m.set("version", version).set("stripe", j).set("fragment", static_cast<int64_t>(i));
      m.data.resize(cb);
      if (!store_.read(version, static_cast<size_t>(data[i].chunk) * cb, cb,
                       reinterpret_cast<uint8_t*>(m.data.data())))
        return;  // the version is already gone from memory: skip this round
      for (int holder : layout_->stripe_parity_nodes(j)) {
        if (holder == index_) {
          on_chunk(m);
        } else {
          sends.emplace_back(holder, m);
        }
      }
    }
  }
  for (auto& [holder, m] : sends) {
    try {
      call_peer(holder, m, false);
    } catch (const std::exception& e) {
      LOOM_WARN("erasure coding of version " << version << ": " << e.what());
    }
  }
}

void EcGroup::on_chunk(const Message& m) {
  const int64_t version = m.i64("version");
  const int stripe = static_cast<int>(m.i64("stripe")), fragment = static_cast<int>(m.i64("fragment"));
  std::lock_guard<std::mutex> lock(mu_);
  if (!layout_) return;
  const int k = layout_->k();
  LOOM_CHECK(stripe >= 0 && stripe < layout_->group_size() && fragment >= 0 && fragment < k, kSnapshot,
             "EC_CHUNK for stripe " << stripe << " fragment " << fragment);
  const size_t cb = chunk_bytes();
  LOOM_CHECK(m.data.size() == cb, kSnapshot, "EC_CHUNK of " << m.data.size() << " bytes, expected " << cb);
  Pending& p = pending_[{version, stripe}];
  if (p.chunks.empty()) p.chunks.resize(static_cast<size_t>(k));
  if (p.chunks[static_cast<size_t>(fragment)].empty()) ++p.received;
  p.chunks[static_cast<size_t>(fragment)] = m.data;
  if (p.received < k) return;
  // All k data chunks: compute the stripe's parity and keep the slots this node holds.
  const int slots = layout_->parity_slots();
  std::vector<std::vector<uint8_t>> parity(static_cast<size_t>(slots), std::vector<uint8_t>(cb));
  std::vector<const uint8_t*> in;
  std::vector<uint8_t*> out;
  for (auto& c : p.chunks) in.push_back(reinterpret_cast<const uint8_t*>(c.data()));
  for (auto& q : parity) out.push_back(q.data());
  ec::encode_stripe(*layout_, stripe, cb, in.data(), out.data());
  auto& area = parity_[version];
  area.resize(layout_->parity_bytes_per_node(store_.blob_bytes()));
  const auto& holders = layout_->stripe_parity_nodes(stripe);
  for (int s = 0; s < slots; ++s) {
    if (holders[static_cast<size_t>(s)] != index_) continue;
    std::memcpy(area.data() + static_cast<size_t>(layout_->parity_position(stripe, s)) * cb, parity[static_cast<size_t>(s)].data(), cb);
    parity_done_[version].insert(stripe);
  }
  pending_.erase({version, stripe});
  if (parity_done_[version].size() == layout_->parity_held_by(index_).size()) {
    complete_.insert(version);
    // Keep the parity of the two newest complete versions (the survivors' data of older ones is gone anyway).
    while (complete_.size() > 2) {
      const int64_t old = *complete_.begin();
      complete_.erase(old);
      parity_.erase(old);
      parity_done_.erase(old);
    }
    for (auto it = pending_.begin(); it != pending_.end();)
      it = it->first.first < *complete_.begin() ? pending_.erase(it) : std::next(it);
  }
}

Message EcGroup::on_fetch(const Message& m) {
  const int64_t version = m.i64("version");
  const int stripe = static_cast<int>(m.i64("stripe")), fragment = static_cast<int>(m.i64("fragment"));
  const size_t cb = chunk_bytes();
  Message reply(MsgType::kEcData);
  reply.data.resize(cb);
  const int k = layout_->k();
  if (fragment < k) {
    const ec::FragmentRef& f = layout_->stripe_data(stripe)[static_cast<size_t>(fragment)];
    LOOM_CHECK(f.node == index_, kSnapshot, "EC_FETCH of a data fragment this node does not hold");
    if (!store_.read(version, static_cast<size_t>(f.chunk) * cb, cb, reinterpret_cast<uint8_t*>(reply.data.data())))
      LOOM_THROW(kSnapshot, "version " << version << " is not in this node's memory");
    return reply;
  }
  std::lock_guard<std::mutex> lock(mu_);
  const int slot = fragment - k;
  LOOM_CHECK(complete_.count(version) && parity_done_[version].count(stripe), kSnapshot,
             "no parity of version " << version << " stripe " << stripe << " on this node");
  std::memcpy(reply.data.data(), parity_[version].data() + static_cast<size_t>(layout_->parity_position(stripe, slot)) * cb, cb);
  return reply;
}

void EcGroup::serve(std::shared_ptr<TcpSocket> sock) {
  try {
    for (;;) {
      Message m = read_message(*sock);
      if (m.type == MsgType::kEcChunk) {
        on_chunk(m);
      } else if (m.type == MsgType::kEcFetch) {
        Message reply;
        try {
          reply = on_fetch(m);
        } catch (const Error& e) {
          reply = Message(MsgType::kError);
          reply.set("message", e.what());
        }
        write_message(*sock, reply);
      } else {
        LOOM_THROW(kSnapshot, "unexpected " << msg_type_name(m.type) << " from an EC peer");
      }
    }
  } catch (const std::exception& e) {
    LOOM_DEBUG("EC peer connection ended: " << e.what());
  }
}

std::vector<int64_t> EcGroup::complete_versions() {
  std::lock_guard<std::mutex> lock(mu_);
  return std::vector<int64_t>(complete_.rbegin(), complete_.rend());
}

void EcGroup::rebuild(int64_t version) {
  LOOM_CHECK(layout_ != nullptr, kSnapshot, "this daemon has no EC group to rebuild from");
  const size_t cb = chunk_bytes();
  const int k = layout_->k();
  store_.begin_write(version);
  for (int j = 0; j < layout_->group_size(); ++j) {
    const auto& data = layout_->stripe_data(j);
    int mine = -1;
    for (size_t i = 0; i < data.size(); ++i)
      if (data[i].node == index_) mine = static_cast<int>(i);
    if (mine < 0) continue;  // this node only held parity of stripe j: the next EC round recomputes it
    // Collect k fragments other than ours from the nodes that hold them.
    const std::vector<int> nodes = layout_->stripe_nodes(j);
    std::vector<int> present;
    std::vector<std::string> frags;
    for (int f = 0; f < static_cast<int>(nodes.size()) && static_cast<int>(present.size()) < k; ++f) {
      if (f == mine || nodes[static_cast<size_t>(f)] == index_) continue;
      Message req(MsgType::kEcFetch);
      req.set("version", version).set("stripe", j).set("fragment", f);
      try {
        Message r = call_peer(nodes[static_cast<size_t>(f)], req, true);
        if (r.type != MsgType::kEcData) continue;  // that node lost it too
        present.push_back(f);
        frags.push_back(std::move(r.data));
      } catch (const std::exception& e) {
        LOOM_WARN("rebuild of version " << version << ": fragment " << f << " of stripe " << j << ": " << e.what());
      }
    }
    LOOM_CHECK(static_cast<int>(present.size()) == k, kSnapshot,
               "cannot rebuild version " << version << ": stripe " << j << " has only " << present.size() << " of the "
                                         << k << " fragments it needs left in the EC group");
    std::vector<uint8_t> out(cb);
    if (layout_->mirroring()) {
      std::memcpy(out.data(), frags[0].data(), cb);
    } else {
      std::vector<const uint8_t*> in;
      for (auto& f : frags) in.push_back(reinterpret_cast<const uint8_t*>(f.data()));
      uint8_t* outp = out.data();
      layout_->code()->reconstruct(cb, present, in.data(), {mine}, &outp);
    }
    const size_t offset = static_cast<size_t>(data[static_cast<size_t>(mine)].chunk) * cb;
    const size_t blob = store_.blob_bytes();
    if (offset < blob) store_.write(offset, std::min(cb, blob - offset), out.data());
  }
  store_.commit_write();
}

}  // namespace loom::snap
