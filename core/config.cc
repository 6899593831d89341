// Config: key registry, value parsing for every source, and the TOML reader/writer (core/config.h).
//
// Each key is an Entry holding an assign (text -> target, validated) and a print (target -> canonical text)
// built by its add() overload; every source (preset, file, env, CLI, set()) is turned into text and goes
// through the same assign, so a key accepts the same spellings and gives the same errors everywhere. toml++
// is used only here: its header stays out of core/config.h.
#include "core/config.h"

#include <toml++/toml.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cerrno>
#include <cfloat>
#include <charconv>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <optional>
#include <sstream>

#include "core/env.h"
#include "core/error.h"
#include "core/log.h"
#include "core/rng.h"
#include "core/text.h"

namespace loom {
namespace {

const char* const kEnvPrefix = "LOOM_";
const char* const kConfigEnv = "LOOM_CONFIG";
const char* const kPresetEnv = "LOOM_PRESET";

// ---- value text -------------------------------------------------------------------------------------------

// Where from_chars should start: past a leading '+', which from_chars does not take, unless a '-' follows
// (so "+-1" stays invalid).
const char* number_start(const std::string& text) {
  const char* begin = text.data();
  if (text.size() > 1 && text[0] == '+' && text[1] != '-') ++begin;
  return begin;
}

// Plain decimal with an optional sign. Sets *out_of_range for a well-formed number that does not fit.
bool read_integer(const std::string& text, int64_t* out, bool* out_of_range) {
  const char* begin = number_start(text);
  const char* end = text.data() + text.size();
  auto [ptr, ec] = std::from_chars(begin, end, *out);
  *out_of_range = ec == std::errc::result_out_of_range && ptr == end;
  return ec == std::errc() && ptr == end;
}

// Any C float spelling (from_chars general format, optional '+'); inf and nan are refused so that every value
// can be written back as TOML and compared across ranks.
bool read_real(const std::string& text, double* out) {
  const char* begin = number_start(text);
  const char* end = text.data() + text.size();
  auto [ptr, ec] = std::from_chars(begin, end, *out);
  return ec == std::errc() && ptr == end && std::isfinite(*out);
}

bool read_bool(const std::string& text, bool* out) {
  std::string t = text;
  std::transform(t.begin(), t.end(), t.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  if (t == "true" || t == "1" || t == "yes" || t == "on") {
    *out = true;
    return true;
  }
  if (t == "false" || t == "0" || t == "no" || t == "off") {
    *out = false;
    return true;
  }
  return false;
}

// Shortest digits that read back to the same value, laid out as Python's repr does: fixed notation for
// decimal exponents in [-4, 16) ("0.0003", "200"), scientific otherwise ("1e-05", "1e+20").
template <typename T>
std::string shortest(T value) {
  char buf[400];  // fixed notation of the largest double has 309 digits, though it is never used here
  auto [sci_end, sci_ec] = std::to_chars(buf, buf + sizeof buf, value, std::chars_format::scientific);
  LOOM_ASSERT(sci_ec == std::errc());
  std::string scientific(buf, sci_end);
  const int exponent = std::atoi(scientific.c_str() + scientific.find('e') + 1);
  if (exponent < -4 || exponent >= 16) return scientific;
  auto [fixed_end, fixed_ec] = std::to_chars(buf, buf + sizeof buf, value, std::chars_format::fixed);
  LOOM_ASSERT(fixed_ec == std::errc());
  return std::string(buf, fixed_end);
}

// A float as TOML: the shortest form, with ".0" added where it would otherwise read as an integer (so that an
// integer key given a TOML float such as 3.0 is refused rather than silently accepted).
std::string toml_float_text(const std::string& shortest_text) {
  if (shortest_text.find_first_of(".eEni") == std::string::npos) return shortest_text + ".0";
  return shortest_text;
}

// "train.steps expects an integer, got 'ten' (from --steps)"; `kind` qualifies the text ("the float ").
[[noreturn]] void bad_value(const std::string& key, const std::string& expected, const std::string& text,
                            const std::string& origin, const std::string& kind = "") {
  LOOM_THROW(kConfig, key << " expects " << expected << ", got " << kind << "'" << text << "' (from " << origin << ")");
}

int64_t to_integer(const std::string& key, const std::string& text, const std::string& origin, int64_t lo, int64_t hi,
                   const char* range_name) {
  int64_t v = 0;
  bool out_of_range = false;
  double real = 0;
  if (read_integer(text, &v, &out_of_range)) {
    if (v >= lo && v <= hi) return v;
    out_of_range = true;
  }
  if (out_of_range) bad_value(key, range_name, text, origin);
  if (read_real(text, &real)) bad_value(key, "an integer", text, origin, "the float ");
  bad_value(key, "an integer", text, origin);
}

double to_real(const std::string& key, const std::string& text, const std::string& origin) {
  double v = 0;
  if (!read_real(text, &v)) bad_value(key, "a finite number", text, origin);
  return v;
}

std::string join(const std::vector<std::string>& items, const std::string& separator) {
  std::string out;
  for (size_t i = 0; i < items.size(); ++i) out += (i ? separator : "") + items[i];
  return out;
}

std::string replace_all(std::string s, char from, char to) {
  std::replace(s.begin(), s.end(), from, to);
  return s;
}

std::string upper(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return static_cast<char>(std::toupper(c)); });
  return s;
}

std::string flag_of(const std::string& name) {
  return "--" + replace_all(name, '_', '-');
}

bool is_identifier(const std::string& part) {
  if (part.empty() || !(part[0] >= 'a' && part[0] <= 'z')) return false;
  return std::all_of(part.begin(), part.end(),
                     [](char c) { return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_'; });
}

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diagonal = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      size_t above = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diagonal = above;
    }
  }
  return row[b.size()];
}

