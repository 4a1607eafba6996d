// merger.cpp — see merger.h. Steps: open the source → name map (LoRA split, tied
// embeddings dropped) → output plan (dtype, size-capped files) → stream tensors through a
// reader/writer pair into a temporary folder → config, tokenizer, adapter → rename.
#include "merge/merger.h"

#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <condition_variable>
#include <deque>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <set>
#include <thread>

#include "core/error.h"
#include "io/file.h"
#include "io/json_file.h"
#include "io/output.h"
#include "io/safetensors.h"
#include "merge/fsdp_source.h"
#include "hf/config.h"
#include "hf/folder.h"
#include "merge/megatron_source.h"
#include "merge/progress.h"
#include "merge/thread_pool.h"
#include "merge/vision_language.h"

namespace fs = std::filesystem;
using ojson = nlohmann::ordered_json;

namespace verl {

uint64_t parse_size(const std::string& s) {
  size_t i = 0;
  while (i < s.size() && (std::isdigit(static_cast<unsigned char>(s[i])) || s[i] == '.')) ++i;
  if (i == 0) fail("--max-shard-size: expected a size like 5GB, 500MB or 2GiB, got '", s, "'");
  double v = std::stod(s.substr(0, i));
  std::string u = s.substr(i);
  for (auto& c : u) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  static const std::map<std::string, double> units = {
      {"", 1}, {"B", 1}, {"KB", 1e3}, {"MB", 1e6}, {"GB", 1e9}, {"TB", 1e12},
      {"KIB", 1024.0}, {"MIB", 1048576.0}, {"GIB", 1073741824.0}, {"TIB", 1099511627776.0}};
  auto it = units.find(u);
  if (it == units.end() || v <= 0) fail("--max-shard-size: unknown size '", s, "' (use B, KB, MB, GB, KiB, MiB, GiB)");
  return static_cast<uint64_t>(v * it->second);
}

namespace {

struct OutTensor {
  std::string name;  // name in the output file
  size_t src = 0;    // index into source.tensors()
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  int lora_a = -1, lora_b = -1;  // --fuse-lora: source indices of the adapter pair
  uint64_t nbytes() const {
    uint64_t n = dtype_size(dtype);
    for (auto s : shape) n *= static_cast<uint64_t>(s);
    return n;
  }
};

std::string replace_all(std::string s, const std::string& from, const std::string& to) {
  for (size_t p = 0; (p = s.find(from, p)) != std::string::npos; p += to.size()) s.replace(p, from.size(), to);
  return s;
}
bool starts_with(const std::string& s, const std::string& p) { return s.compare(0, p.size(), p) == 0; }

std::unique_ptr<uint8_t[]> alloc(uint64_t n) { return std::unique_ptr<uint8_t[]>(new uint8_t[std::max<uint64_t>(n, 1)]); }

DType resolve_dtype(const std::string& flag, const ojson& config) {
  if (flag == "bf16" || flag == "bfloat16") return DType::BF16;
  if (flag == "fp16" || flag == "float16") return DType::F16;
  if (flag == "fp32" || flag == "float32") return DType::F32;
  if (flag != "auto") fail("--dtype: expected auto, bf16, fp16 or fp32, got '", flag, "'");
  for (const char* k : {"torch_dtype", "dtype"})
    if (config.contains(k) && config[k].is_string()) {
      auto d = dtype_from_torch_name(config[k].get<std::string>());
      if (d && dtype_is_float(*d) && *d != DType::F64) return *d;
    }
  return DType::BF16;
}

// Reads one source tensor converted to `dt` into a fresh buffer.
std::unique_ptr<uint8_t[]> read_tensor(const CheckpointSource& src, size_t i, DType dt, ThreadPool& pool) {
  const auto& t = src.tensors()[i];
  auto buf = alloc(static_cast<uint64_t>(t.numel()) * dtype_size(dt));
  src.read(i, dt, buf.get(), pool);
  return buf;
}

// W + scale · B·A, in fp32, written to `dst` as `out`. W [o, i], A [r, i], B [o, r].
void fuse_lora(const CheckpointSource& src, const OutTensor& ot, double scale, void* dst, ThreadPool& pool) {
  const auto& w = src.tensors()[ot.src];
  const auto& a = src.tensors()[ot.lora_a];
  const auto& b = src.tensors()[ot.lora_b];
  if (w.shape.size() != 2 || a.shape.size() != 2 || b.shape.size() != 2 || a.shape[1] != w.shape[1] ||
      b.shape[0] != w.shape[0] || b.shape[1] != a.shape[0])
    fail("--fuse-lora: shapes of '", w.name, "' and its lora_A / lora_B do not fit W[o,i] + B[o,r]·A[r,i]");
  auto W = read_tensor(src, ot.src, DType::F32, pool);
  auto A = read_tensor(src, ot.lora_a, DType::F32, pool);
  auto B = read_tensor(src, ot.lora_b, DType::F32, pool);
  float* wf = reinterpret_cast<float*>(W.get());
  const float* af = reinterpret_cast<const float*>(A.get());
  const float* bf = reinterpret_cast<const float*>(B.get());
  const int64_t O = w.shape[0], I = w.shape[1], R = a.shape[0];
  const float s = static_cast<float>(scale);
  pool.parallel_for(static_cast<size_t>(O), [&](size_t o) {
    std::vector<float> row(static_cast<size_t>(I), 0.f);
    for (int64_t k = 0; k < R; ++k) {
      const float bk = bf[o * R + k];
      const float* ar = af + k * I;
      for (int64_t i = 0; i < I; ++i) row[i] += bk * ar[i];
    }
    float* wr = wf + o * I;
    for (int64_t i = 0; i < I; ++i) wr[i] += row[i] * s;
  });
  convert(W.get(), DType::F32, dst, ot.dtype, static_cast<size_t>(O * I));
}

// A queue of assembled tensors between the calling thread (which assembles) and a writer
// thread. Memory budget: the largest output tensor plus the second largest (at least 96 MB),
// counting buffers in the queue, the one being written and the one being assembled — so
// small tensors flow ahead while a large one is written, and the peak stays within
// 2 x the largest tensor. Freed buffers are reused (fresh memory costs a page fault per 4 KB).
class AssemblyQueue {
 public:
  struct Item {
    size_t index = 0;
    std::unique_ptr<uint8_t[]> buf;
    uint64_t cap = 0;
  };

