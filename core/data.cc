// Token files, byte tokenizer, default corpus and batch sampler (see core/data.h and docs/data.md).
//
// Assumes POSIX (open/mmap/rename) and a little-endian host: token files are little-endian and are read and
// written without byte swapping.
#include "core/data.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cerrno>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <unordered_map>
#include <utility>

#include "core/env.h"
#include "core/error.h"
#include "core/fileio.h"
#include "core/log.h"
#include "core/rng.h"

static_assert(std::endian::native == std::endian::little, "Loom token files are read without byte swapping");

namespace loom {
namespace {

// Token ids reach the model as int32, so no vocabulary may be larger than this.
constexpr int64_t kMaxVocab = int64_t{1} << 31;

// llm.c token shards (karpathy/llm.c, dev/data/data_common.py): 256 int32 header words (magic, version 1, token
// count), then the tokens. Recognised so that such a file is not silently read as raw tokens, header included.
constexpr size_t kLlmcHeaderBytes = 256 * 4;
constexpr int32_t kLlmcMagicU16 = 20240520;  // GPT-2 shards, uint16 tokens
constexpr int32_t kLlmcMagicU32 = 20240801;  // Llama-3 shards, uint32 tokens

constexpr const char* kSystemFortunesDir = "/usr/share/games/fortunes";

template <class T>
T load_le(const unsigned char* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

// Checks that a file of file_bytes holds exactly header_bytes + num_tokens * width bytes.
void check_payload_size(const std::string& path, const char* format, size_t header_bytes, uint64_t num_tokens,
                        int width, size_t file_bytes) {
  LOOM_CHECK(num_tokens <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) / 8, kData,
             "token file '" << path << "' (" << format << ") is corrupt: its header says " << num_tokens << " tokens");
  uint64_t expected = header_bytes + num_tokens * static_cast<uint64_t>(width);
  LOOM_CHECK(file_bytes >= expected, kData,
             "token file '" << path << "' (" << format << ") is truncated: its header says " << num_tokens
                            << " tokens of " << width << " bytes, so the file should have " << expected
                            << " bytes, but it has " << file_bytes);
  LOOM_CHECK(file_bytes == expected, kData,
             "token file '" << path << "' (" << format << ") has " << (file_bytes - expected)
                            << " extra bytes: its header says " << num_tokens << " tokens of " << width
                            << " bytes, so the file should have " << expected << " bytes, but it has " << file_bytes);
}

template <class T>
uint32_t max_token(const T* tokens, int64_t n) {
  uint32_t m = 0;
#pragma omp parallel for reduction(max : m) schedule(static)
  for (int64_t i = 0; i < n; ++i) m = std::max(m, static_cast<uint32_t>(tokens[i]));
  return m;
}

// Copies n tokens widened to int32; returns the largest token so the caller checks the vocab once per call.
template <class T>
uint32_t copy_widened(const T* src, int64_t n, int32_t* out) {
  uint32_t m = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t t = src[i];
    m = std::max(m, t);
    out[i] = static_cast<int32_t>(t);
  }
  return m;
}

struct SplitRange {
  int64_t begin = 0;
  int64_t len = 0;
};

// The validation split is the last floor(n * val_fraction) tokens; the train split is everything before it.
SplitRange split_range(const TokenFile& file, Split split, double val_fraction) {
  LOOM_CHECK(val_fraction > 0.0 && val_fraction < 1.0, kConfig, "val_fraction must be in (0, 1), got " << val_fraction);
  int64_t n = file.size();
  int64_t val = static_cast<int64_t>(static_cast<double>(n) * val_fraction);
  return split == Split::kTrain ? SplitRange{0, n - val} : SplitRange{n - val, val};
}

const char* split_name(Split split) {
  return split == Split::kTrain ? "train" : "validation";
}

void write_all(int fd, const void* data, size_t bytes, const std::string& tmp, const std::string& path) {
  const char* p = static_cast<const char*>(data);
  while (bytes > 0) {
    ssize_t n = ::write(fd, p, bytes);
    if (n < 0 && errno == EINTR) continue;
    LOOM_CHECK(n > 0, kIo,
               "writing token file '" << path << "' (temp file '" << tmp
                                      << "') failed: " << (n < 0 ? detail::errno_string() : "write returned 0"));
    p += n;
    bytes -= static_cast<size_t>(n);
  }
}

// mkdir -p; folders it creates get mode 0700, since a cache under $HOME is private to its user.
void make_dirs(const std::string& dir) {
  LOOM_CHECK(!dir.empty(), kConfig, "cache folder must not be an empty path");
  for (size_t pos = 1; pos <= dir.size(); ++pos) {
    if (pos < dir.size() && dir[pos] != '/') continue;
    std::string prefix = dir.substr(0, pos);
    if (::mkdir(prefix.c_str(), 0700) != 0 && errno != EEXIST) {
      LOOM_THROW(kIo, "cannot create folder '" << prefix << "' (for cache folder '" << dir
                                               << "'): " << detail::errno_string());
    }
  }
  struct stat st {};
  LOOM_CHECK(::stat(dir.c_str(), &st) == 0 && S_ISDIR(st.st_mode), kIo,
             "cache folder '" << dir << "' exists but is not a folder");
}

struct CorpusFile {
  std::string name;
  uint64_t size = 0;
};

std::string install_hint() {
  return "install the corpus with 'apt-get install fortunes' (or 'apt-get install fortunes-min' for a small "
         "one), set LOOM_FORTUNES_DIR to a folder of text files, or give a token file";
}

// The quotation files of a fortunes folder: regular files (not symlinks) whose names do not end in .dat (the
// strfile index) or .u8 (symlinks to the same text), sorted by name.
std::vector<CorpusFile> list_fortune_files(const std::string& dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::file_status st = fs::status(dir, ec);
  LOOM_CHECK(fs::exists(st), kData,
             "default corpus: fortunes folder '" << dir << "' does not exist; " << install_hint());
  LOOM_CHECK(fs::is_directory(st), kData,
             "default corpus: fortunes path '" << dir << "' is not a folder; " << install_hint());
  std::vector<CorpusFile> files;
  fs::directory_iterator it(dir, ec);
  LOOM_CHECK(!ec, kData, "default corpus: cannot list fortunes folder '" << dir << "': " << ec.message());
  for (; it != fs::directory_iterator(); it.increment(ec)) {
    LOOM_CHECK(!ec, kData, "default corpus: cannot list fortunes folder '" << dir << "': " << ec.message());
    const fs::directory_entry& entry = *it;
    std::string name = entry.path().filename().string();
    if (name.ends_with(".dat") || name.ends_with(".u8")) continue;
    if (!fs::is_regular_file(entry.symlink_status(ec)) || ec) continue;
    uint64_t size = entry.file_size(ec);
    LOOM_CHECK(!ec, kData,
               "default corpus: cannot read the size of '" << entry.path().string() << "': " << ec.message());
    if (size > 0) files.push_back(CorpusFile{name, size});
  }
  LOOM_CHECK(!files.empty(), kData,
             "default corpus: fortunes folder '" << dir << "' holds no text files; " << install_hint());
  std::sort(files.begin(), files.end(), [](const CorpusFile& a, const CorpusFile& b) { return a.name < b.name; });
  return files;
}

// Names the cache file: fnv1a64 over "name\0size\n" for each file in order, so an added, removed or resized file
// gives a new cache file without reading any text on a hit. An edit that keeps every size goes unnoticed; deleting
// the cache file rebuilds it.
uint64_t corpus_key(const std::vector<CorpusFile>& files) {
  uint64_t h = fnv1a64("");
  for (const CorpusFile& f : files) {
    h = fnv1a64(f.name, h);
    h = fnv1a64(std::string_view("\0", 1), h);
    h = fnv1a64(std::to_string(f.size) + "\n", h);
  }
  return h;
}

// A cache file is reused when it opens cleanly and holds what the build would write.
bool cached_corpus_ok(const std::string& path, int64_t expected_tokens) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return false;
  try {
    TokenFile f = TokenFile::open(path);
    if (f.has_header() && f.bytes_per_token() == 2 && f.vocab_size() == ByteTokenizer::kVocabSize &&
        f.size() == expected_tokens) {
      return true;
    }
    LOOM_WARN("cached corpus '" << path << "' holds " << f.size() << " tokens (vocab " << f.vocab_size()
                                << "), expected " << expected_tokens << " (vocab 256); rebuilding it");
  } catch (const Error& e) {
    LOOM_WARN("cached corpus '" << path << "' is unusable (" << e.what() << "); rebuilding it");
  }
  return false;
}

}  // namespace

