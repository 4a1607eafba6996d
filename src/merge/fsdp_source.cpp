// fsdp_source.cpp — see fsdp_source.h. Memory: each read task holds one chunk of one
// rank's shard; the caller owns the output buffer.
#include "merge/fsdp_source.h"

#include <algorithm>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <regex>
#include <set>

#include "core/error.h"
#include "io/file.h"
#include "io/json_file.h"
#include "io/torch_checkpoint.h"
#include "merge/thread_pool.h"

namespace fs = std::filesystem;

namespace verl {

namespace {

constexpr int64_t kChunkElems = 4 << 20;  // elements per read task

std::string rank_file(const std::string& dir, int world, int rank) {
  return (fs::path(dir) / ("model_world_size_" + std::to_string(world) + "_rank_" + std::to_string(rank) + ".pt"))
      .string();
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string o = "[";
  for (size_t i = 0; i < s.size(); ++i) o += (i ? ", " : "") + std::to_string(s[i]);
  return o + "]";
}

// Which mesh dim FSDP shards over: the one named like fsdp, else the last.
int shard_mesh_dim(const DTensorMeta& m) {
  for (size_t i = 0; i < m.mesh_dim_names.size(); ++i) {
    const auto& n = m.mesh_dim_names[i];
    if (n == "fsdp" || n == "dp_shard" || n == "shard" || n == "dp_shard_cp") return static_cast<int>(i);
  }
  return static_cast<int>(m.mesh_shape.size()) - 1;
}

// verlcpp's own checkpoints: int64 {rank, world_size, step} in every model_/optim_ file.
constexpr const char* kRankKey = "_verlcpp.rank_world_step";

bool ends_with(const std::string& s, const std::string& suf) {
  return s.size() >= suf.size() && s.compare(s.size() - suf.size(), suf.size(), suf) == 0;
}

}  // namespace

// Every value must be a tensor (TransformerEngine-style `_extra_state` bytes excepted), and
// where the file records who wrote it, that must be the rank in its name.
void FsdpSource::check_file(const TorchCheckpoint& f, int rank) {
  for (const auto& [key, what] : f.other_values())
    if (!ends_with(key, "_extra_state")) fail(f.path(), ": key '", key, "' is ", what, ", not a tensor");
  const std::string swapped = " (rank files renamed, swapped or copied over each other?)";
  if (const CkptTensor* t = f.find(kRankKey)) {
    if (t->dtensor || t->local.numel() != 3)
      fail(f.path(), ": key '", kRankKey, "' should be an int64 tensor {rank, world_size, step}");
    const auto v = f.read_ints(t->local);
    if (v[0] != rank || v[1] != world_)
      fail(f.path(), ": written by rank ", v[0], " of world size ", v[1], " (", kRankKey, ") but its name says rank ", rank,
           " of world size ", world_, swapped);
    if (step_ < 0) step_ = v[2];
    else if (v[2] != step_)
      fail(f.path(), ": saved at step ", v[2], " but ", files_.empty() ? std::string("rank 0") : files_[0]->path(),
           " at step ", step_, " (files of different checkpoints mixed)");
  }
  for (const auto& t : f.tensors())
    if (t.dtensor && t.dtensor->file_rank >= 0 && t.dtensor->file_rank != rank)
      fail(f.path(), ": key '", t.key, "' was saved by rank ", t.dtensor->file_rank, " (", t.dtensor->rank_source,
           ") but the file name says rank ", rank, swapped);
}

FsdpSource::~FsdpSource() = default;

namespace {

// fsdp_config.json, read once per checkpoint (absent: nullopt).
std::optional<nlohmann::json> read_fsdp_config(const std::string& dir) {
  const fs::path cfg = fs::path(dir) / "fsdp_config.json";
  if (!fs::exists(cfg)) return std::nullopt;
  return read_json_file(cfg.string());
}

// World size from fsdp_config.json (checked against the file names), else from the file names.
int world_size_of(const std::string& dir, const std::optional<nlohmann::json>& config) {
  std::set<int> seen;
  static const std::regex re(R"(model_world_size_(\d+)_rank_(\d+)\.pt)");
  for (const auto& e : fs::directory_iterator(dir)) {
    std::smatch m;
    const std::string name = e.path().filename().string();
    if (std::regex_match(name, m, re)) seen.insert(std::stoi(m[1]));
  }
  const fs::path cfg = fs::path(dir) / "fsdp_config.json";
  if (config) {
    const nlohmann::json& j = *config;
    if (!j.is_object() || !j.contains("world_size") || !j["world_size"].is_number_integer() ||
        j["world_size"].get<int64_t>() < 1 || j["world_size"].get<int64_t>() > 1000000)
      fail(cfg.string(), ": expected a positive integer \"world_size\"");
    const int w = j["world_size"].get<int>();
    if (!seen.empty() && !seen.count(w)) {
      std::string found;
      for (int s : seen) found += (found.empty() ? "" : ", ") + std::to_string(s);
      fail(cfg.string(), ": says world_size ", w, " but the shard files are for world size ", found,
           " (model_world_size_", *seen.begin(), "_rank_*.pt)");
    }
    return w;
  }
  if (seen.empty()) fail(dir, ": no model_world_size_*_rank_*.pt files and no fsdp_config.json: not a verl FSDP checkpoint");
  if (seen.size() > 1) fail(dir, ": shard files for several world sizes and no fsdp_config.json to choose");
  return *seen.begin();
}

}  // namespace

int FsdpSource::detect_world_size(const std::string& dir) { return world_size_of(dir, read_fsdp_config(dir)); }

FsdpSource::FsdpSource(const std::string& local_dir) : dir_(local_dir) {
  if (!fs::is_directory(dir_)) fail(dir_, ": no such checkpoint folder");
  const std::optional<nlohmann::json> config = read_fsdp_config(dir_);
  world_ = world_size_of(dir_, config);
  std::vector<std::string> missing;
  for (int r = 0; r < world_; ++r)
    if (!fs::exists(rank_file(dir_, world_, r))) missing.push_back(fs::path(rank_file(dir_, world_, r)).filename());
  if (!missing.empty()) {
    std::string m;
    for (size_t i = 0; i < missing.size() && i < 8; ++i) m += (i ? ", " : "") + missing[i];
    if (missing.size() > 8) m += ", ...";
    fail(dir_, ": world size ", world_, " but ", missing.size(), " rank file(s) missing: ", m);
  }

  if (config && config->contains("units")) {
    plan_flat_units(*config);
    return;
  }
  auto rank0 = std::make_unique<TorchCheckpoint>(rank_file(dir_, world_, 0));
  // Mesh from the first DTensor; a checkpoint without DTensors is world size 1 or replicated.
  const DTensorMeta* mesh = nullptr;
  for (const auto& t : rank0->tensors())
    if (t.dtensor) { mesh = t.dtensor.get(); break; }

  std::vector<int> ranks;  // the ranks of one replica, in shard order
  if (!mesh) {
    ranks = {0};
    mesh_desc_ = "no DTensors (plain tensors, read from rank 0)";
  } else {
    int64_t total = 1;
    for (auto s : mesh->mesh_shape) total *= s;
    std::string dims;
    for (size_t i = 0; i < mesh->mesh_shape.size(); ++i)
      dims += (i ? ", " : "") + (i < mesh->mesh_dim_names.size() ? mesh->mesh_dim_names[i] + "=" : std::string()) +
              std::to_string(mesh->mesh_shape[i]);
    if (total != world_)
      fail(rank_file(dir_, world_, 0), ": device mesh (", dims, ") has ", total, " ranks but the world size is ",
           world_, " (check fsdp_config.json)");
    const int sd = shard_mesh_dim(*mesh);
    // Ranks with coordinate 0 on every mesh dim but the shard dim.
    int64_t stride = 1;
    for (size_t d = mesh->mesh_shape.size(); d-- > static_cast<size_t>(sd) + 1;) stride *= mesh->mesh_shape[d];
    for (int64_t j = 0; j < mesh->mesh_shape[sd]; ++j) {
      const int64_t lin = j * stride;
      ranks.push_back(static_cast<int>(mesh->mesh_ranks.empty() ? lin : mesh->mesh_ranks[lin]));
    }
    for (int r : ranks)
      if (r < 0 || r >= world_) fail(rank_file(dir_, world_, 0), ": device mesh names rank ", r, " outside the world");
    mesh_desc_ = "mesh (" + dims + "), reading " + std::to_string(ranks.size()) + " of " + std::to_string(world_) +
                 " rank files";
  }

  for (int r : ranks) {
    std::unique_ptr<TorchCheckpoint> f =
        (r == 0 && rank0) ? std::move(rank0) : std::make_unique<TorchCheckpoint>(rank_file(dir_, world_, r));
    check_file(*f, r);
    files_.push_back(std::move(f));
    file_rank_.push_back(r);
    input_bytes_ += File(files_.back()->path()).size();
  }
  const TorchCheckpoint& first = *files_[0];
  for (const auto& t : first.tensors())
    if (t.key != kRankKey) plan_tensor(t.key);
  // Keys present on another rank only are a malformed checkpoint.
  for (size_t f = 1; f < files_.size(); ++f)
    for (const auto& t : files_[f]->tensors())
      if (!first.find(t.key))
        fail(files_[f]->path(), ": key '", t.key, "' is not in ", first.path());
}

void FsdpSource::plan_flat_units(const nlohmann::json& j) {
  const fs::path cfg = fs::path(dir_) / "fsdp_config.json";
  const int fsdp = j.value("fsdp_size", world_);
  if (fsdp < 1 || world_ % fsdp != 0) fail(cfg.string(), ": fsdp_size ", fsdp, " does not divide world_size ", world_);
  for (int r = 0; r < fsdp; ++r) {  // the first shard group holds one whole replica
    auto f = std::make_unique<TorchCheckpoint>(rank_file(dir_, world_, r));
    check_file(*f, r);
    files_.push_back(std::move(f));
    file_rank_.push_back(r);
    input_bytes_ += File(files_.back()->path()).size();
  }
  mesh_desc_ = "verlcpp flat units, shard group of " + std::to_string(fsdp) + ", reading " + std::to_string(fsdp) + " of " +
               std::to_string(world_) + " rank files";
  if (!j["units"].is_array()) fail(cfg.string(), ": 'units' must be a list");
  // The file of world rank r (opened on first use: units of expert parallelism live on other
  // shard groups' ranks too).
  auto file_of = [&](int r) -> size_t {
    for (size_t f = 0; f < file_rank_.size(); ++f)
      if (file_rank_[f] == r) return f;
    auto f = std::make_unique<TorchCheckpoint>(rank_file(dir_, world_, r));
    check_file(*f, r);
    files_.push_back(std::move(f));
    file_rank_.push_back(r);
    input_bytes_ += File(files_.back()->path()).size();
    return files_.size() - 1;
  };
  try {
    for (const auto& u : j["units"]) {
      const std::string uname = u.at("name").get<std::string>();
      const int64_t S = u.at("shard_numel").get<int64_t>(), numel = u.at("numel").get<int64_t>();
      // "ranks": the world ranks holding the unit's shards, in order (expert parallelism);
      // otherwise the first shard group's.
      std::vector<int> ranks;
      if (u.contains("ranks")) {
        ranks = u.at("ranks").get<std::vector<int>>();
        if (ranks.empty()) fail(cfg.string(), ": unit '", uname, "': empty 'ranks'");
        for (int r : ranks)
          if (r < 0 || r >= world_) fail(cfg.string(), ": unit '", uname, "': rank ", r, " outside the world of ", world_);
      } else {
        for (int r = 0; r < fsdp; ++r) ranks.push_back(r);
      }
      const int nsh = static_cast<int>(ranks.size());
      if (S * nsh < numel)
        fail(cfg.string(), ": unit '", uname, "': ", nsh, " shards of ", S, " cannot hold ", numel, " elements");
      std::vector<std::pair<size_t, const CkptTensor*>> shards;
      std::vector<size_t> shard_file;
      for (int r : ranks) shard_file.push_back(file_of(r));
      for (size_t f : shard_file) {
        const CkptTensor* t = files_[f]->find(uname + ".flat");
        if (!t) fail(files_[f]->path(), ": no '", uname, ".flat' (listed in ", cfg.string(), ")");
        if (t->dtensor || t->local.size.size() != 1 || t->local.size[0] != S)
          fail(files_[f]->path(), ": '", uname, ".flat' should be a 1-D tensor of ", S, " elements");
        shards.push_back({static_cast<size_t>(t - files_[f]->tensors().data()), t});
      }
      for (const auto& p : u.at("params")) {
        SourceTensor st{p.at("name").get<std::string>(), shards[0].second->local.dtype,
                        p.at("shape").get<std::vector<int64_t>>()};
        const int64_t off = p.at("offset").get<int64_t>(), n = st.numel();
        if (off < 0 || off + n > numel) fail(cfg.string(), ": '", st.name, "' lies outside unit '", uname, "'");
        Plan plan;
        plan.shard_dim = 0;
        plan.flat = true;
        for (int r = 0; r < nsh; ++r) {
          const int64_t lo = std::max(off, r * S), hi = std::min(off + n, (r + 1) * S);
          if (lo >= hi) continue;
          TensorRef ref = shards[r].second->local;
          ref.storage_offset += lo - r * S;
          ref.size = {hi - lo};
          ref.stride = {1};
          synth_.push_back(ref);
          plan.pieces.push_back({static_cast<int>(shard_file[r]), shards[r].first, lo - off,
                                 static_cast<int>(synth_.size()) - 1});
        }
        tensors_.push_back(std::move(st));
        plans_.push_back(std::move(plan));
      }
    }
  } catch (const nlohmann::json::exception& e) {
    fail(cfg.string(), ": malformed unit table: ", e.what());
  }
}

const TensorRef& FsdpSource::local_of(const Piece& pc) const {
  return pc.synth >= 0 ? synth_[static_cast<size_t>(pc.synth)] : files_[pc.file]->tensors()[pc.entry].local;
}

namespace {

using Files = std::vector<std::unique_ptr<TorchCheckpoint>>;
using Parts = std::vector<const CkptTensor*>;  // one rank's entry of a key per file

std::string placements_str(const DTensorMeta& m) {
  std::string pl;
  for (const auto& p : m.placements) pl += (pl.empty() ? "" : ", ") + p.str();
  return pl;
}

// Every rank holds the key as the same kind of tensor (DTensor or plain) with the same dtype.
void check_same_kind(const Files& files, const Parts& parts, const std::string& key) {
  const CkptTensor& t0 = *parts[0];
  for (size_t f = 0; f < parts.size(); ++f) {
    const CkptTensor& t = *parts[f];
    if (static_cast<bool>(t.dtensor) != static_cast<bool>(t0.dtensor))
      fail(files[f]->path(), ": key '", key, "' is a ", t.dtensor ? "DTensor" : "plain tensor", " here but a ",
           t0.dtensor ? "DTensor" : "plain tensor", " in ", files[0]->path());
    if (t.local.dtype != t0.local.dtype)
      fail(files[f]->path(), ": key '", key, "' has dtype ", dtype_st_name(t.local.dtype), " but ",
           dtype_st_name(t0.local.dtype), " in ", files[0]->path());
  }
}

// A replicated buffer / unwrapped parameter: every rank must agree on the shape.
void check_plain(const Files& files, const Parts& parts, const std::string& key) {
  for (size_t f = 1; f < parts.size(); ++f)
    if (parts[f]->local.size != parts[0]->local.size)
      fail(files[f]->path(), ": key '", key, "' has shape ", shape_str(parts[f]->local.size), " but ",
           shape_str(parts[0]->local.size), " in ", files[0]->path(), " (a plain tensor must be identical on every rank)");
}

// Placements the FSDP merger can assemble (one sharded mesh dim `sd`, no Partial or
// StridedShard), and the same placements and global shape on every rank.
void check_placements(const Files& files, const Parts& parts, const std::string& key, int sd) {
  const DTensorMeta& m0 = *parts[0]->dtensor;
  const std::string pl = placements_str(m0);
  for (size_t md = 0; md < m0.placements.size(); ++md) {
    const Placement& p = m0.placements[md];
    if (p.kind == Placement::Kind::Partial)
      fail(files[0]->path(), ": key '", key, "' has a Partial placement (unreduced values): cannot be merged");
    if (p.kind == Placement::Kind::StridedShard)
      fail(files[0]->path(), ": key '", key, "' has placement ", p.str(),
           " (FSDP combined with tensor parallelism): not supported by the FSDP merger");
    if (p.kind == Placement::Kind::Unknown)
      fail(files[0]->path(), ": key '", key, "' has an unknown placement '", p.cls, "'");
    if (static_cast<int>(md) != sd && p.kind != Placement::Kind::Replicate)
      fail(files[0]->path(), ": key '", key, "' is sharded over mesh dim ", md, " (", pl,
           "): only one sharded mesh dim (FSDP / HSDP) is supported");
  }
  for (size_t f = 1; f < parts.size(); ++f) {
    const DTensorMeta& m = *parts[f]->dtensor;
    const std::string plf = placements_str(m);
    if (plf != pl)
      fail(files[f]->path(), ": key '", key, "' has placements (", plf, ") but (", pl, ") in ", files[0]->path());
    if (m.global_shape != m0.global_shape)
      fail(files[f]->path(), ": key '", key, "' has global shape ", shape_str(m.global_shape), " but ",
           shape_str(m0.global_shape), " in ", files[0]->path());
  }
}

// torch.chunk: rank f holds rows [f·C, min((f+1)·C, n)), C = ceil(n / ranks); a shard may be
// padded up to C rows (trimmed when read), never more.
void check_chunk_bounds(const Files& files, const Parts& parts, const std::string& key, int64_t d,
                        const std::vector<int64_t>& g) {
  const int64_t nparts = static_cast<int64_t>(parts.size());
  const int64_t chunk = (g[d] + nparts - 1) / nparts;
  for (size_t f = 0; f < parts.size(); ++f) {
    const int64_t rows = parts[f]->local.size.size() > static_cast<size_t>(d) ? parts[f]->local.size[d] : 0;
    if (rows > chunk && parts[f]->dtensor->shard_offset < 0)
      fail(files[f]->path(), ": key '", key, "' local shard has ", rows, " rows along dim ", d,
           " but its global shape ", shape_str(g), " gives each of ", nparts, " ranks at most ", chunk,
           " (the recorded global shape is smaller than the shards)");
  }
}

// Rank f's shard fits the global shape outside the shard dim and starts where the ranks
// before it end (when it records its offset).
void check_shard_place(const Files& files, const Parts& parts, size_t f, const std::string& key, int64_t d,
                       const std::vector<int64_t>& g, int64_t off) {
  const auto& ls = parts[f]->local.size;
  for (size_t k = 0; k < g.size(); ++k)
    if (static_cast<int64_t>(k) != d && ls[k] != g[k])
      fail(files[f]->path(), ": key '", key, "' local shard shape ", shape_str(ls), " does not match the global shape ",
           shape_str(g), " outside the shard dim ", d);
  const int64_t so = parts[f]->dtensor->shard_offset;
  if (so >= 0 && ls[d] > 0 && so != off)
    fail(files[f]->path(), ": key '", key, "' shard starts at row ", so, " along dim ", d,
         " but the ranks before it end at ", off, " (shards out of order or overlapping)");
}

// The shards cover only `off` of the g[d] rows: names the first rank whose shard is shorter
// than torch.chunk gives it.
[[noreturn]] void fail_short_cover(const std::string& dir, const Files& files, const Parts& parts,
                                   const std::string& key, int64_t d, const std::vector<int64_t>& g, int64_t off) {
  const int64_t n = static_cast<int64_t>(parts.size());
  const int64_t chunk = (g[d] + n - 1) / n;
  for (size_t f = 0; f < parts.size(); ++f) {
    const int64_t want = std::clamp<int64_t>(g[d] - static_cast<int64_t>(f) * chunk, 0, chunk);
    if (parts[f]->local.size[d] < want)
      fail(files[f]->path(), ": key '", key, "' local shard shape ", shape_str(parts[f]->local.size), " has ",
           parts[f]->local.size[d], " rows along dim ", d, " but its share of the global shape ", shape_str(g), " is ",
           want, " (shapes disagree across ranks)");
  }
  fail(dir, ": key '", key, "': the shards cover ", off, " of ", g[d], " rows along dim ", d,
       " (shapes disagree across ranks)");
}

}  // namespace

void FsdpSource::plan_tensor(const std::string& key) {
  Parts parts;
  for (const auto& f : files_) {
    const CkptTensor* t = f->find(key);
    if (!t) fail(f->path(), ": key '", key, "' is missing (present in ", files_[0]->path(), ")");
    parts.push_back(t);
  }
  const CkptTensor& t0 = *parts[0];
  SourceTensor st{key, t0.local.dtype, {}};
  Plan plan;
  auto entry_of = [&](size_t f) { return static_cast<size_t>(parts[f] - files_[f]->tensors().data()); };
  check_same_kind(files_, parts, key);
  if (!t0.dtensor) {  // one copy, from rank 0
    check_plain(files_, parts, key);
    st.shape = t0.local.size;
    plan.pieces.push_back({0, entry_of(0), 0});
  } else {
    const int sd = shard_mesh_dim(*t0.dtensor);
    check_placements(files_, parts, key, sd);
    const auto& g = t0.dtensor->global_shape;
    st.shape = g;
    const Placement& p = t0.dtensor->placements[sd];
    if (p.kind == Placement::Kind::Replicate) {
      if (t0.local.size != g)
        fail(files_[0]->path(), ": key '", key, "' is replicated but its local shape ", shape_str(t0.local.size),
             " differs from the global shape ", shape_str(g));
      plan.pieces.push_back({0, entry_of(0), 0});
    } else {
      const int64_t d = p.dim < 0 ? p.dim + static_cast<int64_t>(g.size()) : p.dim;
      if (d < 0 || d >= static_cast<int64_t>(g.size()))
        fail(files_[0]->path(), ": key '", key, "' is sharded on dim ", p.dim, " of a ", g.size(), "-D tensor");
      plan.shard_dim = static_cast<int>(d);
      check_chunk_bounds(files_, parts, key, d, g);
      int64_t off = 0;
      for (size_t f = 0; f < parts.size(); ++f) {
        check_shard_place(files_, parts, f, key, d, g, off);
        const int64_t rows = parts[f]->local.size[d];
        if (rows > 0 && off < g[d]) plan.pieces.push_back({static_cast<int>(f), entry_of(f), off});
        off += rows;
      }
      if (off < g[d]) fail_short_cover(dir_, files_, parts, key, d, g, off);
    }
  }
  tensors_.push_back(std::move(st));
  plans_.push_back(std::move(plan));
}

namespace {

// A piece's layout in the (global, or flat) shape g around shard dim d (-1: the piece is the
// whole tensor): `outer` blocks of `keep` local rows of `inner` elements each.
struct PieceGeometry {
  int64_t outer = 1, inner = 1, keep = 1;
  PieceGeometry(const TensorRef& local, const std::vector<int64_t>& g, int d) {
    if (d < 0) {
      inner = local.numel();
      return;
    }
    for (int k = 0; k < d; ++k) outer *= g[k];
    for (size_t k = d + 1; k < g.size(); ++k) inner *= g[k];
    keep = local.size[d];
  }
};

}  // namespace

std::vector<FsdpSource::ReadTask> FsdpSource::plan_reads(const Plan& plan, const std::vector<int64_t>& g) const {
  std::vector<ReadTask> tasks;
  const int d = plan.shard_dim;
  for (size_t pi = 0; pi < plan.pieces.size(); ++pi) {
    const Piece& pc = plan.pieces[pi];
    const PieceGeometry pg(local_of(pc), g, d);
    const int64_t rows = pg.keep;
    const int64_t keep = d >= 0 ? std::min(pg.keep, g[d] - pc.offset) : pg.keep;  // padding rows are trimmed
    const int64_t rowlen = rows * pg.inner;
    auto add_range = [&](int64_t a, int64_t b) {
      for (int64_t s = a; s < b; s += kChunkElems) tasks.push_back({pi, s, std::min(b, s + kChunkElems)});
    };
    if (keep == rows) add_range(0, pg.outer * rowlen);
    else
      for (int64_t ob = 0; ob < pg.outer; ++ob) add_range(ob * rowlen, ob * rowlen + keep * pg.inner);
  }
  return tasks;
}

void FsdpSource::read_task(const Plan& plan, const std::vector<int64_t>& g, const ReadTask& t, DType in, DType out,
                           uint8_t* o) const {
  thread_local std::vector<uint8_t> scratch;
  const size_t isz = dtype_size(in), osz = dtype_size(out);
  const int d = plan.shard_dim;
  const Piece& pc = plan.pieces[t.piece];
  const TorchCheckpoint& file = *files_[pc.file];
  const TensorRef& local = local_of(pc);
  const PieceGeometry pg(local, g, d);
  const int64_t n = t.b - t.a;
  if (in == out && (d <= 0 || pg.outer == 1)) {  // same dtype, contiguous destination: read straight into place
    const int64_t dpos = (d < 0) ? t.a : pc.offset * pg.inner + t.a;
    file.read_elements(local, t.a, n, o + dpos * osz);
    return;
  }
  // Convert straight from the mapped file when the view is contiguous (no copy into a
  // scratch buffer), then drop those pages from our resident set.
  const uint8_t* srcp = file.map_elements(local, t.a, n);
  struct Release {
    const TorchCheckpoint& f;
    const TensorRef& r;
    int64_t a, n;
    ~Release() { f.release_elements(r, a, n); }
  };
  std::optional<Release> release;
  if (srcp) {
    release.emplace(Release{file, local, t.a, n});
  } else {
    scratch.resize(static_cast<size_t>(n) * isz);
    file.read_elements(local, t.a, n, scratch.data());
    srcp = scratch.data();
  }
  if (d < 0) {
    convert(srcp, in, o + t.a * osz, out, static_cast<size_t>(n));
    return;
  }
  const int64_t rowlen = pg.keep * pg.inner;  // local elements per outer index
  for (int64_t pos = t.a; pos < t.b;) {
    const int64_t ob = pos / rowlen, r = pos % rowlen;
    const int64_t end = std::min(t.b, (ob + 1) * rowlen);
    const int64_t dpos = (ob * g[d] + pc.offset) * pg.inner + r;
    convert(srcp + (pos - t.a) * isz, in, o + dpos * osz, out, static_cast<size_t>(end - pos));
    pos = end;
  }
}

void FsdpSource::read(size_t index, DType out, void* dst, ThreadPool& pool) const {
  const SourceTensor& st = tensors_.at(index);
  const Plan& plan = plans_[index];
  if (!can_convert(st.dtype, out))
    fail("key '", st.name, "': cannot convert ", dtype_st_name(st.dtype), " to ", dtype_st_name(out));
  const std::vector<int64_t> flat_shape = {st.numel()};
  const auto& g = plan.flat ? flat_shape : st.shape;
  const std::vector<ReadTask> tasks = plan_reads(plan, g);
  pool.parallel_for(tasks.size(),
                    [&](size_t ti) { read_task(plan, g, tasks[ti], st.dtype, out, static_cast<uint8_t*>(dst)); });
}

bool FsdpSource::same_data(size_t a, size_t b) const {
  const Plan &pa = plans_.at(a), &pb = plans_.at(b);
  if (pa.pieces.size() != pb.pieces.size() || pa.shard_dim != pb.shard_dim || pa.flat != pb.flat) return false;
  for (size_t i = 0; i < pa.pieces.size(); ++i) {
    const TensorRef &x = local_of(pa.pieces[i]), &y = local_of(pb.pieces[i]);
    if (pa.pieces[i].file != pb.pieces[i].file || pa.pieces[i].offset != pb.pieces[i].offset || x.storage.key.empty() ||
        x.storage.key != y.storage.key || x.storage_offset != y.storage_offset || x.size != y.size || x.stride != y.stride ||
        x.dtype != y.dtype)
      return false;
  }
  return true;
}

std::string FsdpSource::describe() const {
  return "FSDP checkpoint " + dir_ + ": world size " + std::to_string(world_) + ", " + mesh_desc_ + ", " +
         std::to_string(tensors_.size()) + " tensors";
}

}  // namespace verl