  explicit AssemblyQueue(const std::vector<OutTensor>& tensors) {
    uint64_t largest = 1, second = 0;
    for (const auto& t : tensors) {
      const uint64_t n = t.nbytes();
      if (n > largest) {
        second = largest;
        largest = n;
      } else {
        second = std::max(second, n);
      }
    }
    // Room for the largest tensor plus a window of smaller ones (at least 96 MB): overlap
    // without holding two of the largest tensors.
    budget_ = largest + std::max<uint64_t>(second, 96ull << 20);
  }

  // Producer: a buffer of at least `need` bytes for `item` (a free one that fits, or room in
  // the budget for a fresh one, allocated here outside the lock). False once the writer failed.
  bool acquire(uint64_t need, Item& item) {
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [&] { return werr_ || pick(need, item); });
      if (werr_) return false;
    }
    if (!item.buf) item.buf = alloc(item.cap);
    return true;
  }
  // Producer: hands an assembled tensor to the writer. False once the writer failed.
  bool push(Item item) {
    std::lock_guard<std::mutex> lk(mu_);
    if (werr_) return false;
    queue_.push_back(std::move(item));
    cv_.notify_all();
    return true;
  }
  // Producer: nothing more comes (done or failed).
  void close() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      done_ = true;
    }
    cv_.notify_all();
  }
  // Writer: the next tensor; false when the producer closed the queue with nothing left.
  bool pop(Item& item) {
    std::unique_lock<std::mutex> lk(mu_);
    cv_.wait(lk, [&] { return !queue_.empty() || done_; });
    if (queue_.empty()) return false;
    item = std::move(queue_.front());
    queue_.pop_front();
    return true;
  }
  // Writer: a written tensor's buffer, free for reuse.
  void recycle(Item item) {
    {
      std::lock_guard<std::mutex> lk(mu_);
      free_.emplace_back(item.cap, std::move(item.buf));
    }
    cv_.notify_all();
  }
  // Writer: it failed; the producer stops at its next step.
  void fail_writer(std::exception_ptr e) {
    std::lock_guard<std::mutex> lk(mu_);
    werr_ = std::move(e);
    cv_.notify_all();
  }
  std::exception_ptr writer_error() const { return werr_; }

 private:
  // Under the lock. A free buffer that fits is already counted in `live_`; otherwise wait for room.
  bool pick(uint64_t need, Item& item) {
    size_t best = free_.size();
    for (size_t k = 0; k < free_.size(); ++k)
      if (free_[k].first >= need && (best == free_.size() || free_[k].first < free_[best].first)) best = k;
    if (best < free_.size()) {
      item.cap = free_[best].first;
      item.buf = std::move(free_[best].second);
      free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(best));
      return true;
    }
    // Drop free buffers that are too small, then allocate if the budget allows.
    for (auto& f : free_) live_ -= f.first;
    free_.clear();
    if (live_ + need <= budget_ || (queue_.empty() && live_ == 0)) {
      live_ += need;
      item.cap = need;
      return true;
    }
    return false;
  }

  uint64_t budget_ = 0;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Item> queue_;
  std::vector<std::pair<uint64_t, std::unique_ptr<uint8_t[]>>> free_;  // (capacity, buffer)
  uint64_t live_ = 0;  // capacity of every buffer in the queue, being written or being assembled
  bool done_ = false;
  std::exception_ptr werr_;
};

// The writer thread: appends the queue's tensors to file k (tensors [bounds[k], bounds[k+1])).
void write_queued(AssemblyQueue& q, const std::vector<OutTensor>& tensors, const std::vector<size_t>& bounds,
                  const std::vector<std::string>& paths, Progress& progress) {
  size_t file = 0;
  std::unique_ptr<SafetensorsWriter> w;
  for (size_t i = 0; i < tensors.size(); ++i) {
    AssemblyQueue::Item it;
    if (!q.pop(it)) return;  // producer failed
    while (bounds[file + 1] <= i) ++file;
    if (!w || i == bounds[file]) {
      if (w) w->finish();
      std::vector<StSpec> specs;
      for (size_t k = bounds[file]; k < bounds[file + 1]; ++k)
        specs.push_back({tensors[k].name, tensors[k].dtype, tensors[k].shape});
      w = std::make_unique<SafetensorsWriter>(paths[file], specs);
    }
    w->write(it.buf.get(), tensors[i].nbytes());
    q.recycle(std::move(it));
    progress.add(1, tensors[i].nbytes());
  }
  if (w) w->finish();
}

