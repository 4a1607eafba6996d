// logprob.cpp (cli) — registers the `verlcpp logprob` subcommand's flags. Built only with
// VERLCPP_WITH_TORCH; the work is done by verl::run_logprob (src/engine/logprob.cpp).
#ifdef VERLCPP_WITH_TORCH
#include "cli/logprob.h"

#include <CLI/CLI.hpp>

#include "io/output.h"

namespace verl {

CLI::App* add_logprob_subcommand(CLI::App& app, LogprobOptions& o) {
  CLI::App* c = app.add_subcommand(
      "logprob",
      "Per-token log-probs (and entropy), or values for a value model, of packed sequences.\n"
      "  verlcpp logprob --model PATH --batch IN.safetensors --out OUT.safetensors [--entropy]\n"
      "IN: input_ids (I64, 1-D, sequences concatenated), cu_seqlens (I64, B+1), optional temperature (F32, B).\n"
      "OUT: log_probs (F32, like input_ids; position t = log p(token t+1 | <= t), 0 at each sequence's end),\n"
      "     entropy with --entropy; values (F32) for a value model.");
  c->add_option("--model", o.model, "HF model: local folder, file://, hdfs:// (copied to the cache) or an HF id in the offline cache")->required();
  c->add_option("--hf-config-path", o.hf_config_path, "Where config.json comes from (default: --model)");
  c->add_option("--cache-dir", o.cache_dir, "Cache for copies of remote paths (default: $VERLCPP_CACHE or ~/.cache/verlcpp)");
  c->add_option("--batch", o.batch, "Input safetensors file")->required();
  c->add_option("--out", o.out, "Output safetensors file (written to a temporary file, then renamed)")->required();
  c->add_flag("--entropy", o.entropy, "Also write per-token entropy");
  c->add_option("--temperature", o.temperature, "Softmax temperature when IN has no per-sequence 'temperature'")->capture_default_str();
  auto* mbs = c->add_option("--micro-batch-size", o.micro_batch_size, "Fixed micro-batches of N sequences");
  auto* mtl = c->add_option("--max-token-len", o.max_token_len, "Dynamic micro-batches of at most N tokens (balanced as verl)");
  mbs->excludes(mtl);
  mtl->excludes(mbs);
  c->add_option("--dtype", o.dtype, "Engine dtype: fp32 or bf16")->check(CLI::IsMember({"fp32", "bf16", "float32", "bfloat16"}))->capture_default_str();
  c->add_option("--threads", o.threads, "CPU threads (default: libtorch's choice)")->check(CLI::Range(0, 1024));
  c->add_flag("--quiet,-q", o.quiet, "No summary line");
  return c;
}

void check_logprob_options(const LogprobOptions& o) { refuse_same_file(o.out, "--out", o.batch, "--batch"); }

}  // namespace verl
#endif