// "an integer", "a float", "a bool", "a string" or "one of {a, b}".
std::string type_phrase(const std::string& type, const std::vector<std::string>& choices) {
  if (type == "choice") return "one of {" + join(choices, ", ") + "}";
  return (type == "integer" ? "an " : "a ") + type;
}

// ---- TOML -------------------------------------------------------------------------------------------------


// A TOML scalar as the text the key's assign parses; nullopt for arrays and dates, which no key takes.
std::optional<std::string> toml_scalar_text(const toml::node& node) {
  if (auto v = node.as_integer()) return std::to_string(v->get());
  if (auto v = node.as_floating_point()) return toml_float_text(shortest(v->get()));
  if (auto v = node.as_boolean()) return std::string(v->get() ? "true" : "false");
  if (auto v = node.as_string()) return v->get();
  return std::nullopt;
}

const char* toml_type_name(const toml::node& node) {
  switch (node.type()) {
    case toml::node_type::array: return "an array";
    case toml::node_type::table: return "a table";
    case toml::node_type::date: return "a date";
    case toml::node_type::time: return "a time";
    case toml::node_type::date_time: return "a date-time";
    default: return "a value";
  }
}

// Calls visit(key, node) for every non-table value under `table`, keys joined with '.'.
void walk_values(const toml::table& table, const std::string& prefix,
                 const std::function<void(const std::string&, const toml::node&)>& visit) {
  for (const auto& [name, node] : table) {
    std::string key = prefix.empty() ? std::string(name.str()) : prefix + "." + std::string(name.str());
    if (const toml::table* sub = node.as_table()) {
      walk_values(*sub, key, visit);
    } else {
      visit(key, node);
    }
  }
}

}  // namespace

const char* config_source_name(ConfigSource source) {
  switch (source) {
    case ConfigSource::kDefault: return "default";
    case ConfigSource::kPreset: return "preset";
    case ConfigSource::kFile: return "file";
    case ConfigSource::kEnv: return "env";
    case ConfigSource::kCli: return "cli";
  }
  return "?";
}

// ---- declaring keys ---------------------------------------------------------------------------------------

