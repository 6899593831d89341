// Snapshot files in HDF5: writing one node's file, finding complete versions, assembling the global state and
// cutting any target layout's slice out of it. The format is described in hdf5_format.h and
// docs/snapshot_format.md; every HDF5 call goes through LOOM_H5_CHECK (hdf5_check.h).
//
// Assumes POSIX (fsync, rename) and the HDF5 1.10 C API. Every HDF5 call of Loom is in this file; one lock
// serialises them, so builds of HDF5 without thread safety are safe too (thread-safe builds hold one global lock
// anyway).
#include "checkpoint/hdf5_format.h"

#include <fcntl.h>
#include <hdf5.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <iomanip>
#include <mutex>
#include <optional>
#include <set>
#include <sstream>
#include <string_view>

#include "checkpoint/hdf5_check.h"
#include "core/error.h"
#include "core/fileio.h"
#include "core/log.h"

namespace loom::snap {
namespace {

namespace fs = std::filesystem;

// Per chunk: large enough that per-chunk overhead vanishes, small enough that the Fletcher-32 check of a read
// touches little more than the read itself.
constexpr hsize_t kChunkElems = hsize_t{1} << 20;  // 4 MiB of f32
constexpr int kNumKinds = 3;
constexpr const char* kKindNames[kNumKinds] = {"master", "adam_m", "adam_v"};

std::mutex& hdf5_mutex() {
  static std::mutex m;
  return m;
}

// Everything one HDF5 entry point needs: the library lock, no error printing, and the context for messages.
struct H5Session {
  explicit H5Session(std::string context) : context_(std::move(context)) {}
  std::lock_guard<std::mutex> lock_{hdf5_mutex()};
  h5::QuietErrors quiet_;
  h5::ErrorContext context_;
};

std::string human_bytes(double bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (bytes >= 1024 && u < 4) {
    bytes /= 1024;
    ++u;
  }
  std::ostringstream s;
  s << std::fixed << std::setprecision(u == 0 ? 0 : 1) << bytes << " " << units[u];
  return s.str();
}

std::string hex(uint64_t x) {
  std::ostringstream s;
  s << "0x" << std::hex << std::setw(16) << std::setfill('0') << x;
  return s.str();
}

// ---- a file driver whose writes can be dropped ---------------------------------------------------------------
//
// HDF5 1.10 cannot close a file whose final flush fails (a full disk): it keeps a half-closed file, which a later
// open of a file with a reused inode number would find, and which crashes the library's clean-up at exit. The
// write path therefore uses a thin wrapper of HDF5's POSIX driver (sec2) whose writes and truncations can be
// switched off: after a failure the file is closed with its writes dropped (its temp file is deleted anyway), and
// HDF5 releases everything. The wrapper keeps sec2's file structure and every other callback, so the file on disk
// is the same as sec2 writes.

bool g_drop_writes = false;  // guarded by hdf5_mutex()
const H5FD_class_t* g_sec2 = nullptr;

herr_t droppable_write(H5FD_t* file, H5FD_mem_t type, hid_t dxpl, haddr_t addr, size_t size, const void* buffer) {
  return g_drop_writes ? 0 : g_sec2->write(file, type, dxpl, addr, size, buffer);
}

herr_t droppable_truncate(H5FD_t* file, hid_t dxpl, hbool_t closing) {
  return g_drop_writes ? 0 : g_sec2->truncate(file, dxpl, closing);
}

// The driver id, registered on first use (under hdf5_mutex()).
hid_t droppable_sec2_driver() {
  static hid_t id = [] {
    // sec2's class is not exported, but a file opened with it points at it.
    h5::PropList fapl(LOOM_H5_CHECK(H5Pcreate(H5P_FILE_ACCESS)));
    LOOM_H5_CHECK(H5Pset_fapl_sec2(fapl.get()));
    H5FD_t* probe = H5FDopen("/dev/null", H5F_ACC_RDONLY, fapl.get(), HADDR_UNDEF);
    LOOM_CHECK(probe != nullptr, kIo, "H5FDopen(\"/dev/null\") with the sec2 driver failed");
    g_sec2 = probe->cls;
    LOOM_H5_CHECK(H5FDclose(probe));
    static H5FD_class_t cls = *g_sec2;
    cls.name = "loom_droppable_sec2";
    cls.terminate = nullptr;  // sec2's own terminate resets sec2's registration, not ours
    cls.write = droppable_write;
    cls.truncate = droppable_truncate;
    return LOOM_H5_CHECK(H5FDregister(&cls));
  }();
  return id;
}

// The file being written. Closed by close() on success (checked); when destroyed without it (an exception), it is
// closed with its writes dropped, which cannot fail.
class WriteFile {
 public:
  explicit WriteFile(hid_t id) : file_(id) {}
  ~WriteFile() {
    g_drop_writes = true;
    file_ = h5::File();
    g_drop_writes = false;
  }
  WriteFile(const WriteFile&) = delete;
  WriteFile& operator=(const WriteFile&) = delete;
  hid_t get() const { return file_.get(); }
  void close() { file_.close(); }