// ---- TokenFile ------------------------------------------------------------------------------------------------

void TokenFile::Unmap::operator()(const unsigned char* p) const {
  if (p) ::munmap(const_cast<unsigned char*>(p), bytes);
}

TokenFile::TokenFile(TokenFile&& other) noexcept
    : path_(std::move(other.path_)),
      mapping_(std::move(other.mapping_)),
      tokens_(std::exchange(other.tokens_, nullptr)),
      num_tokens_(std::exchange(other.num_tokens_, 0)),
      vocab_size_(std::exchange(other.vocab_size_, 0)),
      bytes_per_token_(std::exchange(other.bytes_per_token_, 0)),
      has_header_(std::exchange(other.has_header_, false)) {}

TokenFile& TokenFile::operator=(TokenFile&& other) noexcept {
  if (this != &other) {
    path_ = std::move(other.path_);
    mapping_ = std::move(other.mapping_);
    tokens_ = std::exchange(other.tokens_, nullptr);
    num_tokens_ = std::exchange(other.num_tokens_, 0);
    vocab_size_ = std::exchange(other.vocab_size_, 0);
    bytes_per_token_ = std::exchange(other.bytes_per_token_, 0);
    has_header_ = std::exchange(other.has_header_, false);
  }
  return *this;
}

TokenFile TokenFile::open(const std::string& path, int raw_token_bytes) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) {
    int err = errno;
    LOOM_CHECK(err != ENOENT, kData, "token file '" << path << "' does not exist");
    LOOM_THROW(kData, "token file '" << path << "' cannot be opened: " << std::strerror(err));
  }
  struct stat st {};
  LOOM_CHECK(::fstat(fd.get(), &st) == 0, kIo,
             "fstat of token file '" << path << "' failed: " << detail::errno_string());
  LOOM_CHECK(S_ISREG(st.st_mode), kData, "token file '" << path << "' is not a regular file");
  size_t file_bytes = static_cast<size_t>(st.st_size);
  LOOM_CHECK(file_bytes > 0, kData, "token file '" << path << "' is empty");

  void* map = ::mmap(nullptr, file_bytes, PROT_READ, MAP_PRIVATE, fd.get(), 0);
  LOOM_CHECK(map != MAP_FAILED, kIo,
             "mmap of token file '" << path << "' (" << file_bytes << " bytes) failed: " << detail::errno_string());
  TokenFile f;
  f.path_ = path;
  f.mapping_ = std::unique_ptr<const unsigned char, Unmap>(static_cast<const unsigned char*>(map), Unmap{file_bytes});
  const unsigned char* base = f.mapping_.get();

  bool loom_magic =
      file_bytes >= sizeof(kTokenFileMagic) && std::memcmp(base, kTokenFileMagic, sizeof(kTokenFileMagic)) == 0;
  bool llmc_magic = file_bytes >= kLlmcHeaderBytes &&
                    (load_le<int32_t>(base) == kLlmcMagicU16 || load_le<int32_t>(base) == kLlmcMagicU32) &&
                    load_le<int32_t>(base + 4) == 1;
  if (loom_magic) {
    LOOM_CHECK(file_bytes >= kTokenFileHeaderBytes, kData,
               "token file '" << path << "' is truncated: it starts with the Loom magic but has " << file_bytes
                              << " bytes, less than the " << kTokenFileHeaderBytes << "-byte header");
    uint32_t version = load_le<uint32_t>(base + 8);
    uint32_t width = load_le<uint32_t>(base + 12);
    uint64_t num_tokens = load_le<uint64_t>(base + 16);
    uint64_t vocab = load_le<uint64_t>(base + 24);
    LOOM_CHECK(version == kTokenFileVersion, kData,
               "token file '" << path << "' has format version " << version << "; this Loom reads version "
                              << kTokenFileVersion);
    LOOM_CHECK(
        width == 2 || width == 4, kData,
        "token file '" << path << "' header says " << width << " bytes per token; expected 2 (uint16) or 4 (uint32)");
    LOOM_CHECK(vocab >= 1 && vocab <= static_cast<uint64_t>(kMaxVocab), kData,
               "token file '" << path << "' header says vocab_size " << vocab << "; expected 1.." << kMaxVocab);
    check_payload_size(path, "Loom format", kTokenFileHeaderBytes, num_tokens, static_cast<int>(width), file_bytes);
    f.has_header_ = true;
    f.bytes_per_token_ = static_cast<int>(width);
    f.num_tokens_ = static_cast<int64_t>(num_tokens);
    f.vocab_size_ = static_cast<int64_t>(vocab);
    f.tokens_ = base + kTokenFileHeaderBytes;
  } else if (llmc_magic) {
    int32_t num_tokens = load_le<int32_t>(base + 8);
    int width = load_le<int32_t>(base) == kLlmcMagicU16 ? 2 : 4;
    LOOM_CHECK(num_tokens >= 0, kData, "token file '" << path << "' (llm.c format) says " << num_tokens << " tokens");
    check_payload_size(path, "llm.c format", kLlmcHeaderBytes, static_cast<uint64_t>(num_tokens), width, file_bytes);
    f.has_header_ = true;
    f.bytes_per_token_ = width;
    f.num_tokens_ = num_tokens;
    f.tokens_ = base + kLlmcHeaderBytes;
  } else {
    LOOM_CHECK(raw_token_bytes == 2 || raw_token_bytes == 4, kData,
               "token file '" << path << "' has no header, and raw_token_bytes is " << raw_token_bytes
                              << "; expected 2 (uint16) or 4 (uint32)");
    LOOM_CHECK(file_bytes % static_cast<size_t>(raw_token_bytes) == 0, kData,
               "raw token file '" << path << "' has " << file_bytes << " bytes, not a multiple of the token width "
                                  << raw_token_bytes << " (cut short, or opened with the wrong width?)");
    f.has_header_ = false;
    f.bytes_per_token_ = raw_token_bytes;
    f.num_tokens_ = static_cast<int64_t>(file_bytes / static_cast<size_t>(raw_token_bytes));
    f.tokens_ = base;
  }
  LOOM_CHECK(f.num_tokens_ >= 2, kData,
             "token file '" << path << "' holds " << f.num_tokens_
                            << " tokens; at least 2 are needed (one input, one target)");

  if (f.vocab_size_ == 0) {  // no vocab in the header: the ids in the file define it
    uint32_t m = f.bytes_per_token_ == 2 ? max_token(reinterpret_cast<const uint16_t*>(f.tokens_), f.num_tokens_)
                                         : max_token(reinterpret_cast<const uint32_t*>(f.tokens_), f.num_tokens_);
    LOOM_CHECK(static_cast<int64_t>(m) < kMaxVocab, kData,
               "token file '" << path << "' holds token id " << m << ", which does not fit an int32 token id");
    f.vocab_size_ = static_cast<int64_t>(m) + 1;
  }
  return f;
}

