// Tests of core/data: token file formats and their errors, atomic writes, the byte tokenizer, the default corpus
// cache (with a fake fortunes folder, and once with the real one when installed), the batch sampler's rule and its
// data-parallel invariance, and the unigram entropy helper.
//
// Every test works in its own temporary folder and restores the environment variables it sets.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "core/data.h"
#include "core/env.h"
#include "core/error.h"
#include "core/rng.h"

namespace loom {
namespace {

namespace fs = std::filesystem;

// A fresh folder under $TMPDIR (or /tmp), removed with everything in it.
class TempDir {
 public:
  TempDir() {
    std::string pattern = (fs::temp_directory_path() / "loom-test-data-XXXXXX").string();
    char* made = ::mkdtemp(pattern.data());
    if (!made) throw std::runtime_error("mkdtemp failed for " + pattern);
    path_ = made;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// Sets (or, with nullopt, unsets) an environment variable for the scope of a test.
class ScopedEnv {
 public:
  ScopedEnv(std::string name, const std::optional<std::string>& value) : name_(std::move(name)), old_(env::get(name_)) {
    set(value);
  }
  ~ScopedEnv() { set(old_); }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  void set(const std::optional<std::string>& value) {
    if (value) {
      ::setenv(name_.c_str(), value->c_str(), 1);
    } else {
      ::unsetenv(name_.c_str());
    }
  }
  std::string name_;
  std::optional<std::string> old_;
};

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << "writing " << path;
}

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

template <class T>
std::string as_bytes(const std::vector<T>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}

// Overwrites bytes of a file in place (to corrupt headers).
void patch(const std::string& path, size_t offset, const std::string& bytes) {
  std::string all = read_bytes(path);
  all.replace(offset, bytes.size(), bytes);
  write_bytes(path, all);
}

template <class T>
std::string le(T v) {
  return std::string(reinterpret_cast<const char*>(&v), sizeof(T));
}

std::vector<uint32_t> random_tokens(size_t n, uint32_t vocab, uint64_t seed) {
  std::vector<uint32_t> t(n);
  for (size_t i = 0; i < n; ++i) t[i] = static_cast<uint32_t>(random_u64(seed, 7, i) % vocab);
  return t;
}

// Asserts element-wise equality; on failure prints the number of mismatches, the max |difference| and the first
// few mismatching indices.
template <class A, class B>
void expect_same(const A& expected, const B& actual, const std::string& what) {
  ASSERT_EQ(expected.size(), actual.size()) << what << ": sizes differ";
  int64_t mismatches = 0;
  int64_t max_diff = 0;
  std::ostringstream first;
  for (size_t i = 0; i < expected.size(); ++i) {
    int64_t e = static_cast<int64_t>(expected[i]), a = static_cast<int64_t>(actual[i]);
    if (e == a) continue;
    max_diff = std::max(max_diff, e > a ? e - a : a - e);
    if (mismatches++ < 5) first << " [" << i << "] expected " << e << " got " << a << ";";
  }
  EXPECT_EQ(mismatches, 0) << what << ": " << mismatches << " of " << expected.size() << " elements differ, max |diff| "
                           << max_diff << "; first:" << first.str();
}

// Runs f, expects a loom::Error of `kind` whose message contains every one of `parts`; returns the message.
std::string expect_error(const std::function<void()>& f, ErrorKind kind, std::initializer_list<std::string> parts) {
  try {
    f();
  } catch (const Error& e) {
    std::string msg = e.what();
    EXPECT_EQ(e.kind(), kind) << "got " << error_kind_name(e.kind()) << ", expected " << error_kind_name(kind) << ": "
                              << msg;
    for (const std::string& p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "'" << p << "' not in: " << msg;
    return msg;
  }
  ADD_FAILURE() << "expected a loom::Error (" << error_kind_name(kind) << "), none was thrown";
  return "";
}

std::vector<int32_t> read_all(const TokenFile& f) {
  std::vector<int32_t> out(static_cast<size_t>(f.size()));
  f.read(0, f.size(), out.data());
  return out;
}

std::vector<std::string> folder_entries(const std::string& dir) {
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

// ---- token files ----------------------------------------------------------------------------------------------

TEST(TokenFile, HeaderedRoundTripBothWidths) {
  TempDir dir;
  for (int width : {2, 4}) {
    SCOPED_TRACE("bytes_per_token " + std::to_string(width));
    uint32_t vocab = width == 2 ? 50257 : 100000;
    std::vector<uint32_t> tokens = random_tokens(10007, vocab, 11 + static_cast<uint64_t>(width));
    std::string path = dir / ("tokens" + std::to_string(width) + ".bin");
    write_token_file(path, tokens, width, vocab);

    std::string raw = read_bytes(path);
    ASSERT_EQ(raw.size(), kTokenFileHeaderBytes + tokens.size() * static_cast<size_t>(width));
    EXPECT_EQ(raw.substr(0, 8), "LOOMTOK1");
    EXPECT_EQ(raw.substr(8, 4), le<uint32_t>(1));
    EXPECT_EQ(raw.substr(12, 4), le<uint32_t>(static_cast<uint32_t>(width)));
    EXPECT_EQ(raw.substr(16, 8), le<uint64_t>(tokens.size()));
    EXPECT_EQ(raw.substr(24, 8), le<uint64_t>(vocab));

    TokenFile f = TokenFile::open(path);
    EXPECT_TRUE(f.has_header());
    EXPECT_EQ(f.size(), static_cast<int64_t>(tokens.size()));
    EXPECT_EQ(f.vocab_size(), vocab);
    EXPECT_EQ(f.bytes_per_token(), width);
    EXPECT_EQ(f.path(), path);
    expect_same(tokens, read_all(f), "read of the whole file");
    for (int64_t i : {int64_t{0}, int64_t{1}, int64_t{5000}, f.size() - 1})
      EXPECT_EQ(f.at(i), tokens[static_cast<size_t>(i)]);

    std::vector<int32_t> part(100);
    f.read(1234, 100, part.data());
    expect_same(std::vector<uint32_t>(tokens.begin() + 1234, tokens.begin() + 1334), part, "read of [1234, 1334)");
  }
}

TEST(TokenFile, RawRoundTripBothWidthsAndVocabIsMaxPlusOne) {
  TempDir dir;
  std::vector<uint32_t> tokens = random_tokens(4099, 30000, 21);
  tokens[777] = 54321;  // the largest id; vocab_size must be 54322
  {
    std::vector<uint16_t> narrow(tokens.begin(), tokens.end());
    write_bytes(dir / "raw16.bin", as_bytes(narrow));
    TokenFile f = TokenFile::open(dir / "raw16.bin");
    EXPECT_FALSE(f.has_header());
    EXPECT_EQ(f.bytes_per_token(), 2);
    EXPECT_EQ(f.size(), 4099);
    EXPECT_EQ(f.vocab_size(), 54322);
    expect_same(tokens, read_all(f), "raw uint16");
  }
  {
    std::vector<uint32_t> wide = tokens;
    wide[10] = 3000000;  // beyond uint16
    write_bytes(dir / "raw32.bin", as_bytes(wide));
    TokenFile f = TokenFile::open(dir / "raw32.bin", 4);
    EXPECT_FALSE(f.has_header());
    EXPECT_EQ(f.bytes_per_token(), 4);
    EXPECT_EQ(f.size(), 4099);
    EXPECT_EQ(f.vocab_size(), 3000001);
    expect_same(wide, read_all(f), "raw uint32");
  }
}

TEST(TokenFile, FileWithoutTheMagicIsRaw) {
  TempDir dir;
  // "LOOMTOK2" is not the magic: the file is 8 raw uint16 tokens.
  std::string bytes = "LOOMTOK2" + as_bytes(std::vector<uint16_t>{1, 2, 3, 4});
  write_bytes(dir / "x.bin", bytes);
  TokenFile f = TokenFile::open(dir / "x.bin");
  EXPECT_FALSE(f.has_header());
  EXPECT_EQ(f.size(), 8);
  EXPECT_EQ(f.at(0), static_cast<uint32_t>('L') | (static_cast<uint32_t>('O') << 8));
  EXPECT_EQ(f.at(7), 4u);
}

TEST(TokenFile, LlmcShardIsReadWithoutItsHeader) {
  TempDir dir;
  std::vector<uint32_t> tokens = random_tokens(3001, 50257, 31);
  std::vector<int32_t> header(256, 0);
  header[0] = 20240520;  // llm.c GPT-2 shard: uint16 tokens
  header[1] = 1;
  header[2] = 3001;
  std::vector<uint16_t> narrow(tokens.begin(), tokens.end());
  write_bytes(dir / "shard.bin", as_bytes(header) + as_bytes(narrow));
  TokenFile f = TokenFile::open(dir / "shard.bin");
  EXPECT_TRUE(f.has_header());
  EXPECT_EQ(f.bytes_per_token(), 2);
  EXPECT_EQ(f.size(), 3001);
  EXPECT_EQ(f.vocab_size(), *std::max_element(tokens.begin(), tokens.end()) + 1);
  expect_same(tokens, read_all(f), "llm.c shard");

  write_bytes(dir / "short.bin", as_bytes(header) + as_bytes(narrow).substr(0, 6000));
  expect_error([&] { TokenFile::open(dir / "short.bin"); }, ErrorKind::kData,
               {"truncated", "short.bin", "7026", "7024"});
}

TEST(TokenFile, ReadAndAtAreBoundsChecked) {
  TempDir dir;
  write_token_file(dir / "t.bin", random_tokens(50, 1000, 41), 2, 1000);
  TokenFile f = TokenFile::open(dir / "t.bin");
  std::vector<int32_t> out(64);
  expect_error([&] { f.read(-1, 2, out.data()); }, ErrorKind::kData, {"outside", "t.bin", "50 tokens"});
  expect_error([&] { f.read(49, 2, out.data()); }, ErrorKind::kData, {"outside"});
  expect_error([&] { f.read(0, 51, out.data()); }, ErrorKind::kData, {"outside"});
  expect_error([&] { f.read(10, -1, out.data()); }, ErrorKind::kData, {"outside"});
  expect_error([&] { f.at(50); }, ErrorKind::kData, {"token index 50"});
  expect_error([&] { f.at(-1); }, ErrorKind::kData, {"token index -1"});
  f.read(50, 0, out.data());  // an empty range at the end is fine
}

TEST(TokenFile, MoveLeavesSourceEmpty) {
  TempDir dir;
  std::vector<uint32_t> tokens = random_tokens(20, 300, 43);
  write_token_file(dir / "t.bin", tokens, 2, 300);
  TokenFile a = TokenFile::open(dir / "t.bin");
  TokenFile b = std::move(a);
  EXPECT_EQ(a.size(), 0);  // NOLINT(bugprone-use-after-move): the moved-from state is specified
  EXPECT_EQ(b.size(), 20);
  expect_same(tokens, read_all(b), "moved-to file");
  expect_error([&] { a.at(0); }, ErrorKind::kData, {"token index 0"});
}

TEST(TokenFile, OpenErrors) {
  TempDir dir;
  expect_error([&] { TokenFile::open(dir / "missing.bin"); }, ErrorKind::kData,
               {"token file '" + (dir / "missing.bin") + "' does not exist"});
  expect_error([&] { TokenFile::open(dir.path()); }, ErrorKind::kData, {"not a regular file"});
  write_bytes(dir / "plain", "x");
  expect_error([&] { TokenFile::open(dir / "plain/under.bin"); }, ErrorKind::kData,
               {"plain/under.bin", "cannot be opened", "Not a directory"});

  write_bytes(dir / "empty.bin", "");
  expect_error([&] { TokenFile::open(dir / "empty.bin"); }, ErrorKind::kData, {"empty.bin", "is empty"});

  // Headered: 100 uint16 tokens = 232 bytes.
  std::string good = dir / "good.bin";
  write_token_file(good, random_tokens(100, 500, 51), 2, 500);
  std::string content = read_bytes(good);
  ASSERT_EQ(content.size(), 232u);

  write_bytes(dir / "cut.bin", content.substr(0, 231));
  expect_error([&] { TokenFile::open(dir / "cut.bin"); }, ErrorKind::kData, {"truncated", "cut.bin", "232", "231"});
  write_bytes(dir / "long.bin", content + "xyz");
  expect_error([&] { TokenFile::open(dir / "long.bin"); }, ErrorKind::kData,
               {"has 3 extra bytes", "long.bin", "232", "235"});
  write_bytes(dir / "stub.bin", content.substr(0, 20));
  expect_error([&] { TokenFile::open(dir / "stub.bin"); }, ErrorKind::kData, {"truncated", "stub.bin", "20 bytes"});

  write_bytes(dir / "v2.bin", content);
  patch(dir / "v2.bin", 8, le<uint32_t>(2));
  expect_error([&] { TokenFile::open(dir / "v2.bin"); }, ErrorKind::kData, {"v2.bin", "version 2"});
  write_bytes(dir / "w3.bin", content);
  patch(dir / "w3.bin", 12, le<uint32_t>(3));
  expect_error([&] { TokenFile::open(dir / "w3.bin"); }, ErrorKind::kData, {"w3.bin", "3 bytes per token"});
  write_bytes(dir / "vocab0.bin", content);
  patch(dir / "vocab0.bin", 24, le<uint64_t>(0));
  expect_error([&] { TokenFile::open(dir / "vocab0.bin"); }, ErrorKind::kData, {"vocab0.bin", "vocab_size 0"});
  write_bytes(dir / "huge.bin", content);
  patch(dir / "huge.bin", 16, le<uint64_t>(~uint64_t{0}));
  expect_error([&] { TokenFile::open(dir / "huge.bin"); }, ErrorKind::kData, {"huge.bin", "corrupt"});

  write_token_file(dir / "one.bin", {7}, 2, 10);
  expect_error([&] { TokenFile::open(dir / "one.bin"); }, ErrorKind::kData,
               {"one.bin", "holds 1 tokens", "at least 2"});

  // Raw.
  write_bytes(dir / "odd.bin", std::string("\x01\x00\x02\x00\x03\x00\x04", 7));
  expect_error([&] { TokenFile::open(dir / "odd.bin"); }, ErrorKind::kData, {"odd.bin", "7 bytes", "multiple of", "2"});
  write_bytes(dir / "six.bin", std::string("\x01\x00\x00\x00\x02\x00", 6));
  expect_error([&] { TokenFile::open(dir / "six.bin", 4); }, ErrorKind::kData,
               {"six.bin", "6 bytes", "multiple of", "4"});
  expect_error([&] { TokenFile::open(dir / "six.bin", 3); }, ErrorKind::kData, {"six.bin", "raw_token_bytes is 3"});
  write_bytes(dir / "raw1.bin", std::string("\x05\x00", 2));
  expect_error([&] { TokenFile::open(dir / "raw1.bin"); }, ErrorKind::kData, {"raw1.bin", "holds 1 tokens"});
  write_bytes(dir / "big32.bin", as_bytes(std::vector<uint32_t>{1, 0x80000000u}));
  expect_error([&] { TokenFile::open(dir / "big32.bin", 4); }, ErrorKind::kData, {"big32.bin", "2147483648", "int32"});
}

TEST(TokenFile, UnreadableFile) {
  if (::geteuid() == 0)
    GTEST_SKIP() << "running as root, which can read a mode-000 file, so 'unreadable' cannot be staged";
  TempDir dir;
  write_token_file(dir / "locked.bin", random_tokens(10, 100, 53), 2, 100);
  ASSERT_EQ(::chmod((dir / "locked.bin").c_str(), 0), 0);
  expect_error([&] { TokenFile::open(dir / "locked.bin"); }, ErrorKind::kData, {"locked.bin", "cannot be opened"});
}

TEST(TokenFile, HeaderVocabIsEnforcedOnRead) {
  TempDir dir;
  std::vector<uint32_t> tokens = random_tokens(200, 1000, 57);
  tokens[150] = 999;
  write_token_file(dir / "t.bin", tokens, 2, 1000);
  patch(dir / "t.bin", 24, le<uint64_t>(999));  // the header now lies about the vocab
  TokenFile f = TokenFile::open(dir / "t.bin");
  EXPECT_EQ(f.vocab_size(), 999);
  std::vector<int32_t> out(200);
  f.read(0, 150, out.data());  // the range before the bad token is fine
  expect_error([&] { f.read(100, 100, out.data()); }, ErrorKind::kData,
               {"t.bin", "token 999 at index 150", "vocab_size 999"});
}

// ---- write_token_file -----------------------------------------------------------------------------------------

TEST(WriteTokenFile, RejectsTokensThatDoNotFit) {
  TempDir dir;
  std::string path = dir / "t.bin";
  expect_error(
      [&] {
        write_token_file(path, {1, 70000, 2}, 2, 100000);
      },
      ErrorKind::kData, {"t.bin", "token 70000 at index 1", "2 bytes"});
  expect_error(
      [&] {
        write_token_file(path, {1, 2, 300}, 4, 256);
      },
      ErrorKind::kData, {"t.bin", "token 300 at index 2", "vocab_size 256"});
  expect_error([&] { write_token_file(path, {1, 2}, 3, 256); }, ErrorKind::kData, {"t.bin", "bytes_per_token", "3"});
  expect_error([&] { write_token_file(path, {1, 2}, 2, 0); }, ErrorKind::kData, {"t.bin", "vocab_size"});
  EXPECT_TRUE(folder_entries(dir.path()).empty()) << "a rejected write must leave nothing behind";
}

TEST(WriteTokenFile, IoFailuresNameThePathAndLeaveNoTempFile) {
  TempDir dir;
  std::string in_missing = dir / "no/such/folder/t.bin";
  expect_error([&] { write_token_file(in_missing, {1, 2, 3}, 2, 10); }, ErrorKind::kIo, {in_missing});

  // The target is a non-empty folder, so the final rename fails after the temp file was written.
  fs::create_directory(dir / "target");
  write_bytes(dir / "target/keep", "x");
  expect_error([&] { write_token_file(dir / "target", random_tokens(1000, 10, 61), 2, 10); }, ErrorKind::kIo,
               {dir / "target", "renaming"});
  std::vector<std::string> names = folder_entries(dir.path());
  EXPECT_EQ(names, std::vector<std::string>{"target"}) << "a temp file was left behind";
}

TEST(WriteTokenFile, ReplacingAFileKeepsOpenMappingsValid) {
  TempDir dir;
  std::string path = dir / "t.bin";
  std::vector<uint32_t> first = random_tokens(300, 5000, 63), second = random_tokens(500, 5000, 64);
  write_token_file(path, first, 2, 5000);
  TokenFile old_file = TokenFile::open(path);
  write_token_file(path, second, 4, 5000);
  TokenFile new_file = TokenFile::open(path);
  expect_same(first, read_all(old_file), "mapping of the replaced file");
  expect_same(second, read_all(new_file), "the new file");
  EXPECT_EQ(new_file.bytes_per_token(), 4);
  EXPECT_EQ(folder_entries(dir.path()), std::vector<std::string>{"t.bin"});
}

// ---- byte tokenizer -------------------------------------------------------------------------------------------

TEST(ByteTokenizer, RoundTripsEveryByte) {
  ByteTokenizer tok;
  std::string all(256, '\0');
  for (int i = 0; i < 256; ++i) all[static_cast<size_t>(i)] = static_cast<char>(i);
  std::vector<uint32_t> ids = tok.encode(all);
  std::vector<uint32_t> expected(256);
  for (uint32_t i = 0; i < 256; ++i) expected[i] = i;
  expect_same(expected, ids, "encode of bytes 0..255");
  EXPECT_EQ(tok.decode(ids), all);

  std::string text(5000, '\0');
  for (size_t i = 0; i < text.size(); ++i) text[i] = static_cast<char>(random_u64(71, 7, i) & 0xff);
  EXPECT_EQ(tok.decode(tok.encode(text)), text);
  EXPECT_EQ(ByteTokenizer::kVocabSize, 256);
}

TEST(ByteTokenizer, DecodeRejectsNonBytes) {
  expect_error([] { ByteTokenizer().decode({65, 66, 256}); }, ErrorKind::kData, {"token 256 at index 2"});
}

TEST(ByteTokenizer, TokenizesTextFiles) {
  TempDir dir;
  std::string text = "Hello, w\xc3\xb6rld!\n\0tail";
  text += std::string(70000, 'q');  // longer than one read buffer
  write_bytes(dir / "t.txt", text);
  std::vector<uint32_t> ids = tokenize_text_file(dir / "t.txt");
  expect_same(ByteTokenizer().encode(text), ids, "tokenize_text_file");
  expect_error([&] { tokenize_text_file(dir / "nope.txt"); }, ErrorKind::kData, {"nope.txt", "does not exist"});
}

// ---- default corpus -------------------------------------------------------------------------------------------

// A fake fortunes folder: two quotation files plus everything the scan must skip.
struct FakeFortunes {
  TempDir root;
  std::string dir = root / "fortunes";
  std::string cache = root / "cache/nested";  // missing: the call must create both levels
  FakeFortunes() {
    fs::create_directory(dir);
    write_bytes(dir + "/b", "bee\n%\nbuzz\n%\n");
    write_bytes(dir + "/a", "ay\n%\n");
    write_bytes(dir + "/a.dat", std::string("\x00\x00\x00\x02\xff", 5));  // strfile index
    write_bytes(dir + "/c.u8", "skip me, I am a .u8 file\n");
    write_bytes(dir + "/empty", "");
    fs::create_symlink("b", dir + "/b.u8");
    fs::create_symlink("a", dir + "/zlink");  // a symlink without a skipped suffix: still skipped
    fs::create_directory(dir + "/off");
    write_bytes(dir + "/off/x", "offensive, in a subfolder\n");
  }
  std::string expected_text() const { return "ay\n%\nbee\n%\nbuzz\n%\n"; }
};

struct stat stat_of(const std::string& path) {
  struct stat st {};
  EXPECT_EQ(::stat(path.c_str(), &st), 0) << path;
  return st;
}

TEST(DefaultCorpus, BuildsSkipsIndexFilesAndReusesTheCache) {
  FakeFortunes fake;
  ScopedEnv fortunes_env("LOOM_FORTUNES_DIR", fake.dir);
  std::string path = default_corpus_path(fake.cache);

  std::string prefix = fake.cache + "/fortunes-";
  ASSERT_EQ(path.rfind(prefix, 0), 0u) << path;
  std::string key = path.substr(prefix.size());
  ASSERT_EQ(key.size(), 16u + 4u) << path;
  EXPECT_EQ(key.substr(16), ".bin");
  EXPECT_EQ(key.find_first_not_of("0123456789abcdef"), 16u) << path;
  EXPECT_EQ(stat_of(fake.cache).st_mode & 0777, 0700u);
  EXPECT_EQ(stat_of(fake.root / "cache").st_mode & 0777, 0700u);

  TokenFile f = TokenFile::open(path);
  EXPECT_TRUE(f.has_header());
  EXPECT_EQ(f.bytes_per_token(), 2);
  EXPECT_EQ(f.vocab_size(), 256);
  std::vector<int32_t> ids = read_all(f);
  EXPECT_EQ(ByteTokenizer().decode(std::vector<uint32_t>(ids.begin(), ids.end())), fake.expected_text());

  struct stat before = stat_of(path);
  EXPECT_EQ(default_corpus_path(fake.cache), path);
  struct stat after = stat_of(path);
  EXPECT_EQ(after.st_ino, before.st_ino) << "a cache hit must not rewrite the file";
  EXPECT_EQ(after.st_mtim.tv_sec, before.st_mtim.tv_sec);
  EXPECT_EQ(after.st_mtim.tv_nsec, before.st_mtim.tv_nsec);
  EXPECT_EQ(folder_entries(fake.cache).size(), 1u) << "temp files left in the cache folder";

  // A corrupt cache file is rebuilt in place.
  write_bytes(path, "LOOMTOK1 garbage");
  EXPECT_EQ(default_corpus_path(fake.cache), path);
  std::vector<int32_t> rebuilt = read_all(TokenFile::open(path));
  expect_same(ids, rebuilt, "rebuilt cache");

  // Changing a file's size changes the key.
  const std::string longer_a = "ay, longer now\n%\n";
  write_bytes(fake.dir + "/a", longer_a);
  std::string changed = default_corpus_path(fake.cache);
  EXPECT_NE(changed, path);
  std::vector<int32_t> changed_ids = read_all(TokenFile::open(changed));
  EXPECT_EQ(ByteTokenizer().decode(std::vector<uint32_t>(changed_ids.begin(), changed_ids.end())),
            longer_a + "bee\n%\nbuzz\n%\n");
}

TEST(DefaultCorpus, ArgumentOverridesEnvironmentAndEmptyCacheDirUsesDefault) {
  FakeFortunes fake;
  TempDir other;
  write_bytes(other / "only", "one quote\n%\n");
  ScopedEnv fortunes_env("LOOM_FORTUNES_DIR", fake.dir);
  ScopedEnv cache_env("LOOM_CACHE_DIR", fake.root / "envcache");
  std::string path = default_corpus_path("", other.path());
  EXPECT_EQ(path.rfind(fake.root / "envcache/fortunes-", 0), 0u) << path;
  EXPECT_EQ(TokenFile::open(path).size(), 12);
}

TEST(DefaultCorpus, MissingOrEmptyFolderSaysHowToInstall) {
  TempDir dir;
  expect_error([&] { default_corpus_path(dir / "cache", dir / "nope"); }, ErrorKind::kData,
               {dir / "nope", "does not exist", "apt-get install fortunes", "fortunes-min"});
  fs::create_directory(dir / "indexes");
  write_bytes(dir / "indexes/x.dat", "index");
  expect_error([&] { default_corpus_path(dir / "cache", dir / "indexes"); }, ErrorKind::kData,
               {"holds no text", "apt-get install fortunes", "fortunes-min"});
  EXPECT_FALSE(fs::exists(dir / "cache")) << "no cache folder should be made for a failed build";
}

TEST(DefaultCorpus, ConcurrentCallersAgree) {
  FakeFortunes fake;
  constexpr int kCallers = 4;
  std::vector<std::string> paths(kCallers);
  std::vector<std::string> errors(kCallers);
  std::vector<std::thread> threads;
  for (int i = 0; i < kCallers; ++i) {
    threads.emplace_back([&, i] {
      try {
        paths[static_cast<size_t>(i)] = default_corpus_path(fake.cache, fake.dir);
      } catch (const std::exception& e) {
        errors[static_cast<size_t>(i)] = e.what();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (int i = 0; i < kCallers; ++i) {
    EXPECT_EQ(errors[static_cast<size_t>(i)], "") << "caller " << i;
    EXPECT_EQ(paths[static_cast<size_t>(i)], paths[0]) << "caller " << i;
  }
  EXPECT_EQ(folder_entries(fake.cache).size(), 1u) << "temp files left in the cache folder";
  std::vector<int32_t> ids = read_all(TokenFile::open(paths[0]));
  EXPECT_EQ(ByteTokenizer().decode(std::vector<uint32_t>(ids.begin(), ids.end())), fake.expected_text());
}

TEST(DefaultCorpus, CacheDirFromEnvironment) {
  ScopedEnv loom_cache("LOOM_CACHE_DIR", "/x/loomcache");
  ScopedEnv xdg("XDG_CACHE_HOME", "/x/xdg");
  ScopedEnv home("HOME", "/x/home");
  EXPECT_EQ(default_cache_dir(), "/x/loomcache");
  {
    ScopedEnv unset_loom("LOOM_CACHE_DIR", std::nullopt);
    EXPECT_EQ(default_cache_dir(), "/x/xdg/loom");
    {
      ScopedEnv unset_xdg("XDG_CACHE_HOME", std::nullopt);
      EXPECT_EQ(default_cache_dir(), "/x/home/.cache/loom");
      ScopedEnv unset_home("HOME", std::nullopt);
      expect_error([] { default_cache_dir(); }, ErrorKind::kConfig, {"LOOM_CACHE_DIR"});
    }
    ScopedEnv relative_xdg("XDG_CACHE_HOME", "relative");
    EXPECT_EQ(default_cache_dir(), "/x/home/.cache/loom") << "a relative XDG_CACHE_HOME must be ignored";
  }
}

TEST(DefaultCorpus, RealFortunesPackage) {
  const std::string system_dir = "/usr/share/games/fortunes";
  if (!fs::is_directory(system_dir)) {
    GTEST_SKIP() << system_dir << " is not installed (apt-get install fortunes), so the real corpus cannot be checked";
  }
  ScopedEnv no_override("LOOM_FORTUNES_DIR", std::nullopt);
  // The expected text, gathered independently of the implementation.
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(system_dir)) {
    std::string name = e.path().filename().string();
    if (e.is_symlink() || !e.is_regular_file() || name.ends_with(".dat") || name.ends_with(".u8")) continue;
    names.push_back(name);
  }
  std::sort(names.begin(), names.end());
  std::string text;
  for (const std::string& n : names) text += read_bytes(system_dir + "/" + n);
  if (text.empty()) GTEST_SKIP() << system_dir << " holds no quotation files";

  TempDir cache;
  TokenFile f = TokenFile::open(default_corpus_path(cache.path()));
  EXPECT_EQ(f.vocab_size(), 256);
  expect_same(ByteTokenizer().encode(text), read_all(f), "real fortunes corpus");
  double h = unigram_entropy_nats(f, Split::kTrain);
  std::printf("real fortunes corpus: %zu files, %lld tokens, train unigram entropy %.4f nats\n", names.size(),
              static_cast<long long>(f.size()), h);
  EXPECT_GT(h, 2.0);
  EXPECT_LT(h, std::log(256.0));
}

// ---- batch sampler --------------------------------------------------------------------------------------------

// A uint32 file whose token i is i, so every window shows where it starts.
std::string write_position_file(const TempDir& dir, int64_t n) {
  std::vector<uint32_t> tokens(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) tokens[static_cast<size_t>(i)] = static_cast<uint32_t>(i);
  std::string path = dir / "positions.bin";
  write_token_file(path, tokens, 4, n);
  return path;
}

struct Batch {
  std::vector<int32_t> inputs, targets;
};

Batch fill(const BatchSampler& s, Split split, int64_t step, int64_t first, int64_t count) {
  Batch b;
  b.inputs.assign(static_cast<size_t>(count * s.seq_len()), -1);
  b.targets.assign(static_cast<size_t>(count * s.seq_len()), -1);
  s.fill(split, step, first, count, b.inputs.data(), b.targets.data());
  return b;
}

TEST(BatchSampler, FollowsTheDocumentedRuleAndShiftsTargetsByOne) {
  TempDir dir;
  TokenFile f = TokenFile::open(write_position_file(dir, 1000));
  const int64_t T = 16, B = 8;
  const uint64_t seed = 1234;
  BatchSampler s(f, T, B, seed, 0.1);
  ASSERT_EQ(s.tokens(Split::kTrain), 900);
  ASSERT_EQ(s.tokens(Split::kVal), 100);
  for (Split split : {Split::kTrain, Split::kVal}) {
    int64_t begin = split == Split::kTrain ? 0 : 900, len = s.tokens(split);
    uint64_t stream = static_cast<uint64_t>(split == Split::kVal ? RngStream::kDataVal : RngStream::kData);
    for (int64_t step : {0, 1, 37}) {
      Batch b = fill(s, split, step, 0, B);
      std::vector<int32_t> expected_in, expected_tg;
      for (int64_t i = 0; i < B; ++i) {
        uint64_t g = static_cast<uint64_t>(step * B + i);
        int64_t start = begin + static_cast<int64_t>(random_u64(seed, stream, g) % static_cast<uint64_t>(len - T));
        for (int64_t t = 0; t < T; ++t) {
          expected_in.push_back(static_cast<int32_t>(start + t));
          expected_tg.push_back(static_cast<int32_t>(start + t + 1));
        }
      }
      std::string what = std::string(split == Split::kTrain ? "train" : "val") + " step " + std::to_string(step);
      expect_same(expected_in, b.inputs, what + " inputs");
      expect_same(expected_tg, b.targets, what + " targets");
    }
  }
}

TEST(BatchSampler, WindowsStayInsideTheirSplit) {
  TempDir dir;
  TokenFile f = TokenFile::open(write_position_file(dir, 1000));
  const int64_t T = 16, B = 8, steps = 200;
  BatchSampler s(f, T, B, 99, 0.1);
  int64_t val_min = 1 << 30, val_max = -1;
  for (int64_t step = 0; step < steps; ++step) {
    Batch train = fill(s, Split::kTrain, step, 0, B);
    Batch val = fill(s, Split::kVal, step, 0, B);
    for (int64_t i = 0; i < B; ++i) {
      int32_t train_first = train.inputs[static_cast<size_t>(i * T)];
      int32_t train_last = train.targets[static_cast<size_t>(i * T + T - 1)];
      ASSERT_GE(train_first, 0);
      ASSERT_LT(train_last, 900) << "train window crosses into validation at step " << step << " sample " << i;
      int32_t val_first = val.inputs[static_cast<size_t>(i * T)];
      int32_t val_last = val.targets[static_cast<size_t>(i * T + T - 1)];
      ASSERT_GE(val_first, 900) << "validation window starts in train at step " << step << " sample " << i;
      ASSERT_LT(val_last, 1000);
      val_min = std::min<int64_t>(val_min, val_first);
      val_max = std::max<int64_t>(val_max, val_first);
    }
  }
  // 1600 draws over the 84 possible validation starts reach both ends.
  EXPECT_EQ(val_min, 900);
  EXPECT_EQ(val_max, 1000 - T - 1);
}

TEST(BatchSampler, DeterministicAndIndependentOfDataParallelSplit) {
  TempDir dir;
  write_token_file(dir / "t.bin", random_tokens(20000, 50257, 81), 2, 50257);
  TokenFile f = TokenFile::open(dir / "t.bin");
  const int64_t T = 32, B = 8;
  BatchSampler s(f, T, B, 2024);
  BatchSampler same(f, T, B, 2024);
  BatchSampler other_seed(f, T, B, 2025);
  for (Split split : {Split::kTrain, Split::kVal}) {
    Batch full = fill(s, split, 5, 0, B);
    Batch again = fill(same, split, 5, 0, B);
    expect_same(full.inputs, again.inputs, "same arguments, inputs");
    expect_same(full.targets, again.targets, "same arguments, targets");
    EXPECT_NE(fill(s, split, 6, 0, B).inputs, full.inputs) << "the next step must draw other windows";
    EXPECT_NE(fill(other_seed, split, 5, 0, B).inputs, full.inputs) << "another seed must draw other windows";
    // Data-parallel ranks d of D fill [d*B/D, (d+1)*B/D): the concatenation is the same batch for every D.
    for (int64_t ranks : {2, 4, 8}) {
      Batch joined;
      for (int64_t d = 0; d < ranks; ++d) {
        Batch part = fill(s, split, 5, d * B / ranks, B / ranks);
        joined.inputs.insert(joined.inputs.end(), part.inputs.begin(), part.inputs.end());
        joined.targets.insert(joined.targets.end(), part.targets.begin(), part.targets.end());
      }
      expect_same(full.inputs, joined.inputs, std::to_string(ranks) + " DP ranks, inputs");
      expect_same(full.targets, joined.targets, std::to_string(ranks) + " DP ranks, targets");
    }
  }
  EXPECT_NE(fill(s, Split::kTrain, 5, 0, B).inputs, fill(s, Split::kVal, 5, 0, B).inputs);
}

TEST(BatchSampler, ArgumentErrors) {
  TempDir dir;
  TokenFile f = TokenFile::open(write_position_file(dir, 1000));
  expect_error([&] { BatchSampler(f, 0, 8, 1); }, ErrorKind::kConfig, {"seq_len", "0"});
  expect_error([&] { BatchSampler(f, 16, 0, 1); }, ErrorKind::kConfig, {"global_batch", "0"});
  for (double vf : {0.0, 1.0, -0.5, std::nan("")}) {
    expect_error([&] { BatchSampler(f, 16, 8, 1, vf); }, ErrorKind::kConfig, {"val_fraction"});
  }
  // 1000 tokens, val_fraction 0.05: validation has 50 tokens, too few for seq_len 50 (needs 51).
  expect_error([&] { BatchSampler(f, 50, 8, 1); }, ErrorKind::kData,
               {"positions.bin", "too small for seq_len 50", "50", "51"});
  BatchSampler ok(f, 49, 8, 1);
  EXPECT_EQ(fill(ok, Split::kVal, 0, 0, 8).targets.back(), 999) << "the only validation window ends at the last token";

  BatchSampler s(f, 16, 8, 1);
  std::vector<int32_t> in(16 * 8), tg(16 * 8);
  expect_error([&] { s.fill(Split::kTrain, 0, 4, 5, in.data(), tg.data()); }, ErrorKind::kConfig, {"[0, 8)"});
  expect_error([&] { s.fill(Split::kTrain, 0, -1, 1, in.data(), tg.data()); }, ErrorKind::kConfig, {"global batch"});
  expect_error([&] { s.fill(Split::kTrain, -1, 0, 1, in.data(), tg.data()); }, ErrorKind::kConfig, {"step"});
}

TEST(BatchSampler, CheckVocab) {
  TempDir dir;
  TokenFile f = TokenFile::open(write_position_file(dir, 1000));
  BatchSampler s(f, 16, 8, 1);
  s.check_vocab(1000);
  s.check_vocab(4096);
  expect_error([&] { s.check_vocab(999); }, ErrorKind::kData, {"positions.bin", "vocab size 1000", "999"});
}

// ---- unigram entropy ------------------------------------------------------------------------------------------

TEST(UnigramEntropy, MatchesKnownDistributions) {
  TempDir dir;
  // Train half: ids 1, 2, 3 with probabilities 0.6, 0.3, 0.1, shuffled. Validation half: ids 4..7 uniform.
  std::vector<uint32_t> tokens;
  tokens.insert(tokens.end(), 6000, 1);
  tokens.insert(tokens.end(), 3000, 2);
  tokens.insert(tokens.end(), 1000, 3);
  for (size_t i = tokens.size() - 1; i > 0; --i) std::swap(tokens[i], tokens[random_u64(91, 7, i) % (i + 1)]);
  for (int i = 0; i < 10000; ++i) tokens.push_back(4 + static_cast<uint32_t>(i % 4));
  write_token_file(dir / "t.bin", tokens, 2, 8);
  TokenFile f = TokenFile::open(dir / "t.bin");
  double expected_train = -(0.6 * std::log(0.6) + 0.3 * std::log(0.3) + 0.1 * std::log(0.1));
  EXPECT_NEAR(unigram_entropy_nats(f, Split::kTrain, 0.5), expected_train, 1e-12);
  EXPECT_NEAR(unigram_entropy_nats(f, Split::kVal, 0.5), std::log(4.0), 1e-12);

  // Ids beyond the dense-count limit (a raw file) take the sparse path: two ids, equally often.
  std::vector<uint32_t> sparse;
  for (int i = 0; i < 1000; ++i) sparse.push_back(i % 2 ? 100000000u : 7u);
  write_bytes(dir / "sparse.bin", as_bytes(sparse));
  TokenFile g = TokenFile::open(dir / "sparse.bin", 4);
  EXPECT_EQ(g.vocab_size(), 100000001);
  EXPECT_NEAR(unigram_entropy_nats(g, Split::kTrain, 0.5), std::log(2.0), 1e-12);
}

}  // namespace
}  // namespace loom
