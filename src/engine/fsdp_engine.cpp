// fsdp_engine.cpp — the engine over the FSDP-sharded model (see fsdp_engine.h).
//
// Checkpoint layout (verl's): <dir>/global_step_N/<role>/ with, per rank r of W,
// model_world_size_W_rank_r.pt (this rank's fp32 flat shard of every unit),
// optim_world_size_W_rank_r.pt (AdamW state of those shards) and
// extra_state_world_size_W_rank_r.pt (scheduler, step, the caller's extra JSON); plus
// fsdp_config.json (world size and the flat-unit table the merger needs) and huggingface/
// (config and tokenizer). The role folder is written under a temporary name and renamed
// when every rank is done; <dir>/latest_checkpointed_iteration.txt is replaced atomically
// after it, so a kill at any moment leaves the previous checkpoint loadable.
#include "engine/fsdp_engine.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/jit/serialization/pickle.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <regex>

#include "dist/comm.h"
#include "engine/forward_step.h"
#include "io/error.h"
#include "io/file.h"

namespace verl {

namespace fs = std::filesystem;

namespace {

std::vector<char> read_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) fail(path, ": cannot open");
  return std::vector<char>(std::istreambuf_iterator<char>(f), {});
}

void write_bytes(const std::string& path, const std::vector<char>& b) {
  OutFile o(path);
  o.write(b.data(), b.size());
  o.close(true);
}

c10::IValue load_pickle(const std::string& path) {
  try {
    return torch::jit::pickle_load(read_bytes(path));
  } catch (const c10::Error& e) {
    fail(path, ": not a readable torch checkpoint (", std::string(e.what_without_backtrace()).substr(0, 200), ")");
  }
}

at::Tensor dict_tensor(const c10::Dict<c10::IValue, c10::IValue>& d, const std::string& key, const std::string& path) {
  auto it = d.find(key);
  if (it == d.end() || !it->value().isTensor()) fail(path, ": missing tensor '", key, "'");
  return it->value().toTensor();
}

}  // namespace

at::Tensor pad_jagged(const at::Tensor& flat, const std::vector<int64_t>& cu, int64_t tmax) {
  const int64_t B = static_cast<int64_t>(cu.size()) - 1;
  std::vector<at::Tensor> rows;
  rows.reserve(B);
  for (int64_t i = 0; i < B; ++i) {
    at::Tensor r = flat.narrow(0, cu[i], cu[i + 1] - cu[i]);
    rows.push_back(at::constant_pad_nd(r, {0, tmax - r.size(0)}));
  }
  return at::stack(rows);
}

FsdpEngine::FsdpEngine(const EngineConfig& cfg, Comm& world) : cfg_(cfg), world_(world) {
  FsdpOptions fo = cfg.fsdp;
  fo.compute_dtype = parse_engine_dtype(cfg.param_dtype);
  const std::string cfg_dir = cfg.hf_config_path.empty() ? cfg.model_path : cfg.hf_config_path;
  model_ = std::make_unique<FsdpModel>(cfg_dir, cfg.model_path, world, fo);
  if (!cfg.forward_only) {
    std::vector<at::Tensor> params;
    std::vector<std::string> names;
    for (FlatUnit* u : model_->units()) {
      params.push_back(u->shard());
      names.push_back(u->name());
    }
    opt_ = std::make_unique<AdamW>(params, cfg.adamw, names);
    sched_ = std::make_unique<LrScheduler>(cfg.adamw.lr, cfg.lr_schedule);
    opt_->set_lr(sched_->lr());
  }
}

FsdpEngine::~FsdpEngine() = default;

int FsdpEngine::dp_size() const { return world_.size(); }

double FsdpEngine::lr() const { return opt_ ? opt_->lr() : 0.0; }

TokenOutputs FsdpEngine::forward(const ModelInputs& in, bool needs_entropy) {
  return model_forward(model_->arch(), *model_, in, needs_entropy);
}

