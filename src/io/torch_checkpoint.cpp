// torch_checkpoint.cpp — torch.save state dicts and DTensor decoding (see torch_checkpoint.h).
#include "io/torch_checkpoint.h"

#include <optional>
#include <algorithm>
#include <cstring>

#include "core/error.h"

namespace verl {

namespace {

bool ends_with(const std::string& s, const std::string& suf) {
  return s.size() >= suf.size() && s.compare(s.size() - suf.size(), suf.size(), suf) == 0;
}
std::string base_name(const std::string& cls) {
  auto p = cls.rfind('.');
  return p == std::string::npos ? cls : cls.substr(p + 1);
}

std::vector<int64_t> int_tuple(const ValuePtr& v, const std::string& what, const std::string& where) {
  if (!v || !(v->is(Value::Kind::Tuple) || v->is(Value::Kind::List)))
    fail(where, ": ", what, ": expected a tuple of integers, found ", v ? v->repr() : "nothing");
  std::vector<int64_t> out;
  for (const auto& it : v->items) out.push_back(it->as_int(what.c_str()));
  return out;
}

Placement decode_placement(const ValuePtr& p, const std::string& where) {
  Placement out;
  if (!p || !p->is(Value::Kind::Object)) fail(where, ": placement is not an object: ", p ? p->repr() : "null");
  out.cls = p->str;
  const std::string b = base_name(p->str);
  if (b == "Shard" || b == "_StridedShard") {
    out.kind = b == "Shard" ? Placement::Kind::Shard : Placement::Kind::StridedShard;
    auto d = p->attr("dim");
    if (!d && p->args && !p->args->items.empty()) d = p->args->items[0];
    if (!d) fail(where, ": ", b, " placement without a dim");
    out.dim = d->as_int("Shard.dim");
    if (out.kind == Placement::Kind::StridedShard) {
      auto sf = p->attr("split_factor");
      if (sf) out.split_factor = sf->as_int("split_factor");
    }
  } else if (b == "Replicate") {
    out.kind = Placement::Kind::Replicate;
  } else if (b == "Partial" || b == "_Partial" || b == "_NormPartial" || b == "MaskPartial") {
    out.kind = Placement::Kind::Partial;
  }
  return out;
}

// The state dict of an inert object (or the dict half of a (dict, slots) state).
const Value* state_dict_of(const Value& obj) {
  if (!obj.state) return nullptr;
  if (obj.state->is(Value::Kind::Dict)) return obj.state.get();
  if (obj.state->is(Value::Kind::Tuple) && obj.state->items.size() == 2)
    for (size_t k : {1u, 0u})
      if (obj.state->items[k]->is(Value::Kind::Dict) && obj.state->items[k]->dict_size()) return obj.state->items[k].get();
  return nullptr;
}

// One mesh dim of a CuTe-style layout: its modes (sizes and strides), flattened from
// nested tuples; a bare integer is one mode; () is a size-1 dim with no modes.
void flatten_modes(const ValuePtr& v, const char* what, const std::string& where, std::vector<int64_t>& out) {
  if (!v) fail(where, ": ", what, ": expected a tuple of integers, found nothing");
  if (v->is(Value::Kind::Int)) { out.push_back(v->i); return; }
  if (!(v->is(Value::Kind::Tuple) || v->is(Value::Kind::List)))
    fail(where, ": ", what, ": expected a tuple of integers, found ", v->repr());
  for (const auto& it : v->items) flatten_modes(it, what, where, out);
}

struct Modes { std::vector<int64_t> shape, stride; };

// Ranks of a layout: walk every coordinate of the concatenated modes in row-major order,
// rank = rank_map[sum(c_i * stride_i)] (torch's _MeshLayout.remap_to_tensor).
std::vector<int64_t> walk_layout(const std::vector<Modes>& dims, const std::vector<int64_t>& map, const std::string& where) {
  std::vector<int64_t> shape, stride;
  for (const auto& d : dims) {
    shape.insert(shape.end(), d.shape.begin(), d.shape.end());
    stride.insert(stride.end(), d.stride.begin(), d.stride.end());
  }
  int64_t total = 1;
  for (auto s : shape) {
    if (s < 0 || s > (1 << 20)) fail(where, ": mesh layout size ", s, " is implausible");
    total *= s;
    if (total > (1 << 22)) fail(where, ": mesh layout has implausibly many ranks");
  }
  std::vector<int64_t> out;
  for (int64_t lin = 0; lin < total; ++lin) {
    int64_t rem = lin, idx = 0;
    for (size_t d = shape.size(); d-- > 0;) {
      idx += (rem % shape[d]) * stride[d];
      rem /= shape[d];
    }
    if (idx < 0 || idx >= static_cast<int64_t>(map.size()))
      fail(where, ": mesh layout indexes element ", idx, " of a rank map of ", map.size());
    out.push_back(map[static_cast<size_t>(idx)]);
  }
  return out;
}

}  // namespace

std::string field_names(const Value& obj) {
  const Value* d = state_dict_of(obj);
  std::string out;
  if (d)
    for (size_t i = 0; i + 1 < d->items.size(); i += 2)
      out += (out.empty() ? "" : ", ") + (d->items[i]->is(Value::Kind::Str) ? d->items[i]->str : d->items[i]->repr(1));
  if (obj.args && !obj.args->items.empty())
    out += (out.empty() ? "" : "; ") + std::string("constructor args ") + obj.args->repr(1);
  return out.empty() ? "none" : out;
}

std::string describe_value(const Value& v) {
  switch (v.kind) {
    case Value::Kind::None: return "None";
    case Value::Kind::Bool: return "a bool";
    case Value::Kind::Int: return "an int";
    case Value::Kind::Float: return "a float";
    case Value::Kind::Str: return "a str";
    case Value::Kind::Bytes: return "bytes";
    case Value::Kind::Tuple: return "a tuple";
    case Value::Kind::List: return "a list";
    case Value::Kind::Dict: return "a dict";
    case Value::Kind::Set: return "a set";
    case Value::Kind::Global: return "a reference to " + v.str;
    case Value::Kind::Object: return "a " + v.str + " object";
    case Value::Kind::Storage: return "a bare storage";
    case Value::Kind::Tensor: return "a tensor";
  }
  return "an unknown value";
}

namespace {

[[noreturn]] void unknown_mesh(const Value& mesh, const std::string& where, const std::string& what) {
  const std::string cls = mesh.str.empty() ? std::string("DeviceMesh") : mesh.str;
  fail(where, ": cannot read the device mesh (", cls, "): ", what, "; fields found: ", field_names(mesh),
       ". Known layouts: 'mesh' rank tensor (torch 2.4-2.9), '_layout' _MeshLayout{shape, stride} or "
       "{axes} with '_rank_map' (torch 2.10+)");
}

// One mesh dim's modes from a (possibly nested) shape and stride.
Modes modes_of(const ValuePtr& shape, const ValuePtr& stride, const char* what_shape, const char* what_stride,
               const std::string& where, const char* mismatch) {
  Modes m;
  flatten_modes(shape, what_shape, where, m.shape);
  flatten_modes(stride, what_stride, where, m.stride);
  if (m.shape.size() != m.stride.size()) fail(where, mismatch);
  return m;
}

// torch 2.13+: one _FlatLayout per mesh dim.
std::vector<Modes> layout_axes(const ValuePtr& axes, const std::string& where) {
  if (!(axes->is(Value::Kind::Tuple) || axes->is(Value::Kind::List)))
    fail(where, ": mesh layout axes: expected a tuple of layouts, found ", axes->repr());
  std::vector<Modes> dims;
  for (const auto& ax : axes->items) {
    if (!ax->is(Value::Kind::Object)) fail(where, ": mesh layout axis: expected a layout object, found ", ax->repr());
    if (!ax->attr("shape") || !ax->attr("stride"))
      fail(where, ": mesh layout axis ", ax->str, " without shape/stride (fields found: ", field_names(*ax), ")");
    dims.push_back(modes_of(ax->attr("shape"), ax->attr("stride"), "mesh layout axis shape", "mesh layout axis stride",
                            where, ": mesh layout axis shape and stride differ in length"));
  }
  return dims;
}

// torch 2.10-2.12: one (possibly nested) shape/stride pair, a mode per mesh dim.
std::vector<Modes> layout_shape_stride(const Value& layout, const std::string& where) {
  auto as_modes = [&](const ValuePtr& v) -> std::vector<ValuePtr> {
    if (v->is(Value::Kind::Int)) return {v};
    if (v->is(Value::Kind::Tuple) || v->is(Value::Kind::List)) return v->items;
    fail(where, ": mesh layout shape: expected a tuple of integers, found ", v->repr());
  };
  auto shm = as_modes(layout.attr("shape")), stm = as_modes(layout.attr("stride"));
  if (shm.size() != stm.size()) fail(where, ": mesh layout shape and stride differ in length");
  std::vector<Modes> dims;
  for (size_t d = 0; d < shm.size(); ++d)
    dims.push_back(modes_of(shm[d], stm[d], "mesh layout shape", "mesh layout stride", where,
                            ": mesh layout shape and stride differ in length"));
  return dims;
}

// torch 2.10+: shape and ranks from the _MeshLayout and the rank map.
void decode_layout(const Value& mesh, const Value& layout, const std::string& where,
                   const std::function<std::vector<int64_t>(const TensorRef&)>& read_ints, MeshInfo& out) {
  std::vector<Modes> dims;
  if (auto axes = layout.attr("axes")) {
    out.layout = layout.str + "{axes}";
    dims = layout_axes(axes, where);
  } else if (layout.attr("shape") && layout.attr("stride")) {
    out.layout = layout.str + "{shape, stride}";
    dims = layout_shape_stride(layout, where);
  } else {
    fail(where, ": cannot read the device mesh layout (", layout.str, "): fields found: ", field_names(layout),
         ". Known: {shape, stride} (torch 2.10-2.12), {axes} (torch 2.13+)");
  }
  for (const auto& d : dims) {
    int64_t n = 1;
    for (auto s : d.shape) n *= s;
    out.shape.push_back(n);
  }
  // The rank map: this mesh's, else (a sub-mesh) its root's.
  ValuePtr rm = mesh.attr("_rank_map");
  if (!(rm && rm->is(Value::Kind::Tensor)))
    if (auto root = mesh.attr("_root_mesh"); root && root->is(Value::Kind::Object)) rm = root->attr("_rank_map");
  if (!(rm && rm->is(Value::Kind::Tensor))) unknown_mesh(mesh, where, "a _layout without a '_rank_map' tensor");
  if (!read_ints) unknown_mesh(mesh, where, "no reader for the rank map");
  out.ranks = walk_layout(dims, read_ints(*rm->tensor), where);
}

// Which rank saved it: `_rank` (torch 2.11+), else its coordinate on every dim.
void find_file_rank(const Value& mesh, MeshInfo& out) {
  if (auto r = mesh.attr("_rank"); r && r->is(Value::Kind::Int)) {
    out.file_rank = r->i;
    out.rank_source = "DeviceMesh._rank";
    return;
  }
  auto c = mesh.attr("_coordinate_on_dim");
  if (!c || !(c->is(Value::Kind::Tuple) || c->is(Value::Kind::List)) || c->items.size() != out.shape.size()) return;
  int64_t lin = 0;
  for (size_t d = 0; d < out.shape.size(); ++d) {
    if (!c->items[d]->is(Value::Kind::Int) || c->items[d]->i < 0 || c->items[d]->i >= out.shape[d]) return;
    lin = lin * out.shape[d] + c->items[d]->i;
  }
  out.file_rank = out.ranks[static_cast<size_t>(lin)];
  out.rank_source = "DeviceMesh._coordinate_on_dim";
}

}  // namespace

MeshInfo decode_device_mesh(const Value& mesh, const std::string& where,
                            const std::function<std::vector<int64_t>(const TensorRef&)>& read_ints) {
  MeshInfo out;
  auto names = mesh.attr("mesh_dim_names");
  if (!names) names = mesh.attr("_mesh_dim_names");
  if (names && (names->is(Value::Kind::Tuple) || names->is(Value::Kind::List)))
    for (const auto& n : names->items) out.dim_names.push_back(n->as_str("mesh dim name"));

  if (auto mt = mesh.attr("mesh"); mt && mt->is(Value::Kind::Tensor)) {
    out.layout = "'mesh' rank tensor";
    out.shape = mt->tensor->size;
    if (!read_ints) unknown_mesh(mesh, where, "no reader for the rank tensor");
    out.ranks = read_ints(*mt->tensor);
  } else if (auto layout = mesh.attr("_layout"); layout && layout->is(Value::Kind::Object)) {
    decode_layout(mesh, *layout, where, read_ints, out);
  } else {
    unknown_mesh(mesh, where,
                 mesh.attr("_layout") ? "'_layout' is " + mesh.attr("_layout")->repr(1) : "neither 'mesh' nor '_layout'");
  }
  int64_t total = 1;
  for (auto s : out.shape) total *= s;
  if (static_cast<int64_t>(out.ranks.size()) != total)
    fail(where, ": device mesh of shape ", out.shape.size(), "-D has ", out.ranks.size(), " ranks, expected ", total);
  if (!out.dim_names.empty() && out.dim_names.size() != out.shape.size())
    fail(where, ": device mesh has ", out.shape.size(), " dims but ", out.dim_names.size(), " dim names");
  find_file_rank(mesh, out);
  return out;
}

std::string Placement::str() const {
  switch (kind) {
    case Kind::Shard: return "Shard(" + std::to_string(dim) + ")";
    case Kind::StridedShard:
      return "_StridedShard(dim=" + std::to_string(dim) + ", split_factor=" + std::to_string(split_factor) + ")";
    case Kind::Replicate: return "Replicate()";
    case Kind::Partial: return "Partial()";
    default: return cls.empty() ? "unknown placement" : cls;
  }
}

CkptTensor decode_dtensor(const Value& obj, const std::string& key, const std::string& where,
                          const std::function<std::vector<int64_t>(const TensorRef&)>& read_ints) {
  const std::string w = where + ": key '" + key + "'";
  CkptTensor out;
  out.key = key;
  auto local = obj.attr("_local_tensor");
  if (!local || !local->is(Value::Kind::Tensor))
    fail(w, ": ", obj.str, " without a _local_tensor (fields found: ", field_names(obj), ")");
  out.local = *local->tensor;
  auto spec = obj.attr("_spec");
  if (!spec || !spec->is(Value::Kind::Object))
    fail(w, ": ", obj.str, " without a _spec (fields found: ", field_names(obj), ")");
  auto meta = std::make_shared<DTensorMeta>();

  // Global shape: tensor_meta.shape, else the wrapper-subclass args (cls, dtype, size, ...).
  auto tm = spec->attr("tensor_meta");
  ValuePtr shape;
  if (tm && tm->is(Value::Kind::Object)) {
    shape = tm->attr("shape");
    if (!shape && tm->args && !tm->args->items.empty()) shape = tm->args->items[0];
  } else if (tm && tm->is(Value::Kind::Tuple) && !tm->items.empty()) {
    shape = tm->items[0];
  }
  if (!shape && obj.args && obj.args->items.size() > 2) shape = obj.args->items[2];
  if (!shape) fail(w, ": DTensor global shape not found (", spec->str, " fields: ", field_names(*spec), ")");
  meta->global_shape = int_tuple(shape, "DTensor global shape", w);

  auto pl = spec->attr("placements");
  if (!pl || !(pl->is(Value::Kind::Tuple) || pl->is(Value::Kind::List)))
    fail(w, ": ", spec->str, " without placements (fields found: ", field_names(*spec), ")");
  for (const auto& p : pl->items) meta->placements.push_back(decode_placement(p, w));

  auto mesh = spec->attr("mesh");
  if (!mesh || !mesh->is(Value::Kind::Object))
    fail(w, ": ", spec->str, " without a device mesh (fields found: ", field_names(*spec), ")");
  MeshInfo mi = decode_device_mesh(*mesh, w, read_ints);
  meta->mesh_shape = std::move(mi.shape);
  meta->mesh_dim_names = std::move(mi.dim_names);
  meta->mesh_ranks = std::move(mi.ranks);
  meta->file_rank = mi.file_rank;
  meta->rank_source = std::move(mi.rank_source);
  meta->mesh_layout = std::move(mi.layout);
  if (meta->placements.size() != meta->mesh_shape.size())
    fail(w, ": ", meta->placements.size(), " placements for a ", meta->mesh_shape.size(), "-D mesh");
  out.dtensor = meta;
  return out;
}

CkptTensor decode_sharded_tensor(const Value& obj, const std::string& key, const std::string& where) {
  const std::string w = where + ": key '" + key + "'";
  CkptTensor out;
  out.key = key;
  // Wrapper-subclass args (cls, dtype, global size, ...); state from __getstate__:
  // (local_shards, ShardedTensorMetadata, ProcessGroupState, sharding_spec, init_rrefs).
  if (!obj.args || obj.args->items.size() < 3) fail(w, ": ShardedTensor without its global size");
  auto meta = std::make_shared<DTensorMeta>();
  meta->global_shape = int_tuple(obj.args->items[2], "ShardedTensor global size", w);
  const ValuePtr& st = obj.state;
  if (!st || !st->is(Value::Kind::Tuple) || st->items.size() < 4 || !st->items[0]->is(Value::Kind::List))
    fail(w, ": ShardedTensor state is not (local_shards, metadata, pg_state, spec, ...)");
  auto smeta = st->items[1]->attr("shards_metadata");
  if (!smeta || !smeta->is(Value::Kind::List) || smeta->items.empty())
    fail(w, ": ShardedTensor metadata without shards_metadata");
  auto dimv = st->items[3]->attr("dim");
  if (!dimv || !dimv->is(Value::Kind::Int)) fail(w, ": ShardedTensor sharding spec is not a ChunkShardingSpec with a dim");
  int64_t d = dimv->i;
  const int64_t nd = static_cast<int64_t>(meta->global_shape.size());
  if (d < 0) d += nd;
  if (d < 0 || d >= nd) fail(w, ": ShardedTensor sharded on dim ", dimv->i, " of a ", nd, "-D tensor");
  Placement p;
  p.kind = Placement::Kind::Shard;
  p.dim = d;
  p.cls = "Shard";
  meta->placements = {p};
  meta->mesh_shape = {static_cast<int64_t>(smeta->items.size())};
  meta->mesh_dim_names = {"fsdp"};
  const auto& shards = st->items[0]->items;
  if (shards.size() > 1) fail(w, ": ShardedTensor with ", shards.size(), " local shards on one rank is not supported");
  if (shards.empty()) {
    // This rank holds no rows: an empty view (no storage is read).
    const ValuePtr& dt = obj.args->items[1];
    std::optional<DType> d_opt;
    if (dt->is(Value::Kind::Global) && dt->str.compare(0, 6, "torch.") == 0) d_opt = dtype_from_torch_name(dt->str.substr(6));
    if (!d_opt) fail(w, ": ShardedTensor with an unknown dtype ", dt->repr(1));
    out.local.dtype = out.local.storage.dtype = *d_opt;
    out.local.size = meta->global_shape;
    out.local.size[static_cast<size_t>(d)] = 0;
    out.local.stride.assign(out.local.size.size(), 1);
    meta->shard_offset = meta->global_shape[static_cast<size_t>(d)];
  } else {
    auto t = shards[0]->attr("tensor");
    auto m = shards[0]->attr("metadata");
    if (!t || !t->is(Value::Kind::Tensor) || !m) fail(w, ": ShardedTensor local shard without tensor and metadata");
    out.local = *t->tensor;
    auto offs = int_tuple(m->attr("shard_offsets"), "shard offsets", w);
    if (offs.size() != meta->global_shape.size()) fail(w, ": shard offsets of the wrong rank");
    for (int64_t k = 0; k < nd; ++k)
      if (k != d && offs[static_cast<size_t>(k)] != 0) fail(w, ": ShardedTensor shard offset outside the sharded dim");
    meta->shard_offset = offs[static_cast<size_t>(d)];
  }
  out.dtensor = meta;
  return out;
}

TorchCheckpoint::TorchCheckpoint(const std::string& path) : zip_(path) {
  prefix_ = zip_.torch_prefix();
  const std::string data_dir = prefix_ + "/data/";
  for (const auto& e : zip_.entries())
    if (e.name.compare(0, data_dir.size(), data_dir) == 0)
      storages_[e.name.substr(data_dir.size())] = Rec{e.data_offset, e.size};
  const ZipEntry* pkl = zip_.find(prefix_ + "/data.pkl");
  if (!pkl) fail(path, ": no data.pkl record");
  ValuePtr root = parse_pickle(zip_.read(*pkl, 1u << 30), path + ":data.pkl");
  if (!root->is(Value::Kind::Dict) && !(root->is(Value::Kind::Object) && !root->items.empty()))
    fail(path, ": expected a state dict (a dict of tensors) at the top level, found ", root->repr());
  collect(root, "", 0);
}

void TorchCheckpoint::collect(const ValuePtr& v, const std::string& prefix, int depth) {
  if (depth > 16) fail(path(), ": state dict nested too deeply at '", prefix, "'");
  for (size_t i = 0; i + 1 < v->items.size(); i += 2) {
    const auto& k = v->items[i];
    const auto& val = v->items[i + 1];
    std::string key = k->is(Value::Kind::Str) ? k->str : (k->is(Value::Kind::Int) ? std::to_string(k->i) : k->repr());
    if (!prefix.empty()) key = prefix + "." + key;
    if (val->is(Value::Kind::Tensor)) {
      CkptTensor t;
      t.key = key;
      t.local = *val->tensor;
      validate(t);
      index_[key] = tensors_.size();
      tensors_.push_back(std::move(t));
    } else if (val->is(Value::Kind::Object) && ends_with(val->str, "DTensor")) {
      // Meshes are memoised: decode each mesh's ranks once.
      CkptTensor t = decode_dtensor(*val, key, path(), [this](const TensorRef& r) {
        auto it = mesh_cache_.find(r.storage.key);
        if (it == mesh_cache_.end()) it = mesh_cache_.emplace(r.storage.key, read_ints(r)).first;
        return it->second;
      });
      validate(t);
      index_[key] = tensors_.size();
      tensors_.push_back(std::move(t));
    } else if (val->is(Value::Kind::Object) && ends_with(val->str, "ShardedTensor")) {
      CkptTensor t = decode_sharded_tensor(*val, key, path());
      validate(t);
      index_[key] = tensors_.size();
      tensors_.push_back(std::move(t));
    } else if (val->is(Value::Kind::Dict)) {
      collect(val, key, depth + 1);
    } else {
      other_values_.emplace_back(key, describe_value(*val));
    }
  }
}

const TorchCheckpoint::Rec& TorchCheckpoint::storage(const TensorRef& t) const {
  auto it = storages_.find(t.storage.key);
  if (it == storages_.end()) fail(path(), ": storage record '", prefix_, "/data/", t.storage.key, "' is missing");
  return it->second;
}

void TorchCheckpoint::validate(const CkptTensor& t) {
  const TensorRef& r = t.local;
  if (r.storage.key.empty() && t.dtensor && t.dtensor->shard_offset >= 0) return;  // empty ShardedTensor shard
  const Rec& rec = storage(r);
  if (r.size.size() != r.stride.size()) fail(path(), ": key '", t.key, "': size and stride ranks differ");
  const uint64_t es = dtype_size(r.dtype);
  if (rec.size % es != 0)
    fail(path(), ": key '", t.key, "': storage record size ", rec.size, " is not a multiple of the element size ", es);
  const int64_t avail = static_cast<int64_t>(rec.size / es);
  if (r.storage_offset < 0) fail(path(), ": key '", t.key, "': negative storage offset");
  int64_t numel = 1, last = r.storage_offset;
  for (size_t d = 0; d < r.size.size(); ++d) {
    if (r.size[d] < 0 || r.stride[d] < 0) fail(path(), ": key '", t.key, "': negative size or stride");
    if (r.size[d] == 0) numel = 0;
    else { numel *= r.size[d]; last += (r.size[d] - 1) * r.stride[d]; }
    if (numel > (int64_t(1) << 48)) fail(path(), ": key '", t.key, "': implausible tensor size");
  }
  if (numel > 0 && last >= avail)
    fail(path(), ": key '", t.key, "': view reaches element ", last, " but its storage has ", avail,
         " elements (truncated or corrupted file)");
  if (t.dtensor) {
    const auto& g = t.dtensor->global_shape;
    if (g.size() != r.size.size())
      fail(path(), ": key '", t.key, "': local tensor has ", r.size.size(), " dims but the global shape has ", g.size());
  }
}

const CkptTensor* TorchCheckpoint::find(const std::string& key) const {
  auto it = index_.find(key);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

void TorchCheckpoint::read_elements(const TensorRef& t, int64_t first, int64_t n, void* dst) const {
  if (n <= 0) return;
  const Rec& rec = storage(t);
  const size_t es = dtype_size(t.dtype);
  const ZipEntry entry{"", rec.data_offset, rec.size, 0};
  if (t.is_contiguous()) {
    zip_.read_at(entry, static_cast<uint64_t>(t.storage_offset + first) * es, dst, static_cast<size_t>(n) * es);
    return;
  }
  // Strided view: read the innermost runs one by one (or element by element if stride != 1).
  const size_t nd = t.size.size();
  std::vector<int64_t> idx(nd, 0);
  int64_t rem = first;
  for (size_t d = nd; d-- > 0;) {
    idx[d] = rem % t.size[d];
    rem /= t.size[d];
  }
  auto* out = static_cast<uint8_t*>(dst);
  const int64_t inner = nd ? t.size[nd - 1] : 1;
  const bool run = nd && t.stride[nd - 1] == 1;
  while (n > 0) {
    int64_t off = t.storage_offset;
    for (size_t d = 0; d < nd; ++d) off += idx[d] * t.stride[d];
    int64_t len = run ? std::min(n, inner - idx[nd - 1]) : 1;
    zip_.read_at(entry, static_cast<uint64_t>(off) * es, out, static_cast<size_t>(len) * es);
    out += len * es;
    n -= len;
    // Advance the multi-index by len elements.
    int64_t carry = len;
    for (size_t d = nd; d-- > 0 && carry > 0;) {
      int64_t v = idx[d] + carry;
      idx[d] = v % t.size[d];
      carry = v / t.size[d];
    }
  }
}

const uint8_t* TorchCheckpoint::map_elements(const TensorRef& t, int64_t first, int64_t n) const {
  if (n <= 0 || !t.is_contiguous()) return nullptr;
  const Rec& rec = storage(t);
  const uint64_t es = dtype_size(t.dtype);
  const uint64_t off = static_cast<uint64_t>(t.storage_offset + first) * es, len = static_cast<uint64_t>(n) * es;
  if (off + len > rec.size) fail(path(), ": read of ", len, " bytes at ", off, " is outside its storage record");
  std::call_once(map_once_, [&] { map_ = std::make_unique<MappedFile>(path()); });
  if (rec.data_offset + off + len > map_->size()) fail(path(), ": storage record lies past the end of the file (truncated?)");
  return map_->data() + rec.data_offset + off;
}

void TorchCheckpoint::release_elements(const TensorRef& t, int64_t first, int64_t n) const {
  if (!map_ || n <= 0) return;
  const Rec& rec = storage(t);
  const uint64_t es = dtype_size(t.dtype);
  map_->release(rec.data_offset + static_cast<uint64_t>(t.storage_offset + first) * es, static_cast<uint64_t>(n) * es);
}

std::vector<int64_t> TorchCheckpoint::read_ints(const TensorRef& t) const {
  const int64_t n = t.numel();
  if (n > (1 << 20)) fail(path(), ": integer tensor too large to be a mesh (", n, " elements)");
  std::vector<int64_t> out(static_cast<size_t>(n));
  std::vector<uint8_t> buf(static_cast<size_t>(n) * dtype_size(t.dtype));
  read_elements(t, 0, n, buf.data());
  for (int64_t i = 0; i < n; ++i) {
    switch (t.dtype) {
      case DType::I64: { int64_t v; std::memcpy(&v, &buf[i * 8], 8); out[i] = v; break; }
      case DType::I32: { int32_t v; std::memcpy(&v, &buf[i * 4], 4); out[i] = v; break; }
      default: fail(path(), ": expected an int32/int64 tensor, found ", dtype_st_name(t.dtype));
    }
  }
  return out;
}

}  // namespace verl
