// dataset.cpp — load and check `verlcpp train`'s data file; batches and data order (see
// dataset.h).
#ifdef VERLCPP_WITH_TORCH
#include "cli/dataset.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <numeric>
#include <random>
#include <set>

#include "core/error.h"
#include "io/safetensors.h"
#include "model/torch_dtype.h"

namespace verl {

namespace {

at::Tensor read_st(const SafetensorsReader& r, const std::string& name, at::ScalarType want) {
  const StTensor& t = r.at(name);
  const at::ScalarType st = to_scalar_type(t.dtype, r.path() + ": '" + name + "'");
  if (t.shape.size() != 1) fail(r.path(), ": '", name, "' must be 1-D, has ", t.shape.size(), " dims");
  if (want == at::kLong && st != at::kLong && st != at::kInt)
    fail(r.path(), ": '", name, "' must hold integers (int64), has ", dtype_st_name(t.dtype));
  return at::from_blob(const_cast<uint8_t*>(r.data(t)), t.shape, at::TensorOptions().dtype(st)).to(want, false, true);
}

// "sequence s, position p" of flat token index i.
std::string where(const std::vector<int64_t>& cu, int64_t i) {
  const int64_t s = std::upper_bound(cu.begin(), cu.end(), i) - cu.begin() - 1;
  return "sequence " + std::to_string(s) + ", position " + std::to_string(i - cu[s]);
}

int64_t count(const at::Tensor& b) { return b.sum().item<int64_t>(); }
int64_t first_true(const at::Tensor& b) { return b.to(at::kByte).argmax().item<int64_t>(); }

void read_tokens(const SafetensorsReader& r, Dataset& d) {
  if (r.find("input_ids") == nullptr || r.find("cu_seqlens") == nullptr)
    fail(d.path, ": needs 'input_ids' (int64, concatenated) and 'cu_seqlens' (int64, N+1 offsets)");
  d.input_ids = read_st(r, "input_ids", at::kLong);
  const at::Tensor cu = read_st(r, "cu_seqlens", at::kLong);
  d.cu.assign(cu.data_ptr<int64_t>(), cu.data_ptr<int64_t>() + cu.numel());
  const int64_t nnz = d.input_ids.numel();
  if (d.cu.size() < 2 || d.cu.front() != 0 || d.cu.back() != nnz)
    fail(d.path, ": cu_seqlens must start at 0 and end at len(input_ids) = ", nnz);
  for (size_t i = 1; i < d.cu.size(); ++i)
    if (d.cu[i] <= d.cu[i - 1]) fail(d.path, ": cu_seqlens must increase strictly (sequence ", i - 1, " is empty)");
}

void check_vocab(const Dataset& d, int64_t vocab) {
  const at::Tensor bad = (d.input_ids < 0) | (d.input_ids >= vocab);
  const int64_t n = count(bad);
  if (n == 0) return;
  const int64_t i = first_true(bad);
  fail(d.path, ": ", n, " token id(s) in input_ids outside the model's vocabulary [0, ", vocab, "), first ",
       d.input_ids[i].item<int64_t>(), " at ", where(d.cu, i), " (data tokenized for another model?)");
}

void read_loss_mask(const SafetensorsReader& r, Dataset& d) {
  if (!r.find("loss_mask")) fail(d.path, ": missing 'loss_mask' (one value per token, 1 where the next token is trained)");
  at::Tensor m = read_st(r, "loss_mask", at::kFloat);
  if (m.numel() != d.input_ids.numel())
    fail(d.path, ": 'loss_mask' has ", m.numel(), " values for ", d.input_ids.numel(), " tokens");
  const at::Tensor bad = ~at::isfinite(m) | (m < 0);
  if (const int64_t n = count(bad))
    fail(d.path, ": 'loss_mask' has ", n, " negative or non-finite value(s), first at ", where(d.cu, first_true(bad)));
  // No prediction past a sequence's last token.
  for (size_t i = 1; i < d.cu.size(); ++i) m[d.cu[i] - 1] = 0.0f;
  d.loss_tokens.assign(d.size(), 0.0);
  const float* mp = m.data_ptr<float>();
  for (int64_t i = 0; i < d.size(); ++i)
    for (int64_t t = d.cu[i]; t < d.cu[i + 1]; ++t) d.loss_tokens[i] += mp[t];
  if (std::accumulate(d.loss_tokens.begin(), d.loss_tokens.end(), 0.0) == 0)
    fail(d.path, ": 'loss_mask' is 0 at every position (a sequence's last position never counts): nothing to train");
  d.fields["loss_mask"] = m;
}

// A per-token field: an Error for non-finite values at trained positions; zeroed with a
// warning at masked ones.
void read_field(const SafetensorsReader& r, const std::string& f, Dataset& d) {
  if (!r.find(f)) fail(d.path, ": missing '", f, "' (float32, one value per token, aligned like log_probs)");
  at::Tensor t = read_st(r, f, at::kFloat);
  if (t.numel() != d.input_ids.numel()) fail(d.path, ": '", f, "' has ", t.numel(), " values for ", d.input_ids.numel(), " tokens");
  const at::Tensor bad = ~at::isfinite(t);
  const at::Tensor trained = d.fields.at("loss_mask") != 0;
  const at::Tensor bad_trained = bad & trained;
  if (const int64_t n = count(bad_trained))
    fail(d.path, ": '", f, "' has ", n, " non-finite value(s) (NaN or inf) at trained positions (loss_mask != 0), first at ",
         where(d.cu, first_true(bad_trained)), ": every update would be skipped");
  if (const int64_t n = count(bad)) {
    const at::Tensor idx = bad.nonzero().flatten().contiguous();
    std::set<int64_t> seqs;
    for (const int64_t* p = idx.data_ptr<int64_t>(); p != idx.data_ptr<int64_t>() + idx.numel(); ++p)
      seqs.insert(std::upper_bound(d.cu.begin(), d.cu.end(), *p) - d.cu.begin() - 1);
    t.masked_fill_(bad, 0.0f);
    d.warnings.push_back(d.path + ": '" + f + "': " + std::to_string(n) + " non-finite value(s) at masked positions (loss_mask 0) in " +
                         std::to_string(seqs.size()) + " sequence(s) set to 0 (NaN x 0 is NaN: they would poison every gradient)");
  }
  d.fields[f] = t;
}

}  // namespace

Dataset load_dataset(const std::string& path, const std::vector<std::string>& fields, int64_t vocab_size) {
  SafetensorsReader r(path);
  Dataset d;
  d.path = path;
  read_tokens(r, d);
  check_vocab(d, vocab_size);
  read_loss_mask(r, d);
  for (const auto& f : fields) read_field(r, f, d);
  return d;
}

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
  if (!d.multi_modal.empty())
    for (int64_t i : idx) b.tensor_dicts["multi_modal_inputs"].push_back(d.multi_modal[i]);
  return b;
}