void Config::add_entry(const std::string& key, std::string type, const std::string& help, Assign assign, Print print,
                       std::vector<std::string> choices) {
  size_t dot = key.rfind('.');
  LOOM_CHECK(dot != std::string::npos, kInternal,
             "config key '" << key << "' must be \"section.name\" (e.g. train.lr)");
  std::stringstream parts(key);
  for (std::string part; std::getline(parts, part, '.');) {
    LOOM_CHECK(is_identifier(part), kInternal,
               "config key '" << key << "': each part must be lower-case letters, digits and '_', starting "
                              << "with a letter");
  }
  std::string name = key.substr(dot + 1);
  LOOM_CHECK(name != "config" && name != "preset" && name != "help", kInternal,
             "config key '" << key << "': the name '" << name << "' is reserved for --" << name);
  LOOM_CHECK(!entries_.count(key), kInternal, "config key '" << key << "' is declared twice");
  auto clash = by_name_.find(name);
  LOOM_CHECK(clash == by_name_.end(), kInternal,
             "config key '" << key << "' has the same name as '" << clash->second << "': names must be unique "
                            << "across sections because they make the env and CLI names (LOOM_" << upper(name) << ", "
                            << flag_of(name) << ")");
  for (const auto& [other, e] : entries_) {
    // "a.b" and "a.b.c" cannot both exist: TOML cannot hold a value and a table under one name.
    bool nested = other.rfind(key + ".", 0) == 0 || key.rfind(other + ".", 0) == 0;
    LOOM_CHECK(!nested, kInternal, "config keys '" << other << "' and '" << key << "' nest inside each other");
  }

  Entry e;
  e.key = key;
  e.name = name;
  e.env_name = kEnvPrefix + upper(name);
  e.type = std::move(type);
  e.help = help;
  e.choices = std::move(choices);
  e.assign = std::move(assign);
  e.print = std::move(print);
  e.default_value = e.print();
  by_name_[name] = key;
  entries_.emplace(key, std::move(e));
}

void Config::add(const std::string& key, int64_t* target, const std::string& help) {
  LOOM_CHECK(target, kInternal, "config key '" << key << "': target is null");
  add_entry(
      key, "integer", help,
      [key, target](const std::string& text, const std::string& origin) {
        *target = to_integer(key, text, origin, INT64_MIN, INT64_MAX, "a 64-bit integer");
      },
      [target] { return std::to_string(*target); });
}

void Config::add(const std::string& key, int* target, const std::string& help) {
  LOOM_CHECK(target, kInternal, "config key '" << key << "': target is null");
  add_entry(
      key, "integer", help,
      [key, target](const std::string& text, const std::string& origin) {
        *target = static_cast<int>(to_integer(key, text, origin, INT_MIN, INT_MAX, "a 32-bit integer"));
      },
      [target] { return std::to_string(*target); });
}

void Config::add(const std::string& key, double* target, const std::string& help) {
  LOOM_CHECK(target, kInternal, "config key '" << key << "': target is null");
  add_entry(
      key, "float", help,
      [key, target](const std::string& text, const std::string& origin) { *target = to_real(key, text, origin); },
      [target] { return shortest(*target); });
}

void Config::add(const std::string& key, float* target, const std::string& help) {
  LOOM_CHECK(target, kInternal, "config key '" << key << "': target is null");
  add_entry(
      key, "float", help,
      [key, target](const std::string& text, const std::string& origin) {
        double v = to_real(key, text, origin);
        if (std::fabs(v) > FLT_MAX) bad_value(key, "a number within 32-bit float range", text, origin);
        *target = static_cast<float>(v);
      },
      [target] { return shortest(*target); });
}

void Config::add(const std::string& key, bool* target, const std::string& help) {
  LOOM_CHECK(target, kInternal, "config key '" << key << "': target is null");
  add_entry(
      key, "bool", help,
      [key, target](const std::string& text, const std::string& origin) {
        if (!read_bool(text, target)) bad_value(key, "a bool (true/false/1/0/yes/no/on/off)", text, origin);
      },
      [target] { return std::string(*target ? "true" : "false"); });
}

void Config::add(const std::string& key, std::string* target, const std::string& help) {
  LOOM_CHECK(target, kInternal, "config key '" << key << "': target is null");
  add_entry(
      key, "string", help, [target](const std::string& text, const std::string&) { *target = text; },
      [target] { return *target; });
}

