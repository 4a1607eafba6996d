// logprob.cpp — `verlcpp logprob` (see logprob.h): the subcommand's flags, then the runner:
// validate the input file, resolve the model's local paths, build it, run infer_batch, write
// the outputs to a temporary file and rename. Built only with VERLCPP_WITH_TORCH.
#ifdef VERLCPP_WITH_TORCH
#include "cli/logprob.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>

#include "engine/forward_step.h"
#include "core/error.h"
#include "io/safetensors.h"
#include "hf/paths.h"

#include "io/output.h"

namespace verl {

namespace {

Batch read_batch(const std::string& path) {
  SafetensorsReader r(path);
  for (const auto& t : r.tensors())
    if (t.name != "input_ids" && t.name != "cu_seqlens" && t.name != "temperature")
      fail(path, ": unexpected tensor '", t.name, "' (expected input_ids, cu_seqlens and optionally temperature)");
  const StTensor* ids = r.find("input_ids");
  const StTensor* cu = r.find("cu_seqlens");
  if (!ids) fail(path, ": missing tensor 'input_ids' (int64, 1-D, all sequences concatenated)");
  if (!cu) fail(path, ": missing tensor 'cu_seqlens' (int64, B+1 offsets)");
  if (ids->dtype != DType::I64 || ids->shape.size() != 1)
    fail(path, ": 'input_ids' must be a 1-D I64 tensor, found ", dtype_st_name(ids->dtype), " with ", ids->shape.size(), " dims");
  if (cu->dtype != DType::I64 || cu->shape.size() != 1 || cu->shape[0] < 2)
    fail(path, ": 'cu_seqlens' must be a 1-D I64 tensor of B+1 >= 2 offsets");
  const int64_t nnz = ids->shape[0], B = cu->shape[0] - 1;
  std::vector<int64_t> off(B + 1);
  std::memcpy(off.data(), r.data(*cu), cu->nbytes());
  if (off[0] != 0) fail(path, ": cu_seqlens[0] must be 0, found ", off[0]);
  for (int64_t i = 0; i < B; ++i)
    if (off[i + 1] <= off[i]) fail(path, ": cu_seqlens must be strictly increasing (sequence ", i, " is empty or negative)");
  if (off[B] != nnz) fail(path, ": cu_seqlens ends at ", off[B], " but input_ids has ", nnz, " tokens");
  at::Tensor values = at::empty({nnz}, at::kLong);
  std::memcpy(values.data_ptr(), r.data(*ids), ids->nbytes());
  Batch b;
  b.sequences["input_ids"] = Jagged{values, off};
  if (const StTensor* t = r.find("temperature")) {
    if (t->dtype != DType::F32 || t->shape.size() != 1 || t->shape[0] != B)
      fail(path, ": 'temperature' must be F32 with shape [", B, "], one per sequence");
    at::Tensor temp = at::empty({B}, at::kFloat);
    std::memcpy(temp.data_ptr(), r.data(*t), t->nbytes());
    if (!(temp > 0).all().item<bool>()) fail(path, ": 'temperature' values must be positive");
    b.tensors["temperature"] = temp;
  }
  return b;
}

// Writes the outputs to the claim's temporary file and publishes it (io/output.h).
void write_outputs(OutputClaim& claim, const std::vector<std::pair<std::string, at::Tensor>>& outs) {
  std::vector<StSpec> specs;
  for (const auto& [name, t] : outs) specs.push_back({name, DType::F32, {t.size(0)}});
  SafetensorsWriter w(claim.temp(), specs);
  for (const auto& [name, t] : outs) {
    at::Tensor c = t.contiguous();
    w.write(c.data_ptr(), c.numel() * sizeof(float));
  }
  w.finish(false);
  claim.commit();
}

}  // namespace

int run_logprob(const LogprobOptions& o) {
  if (o.micro_batch_size > 0 && o.max_token_len > 0) fail("--micro-batch-size and --max-token-len are exclusive");
  if (o.micro_batch_size < 0) fail("--micro-batch-size must be positive");
  if (o.max_token_len < 0) fail("--max-token-len must be positive");
  if (!(o.temperature > 0)) fail("--temperature must be positive, got ", o.temperature);
  if (o.threads > 0) at::set_num_threads(o.threads);
  at::ScalarType dtype = parse_engine_dtype(o.dtype);
  auto t0 = std::chrono::steady_clock::now();
  Batch batch = read_batch(o.batch);
  ModelPaths paths = resolve_model_paths(o.model, o.hf_config_path, "", o.cache_dir);
  // The output is claimed before any model work: a concurrent run on the same --out, or an --out
  // that is one of the inputs, fails here; an interrupted run leaves no partial file.
  OutputClaim claim(o.out, {OutputClaim::Kind::File, /*overwrite=*/true,
                            {o.batch, paths.local_path, paths.local_hf_config_path}, "--out"});
  auto model = Transformer::load(paths.local_hf_config_path, paths.local_path, dtype);
  auto t1 = std::chrono::steady_clock::now();
  InferOptions io;
  io.calculate_entropy = o.entropy;
  io.temperature = o.temperature;
  io.micro.micro_batch_size = o.micro_batch_size;
  io.micro.max_token_len = o.max_token_len;
  Partitions parts;
  SampleOutputs so = infer_batch(*model, batch, io, &parts);
  auto t2 = std::chrono::steady_clock::now();
  std::vector<std::pair<std::string, at::Tensor>> outs;
  if (model->is_value_model()) {
    if (o.entropy) fail("--entropy: ", model->config().architecture, " is a value model (no vocabulary)");
    outs.push_back({"values", so.values.values});
  } else {
    outs.push_back({"log_probs", so.log_probs.values});
    if (o.entropy) outs.push_back({"entropy", so.entropy.values});
  }
  write_outputs(claim, outs);
  if (!o.quiet) {
    const int64_t nnz = batch.sequences["input_ids"].offsets.back();
    double load_s = std::chrono::duration<double>(t1 - t0).count(), run_s = std::chrono::duration<double>(t2 - t1).count();
    std::fprintf(stderr, "verlcpp logprob: %lld sequences, %lld tokens, %zu micro-batches, load %.2fs, forward %.2fs (%.0f tokens/s)\n",
                 (long long)batch.size(), (long long)nnz, parts.size(), load_s, run_s, nnz / std::max(run_s, 1e-9));
  }
  return 0;
}

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
