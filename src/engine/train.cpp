// train.cpp — the `verlcpp train` loop (see train.h).
//
// Data file (safetensors), one row per sequence, tokens concatenated:
//   input_ids   int64 [nnz]     all sequences back to back
//   cu_seqlens  int64 [N + 1]   offsets
//   loss_mask   any    [nnz]    1 where the prediction of the NEXT token is trained
// and, per task, data aligned the same way (position t describes token t+1, as
// `verlcpp logprob` writes log_probs):
//   ppo:   advantages, old_log_probs (float32 [nnz]); ref_log_probs when use_kl_loss
//   value: returns, values (float32 [nnz])
#include "engine/train.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <malloc.h>
#include <sys/resource.h>
#include <unistd.h>
#include <yaml-cpp/yaml.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <numeric>
#include <random>
#include <thread>

#include "dist/comm.h"
#include "engine/fsdp_engine.h"
#include "io/error.h"
#include "io/file.h"
#include "io/safetensors.h"
#include "model/paths.h"

namespace verl {

namespace fs = std::filesystem;

namespace {

struct Key {
  const char* name;
  const char* def;
  const char* help;
};

// verl's names (the last part of verl's dotted config paths).
const std::vector<Key>& keys() {
  static const std::vector<Key> k = {
      {"task", "sft", "sft | ppo (policy update, also GRPO: advantages come in the data) | value"},
      {"path", "", "model: local folder, file://, hdfs:// or a HuggingFace id in the offline cache (required)"},
      {"hf_config_path", "", "config folder (default: path)"},
      {"train_files", "", "data file (safetensors; see the README) (required)"},
      {"train_batch_size", "8", "sequences per optimizer step, over all ranks"},
      {"shuffle", "true", "shuffle the data every epoch (seeded)"},
      {"seed", "1", "data order seed"},
      {"total_training_steps", "10", "optimizer steps"},
      {"micro_batch_size_per_gpu", "2", "sequences per micro-batch (fixed micro-batching)"},
      {"use_dynamic_bsz", "false", "token-balanced micro-batches of at most max_token_len_per_gpu tokens"},
      {"max_token_len_per_gpu", "16384", "token budget of a micro-batch with use_dynamic_bsz"},
      {"param_dtype", "fp32", "compute dtype: fp32, or bf16 (mixed precision: fp32 master weights and gradients)"},
      {"fsdp_size", "-1", "ranks per shard group (-1: all; smaller: hybrid sharding)"},
      {"reshard_after_forward", "true", "free each unit's gathered parameters after its forward"},
      {"enable_gradient_checkpointing", "false", "recompute each decoder layer in backward"},
      {"forward_prefetch", "false", "accepted (collectives are blocking here)"},
      {"param_offload", "false", "accepted: parameters already live in host memory on the CPU"},
      {"optimizer_offload", "false", "accepted: optimizer state already lives in host memory on the CPU"},
      {"lr", "1e-5", "peak learning rate"},
      {"weight_decay", "0.01", "AdamW decoupled weight decay"},
      {"betas", "0.9,0.999", "AdamW betas"},
      {"eps", "1e-8", "AdamW epsilon"},
      {"grad_clip", "1.0", "global gradient-norm clip"},
      {"lr_warmup_steps", "-1", "warmup steps (<= 0: lr_warmup_steps_ratio x total_training_steps)"},
      {"lr_warmup_steps_ratio", "0.0", "warmup as a fraction of total_training_steps"},
      {"lr_scheduler_type", "constant", "constant | cosine | linear"},
      {"min_lr_ratio", "0.0", "cosine / linear floor"},
      {"num_cycles", "0.5", "cosine cycles"},
      {"clip_ratio", "0.2", "PPO clip"},
      {"clip_ratio_low", "", "PPO lower clip (default clip_ratio)"},
      {"clip_ratio_high", "", "PPO upper clip (default clip_ratio)"},
      {"clip_ratio_c", "3.0", "dual-clip bound (> 1)"},
      {"loss_agg_mode", "token-mean", "token-mean | seq-mean-token-sum | seq-mean-token-mean | seq-mean-token-sum-norm"},
      {"entropy_coeff", "0.0", "entropy bonus coefficient"},
      {"use_kl_loss", "false", "add kl_loss_coef x KL(policy || ref) (needs ref_log_probs)"},
      {"kl_loss_coef", "0.001", "KL loss coefficient"},
      {"kl_loss_type", "low_var_kl", "kl | abs | mse | low_var_kl, optionally with + (straight-through)"},
      {"cliprange_value", "0.5", "value clip (task value)"},
      {"temperature", "1.0", "log-prob temperature"},
      {"save_freq", "-1", "save a checkpoint every N steps (-1: only at the end)"},
      {"default_local_dir", "checkpoints", "checkpoint folder (global_step_N/<role>/ inside)"},
      {"max_ckpt_to_keep", "-1", "keep only the newest N checkpoints (-1: all)"},
      {"resume_mode", "auto", "auto (latest checkpoint if any) | disable | resume_path"},
      {"resume_from_path", "", "a global_step_N folder (resume_mode resume_path)"},
      {"metrics_file", "", "JSONL metrics (default: <default_local_dir>/metrics.jsonl)"},
      {"collective_timeout", "600", "seconds before a stalled collective aborts the job"},
      {"comm_backend", "auto", "auto | mpi | local"},
      {"num_threads", "0", "CPU threads per rank (0: cores / ranks on this node)"},
      {"stop_after_steps", "-1", "stop (after saving) once this many steps ran in this process (for tests)"},
  };
  return k;
}

class Config {
 public:
  void set(const std::string& dotted, const std::string& v, const std::string& where) {
    const std::string k = dotted.substr(dotted.rfind('.') == std::string::npos ? 0 : dotted.rfind('.') + 1);
    bool known = false;
    for (const auto& kk : keys()) known |= k == kk.name;
    if (!known) fail(where, ": unknown config key '", dotted, "' (see `verlcpp train --help` for the keys)");
    v_[k] = v;
  }
  std::string str(const std::string& k) const {
    auto it = v_.find(k);
    if (it != v_.end()) return it->second;
    for (const auto& kk : keys())
      if (k == kk.name) return kk.def;
    fail("internal: no config key ", k);
  }
  double num(const std::string& k) const {
    const std::string s = str(k);
    try {
      size_t n = 0;
      double d = std::stod(s, &n);
      if (n != s.size()) throw std::invalid_argument(s);
      return d;
    } catch (const std::exception&) {
      fail("config key ", k, ": expected a number, got '", s, "'");
    }
  }
  int64_t integer(const std::string& k) const {
    double d = num(k);
    if (d != std::floor(d)) fail("config key ", k, ": expected an integer, got ", str(k));
    return static_cast<int64_t>(d);
  }
  bool flag(const std::string& k) const {
    std::string s = str(k);
    for (auto& c : s) c = static_cast<char>(std::tolower(c));
    if (s == "true" || s == "1" || s == "yes") return true;
    if (s == "false" || s == "0" || s == "no") return false;
    fail("config key ", k, ": expected true or false, got '", str(k), "'");
  }
  bool has(const std::string& k) const { return v_.count(k) && !v_.at(k).empty(); }
  nlohmann::json dump() const {
    nlohmann::json j;
    for (const auto& kk : keys()) j[kk.name] = str(kk.name);
    return j;
  }