uint32_t TokenFile::at(int64_t i) const {
  LOOM_CHECK(i >= 0 && i < num_tokens_, kData,
             "token index " << i << " is outside token file '" << path_ << "' of " << num_tokens_ << " tokens");
  return bytes_per_token_ == 2 ? load_le<uint16_t>(tokens_ + 2 * i) : load_le<uint32_t>(tokens_ + 4 * i);
}

void TokenFile::read(int64_t start, int64_t count, int32_t* out) const {
  LOOM_CHECK(start >= 0 && count >= 0 && start <= num_tokens_ && count <= num_tokens_ - start, kData,
             "token range [" << start << ", " << start << " + " << count << ") is outside token file '" << path_
                             << "' of " << num_tokens_ << " tokens");
  if (count == 0) return;
  LOOM_CHECK(out != nullptr, kInternal, "TokenFile::read: out is null");
  uint32_t m = bytes_per_token_ == 2 ? copy_widened(reinterpret_cast<const uint16_t*>(tokens_) + start, count, out)
                                     : copy_widened(reinterpret_cast<const uint32_t*>(tokens_) + start, count, out);
  if (static_cast<int64_t>(m) >= vocab_size_) {
    for (int64_t i = 0; i < count; ++i) {
      LOOM_CHECK(static_cast<int64_t>(static_cast<uint32_t>(out[i])) < vocab_size_, kData,
                 "token file '" << path_ << "' holds token " << static_cast<uint32_t>(out[i]) << " at index "
                                << start + i << ", but its header says vocab_size " << vocab_size_);
    }
  }
}

