// The subcommands of the `loom` tool; each takes the arguments after its name and returns the exit status.
#pragma once

namespace loom::cli {
int cmd_info(int argc, char** argv);
int cmd_tokenize(int argc, char** argv);
int cmd_inspect(int argc, char** argv);
int cmd_snapshotd(int argc, char** argv);
int cmd_monitor(int argc, char** argv);
int cmd_run(int argc, char** argv);
}  // namespace loom::cli