// Streams `tensors` into safetensors files: file k holds tensors [bounds[k], bounds[k+1]).
// The calling thread assembles tensor i+1 while a writer thread writes tensor i.
void write_files(const CheckpointSource& src, const std::vector<OutTensor>& tensors, const std::vector<size_t>& bounds,
                 const std::vector<std::string>& paths, double lora_scale, ThreadPool& pool, Progress& progress) {
  AssemblyQueue q(tensors);
  std::thread writer([&] {
    try {
      write_queued(q, tensors, bounds, paths, progress);
    } catch (...) {
      q.fail_writer(std::current_exception());
    }
  });
  std::exception_ptr perr;
  try {
    for (size_t i = 0; i < tensors.size(); ++i) {
      const OutTensor& ot = tensors[i];
      AssemblyQueue::Item item{i, nullptr, 0};
      if (!q.acquire(std::max<uint64_t>(ot.nbytes(), 1), item)) break;
      if (ot.lora_a >= 0) fuse_lora(src, ot, lora_scale, item.buf.get(), pool);
      else src.read(ot.src, ot.dtype, item.buf.get(), pool);
      if (!q.push(std::move(item))) break;
    }
  } catch (...) {
    perr = std::current_exception();
  }
  q.close();
  writer.join();
  if (perr) std::rethrow_exception(perr);
  if (q.writer_error()) std::rethrow_exception(q.writer_error());
}

// The writer holds tensor i while tensor i+1 is assembled, so peak memory is the largest sum
// of two neighbours. Name order puts lm_head.weight next to model.embed_tokens.weight, the two
// largest tensors of an untied model: move the largest tensor between two small ones.
void separate_largest(std::vector<OutTensor>& t) {
  if (t.size() < 4) return;
  size_t big = 0;
  for (size_t i = 1; i < t.size(); ++i)
    if (t[i].nbytes() > t[big].nbytes()) big = i;
  auto pair_max = [&](const std::vector<OutTensor>& v) {
    uint64_t m = 0;
    for (size_t i = 0; i + 1 < v.size(); ++i) m = std::max(m, v[i].nbytes() + v[i + 1].nbytes());
    return m;
  };
  // Try every slot for it; keep the order with the smallest neighbour sum (ties: name order).
  std::vector<OutTensor> rest = t;
  OutTensor moved = rest[big];
  rest.erase(rest.begin() + static_cast<std::ptrdiff_t>(big));
  uint64_t best = pair_max(t);
  std::vector<OutTensor> best_order;
  for (size_t pos = 0; pos <= rest.size(); ++pos) {
    std::vector<OutTensor> cand = rest;
    cand.insert(cand.begin() + static_cast<std::ptrdiff_t>(pos), moved);
    const uint64_t m = pair_max(cand);
    if (m < best) {
      best = m;
      best_order = std::move(cand);
    }
  }
  if (!best_order.empty()) t = std::move(best_order);
}

// Greedy size-capped grouping, as transformers' save_pretrained does.
std::vector<size_t> shard_bounds(const std::vector<OutTensor>& t, uint64_t cap) {
  std::vector<size_t> b{0};
  uint64_t cur = 0;
  for (size_t i = 0; i < t.size(); ++i) {
    if (i > b.back() && cur + t[i].nbytes() > cap) {
      b.push_back(i);
      cur = 0;
    }
    cur += t[i].nbytes();
  }
  b.push_back(t.size());
  return b;
}

ojson read_json(const fs::path& p) { return read_json_file<ojson>(p.string()); }

struct LoraInfo {
  bool present = false;
  double alpha = 0;
  int64_t r = 0;
  std::optional<std::string> task_type;
  std::set<std::string> target_modules;
};