void write_token_file(const std::string& path, const std::vector<uint32_t>& tokens, int bytes_per_token,
                      int64_t vocab_size) {
  LOOM_CHECK(bytes_per_token == 2 || bytes_per_token == 4, kData,
             "write_token_file('" << path << "'): bytes_per_token must be 2 or 4, got " << bytes_per_token);
  LOOM_CHECK(vocab_size >= 1 && vocab_size <= kMaxVocab, kData,
             "write_token_file('" << path << "'): vocab_size must be in 1.." << kMaxVocab << ", got " << vocab_size);
  for (size_t i = 0; i < tokens.size(); ++i) {
    LOOM_CHECK(tokens[i] < static_cast<uint64_t>(vocab_size), kData,
               "write_token_file('" << path << "'): token " << tokens[i] << " at index " << i
                                    << " is not below vocab_size " << vocab_size);
    LOOM_CHECK(bytes_per_token == 4 || tokens[i] < 65536, kData,
               "write_token_file('" << path << "'): token " << tokens[i] << " at index " << i
                                    << " does not fit 2 bytes per token (limit 65535); use bytes_per_token 4");
  }

  std::filesystem::path target(path);
  std::string dir = target.parent_path().empty() ? "." : target.parent_path().string();
  // Unique per process (pid) and per call within it (counter), so concurrent writers never share a temp file.
  static std::atomic<uint64_t> counter{0};
  std::string tmp = dir + "/." + target.filename().string() + ".tmp." + std::to_string(::getpid()) + "." +
                    std::to_string(counter.fetch_add(1));

  UniqueFd fd(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644));
  LOOM_CHECK(fd.get() >= 0, kIo,
             "cannot write token file '" << path << "': creating temp file '" << tmp
                                         << "' failed: " << detail::errno_string());
  TempFileGuard guard(tmp);

  unsigned char header[kTokenFileHeaderBytes] = {};
  uint32_t version = kTokenFileVersion, width = static_cast<uint32_t>(bytes_per_token);
  uint64_t num_tokens = tokens.size(), vocab = static_cast<uint64_t>(vocab_size);
  std::memcpy(header, kTokenFileMagic, 8);
  std::memcpy(header + 8, &version, 4);
  std::memcpy(header + 12, &width, 4);
  std::memcpy(header + 16, &num_tokens, 8);
  std::memcpy(header + 24, &vocab, 8);
  write_all(fd.get(), header, sizeof(header), tmp, path);
  if (bytes_per_token == 4) {
    write_all(fd.get(), tokens.data(), tokens.size() * 4, tmp, path);
  } else {
    constexpr size_t kChunk = size_t{1} << 20;
    std::vector<uint16_t> narrow;
    for (size_t begin = 0; begin < tokens.size(); begin += kChunk) {
      size_t end = std::min(tokens.size(), begin + kChunk);
      narrow.assign(tokens.begin() + static_cast<ptrdiff_t>(begin), tokens.begin() + static_cast<ptrdiff_t>(end));
      write_all(fd.get(), narrow.data(), narrow.size() * 2, tmp, path);
    }
  }
  LOOM_CHECK(::fsync(fd.get()) == 0, kIo,
             "fsync of token file '" << path << "' (temp '" << tmp << "') failed: " << detail::errno_string());
  LOOM_CHECK(fd.close() == 0, kIo,
             "closing token file '" << path << "' (temp '" << tmp << "') failed: " << detail::errno_string());
  LOOM_CHECK(::rename(tmp.c_str(), path.c_str()) == 0, kIo,
             "cannot write token file '" << path << "': renaming temp file '" << tmp
                                         << "' onto it failed: " << detail::errno_string());
  guard.release();
  // Make the rename itself durable. Best effort: some file systems cannot fsync a folder, and the data is safe.
  UniqueFd dir_fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (dir_fd.get() >= 0) ::fsync(dir_fd.get());
}