 private:
  h5::File file_;
};

// ---- attributes ---------------------------------------------------------------------------------------------

// "'<file>' object '/rank3/emb'", for messages about content. The calls are left unchecked on purpose: they only
// decorate a message, and a failure must not replace the error being reported (it leaves a name empty).
std::string where(hid_t obj) {
  auto name_of = [obj](ssize_t (*get)(hid_t, char*, size_t)) {
    const ssize_t n = get(obj, nullptr, 0);
    if (n <= 0) return std::string();
    std::string text(static_cast<size_t>(n) + 1, '\0');
    get(obj, text.data(), text.size());
    text.resize(static_cast<size_t>(n));
    return text;
  };
  std::ostringstream text;  // not string operator+: GCC 12 -O3 warns falsely (-Wrestrict) on that chain
  text << "'" << name_of(H5Fget_name) << "' object '" << name_of(H5Iget_name) << "'";
  return text.str();
}

h5::Dataspace scalar_space() {
  return h5::Dataspace(LOOM_H5_CHECK(H5Screate(H5S_SCALAR)));
}

h5::Datatype utf8_string_type() {
  h5::Datatype type(LOOM_H5_CHECK(H5Tcopy(H5T_C_S1)));
  LOOM_H5_CHECK(H5Tset_size(type.get(), H5T_VARIABLE));
  LOOM_H5_CHECK(H5Tset_cset(type.get(), H5T_CSET_UTF8));
  return type;
}

void write_attr(hid_t obj, const char* name, hid_t file_type, hid_t mem_type, const h5::Dataspace& space,
                const void* value) {
  h5::Attribute attr(LOOM_H5_CHECK(H5Acreate2(obj, name, file_type, space.get(), H5P_DEFAULT, H5P_DEFAULT)));
  LOOM_H5_CHECK(H5Awrite(attr.get(), mem_type, value));
  attr.close();
}

void write_i64(hid_t obj, const char* name, int64_t value) {
  write_attr(obj, name, H5T_STD_I64LE, H5T_NATIVE_INT64, scalar_space(), &value);
}

void write_u64(hid_t obj, const char* name, uint64_t value) {
  write_attr(obj, name, H5T_STD_U64LE, H5T_NATIVE_UINT64, scalar_space(), &value);
}

void write_shape(hid_t obj, const char* name, const Shape& shape) {
  const hsize_t n = static_cast<hsize_t>(shape.ndim());
  h5::Dataspace space(LOOM_H5_CHECK(H5Screate_simple(1, &n, nullptr)));
  int64_t dims[Shape::kMaxDims + 1] = {};  // never empty: HDF5 refuses a null buffer
  std::copy(shape.begin(), shape.end(), dims);
  write_attr(obj, name, H5T_STD_I64LE, H5T_NATIVE_INT64, space, dims);
}

void write_string(hid_t obj, const char* name, const std::string& value) {
  h5::Datatype type = utf8_string_type();
  const char* text = value.c_str();
  write_attr(obj, name, type.get(), type.get(), scalar_space(), &text);
}

// Opens attribute `name` of obj and checks its type class and element count (-1: any); returns the count.
h5::Attribute open_attr(hid_t obj, const char* name, H5T_class_t type_class, int64_t count, int64_t* count_out) {
  LOOM_CHECK(LOOM_H5_CHECK(H5Aexists(obj, name)) > 0, kSnapshot, where(obj) << " has no attribute '" << name << "'");
  h5::Attribute attr(LOOM_H5_CHECK(H5Aopen(obj, name, H5P_DEFAULT)));
  h5::Datatype type(LOOM_H5_CHECK(H5Aget_type(attr.get())));
  h5::Dataspace space(LOOM_H5_CHECK(H5Aget_space(attr.get())));
  const H5T_class_t actual_class = LOOM_H5_CHECK(H5Tget_class(type.get()));
  const int64_t points = LOOM_H5_CHECK(H5Sget_simple_extent_npoints(space.get()));
  LOOM_CHECK(
      actual_class == type_class, kSnapshot,
      where(obj) << ": attribute '" << name << "' has HDF5 type class " << actual_class << ", expected " << type_class);
  LOOM_CHECK(count < 0 || points == count, kSnapshot,
             where(obj) << ": attribute '" << name << "' has " << points << " elements, expected " << count);
  if (count_out) *count_out = points;
  return attr;
}

int64_t read_i64(hid_t obj, const char* name) {
  h5::Attribute attr = open_attr(obj, name, H5T_INTEGER, 1, nullptr);
  int64_t value = 0;
  LOOM_H5_CHECK(H5Aread(attr.get(), H5T_NATIVE_INT64, &value));
  return value;
}

uint64_t read_u64(hid_t obj, const char* name) {
  h5::Attribute attr = open_attr(obj, name, H5T_INTEGER, 1, nullptr);
  uint64_t value = 0;
  LOOM_H5_CHECK(H5Aread(attr.get(), H5T_NATIVE_UINT64, &value));
  return value;
}

// An int64 attribute that must lie in [lo, hi], as an int.
int read_int(hid_t obj, const char* name, int64_t lo, int64_t hi) {
  const int64_t value = read_i64(obj, name);
  LOOM_CHECK(value >= lo && value <= hi, kSnapshot,
             where(obj) << ": attribute '" << name << "' is " << value << ", expected " << lo << " .. " << hi);
  return static_cast<int>(value);
}

Shape read_shape(hid_t obj, const char* name) {
  int64_t n = 0;
  h5::Attribute attr = open_attr(obj, name, H5T_INTEGER, -1, &n);
  LOOM_CHECK(n <= Shape::kMaxDims, kSnapshot,
             where(obj) << ": attribute '" << name << "' has " << n << " dimensions, at most " << Shape::kMaxDims
                        << " supported");
  int64_t dims[Shape::kMaxDims + 1] = {};
  LOOM_H5_CHECK(H5Aread(attr.get(), H5T_NATIVE_INT64, dims));
  for (int64_t i = 0; i < n; ++i)
    LOOM_CHECK(dims[i] >= 0, kSnapshot, where(obj) << ": attribute '" << name << "' has a negative dimension");
  return Shape(dims, dims + n);
}

std::string read_string(hid_t obj, const char* name) {
  h5::Attribute attr = open_attr(obj, name, H5T_STRING, 1, nullptr);
  h5::Datatype file_type(LOOM_H5_CHECK(H5Aget_type(attr.get())));
  if (LOOM_H5_CHECK(H5Tis_variable_str(file_type.get())) > 0) {
    h5::Datatype mem_type = utf8_string_type();
    char* text = nullptr;
    LOOM_H5_CHECK(H5Aread(attr.get(), mem_type.get(), &text));
    std::string value = text ? text : "";
    H5free_memory(text);
    return value;
  }
  const size_t size = H5Tget_size(file_type.get());  // unsigned: fails with 0, not a negative value
  LOOM_CHECK(size > 0, kIo, where(obj) << ": H5Tget_size of string attribute '" << name << "' failed");
  std::string value(size, '\0');
  LOOM_H5_CHECK(H5Aread(attr.get(), file_type.get(), value.data()));
  value.resize(std::strlen(value.c_str()));  // fixed-length strings may be NUL-padded
  return value;
}

// ---- names and listing ------------------------------------------------------------------------------------

herr_t collect_link_name(hid_t, const char* name, const H5L_info_t*, void* out) {
  static_cast<std::vector<std::string>*>(out)->push_back(name);
  return 0;
}

std::vector<std::string> link_names(hid_t group) {
  std::vector<std::string> names;
  LOOM_H5_CHECK(H5Literate(group, H5_INDEX_NAME, H5_ITER_INC, nullptr, collect_link_name, &names));
  return names;
}

// Consumes `prefix` then a run of min_digits .. max_digits decimal digits from the front of text.
bool take_number(std::string_view& text, std::string_view prefix, size_t min_digits, size_t max_digits,
                 int64_t* value) {
  if (text.substr(0, prefix.size()) != prefix) return false;
  text.remove_prefix(prefix.size());
  size_t n = 0;
  *value = 0;
  while (n < text.size() && n < max_digits && text[n] >= '0' && text[n] <= '9')
    *value = *value * 10 + (text[n++] - '0');
  text.remove_prefix(n);
  return n >= min_digits && (text.empty() || text[0] < '0' || text[0] > '9');
}

// "rank12" -> 12; nullopt for any other name.
std::optional<int> parse_rank_group(std::string_view name) {
  int64_t rank = 0;
  if (!take_number(name, "rank", 1, 9, &rank) || !name.empty()) return std::nullopt;
  return static_cast<int>(rank);
}

struct NodeFile {
  int node;
  std::string path;
};

// Snapshot files in dir by version (temp files and other names are ignored). A missing dir has none.
std::map<int64_t, std::vector<NodeFile>> list_snapshot_files(const std::string& dir) {
  std::map<int64_t, std::vector<NodeFile>> out;
  std::error_code ec;
  if (!fs::exists(dir, ec)) return out;
  fs::directory_iterator it(dir, ec);
  for (; !ec && it != fs::directory_iterator(); it.increment(ec)) {
    const std::string name = it->path().filename().string();
    std::string_view rest = name;
    int64_t version = 0, node = 0;
    const bool parsed =
        take_number(rest, "snapshot-v", 8, 18, &version) && take_number(rest, "-node", 4, 9, &node) && rest == ".h5";
    // Only the name Loom writes counts ("node0001", not "node00001"), so a node has one file per version.
    if (parsed && fs::path(snapshot_file_path(dir, version, static_cast<int>(node))).filename() == name)
      out[version].push_back(NodeFile{static_cast<int>(node), it->path().string()});
  }
  LOOM_CHECK(!ec, kIo, "cannot list snapshot folder '" << dir << "': " << ec.message());
  for (auto& [version, files] : out)
    std::sort(files.begin(), files.end(), [](const NodeFile& a, const NodeFile& b) { return a.node < b.node; });
  return out;
}

// ---- writing ------------------------------------------------------------------------------------------------

// Chunk dimensions of at most kChunkElems elements: whole trailing dimensions, then a part of the next one.
std::vector<hsize_t> chunk_dims(const std::vector<hsize_t>& dims) {
  std::vector<hsize_t> chunk(dims.size(), 1);
  hsize_t inner = 1;
  for (size_t i = dims.size(); i-- > 0;) {
    if (inner * dims[i] <= kChunkElems) {
      chunk[i] = dims[i];
      inner *= dims[i];
    } else {
      chunk[i] = std::max<hsize_t>(1, kChunkElems / inner);
      break;
    }
  }
  return chunk;
}

void write_dataset(hid_t group, const char* name, const std::vector<hsize_t>& dims, const float* data) {
  hsize_t numel = 1;
  for (hsize_t d : dims) numel *= d;
  h5::Dataspace space(dims.empty()
                          ? LOOM_H5_CHECK(H5Screate(H5S_SCALAR))
                          : LOOM_H5_CHECK(H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr)));
  h5::PropList dcpl(LOOM_H5_CHECK(H5Pcreate(H5P_DATASET_CREATE)));
  if (!dims.empty() && numel > 0) {  // a scalar or empty dataset cannot be chunked; it has nothing to checksum
    const std::vector<hsize_t> chunk = chunk_dims(dims);
    LOOM_H5_CHECK(H5Pset_chunk(dcpl.get(), static_cast<int>(chunk.size()), chunk.data()));
    LOOM_H5_CHECK(H5Pset_fletcher32(dcpl.get()));
  }
  LOOM_H5_CHECK(H5Pset_fill_time(dcpl.get(), H5D_FILL_TIME_NEVER));  // every element is written right away
  // No chunk cache: each chunk goes to the file inside H5Dwrite, so a failed write surfaces there, with nothing
  // dirty left for the close to flush (a failed flush at close leaves state behind in HDF5).
  h5::PropList dapl(LOOM_H5_CHECK(H5Pcreate(H5P_DATASET_ACCESS)));
  LOOM_H5_CHECK(H5Pset_chunk_cache(dapl.get(), 0, 0, H5D_CHUNK_CACHE_W0_DEFAULT));
  h5::Dataset dataset(
      LOOM_H5_CHECK(H5Dcreate2(group, name, H5T_IEEE_F32LE, space.get(), H5P_DEFAULT, dcpl.get(), dapl.get())));
  if (numel > 0) LOOM_H5_CHECK(H5Dwrite(dataset.get(), H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, data));
  dataset.close();  // checked: a failed close is a failed write
}

// The part of entry e inside [begin, end) of the regions, as a range of its flattened local shard. A parameter
// without elements is stored by the slices that start at 0, so that its name and shape are in the snapshot.
std::optional<std::pair<int64_t, int64_t>> piece_in_slice(const LayoutEntry& e, int64_t begin, int64_t end) {
  if (e.numel == 0) return begin == 0 ? std::optional(std::pair<int64_t, int64_t>(0, 0)) : std::nullopt;
  const int64_t lo = std::max(e.offset, begin), hi = std::min(e.offset + e.numel, end);
  if (lo >= hi) return std::nullopt;
  return std::pair(lo - e.offset, hi - e.offset);
}

void check_write_arguments(const SnapshotMeta& meta, const std::vector<LayoutEntry>& layout,
                           const std::vector<SliceData>& slices) {
  LOOM_CHECK(meta.version >= 0, kSnapshot, "snapshot version must be >= 0, got " << meta.version);
  LOOM_CHECK(meta.num_nodes >= 1 && meta.node >= 0 && meta.node < meta.num_nodes, kSnapshot,
             "snapshot node must be in 0 .. num_nodes-1, got node " << meta.node << " of " << meta.num_nodes);
  LOOM_CHECK(meta.tp_size >= 1 && meta.dp_size >= 1, kSnapshot,
             "snapshot tp_size and dp_size must be >= 1, got " << meta.tp_size << " and " << meta.dp_size);
  LOOM_CHECK(meta.padded_numel >= 1, kSnapshot, "snapshot padded_numel must be >= 1, got " << meta.padded_numel);
  std::set<std::string> names;
  for (const LayoutEntry& e : layout) {
    LOOM_CHECK(!e.name.empty() && e.name != "." && e.name.find('/') == std::string::npos, kSnapshot,
               "parameter name '" << e.name << "' cannot name an HDF5 group (empty, '.' or contains '/')");
    LOOM_CHECK(names.insert(e.name).second, kSnapshot, "parameter '" << e.name << "' appears twice in the layout");
    LOOM_CHECK(e.numel == e.local_shape.numel() && e.offset >= 0 && e.offset + e.numel <= meta.padded_numel, kSnapshot,
               "layout entry '" << e.name << "' (offset " << e.offset << ", " << e.numel << " elements, local shape "
                                << e.local_shape.str() << ") does not fit regions of " << meta.padded_numel);
    if (e.split.replicated()) {
      LOOM_CHECK(e.local_shape == e.global_shape, kSnapshot,
                 "replicated parameter '" << e.name << "' has local shape " << e.local_shape.str()
                                          << " != global shape " << e.global_shape.str());
    } else {
      const int axis = e.split.axis;
      LOOM_CHECK(e.split.size == meta.tp_size && axis < e.global_shape.ndim() &&
                     e.local_shape.ndim() == e.global_shape.ndim() &&
                     e.local_shape[axis] * e.split.size == e.global_shape[axis],
                 kSnapshot,
                 "parameter '" << e.name << "' split on axis " << axis << " over " << e.split.size
                               << " ranks does not match tp_size " << meta.tp_size << ", global shape "
                               << e.global_shape.str() << " and local shape " << e.local_shape.str());
    }
  }
  std::set<int> ranks;
  for (const SliceData& s : slices) {
    LOOM_CHECK(ranks.insert(s.rank).second && s.rank >= 0, kSnapshot,
               "rank " << s.rank << " is negative or given twice to write_node_file");
    LOOM_CHECK(s.tp_rank >= 0 && s.tp_rank < meta.tp_size && s.dp_rank >= 0 && s.dp_rank < meta.dp_size, kSnapshot,
               "rank " << s.rank << " has tp_rank " << s.tp_rank << " and dp_rank " << s.dp_rank << ", expected below "
                       << meta.tp_size << " and " << meta.dp_size);
    LOOM_CHECK(s.slice_begin >= 0 && s.slice_begin <= s.slice_end && s.slice_end <= meta.padded_numel, kSnapshot,
               "rank " << s.rank << " slice [" << s.slice_begin << ", " << s.slice_end << ") is not inside [0, "
                       << meta.padded_numel << ")");
    LOOM_CHECK(s.slice_begin == s.slice_end || (s.master && s.adam_m && s.adam_v), kSnapshot,
               "rank " << s.rank << " slice has a null data pointer");
  }
}

void write_root(hid_t file, const SnapshotMeta& meta) {
  write_string(file, "format", kFormatName);
  write_i64(file, "format_version", kFormatVersion);
  write_i64(file, "version", meta.version);
  write_i64(file, "node", meta.node);
  write_i64(file, "num_nodes", meta.num_nodes);
  write_i64(file, "tp_size", meta.tp_size);
  write_i64(file, "dp_size", meta.dp_size);
  write_i64(file, "padded_numel", meta.padded_numel);
  write_u64(file, "layout_hash", meta.layout_hash);
  write_u64(file, "config_hash", meta.config_hash);
  write_u64(file, "seed", meta.seed);
  if (!meta.config_toml.empty()) write_string(file, "config_toml", meta.config_toml);
}

void write_rank(hid_t file, const SnapshotMeta& meta, const std::vector<LayoutEntry>& layout, const SliceData& s) {
  const std::string group_name = "rank" + std::to_string(s.rank);
  h5::Group group(LOOM_H5_CHECK(H5Gcreate2(file, group_name.c_str(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT)));
  write_i64(group.get(), "tp_rank", s.tp_rank);
  write_i64(group.get(), "dp_rank", s.dp_rank);
  write_i64(group.get(), "slice_begin", s.slice_begin);
  write_i64(group.get(), "slice_end", s.slice_end);
  write_i64(group.get(), "padded_numel", meta.padded_numel);
  const float* regions[kNumKinds] = {s.master, s.adam_m, s.adam_v};
  for (const LayoutEntry& e : layout) {
    const auto piece = piece_in_slice(e, s.slice_begin, s.slice_end);
    if (!piece) continue;
    const auto [begin, end] = *piece;
    h5::Group param(LOOM_H5_CHECK(H5Gcreate2(group.get(), e.name.c_str(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT)));
    write_shape(param.get(), "global_shape", e.global_shape);
    write_shape(param.get(), "local_shape", e.local_shape);
    write_i64(param.get(), "split_axis", e.split.replicated() ? -1 : e.split.axis);
    write_i64(param.get(), "tp_rank", s.tp_rank);
    write_i64(param.get(), "tp_size", e.split.replicated() ? meta.tp_size : e.split.size);
    write_i64(param.get(), "piece_begin", begin);
    write_i64(param.get(), "piece_end", end);
    write_i64(param.get(), "weight_decay", e.weight_decay ? 1 : 0);
    std::vector<hsize_t> dims;
    if (end - begin == e.numel)
      dims.assign(e.local_shape.begin(), e.local_shape.end());
    else
      dims.push_back(static_cast<hsize_t>(end - begin));
    const int64_t at = e.offset + begin - s.slice_begin;  // where the piece starts in the staged slice
    for (int k = 0; k < kNumKinds; ++k) write_dataset(param.get(), kKindNames[k], dims, regions[k] + at);
  }
}

// Refuses at once when the folder's file system has less free space than the data alone needs, rather than after
// writing (and deleting) most of a file that cannot fit. A write that fails later is reported as well. Without
// statvfs (say, the folder does not exist) the check is left to the write, which reports the path.
void check_free_space(const std::string& dir, const std::string& path, const std::vector<LayoutEntry>& layout,
                      const std::vector<SliceData>& slices) {
  int64_t elements = 0;
  for (const SliceData& s : slices)
    for (const LayoutEntry& e : layout)
      if (const auto piece = piece_in_slice(e, s.slice_begin, s.slice_end)) elements += piece->second - piece->first;
  const double need = static_cast<double>(elements) * kNumKinds * sizeof(float);
  struct statvfs fs_info {};
  if (::statvfs(dir.c_str(), &fs_info) != 0) return;
  const double free_bytes = static_cast<double>(fs_info.f_bavail) * static_cast<double>(fs_info.f_frsize);
  LOOM_CHECK(free_bytes >= need, kIo,
             "writing snapshot file '" << path << "': " << std::strerror(ENOSPC) << ": its data needs "
                                       << human_bytes(need) << ", the file system has " << human_bytes(free_bytes)
                                       << " free");
}

void fsync_path(const std::string& path, const std::string& what) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  LOOM_CHECK(fd.get() >= 0, kIo, what << ": opening '" << path << "' for fsync failed: " << detail::errno_string());
  LOOM_CHECK(::fsync(fd.get()) == 0, kIo, what << ": fsync of '" << path << "' failed: " << detail::errno_string());
}

// ---- reading --------------------------------------------------------------------------------------------------

h5::File open_read_only(const std::string& path) {
  return h5::File(LOOM_H5_CHECK(H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT)));
}

SnapshotMeta read_root(hid_t file) {
  const std::string format = read_string(file, "format");
  LOOM_CHECK(format == kFormatName, kSnapshot,
             where(file) << " is not a Loom snapshot: format is '" << format << "', expected '" << kFormatName << "'");
  const int64_t format_version = read_i64(file, "format_version");
  LOOM_CHECK(format_version == kFormatVersion, kSnapshot,
             where(file) << " has snapshot format_version " << format_version << "; this Loom reads version "
                         << kFormatVersion);
  SnapshotMeta meta;
  constexpr int64_t kMaxInt = 1 << 30;
  meta.version = read_i64(file, "version");
  meta.num_nodes = read_int(file, "num_nodes", 1, kMaxInt);
  meta.node = read_int(file, "node", 0, meta.num_nodes - 1);
  meta.tp_size = read_int(file, "tp_size", 1, kMaxInt);
  meta.dp_size = read_int(file, "dp_size", 1, kMaxInt);
  meta.padded_numel = read_i64(file, "padded_numel");
  LOOM_CHECK(meta.padded_numel >= 1, kSnapshot, where(file) << " has padded_numel " << meta.padded_numel);
  meta.layout_hash = read_u64(file, "layout_hash");
  meta.config_hash = read_u64(file, "config_hash");
  meta.seed = read_u64(file, "seed");
  if (LOOM_H5_CHECK(H5Aexists(file, "config_toml")) > 0) meta.config_toml = read_string(file, "config_toml");
  return meta;
}

// The files of one version and whether they form a complete snapshot.
struct VersionCheck {
  bool complete = false;
  bool unreadable = false;         // some file could not be opened or read (rather than merely missing)
  std::string reason;              // why not complete
  SnapshotMeta meta;               // node 0's
  std::vector<std::string> paths;  // by node
};

VersionCheck check_version(const std::string& dir, int64_t version, const std::vector<NodeFile>& files) {
  VersionCheck check;
  std::ostringstream why;
  why << "snapshot version " << version << " in '" << dir << "': ";
  std::map<int, SnapshotMeta> metas;
  for (const NodeFile& f : files) {
    try {
      h5::ErrorContext context("opening snapshot file '" + f.path + "'");
      h5::File file = open_read_only(f.path);
      SnapshotMeta meta = read_root(file.get());
      file.close();
      LOOM_CHECK(meta.version == version && meta.node == f.node, kSnapshot,
                 "file '" << f.path << "' holds version " << meta.version << " of node " << meta.node
                          << ", not what its name says");
      metas[f.node] = std::move(meta);
    } catch (const Error& e) {
      check.unreadable = true;
      check.reason = why.str() + e.what();
      return check;
    }
  }
  if (metas.empty()) {
    check.reason = why.str() + "no files";
    return check;
  }
  const SnapshotMeta& first = metas.begin()->second;
  for (const auto& [node, m] : metas) {
    if (m.num_nodes != first.num_nodes || m.tp_size != first.tp_size || m.dp_size != first.dp_size ||
        m.padded_numel != first.padded_numel || m.layout_hash != first.layout_hash ||
        m.config_hash != first.config_hash || m.seed != first.seed) {
      check.reason = why.str() + "the files of nodes " + std::to_string(metas.begin()->first) + " and " +
                     std::to_string(node) +
                     " disagree on num_nodes, tp_size, dp_size, padded_numel, layout_hash, config_hash or seed";
      return check;
    }
  }
  std::vector<int> missing;
  for (int n = 0; n < first.num_nodes; ++n)
    if (!metas.count(n)) missing.push_back(n);
  if (metas.rbegin()->first >= first.num_nodes) {
    check.reason = why.str() + "a file of node " + std::to_string(metas.rbegin()->first) + " exists but num_nodes is " +
                   std::to_string(first.num_nodes);
    return check;
  }
  if (!missing.empty()) {
    std::ostringstream list;
    for (size_t i = 0; i < missing.size() && i < 8; ++i) list << (i ? ", " : "") << missing[i];
    if (missing.size() > 8) list << ", ...";
    check.reason = why.str() + std::to_string(missing.size()) + " of " + std::to_string(first.num_nodes) +
                   " node files missing (nodes " + list.str() + ")";
    return check;
  }
  check.complete = true;
  check.meta = metas.at(0);
  for (const NodeFile& f : files) check.paths.push_back(f.path);
  return check;
}

// One stored piece of a parameter.
struct Piece {
  size_t file = 0;    // index into the version's files
  std::string group;  // "/rank3/emb"
  int tp_rank = 0;
  int64_t begin = 0, end = 0;  // range of the flattened local shard
};

// A parameter as described by its first piece; every other piece must agree.
struct ParamInfo {
  Shape global_shape, local_shape;
  int split_axis = -1, tp_size = 1;
  bool weight_decay = false;
  std::vector<Piece> pieces;
};

struct RankInfo {
  int rank = 0, tp_rank = 0, dp_rank = 0;
  int64_t slice_begin = 0, slice_end = 0;
  int params = 0, whole = 0;  // parameters with a piece here, and how many of those pieces are whole shards
};

// Reads every rank and parameter group of a file (attributes only) into params and ranks.
void index_file(hid_t file, size_t file_index, const SnapshotMeta& meta, std::map<std::string, ParamInfo>& params,
                std::vector<RankInfo>& ranks) {
  for (const std::string& rank_name : link_names(file)) {
    const std::optional<int> rank = parse_rank_group(rank_name);
    if (!rank) continue;  // room for other groups in later versions of the format
    h5::Group group(LOOM_H5_CHECK(H5Gopen2(file, rank_name.c_str(), H5P_DEFAULT)));
    RankInfo r;
    r.rank = *rank;
    r.tp_rank = read_int(group.get(), "tp_rank", 0, meta.tp_size - 1);
    r.dp_rank = read_int(group.get(), "dp_rank", 0, meta.dp_size - 1);
    r.slice_begin = read_i64(group.get(), "slice_begin");
    r.slice_end = read_i64(group.get(), "slice_end");
    LOOM_CHECK(0 <= r.slice_begin && r.slice_begin <= r.slice_end && r.slice_end <= meta.padded_numel, kSnapshot,
               where(group.get()) << ": slice [" << r.slice_begin << ", " << r.slice_end << ") is not inside [0, "
                                  << meta.padded_numel << ")");
    for (const std::string& name : link_names(group.get())) {
      h5::Group pg(LOOM_H5_CHECK(H5Gopen2(group.get(), name.c_str(), H5P_DEFAULT)));
      ParamInfo seen;
      seen.global_shape = read_shape(pg.get(), "global_shape");
      seen.local_shape = read_shape(pg.get(), "local_shape");
      seen.split_axis = read_int(pg.get(), "split_axis", -1, Shape::kMaxDims - 1);
      seen.tp_size = read_int(pg.get(), "tp_size", 1, meta.tp_size);
      seen.weight_decay = read_i64(pg.get(), "weight_decay") != 0;
      Piece piece;
      piece.file = file_index;
      piece.group = "/" + rank_name + "/" + name;
      piece.tp_rank = read_int(pg.get(), "tp_rank", 0, seen.tp_size - 1);
      piece.begin = read_i64(pg.get(), "piece_begin");
      piece.end = read_i64(pg.get(), "piece_end");
      const int64_t local_numel = seen.local_shape.numel();
      LOOM_CHECK(0 <= piece.begin && piece.begin <= piece.end && piece.end <= local_numel, kSnapshot,
                 where(pg.get()) << ": piece [" << piece.begin << ", " << piece.end
                                 << ") is not inside its local shard of " << local_numel << " elements");
      // The local shape must be what the split makes of the global shape, or resharding would read past it.
      Shape expected_local = seen.global_shape;
      if (seen.split_axis >= 0) {
        LOOM_CHECK(seen.split_axis < seen.global_shape.ndim() && seen.global_shape[seen.split_axis] % seen.tp_size == 0,
                   kSnapshot,
                   where(pg.get()) << ": split axis " << seen.split_axis << " over " << seen.tp_size
                                   << " ranks does not divide global shape " << seen.global_shape.str());
        expected_local[seen.split_axis] = seen.global_shape[seen.split_axis] / seen.tp_size;
      }
      LOOM_CHECK(seen.local_shape == expected_local, kSnapshot,
                 where(pg.get()) << ": local shape " << seen.local_shape.str() << " does not follow from global shape "
                                 << seen.global_shape.str() << " split on axis " << seen.split_axis << " over "
                                 << seen.tp_size << " ranks");
      auto [it, inserted] = params.emplace(name, seen);
      ParamInfo& info = it->second;
      if (!inserted) {
        LOOM_CHECK(info.global_shape == seen.global_shape && info.local_shape == seen.local_shape &&
                       info.split_axis == seen.split_axis && info.tp_size == seen.tp_size &&
                       info.weight_decay == seen.weight_decay,
                   kSnapshot,
                   where(pg.get()) << " describes parameter '" << name << "' (global " << seen.global_shape.str()
                                   << ", local " << seen.local_shape.str() << ", split axis " << seen.split_axis
                                   << " over " << seen.tp_size << ") differently from group '"
                                   << info.pieces.front().group << "' (global " << info.global_shape.str() << ", local "
                                   << info.local_shape.str() << ", split axis " << info.split_axis << " over "
                                   << info.tp_size << ")");
      }
      info.pieces.push_back(piece);
      ++r.params;
      if (piece.end - piece.begin == local_numel) ++r.whole;
    }
    ranks.push_back(r);
  }
}

// Throws unless the pieces of one TP shard (or replicated copy) tile [0, numel) exactly once.
void check_coverage(const std::string& what, const std::string& name, int tp_rank, int tp_size, int64_t numel,
                    std::vector<const Piece*> pieces) {
  // Stable: pieces keep file and rank order, so a message names the earlier holder first.
  std::stable_sort(pieces.begin(), pieces.end(), [](const Piece* a, const Piece* b) { return a->begin < b->begin; });
  const auto prefix = [&] {
    std::ostringstream s;
    s << what << ": parameter '" << name << "' (TP rank " << tp_rank << " of " << tp_size << ", local shard of "
      << numel << " elements): ";
    return s.str();
  };
  int64_t covered = 0;
  const Piece* last = nullptr;
  for (const Piece* p : pieces) {
    if (p->begin == p->end) continue;
    LOOM_CHECK(p->begin <= covered, kSnapshot,
               prefix() << "elements [" << covered << ", " << p->begin << ") are missing (no rank's slice holds them)");
    LOOM_CHECK(p->begin >= covered, kSnapshot,
               prefix() << "elements [" << p->begin << ", " << std::min(covered, p->end) << ") are stored twice (in '"
                        << last->group << "' and '" << p->group << "')");
    covered = p->end;
    last = p;
  }
  LOOM_CHECK(covered == numel, kSnapshot,
             prefix() << "elements [" << covered << ", " << numel << ") are missing (no rank's slice holds them)");
}

void read_piece(hid_t file, const Piece& piece, const char* kind, float* out) {
  const std::string path = piece.group + "/" + kind;
  LOOM_CHECK(LOOM_H5_CHECK(H5Lexists(file, path.c_str(), H5P_DEFAULT)) > 0, kSnapshot,
             where(file) << ": dataset '" << path << "' is missing");
  h5::Dataset dataset(LOOM_H5_CHECK(H5Dopen2(file, path.c_str(), H5P_DEFAULT)));
  h5::Datatype type(LOOM_H5_CHECK(H5Dget_type(dataset.get())));
  h5::Dataspace space(LOOM_H5_CHECK(H5Dget_space(dataset.get())));
  LOOM_CHECK(LOOM_H5_CHECK(H5Tget_class(type.get())) == H5T_FLOAT, kSnapshot,
             where(dataset.get()) << " is not a floating-point dataset");
  const int64_t points = LOOM_H5_CHECK(H5Sget_simple_extent_npoints(space.get()));
  LOOM_CHECK(points == piece.end - piece.begin, kSnapshot,
             where(dataset.get()) << " has " << points << " elements; its piece [" << piece.begin << ", " << piece.end
                                  << ") needs " << piece.end - piece.begin);
  if (points > 0) LOOM_H5_CHECK(H5Dread(dataset.get(), H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, out));
}

}  // namespace