StepMetrics FsdpEngine::forward_backward_batch(const Batch& batch, const LossFn& loss, bool forward_only,
                                               bool needs_entropy) {
  if (!forward_only && !opt_) fail("this engine was built forward_only: it cannot run backward");
  auto seq = batch.sequences.find("input_ids");
  if (seq == batch.sequences.end()) fail("batch: no 'input_ids' sequences");
  const std::vector<int64_t> lens = seq->second.lengths();
  const int B = static_cast<int>(lens.size());

  // Global normalisation: loss tokens and sequences of the whole batch (all dp ranks).
  double stats[2] = {0, static_cast<double>(B)};
  if (auto m = batch.sequences.find("loss_mask"); m != batch.sequences.end())
    stats[0] = m->second.values.to(at::kDouble).sum().item<double>();
  else
    for (auto l : lens) stats[0] += static_cast<double>(l);
  world_.all_reduce(stats, 2, DType::F64, ReduceOp::Sum);
  GlobalBatchInfo g;
  g.dp_size = dp_size();
  g.batch_num_tokens = stats[0];
  g.global_batch_size = stats[1];

  const Partitions parts = plan_micro_batches(lens, micro_batching());

  StepMetrics sm;
  sm.num_micro_batches = static_cast<int>(parts.size());
  for (auto l : lens) sm.tokens += l;
  const bool grad = !forward_only && training_;
  at::AutoGradMode mode(grad);
  for (const auto& idx : parts) {
    Batch micro = batch.select(idx);
    const ModelInputs in = prepare_model_inputs(micro, cfg_.temperature);
    MicroOutputs out;
    static_cast<TokenOutputs&>(out) = forward(in, needs_entropy);
    out.cu_seqlens = in.cu_seqlens;
    const LossResult lr = loss(micro, out, g);
    if (grad && lr.loss.defined() && lr.loss.requires_grad()) torch::autograd::backward({lr.loss});
    if (lr.loss.defined()) sm.metrics["loss"] += lr.loss.item<double>();
    for (const auto& [k, v] : lr.metrics) sm.metrics[k] += v;
  }
  return sm;
}

MicroBatchOptions FsdpEngine::micro_batching() {
  MicroBatchOptions o;
  o.micro_batch_size = std::max(1, cfg_.micro_batch_size_per_gpu);
  if (cfg_.use_dynamic_bsz) {
    o.max_token_len = cfg_.max_token_len_per_gpu;
    o.dp_max = [this](std::vector<int64_t>& v) {
      if (!v.empty()) world_.all_reduce(v.data(), v.size(), DType::I64, ReduceOp::Max);
    };
  }
  return o;
}

FsdpEngine::TrainStepResult FsdpEngine::train_batch(const Batch& batch, const LossFn& loss, bool needs_entropy) {
  TrainStepResult r;
  r.metrics = forward_backward_batch(batch, loss, false, needs_entropy);
  r.opt = optimizer_step();
  r.lr = lr();
  lr_scheduler_step();
  return r;
}

SampleOutputs FsdpEngine::infer_batch(const Batch& batch, bool calculate_entropy) {
  at::NoGradGuard no_grad;
  InferOptions o;
  o.calculate_entropy = calculate_entropy;
  o.temperature = cfg_.temperature;
  o.micro = micro_batching();
  return verl::infer_batch([&](const ModelInputs& in) { return forward(in, calculate_entropy); }, batch, o);
}

void FsdpEngine::to(const std::string& device) {
  if (device != "cpu") fail("engine.to('", device, "'): this build computes on the CPU only");
}

OptimizerStepResult FsdpEngine::optimizer_step() {
  if (!opt_) fail("this engine was built forward_only: no optimizer");
  // The optimizer reads (and clipping scales) the reduced gradients in place; they are zeroed
  // right after the step, so no copy is needed.
  for (FlatUnit* u : model_->units()) u->shard().mutable_grad() = u->grad();
  Comm& sc = model_->shard_comm();
  OptimizerStepResult r = verl::optimizer_step(*opt_, cfg_.grad_clip, [&sc](double* d, int64_t n) {
    sc.all_reduce(d, static_cast<size_t>(n), DType::F64, ReduceOp::Sum);
  });
  model_->zero_grad();
  opt_->zero_grad(true);
  return r;
}

