// module.cpp — verlcpp._C, the Python extension: the C++ FsdpEngine (engine/fsdp_engine.h)
// driven by verl's Python engine class (python/verlcpp/engine.py), over the torch.distributed
// group Python created (c10d_comm.h). Built with torch's own extension machinery, so tensors
// cross in both directions with no copy and keep autograd: the per-token log-probs / entropy /
// values a micro-batch's forward returns are nodes of the C++ graph, verl's Python loss is
// computed on them, and Python's loss.backward() runs the engine's backward (FSDP re-gather,
// reduce-scatter) — what FSDPEngineWithLMHead.forward_step + forward_backward_batch do.
#include <torch/extension.h>

#include <nlohmann/json.hpp>
#include <set>

#include "c10d_comm.h"
#include "dist/shm_comm.h"
#include "core/error.h"
#include "engine/engine_config.h"
#include "engine/forward_step.h"
#include "engine/fsdp_engine.h"
#include "fsdp/buffer_pool.h"
#include "fsdp/ulysses.h"
#include "model/weights.h"

namespace py = pybind11;

namespace verl {
namespace {

// EngineConfig from the JSON the Python side builds out of verl's engine / optimizer / model
// configs (python/verlcpp/engine.py). Every key must be known: a misspelt one is an error.
EngineConfig engine_config_from_json(const nlohmann::json& j) {
  static const std::set<std::string> known = {
      "model_path", "hf_config_path", "param_dtype", "reshard_after_forward", "gradient_checkpointing",
      "forward_prefetch", "fsdp_size", "forward_only", "micro_batch_size_per_gpu", "use_dynamic_bsz",
      "max_token_len_per_gpu", "lr", "betas", "eps", "weight_decay", "grad_clip", "lr_scheduler_type",
      "total_training_steps", "lr_warmup_steps", "lr_warmup_steps_ratio", "min_lr_ratio", "num_cycles",
      "zero_indexed_step", "temperature", "ulysses_sequence_parallel_size", "device", "expert_parallel_size",
      "basic_modules"};
  for (const auto& [k, v] : j.items())
    if (!known.count(k)) fail("verlcpp engine config: unknown key '", k, "'");
  EngineConfig c;
  auto get = [&](const char* k, auto& out) {
    if (!j.contains(k) || j[k].is_null()) return;
    try {
      j[k].get_to(out);
    } catch (const std::exception&) {
      fail("verlcpp engine config: '", k, "' has the wrong type (", j[k].dump(), ")");
    }
  };
  get("model_path", c.model_path);
  get("hf_config_path", c.hf_config_path);
  get("param_dtype", c.param_dtype);
  get("device", c.device);
  get("reshard_after_forward", c.fsdp.reshard_after_forward);
  get("gradient_checkpointing", c.fsdp.gradient_checkpointing);
  get("forward_prefetch", c.fsdp.forward_prefetch);
  get("fsdp_size", c.fsdp.fsdp_size);
  get("forward_only", c.forward_only);
  get("micro_batch_size_per_gpu", c.micro_batch_size_per_gpu);
  get("use_dynamic_bsz", c.use_dynamic_bsz);
  get("max_token_len_per_gpu", c.max_token_len_per_gpu);
  get("lr", c.adamw.lr);
  if (j.contains("betas")) {
    std::vector<double> b;
    get("betas", b);
    if (b.size() != 2) fail("verlcpp engine config: 'betas' needs two values, got ", b.size());
    c.adamw.beta1 = b[0];
    c.adamw.beta2 = b[1];
  }
  get("eps", c.adamw.eps);
  get("weight_decay", c.adamw.weight_decay);
  get("grad_clip", c.grad_clip);
  get("lr_scheduler_type", c.lr_schedule.lr_scheduler_type);
  get("total_training_steps", c.lr_schedule.total_training_steps);
  get("lr_warmup_steps", c.lr_schedule.lr_warmup_steps);
  get("lr_warmup_steps_ratio", c.lr_schedule.lr_warmup_steps_ratio);
  get("min_lr_ratio", c.lr_schedule.min_lr_ratio);
  get("num_cycles", c.lr_schedule.num_cycles);
  get("zero_indexed_step", c.lr_schedule.zero_indexed_step);
  get("temperature", c.temperature);
  get("ulysses_sequence_parallel_size", c.ulysses_sequence_parallel_size);
  get("expert_parallel_size", c.fsdp.expert_parallel_size);
  get("basic_modules", c.basic_modules);
  return c;
}

// Translates verl::Error into a Python RuntimeError carrying the one-line message.
template <class F>
auto guarded(F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const Error& e) {
    throw std::runtime_error(std::string("verlcpp: ") + e.what());
  }
}

at::Tensor check_1d(const at::Tensor& t, const char* name, at::ScalarType want) {
  if (!t.defined()) fail(name, ": missing");
  if (t.dim() != 1) fail(name, ": expected a 1-D tensor, got ", t.dim(), " dimensions");
  // The packed row's index data is read on the host (offsets, padding); the model moves what it
  // computes with to its own device.
  return t.to(want).cpu().contiguous();
}

class PyEngine {
 public:
  // group_name: the group FSDP shards over (the world). Under ulysses_sequence_parallel_size > 1,
  // sp_group_name / dp_group_name: this rank's "sp" and "dp" groups of verl's device mesh
  // (VerlcppEngine builds it as FSDPEngine._init_device_mesh does); each becomes a c10d Comm.
  PyEngine(const std::string& config_json, const std::string& group_name, double timeout_s,
           const std::string& sp_group_name, const std::string& dp_group_name) {
    guarded([&] {
      const nlohmann::json j = nlohmann::json::parse(config_json);
      const EngineConfig cfg = engine_config_from_json(j);
      if (sp_group_name.empty() != dp_group_name.empty())
        fail("sequence parallelism needs both the sp and the dp group name (got only one)");
      py::gil_scoped_release nogil;
      // Ranks on one host exchange through shared memory: gloo reduce-scatters with a TCP
      // all-reduce, ~250 ms for one 28 MB unit gradient over 2 ranks (see dist/shm_comm.h).
      // A CUDA engine's tensors go over the group's NCCL backend as they are.
      const bool host = cfg.device == "cpu";
      if (host) install_host_block_cache();
      auto comm = [&](const std::string& name) {
        std::unique_ptr<Comm> c = make_c10d_comm(name, timeout_s);
        return host ? make_shm_comm(std::move(c), timeout_s) : std::move(c);
      };
      comm_ = comm(group_name);
      UlyssesGroups groups;
      if (!sp_group_name.empty()) {
        groups.sp = comm(sp_group_name);
        groups.dp = comm(dp_group_name);
      }
      engine_ = std::make_unique<FsdpEngine>(cfg, *comm_, std::move(groups));
      return 0;
    });
  }

