// safetensors.cpp — strict safetensors reader and streaming writer (see safetensors.h).
// The header is untrusted: every field is type-checked, sizes are computed with overflow
// checks, and the tensors must tile the data area exactly before any byte is handed out.
#include "io/safetensors.h"

#include <algorithm>
#include <cstring>
#include <nlohmann/json.hpp>
#include <set>
#include <unordered_set>

#include "core/error.h"

namespace verl {

namespace {

using json = nlohmann::json;

// Product of dims × element size, or nullopt on a negative dim or on overflow.
std::optional<uint64_t> byte_size(const std::vector<int64_t>& shape, uint64_t elem) {
  uint64_t n = elem;
  for (int64_t d : shape) {
    if (d < 0 || __builtin_mul_overflow(n, static_cast<uint64_t>(d), &n)) return std::nullopt;
  }
  return n;
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

// A short, single-line rendering of a JSON value for error messages.
std::string brief(const json& v) {
  std::string s = v.dump(-1, ' ', true, json::error_handler_t::replace);
  return s.size() > 80 ? s.substr(0, 77) + "..." : s;
}

// Header JSON for the writer: metadata first, then the tensors in data order. Built as text
// (an ordered_json object looks keys up linearly: quadratic in the number of tensors).
std::string build_header(const std::vector<StSpec>& specs,
                         const std::map<std::string, std::string>& metadata, const std::string& where,
                         uint64_t* total) {
  std::unordered_set<std::string> seen;
  std::string text = "{";
  try {
    if (!metadata.empty()) text += "\"__metadata__\":" + json(metadata).dump();
    uint64_t off = 0;
    for (const auto& s : specs) {
      if (s.name == "__metadata__") fail(where, ": tensor name '__metadata__' is reserved");
      if (!seen.insert(s.name).second) fail(where, ": tensor '", s.name, "' listed twice");
      auto n = byte_size(s.shape, dtype_size(s.dtype));
      if (!n) fail(where, ": tensor '", s.name, "': invalid shape ", shape_str(s.shape));
      if (__builtin_add_overflow(off, *n, &off)) fail(where, ": total data size overflows");
      if (text.size() > 1) text += ',';
      text += json(s.name).dump();
      text += ":{\"dtype\":\"";
      text += dtype_st_name(s.dtype);
      text += "\",\"shape\":[";
      for (size_t i = 0; i < s.shape.size(); ++i) text += (i ? "," : "") + std::to_string(s.shape[i]);
      text += "],\"data_offsets\":[" + std::to_string(off - *n) + "," + std::to_string(off) + "]}";
    }
    *total = off;
  } catch (const json::exception&) {
    fail(where, ": tensor names and metadata must be valid UTF-8");
  }
  text += '}';
  text.append((8 - text.size() % 8) % 8, ' ');
  return text;
}

}  // namespace

int64_t StTensor::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

uint64_t StSpec::nbytes() const {
  auto n = byte_size(shape, dtype_size(dtype));
  if (!n) fail("tensor '", name, "': invalid shape ", shape_str(shape));
  return *n;
}

namespace {

// The header text as JSON, after a first SAX pass that bounds nesting (the format needs depth
// 2) and rejects duplicate names; then a plain DOM parse. Both are linear in the header size
// (nlohmann's callback parser rescans the parent object at every closing brace: quadratic in
// the number of keys).
json parse_header_json(const std::string& text, const std::string& w) {
  if (text.empty() || text[0] != '{')
    fail(w, ": expected a JSON object starting with '{', found ",
         text.empty() ? std::string("nothing") : "'" + brief(json(text.substr(0, 16))) + "'");
  struct Check : json::json_sax_t {
    std::unordered_set<std::string> keys;
    int depth = 0;
    std::string problem;
    bool open() {
      if (++depth > 3) { problem = "nested too deeply"; return false; }
      return true;
    }
    bool null() override { return true; }
    bool boolean(bool) override { return true; }
    bool number_integer(json::number_integer_t) override { return true; }
    bool number_unsigned(json::number_unsigned_t) override { return true; }
    bool number_float(json::number_float_t, const std::string&) override { return true; }
    bool string(std::string&) override { return true; }
    bool binary(json::binary_t&) override { return true; }
    bool start_object(std::size_t) override { return open(); }
    bool end_object() override { --depth; return true; }
    bool start_array(std::size_t) override { return open(); }
    bool end_array() override { --depth; return true; }
    bool key(std::string& k) override {
      if (depth == 1 && !keys.insert(k).second) { problem = "duplicate key '" + k + "'"; return false; }
      return true;
    }
    bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception& e) override {
      problem = std::string("invalid JSON: ") + e.what();
      return false;
    }
  } check;
  if (!json::sax_parse(text, &check)) fail(w, ": ", check.problem.empty() ? "invalid JSON" : check.problem);
  json h;
  try {
    h = json::parse(text);
  } catch (const json::exception& e) {
    fail(w, ": invalid JSON: ", e.what());
  }
  if (!h.is_object()) fail(w, ": expected a JSON object, found ", h.type_name());