std::vector<int64_t> DataOrder::positions(int64_t begin, int64_t end) {
  std::vector<int64_t> out;
  out.reserve(static_cast<size_t>(std::max<int64_t>(0, end - begin)));
  for (int64_t j = begin; j < end; ++j) {
    if (j / n_ != epoch_) {  // one permutation per epoch, not per sample
      epoch_ = j / n_;
      order_.resize(n_);
      std::iota(order_.begin(), order_.end(), 0);
      if (shuffle_) {
        std::mt19937_64 rng(static_cast<uint64_t>(seed_) * 1000003ull + static_cast<uint64_t>(epoch_));
        for (int64_t i = n_ - 1; i > 0; --i) std::swap(order_[i], order_[std::uniform_int_distribution<int64_t>(0, i)(rng)]);
      }
    }
    out.push_back(order_[j % n_]);
  }
  return out;
}

void check_step_batches(const Dataset& d, DataOrder order, int64_t steps, int64_t batch_size) {
  for (int64_t s = 0; s < steps; ++s) {
    const std::vector<int64_t> idx = order.positions(s * batch_size, (s + 1) * batch_size);
    double tokens = 0;
    for (int64_t i : idx) tokens += d.loss_tokens[i];
    if (tokens > 0) continue;
    std::string seqs;
    for (size_t k = 0; k < idx.size() && k < 8; ++k) seqs += (k ? ", " : "") + std::to_string(idx[k]);
    fail(d.path, ": the batch of step ", s + 1, " (sequences ", seqs, idx.size() > 8 ? ", ..." : "",
         ") has no loss token: loss_mask is 0 on all of its sequences (every step needs one)");
  }
}

}  // namespace verl
#endif
