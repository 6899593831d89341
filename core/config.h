// Config: Loom's one place for configuration. Each program declares its keys ("section.name") bound to the
// variables that hold them, then parse() fills them from, lowest precedence first:
//
//   defaults (the value a variable holds at add())  <  preset  <  TOML file  <  LOOM_* environment  <  CLI
//
//   Config cfg;
//   int64_t steps = 200;
//   cfg.add("train.steps", &steps, "optimizer steps to run");
//   cfg.add_check("train.steps", [&] { return steps > 0; }, "must be positive");
//   std::vector<std::string> rest = cfg.parse(argc, argv);   // throws loom::Error kConfig on bad input
//   if (cfg.help_requested()) { std::cout << cfg.help(); return 0; }
//   LOOM_INFO0("config\n" << cfg.table());
//
// How a key "train.lr" (name "lr") is spelled by each source:
//   TOML file    [train] lr = 3e-4           (file from --config FILE or LOOM_CONFIG)
//   environment  LOOM_LR=3e-4                (the section is not part of the name: names are unique)
//   CLI          --lr 3e-4, --lr=3e-4, --train.lr 3e-4; '-' and '_' are interchangeable in names
// A preset (a named set of values) is chosen by --preset NAME, LOOM_PRESET or a top-level `preset = "NAME"`
// in the file (in that order of precedence), else the default preset if one is set.
//
// Every value goes through the same text parser whatever its source, so a key accepts the same spellings
// everywhere: integers in plain decimal (a float such as 1e3 or 3.0 is refused), floats in any C form (an
// integer is fine; inf and nan are refused), bools as true/false/1/0/yes/no/on/off. Values print canonically
// (floats in the shortest form that reads back to the same value), which hash() and to_toml() rely on.
//
// Not thread-safe; a program configures itself once, at start, on each rank.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace loom {

enum class ConfigSource { kDefault, kPreset, kFile, kEnv, kCli };

// "default", "preset", "file", "env", "cli".
const char* config_source_name(ConfigSource source);

class Config {
 public:
  // Declares a key bound to *target, whose current value becomes the default. Throws kInternal for a malformed
  // key (lower-case "section.name" of letters, digits and '_'), a duplicate key, or a name (or env name)
  // already used in another section.
  void add(const std::string& key, int64_t* target, const std::string& help);
  void add(const std::string& key, int* target, const std::string& help);
  void add(const std::string& key, double* target, const std::string& help);
  void add(const std::string& key, float* target, const std::string& help);
  void add(const std::string& key, bool* target, const std::string& help);
  void add(const std::string& key, std::string* target, const std::string& help);
  // A string key that must be one of `choices` (the default included).
  void add_choice(const std::string& key, std::string* target, std::vector<std::string> choices,
                  const std::string& help);

  // A requirement checked after parse() (and after set() of that key), e.g.
  //   cfg.add_check("train.steps", [&] { return steps > 0; }, "must be positive");
  // fails as "train.steps must be positive, got 0 (from --steps)".
  void add_check(const std::string& key, std::function<bool()> ok, const std::string& requirement);

  // Named presets: (key, value) strings applied after the defaults, before file, env and CLI.
  void add_preset(const std::string& name, std::vector<std::pair<std::string, std::string>> values,
                  const std::string& help);
  // The preset used when none is selected ("" for none).
  void set_default_preset(const std::string& name);

  // LOOM_* variables read elsewhere (e.g. LOOM_LOG_LEVEL), so parse() does not report them as unknown.
  void allow_env(const std::string& name);

  // Fills every key from the sources above; argv[0] names the program in help(). Returns the arguments
  // after a lone `--`, untouched. `--help`/`-h` sets help_requested() and returns once the command line is
  // read, applying nothing, so a bad file or variable does not hide the help. Throws loom::Error kConfig,
  // naming the key, value and where it came from, for an unknown key in the file or on the command line (with
  // the closest known key), a value of the wrong type, a choice not in the list, a missing or unreadable
  // config file, a TOML syntax error, an unknown preset, a stray positional argument, or a failed check.
  std::vector<std::string> parse(int argc, char** argv);