// ---- tokenizer ------------------------------------------------------------------------------------------------

std::vector<uint32_t> ByteTokenizer::encode(std::string_view text) const {
  std::vector<uint32_t> tokens(text.size());
  for (size_t i = 0; i < text.size(); ++i) tokens[i] = static_cast<unsigned char>(text[i]);
  return tokens;
}

std::string ByteTokenizer::decode(const std::vector<uint32_t>& tokens) const {
  std::string text(tokens.size(), '\0');
  for (size_t i = 0; i < tokens.size(); ++i) {
    LOOM_CHECK(
        tokens[i] < static_cast<uint32_t>(kVocabSize), kData,
        "byte tokenizer: token " << tokens[i] << " at index " << i << " is not a byte (vocab " << kVocabSize << ")");
    text[i] = static_cast<char>(static_cast<unsigned char>(tokens[i]));
  }
  return text;
}

std::vector<uint32_t> tokenize_text_file(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) {
    int err = errno;
    LOOM_CHECK(err != ENOENT, kData, "text file '" << path << "' does not exist");
    LOOM_THROW(kData, "text file '" << path << "' cannot be opened: " << std::strerror(err));
  }
  struct stat st {};
  LOOM_CHECK(::fstat(fd.get(), &st) == 0 && S_ISREG(st.st_mode), kData,
             "text file '" << path << "' is not a regular file");
  std::string text;
  text.reserve(static_cast<size_t>(st.st_size));
  char buf[1 << 16];
  for (;;) {
    ssize_t n = ::read(fd.get(), buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    LOOM_CHECK(n >= 0, kIo, "reading text file '" << path << "' failed: " << detail::errno_string());
    if (n == 0) break;
    text.append(buf, static_cast<size_t>(n));
  }
  return ByteTokenizer().encode(text);
}