// Compares every output tensor with the reference folder; prints each difference.
int run_test(const CheckpointSource& src, const std::vector<OutTensor>& model, const MergeOptions& opt,
             double lora_scale, ThreadPool& pool) {
  HfFolder ref(opt.test_hf_dir);
  std::vector<std::string> problems;
  std::set<std::string> ours;
  for (const auto& ot : model) ours.insert(ot.name);
  for (const auto& n : ref.names())
    if (!ours.count(n)) problems.push_back("missing: '" + n + "' is in the reference but not in the merged model");
  for (const auto& ot : model) {
    if (!ref.contains(ot.name)) {
      problems.push_back("extra: '" + ot.name + "' is not in the reference");
      continue;
    }
    auto [reader, rt] = ref.find(ot.name);
    if (rt->shape != ot.shape) {
      problems.push_back("shape: '" + ot.name + "' merged " + nlohmann::json(ot.shape).dump() + " vs reference " +
                         nlohmann::json(rt->shape).dump());
      continue;
    }
    if (opt.dtype != "auto" && rt->dtype != ot.dtype)
      problems.push_back(std::string("dtype: '") + ot.name + "' merged " + dtype_st_name(ot.dtype) + " vs reference " +
                         dtype_st_name(rt->dtype));
    // Values compared in float64, ours converted to the reference dtype first.
    const DType rd = rt->dtype;
    if (!can_convert(src.tensors()[ot.src].dtype, rd)) {
      problems.push_back(std::string("dtype: '") + ot.name + "' cannot be compared with reference dtype " + dtype_st_name(rd));
      continue;
    }
    OutTensor as_ref = ot;
    as_ref.dtype = rd;
    auto buf = alloc(as_ref.nbytes());
    if (ot.lora_a >= 0) fuse_lora(src, as_ref, lora_scale, buf.get(), pool);
    else src.read(ot.src, rd, buf.get(), pool);
    const int64_t n = src.tensors()[ot.src].numel();
    const uint8_t* rp = reader->data(*rt);
    int64_t bad = 0;
    double worst = 0;
    if (dtype_is_float(rd)) {
      std::vector<double> x(4096), y(4096);
      for (int64_t s = 0; s < n; s += 4096) {
        const size_t m = static_cast<size_t>(std::min<int64_t>(4096, n - s));
        convert(buf.get() + s * dtype_size(rd), rd, x.data(), DType::F64, m);
        convert(rp + s * dtype_size(rd), rd, y.data(), DType::F64, m);
        for (size_t k = 0; k < m; ++k) {
          const double d = std::fabs(x[k] - y[k]);
          const bool same_nan = std::isnan(x[k]) && std::isnan(y[k]);
          if (!same_nan && !(d <= opt.atol + opt.rtol * std::fabs(y[k]))) {
            ++bad;
            worst = std::max(worst, std::isnan(d) ? INFINITY : d);
          }
        }
      }
    } else if (std::memcmp(buf.get(), rp, as_ref.nbytes()) != 0) {
      bad = 1;
    }
    reader->release(*rt);
    if (bad)
      problems.push_back("values: '" + ot.name + "' " + std::to_string(bad) + " of " + std::to_string(n) +
                         " elements differ (max |diff| " + std::to_string(worst) + ")");
  }
  for (const auto& p : problems) std::printf("%s\n", p.c_str());
  if (problems.empty()) {
    if (!opt.quiet)
      std::printf("test passed: %zu tensors match %s (atol %g, rtol %g)\n", model.size(), opt.test_hf_dir.c_str(),
                  opt.atol, opt.rtol);
    return 0;
  }
  std::printf("test FAILED: %zu difference(s) against %s\n", problems.size(), opt.test_hf_dir.c_str());
  return 1;
}

// Every file of the inputs (recursively, symlinks followed once), for the output claim's
// overlap check: a target must never be, or hold, any of them.
void list_inputs(const fs::path& dir, std::vector<std::string>& out, int depth = 0) {
  std::error_code ec;
  out.push_back(dir.string());
  if (depth > 4 || !fs::is_directory(dir, ec)) return;
  size_t n = 0;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    if (++n > 100000) break;
    if (e.is_directory(ec)) list_inputs(e.path(), out, depth + 1);
    else out.push_back(e.path().string());
  }
}

