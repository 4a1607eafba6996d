// checkpoint.cpp — FsdpEngine::save_checkpoint / load_checkpoint and the layout helpers
// (see checkpoint.h).
//
// Saving is a collective in three phases. After each, the ranks agree: when any rank failed,
// every rank gets the first failure's message, rank 0 removes what this save wrote, and all
// throw. So a full disk leaves no partial folder behind and the previous checkpoint untouched.
//   1. rank 0 creates <dir>/global_step_N/.<role>.tmp
//   2. every rank writes its three files there; rank 0 adds fsdp_config.json and huggingface/
//   3. rank 0 renames the folder into place, replaces latest_checkpointed_iteration.txt
//      (temporary file + rename) and prunes to max_ckpt_to_keep.
// A kill at any moment leaves the checkpoint named by latest_checkpointed_iteration.txt whole.
#include "engine/checkpoint.h"

#include <ATen/ATen.h>
#include <caffe2/serialize/inline_container.h>
#include <torch/csrc/jit/serialization/export.h>
#include <torch/csrc/jit/serialization/pickle.h>
#include <torch/csrc/jit/serialization/pickler.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <regex>

#include "dist/comm.h"
#include "engine/fsdp_engine.h"
#include "core/error.h"
#include "io/file.h"
#include "io/json_file.h"
#include "io/output.h"