double FsdpEngine::lr_scheduler_step() {
  if (!sched_) fail("this engine was built forward_only: no LR scheduler");
  const double lr = sched_->step();
  opt_->set_lr(lr);
  return lr;
}

void FsdpEngine::get_per_tensor_param(const std::function<void(const std::string&, const at::Tensor&)>& fn) {
  model_->for_each_param(fn);
}

void FsdpEngine::save_checkpoint(const std::string& dir, const std::string& role, int64_t step, int max_ckpt_to_keep,
                                 const nlohmann::json& extra) {
  const int W = world_.size(), r = world_.rank();
  const fs::path step_dir = fs::path(dir) / ("global_step_" + std::to_string(step));
  const fs::path final_dir = step_dir / role;
  const fs::path tmp = step_dir / ("." + role + ".tmp");
  if (r == 0) {
    fs::create_directories(step_dir);
    fs::remove_all(tmp);
    fs::create_directories(tmp);
  }
  world_.barrier();
  const std::string tag = "world_size_" + std::to_string(W) + "_rank_" + std::to_string(r) + ".pt";
  c10::Dict<std::string, at::Tensor> model_sd, optim_sd;
  for (FlatUnit* u : model_->units()) model_sd.insert(u->name() + ".flat", u->shard());
  write_bytes((tmp / ("model_" + tag)).string(), torch::jit::pickle_save(c10::IValue(model_sd)));
  if (opt_) {
    for (const auto& [k, v] : opt_->state_dict()) optim_sd.insert(k, v);
    write_bytes((tmp / ("optim_" + tag)).string(), torch::jit::pickle_save(c10::IValue(optim_sd)));
  }
  c10::impl::GenericDict ex(c10::StringType::get(), c10::AnyType::get());
  if (sched_)
    for (const auto& [k, v] : sched_->state_dict()) ex.insert(c10::IValue("lr_scheduler." + k), c10::IValue(v));
  ex.insert(c10::IValue("global_step"), c10::IValue(step));
  ex.insert(c10::IValue("extra"), c10::IValue(extra.dump()));
  write_bytes((tmp / ("extra_state_" + tag)).string(), torch::jit::pickle_save(c10::IValue(ex)));

  if (r == 0) {
    // The flat-unit table: what `verlcpp merge` needs to cut parameters out of the shards.
    nlohmann::json units = nlohmann::json::array();
    for (FlatUnit* u : model_->units()) {
      nlohmann::json ps = nlohmann::json::array();
      for (const auto& p : u->params()) ps.push_back({{"name", p.name}, {"shape", p.shape}, {"offset", p.offset}});
      units.push_back({{"name", u->name()}, {"numel", u->numel()}, {"shard_numel", u->shard_numel()}, {"params", ps}});
    }
    nlohmann::json fc = {{"FSDP_version", "verlcpp-flat-1"}, {"world_size", W}, {"fsdp_size", model_->shard_comm().size()},
                         {"units", units}};
    write_text_file((tmp / "fsdp_config.json").string(), fc.dump(1) + "\n");
    // huggingface/: config, generation config and tokenizer files of the model folder.
    const fs::path hf = tmp / "huggingface";
    fs::create_directories(hf);
    const std::string cfg_dir = cfg_.hf_config_path.empty() ? cfg_.model_path : cfg_.hf_config_path;
    for (const fs::path& src : {fs::path(cfg_dir), fs::path(cfg_.model_path)}) {
      if (!fs::is_directory(src)) continue;
      for (const auto& e : fs::directory_iterator(src)) {
        const std::string fn = e.path().filename().string();
        const std::string ext = e.path().extension().string();
        if (!e.is_regular_file() || ext == ".safetensors" || ext == ".bin" || ext == ".pt" || fn == "model.safetensors.index.json")
          continue;
        if (!fs::exists(hf / fn)) fs::copy_file(e.path(), hf / fn);
      }
    }
  }
  world_.barrier();
  if (r == 0) {
    if (fs::exists(final_dir)) fs::remove_all(final_dir);
    fs::rename(tmp, final_dir);
    const fs::path latest = fs::path(dir) / "latest_checkpointed_iteration.txt";
    write_text_file(latest.string() + ".tmp", std::to_string(step));
    fs::rename(latest.string() + ".tmp", latest);
    if (max_ckpt_to_keep > 0) {
      std::vector<int64_t> steps;
      const std::regex re("global_step_([0-9]+)");
      for (const auto& e : fs::directory_iterator(dir)) {
        std::smatch m;
        const std::string n = e.path().filename().string();
        if (e.is_directory() && std::regex_match(n, m, re)) steps.push_back(std::stoll(m[1]));
      }
      std::sort(steps.begin(), steps.end());
      while (static_cast<int>(steps.size()) > max_ckpt_to_keep) {
        if (steps.front() != step) fs::remove_all(fs::path(dir) / ("global_step_" + std::to_string(steps.front())));
        steps.erase(steps.begin());
      }
    }
  }
  world_.barrier();
}