std::string snapshot_file_path(const std::string& dir, int64_t version, int node) {
  std::ostringstream name;
  name << "snapshot-v" << std::setw(8) << std::setfill('0') << version << "-node" << std::setw(4) << node << ".h5";
  return (fs::path(dir) / name.str()).string();
}

std::string write_node_file(const std::string& dir, const SnapshotMeta& meta, const std::vector<LayoutEntry>& layout,
                            const std::vector<SliceData>& slices) {
  check_write_arguments(meta, layout, slices);
  const std::string path = snapshot_file_path(dir, meta.version, meta.node);
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  const std::string what = "writing snapshot file '" + path + "' (temp file '" + tmp + "')";
  check_free_space(dir, path, layout, slices);
  H5Session session(what);
  TempFileGuard guard(tmp);
  {
    h5::PropList fapl(LOOM_H5_CHECK(H5Pcreate(H5P_FILE_ACCESS)));
    LOOM_H5_CHECK(H5Pset_driver(fapl.get(), droppable_sec2_driver(), nullptr));
    // The 1.10 object format checksums all metadata (superblock, object headers, chunk indexes).
    LOOM_H5_CHECK(H5Pset_libver_bounds(fapl.get(), H5F_LIBVER_V110, H5F_LIBVER_V110));
    // Closing the file also closes any object still open in it, so the file is always released.
    LOOM_H5_CHECK(H5Pset_fclose_degree(fapl.get(), H5F_CLOSE_STRONG));
    WriteFile file(LOOM_H5_CHECK(H5Fcreate(tmp.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fapl.get())));
    write_root(file.get(), meta);
    for (const SliceData& s : slices) write_rank(file.get(), meta, layout, s);
    LOOM_H5_CHECK(H5Fflush(file.get(), H5F_SCOPE_GLOBAL));
    file.close();
  }
  fsync_path(tmp, what);
  LOOM_CHECK(::rename(tmp.c_str(), path.c_str()) == 0, kIo, what << ": rename failed: " << detail::errno_string());
  guard.release();
  // Make the rename itself durable. Best effort: some file systems cannot fsync a folder, and the data is safe.
  UniqueFd dir_fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (dir_fd.get() >= 0) ::fsync(dir_fd.get());
  return path;
}