  int dp_rank() const { return engine_->dp_rank(); }
  int dp_size() const { return engine_->dp_size(); }
  int sp_size() const { return engine_->sp_size(); }
  int ep_size() const { return engine_->model().expert_parallel_size(); }
  bool is_value_model() const { return engine_->is_value_model(); }
  std::string comm_name() const { return comm_->name(); }
  int64_t vocab_size() const { return engine_->model_config().vocab_size; }

  // One micro-batch, packed: ids [nnz], cu_seqlens [B+1], position ids [nnz], per-token
  // temperature [nnz]: the whole micro-batch, the same on every rank of a sequence-parallel group.
  // Returns {"log_probs", "entropy"?} or {"values"} as [nnz] fp32 tensors, connected to the
  // engine's graph when grad mode is on. Under sp > 1 this rank runs its slice of the row (padded
  // to a multiple of sp as verl's ulysses_pad_and_slice_inputs pads it) and the outputs are
  // gathered back over the group (gather_outputs_and_unpad), as FSDPEngineWithLMHead does.
  // Vision-language models: `multi_modal`, one dict of tensors per sequence (verl's non-tensor
  // multi_modal_inputs: pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
  // second_per_grid_ts; empty for a text-only sequence), and position_ids [3 or 4, nnz] (verl's
  // rows: the text positions, then the three mRoPE rows the model uses).
  py::dict forward_micro(const at::Tensor& input_ids, const at::Tensor& cu_seqlens, const at::Tensor& position_ids,
                         const at::Tensor& temperature, bool calculate_entropy,
                         const std::vector<std::map<std::string, at::Tensor>>& multi_modal) {
    TokenOutputs out = guarded([&] {
      ModelInputs in;
      in.input_ids = check_1d(input_ids, "input_ids", at::kLong);
      const int64_t nnz = in.input_ids.size(0);
      const at::Tensor cu = check_1d(cu_seqlens, "cu_seqlens", at::kLong);
      in.cu_seqlens.assign(cu.data_ptr<int64_t>(), cu.data_ptr<int64_t>() + cu.numel());
      if (in.cu_seqlens.size() < 2 || in.cu_seqlens.front() != 0 || in.cu_seqlens.back() != nnz)
        fail("cu_seqlens: expected 0 ... ", nnz, " (the packed row's length)");
      for (size_t i = 1; i < in.cu_seqlens.size(); ++i)
        if (in.cu_seqlens[i] < in.cu_seqlens[i - 1]) fail("cu_seqlens: decreasing at ", i);
      if (position_ids.defined() && position_ids.dim() == 2) {
        // Multimodal rotary positions: the model's three mRoPE rows (verl prepends the text row).
        if ((position_ids.size(0) != 3 && position_ids.size(0) != 4) || position_ids.size(1) != nnz)
          fail("position_ids: expected [", nnz, "] or, for a vision-language model, [3 or 4, ", nnz, "]; got ",
               position_ids.sizes());
        in.mrope_position_ids = position_ids.narrow(0, position_ids.size(0) - 3, 3).to(at::kLong).cpu().contiguous();
        in.position_ids = in.mrope_position_ids[0].clone();  // replaced by the mRoPE rows in the model's forward
      } else {
        in.position_ids = check_1d(position_ids, "position_ids", at::kLong);
      }
      in.temperature = check_1d(temperature, "temperature", at::kFloat);
      if (in.position_ids.size(0) != nnz || in.temperature.size(0) != nnz)
        fail("position_ids / temperature: expected ", nnz, " values (one per token)");
      if (!multi_modal.empty() && multi_modal.size() + 1 != in.cu_seqlens.size())
        fail("multi_modal_inputs: ", multi_modal.size(), " entries for ", in.cu_seqlens.size() - 1, " sequences");
      for (const auto& m : multi_modal) {
        in.multi_modal_tensors.emplace_back();
        for (const auto& [k, t] : m) {
          if (!t.defined()) fail("multi_modal_inputs: '", k, "' is not a tensor");
          in.multi_modal_tensors.back()[k] = t.cpu();
        }
      }
      in.row_input_ids = in.input_ids;
      in.total_nnz = nnz;
      in.labels = at::roll(in.input_ids, {-1}, {0});
      if (const Ulysses* u = engine_->ulysses()) {
        const int sp = u->size(), r = u->rank();
        const int64_t pad = (nnz + sp - 1) / sp * sp - nnz;
        in.sp_size = sp;
        in.sp_rank = r;
        in.pad_size = pad;
        in.ulysses = u;
        // verl's padding: ids / labels 0, positions 0, 1, 2, ..., temperature 1.
        in.input_ids = sp_pad_and_slice(in.input_ids, sp, r, at::zeros({pad}, at::kLong));
        in.labels = sp_pad_and_slice(in.labels, sp, r, at::zeros({pad}, at::kLong));
        in.position_ids = sp_pad_and_slice(in.position_ids, sp, r, at::arange(pad, at::kLong));
        in.temperature = sp_pad_and_slice(in.temperature, sp, r, at::ones({pad}, at::kFloat));
      }
      py::gil_scoped_release nogil;
      return engine_->forward_micro(in, calculate_entropy);
    });
    py::dict d;
    if (out.values.defined()) d["values"] = out.values;
    if (out.log_probs.defined()) d["log_probs"] = out.log_probs;
    if (out.entropy.defined()) d["entropy"] = out.entropy;
    return d;
  }