nlohmann::json FsdpEngine::load_checkpoint(const std::string& ckpt_dir) {
  const int W = world_.size(), r = world_.rank();
  const fs::path d(ckpt_dir);
  const fs::path fc_path = d / "fsdp_config.json";
  if (!fs::exists(fc_path)) fail(fc_path.string(), ": missing (not a verlcpp checkpoint folder)");
  nlohmann::json fc;
  try {
    fc = nlohmann::json::parse(read_text_file(fc_path.string()));
  } catch (const std::exception& e) {
    fail(fc_path.string(), ": invalid JSON: ", e.what());
  }
  if (fc.value("world_size", -1) != W)
    fail(fc_path.string(), ": saved with world_size ", fc.value("world_size", -1), ", this job has ", W,
         " ranks (resume with the same world size)");
  const std::string tag = "world_size_" + std::to_string(W) + "_rank_" + std::to_string(r) + ".pt";
  const std::string mp = (d / ("model_" + tag)).string();
  if (!fs::exists(mp)) fail(mp, ": missing");
  auto msd = load_pickle(mp).toGenericDict();
  for (FlatUnit* u : model_->units()) {
    at::Tensor t = dict_tensor(msd, u->name() + ".flat", mp);
    if (t.numel() != u->shard_numel()) fail(mp, ": '", u->name(), ".flat' has ", t.numel(), " elements, expected ", u->shard_numel());
    u->shard().copy_(t);
  }
  if (opt_) {
    const std::string op = (d / ("optim_" + tag)).string();
    if (!fs::exists(op)) fail(op, ": missing");
    std::map<std::string, at::Tensor> osd;
    for (const auto& kv : load_pickle(op).toGenericDict()) osd[kv.key().toStringRef()] = kv.value().toTensor();
    opt_->load_state_dict(osd);
  }
  const std::string ep = (d / ("extra_state_" + tag)).string();
  if (!fs::exists(ep)) fail(ep, ": missing");
  auto esd = load_pickle(ep).toGenericDict();
  if (sched_) {
    std::map<std::string, at::Tensor> ssd;
    for (const auto& kv : esd) {
      const std::string k = kv.key().toStringRef();
      if (k.rfind("lr_scheduler.", 0) == 0) ssd[k.substr(13)] = kv.value().toTensor();
    }
    sched_->load_state_dict(ssd);
    opt_->set_lr(sched_->lr());
  }
  auto it = esd.find("global_step");
  if (it != esd.end()) global_step_ = it->value().toInt();
  it = esd.find("extra");
  nlohmann::json extra = nlohmann::json::object();
  if (it != esd.end()) extra = nlohmann::json::parse(it->value().toStringRef());
  world_.barrier();
  return extra;
}

}  // namespace verl