std::vector<int64_t> complete_versions(const std::string& dir) {
  H5Session session("scanning snapshot folder '" + dir + "'");
  std::vector<int64_t> out;
  const auto files = list_snapshot_files(dir);
  for (auto it = files.rbegin(); it != files.rend(); ++it) {
    const VersionCheck check = check_version(dir, it->first, it->second);
    if (check.complete) {
      out.push_back(it->first);
    } else if (check.unreadable) {
      LOOM_WARN("skipping incomplete snapshot: " << check.reason);
    } else {
      LOOM_DEBUG("skipping incomplete snapshot: " << check.reason);
    }
  }
  return out;
}

GlobalState load_global(const std::string& dir, int64_t version) {
  std::ostringstream what_stream;
  what_stream << "loading snapshot version " << version << " from '" << dir << "'";
  const std::string what = what_stream.str();
  H5Session session(what);
  const auto all = list_snapshot_files(dir);
  const auto found = all.find(version);
  LOOM_CHECK(found != all.end(), kSnapshot, what << ": no files of this version");
  const VersionCheck check = check_version(dir, version, found->second);
  LOOM_CHECK(check.complete, kSnapshot, check.reason);  // the reason names the version and folder

  GlobalState state;
  state.meta = check.meta;
  state.meta.node = -1;
  std::vector<h5::File> files;
  std::map<std::string, ParamInfo> params;
  std::vector<RankInfo> ranks;
  for (size_t i = 0; i < check.paths.size(); ++i) {
    h5::ErrorContext context("reading snapshot file '" + check.paths[i] + "'");
    files.push_back(open_read_only(check.paths[i]));
    index_file(files.back().get(), i, state.meta, params, ranks);
  }

  for (auto& [name, info] : params) {
    const int64_t local_numel = info.local_shape.numel(), global_numel = info.global_shape.numel();
    const bool replicated = info.split_axis < 0;
    // A replicated parameter is held in full by every TP rank of the run, a sharded one in tp_size shards.
    const int copies = replicated ? state.meta.tp_size : info.tp_size;
    std::vector<std::vector<const Piece*>> by_rank(static_cast<size_t>(copies));
    for (const Piece& p : info.pieces) {
      LOOM_CHECK(p.tp_rank < copies, kSnapshot,
                 what << ": '" << p.group << "' has tp_rank " << p.tp_rank << ", expected below " << copies);
      by_rank[static_cast<size_t>(p.tp_rank)].push_back(&p);
    }
    for (int r = 0; r < copies; ++r)
      check_coverage(what, name, r, copies, local_numel, by_rank[static_cast<size_t>(r)]);

    state.global_shape[name] = info.global_shape;
    std::vector<float>* globals[kNumKinds] = {&state.master[name], &state.adam_m[name], &state.adam_v[name]};
    std::vector<float> local(static_cast<size_t>(local_numel));
    for (int k = 0; k < kNumKinds; ++k) {
      std::vector<float>& global = *globals[k];
      global.assign(static_cast<size_t>(global_numel), 0.0f);
      for (int r = 0; r < copies; ++r) {
        for (const Piece* p : by_rank[static_cast<size_t>(r)]) {
          h5::ErrorContext context("reading snapshot file '" + check.paths[p->file] + "'");
          read_piece(files[p->file].get(), *p, kKindNames[k], local.data() + p->begin);
        }
        if (!replicated) {
          insert_shard(local.data(), info.global_shape, TpSplit{info.split_axis, r, info.tp_size}, global.data());
        } else if (r == 0) {
          global = local;
        } else {
          // TP ranks keep replicated parameters identical; a difference means they drifted, which resharding
          // cannot represent. Keep TP rank 0's copy and say so.
          double max_diff = 0;
          for (int64_t i = 0; i < local_numel; ++i)
            max_diff = std::max(max_diff, std::fabs(static_cast<double>(local[i]) - global[i]));
          if (max_diff > 0)
            LOOM_WARN(what << ": replicated parameter '" << name << "' " << kKindNames[k]
                           << " differs between TP rank 0 and " << r << " (max |diff| " << max_diff
                           << "); using TP rank 0's copy");
        }
      }
    }
  }
  for (h5::File& f : files) f.close();
  return state;
}

