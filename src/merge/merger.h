// merger.h — `verlcpp merge`: a checkpoint source → a HuggingFace folder (or a comparison
// with a reference folder). Streams one tensor at a time: a reader assembles tensor i+1
// while a writer thread appends tensor i, so at most two output tensors are in memory.
#pragma once
#include <cstdint>
#include <optional>
#include <string>

namespace verl {

struct MergeOptions {
  std::string backend = "fsdp";
  std::string local_dir;
  std::string target_dir;
  std::string hf_config_dir;  // default: <local_dir>/huggingface
  bool tie_word_embedding = false;
  bool is_value_model = false;
  bool trust_remote_code = false;
  bool use_cpu_initialization = false;
  std::string hf_upload_path;
  bool is_private = false;
  std::string dtype = "auto";  // auto | bf16 | fp16 | fp32
  uint64_t max_shard_size = 5'000'000'000ull;
  int threads = 0;  // 0: hardware concurrency (at most 8)
  bool overwrite = false;
  bool fuse_lora = false;
  std::optional<double> lora_alpha;
  bool quiet = false;
  // test mode
  bool test = false;
  std::string test_hf_dir;
  double atol = 1e-6, rtol = 1e-6;
};

// Runs the merge (or test); returns the process exit code. Throws Error on bad input.
int run_merge(const MergeOptions& opt);

// "5GB" -> 5e9, "2GiB" -> 2^31, "500MB", "123" (bytes). Throws Error on junk.
uint64_t parse_size(const std::string& s);

}  // namespace verl
