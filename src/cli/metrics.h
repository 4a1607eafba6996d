// metrics.h — `verlcpp train`'s metrics logger: per step, the loss and the loss's metrics
// reduced over ranks, grad_norm, lr, tokens/s, as one line on stdout and one JSON line in
// the metrics file (appended, so a resumed run continues it), with a progress bar on a
// terminal; at the end, the peak RSS over ranks. Rank 0 writes; every rank takes part in the
// reductions (log_step and finish are collectives). A failed write is an Error naming the file.
#pragma once
#include <cstdint>
#include <fstream>
#include <memory>
#include <string>

#include "engine/fsdp_engine.h"

namespace verl {

class MetricsLogger {
 public:
  // `prefix`: the role ("actor", "critic"), in front of the loss's own metric names.
  MetricsLogger(Comm& world, const std::string& path, const std::string& prefix, int64_t total_steps);
  ~MetricsLogger();
  // Collective. `step` counts from 1.
  void log_step(int64_t step, const FsdpEngine::TrainStepResult& r, double seconds);
  // Rank 0: one line on stdout (above the progress bar).
  void message(const std::string& line);
  // Collective: the peak RSS line and the summary record.
  void finish();

 private:
  Comm& world_;
  std::string path_, prefix_;
  int64_t total_, ran_ = 0;
  bool lead_, tty_;
  double started_;
  std::unique_ptr<std::ofstream> file_;
  void write(const std::string& json_line);
  void clear_bar();
};

}  // namespace verl