// The HF config must describe these weights: a config from another model would otherwise be
// written beside them (and, saying "tied", drop lm_head). Checked before anything is written.
// `model` holds the merged names: the text model under model. (model.language_model. for a
// vision-language architecture whose names are kept), a vision tower under visual.
void check_config_against_weights(const ConfigShapes& cs, const fs::path& cfg_path, const CheckpointSource& src,
                                  const std::vector<OutTensor>& model, std::optional<size_t> dropped_lm_head,
                                  bool tied_by_flag, bool value_model, ThreadPool& pool) {
  std::map<std::string, const OutTensor*> by;
  for (const auto& t : model) by[t.name] = &t;
  const std::string c = cfg_path.string();
  const std::string hint = " (is --hf_model_config_path the config of another model?)";
  auto shape = [&](const std::string& n) -> const std::vector<int64_t>* {
    auto it = by.find(n);
    return it == by.end() ? nullptr : &it->second->shape;
  };
  const auto vocab = cs.vocab_size, hidden = cs.hidden_size, layers = cs.num_layers, heads = cs.num_heads;
  const auto kv = cs.num_kv_heads;
  auto head_dim = cs.head_dim;
  if (!head_dim && hidden && heads && *heads > 0) head_dim = *hidden / *heads;
  const std::string text = shape("model.language_model.embed_tokens.weight") ? "model.language_model." : "model.";
  const std::string emb = text + "embed_tokens.weight";
  if (const auto* e = shape(emb); e && e->size() == 2) {
    if (vocab && (*e)[0] != *vocab)
      fail(c, ": vocab_size ", *vocab, " but the checkpoint's ", emb, " has ", (*e)[0], " rows", hint);
    if (hidden && (*e)[1] != *hidden)
      fail(c, ": hidden_size ", *hidden, " but the checkpoint's ", emb, " has ", (*e)[1], " columns", hint);
  }
  std::vector<std::string> names;
  for (const auto& t : model) names.push_back(t.name);
  check_vision_tower(cs, c, names, shape, hint);
  std::set<int64_t> seen_layers;
  for (const auto& t : model) {
    const std::string pre = text + "layers.";
    if (t.name.compare(0, pre.size(), pre) != 0) continue;
    const size_t e = t.name.find('.', pre.size());
    const std::string num = t.name.substr(pre.size(), e - pre.size());
    if (!num.empty() && num.find_first_not_of("0123456789") == std::string::npos && num.size() < 9)
      seen_layers.insert(std::stoll(num));
  }
  if (layers && !seen_layers.empty() && static_cast<int64_t>(seen_layers.size()) != *layers)
    fail(c, ": num_hidden_layers ", *layers, " but the checkpoint has ", seen_layers.size(), " layers", hint);
  if (!seen_layers.empty()) {
    const std::string l0 = text + "layers." + std::to_string(*seen_layers.begin()) + ".self_attn.";
    if (const auto* q = shape(l0 + "q_proj.weight"); q && heads && head_dim && !q->empty() && (*q)[0] != *heads * *head_dim)
      fail(c, ": ", *heads, " attention heads of ", *head_dim, " but the checkpoint's ", l0, "q_proj.weight has ", (*q)[0],
           " rows", hint);
    if (const auto* k = shape(l0 + "k_proj.weight"); k && kv && head_dim && !k->empty() && (*k)[0] != *kv * *head_dim)
      fail(c, ": ", *kv, " key/value heads of ", *head_dim, " but the checkpoint's ", l0, "k_proj.weight has ", (*k)[0],
           " rows", hint);
    if (cs.attention_bias && *cs.attention_bias != static_cast<bool>(shape(l0 + "q_proj.bias")))
      fail(c, ": attention_bias is ", *cs.attention_bias ? "true" : "false", " but the checkpoint's ",
           l0, "q_proj ", shape(l0 + "q_proj.bias") ? "has" : "has no", " bias", hint);
  }
  if (value_model || shape("score.weight") || !shape(emb)) return;  // a value head has no lm_head
  const bool config_tied = cs.tie_word_embeddings.value_or(false);
  if (!config_tied && !tied_by_flag && !shape("lm_head.weight"))
    fail(c, ": tie_word_embeddings is false but the checkpoint has no lm_head.weight", hint);
  if (dropped_lm_head && !tied_by_flag) {
    // Config says tied, the checkpoint has an lm_head: it must be the embedding itself.
    const size_t e = by[emb]->src, h = *dropped_lm_head;
    const auto& te = src.tensors()[e];
    const auto& th = src.tensors()[h];
    bool same = te.shape == th.shape && te.dtype == th.dtype;
    if (same && !src.same_data(e, h)) {
      const uint64_t n = static_cast<uint64_t>(te.numel()) * dtype_size(te.dtype);
      auto a = alloc(n), b = alloc(n);
      src.read(e, te.dtype, a.get(), pool);
      src.read(h, th.dtype, b.get(), pool);
      same = std::memcmp(a.get(), b.get(), n) == 0;
    }
    if (!same)
      fail(c, ": tie_word_embeddings is true but the checkpoint's lm_head.weight differs from ", emb,
           ": merging would drop the output head", hint);
  }
}

void check_options(const MergeOptions& opt) {
  if (opt.backend != "fsdp" && opt.backend != "megatron")
    fail("--backend ", opt.backend, ": unknown (supported: fsdp, megatron)");
  if (opt.local_dir.empty()) fail("--local_dir is required");
  if (!opt.test && opt.target_dir.empty()) fail("--target_dir is required");
  if (opt.test && opt.test_hf_dir.empty()) fail("--test needs --test_hf_dir REF (a HuggingFace folder to compare with)");
  std::error_code ec;
  if (!fs::exists(opt.local_dir, ec)) fail("--local_dir ", opt.local_dir, ": no such folder");
  if (!fs::is_directory(opt.local_dir, ec)) fail("--local_dir ", opt.local_dir, ": is not a folder");
}

// What the merge reads: the checkpoint (for Megatron, its dist_ckpt folder and HF config are
// found in verl's layouts) and the HF folder beside it, with its config.json.
struct Inputs {
  bool megatron = false;
  MegatronPaths mpaths;
  fs::path hf_dir, cfg_path;
  ojson config;
  ConfigShapes shapes;  // the config's shape fields (text and vision)
  bool tied = false;  // --tie-word-embedding or the config's tie_word_embeddings
};

Inputs locate_inputs(const MergeOptions& opt) {
  Inputs in;
  in.megatron = opt.backend == "megatron";
  if (in.megatron) in.mpaths = locate_megatron_checkpoint(opt.local_dir, opt.hf_config_dir);
  in.hf_dir = in.megatron                 ? fs::path(in.mpaths.hf_dir)
              : opt.hf_config_dir.empty() ? fs::path(opt.local_dir) / "huggingface"
                                          : fs::path(opt.hf_config_dir);
  in.cfg_path = in.hf_dir / "config.json";
  if (!fs::exists(in.cfg_path)) fail(in.cfg_path.string(), ": missing (the checkpoint's HuggingFace config is needed)");
  in.config = read_json(in.cfg_path);
  if (!in.config.is_object()) fail(in.cfg_path.string(), ": expected a JSON object");
  in.shapes = read_config_shapes(in.config.dump(), in.cfg_path.string());
  in.tied = opt.tie_word_embedding || in.shapes.tie_word_embeddings.value_or(false);
  return in;
}

