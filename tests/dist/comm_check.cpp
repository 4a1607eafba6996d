// comm_check.cpp — drives every Comm collective (tests/dist/comm_checks.h) on 1..N ranks
// started by mpirun, or on the single-process comm. Modes for the failure tests: a rank that
// stalls or dies mid-step must make the others stop with a clear error within the watchdog
// timeout.
//   comm_check collectives [--backend B]
//   comm_check stall --timeout S      (rank 1 stops responding before a collective)
//   comm_check die                    (rank 1 is killed before a collective)
#include "comm_checks.h"

using namespace verl;

int main(int argc, char** argv) {
  std::string mode = argc > 1 ? argv[1] : "collectives";
  CommOptions opt;
  for (int i = 2; i + 1 < argc; i += 2) {
    std::string k = argv[i];
    if (k == "--backend") opt.backend = argv[i + 1];
    else if (k == "--timeout") opt.timeout_s = std::atof(argv[i + 1]);
  }
  int failed = 0;
  try {
    auto comm = make_comm(opt);
    if (mode == "collectives") {
      failed = comm_checks::world_and_split(*comm);
    } else if (mode == "stall" || mode == "die") {
      failed = comm_checks::stall_or_die(*comm, mode == "die");
    } else {
      std::fprintf(stderr, "unknown mode %s\n", mode.c_str());
      return 2;
    }
    comm.reset();
    finalize_comm();
  } catch (const Error& e) {
    std::fprintf(stderr, "verlcpp: error: %s\n", e.what());
    return 2;
  }
  return failed ? 1 : 0;
}
