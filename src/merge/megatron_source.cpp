// megatron_source.cpp — see megatron_source.h. A read of one output tensor becomes tasks,
// each a block of one DCP chunk: the chunk's elements for a fixed (layer, expert) index and a
// run of rows are contiguous in its item, so a task is one pread into a reused buffer (or
// straight into the output), then a scatter of the chunk's column box into place.
#include "merge/megatron_source.h"

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <map>

#include "io/dcp.h"
#include "core/error.h"
#include "hf/names.h"
#include "merge/megatron_names.h"
#include "merge/thread_pool.h"

namespace fs = std::filesystem;

namespace verl {

namespace {

constexpr int64_t kChunkElems = 4 << 20;  // elements per read task

bool has_metadata(const fs::path& p) { return fs::exists(p / ".metadata"); }

}  // namespace

MegatronPaths locate_megatron_checkpoint(const std::string& local_dir, const std::string& hf_config_dir) {
  const fs::path root(local_dir);
  if (!fs::is_directory(root)) fail(local_dir, ": no such checkpoint folder");
  MegatronPaths p;
  std::vector<fs::path> hf;  // candidate config folders, in order
  if (has_metadata(root)) {
    p.dist_dir = root.string();  // a dist_ckpt folder given directly
    const fs::path up = fs::absolute(root).lexically_normal().parent_path();
    hf = {up / "huggingface", up.parent_path() / "huggingface"};
  } else if (has_metadata(root / "model" / "dist_ckpt")) {
    p.dist_dir = (root / "model" / "dist_ckpt").string();
    hf = {root / "model" / "huggingface", root / "huggingface"};
  } else if (has_metadata(root / "dist_ckpt")) {
    p.dist_dir = (root / "dist_ckpt").string();  // layout before verl's v2
    hf = {root / "huggingface", root / "model" / "huggingface"};
  } else {
    fail(local_dir, ": no Megatron distributed checkpoint here (looked for .metadata in ", local_dir, ", ",
         (root / "model" / "dist_ckpt").string(), " and ", (root / "dist_ckpt").string(), ")");
  }
  if (!hf_config_dir.empty()) {
    p.hf_dir = hf_config_dir;
  } else {
    for (const auto& h : hf)
      if (fs::exists(h / "config.json")) { p.hf_dir = h.string(); break; }
    if (p.hf_dir.empty())
      fail((hf[0] / "config.json").string(), ": missing (the checkpoint's HuggingFace config is needed; also looked in ",
           hf[1].string(), "; pass --hf_model_config_path)");
  }
  return p;
}

MegatronSource::~MegatronSource() = default;

MegatronSource::MegatronSource(const std::string& dist_dir, const ModelConfig& config, const MegatronOptions& opt)
    : dir_(dist_dir) {
  const MegatronModel m(config, opt.tie_word_embedding, opt.is_value_model);
  family_ = family_names(config.family).name;
  ckpt_ = std::make_unique<DcpCheckpoint>(dist_dir);
  const auto& ts = ckpt_->tensors();
  std::map<std::string, std::string> seen;  // HF name -> Megatron key
  bool stacked = false, per_layer = false, have_output = false;
  for (size_t i = 0; i < ts.size(); ++i) {
    const DcpTensor& t = ts[i];
    std::vector<NamedView> views;
    bool used;
    try {
      used = megatron_to_hf(t.fqn, t.size, m, &views);
    } catch (const Error& e) {
      fail(dist_dir, ": ", e.what());
    }
    if (t.fqn.find("output_layer.") != std::string::npos) have_output = true;
    if (!used) { ++skipped_; continue; }
    if (t.fqn.rfind("decoder.layers.", 0) == 0) {
      const char c = t.fqn.size() > 15 ? t.fqn[15] : 0;
      (c >= '0' && c <= '9' ? per_layer : stacked) = true;
    }
    for (auto& v : views) {
      auto [it, fresh] = seen.emplace(v.name, t.fqn);
      if (!fresh)
        fail(dist_dir, ": keys '", it->second, "' and '", t.fqn, "' both give the HuggingFace tensor '", v.name, "'");
      SourceTensor st{v.name, t.dtype, {}};
      int64_t rows = 0;
      for (const auto& r : v.rows) rows += r.second - r.first;
      if (v.lead.size() < t.size.size()) {
        st.shape.push_back(rows);
        st.shape.insert(st.shape.end(), t.size.begin() + static_cast<ptrdiff_t>(v.lead.size()) + 1, t.size.end());
      }
      tensors_.push_back(std::move(st));
      views_.push_back({i, std::move(v.lead), std::move(v.rows)});
    }
  }
  if (tensors_.empty()) fail(dist_dir, ": no model weights found (", ts.size(), " tensors, all optimizer / RNG / extra state)");
  if (!seen.count("model.embed_tokens.weight"))
    fail(dist_dir, ": no embedding.word_embeddings.weight: not a Megatron GPT model checkpoint (or a pipeline stage is missing)");
  if (!m.tied && !m.value && !have_output)
    fail(dist_dir, ": no output_layer.weight and the config does not tie the embeddings (pass --tie-word-embedding if it does)");
  if (m.value && !seen.count("score.weight")) fail(dist_dir, ": --is-value-model but the checkpoint has no output_layer.weight");
  key_form_ = stacked && per_layer ? "mixed layer-stacked and per-layer keys" : per_layer ? "per-layer keys" : "layer-stacked keys";
}

uint64_t MegatronSource::input_bytes() const { return ckpt_->input_bytes(); }

std::string MegatronSource::describe() const {
  return "Megatron distributed checkpoint " + dir_ + ": " + std::to_string(ckpt_->tensors().size()) + " tensors (" +
         key_form_ + ", " + std::to_string(skipped_) + " skipped) in " + std::to_string(ckpt_->files().size()) +
         " files, family " + family_ + ", " + std::to_string(tensors_.size()) + " HuggingFace tensors";
}

namespace {

// Where a view's elements sit in its DCP tensor: L fixed leading dims, then (has_row) the
// row dim, then the trailing dims from tb on (`inner` elements per row of the full tensor).
struct ViewShape {
  size_t L, nd, tb;
  bool has_row;
  int64_t inner = 1;
  ViewShape(const DcpTensor& t, const MegatronSource::View& v)
      : L(v.lead.size()), nd(t.size.size()), tb(L < nd ? L + 1 : nd), has_row(L < nd) {
    for (size_t k = tb; k < nd; ++k) inner *= t.size[k];
  }
};

// One block of one DCP chunk: rows [a, b) of the full tensor, landing at output row dst_row.
struct ReadTask {
  size_t chunk;
  int64_t a, b;
  int64_t dst_row;
};

// The view's row ranges cut by the chunks that hold them, in blocks of about kChunkElems.
std::vector<ReadTask> plan_reads(const DcpTensor& t, const MegatronSource::View& v, const ViewShape& g) {
  std::vector<ReadTask> tasks;
  int64_t drow = 0;
  const std::vector<std::pair<int64_t, int64_t>> whole{{0, 1}};
  for (const auto& [ra, rb] : g.has_row ? v.rows : whole) {
    for (size_t ci = 0; ci < t.chunks.size(); ++ci) {
      const DcpChunk& c = t.chunks[ci];
      if (c.numel() == 0) continue;
      bool hit = true;
      for (size_t k = 0; k < g.L && hit; ++k) hit = c.offsets[k] <= v.lead[k] && v.lead[k] < c.offsets[k] + c.sizes[k];
      if (!hit) continue;
      const int64_t ia = g.has_row ? std::max(ra, c.offsets[g.L]) : 0;
      const int64_t ib = g.has_row ? std::min(rb, c.offsets[g.L] + c.sizes[g.L]) : 1;
      if (ia >= ib) continue;
      int64_t cinner = 1;
      for (size_t k = g.tb; k < g.nd; ++k) cinner *= c.sizes[k];
      const int64_t step = std::max<int64_t>(1, kChunkElems / std::max<int64_t>(cinner, 1));
      for (int64_t a = ia; a < ib; a += step) tasks.push_back({ci, a, std::min(ib, a + step), drow + (a - ra)});
    }
    drow += rb - ra;
  }
  return tasks;
}

// Places `nrows` rows of a chunk's box, read into `src` in the chunk's layout, at output row
// dst_row: the last partial trailing dim p bounds a contiguous run in both layouts.
void scatter_rows(const DcpTensor& t, const DcpChunk& c, const ViewShape& g, int64_t nrows, int64_t dst_row,
                  const uint8_t* src_bytes, DType in, uint8_t* o, DType out) {
  const size_t nd = g.nd, tb = g.tb, isz = dtype_size(in), osz = dtype_size(out);
  size_t p = nd - 1;
  while (c.sizes[p] == t.size[p]) --p;  // exists: the box does not span every trailing dim
  std::vector<int64_t> fstride(nd, 1);
  for (size_t k = nd; k-- > tb + 1;) fstride[k - 1] = fstride[k] * t.size[k];
  const int64_t run = c.sizes[p] * fstride[p];
  std::vector<int64_t> idx(nd, 0);  // multi-index over trailing dims [tb, p)
  int64_t src = 0;
  for (int64_t r = 0; r < nrows; ++r) {
    std::fill(idx.begin(), idx.end(), 0);
    while (true) {
      int64_t dpos = (dst_row + r) * g.inner + c.offsets[p] * fstride[p];
      for (size_t k = tb; k < p; ++k) dpos += (c.offsets[k] + idx[k]) * fstride[k];
      convert(src_bytes + src * static_cast<int64_t>(isz), in, o + dpos * static_cast<int64_t>(osz), out,
              static_cast<size_t>(run));
      src += run;
      size_t k = p;
      while (k > tb) {
        --k;
        if (++idx[k] < c.sizes[k]) break;
        idx[k] = 0;
        if (k == tb) { k = SIZE_MAX; break; }
      }
      if (k == SIZE_MAX || p == tb) break;
    }
  }
}

// Reads one task: one pread (into the output when the box spans every trailing dim and no
// conversion is needed), then a conversion or a scatter into place.
void read_task(const DcpCheckpoint& ckpt, const DcpTensor& t, const MegatronSource::View& v, const ViewShape& g,
               const ReadTask& tk, DType out, uint8_t* o) {
  thread_local std::vector<uint8_t> scratch;
  const DType in = t.dtype;
  const size_t isz = dtype_size(in), osz = dtype_size(out);
  const DcpChunk& c = t.chunks[tk.chunk];
  // Element index inside the chunk of (lead, row a, 0...): chunk row-major strides.
  std::vector<int64_t> cstride(g.nd, 1);
  for (size_t k = g.nd; k-- > 1;) cstride[k - 1] = cstride[k] * c.sizes[k];
  int64_t first = 0;
  for (size_t k = 0; k < g.L; ++k) first += (v.lead[k] - c.offsets[k]) * cstride[k];
  if (g.has_row) first += (tk.a - c.offsets[g.L]) * cstride[g.L];
  int64_t cinner = 1;
  bool full = true;  // the chunk spans every trailing dim: its rows are contiguous in the output
  for (size_t k = g.tb; k < g.nd; ++k) {
    cinner *= c.sizes[k];
    full = full && c.sizes[k] == t.size[k];
  }
  const int64_t nrows = tk.b - tk.a;
  const int64_t n = nrows * cinner;
  uint8_t* d = o + tk.dst_row * g.inner * static_cast<int64_t>(osz);
  if (full && in == out) {
    ckpt.read_chunk(t, tk.chunk, first, n, d);
    return;
  }
  scratch.resize(static_cast<size_t>(n) * isz);
  ckpt.read_chunk(t, tk.chunk, first, n, scratch.data());
  if (full) convert(scratch.data(), in, d, out, static_cast<size_t>(n));
  else scatter_rows(t, c, g, nrows, tk.dst_row, scratch.data(), in, o, out);
}

}  // namespace

void MegatronSource::read(size_t index, DType out, void* dst, ThreadPool& pool) const {
  const SourceTensor& st = tensors_.at(index);
  const View& v = views_[index];
  const DcpTensor& t = ckpt_->tensors()[v.tensor];
  if (!can_convert(t.dtype, out))
    fail("key '", st.name, "': cannot convert ", dtype_st_name(t.dtype), " to ", dtype_st_name(out));
  const ViewShape g(t, v);
  const std::vector<ReadTask> tasks = plan_reads(t, v, g);
  pool.parallel_for(tasks.size(), [&](size_t ti) { read_task(*ckpt_, t, v, g, tasks[ti], out, static_cast<uint8_t*>(dst)); });
}

}  // namespace verl