  return h;
}

// __metadata__: an object of strings.
void read_metadata(const json& v, const std::string& k, std::map<std::string, std::string>* metadata) {
  if (!v.is_object()) fail(k, ": expected an object of strings, found ", brief(v));
  for (const auto& [mk, mv] : v.items()) {
    if (!mv.is_string()) fail(k, ": entry '", mk, "': expected a string, found ", brief(mv));
    (*metadata)[mk] = mv.get<std::string>();
  }
}

// One tensor entry {dtype, shape, data_offsets}: a known dtype, and offsets inside the data
// area spanning exactly its bytes.
StTensor read_entry(const std::string& name, const json& v, const std::string& k, uint64_t data_size) {
  if (!v.is_object()) fail(k, ": expected an object {dtype, shape, data_offsets}, found ", brief(v));
  StTensor t;
  t.name = name;
  auto dt = v.find("dtype");
  if (dt == v.end() || !dt->is_string()) fail(k, ": expected a string 'dtype', found ", dt == v.end() ? "none" : brief(*dt));
  auto d = dtype_from_st_name(dt->get<std::string>());
  if (!d) fail(k, ": unknown dtype ", brief(*dt));
  t.dtype = *d;
  auto sh = v.find("shape");
  if (sh == v.end() || !sh->is_array()) fail(k, ": expected an array 'shape', found ", sh == v.end() ? "none" : brief(*sh));
  for (const auto& x : *sh) {
    if (!x.is_number_unsigned() || x.get<uint64_t>() > uint64_t(INT64_MAX))
      fail(k, ": expected non-negative integer dims in 'shape', found ", brief(*sh));
    t.shape.push_back(static_cast<int64_t>(x.get<uint64_t>()));
  }
  auto of = v.find("data_offsets");
  if (of == v.end() || !of->is_array() || of->size() != 2 || !(*of)[0].is_number_unsigned() ||
      !(*of)[1].is_number_unsigned())
    fail(k, ": expected 'data_offsets' [begin, end] of non-negative integers, found ", of == v.end() ? "none" : brief(*of));
  t.begin = (*of)[0].get<uint64_t>();
  t.end = (*of)[1].get<uint64_t>();
  if (t.end < t.begin) fail(k, ": data_offsets end ", t.end, " is before begin ", t.begin);
  if (t.end > data_size) fail(k, ": data_offsets [", t.begin, ", ", t.end, ") go past the data area of ", data_size, " bytes");
  auto n = byte_size(t.shape, dtype_size(t.dtype));
  if (!n) fail(k, ": shape ", shape_str(t.shape), " overflows");
  if (*n != t.nbytes())
    fail(k, ": shape ", shape_str(t.shape), " of ", dtype_st_name(t.dtype), " needs ", *n, " bytes, but data_offsets span ",
         t.nbytes());
  return t;
}

// Sorted by position, the tensors must tile [0, data_size) without gaps or overlaps.
void check_tiling(const std::vector<StTensor>& tensors, uint64_t data_size, const std::string& w) {
  std::vector<const StTensor*> pos;
  for (const auto& t : tensors) pos.push_back(&t);
  std::sort(pos.begin(), pos.end(), [](auto* a, auto* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
  });
  uint64_t at = 0;
  for (const StTensor* t : pos) {
    if (t->begin != at)
      fail(w, ": key '", t->name, "': data_offsets begin at ", t->begin, ", expected ", at, " (",
           t->begin < at ? "overlaps the previous tensor" : "leaves a gap", ")");
    at = t->end;
  }
  if (at != data_size)
    fail(w, ": tensors cover ", at, " bytes of data but the data area has ", data_size,
         " (file truncated or has trailing bytes)");
}

}  // namespace

void parse_safetensors_header(const std::string& text, uint64_t data_size, const std::string& where,
                              std::vector<StTensor>* tensors,
                              std::map<std::string, std::string>* metadata) {
  const std::string w = where + ": safetensors header";
  const json h = parse_header_json(text, w);
  tensors->clear();
  metadata->clear();
  for (const auto& [name, v] : h.items()) {
    const std::string k = w + ": key '" + name + "'";
    if (name == "__metadata__") read_metadata(v, k, metadata);
    else tensors->push_back(read_entry(name, v, k, data_size));
  }
  check_tiling(*tensors, data_size, w);
  std::sort(tensors->begin(), tensors->end(), [](const StTensor& a, const StTensor& b) { return a.name < b.name; });
}

SafetensorsReader::SafetensorsReader(const std::string& path) : file_(path) {
  const uint64_t size = file_.size();
  if (size < 8) fail(path, ": ", size, " bytes, too short for a safetensors file (needs an 8-byte header length)");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | file_.data()[i];
  if (n > kMaxHeader) fail(path, ": safetensors header length ", n, " exceeds the limit of ", kMaxHeader, " bytes");
  if (n > size - 8)
    fail(path, ": safetensors header length ", n, " goes past the end of the file (", size, " bytes)");
  data_start_ = 8 + n;
  parse_safetensors_header(std::string(reinterpret_cast<const char*>(file_.data()) + 8, n), size - data_start_,
                           path, &tensors_, &metadata_);
}

const StTensor* SafetensorsReader::find(const std::string& name) const {
  auto it = std::lower_bound(tensors_.begin(), tensors_.end(), name,
                             [](const StTensor& t, const std::string& n) { return t.name < n; });
  return it != tensors_.end() && it->name == name ? &*it : nullptr;
}

const StTensor& SafetensorsReader::at(const std::string& name) const {
  const StTensor* t = find(name);
  if (!t) fail(path(), ": no tensor named '", name, "'");
  return *t;
}

SafetensorsWriter::SafetensorsWriter(const std::string& path, const std::vector<StSpec>& specs,
                                     const std::map<std::string, std::string>& metadata)
    : out_(path) {
  const std::string header = build_header(specs, metadata, path, &total_);
  uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(uint64_t(header.size()) >> (8 * i));
  out_.write(len, 8);
  out_.write(header.data(), header.size());
}

void SafetensorsWriter::write(const void* bytes, size_t n) {
  if (n > total_ - written_)
    fail(out_.path(), ": ", written_ + n, " data bytes written, but the header declares only ", total_);
  out_.write(bytes, n);
  written_ += n;
}

void SafetensorsWriter::finish(bool sync) {
  if (written_ != total_)
    fail(out_.path(), ": only ", written_, " of the ", total_, " data bytes declared in the header were written");
  out_.close(sync);
}

uint64_t SafetensorsWriter::file_size(const std::vector<StSpec>& specs,
                                      const std::map<std::string, std::string>& metadata) {
  uint64_t total = 0;
  const uint64_t h = build_header(specs, metadata, "safetensors file", &total).size();
  return 8 + h + total;
}

}  // namespace verl
