// logprob.cpp — `verlcpp logprob` (see logprob.h): the subcommand's flags, then the runner:
// validate the input file, resolve the model's local paths, build it, run infer_batch, write
// the outputs to a temporary file and rename. One process: the dense model. Under mpirun:
// verl's FSDP engine forward only (FsdpEngine::infer_batch, as verl's compute_log_prob), with
// data-parallel groups and optional Ulysses sequence parallelism; rank 0 writes the file. Built only with VERLCPP_WITH_TORCH.
#ifdef VERLCPP_WITH_TORCH
#include "cli/logprob.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>

#include "core/error.h"
#include "dist/comm.h"
#include "engine/forward_step.h"
#include "engine/fsdp_engine.h"
#include "cli/multi_modal.h"
#include "hf/config.h"
#include "io/safetensors.h"
#include "hf/paths.h"

#include "io/output.h"

namespace verl {

namespace {

Batch read_batch(const std::string& path) {
  SafetensorsReader r(path);
  for (const auto& t : r.tensors())
    if (t.name != "input_ids" && t.name != "cu_seqlens" && t.name != "temperature" && t.name != "pixel_values" &&
        t.name != "image_grid_thw" && t.name != "pixel_values_videos" && t.name != "video_grid_thw" &&
        t.name != "second_per_grid_ts")
      fail(path, ": unexpected tensor '", t.name,
           "' (expected input_ids, cu_seqlens and optionally temperature, pixel_values, image_grid_thw, "
           "pixel_values_videos, video_grid_thw, second_per_grid_ts)");
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
    at::Tensor c = t.contiguous().cpu();
    w.write(c.data_ptr(), c.numel() * sizeof(float));
  }
  w.finish(false);
  claim.commit();
}

}  // namespace

// This rank's outputs of its data-parallel group's samples → every group's, in sample order, on
// every rank: all-gather the sizes, then the values padded to the largest (groups in rank order;
// the first rank of each sequence-parallel group speaks for it).
at::Tensor gather_groups(Comm& world, int sp, const at::Tensor& mine) {
  std::vector<int64_t> sizes(world.size());
  int64_t n = mine.numel();
  world.all_gather(&n, sizes.data(), 1, DType::I64);
  const int64_t most = *std::max_element(sizes.begin(), sizes.end());
  at::Tensor send = at::zeros({most}, at::kFloat);
  send.narrow(0, 0, n).copy_(mine);
  at::Tensor all = at::empty({most * world.size()}, at::kFloat);
  world.all_gather(send.data_ptr(), all.data_ptr(), static_cast<size_t>(most), DType::F32);
  std::vector<at::Tensor> parts;
  for (int r = 0; r < world.size(); r += sp) parts.push_back(all.narrow(0, r * most, sizes[r]));
  return at::cat(parts);
}

