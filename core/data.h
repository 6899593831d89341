// Training data: memory-mapped token files, a byte-level tokenizer, the default corpus, and the sampler that
// turns (seed, step, sample index) into a batch.
//
// Token files come in two forms (docs/data.md):
//   - headered Loom files: a 32-byte little-endian header ("LOOMTOK1", version 1, bytes per token, token count,
//     vocab size) followed by uint16 or uint32 tokens;
//   - raw files (the nanoGPT .bin convention): the whole file is tokens of a width the caller gives.
// A file that starts with the magic is headered and must be valid. llm.c shards (a 1024-byte header whose first
// int32 is 20240520 or 20240801, then the tokens) are recognised too, so their header is not read as tokens. Any
// other file is raw.
//
// Batches are a pure function of (seed, step, global sample index), so a resumed job sees exactly the batches it
// would have seen, and data-parallel rank d of D, which fills samples [d*B/D, (d+1)*B/D) of the global batch,
// sees the same data whatever D is.
//
// Assumes a little-endian host (x86-64, aarch64) and that a token file is not modified in place while it is
// mapped; write_token_file replaces files by rename, which leaves existing mappings valid.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace loom {

// ---- token files ----------------------------------------------------------------------------------------------

inline constexpr char kTokenFileMagic[8] = {'L', 'O', 'O', 'M', 'T', 'O', 'K', '1'};
inline constexpr uint32_t kTokenFileVersion = 1;
inline constexpr size_t kTokenFileHeaderBytes = 32;

// A read-only, memory-mapped token file. Movable, not copyable; the mapping lives as long as the object.
class TokenFile {
 public:
  // raw_token_bytes (2 = uint16, 4 = uint32) is used only when the file has no header. Throws a data error for a
  // missing, unreadable, empty or truncated file, a bad width or version, or fewer than 2 tokens.
  static TokenFile open(const std::string& path, int raw_token_bytes = 2);
  // A moved-from TokenFile is empty (size 0), so a stale use fails a bounds check instead of reading unmapped memory.
  TokenFile(TokenFile&& other) noexcept;
  TokenFile& operator=(TokenFile&& other) noexcept;

  int64_t size() const { return num_tokens_; }  // number of tokens
  // Loom format: the vocab size of the header. Raw and llm.c files: max token + 1 (computed once at open).
  int64_t vocab_size() const { return vocab_size_; }
  int bytes_per_token() const { return bytes_per_token_; }
  bool has_header() const { return has_header_; }
  const std::string& path() const { return path_; }

  // Copies tokens [start, start + count) widened to int32 into out[count]. Throws a data error when the range is
  // outside the file or a token is >= vocab_size() (a headered file whose header lies).
  void read(int64_t start, int64_t count, int32_t* out) const;
  // Token i (bounds-checked).
  uint32_t at(int64_t i) const;

 private:
  // munmap as a unique_ptr deleter: the mapping's length travels with the pointer.
  struct Unmap {
    size_t bytes;
    void operator()(const unsigned char* p) const;
  };
  TokenFile() : mapping_(nullptr, Unmap{0}) {}

  std::string path_;
  std::unique_ptr<const unsigned char, Unmap> mapping_;
  const unsigned char* tokens_ = nullptr;  // into mapping_: after the header, or at its start for raw files
  int64_t num_tokens_ = 0;
  int64_t vocab_size_ = 0;
  int bytes_per_token_ = 0;
  bool has_header_ = false;
};

// Writes a headered token file atomically: a uniquely named temp file in the same folder, fsync, rename. Throws an
// I/O error naming the path on failure and leaves no temp file behind; a data error when bytes_per_token is not
// 2 or 4, a token does not fit in bytes_per_token, or a token is >= vocab_size.
void write_token_file(const std::string& path, const std::vector<uint32_t>& tokens, int bytes_per_token,
                      int64_t vocab_size);

// ---- byte-level tokenizer -------------------------------------------------------------------------------------

// Token = byte value. Lossless for any byte string (UTF-8 or not); vocab 256.
class ByteTokenizer {
 public:
  static constexpr int kVocabSize = 256;
  std::vector<uint32_t> encode(std::string_view text) const;
  // Throws a data error naming the index of the first token >= 256.
  std::string decode(const std::vector<uint32_t>& tokens) const;
};

// The bytes of a text file as tokens. Throws a data error when the file is missing or unreadable.
std::vector<uint32_t> tokenize_text_file(const std::string& path);

// ---- default corpus -------------------------------------------------------------------------------------------

// Where Loom caches derived data: $LOOM_CACHE_DIR, else $XDG_CACHE_HOME/loom, else $HOME/.cache/loom.
std::string default_cache_dir();

// The default training corpus: the quotations of Debian's `fortunes` package, byte-tokenized and cached as a
// headered uint16 token file (vocab 256) under cache_dir (empty: default_cache_dir()). Returns the cache file's
// path. The fortunes folder is fortunes_dir if given, else $LOOM_FORTUNES_DIR, else /usr/share/games/fortunes.
// Safe to call from several processes at once (each writes its own temp file and renames it into place). Throws a
// data error telling the user to install the package when the folder is missing or holds no text.
std::string default_corpus_path(const std::string& cache_dir, const std::string& fortunes_dir = "");

// A text file as a training corpus: byte-tokenized once and cached as <cache_dir>/text-<name>-<key>.bin, the key
// covering the file's absolute path, size and modification time (an edited file is tokenized again). Returns the
// cache file's path; safe to call from several processes at once.
std::string cached_text_corpus_path(const std::string& text_path, const std::string& cache_dir);

// ---- batches --------------------------------------------------------------------------------------------------

enum class Split { kTrain, kVal };

// Draws training windows from a token file. Holds a pointer to the file, which must outlive the sampler.
//
// The first (1 - val_fraction) of the tokens form the train split, the rest the validation split. Sample g of
// split s (g = step * global_batch + index in batch) is the T + 1 tokens starting at
//   split_begin + random_u64(seed, stream, g) % (split_len - T),  stream = RngStream::kData (+1 for kVal),
// so a window never crosses the end of its split.
class BatchSampler {
 public:
  // seq_len T: each sample is T + 1 consecutive tokens (inputs = the first T, targets = the last T). Each split
  // needs at least T + 1 tokens; otherwise a data error says the file is too small for seq_len.
  BatchSampler(const TokenFile& file, int64_t seq_len, int64_t global_batch, uint64_t seed, double val_fraction = 0.05);

  // Fills samples [first, first + count) of the global batch of `step`. inputs and targets are [count, T] int32,
  // row-major; targets[i][t] = inputs[i][t + 1] for t < T - 1.
  void fill(Split split, int64_t step, int64_t first, int64_t count, int32_t* inputs, int32_t* targets) const;
  // Throws a data error naming the file's vocab size when it exceeds model_vocab.
  void check_vocab(int64_t model_vocab) const;
  int64_t tokens(Split split) const { return split == Split::kTrain ? train_len_ : val_len_; }
  int64_t seq_len() const { return seq_len_; }
  int64_t global_batch() const { return global_batch_; }
  uint64_t seed() const { return seed_; }

 private:
  const TokenFile* file_;
  int64_t seq_len_;
  int64_t global_batch_;
  uint64_t seed_;
  int64_t train_len_ = 0;
  int64_t val_len_ = 0;
};

// Entropy (nats per token) of the token frequencies of one split, using the same split rule as BatchSampler.
// A model whose loss is below this has learned more than how often each token occurs.
double unigram_entropy_nats(const TokenFile& file, Split split, double val_fraction = 0.05);

}  // namespace loom
