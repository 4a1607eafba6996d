// train.h — `verlcpp train`: SFT, a PPO/GRPO policy update or a value update, driven by a
// YAML config with verl's key names (`key=value` overrides on the command line), over MPI
// ranks (mpirun / srun) or one process. Per-step metrics on stdout and to a JSONL file;
// sharded checkpoints with resume.
#pragma once
#include <string>
#include <vector>

namespace verl {

struct TrainArgs {
  std::string config_file;             // YAML (optional: everything may come as overrides)
  std::vector<std::string> overrides;  // key=value, key may be dotted (its last part is the key)
};

// Every config key, its default and its meaning (for --help and the README).
std::string train_config_help();

int run_train(const TrainArgs& a);

}  // namespace verl