 private:
  std::map<std::string, std::string> v_;
};

void walk_yaml(const YAML::Node& n, const std::string& prefix, Config& c, const std::string& file) {
  if (n.IsMap()) {
    for (const auto& kv : n) walk_yaml(kv.second, prefix.empty() ? kv.first.as<std::string>() : prefix + "." + kv.first.as<std::string>(), c, file);
  } else if (n.IsScalar()) {
    c.set(prefix, n.as<std::string>(), file);
  } else if (n.IsSequence()) {
    std::string s;
    for (const auto& e : n) s += (s.empty() ? "" : ",") + e.as<std::string>();
    c.set(prefix, s, file);
  } else if (n.IsNull() && !prefix.empty()) {
    c.set(prefix, "", file);
  }
}

// The dataset, read once: sequences and their aligned per-token fields.
struct Dataset {
  at::Tensor input_ids;
  std::vector<int64_t> cu;
  std::map<std::string, at::Tensor> fields;  // float32 [nnz]
  int64_t size() const { return static_cast<int64_t>(cu.size()) - 1; }
};

at::Tensor read_st(const SafetensorsReader& r, const std::string& name, at::ScalarType want) {
  const StTensor& t = r.at(name);
  at::ScalarType st;
  switch (t.dtype) {
    case DType::I64: st = at::kLong; break;
    case DType::I32: st = at::kInt; break;
    case DType::F32: st = at::kFloat; break;
    case DType::F64: st = at::kDouble; break;
    case DType::BF16: st = at::kBFloat16; break;
    case DType::F16: st = at::kHalf; break;
    case DType::U8: st = at::kByte; break;
    case DType::BOOL: st = at::kBool; break;
    default: fail(r.path(), ": '", name, "' has unsupported dtype ", dtype_st_name(t.dtype));
  }
  if (t.shape.size() != 1) fail(r.path(), ": '", name, "' must be 1-D, has ", t.shape.size(), " dims");
  return at::from_blob(const_cast<uint8_t*>(r.data(t)), t.shape, at::TensorOptions().dtype(st)).to(want, false, true);
}

Dataset load_dataset(const std::string& path, const std::vector<std::string>& need) {
  if (path.empty()) fail("config: train_files is required (a safetensors data file)");
  SafetensorsReader r(path);
  Dataset d;
  if (r.find("input_ids") == nullptr || r.find("cu_seqlens") == nullptr)
    fail(path, ": needs 'input_ids' (int64, concatenated) and 'cu_seqlens' (int64, N+1 offsets)");
  d.input_ids = read_st(r, "input_ids", at::kLong);
  at::Tensor cu = read_st(r, "cu_seqlens", at::kLong);
  d.cu.assign(cu.data_ptr<int64_t>(), cu.data_ptr<int64_t>() + cu.numel());
  const int64_t nnz = d.input_ids.numel();
  if (d.cu.size() < 2 || d.cu.front() != 0 || d.cu.back() != nnz)
    fail(path, ": cu_seqlens must start at 0 and end at len(input_ids) = ", nnz);
  for (size_t i = 1; i < d.cu.size(); ++i)
    if (d.cu[i] <= d.cu[i - 1]) fail(path, ": cu_seqlens must increase strictly (sequence ", i - 1, " is empty)");
  for (const auto& f : need) {
    if (!r.find(f)) fail(path, ": missing '", f, "' (float32, one value per token, aligned like log_probs)");
    at::Tensor t = read_st(r, f, at::kFloat);
    if (t.numel() != nnz) fail(path, ": '", f, "' has ", t.numel(), " values for ", nnz, " tokens");
    d.fields[f] = t;
  }
  // No prediction past a sequence's last token.
  if (d.fields.count("loss_mask"))
    for (size_t i = 1; i < d.cu.size(); ++i) d.fields["loss_mask"][d.cu[i] - 1] = 0.0f;
  return d;
}

// Batch of the given samples: "input_ids" and every field as sequences.
Batch make_batch(const Dataset& d, const std::vector<int64_t>& idx) {
  std::vector<int64_t> lens;
  std::vector<at::Tensor> ids;
  std::map<std::string, std::vector<at::Tensor>> f;
  for (int64_t i : idx) {
    const int64_t s = d.cu[i], l = d.cu[i + 1] - d.cu[i];
    lens.push_back(l);
    ids.push_back(d.input_ids.narrow(0, s, l));
    for (const auto& [k, t] : d.fields) f[k].push_back(t.narrow(0, s, l));
  }
  Batch b;
  b.sequences["input_ids"] = Jagged::from_lengths(at::cat(ids), lens);
  for (auto& [k, v] : f) b.sequences[k] = Jagged::from_lengths(at::cat(v), lens);
  return b;
}

std::string fmt_duration(double s) {
  char b[32];
  if (s < 60) std::snprintf(b, sizeof b, "%.0fs", s);
  else std::snprintf(b, sizeof b, "%dm%02ds", int(s) / 60, int(s) % 60);
  return b;
}

}  // namespace


std::string train_config_help() {
  std::string s = "Config keys (YAML, flat or nested as in verl: only the last part of a dotted key counts):\n";
  for (const auto& k : keys()) {
    char line[512];
    std::snprintf(line, sizeof line, "  %-30s %-12s %s\n", k.name, (std::string("[") + k.def + "]").c_str(), k.help);
    s += line;
  }
  return s;
}

int run_train(const TrainArgs& a) {
  // Training frees and re-allocates the same large activation and parameter buffers every
  // micro-batch; glibc would return them to the kernel and fault fresh zeroed pages back in
  // each time. Keep freed memory in the heap instead (unless the user tuned malloc).
  if (!std::getenv("MALLOC_TRIM_THRESHOLD_") && !std::getenv("MALLOC_MMAP_THRESHOLD_")) {
    ::mallopt(M_MMAP_THRESHOLD, 1 << 30);
    ::mallopt(M_TRIM_THRESHOLD, 1 << 30);
    ::mallopt(M_TOP_PAD, 1 << 30);
  }
  Config c;
  if (!a.config_file.empty()) {
    YAML::Node root;
    try {
      root = YAML::LoadFile(a.config_file);
    } catch (const YAML::Exception& e) {
      fail(a.config_file, ": ", e.what());
    }
    walk_yaml(root, "", c, a.config_file);
  }
  for (const auto& o : a.overrides) {
    auto eq = o.find('=');
    if (eq == std::string::npos || eq == 0) fail("override '", o, "': expected key=value");
    c.set(o.substr(0, eq), o.substr(eq + 1), "command line");
  }

  CommOptions co;
  co.backend = c.str("comm_backend");
  co.timeout_s = c.num("collective_timeout");
  auto world = make_comm(co);
  const int rank = world->rank(), W = world->size();
  {
    int64_t nt = c.integer("num_threads");
    if (nt <= 0) {
      const char* local = std::getenv("OMPI_COMM_WORLD_LOCAL_SIZE");
      if (!local) local = std::getenv("SLURM_NTASKS_PER_NODE");
      const int per_node = local ? std::max(1, std::atoi(local)) : 1;
      nt = std::max<int64_t>(1, static_cast<int64_t>(std::thread::hardware_concurrency()) / per_node);
    }
    at::set_num_threads(static_cast<int>(nt));
  }
  const bool lead = rank == 0;

  const std::string task = c.str("task");
  if (task != "sft" && task != "ppo" && task != "value") fail("config key task: expected sft, ppo or value, got '", task, "'");
  if (c.str("path").empty()) fail("config: path (the model) is required");
  ModelPaths paths = resolve_model_paths(c.str("path"), c.str("hf_config_path"), "");

  EngineConfig ec;
  ec.model_path = paths.local_path;
  ec.hf_config_path = paths.local_hf_config_path;
  ec.param_dtype = c.str("param_dtype");
  ec.fsdp.fsdp_size = static_cast<int>(c.integer("fsdp_size"));
  ec.fsdp.reshard_after_forward = c.flag("reshard_after_forward");
  ec.fsdp.gradient_checkpointing = c.flag("enable_gradient_checkpointing");
  ec.fsdp.forward_prefetch = c.flag("forward_prefetch");
  (void)c.flag("param_offload");
  (void)c.flag("optimizer_offload");
  ec.micro_batch_size_per_gpu = static_cast<int>(c.integer("micro_batch_size_per_gpu"));
  ec.use_dynamic_bsz = c.flag("use_dynamic_bsz");
  ec.max_token_len_per_gpu = c.integer("max_token_len_per_gpu");
  ec.adamw.lr = c.num("lr");
  ec.adamw.weight_decay = c.num("weight_decay");
  ec.adamw.eps = c.num("eps");
  {
    std::string b = c.str("betas");
    auto comma = b.find(',');
    if (comma == std::string::npos) fail("config key betas: expected 'beta1,beta2', got '", b, "'");
    ec.adamw.beta1 = std::stod(b.substr(0, comma));
    ec.adamw.beta2 = std::stod(b.substr(comma + 1));
  }
  ec.grad_clip = c.num("grad_clip");
  const int64_t total_steps = c.integer("total_training_steps");
  if (total_steps <= 0) fail("config key total_training_steps: must be positive");
  ec.lr_schedule.lr_scheduler_type = c.str("lr_scheduler_type");
  ec.lr_schedule.total_training_steps = total_steps;
  ec.lr_schedule.lr_warmup_steps = c.integer("lr_warmup_steps");
  ec.lr_schedule.lr_warmup_steps_ratio = c.num("lr_warmup_steps_ratio");
  ec.lr_schedule.min_lr_ratio = c.num("min_lr_ratio");
  ec.lr_schedule.num_cycles = c.num("num_cycles");
  ec.temperature = c.num("temperature");

  PpoLossConfig pc;
  pc.clip.clip_ratio = c.num("clip_ratio");
  if (c.has("clip_ratio_low")) pc.clip.clip_ratio_low = c.num("clip_ratio_low");
  if (c.has("clip_ratio_high")) pc.clip.clip_ratio_high = c.num("clip_ratio_high");
  pc.clip.clip_ratio_c = c.num("clip_ratio_c");
  pc.loss_agg_mode = parse_loss_agg_mode(c.str("loss_agg_mode"));
  pc.entropy_coeff = c.num("entropy_coeff");
  pc.use_kl_loss = c.flag("use_kl_loss");
  pc.kl_loss_coef = c.num("kl_loss_coef");
  pc.kl_loss_type = c.str("kl_loss_type");
  check_kl_penalty_type(pc.kl_loss_type);
  const double cliprange_value = c.num("cliprange_value");

  std::vector<std::string> need = {"loss_mask"};
  if (task == "ppo") {
    need.push_back("advantages");
    need.push_back("old_log_probs");
    if (pc.use_kl_loss) need.push_back("ref_log_probs");
  } else if (task == "value") {
    need.push_back("returns");
    need.push_back("values");
  }
  Dataset data = load_dataset(c.str("train_files"), need);
  const int64_t bs = c.integer("train_batch_size");
  if (bs <= 0 || bs % W != 0) fail("config key train_batch_size: ", bs, " must be a positive multiple of the ", W, " ranks");
  if (bs > data.size()) fail("config key train_batch_size: ", bs, " exceeds the ", data.size(), " sequences in ", c.str("train_files"));

  FsdpEngine engine(ec, *world);
  if (task == "value" && !engine.is_value_model())
    fail("task value needs a value model (ForTokenClassification with num_labels=1), got ", engine.model_config().architecture);
  if (task != "value" && engine.is_value_model()) fail("task ", task, " needs a causal LM, got ", engine.model_config().architecture);
  const std::string role = task == "value" ? "critic" : "actor";

  // Resume.
  const std::string ckdir = c.str("default_local_dir");
  int64_t start = 0;
  const std::string rmode = c.str("resume_mode");
  std::string resume_dir;
  if (rmode == "auto") {
    const fs::path latest = fs::path(ckdir) / "latest_checkpointed_iteration.txt";
    if (fs::exists(latest)) {
      const std::string s = read_text_file(latest.string());
      resume_dir = (fs::path(ckdir) / ("global_step_" + std::to_string(std::stoll(s))) / role).string();
    }
  } else if (rmode == "resume_path") {
    if (c.str("resume_from_path").empty()) fail("resume_mode resume_path needs resume_from_path");
    resume_dir = (fs::path(c.str("resume_from_path")) / role).string();
    if (!fs::exists(resume_dir)) resume_dir = c.str("resume_from_path");
  } else if (rmode != "disable") {
    fail("config key resume_mode: expected auto, disable or resume_path, got '", rmode, "'");
  }
  if (!resume_dir.empty()) {
    nlohmann::json extra = engine.load_checkpoint(resume_dir);
    start = extra.value("global_step", engine.global_step());
    if (lead) std::printf("resumed from %s at step %lld\n", resume_dir.c_str(), (long long)start);
  }

  std::string metrics_path = c.str("metrics_file");
  if (metrics_path.empty()) metrics_path = (fs::path(ckdir) / "metrics.jsonl").string();
  std::unique_ptr<std::ofstream> mfile;
  if (lead) {
    if (fs::path(metrics_path).has_parent_path()) fs::create_directories(fs::path(metrics_path).parent_path());
    mfile = std::make_unique<std::ofstream>(metrics_path, std::ios::app);
    if (!*mfile) fail(metrics_path, ": cannot open for writing");
    std::printf("verlcpp train: task %s, %s, %d rank(s) (%s), %lld sequences, batch %lld, %lld steps\n", task.c_str(),
                engine.model_config().architecture.c_str(), W, world->name().c_str(), (long long)data.size(),
                (long long)bs, (long long)total_steps);
    std::fflush(stdout);
  }

  LossFn loss_fn = [&](const Batch& m, const MicroOutputs& out, const GlobalBatchInfo& g) -> LossResult {
    const auto& cu = out.cu_seqlens;
    int64_t tmax = 0;
    for (size_t i = 0; i + 1 < cu.size(); ++i) tmax = std::max(tmax, cu[i + 1] - cu[i]);
    auto pad = [&](const at::Tensor& t) { return pad_jagged(t, cu, tmax); };
    auto field = [&](const char* k) { return pad(m.sequences.at(k).values); };
    at::Tensor mask = field("loss_mask");
    LossResult r;
    if (task == "sft") {
      r.loss = sft_loss_padded(pad(out.log_probs), mask, *g.batch_num_tokens, g.dp_size);
    } else if (task == "ppo") {
      at::Tensor ref = pc.use_kl_loss ? field("ref_log_probs") : at::Tensor();
      at::Tensor ent = out.entropy.defined() ? pad(out.entropy) : at::Tensor();
      PpoLossOutput o = ppo_loss(pc, pad(out.log_probs), ent, field("old_log_probs"), field("advantages"), mask, ref, g);
      r.loss = o.loss;
      r.metrics["pg_clipfrac"] = o.pg_clipfrac;
      r.metrics["ppo_kl"] = o.ppo_kl;
      r.metrics["pg_clipfrac_lower"] = o.pg_clipfrac_lower;
      if (o.kl_loss.defined()) r.metrics["kl_loss"] = o.kl_loss.item<double>();
      if (o.entropy_loss.defined()) r.metrics["entropy"] = o.entropy_loss.item<double>();
    } else {
      ValueLossOutput o = compute_value_loss(pad(out.values), field("returns"), field("values"), mask, cliprange_value,
                                             pc.loss_agg_mode, g);
      r.loss = o.loss;
      r.metrics["vf_clipfrac"] = o.vf_clipfrac;
    }
    return r;
  };
  const bool needs_entropy = task == "ppo" && pc.entropy_coeff != 0;

  // Data order: a seeded permutation per epoch; step s takes samples [s·bs, (s+1)·bs) of it.
  const int64_t N = data.size();
  auto order_of_epoch = [&](int64_t epoch) {
    std::vector<int64_t> o(N);
    std::iota(o.begin(), o.end(), 0);
    if (c.flag("shuffle")) {
      std::mt19937_64 rng(static_cast<uint64_t>(c.integer("seed")) * 1000003ull + static_cast<uint64_t>(epoch));
      for (int64_t i = N - 1; i > 0; --i) std::swap(o[i], o[std::uniform_int_distribution<int64_t>(0, i)(rng)]);
    }
    return o;
  };
  int64_t cached_epoch = -1;
  std::vector<int64_t> cached_order;
  const int64_t save_freq = c.integer("save_freq");
  const int64_t stop_after = c.integer("stop_after_steps");
  const bool tty = lead && ::isatty(2);
  const auto t_start = std::chrono::steady_clock::now();
  int64_t ran = 0;
  for (int64_t step = start; step < total_steps; ++step) {
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<int64_t> idx;
    for (int64_t j = step * bs + rank * (bs / W); j < step * bs + (rank + 1) * (bs / W); ++j) {
      if (j / N != cached_epoch) {  // one permutation per epoch, not per sample
        cached_epoch = j / N;
        cached_order = order_of_epoch(cached_epoch);
      }
      idx.push_back(cached_order[j % N]);
    }
    Batch b = make_batch(data, idx);
    engine.train_mode();
    StepMetrics sm = engine.forward_backward_batch(b, loss_fn, false, needs_entropy);
    OptimizerStepResult os = engine.optimizer_step();
    const double lr_used = engine.lr();
    engine.lr_scheduler_step();
    // Metrics over ranks: loss is a sum of parts (÷ dp), the others are averaged.
    std::vector<std::string> names;
    std::vector<double> vals;
    for (const auto& [k, v] : sm.metrics) {
      names.push_back(k);
      vals.push_back(k == "loss" ? v : v / std::max(1, sm.num_micro_batches));
    }
    vals.push_back(static_cast<double>(sm.tokens));
    world->all_reduce(vals.data(), vals.size(), DType::F64, ReduceOp::Sum);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    ++ran;
    if (lead) {
      nlohmann::json j;
      j["step"] = step + 1;
      for (size_t i = 0; i < names.size(); ++i) j[names[i] == "loss" ? "loss" : "actor/" + names[i]] = vals[i] / W;
      j["grad_norm"] = os.grad_norm;
      j["lr"] = lr_used;
      j["tokens"] = vals.back();
      j["tokens_per_s"] = vals.back() / secs;
      j["step_time_s"] = secs;
      *mfile << j.dump() << "\n";
      mfile->flush();
      const double el = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
      const double eta = el / ran * static_cast<double>(total_steps - step - 1);
      if (tty) std::fprintf(stderr, "\r\033[K");
      std::printf("step %lld/%lld loss %.6f grad_norm %.4f lr %.3g tokens/s %.0f\n", (long long)(step + 1),
                  (long long)total_steps, j["loss"].get<double>(), os.grad_norm, lr_used, j["tokens_per_s"].get<double>());
      std::fflush(stdout);
      if (tty) {
        const int w = 30, done = static_cast<int>(w * (step + 1) / total_steps);
        std::fprintf(stderr, "training [%s%s] %lld/%lld ETA %s", std::string(done, '#').c_str(),
                     std::string(w - done, ' ').c_str(), (long long)(step + 1), (long long)total_steps,
                     fmt_duration(eta).c_str());
        std::fflush(stderr);
      }
    }
    const bool last = step + 1 == total_steps;
    const bool stop = stop_after > 0 && ran >= stop_after;
    if ((save_freq > 0 && (step + 1) % save_freq == 0) || last || stop) {
      nlohmann::json extra = {{"global_step", step + 1}, {"config", c.dump()}};
      engine.save_checkpoint(ckdir, role, step + 1, static_cast<int>(c.integer("max_ckpt_to_keep")), extra);
      if (lead) {
        if (tty) std::fprintf(stderr, "\r\033[K");
        std::printf("saved checkpoint %s/global_step_%lld/%s\n", ckdir.c_str(), (long long)(step + 1), role.c_str());
        std::fflush(stdout);
      }
    }
    if (stop) break;
  }
  if (tty) std::fprintf(stderr, "\n");
  {
    struct rusage ru;
    ::getrusage(RUSAGE_SELF, &ru);
    double rss[1] = {static_cast<double>(ru.ru_maxrss) / 1024.0};  // MiB
    world->all_reduce(rss, 1, DType::F64, ReduceOp::Max);
    if (lead) {
      std::printf("peak RSS per rank (max over ranks): %.0f MiB\n", rss[0]);
      nlohmann::json j = {{"summary", true}, {"peak_rss_mib_max_rank", rss[0]}, {"ranks", W}};
      *mfile << j.dump() << "\n";
    }
  }
  world->barrier();
  world.reset();
  finalize_comm();
  return 0;
}

}  // namespace verl
