// c10d_comm_check.cpp — a test-only Python module that runs the collectives checks
// (comm_checks.h) on the Comm over a torch.distributed group (python/csrc/c10d_comm.h), so the
// c10d comm is held to the same closed-form values as the MPI one. Driven by
// c10d_comm_check.py under torchrun. Hybrid (even / odd) splits are refused by that comm for now; the shared-memory comm over
// it (shm_*) makes them.
#include <torch/extension.h>

#include "c10d_comm.h"
#include "comm_checks.h"
#include "dist/shm_comm.h"

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
  // The shared-memory comm the engine builds over the group (dist/shm_comm.h): the same
  // checks, with hybrid (even / odd) splits, which it makes itself.
  m.def("shm_collectives", [](const std::string& group, double timeout_s) {
    return run([&] {
      pybind11::gil_scoped_release nogil;
      auto c = verl::make_shm_comm(verl::make_c10d_comm(group, timeout_s), timeout_s);
      if (c->size() > 1 && c->name().rfind("shm(", 0) != 0) {
        std::fprintf(stderr, "expected a shared-memory comm, got %s\n", c->name().c_str());
        return 1;
      }
      return verl::comm_checks::world_and_split(*c, /*hybrid=*/true);
    });
  });
  m.def("shm_stall_or_die", [](const std::string& group, double timeout_s, bool die) {
    return run([&] {
      pybind11::gil_scoped_release nogil;
      auto c = verl::make_shm_comm(verl::make_c10d_comm(group, timeout_s), timeout_s);
      return verl::comm_checks::stall_or_die(*c, die);
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
