// dcp.cpp — PyTorch Distributed Checkpoint reader (see dcp.h). The .metadata pickle is read
// with the safe pickle reader: Metadata, TensorStorageMetadata, ChunkStorageMetadata,
// MetadataIndex and _StorageInfo are inert Objects whose fields are read by name.
#include "io/dcp.h"

#include <algorithm>
#include <cstring>
#include <filesystem>

#include "core/error.h"
#include "io/safetensors.h"
#include "io/zip.h"

namespace fs = std::filesystem;

namespace verl {

namespace {

bool ends_with(const std::string& s, const std::string& suf) {
  return s.size() >= suf.size() && s.compare(s.size() - suf.size(), suf.size(), suf) == 0;
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string o = "[";
  for (size_t i = 0; i < s.size(); ++i) o += (i ? ", " : "") + std::to_string(s[i]);
  return o + "]";
}

std::vector<int64_t> ints(const ValuePtr& v, const std::string& what, const std::string& where) {
  if (!v || !(v->is(Value::Kind::Tuple) || v->is(Value::Kind::List)))
    fail(where, ": ", what, ": expected a tuple of integers, found ", v ? v->repr() : "nothing");
  std::vector<int64_t> out;
  for (const auto& x : v->items) {
    if (!x->is(Value::Kind::Int)) fail(where, ": ", what, ": expected integers, found ", v->repr());
    out.push_back(x->i);
  }
  return out;
}

ValuePtr need(const ValuePtr& obj, const char* field, const std::string& where) {
  ValuePtr v = obj ? obj->attr(field) : nullptr;
  if (!v) fail(where, ": field '", field, "' missing in ", obj ? obj->repr(1) : "nothing");
  return v;
}

int64_t prod(const std::vector<int64_t>& s) {
  int64_t n = 1;
  for (auto x : s) n *= x;
  return n;
}

constexpr int64_t kMaxElems = int64_t(1) << 48;

}  // namespace

int64_t DcpChunk::numel() const { return prod(sizes); }
int64_t DcpTensor::numel() const { return prod(size); }

DcpCheckpoint::~DcpCheckpoint() = default;

namespace {

// Storage entries of .metadata's storage_data: (fqn, chunk offsets) -> (file, offset, length).
struct Loc {
  int file;
  uint64_t off, len;
};
using Storage = std::map<std::pair<std::string, std::vector<int64_t>>, Loc>;

// Reads storage_data; the files it names are appended to `file_names` (ids: their index).
Storage read_storage(const ValuePtr& sdata, const std::string& where, std::vector<std::string>& file_names) {
  Storage storage;
  std::map<std::string, int> file_ids;
  for (size_t i = 0; i < sdata->dict_size(); ++i) {
    const ValuePtr& key = sdata->items[2 * i];
    const ValuePtr& info = sdata->items[2 * i + 1];
    const std::string fqn = need(key, "fqn", where)->as_str("MetadataIndex.fqn");
    std::vector<int64_t> off;
    if (auto o = key->attr("offset"); o && !o->is(Value::Kind::None)) off = ints(o, "MetadataIndex.offset of '" + fqn + "'", where);
    const std::string rel = need(info, "relative_path", where)->as_str("_StorageInfo.relative_path");
    const int64_t o = need(info, "offset", where)->as_int("_StorageInfo.offset");
    const int64_t len = need(info, "length", where)->as_int("_StorageInfo.length");
    if (o < 0 || len < 0) fail(where, ": key '", fqn, "': negative storage offset or length");
    if (auto td = info->attr("transform_descriptors"); td && (td->is(Value::Kind::List) || td->is(Value::Kind::Tuple)) && !td->items.empty())
      fail(where, ": key '", fqn, "' is stored with transforms (", td->repr(), "): not supported");
    if (rel.empty() || rel.find("..") != std::string::npos || rel[0] == '/')
      fail(where, ": key '", fqn, "': suspicious storage file name '", rel, "'");
    auto [it, fresh] = file_ids.emplace(rel, static_cast<int>(file_names.size()));
    if (fresh) file_names.push_back(rel);
    if (!storage.emplace(std::make_pair(fqn, off), Loc{it->second, static_cast<uint64_t>(o), static_cast<uint64_t>(len)}).second)
      fail(where, ": key '", fqn, "' has two storage entries for the chunk at ", shape_str(off));
  }
  return storage;
}

// One ChunkStorageMetadata of tensor t: inside the tensor, and held by a storage entry.
DcpChunk read_chunk_meta(const ValuePtr& cv, const DcpTensor& t, const std::string& w, const Storage& storage) {
  DcpChunk c;
  c.offsets = ints(need(cv, "offsets", w), "chunk offsets", w);
  c.sizes = ints(need(cv, "sizes", w), "chunk sizes", w);
  if (c.offsets.size() != t.size.size() || c.sizes.size() != t.size.size())
    fail(w, ": chunk at ", shape_str(c.offsets), " of size ", shape_str(c.sizes), " does not match the ", t.size.size(),
         "-D tensor ", shape_str(t.size));
  for (size_t k = 0; k < t.size.size(); ++k)
    if (c.offsets[k] < 0 || c.sizes[k] < 0 || c.offsets[k] > t.size[k] || c.sizes[k] > t.size[k] - c.offsets[k])
      fail(w, ": chunk at ", shape_str(c.offsets), " of size ", shape_str(c.sizes), " lies outside the tensor ",
           shape_str(t.size));
  auto it = storage.find({t.fqn, c.offsets});
  if (it == storage.end() && c.offsets.empty()) it = storage.find({t.fqn, {}});
  if (it == storage.end()) fail(w, ": chunk at ", shape_str(c.offsets), " has no storage entry (no file holds it)");
  c.file = it->second.file;
  c.offset = it->second.off;
  c.length = it->second.len;
  return c;
}

// One TensorStorageMetadata: size, dtype and chunks.
DcpTensor read_tensor_meta(const std::string& fqn, const ValuePtr& m, const std::string& w, const Storage& storage) {
  DcpTensor t;
  t.fqn = fqn;
  t.size = ints(need(m, "size", w), "size", w);
  for (auto s : t.size)
    if (s < 0) fail(w, ": negative size ", shape_str(t.size));
  if (prod(t.size) > kMaxElems) fail(w, ": implausible size ", shape_str(t.size));
  ValuePtr dt = need(need(m, "properties", w), "dtype", w);
  const std::string dn = dt->is(Value::Kind::Global) || dt->is(Value::Kind::Str) ? dt->str : std::string();
  auto d = dn.compare(0, 6, "torch.") == 0 ? dtype_from_torch_name(dn.substr(6)) : std::nullopt;
  if (!d) fail(w, ": unsupported dtype ", dt->repr(1));
  t.dtype = *d;
  ValuePtr chunks = need(m, "chunks", w);
  if (!chunks->is(Value::Kind::List) && !chunks->is(Value::Kind::Tuple)) fail(w, ": chunks is not a list");
  for (const auto& cv : chunks->items) t.chunks.push_back(read_chunk_meta(cv, t, w, storage));
  return t;
}

// Every referenced file must exist and hold the items it is said to hold; `*bytes` = their size.
std::vector<std::shared_ptr<const File>> open_files(const Storage& storage, const std::vector<std::string>& names,
                                                   const std::string& dir, const std::string& where, uint64_t* bytes) {
  std::vector<uint64_t> need_len(names.size(), 0);
  for (const auto& [k, l] : storage) need_len[l.file] = std::max(need_len[l.file], l.off + l.len);
  std::vector<std::shared_ptr<const File>> files;
  for (size_t f = 0; f < names.size(); ++f) {
    const fs::path p = fs::path(dir) / names[f];
    if (!fs::exists(p)) fail(p.string(), ": missing (named by ", where, ")");
    auto file = std::make_shared<File>(p.string());
    if (file->size() < need_len[f])
      fail(p.string(), ": ", file->size(), " bytes but the metadata places items up to byte ", need_len[f],
           " (truncated file)");
    *bytes += file->size();
    files.push_back(std::move(file));
  }
  return files;
}

}  // namespace

DcpCheckpoint::DcpCheckpoint(const std::string& dir) : dir_(dir) {
  const fs::path mpath = fs::path(dir) / ".metadata";
  if (!fs::is_directory(dir)) fail(dir, ": no such folder");
  if (!fs::exists(mpath)) fail(mpath.string(), ": missing (not a PyTorch distributed checkpoint folder)");
  const std::string where = mpath.string();
  ValuePtr md = parse_pickle(read_text_file(where, 1u << 30), where);
  if (!md->is(Value::Kind::Object) || !ends_with(md->str, ".Metadata"))
    fail(where, ": expected a torch.distributed.checkpoint Metadata object, found ", md->repr(1));
  ValuePtr sdm = need(md, "state_dict_metadata", where);
  ValuePtr sdata = need(md, "storage_data", where);
  if (!sdm->is(Value::Kind::Dict)) fail(where, ": state_dict_metadata is not a dict");
  if (!sdata->is(Value::Kind::Dict)) fail(where, ": storage_data is not a dict");
  const Storage storage = read_storage(sdata, where, file_names_);
  files_ = open_files(storage, file_names_, dir, where, &input_bytes_);

  for (size_t i = 0; i < sdm->dict_size(); ++i) {
    const std::string fqn = sdm->items[2 * i]->as_str("state_dict_metadata key");
    const ValuePtr& m = sdm->items[2 * i + 1];
    const std::string w = where + ": key '" + fqn + "'";
    if (!m->is(Value::Kind::Object)) fail(w, ": metadata is not an object: ", m->repr(1));
    if (ends_with(m->str, "BytesStorageMetadata")) {
      byte_keys_.push_back(fqn);
      auto it = storage.find({fqn, {}});
      if (it != storage.end()) byte_items_[fqn] = {it->second.file, {it->second.off, it->second.len}};
      continue;
    }
    if (!ends_with(m->str, "TensorStorageMetadata")) fail(w, ": unknown storage metadata class ", m->str);
    DcpTensor t = read_tensor_meta(fqn, m, w, storage);
    check_layout(t);
    index_[fqn] = tensors_.size();
    tensors_.push_back(std::move(t));
  }
}

// Chunks must tile the tensor: no overlap, and together exactly its volume.
void DcpCheckpoint::check_layout(const DcpTensor& t) const {
  const std::string w = dir_ + "/.metadata: key '" + t.fqn + "'";
  int64_t vol = 0;
  std::vector<const DcpChunk*> nz;
  for (const auto& c : t.chunks)
    if (c.numel() > 0) { vol += c.numel(); nz.push_back(&c); }
  std::sort(nz.begin(), nz.end(), [](const DcpChunk* a, const DcpChunk* b) { return a->offsets < b->offsets; });
  for (size_t i = 0; i < nz.size(); ++i)
    for (size_t j = i + 1; j < nz.size(); ++j) {
      bool overlap = true;
      for (size_t k = 0; k < t.size.size() && overlap; ++k)
        overlap = nz[i]->offsets[k] < nz[j]->offsets[k] + nz[j]->sizes[k] &&
                  nz[j]->offsets[k] < nz[i]->offsets[k] + nz[i]->sizes[k];
      if (overlap)
        fail(w, ": chunks at ", shape_str(nz[i]->offsets), " (size ", shape_str(nz[i]->sizes), ") and ",
             shape_str(nz[j]->offsets), " (size ", shape_str(nz[j]->sizes), ") overlap");
    }
  if (vol != t.numel())
    fail(w, ": the chunks cover ", vol, " of the ", t.numel(), " elements of ", shape_str(t.size),
         " (a gap: some rank's shard is missing)");
}

const DcpTensor* DcpCheckpoint::find(const std::string& fqn) const {
  auto it = index_.find(fqn);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

const File& DcpCheckpoint::file(int i) const { return *files_.at(static_cast<size_t>(i)); }

std::shared_ptr<const DcpCheckpoint::Located> DcpCheckpoint::locate(const DcpTensor& t, const DcpChunk& c) const {
  {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = located_.find(&c);
    if (it != located_.end()) return it->second;
  }
  const File& f = file(c.file);
  const std::string w = f.path() + ": key '" + t.fqn + "' chunk at " + shape_str(c.offsets);
  auto loc = std::make_shared<Located>();
  loc->size = c.sizes;
  loc->stride.assign(c.sizes.size(), 1);
  for (size_t k = c.sizes.size(); k-- > 1;) loc->stride[k - 1] = loc->stride[k] * std::max<int64_t>(c.sizes[k], 1);

  // Peek past the item's length: a safetensors item's length covers its tensor only, the
  // blob's header sits at the item offset.
  uint8_t head[12] = {0};
  const uint64_t peek = std::min<uint64_t>(f.size() - c.offset, sizeof head);
  if (peek) f.read_at(head, peek, c.offset);
  if (peek >= 4 && head[0] == 'P' && head[1] == 'K' && head[2] == 3 && head[3] == 4) locate_torch_item(t, c, w, *loc);
  else locate_blob_or_raw(t, c, w, head, peek, *loc);
  std::lock_guard<std::mutex> lk(mu_);
  located_[&c] = loc;
  return loc;
}

void DcpCheckpoint::locate_torch_item(const DcpTensor& t, const DcpChunk& c, const std::string& w, Located& loc) const {
  const size_t es = dtype_size(t.dtype);
  ZipReader zip(files_[c.file], c.offset, c.length);
  const std::string prefix = zip.torch_prefix();
  const ZipEntry* pkl = zip.find(prefix + "/data.pkl");
  ValuePtr v = parse_pickle(zip.read(*pkl, 64u << 20), w + " data.pkl");
  if (!v->is(Value::Kind::Tensor)) fail(w, ": the item is not a saved tensor (found ", v->repr(1), ")");
  const TensorRef& r = *v->tensor;
  if (r.dtype != t.dtype) fail(w, ": item dtype ", dtype_st_name(r.dtype), " but the metadata says ", dtype_st_name(t.dtype));
  // A contiguous item of another shape with the same element count is the chunk reshaped.
  if (r.numel() != c.numel() || (r.size != c.sizes && !r.is_contiguous()))
    fail(w, ": item shape ", shape_str(r.size), " but the metadata says ", shape_str(c.sizes));
  if (r.size.size() != r.stride.size()) fail(w, ": item size and stride ranks differ");
  const ZipEntry* rec = zip.find(prefix + "/data/" + r.storage.key);
  if (!rec && r.numel() > 0) fail(w, ": storage record '", prefix, "/data/", r.storage.key, "' is missing");
  if (rec) {
    if (rec->size % es) fail(w, ": storage record size ", rec->size, " is not a multiple of ", es);
    int64_t last = r.storage_offset;
    for (size_t k = 0; k < r.size.size(); ++k) {
      if (r.stride[k] < 0) fail(w, ": negative stride");
      if (r.size[k] > 0) last += (r.size[k] - 1) * r.stride[k];
    }
    if (r.numel() > 0 && (r.storage_offset < 0 || last >= static_cast<int64_t>(rec->size / es)))
      fail(w, ": view reaches element ", last, " but its storage has ", rec->size / es, " elements (corrupted item)");
    loc.base = static_cast<int64_t>(rec->data_offset);
  }
  loc.storage_offset = r.storage_offset;
  loc.contiguous = r.is_contiguous();
  if (!loc.contiguous) loc.stride = r.stride;
}

std::shared_ptr<const std::map<std::string, DcpCheckpoint::StEntry>> DcpCheckpoint::blob_header(const DcpChunk& c,
                                                                                              uint64_t hlen,
                                                                                              uint64_t nbytes) const {
  {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = st_headers_.find({c.file, c.offset});
    if (it != st_headers_.end()) return it->second;
  }
  const File& f = file(c.file);
  std::vector<StTensor> tv;
  std::map<std::string, std::string> meta;
  try {
    parse_safetensors_header(f.read_string(static_cast<size_t>(hlen), c.offset + 8), f.size() - c.offset - 8 - hlen,
                             f.path() + " (safetensors blob at offset " + std::to_string(c.offset) + ")", &tv, &meta);
  } catch (const Error&) {
    if (c.length != nbytes) throw;  // else: raw bytes that happen to look like a header
    tv.clear();
  }
  if (tv.empty()) return nullptr;
  auto m = std::make_shared<std::map<std::string, StEntry>>();
  for (const auto& x : tv) (*m)[x.name] = StEntry{x.begin, x.end, x.dtype, x.shape};
  std::lock_guard<std::mutex> lk(mu_);
  st_headers_[{c.file, c.offset}] = m;
  return m;
}

void DcpCheckpoint::locate_blob_or_raw(const DcpTensor& t, const DcpChunk& c, const std::string& w, const uint8_t* head,
                                       uint64_t peek, Located& loc) const {
  const File& f = file(c.file);
  const uint64_t nbytes = static_cast<uint64_t>(c.numel()) * dtype_size(t.dtype);
  uint64_t hlen = 0;
  std::memcpy(&hlen, head, 8);
  const bool st = peek >= 9 && head[8] == '{' && hlen >= 2 && hlen <= SafetensorsReader::kMaxHeader &&
                  c.offset + 8 + hlen <= f.size();
  const auto hdr = st ? blob_header(c, hlen, nbytes) : nullptr;
  if (hdr) {
    auto it = hdr->find(t.fqn);
    if (it == hdr->end()) fail(w, ": the safetensors blob holds no tensor named '", t.fqn, "'");
    const StEntry& e = it->second;
    if (e.dtype != t.dtype)
      fail(w, ": safetensors dtype ", dtype_st_name(e.dtype), " but the metadata says ", dtype_st_name(t.dtype));
    if (prod(e.shape) != c.numel())
      fail(w, ": safetensors shape ", shape_str(e.shape), " but the metadata says ", shape_str(c.sizes));
    loc.base = static_cast<int64_t>(c.offset + 8 + hlen + e.begin);
    return;
  }
  if (c.length != nbytes)
    fail(w, ": item of ", c.length, " bytes is neither a torch.save archive nor a safetensors blob, and not the ", nbytes,
         " raw bytes of a ", shape_str(c.sizes), " ", dtype_st_name(t.dtype), " chunk");
  loc.base = static_cast<int64_t>(c.offset);
}

void DcpCheckpoint::read_chunk(const DcpTensor& t, size_t ci, int64_t first, int64_t n, void* dst) const {
  if (n <= 0) return;
  const DcpChunk& c = t.chunks.at(ci);
  if (first < 0 || first + n > c.numel())
    fail(file(c.file).path(), ": key '", t.fqn, "': read of elements [", first, ", ", first + n, ") outside a chunk of ",
         c.numel());
  auto loc = locate(t, c);
  const File& f = file(c.file);
  const size_t es = dtype_size(t.dtype);
  if (loc->contiguous) {
    f.read_at(dst, static_cast<size_t>(n) * es, static_cast<uint64_t>(loc->base + (loc->storage_offset + first) * static_cast<int64_t>(es)));
    return;
  }
  // Strided view: innermost runs one at a time (element by element if the last stride is not 1).
  const size_t nd = loc->size.size();
  std::vector<int64_t> idx(nd, 0);
  int64_t rem = first;
  for (size_t d = nd; d-- > 0;) {
    idx[d] = rem % loc->size[d];
    rem /= loc->size[d];
  }
  auto* out = static_cast<uint8_t*>(dst);
  const int64_t inner = nd ? loc->size[nd - 1] : 1;
  const bool run = nd && loc->stride[nd - 1] == 1;
  while (n > 0) {
    int64_t off = loc->storage_offset;
    for (size_t d = 0; d < nd; ++d) off += idx[d] * loc->stride[d];
    const int64_t len = run ? std::min(n, inner - idx[nd - 1]) : 1;
    f.read_at(out, static_cast<size_t>(len) * es, static_cast<uint64_t>(loc->base + off * static_cast<int64_t>(es)));
    out += len * es;
    n -= len;
    int64_t carry = len;
    for (size_t d = nd; d-- > 0 && carry > 0;) {
      const int64_t v = idx[d] + carry;
      idx[d] = v % loc->size[d];
      carry = v / loc->size[d];
    }
  }
}

void DcpCheckpoint::read_tensor(const DcpTensor& t, void* dst) const {
  const size_t es = dtype_size(t.dtype);
  const size_t nd = t.size.size();
  std::vector<int64_t> gstride(nd, 1);
  for (size_t k = nd; k-- > 1;) gstride[k - 1] = gstride[k] * t.size[k];
  auto* out = static_cast<uint8_t*>(dst);
  std::vector<uint8_t> buf;
  for (size_t ci = 0; ci < t.chunks.size(); ++ci) {
    const DcpChunk& c = t.chunks[ci];
    const int64_t n = c.numel();
    if (n == 0) continue;
    buf.resize(static_cast<size_t>(n) * es);
    read_chunk(t, ci, 0, n, buf.data());
    // Scatter rows of the chunk's last dim into place.
    const int64_t row = nd ? c.sizes[nd - 1] : 1;
    std::vector<int64_t> idx(nd, 0);
    for (int64_t pos = 0; pos < n; pos += row) {
      int64_t rem = pos, g = 0;
      for (size_t k = nd; k-- > 0;) {
        idx[k] = rem % c.sizes[k];
        rem /= c.sizes[k];
        g += (idx[k] + c.offsets[k]) * gstride[k];
      }
      std::memcpy(out + g * es, buf.data() + pos * es, static_cast<size_t>(row) * es);
    }
  }
}

std::string DcpCheckpoint::read_bytes(const std::string& fqn) const {
  auto it = byte_items_.find(fqn);
  if (it == byte_items_.end()) fail(dir_, ": no byte item '", fqn, "'");
  const auto& [fi, range] = it->second;
  if (range.second > (256u << 20)) fail(dir_, ": byte item '", fqn, "' is implausibly large");
  return file(fi).read_string(static_cast<size_t>(range.second), range.first);
}

}  // namespace verl