void Config::add_choice(const std::string& key, std::string* target, std::vector<std::string> choices,
                        const std::string& help) {
  LOOM_CHECK(target, kInternal, "config key '" << key << "': target is null");
  LOOM_CHECK(std::find(choices.begin(), choices.end(), *target) != choices.end(), kInternal,
             "config key '" << key << "': default '" << *target << "' is not one of its choices {"
                            << join(choices, ", ") << "}");
  add_entry(
      key, "choice", help,
      [key, target, choices](const std::string& text, const std::string& origin) {
        if (std::find(choices.begin(), choices.end(), text) == choices.end()) {
          bad_value(key, type_phrase("choice", choices), text, origin);
        }
        *target = text;
      },
      [target] { return *target; }, choices);
}

void Config::add_check(const std::string& key, std::function<bool()> ok, const std::string& requirement) {
  entry(key);  // the key must exist
  checks_.push_back({key, std::move(ok), requirement});
}

void Config::add_preset(const std::string& name, std::vector<std::pair<std::string, std::string>> values,
                        const std::string& help) {
  LOOM_CHECK(!name.empty() && !presets_.count(name), kInternal,
             "preset name '" << name << "' is empty or declared twice");
  presets_[name] = {std::move(values), help};
}

void Config::set_default_preset(const std::string& name) {
  LOOM_CHECK(name.empty() || presets_.count(name), kInternal, "default preset '" << name << "' is not declared");
  default_preset_ = name;
}

void Config::allow_env(const std::string& name) {
  allowed_env_.push_back(name);
}

// ---- lookup -----------------------------------------------------------------------------------------------

Config::Entry& Config::entry(const std::string& key) {
  return const_cast<Entry&>(static_cast<const Config*>(this)->entry(key));
}

const Config::Entry& Config::entry(const std::string& key) const {
  auto it = entries_.find(key);
  if (it == entries_.end()) {
    std::vector<std::string> keys;
    for (const auto& [k, e] : entries_) keys.push_back(k);
    LOOM_THROW(kInternal, "no config key '" << key << "' is declared" << suggestion(key, keys));
  }
  return it->second;
}

std::string Config::key_for_flag(const std::string& flag) const {
  std::string name = replace_all(flag, '-', '_');
  if (entries_.count(name)) return name;
  auto it = by_name_.find(name);
  return it == by_name_.end() ? "" : it->second;
}

std::string Config::suggestion(const std::string& wrong, const std::vector<std::string>& candidates) {
  const std::string* best = nullptr;
  size_t best_distance = 0;
  for (const std::string& c : candidates) {
    size_t d = edit_distance(wrong, c);
    if (!best || d < best_distance) {
      best = &c;
      best_distance = d;
    }
  }
  // Far-off guesses mislead more than they help.
  if (!best || best_distance > std::max<size_t>(2, wrong.size() / 3)) return "";
  return "; did you mean '" + *best + "'?";
}

std::string Config::unknown_key_message(const std::string& key, const std::string& origin) const {
  std::vector<std::string> keys;
  for (const auto& [k, e] : entries_) keys.push_back(k);
  return "unknown config key '" + key + "' (from " + origin + ")" + suggestion(key, keys);
}

// ---- parsing ----------------------------------------------------------------------------------------------

void Config::apply(const Pending& p, ConfigSource source) {
  Entry& e = entry(p.key);
  e.assign(p.text, p.origin);
  e.source = source;
  e.origin = p.origin;
}

void Config::run_checks(const std::string& only_key) const {
  for (const Check& c : checks_) {
    if (!only_key.empty() && c.key != only_key) continue;
    if (c.ok()) continue;
    const Entry& e = entry(c.key);
    LOOM_THROW(kConfig, c.key << " " << c.requirement << ", got " << e.print() << " (from " << e.origin << ")");
  }
}

