// weights.cpp — the engine's weight specs (from the family name table) and the weight folder
// reader (see weights.h).
#include "model/weights.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>

#include "core/error.h"
#include "io/file.h"
#include "io/safetensors.h"
#include "hf/folder.h"
#include "model/torch_dtype.h"
#include "model/vision.h"

namespace verl {

namespace fs = std::filesystem;

namespace {

std::string fmt_shape(const std::vector<int64_t>& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

// The rows of `table` that a model with config `c` has, named by `name`.
template <class Name>
std::vector<WeightSpec> specs_of(std::span<const TensorName> table, const ModelConfig& c, bool score_bias, int layer,
                                 Name name) {
  std::vector<WeightSpec> p;
  for (const auto& t : table)
    if (t.slot != Slot::None && model_has(t, c, score_bias, layer)) p.push_back({name(t.hf), shape_of(t, c), t.slot});
  return p;
}

}  // namespace

std::vector<WeightSpec> layer_dense_weight_specs(const ModelConfig& c, int i) {
  const FamilyNames& fam = family_names(c.family);
  const std::string prefix = "model.layers." + std::to_string(i) + ".";
  return specs_of(layer_names(), c, false, i, [&](std::string_view hf) { return prefix + fill_family(hf, fam); });
}

std::vector<WeightSpec> expert_weight_specs(const ModelConfig& c, int i, int first, int count) {
  const FamilyNames& fam = family_names(c.family);
  const std::string prefix = "model.layers." + std::to_string(i) + "." + fill_family("{moe}", fam) + ".experts.";
  // Slot by slot ([gate;up] of every expert, then every down), expert-major.
  std::vector<Slot> slots;
  for (const auto& t : expert_names())
    if (t.slot != Slot::None && std::find(slots.begin(), slots.end(), t.slot) == slots.end()) slots.push_back(t.slot);
  std::vector<WeightSpec> r;
  for (Slot slot : slots)
    for (int e = first; e < first + count; ++e)
      for (const auto& t : expert_names())
        if (t.slot == slot && model_has(t, c, false, i))
          r.push_back({prefix + std::to_string(e) + "." + fill_family(t.hf, fam), shape_of(t, c), t.slot});
  return r;
}

std::vector<WeightSpec> layer_weight_specs(const ModelConfig& c, int i) {
  std::vector<WeightSpec> r = layer_dense_weight_specs(c, i);
  const std::vector<WeightSpec> e = expert_weight_specs(c, i, 0, c.num_experts);
  r.insert(r.end(), e.begin(), e.end());
  return r;
}

std::vector<WeightSpec> root_weight_specs(const ModelConfig& c, bool score_bias) {
  return specs_of(root_names(), c, score_bias, -1, [](std::string_view hf) { return std::string(hf); });
}

std::vector<FlatParam> flat_layout(const std::vector<WeightSpec>& specs, int64_t* numel) {
  std::vector<FlatParam> r;
  int64_t off = 0;
  for (const auto& w : specs) {
    int64_t n = 1;
    for (auto s : w.shape) n *= s;
    r.push_back({w.name, w.shape, w.slot, off, n});
    off += n;
  }
  if (numel) *numel = off;
  return r;
}

at::Tensor param_view(const at::Tensor& flat, const FlatParam& p) { return flat.narrow(0, p.offset, p.numel).view(p.shape); }

std::vector<std::vector<WeightSpec>> WeightSet::unit_specs(const ModelConfig& c) const {
  const bool score_bias = c.head == Head::TokenClassification && has("score.bias");
  std::vector<std::vector<WeightSpec>> units{root_weight_specs(c, score_bias)};
  for (int i = 0; i < c.num_layers; ++i) units.push_back(layer_weight_specs(c, i));
  if (c.vision)  // vision-language: the tower's units after the layers (model/vision.h)
    for (auto& u : vision_weight_specs(c)) units.push_back(std::move(u));
  std::vector<WeightSpec> all;
  for (const auto& u : units) all.insert(all.end(), u.begin(), u.end());
  check(all, c);
  return units;
}

WeightSet::WeightSet(const std::string& dir) : folder_(std::make_unique<HfFolder>(dir)) {}

WeightSet::~WeightSet() = default;

bool WeightSet::has(const std::string& name) const { return folder_->contains(name); }

std::vector<std::string> WeightSet::names() const { return folder_->names(); }

void WeightSet::check(const std::vector<WeightSpec>& want, const ModelConfig& c) const {
  std::set<std::string> wanted;
  std::vector<std::string> missing, unexpected;
  for (const auto& w : want) {
    wanted.insert(w.name);
    if (!has(w.name)) missing.push_back(w.name);
  }
  std::sort(missing.begin(), missing.end());
  for (const auto& k : names()) {
    if (wanted.count(k)) continue;
    if (k.size() >= 19 && k.compare(k.size() - 19, 19, "rotary_emb.inv_freq") == 0) continue;  // old checkpoints
    if (k == "lm_head.weight" && c.tie_word_embeddings) continue;                               // saved though tied
    unexpected.push_back(k);
  }
  if (missing.empty() && unexpected.empty()) return;
  auto join = [](const std::vector<std::string>& v) {
    std::string r;
    for (size_t i = 0; i < v.size() && i < 20; ++i) r += (i ? ", " : "") + v[i];
    if (v.size() > 20) r += ", ... (" + std::to_string(v.size()) + " in all)";
    return r;
  };
  std::string msg = folder_->dir() + ": weights do not match " + c.architecture + " from config.json:";
  if (!missing.empty()) msg += " missing keys: " + join(missing) + ";";
  if (!unexpected.empty()) msg += " unexpected keys: " + join(unexpected) + ";";
  msg.pop_back();
  throw Error(msg);
}

std::pair<const SafetensorsReader*, const StTensor*> WeightSet::find_checked(const std::string& name,
                                                                             const std::vector<int64_t>& shape) const {
  auto [r, t] = folder_->find(name);
  if (t->shape != shape)
    fail(r->path(), ": tensor '", name, "' has shape ", fmt_shape(t->shape), ", expected ", fmt_shape(shape),
         " from config.json");
  if (!dtype_is_float(t->dtype)) fail(r->path(), ": tensor '", name, "' has dtype ", dtype_st_name(t->dtype), ", expected a float type");
  return {r, t};
}

void WeightSet::load_slice(const std::string& name, const std::vector<int64_t>& shape, int64_t lo, at::Tensor& dst) const {
  auto [r, t] = find_checked(name, shape);
  const at::ScalarType st = to_scalar_type(t->dtype, r->path() + ": '" + name + "'");
  const int64_t n = dst.numel(), esz = static_cast<int64_t>(c10::elementSize(st));
  int64_t total = 1;
  for (auto d : shape) total *= d;
  if (lo < 0 || lo + n > total) fail("internal: slice [", lo, ", ", lo + n, ") of '", name, "' outside its ", total, " elements");
  // Row-major: the flat slice is one contiguous byte range of the mapped file, converted in one
  // copy; its pages are released after.
  const uint8_t* src = r->data(*t) + lo * esz;
  dst.copy_(at::from_blob(const_cast<uint8_t*>(src), {n}, at::TensorOptions().dtype(st)));
  r->release_range(*t, lo * esz, n * esz);
}

at::Tensor WeightSet::load(const std::string& name, const std::vector<int64_t>& shape, at::ScalarType dtype) const {
  auto [r, t] = find_checked(name, shape);
  return read_st_tensor(*r, *t).to(dtype);
}

}  // namespace verl
