// train.cpp — the `verlcpp train` runner (see train.h). Stages: the settings
// (train_config.h); every check that needs no model — the engine config against the world,
// the model's config.json against the task, the data file (dataset.h), the resume point; then
// the engine, resume, and the loop: each step one FsdpEngine::train_batch on this rank's part
// of the global batch, the metrics logger, a checkpoint every save_freq steps and at the end.
#ifdef VERLCPP_WITH_TORCH
#include "cli/train.h"

#include <ATen/Parallel.h>
#include <malloc.h>
#include <sys/resource.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <thread>

#include "cli/dataset.h"
#include "cli/metrics.h"
#include "cli/multi_modal.h"
#include "cli/train_config.h"
#include "dist/comm.h"
#include "engine/checkpoint.h"
#include "engine/fsdp_engine.h"
#include "core/error.h"
#include "hf/config.h"
#include "hf/paths.h"
#include "io/safetensors.h"

namespace verl {

namespace fs = std::filesystem;

namespace {

// Training frees and re-allocates the same large activation and parameter buffers every
// micro-batch; glibc would return them to the kernel and fault fresh zeroed pages back in
// each time. Keep freed memory in the heap instead (unless the user tuned malloc).
void keep_freed_memory() {
  if (std::getenv("MALLOC_TRIM_THRESHOLD_") || std::getenv("MALLOC_MMAP_THRESHOLD_")) return;
  ::mallopt(M_MMAP_THRESHOLD, 1 << 30);
  ::mallopt(M_TRIM_THRESHOLD, 1 << 30);
  ::mallopt(M_TOP_PAD, 1 << 30);
}

// 0: the node's cores shared by the ranks on this node.
void set_threads(int n) {
  if (n <= 0) {
    const char* local = std::getenv("OMPI_COMM_WORLD_LOCAL_SIZE");
    if (!local) local = std::getenv("SLURM_NTASKS_PER_NODE");
    const int per_node = local ? std::max(1, std::atoi(local)) : 1;
    n = std::max(1, static_cast<int>(std::thread::hardware_concurrency()) / per_node);
  }
  at::set_num_threads(n);
}

// What the job runs on, checked before any model work.
struct Prepared {
  EngineConfig engine;     // with the model's local folders
  Dataset data;
  std::string resume_dir;  // "": from scratch
};

std::string find_resume_dir(const TrainSettings& s) {
  const std::string& role = s.task->role;
  if (s.resume_mode == "disable") return "";
  if (s.resume_mode == "auto") {
    const int64_t step = read_latest_checkpoint_step(s.ckpt_dir);
    if (step < 0) return "";
    const std::string d = checkpoint_role_dir(s.ckpt_dir, step, role);
    if (!fs::is_directory(d))
      fail((fs::path(s.ckpt_dir) / "latest_checkpointed_iteration.txt").string(), ": names step ", step, " but ", d,
           " does not exist");
    return d;
  }
  const fs::path p = s.resume_from_path;
  if (fs::is_directory(p / role)) return (p / role).string();
  if (fs::exists(p / "fsdp_config.json")) return p.string();
  fail("trainer.resume_from_path ", p.string(), ": no ", role, "/ checkpoint folder in it");
}

void check_model_kind(const TaskSpec& t, const ModelConfig& mc, const std::string& dir) {
  const bool value = mc.head == Head::TokenClassification;
  if (t.value_model && (!value || mc.num_labels != 1))
    fail("task ", t.name, " needs a value model (...ForTokenClassification with num_labels=1), ", dir, " holds a ",
         mc.architecture, value ? " with num_labels=" + std::to_string(mc.num_labels) : std::string());
  if (!t.value_model && value)
    fail("task ", t.name, " needs a causal LM, ", dir, " holds a value model (", mc.architecture, "): use task=value");
}

Prepared prepare(const TrainSettings& s, int world) {
  Prepared p;
  const ModelPaths paths = resolve_model_paths(s.model_path, s.hf_config_path, "");
  p.engine = s.engine;
  p.engine.model_path = paths.local_path;
  p.engine.hf_config_path = paths.local_hf_config_path;
  try {
    validate(p.engine, world);
  } catch (const Error& e) {
    fail("config: ", e.what());
  }
  const int sp = s.engine.ulysses_sequence_parallel_size, dp = world / sp;
  if (s.train_batch_size % dp != 0)
    fail("config key data.train_batch_size: ", s.train_batch_size, " must be a positive multiple of the ", dp,
         sp > 1 ? " data-parallel groups (ranks / ulysses_sequence_parallel_size)" : " ranks");
  const ModelConfig mc = load_model_config(paths.local_hf_config_path);
  check_model_kind(*s.task, mc, paths.local_hf_config_path);
  try {
    check_ulysses(mc, sp);
  } catch (const Error& e) {
    fail("config: ", e.what());
  }
  p.data = load_dataset(s.train_files, s.task->fields(s.loss), mc.vocab_size);
  {  // a vision-language model's images (cli/multi_modal.h): verl's per-sample multi_modal_inputs
    SafetensorsReader r(s.train_files);
    if (has_multi_modal(r)) p.data.multi_modal = read_multi_modal(r, p.data.input_ids, p.data.cu, mc);
  }
  if (s.train_batch_size > p.data.size())
    fail("config key data.train_batch_size: ", s.train_batch_size, " exceeds the ", p.data.size(), " sequences in ", s.train_files);
  check_step_batches(p.data, DataOrder(p.data.size(), s.shuffle, s.seed), s.total_training_steps, s.train_batch_size);
  p.resume_dir = find_resume_dir(s);
  return p;
}

void train_loop(const TrainSettings& s, const Dataset& data, FsdpEngine& engine, MetricsLogger& log, int64_t start) {
  const TaskSpec& task = *s.task;
  const LossFn loss = task.make_loss(s.loss);
  const bool entropy = task.needs_entropy(s.loss);
  // The ranks of a sequence-parallel group are given the same part of the batch.
  const int64_t bs = s.train_batch_size, per_rank = bs / engine.dp_size(), rank = engine.dp_rank();
  DataOrder order(data.size(), s.shuffle, s.seed);
  engine.train_mode();
  int64_t ran = 0;
  for (int64_t step = start; step < s.total_training_steps; ++step) {
    const auto t0 = std::chrono::steady_clock::now();
    const int64_t first = step * bs + rank * per_rank;
    const Batch b = make_batch(data, order.positions(first, first + per_rank));
    const FsdpEngine::TrainStepResult r = engine.train_batch(b, loss, entropy);
    log.log_step(step + 1, r, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    ++ran;
    const bool last = step + 1 == s.total_training_steps;
    const bool stop = s.stop_after_steps > 0 && ran >= s.stop_after_steps;
    if ((s.save_freq > 0 && (step + 1) % s.save_freq == 0) || last || stop) {
      const nlohmann::json extra = {{"global_step", step + 1}, {"config", s.effective}};
      engine.save_checkpoint(s.ckpt_dir, task.role, step + 1, s.max_ckpt_to_keep, extra);
      log.message("saved checkpoint " + checkpoint_role_dir(s.ckpt_dir, step + 1, task.role));
    }
    if (stop) break;
  }
}

}  // namespace

int run_train(const TrainArgs& a) {
  keep_freed_memory();
  const TrainSettings s = load_train_settings(a);
  CommOptions co = s.comm;
  // A CUDA engine under mpirun exchanges its device tensors over NCCL (host values are staged).
  if (co.backend == "auto" && s.engine.device != "cpu" && launched_by_mpi()) co.backend = "nccl";
  auto world = make_comm(co);
  set_threads(s.num_threads);
  const bool lead = world->rank() == 0;
  Prepared p = prepare(s, world->size());
  if (lead)
    for (const auto& w : p.data.warnings) std::fprintf(stderr, "verlcpp: warning: %s\n", w.c_str());
  FsdpEngine engine(p.engine, *world);
  // Peak RSS of building the engine (the model's shards, read straight from the safetensors
  // files one tensor at a time, their gradients and AdamW state), max over ranks.
  struct rusage ru;
  ::getrusage(RUSAGE_SELF, &ru);
  double build_rss = static_cast<double>(ru.ru_maxrss) / 1024.0;
  world->all_reduce(&build_rss, 1, DType::F64, ReduceOp::Max);
  int64_t start = 0;
  if (!p.resume_dir.empty()) {
    engine.load_checkpoint(p.resume_dir);
    start = engine.global_step();
  }
  const std::string metrics = s.metrics_file.empty() ? (fs::path(s.ckpt_dir) / "metrics.jsonl").string() : s.metrics_file;
  MetricsLogger log(*world, metrics, s.task->role, s.total_training_steps);
  if (!p.resume_dir.empty()) log.message("resumed from " + p.resume_dir + " at step " + std::to_string(start));
  char banner[512];
  std::string par = engine.sp_size() > 1 ? ", sequence parallel " + std::to_string(engine.sp_size()) : "";
  if (engine.model().expert_parallel_size() > 1) par += ", expert parallel " + std::to_string(engine.model().expert_parallel_size());
  std::snprintf(banner, sizeof banner,
                "verlcpp train: task %s, %s (%.1fM parameters), %d rank(s) (%s%s), %lld sequences, batch %lld, %lld steps; "
                "engine built at peak RSS %.0f MiB per rank (max)",
                s.task->name.c_str(), engine.model_config().architecture.c_str(),
                static_cast<double>(engine.model().num_parameters()) / 1e6, world->size(), world->name().c_str(), par.c_str(),
                (long long)p.data.size(), (long long)s.train_batch_size, (long long)s.total_training_steps, build_rss);
  log.message(banner);
  train_loop(s, p.data, engine, log, start);
  log.finish();
  world->barrier();
  world.reset();
  finalize_comm();
  return 0;
}

}  // namespace verl
#endif