// ---- default corpus -------------------------------------------------------------------------------------------

std::string default_cache_dir() {
  if (auto dir = env::get("LOOM_CACHE_DIR"); dir && !dir->empty()) return *dir;
  // The XDG base-directory spec says a relative XDG_CACHE_HOME is invalid and must be ignored.
  if (auto xdg = env::get("XDG_CACHE_HOME"); xdg && !xdg->empty() && (*xdg)[0] == '/') return *xdg + "/loom";
  auto home = env::get("HOME");
  LOOM_CHECK(home && !home->empty(), kConfig,
             "cannot choose a cache folder: LOOM_CACHE_DIR, XDG_CACHE_HOME and HOME are all unset; set LOOM_CACHE_DIR");
  return *home + "/.cache/loom";
}

std::string default_corpus_path(const std::string& cache_dir, const std::string& fortunes_dir) {
  std::string dir = fortunes_dir;
  if (dir.empty()) dir = env::get_string("LOOM_FORTUNES_DIR", "");
  if (dir.empty()) dir = kSystemFortunesDir;
  std::vector<CorpusFile> files = list_fortune_files(dir);
  int64_t total = 0;
  for (const CorpusFile& f : files) total += static_cast<int64_t>(f.size);

  std::string cache = cache_dir.empty() ? default_cache_dir() : cache_dir;
  char key[17];
  std::snprintf(key, sizeof(key), "%016" PRIx64, corpus_key(files));
  std::string path = cache + "/fortunes-" + key + ".bin";
  if (cached_corpus_ok(path, total)) return path;

  make_dirs(cache);
  std::vector<uint32_t> tokens;
  tokens.reserve(static_cast<size_t>(total));
  for (const CorpusFile& f : files) {
    std::vector<uint32_t> part = tokenize_text_file(dir + "/" + f.name);
    LOOM_CHECK(part.size() == f.size, kData,
               "default corpus: '" << dir << "/" << f.name << "' changed while it was read (" << f.size
                                   << " bytes, then " << part.size() << "); try again");
    tokens.insert(tokens.end(), part.begin(), part.end());
  }
  // Every process that misses the cache writes its own temp file and renames it into place; the contents are
  // identical, so whichever rename lands last wins and readers never see a partial file.
  write_token_file(path, tokens, 2, ByteTokenizer::kVocabSize);
  LOOM_INFO("default corpus: " << tokens.size() << " byte tokens from " << files.size() << " files in " << dir
                               << ", cached at " << path);
  return path;
}