namespace verl {

namespace fs = std::filesystem;

std::string rank_file_name(const std::string& kind, int world_size, int rank) {
  return kind + "_world_size_" + std::to_string(world_size) + "_rank_" + std::to_string(rank) + ".pt";
}

std::string checkpoint_role_dir(const std::string& dir, int64_t step, const std::string& role) {
  return (fs::path(dir) / ("global_step_" + std::to_string(step)) / role).string();
}

int64_t read_latest_checkpoint_step(const std::string& dir) {
  const fs::path p = fs::path(dir) / "latest_checkpointed_iteration.txt";
  if (!fs::exists(p)) return -1;
  const std::string s = read_text_file(p.string(), 4096);
  const size_t b = s.find_first_not_of(" \t\r\n"), e = s.find_last_not_of(" \t\r\n");
  const std::string t = b == std::string::npos ? "" : s.substr(b, e - b + 1);
  const bool digits = !t.empty() && t.size() <= 18 && std::all_of(t.begin(), t.end(), [](char c) { return c >= '0' && c <= '9'; });
  if (!digits) {
    std::string shown;
    for (char c : t.substr(0, 40)) shown += (c >= 32 && c < 127) ? c : '?';
    fail(p.string(), ": expected the number of the last saved step, found '", shown, t.size() > 40 ? "...'" : "'",
         " (restore it, or remove it to start from scratch)");
  }
  return std::stoll(t);
}

namespace {

using Dict = c10::impl::GenericDict;

Dict new_dict() { return Dict(c10::StringType::get(), c10::AnyType::get()); }

at::Tensor rank_record(int rank, int world, int64_t step) {
  return at::tensor(std::vector<int64_t>{rank, world, step}, at::TensorOptions().dtype(at::kLong));
}

// torch.save of a plain dict: the pickle has no libtorch type tags (restore_type_tag), which
// torch.load's weights_only unpickler refuses. Streams into the file; errors name it.
void save_torch_dict(const fs::path& path, const Dict& d) {
  std::vector<char> pkl;
  torch::jit::Pickler p([&](const char* b, size_t n) { pkl.insert(pkl.end(), b, b + n); }, nullptr, nullptr, nullptr,
                        nullptr, /*tag_aggregates=*/false);
  p.protocol();
  p.pushIValue(c10::IValue(d));
  p.stop();
  OutFile out(path.string());
  std::string err;
  {
    // The writer keeps going after a failed write (no exception through libtorch); the first
    // error is reported once the container is done.
    caffe2::serialize::PyTorchStreamWriter w([&](const void* b, size_t n) -> size_t {
      if (err.empty()) {
        try {
          out.write(b, n);
        } catch (const Error& e) {
          err = e.what();
        }
      }
      return n;
    });
    torch::jit::writeArchiveAndTensors("data", pkl.data(), pkl.size(), p.tensorData(), w);
    w.writeEndOfFile();
  }
  if (!err.empty()) throw Error(err);
  out.close(true);
}

Dict load_dict(const fs::path& path) {
  if (!fs::exists(path)) fail(path.string(), ": missing");
  std::ifstream f(path, std::ios::binary);
  if (!f) fail(path.string(), ": cannot open");
  std::vector<char> bytes((std::istreambuf_iterator<char>(f)), {});
  c10::IValue v;
  try {
    v = torch::jit::pickle_load(bytes);
  } catch (const c10::Error& e) {
    fail(path.string(), ": not a readable torch checkpoint (", std::string(e.what_without_backtrace()).substr(0, 200), ")");
  }
  if (!v.isGenericDict()) fail(path.string(), ": expected a dict");
  return v.toGenericDict();
}

at::Tensor dict_tensor(const Dict& d, const std::string& key, const fs::path& path) {
  auto it = d.find(key);
  if (it == d.end() || !it->value().isTensor()) fail(path.string(), ": missing tensor '", key, "'");
  return it->value().toTensor();
}

// Checks a loaded file's {rank, world_size, step} record against the rank and world size its
// name stands for and the expected step (< 0: any); returns the recorded step.
int64_t check_record(const Dict& d, const fs::path& path, int rank, int world, int64_t step) {
  auto it = d.find(kRankWorldStepKey);
  if (it == d.end() || !it->value().isTensor())
    fail(path.string(), ": no '", kRankWorldStepKey, "' record of rank, world size and step (not saved by this verlcpp)");
  const at::Tensor t = it->value().toTensor().contiguous();
  if (t.scalar_type() != at::kLong || t.numel() != 3) fail(path.string(), ": '", kRankWorldStepKey, "' must be int64 [3]");
  const int64_t* v = t.data_ptr<int64_t>();
  if (v[0] != rank || v[1] != world || (step >= 0 && v[2] != step))
    fail(path.string(), ": holds rank ", v[0], " of world size ", v[1], " at step ", v[2], ", but this file is rank ", rank,
         "'s of ", world, step >= 0 ? " at step " + std::to_string(step) : std::string(),
         " (a rank file copied or renamed over another?)");
  return v[2];
}

// N of a .../global_step_N/<role> folder, or -1.
// The N of global_step_N: the folder itself (verl's SFT trainer saves there) or its parent
// (<run>/global_step_N/<role>); -1 when neither is named so.
int64_t step_of_folder(const fs::path& ckpt_dir) {
  static const std::regex re("global_step_([0-9]{1,18})");
  fs::path d = fs::absolute(ckpt_dir).lexically_normal();
  if (d.filename().empty()) d = d.parent_path();
  for (const fs::path& n : {d.filename(), d.parent_path().filename()}) {
    std::smatch m;
    const std::string s = n.string();
    if (std::regex_match(s, m, re)) return std::stoll(m[1]);
  }
  return -1;
}

void check_fsdp_config(const fs::path& d, int world) {
  const fs::path fc_path = d / "fsdp_config.json";
  if (!fs::exists(fc_path)) fail(fc_path.string(), ": missing (not a verlcpp checkpoint folder)");
  const nlohmann::json fc = read_json_file(fc_path.string());
  if (fc.value("world_size", -1) != world)
    fail(fc_path.string(), ": saved with world_size ", fc.value("world_size", -1), ", this job has ", world,
         " ranks (resume with the same world size)");
}

// "" when fn ran through, else its error as one line.
std::string guarded(const std::function<void()>& fn) {
  try {
    fn();
    return "";
  } catch (const c10::Error& e) {
    std::string m = e.what_without_backtrace();
    return m.substr(0, m.find('\n'));
  } catch (const std::exception& e) {
    return e.what();
  }
}

// Collective: returns when no rank failed; else rank 0 runs `cleanup` and every rank throws the
// first failing rank's message followed by `context`.
void agree(Comm& c, const std::string& err, const std::function<void()>& cleanup, const std::string& context) {
  int32_t first = err.empty() ? c.size() : c.rank();
  c.all_reduce(&first, 1, DType::I32, ReduceOp::Min);
  if (first == c.size()) return;
  std::array<char, 1024> msg{};
  if (c.rank() == first) std::strncpy(msg.data(), err.c_str(), msg.size() - 1);
  c.broadcast(msg.data(), msg.size(), DType::U8, first);
  if (c.rank() == 0) (void)guarded(cleanup);
  c.barrier();
  fail(msg.data(), context);
}

void write_fsdp_config(const fs::path& tmp, FsdpModel& model, int world) {
  // The flat-unit table: what `verlcpp merge` needs to cut parameters out of the shards.
  nlohmann::json units = nlohmann::json::array();
  for (const FsdpModel::UnitInfo& u : model.unit_table()) {
    nlohmann::json ps = nlohmann::json::array();
    for (const auto& p : u.params) ps.push_back({{"name", p.name}, {"shape", p.shape}, {"offset", p.offset}});
    nlohmann::json e = {{"name", u.name}, {"numel", u.numel}, {"shard_numel", u.shard_numel}, {"params", ps}};
    if (!u.ranks.empty()) e["ranks"] = u.ranks;  // expert parallelism: who holds the shards, in order
    units.push_back(std::move(e));
  }
  nlohmann::json fc = {{"FSDP_version", "verlcpp-flat-1"}, {"world_size", world},
                       {"fsdp_size", model.shard_comm().size()}, {"units", units}};
  write_text_file((tmp / "fsdp_config.json").string(), fc.dump(1) + "\n");
}

// huggingface/: config, generation config and tokenizer files of the model folder.
void copy_hf_files(const fs::path& hf, const EngineConfig& cfg) {
  fs::create_directories(hf);
  const std::string cfg_dir = cfg.hf_config_path.empty() ? cfg.model_path : cfg.hf_config_path;
  for (const fs::path& src : {fs::path(cfg_dir), fs::path(cfg.model_path)}) {
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

void write_rank_files(const fs::path& tmp, int world, int rank, int64_t step, FsdpModel& model, const AdamW* opt,
                      const LrScheduler* sched, const nlohmann::json& extra) {
  const at::Tensor rec = rank_record(rank, world, step);
  Dict m = new_dict();
  // Saved from host memory whatever the engine's device (files load anywhere, as verl's do).
  for (FlatUnit* u : model.units()) m.insert(u->name() + ".flat", u->shard().cpu());
  m.insert(kRankWorldStepKey, rec);
  save_torch_dict(tmp / rank_file_name("model", world, rank), m);
  if (opt) {
    Dict o = new_dict();
    for (const auto& [k, v] : opt->state_dict()) o.insert(k, v.cpu());
    o.insert(kRankWorldStepKey, rec);
    save_torch_dict(tmp / rank_file_name("optim", world, rank), o);
  }
  Dict e = new_dict();
  if (sched)
    for (const auto& [k, v] : sched->state_dict()) e.insert("lr_scheduler." + k, v);
  e.insert("global_step", step);
  e.insert("extra", extra.dump());
  e.insert(kRankWorldStepKey, rec);
  save_torch_dict(tmp / rank_file_name("extra_state", world, rank), e);
}

void prune_checkpoints(const fs::path& dir, int64_t step, int max_keep) {
  if (max_keep <= 0) return;
  std::vector<int64_t> steps;
  static const std::regex re("global_step_([0-9]{1,18})");
  for (const auto& e : fs::directory_iterator(dir)) {
    std::smatch m;
    const std::string n = e.path().filename().string();
    if (e.is_directory() && std::regex_match(n, m, re)) steps.push_back(std::stoll(m[1]));
  }
  std::sort(steps.begin(), steps.end());
  while (static_cast<int>(steps.size()) > max_keep) {
    if (steps.front() != step) fs::remove_all(dir / ("global_step_" + std::to_string(steps.front())));
    steps.erase(steps.begin());
  }
}

}  // namespace

// Where a save publishes: the checkpoint folder, and (for a run folder) the latest-step file
// and the folder whose old global_step_* are pruned; both empty for an exact folder.
struct SaveTarget {
  fs::path final_dir, step_dir, latest, prune_dir;
  int64_t step = 0;
  static SaveTarget in_run(const std::string& dir, const std::string& role, int64_t step) {
    SaveTarget p;
    p.step_dir = fs::path(dir) / ("global_step_" + std::to_string(step));
    p.final_dir = p.step_dir / role;
    p.latest = fs::path(dir) / "latest_checkpointed_iteration.txt";
    p.prune_dir = dir;
    p.step = step;
    return p;
  }
  static SaveTarget exact(const std::string& folder, int64_t step) {
    SaveTarget p;
    p.final_dir = fs::absolute(folder).lexically_normal();
    if (p.final_dir.filename().empty()) p.final_dir = p.final_dir.parent_path();
    p.step_dir = p.final_dir.parent_path();
    p.step = step;
    return p;
  }
};

// Rank 0 claims the role folder and the latest-step file (io/output.h: exclusive, stale
// temporaries of dead runs removed, never over an input) and tells every rank where the
// temporary folder is; all ranks write into it; rank 0 writes the latest-step file's temporary,
// then publishes the folder and that file by rename. A failure on any rank is agreed on after
// each phase: every rank raises the same line and the claims' temporaries are removed.
void FsdpEngine::save_checkpoint(const std::string& dir, const std::string& role, int64_t step, int max_ckpt_to_keep,
                                 const nlohmann::json& extra) {
  save(SaveTarget::in_run(dir, role, step), max_ckpt_to_keep, extra);
}

void FsdpEngine::save_checkpoint_folder(const std::string& folder, int64_t step, const nlohmann::json& extra) {
  save(SaveTarget::exact(folder, step), 0, extra);
}

void FsdpEngine::save(const SaveTarget& p, int max_ckpt_to_keep, const nlohmann::json& extra) {
  const int W = world_.size(), r = world_.rank();
  const int64_t step = p.step;
  std::unique_ptr<OutputClaim> folder, latest;  // rank 0
  bool created_step_dir = false;
  auto cleanup = [&] {
    folder.reset();
    latest.reset();
    std::error_code ec;
    if (created_step_dir) fs::remove(p.step_dir, ec);  // only when empty
  };
  const std::string context = "; checkpoint " + p.final_dir.string() + " not saved (nothing of it left behind)";
  std::array<char, 4096> tmp_name{};
  std::string err = guarded([&] {
    if (r != 0) return;
    created_step_dir = !fs::exists(p.step_dir);
    fs::create_directories(p.step_dir);
    std::vector<std::string> inputs{cfg_.model_path};
    if (!cfg_.hf_config_path.empty()) inputs.push_back(cfg_.hf_config_path);
    folder = std::make_unique<OutputClaim>(
        p.final_dir.string(), OutputClaim::Options{OutputClaim::Kind::Folder, /*overwrite=*/true, inputs, "checkpoint"});
    if (folder->temp().size() >= tmp_name.size()) fail(folder->temp(), ": path too long");
    std::strncpy(tmp_name.data(), folder->temp().c_str(), tmp_name.size() - 1);
  });
  agree(world_, err, cleanup, context);
  world_.broadcast(tmp_name.data(), tmp_name.size(), DType::U8, 0);
  const fs::path tmp(tmp_name.data());
  err = guarded([&] {
    write_rank_files(tmp, W, r, step, *model_, opt_.get(), sched_.get(), extra);
    if (r != 0) return;
    write_fsdp_config(tmp, *model_, W);
    copy_hf_files(tmp / "huggingface", cfg_);
    if (p.latest.empty()) return;
    latest = std::make_unique<OutputClaim>(p.latest.string(), OutputClaim::Options{OutputClaim::Kind::File, true, {},
                                                                                   p.latest.filename().string()});
    write_text_file(latest->temp(), std::to_string(step));
  });
  agree(world_, err, cleanup, context);
  err = guarded([&] {
    if (r != 0) return;
    folder->commit();
    if (latest) latest->commit();
    if (!p.prune_dir.empty()) prune_checkpoints(p.prune_dir, step, max_ckpt_to_keep);
  });
  agree(world_, err, cleanup, context);
  world_.barrier();
}

nlohmann::json FsdpEngine::load_checkpoint(const std::string& ckpt_dir) {
  const int W = world_.size(), r = world_.rank();
  const fs::path d(ckpt_dir);
  check_fsdp_config(d, W);
  const fs::path ep = d / rank_file_name("extra_state", W, r);
  const Dict esd = load_dict(ep);
  const int64_t step = check_record(esd, ep, r, W, step_of_folder(d));
  const fs::path mp = d / rank_file_name("model", W, r);
  const Dict msd = load_dict(mp);
  check_record(msd, mp, r, W, step);
  for (FlatUnit* u : model_->units()) {
    at::Tensor t = dict_tensor(msd, u->name() + ".flat", mp);
    if (t.numel() != u->shard_numel())
      fail(mp.string(), ": '", u->name(), ".flat' has ", t.numel(), " elements, expected ", u->shard_numel());
    u->shard().copy_(t);
  }
  if (opt_) {
    const fs::path op = d / rank_file_name("optim", W, r);
    const Dict od = load_dict(op);
    check_record(od, op, r, W, step);
    std::map<std::string, at::Tensor> osd;
    for (const auto& kv : od)
      if (kv.key().toStringRef() != kRankWorldStepKey) osd[kv.key().toStringRef()] = kv.value().toTensor();
    opt_->load_state_dict(osd);
  }
  if (sched_) {
    std::map<std::string, at::Tensor> ssd;
    for (const auto& kv : esd) {
      const std::string k = kv.key().toStringRef();
      if (k.rfind("lr_scheduler.", 0) == 0) ssd[k.substr(13)] = kv.value().toTensor();
    }
    sched_->load_state_dict(ssd);
    opt_->set_lr(sched_->lr());
  }
  global_step_ = step;
  auto it = esd.find("extra");
  nlohmann::json extra = nlohmann::json::object();
  if (it != esd.end()) extra = nlohmann::json::parse(it->value().toStringRef());
  world_.barrier();
  return extra;
}

}  // namespace verl
