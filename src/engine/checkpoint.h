// checkpoint.h — the engine's sharded checkpoints in verl's folder layout
// (verl/utils/checkpoint/fsdp_checkpoint_manager.py):
//
//   <dir>/latest_checkpointed_iteration.txt        the newest complete step, replaced atomically
//   <dir>/global_step_N/<role>/                    role: actor | critic
//       model_world_size_W_rank_r.pt               this rank's fp32 flat shard of every unit
//       optim_world_size_W_rank_r.pt               AdamW state of those shards
//       extra_state_world_size_W_rank_r.pt         LR scheduler, global_step, the caller's JSON
//       fsdp_config.json                           world size + the flat-unit table (for the merger)
//       huggingface/                               config, generation config, tokenizer
//
// Each .pt file is a plain dict written as torch.save writes one (a zip with data.pkl and one
// record per storage, no libtorch type tags), so `torch.load(path)` reads it with its default
// weights_only=True. Each also holds the int64 [3] tensor kRankWorldStepKey = {rank, world_size,
// step}; loading checks it against the file's name, the folder's step and the job, so a rank
// file copied over another is refused. FsdpEngine::save_checkpoint / load_checkpoint (declared
// in fsdp_engine.h) are defined in checkpoint.cpp.
#pragma once
#include <cstdint>
#include <string>

namespace verl {

// {rank, world_size, step} of the file, in every model_/optim_/extra_state_ file. The merger
// reads the same key (it is not a model parameter).
inline constexpr const char* kRankWorldStepKey = "_verlcpp.rank_world_step";

// "<kind>_world_size_<W>_rank_<r>.pt", kind: model | optim | extra_state.
std::string rank_file_name(const std::string& kind, int world_size, int rank);
// <dir>/global_step_<step>/<role>
std::string checkpoint_role_dir(const std::string& dir, int64_t step, const std::string& role);
// The step in <dir>/latest_checkpointed_iteration.txt, or -1 when the file does not exist.
// Anything but a non-negative integer (surrounding whitespace allowed) is an Error naming the file.
int64_t read_latest_checkpoint_step(const std::string& dir);

}  // namespace verl