Config::SourceValues Config::read_file(const std::string& path, const std::string& origin) const {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::file_status status = fs::status(path, ec);
  LOOM_CHECK(fs::exists(status), kConfig, "config file '" << path << "' (from " << origin << ") does not exist");
  LOOM_CHECK(!fs::is_directory(status), kConfig, "config file '" << path << "' (from " << origin << ") is a directory");
  std::ifstream in(path, std::ios::binary);
  LOOM_CHECK(in, kConfig,
             "config file '" << path << "' (from " << origin << ") cannot be read: " << std::strerror(errno));
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  LOOM_CHECK(!in.bad(), kConfig, "config file '" << path << "' (from " << origin << ") cannot be read");

  toml::table root;
  try {
    root = toml::parse(text, std::string_view(path));
  } catch (const toml::parse_error& err) {
    LOOM_THROW(kConfig, "config file '" << path << "' line " << err.source().begin.line << ", column "
                                        << err.source().begin.column << ": " << err.description());
  }

  SourceValues out;
  walk_values(root, "", [&](const std::string& key, const toml::node& node) {
    std::string where = "file '" + path + "' line " + std::to_string(node.source().begin.line);
    if (key == "preset") {
      const auto* name = node.as_string();
      LOOM_CHECK(name, kConfig, "preset expects a string, got " << toml_type_name(node) << " (from " << where << ")");
      out.preset = name->get();
      out.preset_origin = where;
      return;
    }
    LOOM_CHECK(entries_.count(key), kConfig, unknown_key_message(key, where));
    std::optional<std::string> value = toml_scalar_text(node);
    LOOM_CHECK(value, kConfig,
               key << " expects " << type_phrase(entry(key).type, entry(key).choices) << ", got "
                   << toml_type_name(node) << " (from " << where << ")");
    out.values.push_back({key, *value, where});
  });
  return out;
}

Config::SourceValues Config::read_command_line(int argc, char** argv, std::vector<std::string>* positional) {
  SourceValues out;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--") {
      positional->assign(argv + i + 1, argv + argc);
      break;
    }
    if (arg == "-h" || arg == "--help") {
      help_requested_ = true;
      continue;
    }
    LOOM_CHECK(arg.rfind("--", 0) == 0 && arg.size() > 2, kConfig,
               "unexpected argument '" << arg << "' on the command line: options start with --, and positional "
                                       << "arguments go after a lone --");
    size_t eq = arg.find('=');
    std::string flag = arg.substr(2, eq == std::string::npos ? std::string::npos : eq - 2);
    std::optional<std::string> value;
    if (eq != std::string::npos) value = arg.substr(eq + 1);
    const bool next_is_value = i + 1 < argc && std::string(argv[i + 1]).rfind("--", 0) != 0;

    std::string normalized = replace_all(flag, '-', '_');
    std::string key = key_for_flag(flag);
    if (normalized != "config" && normalized != "preset" && key.empty()) {
      std::vector<std::string> flags;
      for (const auto& [k, e] : entries_) {
        flags.push_back(flag_of(e.name));
        flags.push_back(flag_of(k));
      }
      LOOM_THROW(kConfig, "unknown option '--" << flag << "' on the command line"
                                               << suggestion("--" + replace_all(flag, '_', '-'), flags)
                                               << " (see --help)");
    }
    if (!value) {
      if (!key.empty() && entry(key).type == "bool" && !next_is_value) {
        value = "true";  // a bare --flag
      } else {
        LOOM_CHECK(next_is_value, kConfig, "option '--" << flag << "' on the command line needs a value");
        value = argv[++i];
      }
    }
    if (normalized == "config") {
      out.config_file = value;
    } else if (normalized == "preset") {
      out.preset = value;
      out.preset_origin = "--preset";
    } else {
      out.values.push_back({key, *value, "--" + flag});
    }
  }
  return out;
}