  void zero_grad() { guarded([&] { engine_->zero_grad(); return 0; }); }
  void to(const std::string& device, bool model, bool optimizer) {
    guarded([&] {
      py::gil_scoped_release nogil;
      engine_->to(device, model, optimizer);
      return 0;
    });
  }
  // (grad norm before clipping, whether the update was applied: skipped when not finite).
  std::pair<double, bool> optimizer_step() {
    return guarded([&] {
      py::gil_scoped_release nogil;
      const OptimizerStepResult r = engine_->optimizer_step();
      return std::make_pair(r.grad_norm, r.stepped);
    });
  }
  double lr_scheduler_step() { return guarded([&] { return engine_->lr_scheduler_step(); }); }
  double lr() const { return engine_->lr(); }

  // Per-tensor export, one gathered unit at a time (a collective: every rank calls it for every
  // group), in HF names; under expert parallelism a layer's expert group holds all its experts.
  int num_units() { return engine_->model().num_param_groups(); }
  std::vector<std::pair<std::string, at::Tensor>> unit_params(int i) {
    return guarded([&] {
      std::vector<std::pair<std::string, at::Tensor>> r;
      py::gil_scoped_release nogil;
      engine_->model().for_each_param_in_group(i, [&](const std::string& name, const at::Tensor& t) {
        r.emplace_back(name, t);
      });
      return r;
    });
  }

