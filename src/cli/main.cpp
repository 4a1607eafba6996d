// main.cpp — the `verlcpp` binary: subcommands over the library. Every failure is one
// line on stderr ("verlcpp: error: ...") and a non-zero exit; never a stack dump.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <exception>
#include <string>

#include "core/error.h"
#include "merge/merger.h"
#ifdef VERLCPP_WITH_TORCH
#include <c10/util/Exception.h>

#include "cli/logprob.h"
#include "cli/train.h"
#include "dist/comm.h"
#endif

namespace {

void add_merge(CLI::App& app, verl::MergeOptions& o, std::string& op, std::string& max_shard, double& alpha) {
  CLI::App* m = app.add_subcommand(
      "merge",
      "Merge a sharded verl checkpoint into a HuggingFace folder (safetensors), or compare it with a reference.\n"
      "  verlcpp merge --backend fsdp --local_dir CKPT/global_step_N/actor --target_dir OUT\n"
      "  verlcpp merge test --backend fsdp --local_dir CKPT --test_hf_dir REF\n"
      "  verlcpp merge --backend megatron --local_dir CKPT/global_step_N/actor --target_dir OUT   (no GPU needed)");
  m->add_option("operation", op, "merge (default) or test, as in `python -m verl.model_merger {merge,test}`")
      ->check(CLI::IsMember({"merge", "test"}));
  m->add_option("--backend", o.backend, "Checkpoint backend: fsdp, or megatron (Megatron-Core torch_dist / PyTorch DCP)")->check(CLI::IsMember({"fsdp", "megatron"}))->required();
  m->add_option("--local_dir", o.local_dir, "Checkpoint folder (e.g. .../global_step_N/actor; megatron: it, its model/dist_ckpt, or a dist_ckpt folder)")->required();
  m->add_option("--target_dir", o.target_dir, "Output HuggingFace folder (written atomically)");
  m->add_option("--hf_model_config_path", o.hf_config_dir, "Folder with config.json and tokenizer (default: LOCAL_DIR/huggingface; megatron: LOCAL_DIR/model/huggingface, then LOCAL_DIR/huggingface)");
  m->add_flag("--tie-word-embedding", o.tie_word_embedding,
              "Tie the output embedding to the input one: no lm_head.weight is written (also taken from config.json)");
  m->add_flag("--is-value-model", o.is_value_model, "The checkpoint is a value model (critic); its head is kept as saved (megatron: output_layer becomes score.weight)");
  m->add_flag("--trust-remote-code", o.trust_remote_code, "Copy custom model code (*.py named by auto_map) into the output");
  m->add_flag("--use_cpu_initialization", o.use_cpu_initialization, "Accepted for compatibility: the merger always runs on the CPU");
  m->add_option("--hf_upload_path", o.hf_upload_path, "Hub repository to upload to (not possible offline: the path to upload is printed)");
  m->add_flag("--private", o.is_private, "Accepted for compatibility with --hf_upload_path");
  m->add_option("--dtype", o.dtype,
                "Output dtype of floating tensors: auto (config.json's dtype, else bf16), bf16, fp16, fp32")
      ->check(CLI::IsMember({"auto", "bf16", "fp16", "fp32", "bfloat16", "float16", "float32"}))
      ->capture_default_str();
  m->add_option("--max-shard-size", max_shard, "Largest output file, e.g. 5GB, 500MB, 2GiB")->capture_default_str();
  m->add_option("--threads", o.threads, "Reader threads (default: cores, at most 8)")->check(CLI::Range(0, 256));
  m->add_flag("--overwrite", o.overwrite, "Replace a non-empty target folder (only once the new one is complete)");
  m->add_flag("--fuse-lora", o.fuse_lora, "Write base weights with the LoRA adapter merged in: W + (alpha/r)·B·A");
  m->add_option("--lora-alpha", alpha, "LoRA alpha when lora_train_meta.json lacks it (never silently 0)");
  m->add_flag("--quiet,-q", o.quiet, "No progress or summary output");
  m->add_flag("--test", o.test, "Compare with --test_hf_dir instead of writing (same as the 'test' operation)");
  m->add_option("--test_hf_dir", o.test_hf_dir, "Reference HuggingFace folder for --test");
  m->add_option("--atol", o.atol, "Absolute tolerance for --test")->capture_default_str();
  m->add_option("--rtol", o.rtol, "Relative tolerance for --test")->capture_default_str();
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "verlcpp — the trainer side of verl in C++.\n"
      "Subcommands:\n"
      "  merge   sharded verl FSDP or Megatron checkpoint -> HuggingFace safetensors folder (or compare with a reference)\n"
#ifdef VERLCPP_WITH_TORCH
      "  logprob per-token log-probs / entropy / values of packed sequences with a HF model\n"
      "  train   SFT / PPO (GRPO) policy / value training, FSDP-sharded over MPI ranks (mpirun -np N verlcpp train ...)\n"
#endif
      "Run `verlcpp <subcommand> --help` for its flags."};
  app.require_subcommand(1);
  app.set_help_all_flag("--help-all", "Help for every subcommand");
  verl::MergeOptions mo;
  std::string op = "merge", max_shard = "5GB";
  double alpha = -1;
  add_merge(app, mo, op, max_shard, alpha);
#ifdef VERLCPP_WITH_TORCH
  verl::LogprobOptions lo;
  verl::add_logprob_subcommand(app, lo);
  verl::TrainArgs ta;
  CLI::App* tr = app.add_subcommand(
      "train",
      "Train with the FSDP engine: SFT, a PPO/GRPO policy update or a value update.\n"
      "  mpirun -np N build/verlcpp train --config FILE.yaml [key=value ...]\n"
      "Without mpirun it runs as one process. Keys are verl's config paths, scoped as verl scopes them.\n\n" +
          verl::train_config_help());
  tr->add_option("--config", ta.config_file, "YAML config file")->check(CLI::ExistingFile);
  tr->add_option("overrides", ta.overrides, "key=value overrides (after the config file)");
#endif
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    if (app.got_subcommand("merge")) {
      if (op == "test") mo.test = true;
      mo.max_shard_size = verl::parse_size(max_shard);
      if (alpha >= 0) mo.lora_alpha = alpha;
      return verl::run_merge(mo);
    }
#ifdef VERLCPP_WITH_TORCH
    if (app.got_subcommand("logprob")) {
      verl::check_logprob_options(lo);
      return verl::run_logprob(lo);
    }
    if (app.got_subcommand("train")) return verl::run_train(ta);
#endif
  } catch (const verl::Error& e) {
    std::fprintf(stderr, "verlcpp: error: %s\n", e.what());
#ifdef VERLCPP_WITH_TORCH
    verl::abort_comm(2);  // other ranks would wait for this one in their next collective
#endif
    return 2;
  }
#ifdef VERLCPP_WITH_TORCH
  catch (const c10::Error& e) {  // one line, no libtorch backtrace
    const std::string m = e.what_without_backtrace();
    std::fprintf(stderr, "verlcpp: error: libtorch: %s\n", m.substr(0, m.find('\n')).c_str());
    verl::abort_comm(2);
    return 2;
  }
#endif
  catch (const std::exception& e) {
    std::fprintf(stderr, "verlcpp: error: %s\n", e.what());
#ifdef VERLCPP_WITH_TORCH
    verl::abort_comm(3);
#endif
    return 3;
  }
  return 0;
}