Config::SourceValues Config::read_environment() {
  std::map<std::string, std::string> key_by_env;
  for (const auto& [k, e] : entries_) key_by_env[e.env_name] = k;
  SourceValues out;
  unknown_env_.clear();
  auto vars = env::with_prefix(kEnvPrefix);
  std::sort(vars.begin(), vars.end());
  for (const auto& [name, value] : vars) {
    if (value.empty()) continue;  // `LOOM_X= prog` unsets, as in env::get_int
    auto it = key_by_env.find(name);
    if (it != key_by_env.end()) {
      out.values.push_back({it->second, value, "env " + name});
    } else if (name == kConfigEnv) {
      out.config_file = value;
    } else if (name == kPresetEnv) {
      out.preset = value;
      out.preset_origin = kPresetEnv;
    } else if (std::find(allowed_env_.begin(), allowed_env_.end(), name) == allowed_env_.end()) {
      unknown_env_.push_back(name);
    }
  }
  return out;
}

void Config::apply_preset(const std::string& name, const std::string& origin) {
  preset_ = name;
  if (name.empty()) return;
  auto it = presets_.find(name);
  if (it == presets_.end()) {
    std::vector<std::string> names;
    for (const auto& [n, p] : presets_) names.push_back(n);
    LOOM_THROW(kConfig, "unknown preset '"
                            << name << "' (from " << origin << "); "
                            << (names.empty() ? "no presets are defined" : "presets: " + join(names, ", ")));
  }
  for (const auto& [key, value] : it->second.values) {
    LOOM_CHECK(entries_.count(key), kInternal, "preset '" << name << "' sets undeclared key '" << key << "'");
    apply({key, value, "preset '" + name + "'"}, ConfigSource::kPreset);
  }
}

std::vector<std::string> Config::parse(int argc, char** argv) {
  if (argc > 0 && argv[0]) program_ = std::filesystem::path(argv[0]).filename().string();
  help_requested_ = false;

  // The command line and environment are read before anything is applied: they name the file and the preset.
  std::vector<std::string> positional;
  SourceValues cli = read_command_line(argc, argv, &positional);
  if (help_requested_) return positional;
  SourceValues env = read_environment();
  SourceValues file;
  const std::string config_path = cli.config_file.value_or(env.config_file.value_or(""));
  if (!config_path.empty()) file = read_file(config_path, cli.config_file ? "--config" : kConfigEnv);

  // The preset comes from the highest source that names one (an explicit "" names none).
  if (cli.preset) {
    apply_preset(*cli.preset, cli.preset_origin);
  } else if (env.preset) {
    apply_preset(*env.preset, env.preset_origin);
  } else if (file.preset) {
    apply_preset(*file.preset, file.preset_origin);
  } else {
    apply_preset(default_preset_, "the default preset");
  }
  for (const Pending& p : file.values) apply(p, ConfigSource::kFile);
  for (const Pending& p : env.values) apply(p, ConfigSource::kEnv);
  for (const Pending& p : cli.values) apply(p, ConfigSource::kCli);
  run_checks("");
  return positional;
}

void Config::set(const std::string& key, const std::string& value, ConfigSource source) {
  LOOM_CHECK(entries_.count(key), kConfig, unknown_key_message(key, "set()"));
  apply({key, value, std::string("set() as ") + config_source_name(source)}, source);
  run_checks(key);
}

// ---- output -----------------------------------------------------------------------------------------------

std::string Config::value_string(const std::string& key) const {
  return entry(key).print();
}

ConfigSource Config::source(const std::string& key) const {
  return entry(key).source;
}

uint64_t Config::hash() const {
  return hash_if([](const std::string&) { return true; });
}

uint64_t Config::hash_if(const std::function<bool(const std::string&)>& keep) const {
  std::string all;
  for (const auto& [key, e] : entries_)
    if (keep(key)) all += key + "=" + e.print() + "\n";
  return fnv1a64(all);
}