// How the target is claimed (before any work): refused if it is or holds an input, if it is
// not empty (without --overwrite) or if another merge is writing it.
OutputClaim::Options claim_options(const MergeOptions& opt, const Inputs& in) {
  OutputClaim::Options co;
  co.kind = OutputClaim::Kind::Folder;
  co.overwrite = opt.overwrite;
  co.what = "--target_dir";
  std::vector<std::string> listed;
  list_inputs(opt.local_dir, listed);
  list_inputs(in.hf_dir, listed);
  if (in.megatron) list_inputs(in.mpaths.dist_dir, listed);
  // A previous output inside the checkpoint folder (--target_dir CKPT/merged) is not an input:
  // what lies below the target is dropped, except the folders that are read (then refused).
  std::error_code ec;
  const fs::path rt = fs::weakly_canonical(fs::absolute(opt.target_dir), ec);
  const std::set<std::string> roots = {opt.local_dir, in.hf_dir.string(), in.megatron ? in.mpaths.dist_dir : opt.local_dir};
  for (const auto& path : listed) {
    const fs::path ri = fs::weakly_canonical(fs::absolute(path), ec);
    const auto rel = ri.lexically_relative(rt);
    const bool below = !ec && !rel.empty() && *rel.begin() != "..";
    if (!below || roots.count(path)) co.inputs.push_back(path);
  }
  return co;
}

std::unique_ptr<CheckpointSource> open_source(const MergeOptions& opt, const Inputs& in) {
  if (!in.megatron) return std::make_unique<FsdpSource>(opt.local_dir);
  return std::make_unique<MegatronSource>(in.mpaths.dist_dir,
                                          parse_model_config(in.config.dump(), in.cfg_path.string(), ConfigUse::Megatron),
                                          MegatronOptions{opt.tie_word_embedding, opt.is_value_model});
}

// The output tensors: the model's (base names restored, vision-language names as save_pretrained
// writes them, a tied lm_head dropped, LoRA pairs attached for --fuse-lora) and the LoRA
// adapter's, each in name order.
struct NameMap {
  std::vector<OutTensor> model, adapter;
  LoraInfo lora;
  std::optional<size_t> dropped_lm_head;  // source index of an lm_head dropped as tied
};

// A LoRA adapter tensor: its PEFT name, and what it tells of the adapter (rank, targets).
void add_adapter_tensor(OutTensor ot, const std::string& n, NameMap& map) {
  map.lora.present = true;
  ot.name = replace_all(replace_all(n, ".default.weight", ".weight"), ".default.bias", ".bias");
  std::vector<std::string> parts;
  size_t s = 0, p;
  while ((p = ot.name.find('.', s)) != std::string::npos) {
    parts.push_back(ot.name.substr(s, p - s));
    s = p + 1;
  }
  parts.push_back(ot.name.substr(s));
  if (parts.size() >= 3) map.lora.target_modules.insert(parts[parts.size() - 3]);
  if (n.find("lora_A") != std::string::npos && ot.shape.size() == 2) map.lora.r = std::min(ot.shape[0], ot.shape[1]);
  map.adapter.push_back(std::move(ot));
}

NameMap map_names(const CheckpointSource& src, const MergeOptions& opt, const std::string& arch, bool tied,
                  DType out_dtype) {
  const auto& st = src.tensors();
  std::map<std::string, size_t> by_name;
  for (size_t i = 0; i < st.size(); ++i) by_name[st[i].name] = i;
  NameMap map;
  std::set<std::string> used;
  for (size_t i = 0; i < st.size(); ++i) {
    const std::string& n = st[i].name;
    OutTensor ot;
    ot.src = i;
    ot.shape = st[i].shape;
    ot.dtype = dtype_is_float(st[i].dtype) ? out_dtype : st[i].dtype;
    if (n.find("lora_") != std::string::npos) {
      add_adapter_tensor(std::move(ot), n, map);
      continue;
    }
    std::string name = n;
    if (starts_with(name, "base_model.model.")) name = name.substr(std::strlen("base_model.model."));
    name = replace_all(replace_all(name, ".base_layer.weight", ".weight"), ".base_layer.bias", ".bias");
    name = vision_language_saved_name(arch, name);
    if (tied && name == "lm_head.weight") {
      map.dropped_lm_head = i;
      continue;
    }
    if (opt.fuse_lora && n.find(".base_layer.weight") != std::string::npos) {
      const std::string stem = n.substr(0, n.size() - std::strlen(".base_layer.weight"));
      auto a = by_name.find(stem + ".lora_A.default.weight");
      auto b = by_name.find(stem + ".lora_B.default.weight");
      if (a != by_name.end() && b != by_name.end()) {
        ot.lora_a = static_cast<int>(a->second);
        ot.lora_b = static_cast<int>(b->second);
      }
    }
    if (!used.insert(name).second) fail(opt.local_dir, ": two checkpoint keys map to the output name '", name, "'");
    ot.name = name;
    map.model.push_back(ot);
  }
  auto by_out_name = [](const OutTensor& a, const OutTensor& b) { return a.name < b.name; };
  std::sort(map.model.begin(), map.model.end(), by_out_name);
  separate_largest(map.model);
  std::sort(map.adapter.begin(), map.adapter.end(), by_out_name);
  if (opt.fuse_lora && !map.lora.present) fail("--fuse-lora: the checkpoint has no LoRA adapter weights");
  return map;
}

