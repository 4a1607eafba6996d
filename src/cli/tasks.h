// tasks.h — what `verlcpp train` can train, as a small registry (torchtitan's registered
// components instead of an if-chain): each task names the per-token data fields its loss
// reads, the model role it trains (actor or critic: its config section, checkpoint folder and
// metric prefix), whether that model is a value model or a causal LM, and builds its LossFn
// for FsdpEngine::train_batch. The losses are verl's (engine/losses.h).
#pragma once
#include <functional>
#include <string>
#include <vector>

#include "engine/fsdp_engine.h"

namespace verl {

// The loss settings of the trained role (actor: PPO; critic: value clip and aggregation).
struct LossSettings {
  PpoLossConfig ppo;
  double cliprange_value = 0.5;
};

struct TaskSpec {
  std::string name;
  std::string role;   // "actor" | "critic"
  bool value_model;   // ...ForTokenClassification with num_labels = 1, else ...ForCausalLM
  std::string help;
  // Per-token fields of the data file the loss reads, besides input_ids and loss_mask.
  std::function<std::vector<std::string>(const LossSettings&)> fields;
  std::function<bool(const LossSettings&)> needs_entropy;
  std::function<LossFn(const LossSettings&)> make_loss;
};

const std::vector<TaskSpec>& tasks();
// The task of that name; an Error listing the tasks otherwise.
const TaskSpec& find_task(const std::string& name);

}  // namespace verl
