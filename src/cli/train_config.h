// train_config.h — the settings of `verlcpp train`: a YAML file (--config) and key=value
// overrides, with verl's key paths and verl's scoping. The trained model's settings live in
// its role's section (actor_rollout_ref.actor.* for sft / ppo, critic.* for value), so an
// actor's optim.lr and a critic's optim.lr are different settings; job settings live under
// data.* and trainer.*. A key written without a section (lr=1e-6, or verl's SFT-trainer layout
// optim.lr, engine.fsdp_size, model.path) sets the trained model's. Every value is checked for
// type and range when read, with an error naming the key as written and where it came from;
// an unknown key is an error. `verlcpp train --help` prints the table (train_config_help()).
#pragma once
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "cli/tasks.h"
#include "cli/train.h"
#include "dist/comm.h"
#include "engine/engine_config.h"

namespace verl {

struct TrainSettings {
  const TaskSpec* task = nullptr;
  std::string model_path, hf_config_path;  // as given (resolved to local folders by the runner)
  // data
  std::string train_files;
  int64_t train_batch_size = 8;
  bool shuffle = true;
  int64_t seed = 1;
  // trainer
  int64_t total_training_steps = 10, save_freq = -1, stop_after_steps = -1;
  int max_ckpt_to_keep = -1;
  std::string ckpt_dir, resume_mode, resume_from_path, metrics_file;
  CommOptions comm;
  int num_threads = 0;
  // the trained model
  EngineConfig engine;  // model paths left empty
  LossSettings loss;
  nlohmann::json effective;  // every setting of this job by its verl path (stored in checkpoints)
};

// Reads, checks and resolves the settings; throws an Error naming the offending key.
TrainSettings load_train_settings(const TrainArgs& a);

// train_config_help() (declared in train.h) is defined in train_config.cpp.

}  // namespace verl