  void save_checkpoint(const std::string& folder, int64_t step, const std::string& extra_json) {
    guarded([&] {
      const nlohmann::json extra = nlohmann::json::parse(extra_json);
      py::gil_scoped_release nogil;
      engine_->set_global_step(step);
      engine_->save_checkpoint_folder(folder, step, extra);
      return 0;
    });
  }
  std::string load_checkpoint(const std::string& folder) {
    return guarded([&] {
      py::gil_scoped_release nogil;
      return engine_->load_checkpoint(folder).dump();
    });
  }
  int64_t global_step() const { return engine_->global_step(); }

 private:
  std::unique_ptr<Comm> comm_;
  std::unique_ptr<FsdpEngine> engine_;
};

}  // namespace
}  // namespace verl

PYBIND11_MODULE(_C, m) {
  using verl::PyEngine;
  m.doc() = "verl.cpp's C++ model engine (FSDP-sharded transformer) for verl's Python trainers";
  py::class_<PyEngine>(m, "Engine")
      .def(py::init<const std::string&, const std::string&, double, const std::string&, const std::string&>(),
           py::arg("config_json"), py::arg("group_name"), py::arg("timeout_s") = 600.0, py::arg("sp_group_name") = "",
           py::arg("dp_group_name") = "")
      .def_property_readonly("dp_rank", &PyEngine::dp_rank)
      .def_property_readonly("dp_size", &PyEngine::dp_size)
      .def_property_readonly("sp_size", &PyEngine::sp_size)
      .def_property_readonly("ep_size", &PyEngine::ep_size)
      .def_property_readonly("is_value_model", &PyEngine::is_value_model)
      .def_property_readonly("comm_name", &PyEngine::comm_name)
      .def_property_readonly("vocab_size", &PyEngine::vocab_size)
      .def("forward_micro", &PyEngine::forward_micro, py::arg("input_ids"), py::arg("cu_seqlens"),
           py::arg("position_ids"), py::arg("temperature"), py::arg("calculate_entropy") = false,
           py::arg("multi_modal") = std::vector<std::map<std::string, at::Tensor>>{})
      .def("zero_grad", &PyEngine::zero_grad)
      .def("to", &PyEngine::to, py::arg("device"), py::arg("model") = true, py::arg("optimizer") = true)
      .def("optimizer_step", &PyEngine::optimizer_step)
      .def("lr_scheduler_step", &PyEngine::lr_scheduler_step)
      .def("lr", &PyEngine::lr)
      .def("num_units", &PyEngine::num_units)
      .def("unit_params", &PyEngine::unit_params, py::arg("index"))
      .def("save_checkpoint", &PyEngine::save_checkpoint, py::arg("folder"), py::arg("step"),
           py::arg("extra_json") = "{}")
      .def("load_checkpoint", &PyEngine::load_checkpoint, py::arg("folder"))
      .def_property_readonly("global_step", &PyEngine::global_step);
}
