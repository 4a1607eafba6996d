// balance.cpp — port of verl.utils.seqlen_balancing. karmarkar_karp reproduces Python's heapq
// (siftdown / siftup) and stable sorts step by step so that ties break the same way.
#include "core/balance.h"

#include <algorithm>
#include <numeric>
#include <set>

#include "core/error.h"

namespace verl {

namespace {

struct KKSet {
  int64_t sum = 0;
  std::vector<std::pair<int, int64_t>> items;  // (index, value)
};
bool set_lt(const KKSet& a, const KKSet& b) {
  if (a.sum != b.sum) return a.sum < b.sum;
  if (a.items.size() != b.items.size()) return a.items.size() < b.items.size();
  return a.items < b.items;
}
void sort_desc(std::vector<KKSet>& sets) {  // sorted(sets, reverse=True): stable, descending
  std::stable_sort(sets.begin(), sets.end(), [](const KKSet& x, const KKSet& y) { return set_lt(y, x); });
}

struct KKState {
  std::vector<KKSet> sets;
  int64_t spread() const { return sets.front().sum - sets.back().sum; }
};
bool state_lt(const KKState& a, const KKState& b) {
  if (a.spread() != b.spread()) return a.spread() > b.spread();
  return set_lt(b.sets[0], a.sets[0]);  // a.sets[0] > b.sets[0]
}

// CPython heapq on a vector, comparing with state_lt.
void siftdown(std::vector<KKState>& h, size_t start, size_t pos) {
  KKState item = std::move(h[pos]);
  while (pos > start) {
    size_t parent = (pos - 1) >> 1;
    if (state_lt(item, h[parent])) {
      h[pos] = std::move(h[parent]);
      pos = parent;
      continue;
    }
    break;
  }
  h[pos] = std::move(item);
}
void siftup(std::vector<KKState>& h, size_t pos) {
  size_t end = h.size(), start = pos;
  KKState item = std::move(h[pos]);
  size_t child = 2 * pos + 1;
  while (child < end) {
    size_t right = child + 1;
    if (right < end && !state_lt(h[child], h[right])) child = right;
    h[pos] = std::move(h[child]);
    pos = child;
    child = 2 * pos + 1;
  }
  h[pos] = std::move(item);
  siftdown(h, start, pos);
}
void heap_push(std::vector<KKState>& h, KKState s) {
  h.push_back(std::move(s));
  siftdown(h, 0, h.size() - 1);
}
KKState heap_pop(std::vector<KKState>& h) {
  KKState last = std::move(h.back());
  h.pop_back();
  if (h.empty()) return last;
  KKState ret = std::move(h[0]);
  h[0] = std::move(last);
  siftup(h, 0);
  return ret;
}

KKState make_state(const std::vector<std::pair<int, int64_t>>& items, int k) {
  KKState s;
  s.sets.resize(k);
  for (size_t i = 0; i < items.size(); ++i) {
    s.sets[i].items.push_back(items[i]);
    s.sets[i].sum += items[i].second;
  }
  sort_desc(s.sets);
  return s;
}

int64_t ceildiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

Partitions karmarkar_karp(const std::vector<int64_t>& values, int k, bool equal_size) {
  std::vector<std::pair<int64_t, int>> sorted;  // (value, index), ascending
  for (size_t i = 0; i < values.size(); ++i) sorted.emplace_back(values[i], int(i));
  std::sort(sorted.begin(), sorted.end());
  std::vector<KKState> heap;
  if (equal_size) {
    if (values.size() % k != 0) fail("karmarkar_karp: ", values.size(), " items do not divide into ", k, " equal partitions");
    for (size_t off = 0; off < sorted.size(); off += k) {
      std::vector<std::pair<int, int64_t>> items;
      for (int i = 0; i < k; ++i) items.emplace_back(sorted[off + i].second, sorted[off + i].first);
      heap_push(heap, make_state(items, k));
    }
  } else {
    for (auto& [v, idx] : sorted) heap_push(heap, make_state({{idx, v}}, k));
  }
  if (heap.empty()) return Partitions(k);
  while (heap.size() > 1) {
    KKState s0 = heap_pop(heap);
    KKState s1 = heap_pop(heap);
    for (int i = 0; i < k; ++i) {
      KKSet& dst = s0.sets[i];
      const KKSet& src = s1.sets[k - 1 - i];
      dst.items.insert(dst.items.end(), src.items.begin(), src.items.end());
      dst.sum += src.sum;
    }
    sort_desc(s0.sets);
    heap_push(heap, std::move(s0));
  }
  Partitions parts;
  for (const auto& s : heap[0].sets) {
    std::vector<int> p;
    for (const auto& it : s.items) p.push_back(it.first);
    parts.push_back(std::move(p));
  }
  return parts;
}

Partitions get_seqlen_balanced_partitions(const std::vector<int64_t>& values, int k, bool equal_size) {
  if (k <= 0) fail("balanced partitions: the number of partitions must be positive, got ", k);
  if (int64_t(values.size()) < k)
    fail("balanced partitions: ", values.size(), " items cannot fill ", k, " non-empty partitions");
  Partitions parts = karmarkar_karp(values, k, equal_size);
  std::vector<char> seen(values.size(), 0);
  for (size_t i = 0; i < parts.size(); ++i) {
    if (parts[i].empty()) fail("balanced partitions: partition ", i, " is empty");
    std::sort(parts[i].begin(), parts[i].end());
    for (int idx : parts[i]) seen[idx] = 1;
  }
  if (std::find(seen.begin(), seen.end(), 0) != seen.end()) fail("balanced partitions: an item was lost");
  return parts;
}

namespace {

// Group indices → sample indices (groups of g consecutive samples).
void expand_groups(Partitions& parts, int g) {
  if (g <= 1) return;
  for (auto& p : parts) {
    std::vector<int> s;
    for (int gi : p)
      for (int j = 0; j < g; ++j) s.push_back(gi * g + j);
    p = std::move(s);
  }
}

// verl's use_dynamic_bsz_balance: micro-batches by workload, descending, then the even
// positions reversed followed by the odd ones (small – large – small).
Partitions order_small_large_small(const Partitions& parts, const std::vector<int64_t>& workloads, int g) {
  std::vector<std::pair<int64_t, int>> key(parts.size());
  for (size_t i = 0; i < parts.size(); ++i) {
    int64_t w = 0;
    for (size_t j = 0; j < parts[i].size(); j += g) w += workloads[parts[i][j] / g];
    key[i] = {w, parts[i].empty() ? 0 : parts[i][0]};
  }
  std::vector<size_t> order(parts.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return key[b] < key[a]; });
  Partitions sorted;
  for (size_t i : order) sorted.push_back(parts[i]);
  Partitions out;
  std::vector<size_t> even;
  for (size_t i = 0; i < sorted.size(); i += 2) even.push_back(i);
  for (auto it = even.rbegin(); it != even.rend(); ++it) out.push_back(sorted[*it]);
  for (size_t i = 1; i < sorted.size(); i += 2) out.push_back(sorted[i]);
  return out;
}

}  // namespace

Partitions rearrange_micro_batches(const std::vector<int64_t>& seqlens, const DynamicBatchOptions& o) {
  const int64_t B = int64_t(seqlens.size());
  if (B == 0) fail("dynamic batching: the batch is empty");
  if (o.max_token_len <= 0) fail("dynamic batching: max_token_len must be positive, got ", o.max_token_len);
  const int g = o.force_group_size;
  if (g <= 0 || B % g != 0) fail("dynamic batching: batch size ", B, " is not divisible by force_group_size ", g);
  int64_t max_seq = *std::max_element(seqlens.begin(), seqlens.end());
  if (max_seq > o.max_token_len) {
    int64_t i = std::max_element(seqlens.begin(), seqlens.end()) - seqlens.begin();
    fail("dynamic batching: sample ", i, " has ", max_seq, " tokens, more than max_token_len ", o.max_token_len,
         " (raise the token budget)");
  }
  const int64_t total = std::accumulate(seqlens.begin(), seqlens.end(), int64_t(0));
  const int64_t num_groups = B / g;
  int64_t n = std::min(num_groups, ceildiv(total, o.max_token_len));
  if (o.min_num_micro_batch) n = std::max<int64_t>(*o.min_num_micro_batch, n);
  const bool sync = bool(o.dp_max);
  if (sync) {
    std::vector<int64_t> v{n};
    o.dp_max(v);
    n = v[0];
  }
  if (o.num_batches_divided_by) {
    int64_t d = *o.num_batches_divided_by;
    n = (n + d - 1) / d * d;
  }
  std::vector<int64_t> workloads, group_lens;
  for (int64_t gi = 0; gi < num_groups; ++gi) {
    int64_t w = 0, t = 0;
    for (int j = 0; j < g; ++j) w += calculate_workload(seqlens[gi * g + j]), t += seqlens[gi * g + j];
    workloads.push_back(w);
    group_lens.push_back(t);
  }
  int64_t max_group = *std::max_element(group_lens.begin(), group_lens.end());
  int64_t min_groups = num_groups;
  if (sync) {  // agree on the fatal constraints before any rank raises
    std::vector<int64_t> v{max_group, -num_groups};
    o.dp_max(v);
    max_group = v[0];
    min_groups = -v[1];
  }
  if (max_group > o.max_token_len)
    fail("dynamic batching: a forced group of ", max_group, " tokens exceeds max_token_len ", o.max_token_len);
  const int64_t step = o.num_batches_divided_by.value_or(1);
  Partitions parts;
  while (true) {
    if (n > min_groups)
      fail("dynamic batching: cannot satisfy max_token_len ", o.max_token_len, ": ", n,
           " non-empty micro-batches needed but a rank has only ", min_groups, g > 1 ? " groups" : " samples");
    parts = get_seqlen_balanced_partitions(workloads, int(n), false);
    bool ok = true;
    for (const auto& p : parts) {
      int64_t t = 0;
      for (int idx : p) t += group_lens[idx];
      ok = ok && t <= o.max_token_len;
    }
    if (sync) {
      std::vector<int64_t> v{ok ? 0 : 1};  // MIN(ok) == -MAX(!ok)
      o.dp_max(v);
      ok = v[0] == 0;
    }
    if (ok) break;
    n += step;
  }
  expand_groups(parts, g);
  if (o.use_dynamic_bsz_balance) parts = order_small_large_small(parts, workloads, g);
  return parts;
}

Partitions fixed_micro_batches(int batch_size, int micro_batch_size) {
  if (micro_batch_size <= 0) fail("micro_batch_size must be positive, got ", micro_batch_size);
  Partitions parts;
  for (int s = 0; s < batch_size; s += micro_batch_size) {
    std::vector<int> p;
    for (int i = s; i < std::min(batch_size, s + micro_batch_size); ++i) p.push_back(i);
    parts.push_back(std::move(p));
  }
  return parts;
}

std::vector<int> reverse_index(const Partitions& parts) {
  std::vector<int> flat;
  for (const auto& p : parts) flat.insert(flat.end(), p.begin(), p.end());
  std::vector<int> rev(flat.size(), -1);
  for (size_t i = 0; i < flat.size(); ++i) {
    if (flat[i] < 0 || size_t(flat[i]) >= flat.size() || rev[flat[i]] != -1)
      fail("reverse_index: the partitions are not a permutation of 0..", flat.size() - 1);
    rev[flat[i]] = int(i);
  }
  return rev;
}

Partitions plan_micro_batches(const std::vector<int64_t>& seqlens, const MicroBatchOptions& o) {
  if (o.max_token_len > 0) {
    DynamicBatchOptions d;
    d.max_token_len = o.max_token_len;
    d.min_num_micro_batch = o.min_num_micro_batch;
    d.num_batches_divided_by = o.num_batches_divided_by;
    d.dp_max = o.dp_max;
    return rearrange_micro_batches(seqlens, d);
  }
  const int n = static_cast<int>(seqlens.size());
  return fixed_micro_batches(n, o.micro_batch_size > 0 ? o.micro_batch_size : std::max(1, n));
}

}  // namespace verl