int run_logprob(const LogprobOptions& o) {
  if (o.micro_batch_size > 0 && o.max_token_len > 0) fail("--micro-batch-size and --max-token-len are exclusive");
  if (o.micro_batch_size < 0) fail("--micro-batch-size must be positive");
  if (o.max_token_len < 0) fail("--max-token-len must be positive");
  if (!(o.temperature > 0)) fail("--temperature must be positive, got ", o.temperature);
  if (o.sp < 1) fail("--ulysses-sequence-parallel-size must be >= 1, got ", o.sp);
  if (o.threads > 0) at::set_num_threads(o.threads);
  at::ScalarType dtype = parse_engine_dtype(o.dtype);
  // Under mpirun (or with sequence parallelism) the ranks share the work: the FSDP engine,
  // forward only, data-parallel groups of --ulysses-sequence-parallel-size ranks each.
  std::unique_ptr<Comm> world;
  // Checked before any work: the device's name, and that it is there (CUDA loaded on demand).
  (void)parse_engine_device(o.device);
  if (o.sp > 1 || launched_by_mpi()) {
    CommOptions co;
    if (o.device != "cpu" && launched_by_mpi()) co.backend = "nccl";  // device tensors over NCCL
    world = make_comm(co);
    if (world->size() % o.sp != 0)
      fail("--ulysses-sequence-parallel-size ", o.sp, " must divide the number of ranks (", world->size(),
           o.sp > 1 && world->size() == 1 ? "; start the ranks with mpirun -np N)" : ")");
  }
  const bool lead = !world || world->rank() == 0;
  auto t0 = std::chrono::steady_clock::now();
  Batch batch = read_batch(o.batch);
  ModelPaths paths = resolve_model_paths(o.model, o.hf_config_path, "", o.cache_dir);
  // The output is claimed before any model work: a concurrent run on the same --out, or an --out
  // that is one of the inputs, fails here; an interrupted run leaves no partial file.
  std::unique_ptr<OutputClaim> claim;
  if (lead)
    claim = std::make_unique<OutputClaim>(o.out, OutputClaim::Options{OutputClaim::Kind::File, /*overwrite=*/true,
                                                                      {o.batch, paths.local_path, paths.local_hf_config_path}, "--out"});
  const ModelConfig mc = load_model_config(paths.local_hf_config_path);
  {  // a vision-language model's images (cli/multi_modal.h): verl's per-sample multi_modal_inputs
    SafetensorsReader r(o.batch);
    if (has_multi_modal(r)) {
      const Jagged& ids = batch.sequences.at("input_ids");
      batch.tensor_dicts["multi_modal_inputs"] = read_multi_modal(r, ids.values, ids.offsets, mc);
    }
  }
  const bool value_model = mc.head == Head::TokenClassification;
  if (o.entropy && value_model) fail("--entropy: ", mc.architecture, " is a value model (no vocabulary)");
  SampleOutputs so;
  size_t micro_batches = 0;
  std::chrono::steady_clock::time_point t1;
  if (!world) {
    auto model = Transformer::load(paths.local_hf_config_path, paths.local_path, dtype, o.device);
    t1 = std::chrono::steady_clock::now();
    InferOptions io;
    io.calculate_entropy = o.entropy;
    io.temperature = o.temperature;
    io.micro.micro_batch_size = o.micro_batch_size;
    io.micro.max_token_len = o.max_token_len;
    Partitions parts;
    so = infer_batch(*model, batch, io, &parts);
    micro_batches = parts.size();
  } else {
    try {
      check_ulysses(mc, o.sp);
    } catch (const Error& e) {
      fail("--ulysses-sequence-parallel-size: ", e.what());
    }
    const int dp = world->size() / o.sp;
    const int64_t B = batch.size();
    if (B % dp != 0)
      fail("--batch: its ", B, " sequences must split evenly over the ", dp, " data-parallel groups (ranks / sp)");
    EngineConfig ec;
    ec.model_path = paths.local_path;
    ec.hf_config_path = paths.local_hf_config_path;
    ec.param_dtype = o.dtype;
    ec.device = o.device;
    ec.forward_only = true;
    ec.temperature = o.temperature;
    ec.ulysses_sequence_parallel_size = o.sp;
    ec.micro_batch_size_per_gpu = o.micro_batch_size > 0 ? o.micro_batch_size : static_cast<int>(B / dp);
    ec.use_dynamic_bsz = o.max_token_len > 0;
    if (ec.use_dynamic_bsz) ec.max_token_len_per_gpu = o.max_token_len;
    FsdpEngine engine(ec, *world);
    t1 = std::chrono::steady_clock::now();
    std::vector<int> mine;
    for (int64_t i = engine.dp_rank() * (B / dp); i < (engine.dp_rank() + 1) * (B / dp); ++i) mine.push_back(static_cast<int>(i));
    const SampleOutputs part = engine.infer_batch(batch.select(mine), o.entropy);
    const std::vector<int64_t> offsets = batch.sequences.at("input_ids").offsets;
    auto whole = [&](const Jagged& j) { return Jagged{gather_groups(*world, o.sp, j.values), offsets}; };
    if (value_model) so.values = whole(part.values);
    else so.log_probs = whole(part.log_probs);
    if (o.entropy) so.entropy = whole(part.entropy);
  }
  auto t2 = std::chrono::steady_clock::now();
  if (lead) {
    std::vector<std::pair<std::string, at::Tensor>> outs;
    if (value_model) {
      outs.push_back({"values", so.values.values});
    } else {
      outs.push_back({"log_probs", so.log_probs.values});
      if (o.entropy) outs.push_back({"entropy", so.entropy.values});
    }
    write_outputs(*claim, outs);
  }
  if (lead && !o.quiet) {
    const int64_t nnz = batch.sequences["input_ids"].offsets.back();
    double load_s = std::chrono::duration<double>(t1 - t0).count(), run_s = std::chrono::duration<double>(t2 - t1).count();
    std::string how = world ? ", " + std::to_string(world->size()) + " ranks (sp " + std::to_string(o.sp) + ")" : "";
    if (world) std::fprintf(stderr, "verlcpp logprob: %lld sequences, %lld tokens%s, load %.2fs, forward %.2fs (%.0f tokens/s)\n",
                            (long long)batch.size(), (long long)nnz, how.c_str(), load_s, run_s, nnz / std::max(run_s, 1e-9));
    else std::fprintf(stderr, "verlcpp logprob: %lld sequences, %lld tokens, %zu micro-batches, load %.2fs, forward %.2fs (%.0f tokens/s)\n",
                      (long long)batch.size(), (long long)nnz, micro_batches, load_s, run_s, nnz / std::max(run_s, 1e-9));
  }
  if (world) {
    world->barrier();
    world.reset();
    finalize_comm();
  }
  return 0;
}

CLI::App* add_logprob_subcommand(CLI::App& app, LogprobOptions& o) {
  CLI::App* c = app.add_subcommand(
      "logprob",
      "Per-token log-probs (and entropy), or values for a value model, of packed sequences.\n"
      "  verlcpp logprob --model PATH --batch IN.safetensors --out OUT.safetensors [--entropy]\n"
      "IN: input_ids (I64, 1-D, sequences concatenated), cu_seqlens (I64, B+1), optional temperature (F32, B);\n"
      "    vision-language models: pixel_values (float, [patches, C*T*P*P]) and image_grid_thw (I64, [images, 3]);\n"
      "    videos: pixel_values_videos, video_grid_thw and optionally second_per_grid_ts (F32, [videos]).\n"
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
  c->add_option("--device", o.device, "Where the model computes: cpu, cuda (the current GPU; under mpirun each rank's "
                "local-rank GPU, collectives over NCCL) or cuda:N")->capture_default_str();
  c->add_option("--ulysses-sequence-parallel-size,--sp", o.sp,
                "Ulysses sequence parallelism under mpirun: groups of N ranks share each micro-batch, a slice of "
                "the row each; the batch splits over ranks / N data-parallel groups (a multiple of N ranks)")
      ->capture_default_str();
  c->add_option("--threads", o.threads, "CPU threads (default: libtorch's choice)")->check(CLI::Range(0, 1024));
  c->add_flag("--quiet,-q", o.quiet, "No summary line");
  return c;
}

void check_logprob_options(const LogprobOptions& o) { refuse_same_file(o.out, "--out", o.batch, "--batch"); }

}  // namespace verl
#endif
