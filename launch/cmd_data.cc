// loom info / tokenize / inspect.
#include <algorithm>
#include <cstdio>
#include <iostream>
#include <sstream>
#include <fstream>
#include <string>

#include <filesystem>

#include "checkpoint/daemon.h"
#include "checkpoint/hdf5_format.h"
#include "checkpoint/protocol.h"
#include "core/backend.h"
#include "core/data.h"
#include "core/error.h"
#include "launch/commands.h"
#include "launch/monitor/json.h"

namespace loom::cli {

int cmd_info(int argc, char** argv) {
  (void)argv;
  if (argc != 0) {
    std::cerr << "usage: loom info\n";
    return 2;
  }
  std::string reason;
  bool cuda = cuda_available(&reason);
  std::cout << "Loom 0.1.0\n"
#ifdef LOOM_HAVE_CUDA
            << "  CUDA backend : built\n"
#else
            << "  CUDA backend : not built\n"
#endif
#ifdef LOOM_HAVE_NCCL
            << "  NCCL         : built\n"
#else
            << "  NCCL         : not built\n"
#endif
            << "  GPU          : " << (cuda ? "available" : reason) << "\n"
            << "  data cache   : " << default_cache_dir() << "\n";
  return 0;
}

int cmd_tokenize(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: loom tokenize IN.txt OUT.bin\n";
    return 2;
  }
  std::vector<uint32_t> tokens = tokenize_text_file(argv[0]);
  LOOM_CHECK(tokens.size() >= 2, kData, "'" << argv[0] << "' holds fewer than 2 bytes of text");
  write_token_file(argv[1], tokens, 2, ByteTokenizer::kVocabSize);
  std::cout << "wrote " << tokens.size() << " tokens (byte-level, vocab " << ByteTokenizer::kVocabSize << ") to "
            << argv[1] << "\n";
  return 0;
}

namespace {

// job:ID[:NODE] -> the daemon's STATUS: ranks, memory, buffers and their states.
int inspect_job(const std::string& spec) {
  std::string rest = spec.substr(4);
  int node = 0;
  if (auto colon = rest.find(':'); colon != std::string::npos) {
    node = std::atoi(rest.substr(colon + 1).c_str());
    rest = rest.substr(0, colon);
  }
  const std::string path = snap::daemon_socket_path(rest, node);
  boost::asio::io_context io;
  snap::Socket sock(io);
  boost::system::error_code ec;
  sock.connect(boost::asio::local::stream_protocol::endpoint(path), ec);
  LOOM_CHECK(!ec, kSnapshot, "no snapshot daemon for job '" << rest << "' node " << node << " (" << path << ": "
                                                            << ec.message() << ")");
  snap::write_message(sock, snap::Message(snap::MsgType::kStatus));
  snap::Message r = snap::read_message(sock);
  std::cout << "snapshot daemon of job " << rest << ", node " << node << "\n";
  for (const auto& [k, v] : r.fields) std::cout << "  " << k << ": " << v << "\n";
  std::cout << "  (rank lines: version/state of each of the 3 buffers)\n";
  return 0;
}

int inspect_snapshot_dir(const std::string& dir) {
  auto versions = snap::complete_versions(dir);
  std::cout << "snapshot folder " << dir << ": " << versions.size() << " complete version(s)";
  for (int64_t v : versions) std::cout << " " << v;
  std::cout << "\n";
  for (const auto& entry : std::filesystem::directory_iterator(dir))
    if (entry.path().extension() == ".h5") std::cout << "  " << entry.path().filename().string() << "\n";
  return 0;
}

}  // namespace

// A verdict of the monitor (launch/monitor/engine.h): its kind and summary, then the document with its evidence.
int inspect_verdict(const std::string& path) {
  std::ifstream f(path);
  LOOM_CHECK(f, kIo, "cannot read '" << path << "'");
  std::stringstream ss;
  ss << f.rdbuf();
  const std::string doc = ss.str();
  const std::string kind = mon::json_get_string(doc, "kind");
  LOOM_CHECK(!kind.empty(), kData, "'" << path << "' is not a monitor verdict (no \"kind\")");
  std::cout << "verdict " << path << "\n  kind    : " << kind << "\n  job     : " << mon::json_get_string(doc, "job")
            << "\n  summary : " << mon::json_get_string(doc, "summary") << "\n\n" << mon::json_pretty(doc);
  return 0;
}

int cmd_inspect(int argc, char** argv) {
  if (argc != 1) {
    std::cerr << "usage: loom inspect FILE.bin | FILE.h5 | SNAPSHOT_DIR | job:ID[:NODE] | VERDICT.json\n";
    return 2;
  }
  const std::string target = argv[0];
  if (target.rfind("job:", 0) == 0) return inspect_job(target);
  if (std::filesystem::is_directory(target)) return inspect_snapshot_dir(target);
  if (target.size() > 5 && target.compare(target.size() - 5, 5, ".json") == 0) return inspect_verdict(target);
  if (target.size() > 3 && target.compare(target.size() - 3, 3, ".h5") == 0) {
    std::cout << snap::describe_file(target);
    return 0;
  }
  TokenFile f = TokenFile::open(argv[0]);
  std::cout << "token file " << f.path() << "\n"
            << "  format     : " << (f.has_header() ? "Loom header (LOOMTOK1)" : "raw (no header)") << ", "
            << f.bytes_per_token() * 8 << "-bit tokens\n"
            << "  tokens     : " << f.size() << "\n"
            << "  vocab size : " << f.vocab_size() << "\n";
  const int64_t n = std::min<int64_t>(f.size(), 64);
  std::vector<int32_t> head(static_cast<size_t>(n));
  f.read(0, n, head.data());
  std::cout << "  first " << n << " tokens:";
  for (int32_t t : head) std::cout << " " << t;
  std::cout << "\n";
  if (f.vocab_size() <= ByteTokenizer::kVocabSize) {
    std::string text;
    for (int32_t t : head) text += (t >= 32 && t < 127) ? static_cast<char>(t) : (t == '\n' ? '/' : '.');
    std::cout << "  as bytes   : " << text << "\n";
  }
  return 0;
}

}  // namespace loom::cli
