// train.h — `verlcpp train`: SFT, a PPO/GRPO policy update or a value update, driven by a
// YAML config with verl's key paths (`key=value` overrides on the command line), over MPI
// ranks (mpirun / srun) or one process. Named stages: config (train_config.h) → dataset
// (dataset.h) → task (tasks.h) → loop on FsdpEngine::train_batch → metrics (metrics.h), with
// sharded checkpoints and resume (engine/checkpoint.h). Torch-free header for main.cpp.
#pragma once
#include <string>
#include <vector>

namespace verl {

struct TrainArgs {
  std::string config_file;             // YAML (optional: everything may come as overrides)
  std::vector<std::string> overrides;  // key=value, applied after the file in order
};

// Every config key, its default and its meaning (for --help and the README).
std::string train_config_help();

int run_train(const TrainArgs& a);

}  // namespace verl
