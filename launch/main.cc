// `loom`: the command-line tool.
//
//   loom info                      build features, devices, default data location
//   loom tokenize IN.txt OUT.bin   byte-level tokenize a text file into a Loom token file
//   loom inspect PATH              token files, HDF5 snapshots, in-memory snapshots of a job
//   loom snapshotd ...             the per-node snapshot daemon
//   loom monitor ...               the communication monitor of a job
//   loom run ... -- PROG ARGS      the self-healing launcher: monitor + mpirun + restarts
//
// Each subcommand lives in its own file (launch/cmd_*.cc).
#include <cstring>
#include <iostream>
#include <string>

#include "core/error.h"
#include "launch/commands.h"

namespace {

void usage(std::ostream& os) {
  os << "usage: loom <command> [args]\n\n"
        "commands:\n"
        "  info                       build features, GPUs, data cache\n"
        "  tokenize IN.txt OUT.bin    byte-level tokenize a text file into a token file\n"
        "  inspect PATH               describe a token file (.bin), an HDF5 snapshot (.h5), a folder of\n"
        "                             snapshots, or a job's in-memory snapshots (job:ID[:NODE])\n"
        "  snapshotd --job ID ...     the per-node snapshot daemon (trainers start it themselves)\n"
        "  monitor --job ID ...       the communication monitor of a job (loom monitor --help)\n"
        "  run [opts] -- PROG ARGS    run PROG under mpirun with the monitor; on a fault, exclude the faulty\n"
        "                             node, restart, resume from snapshots (loom run --help)\n"
        "  help                       this text\n";
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || !std::strcmp(argv[1], "help") || !std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h")) {
    usage(argc < 2 ? std::cerr : std::cout);
    return argc < 2 ? 2 : 0;
  }
  const std::string cmd = argv[1];
  try {
    if (cmd == "info") return loom::cli::cmd_info(argc - 2, argv + 2);
    if (cmd == "tokenize") return loom::cli::cmd_tokenize(argc - 2, argv + 2);
    if (cmd == "inspect") return loom::cli::cmd_inspect(argc - 2, argv + 2);
    if (cmd == "snapshotd") return loom::cli::cmd_snapshotd(argc - 2, argv + 2);
    if (cmd == "monitor") return loom::cli::cmd_monitor(argc - 2, argv + 2);
    if (cmd == "run") return loom::cli::cmd_run(argc - 2, argv + 2);
  } catch (const loom::Error& e) {
    std::cerr << "loom " << cmd << ": " << e.what() << "\n";
    return 1;
  }
  std::cerr << "loom: unknown command '" << cmd << "'\n\n";
  usage(std::cerr);
  return 2;
}
