// logprob.h — `verlcpp logprob`: score a batch of token sequences with a HF model and write
// per-token log-probs (and entropy) or values to a safetensors file. Torch-free header so
// main.cpp compiles without libtorch includes; logprob.cpp registers the flags and runs it.
#pragma once
#include <CLI/CLI.hpp>
#include <cstdint>
#include <string>

namespace verl {

struct LogprobOptions {
  std::string model;           // path: local folder, file://, hdfs://, or HF model id
  std::string hf_config_path;  // defaults to model
  std::string cache_dir;       // copies of remote paths (default $VERLCPP_CACHE or ~/.cache/verlcpp)
  std::string batch, out;
  bool entropy = false;
  double temperature = 1.0;
  int micro_batch_size = 0;    // fixed micro-batches
  int64_t max_token_len = 0;   // dynamic batching by token budget
  std::string dtype = "fp32";
  std::string device = "cpu";  // cpu | cuda | cuda:N
  int threads = 0;             // 0: libtorch default
  int sp = 1;                  // ulysses_sequence_parallel_size (under mpirun)
  bool quiet = false;
};

// Registers the subcommand's flags into `o`.
CLI::App* add_logprob_subcommand(CLI::App& app, LogprobOptions& o);
// Validates the input file, resolves the model's local paths, builds it, runs infer_batch and
// writes the outputs to a temporary file that is renamed into place.
int run_logprob(const LogprobOptions& o);
// Checks that need no model: --out must not be the --batch file (by device + inode, so a
// symlink or hard link counts). Throws Error.
void check_logprob_options(const LogprobOptions& o);

}  // namespace verl