void fill_slice(const GlobalState& state, const std::vector<LayoutEntry>& target_layout, int64_t slice_begin,
                int64_t slice_end, float* master, float* adam_m, float* adam_v) {
  LOOM_CHECK(0 <= slice_begin && slice_begin <= slice_end, kSnapshot,
             "fill_slice: slice [" << slice_begin << ", " << slice_end << ") is not a range");
  const size_t n = static_cast<size_t>(slice_end - slice_begin);
  float* out[kNumKinds] = {master, adam_m, adam_v};
  const std::map<std::string, std::vector<float>>* sources[kNumKinds] = {&state.master, &state.adam_m, &state.adam_v};
  for (float* o : out) {
    LOOM_CHECK(n == 0 || o != nullptr, kSnapshot, "fill_slice: a destination pointer is null");
    if (n > 0) std::fill(o, o + n, 0.0f);  // gaps between parameters and padding stay zero, as in an arena
  }
  std::vector<float> shard;
  for (const LayoutEntry& e : target_layout) {
    const int64_t lo = std::max(e.offset, slice_begin), hi = std::min(e.offset + e.numel, slice_end);
    if (lo >= hi) continue;
    const auto shape = state.global_shape.find(e.name);
    LOOM_CHECK(shape != state.global_shape.end(), kSnapshot,
               "parameter '" << e.name << "' of the model is not in snapshot version " << state.meta.version);
    LOOM_CHECK(shape->second == e.global_shape, kSnapshot,
               "parameter '" << e.name << "' has global shape " << shape->second.str() << " in snapshot version "
                             << state.meta.version << " but " << e.global_shape.str() << " in the model");
    LOOM_CHECK(
        e.numel == e.local_shape.numel(), kSnapshot,
        "layout entry '" << e.name << "' has " << e.numel << " elements but local shape " << e.local_shape.str());
    const bool whole = lo == e.offset && hi == e.offset + e.numel;
    for (int k = 0; k < kNumKinds; ++k) {
      const auto src = sources[k]->find(e.name);
      LOOM_CHECK(src != sources[k]->end() && static_cast<int64_t>(src->second.size()) == e.global_shape.numel(),
                 kSnapshot,
                 "parameter '" << e.name << "': the snapshot's " << kKindNames[k] << " is missing or not "
                               << e.global_shape.numel() << " elements");
      float* dst = out[k] + (lo - slice_begin);
      if (whole) {
        extract_shard(src->second.data(), e.global_shape, e.split, dst);
      } else {
        shard.resize(static_cast<size_t>(e.numel));
        extract_shard(src->second.data(), e.global_shape, e.split, shard.data());
        std::copy(shard.begin() + (lo - e.offset), shard.begin() + (hi - e.offset), dst);
      }
    }
  }
}