std::string cached_text_corpus_path(const std::string& text_path, const std::string& cache_dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::path abs = fs::absolute(text_path, ec);
  LOOM_CHECK(
      !ec && fs::is_regular_file(abs, ec), kData,
      "data.dataset '" << text_path << "' is not a token .bin file and no readable text file of that name exists");
  const uint64_t size = fs::file_size(abs, ec);
  const auto mtime = fs::last_write_time(abs, ec).time_since_epoch().count();
  LOOM_CHECK(!ec, kData, "cannot read the size or time of '" << text_path << "': " << ec.message());
  uint64_t key = fnv1a64(abs.string());
  key = fnv1a64(std::to_string(size) + ":" + std::to_string(mtime), key);
  char hex[17];
  std::snprintf(hex, sizeof(hex), "%016" PRIx64, key);
  const std::string cache = cache_dir.empty() ? default_cache_dir() : cache_dir;
  const std::string path = cache + "/text-" + abs.stem().string() + "-" + hex + ".bin";
  if (cached_corpus_ok(path, static_cast<int64_t>(size))) return path;
  make_dirs(cache);
  std::vector<uint32_t> tokens = tokenize_text_file(abs.string());
  LOOM_CHECK(tokens.size() >= 2, kData, "text file '" << text_path << "' holds fewer than 2 bytes");
  write_token_file(path, tokens, 2, ByteTokenizer::kVocabSize);
  LOOM_INFO("tokenized " << tokens.size() << " bytes of " << text_path << " into " << path);
  return path;
}

// ---- batches --------------------------------------------------------------------------------------------------

BatchSampler::BatchSampler(const TokenFile& file, int64_t seq_len, int64_t global_batch, uint64_t seed,
                           double val_fraction)
    : file_(&file), seq_len_(seq_len), global_batch_(global_batch), seed_(seed) {
  LOOM_CHECK(seq_len >= 1, kConfig, "BatchSampler: seq_len must be >= 1, got " << seq_len);
  LOOM_CHECK(global_batch >= 1, kConfig, "BatchSampler: global_batch must be >= 1, got " << global_batch);
  train_len_ = split_range(file, Split::kTrain, val_fraction).len;
  val_len_ = split_range(file, Split::kVal, val_fraction).len;
  LOOM_CHECK(train_len_ > seq_len && val_len_ > seq_len, kData,
             "token file '" << file.path() << "' has " << file.size() << " tokens, too small for seq_len " << seq_len
                            << ": with val_fraction " << val_fraction << " the train split has " << train_len_
                            << " tokens and the validation split " << val_len_
                            << ", and each needs at least seq_len + 1 = " << seq_len + 1
                            << " (use more data, a shorter seq_len, or another val_fraction)");
}

