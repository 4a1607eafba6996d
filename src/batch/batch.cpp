// batch.cpp — Batch and Jagged selection / concatenation.
#include "batch/batch.h"

#include <ATen/ATen.h>

#include "core/error.h"

namespace verl {

at::Tensor Jagged::at(int64_t i) const { return values.narrow(0, offsets[i], length(i)); }

std::vector<int64_t> Jagged::lengths() const {
  std::vector<int64_t> r;
  for (int64_t i = 0; i < size(); ++i) r.push_back(length(i));
  return r;
}

Jagged Jagged::select(const std::vector<int>& idx) const {
  Jagged out;
  out.offsets.push_back(0);
  std::vector<at::Tensor> pieces;
  for (int i : idx) {
    if (i < 0 || i >= size()) fail("Jagged::select: index ", i, " out of range [0, ", size(), ")");
    pieces.push_back(at(i));
    out.offsets.push_back(out.offsets.back() + length(i));
  }
  out.values = pieces.empty() ? values.narrow(0, 0, 0).clone() : at::cat(pieces, 0);
  return out;
}

Jagged Jagged::from_lengths(const at::Tensor& values, const std::vector<int64_t>& lengths) {
  Jagged j;
  j.values = values;
  j.offsets.push_back(0);
  for (int64_t l : lengths) {
    if (l < 0) fail("Jagged: negative sequence length ", l);
    j.offsets.push_back(j.offsets.back() + l);
  }
  if (j.offsets.back() != values.size(0))
    fail("Jagged: lengths sum to ", j.offsets.back(), " but there are ", values.size(0), " values");
  return j;
}

Jagged Jagged::concat(const std::vector<Jagged>& parts) {
  Jagged out;
  out.offsets.push_back(0);
  std::vector<at::Tensor> vals;
  for (const auto& p : parts) {
    vals.push_back(p.values);
    for (int64_t i = 0; i < p.size(); ++i) out.offsets.push_back(out.offsets.back() + p.length(i));
  }
  if (!vals.empty()) out.values = at::cat(vals, 0);
  return out;
}

int64_t Batch::size() const {
  int64_t n = -1;
  std::string first;
  auto check = [&](const std::string& name, int64_t m) {
    if (n < 0) n = m, first = name;
    else if (m != n) fail("batch: '", name, "' has ", m, " samples but '", first, "' has ", n);
  };
  for (const auto& [k, t] : tensors) check(k, t.dim() == 0 ? 1 : t.size(0));
  for (const auto& [k, j] : sequences) check(k, j.size());
  for (const auto& [k, v] : non_tensors) check(k, int64_t(v.size()));
  for (const auto& [k, v] : tensor_dicts) check(k, int64_t(v.size()));
  return n < 0 ? 0 : n;
}

Batch Batch::to(const c10::Device& device) const {
  Batch out = *this;
  for (auto& [k, t] : out.tensors) t = t.to(device);
  for (auto& [k, j] : out.sequences) j.values = j.values.to(device);
  return out;
}

Batch Batch::select(const std::vector<int>& idx) const {
  Batch out;
  const int64_t n = size();
  std::vector<int64_t> idx64;
  for (int i : idx) {
    if (i < 0 || i >= n) fail("batch: sample index ", i, " out of range [0, ", n, ")");
    idx64.push_back(i);
  }
  at::Tensor it = at::tensor(idx64, at::kLong);
  for (const auto& [k, t] : tensors) out.tensors[k] = t.index_select(0, it.to(t.device()));
  for (const auto& [k, j] : sequences) out.sequences[k] = j.select(idx);
  for (const auto& [k, v] : non_tensors) {
    auto& dst = out.non_tensors[k];
    for (int i : idx) dst.push_back(v[i]);
  }
  for (const auto& [k, v] : tensor_dicts) {
    auto& dst = out.tensor_dicts[k];
    for (int i : idx) dst.push_back(v[i]);
  }
  out.meta = meta;  // nlohmann::json copies deeply: each piece owns its meta
  return out;
}

std::vector<Batch> Batch::split(const Partitions& parts) const {
  std::vector<Batch> out;
  for (const auto& p : parts) out.push_back(select(p));
  return out;
}

Batch Batch::concat(const std::vector<Batch>& parts) {
  Batch out;
  if (parts.empty()) return out;
  out.meta = parts[0].meta;
  for (const auto& [k, t] : parts[0].tensors) {
    std::vector<at::Tensor> ts;
    for (const auto& p : parts) {
      if (!p.tensors.count(k)) fail("batch concat: a piece lacks tensor '", k, "'");
      ts.push_back(p.tensors.at(k));
    }
    out.tensors[k] = at::cat(ts, 0);
  }
  for (const auto& [k, j] : parts[0].sequences) {
    std::vector<Jagged> js;
    for (const auto& p : parts) {
      if (!p.sequences.count(k)) fail("batch concat: a piece lacks sequence '", k, "'");
      js.push_back(p.sequences.at(k));
    }
    out.sequences[k] = Jagged::concat(js);
  }
  for (const auto& [k, v] : parts[0].non_tensors) {
    auto& dst = out.non_tensors[k];
    for (const auto& p : parts) {
      if (!p.non_tensors.count(k)) fail("batch concat: a piece lacks non-tensor '", k, "'");
      dst.insert(dst.end(), p.non_tensors.at(k).begin(), p.non_tensors.at(k).end());
    }
  }
  for (const auto& [k, v] : parts[0].tensor_dicts) {
    auto& dst = out.tensor_dicts[k];
    for (const auto& p : parts) {
      if (!p.tensor_dicts.count(k)) fail("batch concat: a piece lacks tensor dicts '", k, "'");
      dst.insert(dst.end(), p.tensor_dicts.at(k).begin(), p.tensor_dicts.at(k).end());
    }
  }
  return out;
}

}  // namespace verl