std::string describe_file(const std::string& path) {
  H5Session session("describing snapshot file '" + path + "'");
  h5::File file = open_read_only(path);
  const SnapshotMeta meta = read_root(file.get());
  std::map<std::string, ParamInfo> params;
  std::vector<RankInfo> ranks;
  index_file(file.get(), 0, meta, params, ranks);
  std::sort(ranks.begin(), ranks.end(), [](const RankInfo& a, const RankInfo& b) { return a.rank < b.rank; });

  std::error_code ec;
  const auto file_bytes = fs::file_size(path, ec);
  std::ostringstream s;
  s << "snapshot file " << path;
  if (!ec) s << " (" << human_bytes(static_cast<double>(file_bytes)) << ")";
  s << "\n  format " << kFormatName << " v" << kFormatVersion << ", version " << meta.version << ", node " << meta.node
    << " of " << meta.num_nodes << "\n  tp_size " << meta.tp_size << ", dp_size " << meta.dp_size << ", padded_numel "
    << meta.padded_numel << " per region\n  layout_hash " << hex(meta.layout_hash) << ", config_hash "
    << hex(meta.config_hash) << ", seed " << meta.seed << "\n  config_toml: "
    << (meta.config_toml.empty() ? std::string("none") : std::to_string(meta.config_toml.size()) + " bytes") << "\n";
  int64_t total = 0;
  for (const RankInfo& r : ranks) {
    const int64_t elems = r.slice_end - r.slice_begin;
    total += elems;
    s << "  rank " << r.rank << ": tp " << r.tp_rank << ", dp " << r.dp_rank << ", slice [" << r.slice_begin << ", "
      << r.slice_end << ") = " << elems
      << " elements x 3 (master, adam_m, adam_v) = " << human_bytes(static_cast<double>(elems) * 12) << "; " << r.params
      << " parameters (" << r.whole << " whole, " << r.params - r.whole << " partial)\n";
  }
  s << "  total: " << ranks.size() << " ranks, " << params.size() << " distinct parameters, "
    << human_bytes(static_cast<double>(total) * 12) << " of f32 state (including padding)\n";
  file.close();
  return s.str();
}

}  // namespace loom::snap