  // Sets one key from text, validated as parse() would (type, choices, the key's checks). For tests and tools.
  void set(const std::string& key, const std::string& value, ConfigSource source);

  bool help_requested() const { return help_requested_; }
  // Usage: every key with its CLI flag, env name, default and help, then the presets.
  std::string help() const;
  // Aligned "key  value  source" table in key order, for rank 0 to print at start.
  std::string table() const;
  std::string value_string(const std::string& key) const;
  ConfigSource source(const std::string& key) const;
  // FNV-1a over "key=value\n" of every key in key order: ranks compare it to detect mismatched configs.
  uint64_t hash() const;
  // The same hash over the keys for which keep(key) is true (e.g. to identify a run across restarts that change
  // only how long it runs or how much it logs).
  uint64_t hash_if(const std::function<bool(const std::string&)>& keep) const;
  // A TOML document that parse() reads back to the same values (and preset).
  std::string to_toml() const;
  // LOOM_* variables seen by parse() that are neither keys nor allowed (sorted). Not an error: the caller
  // decides whether (and on which rank) to warn, e.g. with warn_unknown_env().
  const std::vector<std::string>& unknown_env() const { return unknown_env_; }
  // One LOOM_WARN line per unknown_env() entry, with the closest known variable.
  void warn_unknown_env() const;
  // The preset in effect ("" if none).
  const std::string& preset() const { return preset_; }

 private:
  // Parses text into the target or throws kConfig naming the key, the text and `origin`.
  using Assign = std::function<void(const std::string& text, const std::string& origin)>;
  using Print = std::function<std::string()>;

  struct Entry {
    std::string key;       // "train.lr"
    std::string name;      // "lr"
    std::string env_name;  // "LOOM_LR"
    std::string type;      // "integer", "float", "bool", "string" or "choice"
    std::string help;
    std::vector<std::string> choices;  // type "choice" only
    Assign assign;
    Print print;
    std::string default_value;
    ConfigSource source = ConfigSource::kDefault;
    std::string origin = "default";  // where the value came from, for check failures
  };
  struct Check {
    std::string key;
    std::function<bool()> ok;
    std::string requirement;
  };
  struct Preset {
    std::vector<std::pair<std::string, std::string>> values;
    std::string help;
  };
  // A value read from a source, not yet applied.
  struct Pending {
    std::string key, text, origin;
  };
  // What one source (file, environment or command line) holds: its values, and the file and preset it names.
  struct SourceValues {
    std::vector<Pending> values;
    std::optional<std::string> config_file;
    std::optional<std::string> preset;
    std::string preset_origin;
  };

  void add_entry(const std::string& key, std::string type, const std::string& help, Assign assign, Print print,
                 std::vector<std::string> choices = {});
  Entry& entry(const std::string& key);
  const Entry& entry(const std::string& key) const;
  void apply(const Pending& p, ConfigSource source);
  void run_checks(const std::string& only_key) const;
  // Each reads one source and checks its keys exist; values are checked when applied.
  SourceValues read_command_line(int argc, char** argv, std::vector<std::string>* positional);
  SourceValues read_environment();
  SourceValues read_file(const std::string& path, const std::string& origin) const;
  void apply_preset(const std::string& name, const std::string& origin);
  // The key a CLI flag (without the leading "--") names, or "" if none.
  std::string key_for_flag(const std::string& flag) const;
  // " (did you mean 'x'?)" for the candidate closest to `wrong`, or "" when none is close.
  static std::string suggestion(const std::string& wrong, const std::vector<std::string>& candidates);
  std::string unknown_key_message(const std::string& key, const std::string& origin) const;

  std::map<std::string, Entry> entries_;        // by key, so tables, hashes and TOML come out in key order
  std::map<std::string, std::string> by_name_;  // name -> key
  std::vector<Check> checks_;
  std::map<std::string, Preset> presets_;
  std::string default_preset_;
  std::string preset_;
  std::vector<std::string> allowed_env_;
  std::vector<std::string> unknown_env_;
  std::string program_ = "loom";
  bool help_requested_ = false;
};

}  // namespace loom
