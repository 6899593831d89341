// loom info / tokenize / inspect.
#include <algorithm>
#include <cstdio>
#include <iostream>
#include <string>

#include "core/backend.h"
#include "core/data.h"
#include "core/error.h"
#include "launch/commands.h"

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

int cmd_inspect(int argc, char** argv) {
  if (argc != 1) {
    std::cerr << "usage: loom inspect FILE.bin\n";
    return 2;
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