std::string Config::help() const {
  auto metavar = [](const Entry& e) -> std::string {
    if (e.type == "integer") return " INT";
    if (e.type == "float") return " FLOAT";
    if (e.type == "bool") return "[=BOOL]";
    if (e.type == "choice") return " {" + join(e.choices, "|") + "}";
    return " STR";
  };
  size_t width = 16;
  for (const auto& [key, e] : entries_) width = std::max(width, flag_of(e.name).size() + metavar(e).size());
  width = std::min<size_t>(width, 40) + 2;
  std::ostringstream out;
  auto line = [&](const std::string& left, const std::string& right) {
    out << "  " << left;
    if (left.size() + 2 > width) {
      out << "\n  " << std::string(width, ' ');
    } else {
      out << std::string(width - left.size(), ' ');
    }
    out << right << "\n";
  };

  out << "Usage: " << program_ << " [options] [-- args...]\n\n"
      << "Each key is set by, lowest precedence first: its default < a preset < the TOML file\n"
      << "([section] name = value) < its LOOM_* environment variable < its command-line flag.\n"
      << "Flags take --name VALUE, --name=VALUE or --section.name VALUE; a bare bool flag means true.\n\n";
  line("--config FILE", "TOML config file (env " + std::string(kConfigEnv) + ")");
  line("--preset NAME", "start from a preset, listed below (env " + std::string(kPresetEnv) +
                            ", or top-level `preset = \"NAME\"` in the file)");
  line("-h, --help", "print this help and exit");

  std::string section;
  for (const auto& [key, e] : entries_) {
    std::string this_section = key.substr(0, key.rfind('.'));
    if (this_section != section) {
      section = this_section;
      out << "\n[" << section << "]\n";
    }
    line(flag_of(e.name) + metavar(e), e.help);
    line("", "key " + key + ", env " + e.env_name + ", default '" + e.default_value + "'");
  }

  if (!presets_.empty()) {
    out << "\nPresets" << (default_preset_.empty() ? "" : " (default: " + default_preset_ + ")") << ":\n";
    for (const auto& [name, p] : presets_) {
      std::vector<std::string> sets;
      for (const auto& [k, v] : p.values) sets.push_back(k + "=" + v);
      line(name, p.help);
      line("", join(sets, " "));
    }
  }
  return out.str();
}

std::string Config::table() const {
  std::vector<std::array<std::string, 3>> rows = {{"key", "value", "source"}};
  for (const auto& [key, e] : entries_) {
    std::string source = config_source_name(e.source);
    if (e.source == ConfigSource::kPreset && !preset_.empty()) source += " " + preset_;
    rows.push_back({key, e.print(), source});
  }
  size_t key_width = 0, value_width = 0;
  for (const auto& r : rows) {
    key_width = std::max(key_width, r[0].size());
    value_width = std::max(value_width, r[1].size());
  }
  std::ostringstream out;
  for (const auto& r : rows) {
    out << r[0] << std::string(key_width - r[0].size() + 2, ' ') << r[1]
        << std::string(value_width - r[1].size() + 2, ' ') << r[2] << "\n";
  }
  return out.str();
}

std::string Config::to_toml() const {
  std::ostringstream out;
  out << "# Loom config: every key with its value in effect (Config::to_toml).\n";
  if (!preset_.empty()) out << "preset = " << quote_escaped(preset_) << "\n";
  // Keys in key order can interleave sections ("a.b.x" sorts between "a.a" and "a.c"); group them first.
  std::map<std::string, std::vector<const Entry*>> by_section;
  for (const auto& [key, e] : entries_) by_section[key.substr(0, key.rfind('.'))].push_back(&e);
  for (const auto& [section, entries] : by_section) {
    out << "\n[" << section << "]\n";
    for (const Entry* e : entries) {
      out << "# " << replace_all(e->help, '\n', ' ') << "\n" << e->name << " = ";
      std::string value = e->print();
      if (e->type == "string" || e->type == "choice") {
        out << quote_escaped(value);
      } else if (e->type == "float") {
        out << toml_float_text(value);
      } else {
        out << value;
      }
      out << "\n";
    }
  }
  return out.str();
}

void Config::warn_unknown_env() const {
  std::vector<std::string> known = allowed_env_;
  known.push_back(kConfigEnv);
  known.push_back(kPresetEnv);
  for (const auto& [key, e] : entries_) known.push_back(e.env_name);
  for (const std::string& name : unknown_env_) {
    LOOM_WARN("environment variable " << name << " is not a Loom config key and is ignored" << suggestion(name, known));
  }
}

}  // namespace loom