// The adapter's alpha, rank and task type (flags, then lora_train_meta.json, then the weights
// and the architecture); returns the LoRA scale alpha / r.
double resolve_lora(LoraInfo& lora, const MergeOptions& opt, const ojson& config) {
  const fs::path meta_path = fs::path(opt.local_dir) / "lora_train_meta.json";
  std::optional<double> meta_alpha;
  if (fs::exists(meta_path)) {
    ojson meta = read_json(meta_path);
    if (meta.contains("lora_alpha") && meta["lora_alpha"].is_number()) meta_alpha = meta["lora_alpha"].get<double>();
    if (meta.contains("r") && meta["r"].is_number_integer() && meta["r"].get<int64_t>() > 0) {
      const int64_t mr = meta["r"].get<int64_t>();
      if (lora.r && mr != lora.r && !opt.quiet)
        std::fprintf(stderr, "warning: %s says r=%lld but the adapter weights have rank %lld; using %lld\n",
                     meta_path.c_str(), (long long)mr, (long long)lora.r, (long long)mr);
      lora.r = mr;
    }
    if (meta.contains("task_type") && meta["task_type"].is_string()) lora.task_type = meta["task_type"].get<std::string>();
  }
  if (!lora.task_type) {
    // Not recorded: infer it from the architecture as PEFT names them (a critic is TOKEN_CLS).
    std::string arch;
    if (config.contains("architectures") && config["architectures"].is_array() && !config["architectures"].empty() &&
        config["architectures"][0].is_string())
      arch = config["architectures"][0].get<std::string>();
    const bool token_cls = opt.is_value_model || arch.find("ForTokenClassification") != std::string::npos;
    lora.task_type = token_cls ? "TOKEN_CLS" : "CAUSAL_LM";
  }
  if (opt.lora_alpha) lora.alpha = *opt.lora_alpha;
  else if (meta_alpha) lora.alpha = *meta_alpha;
  else
    fail(opt.local_dir, ": LoRA adapter weights found but lora_alpha is unknown (", meta_path.filename().string(),
         fs::exists(meta_path) ? " has no lora_alpha" : " is missing", "); pass --lora-alpha");
  if (lora.r <= 0) fail(opt.local_dir, ": cannot infer the LoRA rank from the adapter weights");
  return lora.alpha / static_cast<double>(lora.r);
}

// model.safetensors, or size-capped model-0000k-of-0000n.safetensors files and their index.
void write_model(const CheckpointSource& src, const std::vector<OutTensor>& model, const MergeOptions& opt,
                 double lora_scale, const fs::path& tmp, ThreadPool& pool, Progress& progress) {
  const auto bounds = shard_bounds(model, opt.max_shard_size);
  const size_t nfiles = bounds.size() - 1;
  std::vector<std::string> names, paths;
  for (size_t k = 0; k < nfiles; ++k) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "model-%05zu-of-%05zu.safetensors", k + 1, nfiles);
    names.push_back(nfiles == 1 ? std::string("model.safetensors") : std::string(buf));
    paths.push_back((tmp / names.back()).string());
  }
  write_files(src, model, bounds, paths, lora_scale, pool, progress);
  if (nfiles == 1) return;
  ojson index;
  uint64_t model_bytes = 0;
  ojson wm = ojson::object();
  for (size_t k = 0; k < nfiles; ++k)
    for (size_t i = bounds[k]; i < bounds[k + 1]; ++i) {
      wm[model[i].name] = names[k];
      model_bytes += model[i].nbytes();
    }
  index["metadata"] = {{"total_size", model_bytes}};
  index["weight_map"] = wm;
  write_text_file((tmp / "model.safetensors.index.json").string(), index.dump(2) + "\n");
}

// lora_adapter/: adapter_model.safetensors and a PEFT adapter_config.json.
void write_adapter(const CheckpointSource& src, const std::vector<OutTensor>& adapter, const LoraInfo& lora,
                   const fs::path& tmp, ThreadPool& pool, Progress& progress) {
  const fs::path ad = tmp / "lora_adapter";
  fs::create_directory(ad);
  write_files(src, adapter, {0, adapter.size()}, {(ad / "adapter_model.safetensors").string()}, 0, pool, progress);
  ojson ac;
  ac["alpha_pattern"] = ojson::object();
  ac["base_model_name_or_path"] = nullptr;
  ac["bias"] = "none";
  ac["fan_in_fan_out"] = false;
  ac["inference_mode"] = true;
  ac["init_lora_weights"] = true;
  ac["lora_alpha"] = lora.alpha == std::floor(lora.alpha) ? ojson(static_cast<int64_t>(lora.alpha)) : ojson(lora.alpha);
  ac["lora_dropout"] = 0.0;
  ac["modules_to_save"] = nullptr;
  ac["peft_type"] = "LORA";
  ac["r"] = lora.r;
  ac["rank_pattern"] = ojson::object();
  ac["target_modules"] = std::vector<std::string>(lora.target_modules.begin(), lora.target_modules.end());
  ac["task_type"] = lora.task_type ? ojson(*lora.task_type) : ojson(nullptr);
  ac["use_dora"] = false;
  ac["use_rslora"] = false;
  write_text_file((ad / "adapter_config.json").string(), ac.dump(4) + "\n");
}