void BatchSampler::fill(Split split, int64_t step, int64_t first, int64_t count, int32_t* inputs,
                        int32_t* targets) const {
  LOOM_CHECK(step >= 0, kConfig, "BatchSampler::fill: step must be >= 0, got " << step);
  LOOM_CHECK(first >= 0 && count >= 0 && first <= global_batch_ - count, kConfig,
             "BatchSampler::fill: samples [" << first << ", " << first << " + " << count
                                             << ") must lie inside the global batch [0, " << global_batch_ << ")");
  if (count == 0) return;
  LOOM_CHECK(inputs && targets, kInternal, "BatchSampler::fill: inputs and targets must not be null");
  int64_t begin = split == Split::kTrain ? 0 : train_len_;
  int64_t len = tokens(split);
  // Val draws from its own stream so the val windows are independent of the train windows of the same index.
  uint64_t stream = static_cast<uint64_t>(split == Split::kVal ? RngStream::kDataVal : RngStream::kData);
  uint64_t windows = static_cast<uint64_t>(len - seq_len_);  // start offsets whose T + 1 tokens fit the split
  for (int64_t i = 0; i < count; ++i) {
    uint64_t g = static_cast<uint64_t>(step) * static_cast<uint64_t>(global_batch_) + static_cast<uint64_t>(first + i);
    int64_t start = begin + static_cast<int64_t>(random_u64(seed_, stream, g) % windows);
    file_->read(start, seq_len_, inputs + i * seq_len_);
    file_->read(start + 1, seq_len_, targets + i * seq_len_);
  }
}

void BatchSampler::check_vocab(int64_t model_vocab) const {
  LOOM_CHECK(file_->vocab_size() <= model_vocab, kData,
             "token file '" << file_->path() << "' has vocab size " << file_->vocab_size() << " (token ids up to "
                            << file_->vocab_size() - 1 << ") but the model's vocab size is " << model_vocab
                            << "; the model's vocab_size must be at least " << file_->vocab_size());
}

double unigram_entropy_nats(const TokenFile& file, Split split, double val_fraction) {
  SplitRange r = split_range(file, split, val_fraction);
  LOOM_CHECK(r.len > 0, kData,
             "token file '" << file.path() << "': the " << split_name(split) << " split is empty with val_fraction "
                            << val_fraction);
  // Dense counts for realistic vocabularies; a hash map only for raw files with huge ids.
  constexpr int64_t kDenseLimit = int64_t{1} << 24;
  std::vector<int64_t> dense(file.vocab_size() <= kDenseLimit ? static_cast<size_t>(file.vocab_size()) : 0);
  std::unordered_map<int32_t, int64_t> sparse;
  constexpr int64_t kChunk = int64_t{1} << 16;
  std::vector<int32_t> buf(static_cast<size_t>(std::min(kChunk, r.len)));
  for (int64_t pos = 0; pos < r.len; pos += kChunk) {
    int64_t n = std::min(kChunk, r.len - pos);
    file.read(r.begin + pos, n, buf.data());
    for (int64_t i = 0; i < n; ++i) {
      if (!dense.empty()) {
        ++dense[static_cast<size_t>(buf[static_cast<size_t>(i)])];
      } else {
        ++sparse[buf[static_cast<size_t>(i)]];
      }
    }
  }
  // H = -sum p ln p = ln N - (1/N) sum c ln c.
  double sum_c_ln_c = 0.0;
  auto add = [&](int64_t c) {
    if (c > 0) sum_c_ln_c += static_cast<double>(c) * std::log(static_cast<double>(c));
  };
  for (int64_t c : dense) add(c);
  for (const auto& [token, c] : sparse) add(c);
  double n = static_cast<double>(r.len);
  return std::log(n) - sum_c_ln_c / n;
}

}  // namespace loom
