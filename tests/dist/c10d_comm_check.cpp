// c10d_comm_check.cpp — a test-only Python module that runs the collectives checks
// (comm_checks.h) on the Comm over a torch.distributed group (python/csrc/c10d_comm.h), so the
// c10d comm is held to the same closed-form values as the MPI one. Driven by
// c10d_comm_check.py under torchrun. Hybrid (even / odd) splits are refused by that comm for now.
#include <torch/extension.h>

#include "c10d_comm.h"
#include "comm_checks.h"

namespace {

template <class F>
int run(F&& f) {
  try {
    return f();
  } catch (const verl::Error& e) {
    throw std::runtime_error(std::string("verlcpp: ") + e.what());
  }
}

}  // namespace

PYBIND11_MODULE(c10d_comm_check, m) {
  m.def("collectives", [](const std::string& group, double timeout_s) {
    return run([&] {
      pybind11::gil_scoped_release nogil;
      auto c = verl::make_c10d_comm(group, timeout_s);
      return verl::comm_checks::world_and_split(*c, /*hybrid=*/false);
    });
  });
  m.def("stall_or_die", [](const std::string& group, double timeout_s, bool die) {
    return run([&] {
      pybind11::gil_scoped_release nogil;
      auto c = verl::make_c10d_comm(group, timeout_s);
      return verl::comm_checks::stall_or_die(*c, die);
    });
  });
}