// config.json with the dtype written, then tokenizer / generation config / custom code.
void write_config_and_extras(const MergeOptions& opt, const Inputs& in, DType out_dtype, const fs::path& tmp) {
  ojson config = in.config;
  bool had = false;
  for (const char* k : {"torch_dtype", "dtype"})
    if (config.contains(k)) {
      config[k] = dtype_torch_name(out_dtype);
      had = true;
    }
  if (!had) config["torch_dtype"] = dtype_torch_name(out_dtype);
  if (in.tied) config["tie_word_embeddings"] = true;
  write_text_file((tmp / "config.json").string(), config.dump(2) + "\n");
  bool skipped_code = false;
  for (const auto& e : fs::directory_iterator(in.hf_dir)) {
    if (!e.is_regular_file()) continue;
    const std::string fn = e.path().filename().string();
    const std::string ext = e.path().extension().string();
    if (fn == "config.json" || ext == ".safetensors" || ext == ".bin" || ext == ".pt" || ext == ".pth" ||
        fn == "model.safetensors.index.json" || fn == "pytorch_model.bin.index.json")
      continue;
    if (ext == ".py" && !opt.trust_remote_code) {
      skipped_code = true;
      continue;
    }
    fs::copy_file(e.path(), tmp / fn, fs::copy_options::overwrite_existing);
  }
  if (skipped_code && !opt.quiet)
    std::fprintf(stderr, "note: custom model code (*.py) in %s not copied; pass --trust-remote-code to copy it\n",
                 in.hf_dir.c_str());
}

// Writes everything under the claim's temporary folder beside the target, then publishes it.
void write_output(const CheckpointSource& src, const NameMap& map, const MergeOptions& opt, const Inputs& in,
                  DType out_dtype, double lora_scale, OutputClaim& claim, ThreadPool& pool) {
  const fs::path tmp = claim.temp();
  uint64_t total = 0;
  for (const auto& t : map.model) total += t.nbytes();
  for (const auto& t : map.adapter) total += t.nbytes();
  Progress progress("merging", map.model.size() + map.adapter.size(), total, !opt.quiet);
  write_model(src, map.model, opt, lora_scale, tmp, pool, progress);
  if (!map.adapter.empty()) write_adapter(src, map.adapter, map.lora, tmp, pool, progress);
  progress.finish();
  write_config_and_extras(opt, in, out_dtype, tmp);
  // Publish: replace the target only now that everything is complete.
  claim.commit();
  if (opt.quiet) return;
  const double t = progress.elapsed();
  std::fprintf(stderr, "merged %zu tensors (%s, %s) into %s in %.2f s (%s/s)%s\n", map.model.size(),
               human_bytes(static_cast<double>(total)).c_str(), dtype_torch_name(out_dtype), claim.target().c_str(), t,
               human_bytes(t > 0 ? total / t : 0).c_str(),
               map.adapter.empty()
                   ? ""
                   : (", LoRA adapter in lora_adapter/" + std::string(opt.fuse_lora ? " (fused into the base weights)" : ""))
                         .c_str());
}

}  // namespace

int run_merge(const MergeOptions& opt) {
  check_options(opt);
  const Inputs in = locate_inputs(opt);
  const DType out_dtype = resolve_dtype(opt.dtype, in.config);
  std::optional<OutputClaim> claim;
  if (!opt.test) claim.emplace(opt.target_dir, claim_options(opt, in));

  const unsigned hw = std::max(1u, std::thread::hardware_concurrency());
  ThreadPool pool(opt.threads > 0 ? static_cast<size_t>(opt.threads) : std::min(hw, 8u));
  const std::unique_ptr<CheckpointSource> src = open_source(opt, in);
  NameMap map = map_names(*src, opt, in.shapes.architecture, in.tied, out_dtype);
  const double lora_scale = map.lora.present ? resolve_lora(map.lora, opt, in.config) : 0;
  if (map.model.empty())
    fail(opt.local_dir, ": the checkpoint holds no model tensors", map.adapter.empty() ? "" : " (only LoRA adapter weights)",
         ": nothing to merge");
  check_config_against_weights(in.shapes, in.cfg_path, *src, map.model, map.dropped_lm_head, opt.tie_word_embedding,
                               opt.is_value_model, pool);
  // Every check is done: from here on only info lines (errors come before any of them).
  if (!opt.quiet) std::fprintf(stderr, "%s\n", src->describe().c_str());
  if (opt.test) return run_test(*src, map.model, opt, lora_scale, pool);

  try {
    write_output(*src, map, opt, in, out_dtype, lora_scale, *claim, pool);
  } catch (...) {
    claim.reset();  // removes the temporary folder, releases the claim
    throw;
  }
  if (!opt.hf_upload_path.empty())
    std::fprintf(stderr,
                 "note: --hf_upload_path %s: this machine has no network access to the Hub; nothing was uploaded. "
                 "The merged model is in %s; upload it with: huggingface-cli upload %s %s\n",
                 opt.hf_upload_path.c_str(), claim->target().c_str(), opt.hf_upload_path.c_str(),
                 claim->target().c_str());
  return 0;
}

}  // namespace verl
