// pickle.cpp — the safe pickle reader declared in pickle.h: a stack machine over the opcodes
// of protocols 0–5 that builds Values and never runs code. Known torch/Python callables are
// given meaning (tensor rebuilds, containers, DTensor wrapper); all others become inert Objects.
//
// Memory safety against hostile input: every length is checked against the remaining input
// before anything is allocated; the result tree is checked at STOP for cycles and nesting
// depth with an explicit stack; every container made during the parse is recorded and, on
// error or when unreachable from the result, emptied before release, so reference cycles
// cannot leak and long chains are never destroyed recursively.
#include "io/pickle.h"

#include <algorithm>
#include <array>
#include <charconv>
#include <cmath>
#include <cstring>
#include <optional>
#include <string_view>
#include <unordered_map>

#include "core/error.h"

namespace verl {
namespace {

using K = Value::Kind;

bool ends_with(std::string_view s, std::string_view t) {
  return s.size() >= t.size() && s.substr(s.size() - t.size()) == t;
}

void put_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

// Decodes UTF-8 into code points; false on malformed input.
bool utf8_code_points(std::string_view s, std::vector<uint32_t>& out) {
  for (size_t i = 0; i < s.size();) {
    auto c = static_cast<uint8_t>(s[i]);
    size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (n == 0 || i + n > s.size()) return false;
    uint32_t cp = n == 1 ? c : c & (0x7F >> n);
    for (size_t k = 1; k < n; ++k) {
      auto d = static_cast<uint8_t>(s[i + k]);
      if ((d >> 6) != 2) return false;
      cp = (cp << 6) | (d & 0x3F);
    }
    out.push_back(cp);
    i += n;
  }
  return true;
}

int hex_digit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// Fields of classes whose values are positional (namedtuples via NEWOBJ args, or a tuple
// BUILD state), so that attr() can read them by name.
struct KnownFields {
  std::string_view cls;
  bool in_state;  // positional values in the BUILD state tuple, else in the constructor args
  std::array<std::string_view, 5> names;
};
constexpr KnownFields kKnownFields[] = {
    {"TensorMeta", false, {"shape", "stride", "dtype"}},
    {"ShardOrderEntry", false, {"tensor_dim", "mesh_dims"}},
    {"TensorProperties", true, {"dtype", "layout", "requires_grad", "memory_format", "pin_memory"}},
};

// i-th child of v in the order items..., args, state; nullptr past the last one.
const ValuePtr* child(const Value& v, size_t i) {
  if (i < v.items.size()) return &v.items[i];
  i -= v.items.size();
  if (i == 0) return &v.args;
  if (i == 1) return &v.state;
  return nullptr;
}

// Open-addressing map from Value pointers to small counters: the final tree check touches
// every container, and std::unordered_map would allocate per entry. 0 means absent.
class PtrMap {
 public:
  uint32_t get(const Value* p) const {
    if (slots_.empty()) return 0;
    for (size_t i = hash(p) & (slots_.size() - 1);; i = (i + 1) & (slots_.size() - 1))
      if (slots_[i].first == p || !slots_[i].first) return slots_[i].first ? slots_[i].second : 0;
  }
  void set(const Value* p, uint32_t v) {
    if (2 * (used_ + 1) > slots_.size()) grow();
    for (size_t i = hash(p) & (slots_.size() - 1);; i = (i + 1) & (slots_.size() - 1)) {
      if (!slots_[i].first) {
        slots_[i].first = p;
        ++used_;
      }
      if (slots_[i].first == p) {
        slots_[i].second = v;
        return;
      }
    }
  }

 private:
  std::vector<std::pair<const Value*, uint32_t>> slots_;
  size_t used_ = 0;
  static size_t hash(const Value* p) {
    uint64_t x = reinterpret_cast<uintptr_t>(p);
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    return static_cast<size_t>(x ^ (x >> 33));
  }
  void grow() {
    auto old = std::move(slots_);
    slots_.assign(std::max<size_t>(64, old.size() * 2), {nullptr, 0});
    used_ = 0;
    for (const auto& [p, v] : old)
      if (p) set(p, v);
  }
};

bool has_children(const Value& v) { return !v.items.empty() || v.args || v.state; }
bool can_hold(K k) {
  return k == K::Tuple || k == K::List || k == K::Dict || k == K::Set || k == K::Object || k == K::Tensor;
}

class Parser {
 public:
  Parser(std::string_view in, const std::string& where, const PersistentLoad& pl, const PickleLimits& lim)
      : in_(in), where_(where), pl_(pl), lim_(lim) {}
  Parser(const Parser&) = delete;
  Parser& operator=(const Parser&) = delete;
  // Empties every container not part of the result, so nothing it refers to can leak or
  // be destroyed recursively.
  ~Parser() {
    for (auto& v : owned_)
      if (!checked_ || !seen_.get(v.get())) {
        v->items.clear();
        v->args.reset();
        v->state.reset();
      }
  }

  ValuePtr parse();

 private:
  std::string_view in_;
  const std::string& where_;
  const PersistentLoad& pl_;
  const PickleLimits& lim_;
  size_t pos_ = 0, op_pos_ = 0, items_ = 0;
  std::vector<ValuePtr> stack_;
  std::vector<size_t> marks_;  // stack sizes at each MARK
  std::vector<ValuePtr> memo_vec_;  // dense memo keys (MEMOIZE, sequential BINPUT)
  std::unordered_map<uint64_t, ValuePtr> memo_far_;  // sparse ones
  size_t memo_count_ = 0;
  std::vector<ValuePtr> owned_;  // every Value made here that can hold others
  PtrMap seen_;          // finish(): 1 = on the DFS path, h + 1 = done with height h
  bool checked_ = false;  // finish() succeeded: seen_ holds the result's containers
  // Per dict-like Value: hashable key -> index of the key in items (SETITEM replaces).
  std::unordered_map<const Value*, std::unordered_map<std::string, size_t>> dict_index_;

  template <class... A>
  [[noreturn]] void bad(const A&... parts) const {
    fail(where_, ": bad pickle at byte ", op_pos_, ": ", parts...);
  }

  // ---- input ----
  size_t left() const { return in_.size() - pos_; }
  std::string_view take(uint64_t n) {
    if (n > left()) bad("truncated: needs ", n, " bytes, ", left(), " left");
    auto s = in_.substr(pos_, n);
    pos_ += n;
    return s;
  }
  uint64_t le(size_t n) {
    auto s = take(n);
    uint64_t v = 0;
    for (size_t i = 0; i < n; ++i) v |= uint64_t(static_cast<uint8_t>(s[i])) << (8 * i);
    return v;
  }
  std::string_view text(uint64_t n) {  // a string payload of n bytes
    if (n > lim_.max_string) bad("string of ", n, " bytes exceeds the limit of ", lim_.max_string);
    return take(n);
  }
  std::string_view line() {
    size_t nl = in_.find('\n', pos_);
    if (nl == std::string_view::npos) bad("truncated: unterminated text argument");
    auto s = text(nl - pos_);
    ++pos_;
    return s;
  }

  // ---- values ----
  void count(size_t n = 1) {
    items_ += n;
    if (items_ > lim_.max_items) bad("more than ", lim_.max_items, " items");
  }
  ValuePtr make(K k) {
    count();
    auto v = std::make_shared<Value>();
    v->kind = k;
    if (can_hold(k)) owned_.push_back(v);
    return v;
  }
  ValuePtr make_int(int64_t i) {
    auto v = make(K::Int);
    v->i = i;
    return v;
  }
  ValuePtr make_str(K k, std::string s) {
    auto v = make(k);
    v->str = std::move(s);
    return v;
  }
  // An integer outside int64: kept inert as builtins.int(<little-endian bytes or digits>).
  ValuePtr big_int(ValuePtr repr) {
    auto args = make(K::Tuple);
    args->items.push_back(std::move(repr));
    return object("builtins.int", args);
  }
  ValuePtr object(std::string cls, ValuePtr args) {
    auto o = make_str(K::Object, std::move(cls));
    o->args = std::move(args);
    return o;
  }
  ValuePtr tuple(std::vector<ValuePtr> items) {
    auto t = make(K::Tuple);
    t->items = std::move(items);
    return t;
  }

  // ---- stack ----
  size_t base() const { return marks_.empty() ? 0 : marks_.back(); }
  void push(ValuePtr v) { stack_.push_back(std::move(v)); }
  ValuePtr& top() {
    if (stack_.size() <= base()) bad("stack underflow");
    return stack_.back();
  }
  ValuePtr pop() {
    ValuePtr v = std::move(top());
    stack_.pop_back();
    return v;
  }
  std::vector<ValuePtr> pop_n(size_t n) {
    if (stack_.size() < base() + n) bad("stack underflow");
    std::vector<ValuePtr> out(std::make_move_iterator(stack_.end() - static_cast<std::ptrdiff_t>(n)), std::make_move_iterator(stack_.end()));
    stack_.resize(stack_.size() - n);
    return out;
  }
  std::vector<ValuePtr> pop_mark() {
    if (marks_.empty()) bad("no MARK on the stack");
    size_t b = marks_.back();
    marks_.pop_back();
    std::vector<ValuePtr> out(std::make_move_iterator(stack_.begin() + static_cast<std::ptrdiff_t>(b)), std::make_move_iterator(stack_.end()));
    stack_.resize(b);
    return out;
  }

  // ---- memo ----
  ValuePtr* memo_slot(uint64_t key, bool create) {
    if (key < memo_vec_.size()) return &memo_vec_[key];
    if (create && key < 2 * memo_count_ + 1024) {  // the vector stays O(entries)
      memo_vec_.resize(std::max<size_t>(key + 1, memo_vec_.size() + memo_vec_.size() / 2));
      return &memo_vec_[key];
    }
    if (create) return &memo_far_[key];
    auto it = memo_far_.find(key);
    return it == memo_far_.end() ? nullptr : &it->second;
  }
  void memo_put(uint64_t key) {
    const ValuePtr& v = top();
    ValuePtr* slot = memo_slot(key, true);
    if (!*slot && memo_count_++ >= lim_.max_memo) bad("memo larger than ", lim_.max_memo);
    *slot = v;
  }
  // The memo index of a text PUT / GET: a non-negative decimal line.
  uint64_t memo_index_text(const char* op) {
    auto v = int_text(line());
    if (!v->is(K::Int) || v->i < 0) bad("invalid ", op, " index");
    return static_cast<uint64_t>(v->i);
  }
  void memo_get(uint64_t key) {
    ValuePtr* slot = memo_slot(key, false);
    if (!slot || !*slot) bad("memo key ", key, " not found");
    count();
    push(*slot);
  }

  // ---- containers ----
  // Canonical text of a hashable scalar key (None/bool/int/float/str/bytes), as Python's
  // dict equality sees it (True == 1 == 1.0); nullopt for other keys (never deduplicated).
  static std::optional<std::string> key_text(const Value& k) {
    switch (k.kind) {
      case K::None: return "N";
      case K::Bool: return std::string("I") + (k.b ? "1" : "0");
      case K::Int: return "I" + std::to_string(k.i);
      case K::Float:
        if (std::isnan(k.f)) return std::nullopt;
        if (k.f == std::trunc(k.f) && std::fabs(k.f) < 9.2e18)
          return "I" + std::to_string(static_cast<int64_t>(k.f));
        return "F" + std::to_string(k.f);
      case K::Str: return "S" + k.str;
      case K::Bytes: return "B" + k.str;
      default: return std::nullopt;
    }
  }
  static bool same_key(const Value& a, const Value& b) {
    if (a.kind == K::Str || b.kind == K::Str || a.kind == K::Bytes || b.kind == K::Bytes)
      return a.kind == b.kind && a.str == b.str;
    auto ta = key_text(a), tb = key_text(b);
    return ta && tb && *ta == *tb;
  }
  // d[k] = v: replaces the value of an equal hashable key, else appends. Small dicts are
  // scanned; larger ones get an index on first need.
  void dict_set(const ValuePtr& d, ValuePtr k, ValuePtr v) {
    constexpr size_t kScan = 32;  // items (16 pairs)
    if (key_text(*k)) {
      auto idx = dict_index_.find(d.get());
      if (idx == dict_index_.end() && d->items.size() < kScan) {
        for (size_t i = 0; i + 1 < d->items.size(); i += 2)
          if (same_key(*d->items[i], *k)) {
            d->items[i + 1] = std::move(v);
            return;
          }
      } else {
        if (idx == dict_index_.end()) {
          idx = dict_index_.try_emplace(d.get()).first;
          for (size_t i = 0; i + 1 < d->items.size(); i += 2)
            if (auto t = key_text(*d->items[i])) idx->second.try_emplace(std::move(*t), i);
        }
        auto [it, fresh] = idx->second.try_emplace(*key_text(*k), d->items.size());
        if (!fresh) {
          d->items[it->second + 1] = std::move(v);
          return;
        }
      }
    }
    d->items.push_back(std::move(k));
    d->items.push_back(std::move(v));
  }
  void set_items(const ValuePtr& d, std::vector<ValuePtr>& kv) {
    if (kv.size() % 2) bad("odd number of items for a dict");
    if (!d->is(K::Dict) && !d->is(K::Object)) bad("SETITEM on ", d->repr(1));
    for (size_t i = 0; i < kv.size(); i += 2) dict_set(d, std::move(kv[i]), std::move(kv[i + 1]));
  }
  void append_items(const ValuePtr& l, std::vector<ValuePtr>& vs, K want) {
    if (!l->is(want) && !l->is(K::Object)) bad("cannot add items to ", l->repr(1));
    for (auto& v : vs) l->items.push_back(std::move(v));
  }
  ValuePtr copy_items(K k, const Value& from) {  // a new container with from's items
    count(from.items.size());
    auto v = make(k);
    v->items = from.items;
    return v;
  }
  ValuePtr dict_from(const Value& from) {  // from: a Dict, or a sequence of (key, value) pairs
    auto d = make(K::Dict);
    count(from.items.size());
    if (from.is(K::Dict)) {
      for (size_t i = 0; i + 1 < from.items.size(); i += 2) dict_set(d, from.items[i], from.items[i + 1]);
      return d;
    }
    for (const auto& p : from.items) {
      if (!(p->is(K::Tuple) || p->is(K::List)) || p->items.size() != 2) bad("dict item is not a pair: ", p->repr(1));
      dict_set(d, p->items[0], p->items[1]);
    }
    return d;
  }
  // BUILD: an object's state (instance attributes). On a dict (an OrderedDict's
  // `_metadata`, say) it is kept as attributes too, never merged into the items.
  void build(const ValuePtr& obj, const ValuePtr& state) {
    if (!can_hold(obj->kind)) return;  // classes, storages, scalars: nothing to record
    if (obj->state && obj->state->is(K::Dict) && state->is(K::Dict)) {
      auto merged = dict_from(*obj->state);
      count(state->items.size());
      for (size_t i = 0; i + 1 < state->items.size(); i += 2) dict_set(merged, state->items[i], state->items[i + 1]);
      obj->state = merged;
    } else {
      obj->state = state;
    }
  }

  // ---- arguments of known callables ----
  int64_t want_int(const ValuePtr& v, const char* what) {
    if (v->is(K::Int)) return v->i;
    if (v->is(K::Bool)) return v->b;
    bad(what, ": expected an integer, found ", v->repr(1));
  }
  std::vector<int64_t> want_ints(const ValuePtr& v, const char* what) {
    if (!v->is(K::Tuple) && !v->is(K::List)) bad(what, ": expected a tuple of integers, found ", v->repr(1));
    std::vector<int64_t> out;
    for (const auto& x : v->items) {
      out.push_back(want_int(x, what));
      if (out.back() < 0) bad(what, ": negative value ", out.back());
    }
    return out;
  }
  const std::string& want_str(const ValuePtr& v, const char* what) {
    if (!v->is(K::Str)) bad(what, ": expected a string, found ", v->repr(1));
    return v->str;
  }
  static std::string class_name(const ValuePtr& v) {
    return v->is(K::Global) || v->is(K::Object) ? v->str : "<" + v->repr(1) + ">";
  }

  ValuePtr persistent(const ValuePtr& pid);
  ValuePtr rebuild_tensor(const std::vector<ValuePtr>& a, size_t min_args, bool v3);
  ValuePtr call(const ValuePtr& fn, const ValuePtr& args, int depth = 0);
  ValuePtr newobj(const ValuePtr& cls, const ValuePtr& args);
  ValuePtr int_text(std::string_view s);
  ValuePtr long_bytes(std::string_view b);
  std::string escape_decode(std::string_view s);
  std::string raw_unicode_decode(std::string_view s);
  void finish(const ValuePtr& root);
};

ValuePtr Parser::persistent(const ValuePtr& pid) {
  if (pl_) {
    auto v = pl_(pid);
    if (!v) bad("persistent_load returned nothing for ", pid->repr());
    return v;
  }
  const auto& a = pid->items;
  if (!pid->is(K::Tuple) || a.size() != 5 || !a[0]->is(K::Str) || a[0]->str != "storage" || !a[1]->is(K::Global))
    bad("unsupported persistent id ", pid->repr());
  const std::string& cls = a[1]->str;
  std::string_view base = cls;
  base = base.substr(base.rfind('.') + 1);  // npos + 1 == 0
  auto st = std::make_shared<StorageRef>();
  if (cls.compare(0, 6, "torch.") != 0) bad("persistent id names a non-torch storage class ", cls);
  if (base == "UntypedStorage") {
    st->dtype = DType::U8;
  } else if (auto d = dtype_from_torch_storage(std::string(base))) {
    st->dtype = *d;
  } else {
    bad("unsupported storage type ", cls);
  }
  st->key = want_str(a[2], "storage key");
  st->location = want_str(a[3], "storage location");
  st->numel = want_int(a[4], "storage size");
  if (st->numel < 0) bad("negative storage size ", st->numel);
  auto v = make(K::Storage);
  v->storage = std::move(st);
  return v;
}

// _rebuild_tensor(storage, offset, size, stride), _v2(..., requires_grad, hooks[, metadata]),
// _v3(..., requires_grad, hooks, dtype[, metadata]).
ValuePtr Parser::rebuild_tensor(const std::vector<ValuePtr>& a, size_t min_args, bool v3) {
  if (a.size() < min_args) bad("tensor rebuild with ", a.size(), " arguments, expected ", min_args);
  if (!a[0]->is(K::Storage) || !a[0]->storage) bad("tensor rebuild without a storage: ", a[0]->repr(1));
  auto t = std::make_shared<TensorRef>();
  t->storage = *a[0]->storage;
  t->dtype = t->storage.dtype;
  t->storage_offset = want_int(a[1], "tensor storage_offset");
  if (t->storage_offset < 0) bad("negative tensor storage_offset ", t->storage_offset);
  t->size = want_ints(a[2], "tensor size");
  t->stride = want_ints(a[3], "tensor stride");
  if (t->size.size() != t->stride.size())
    bad("tensor size has ", t->size.size(), " dims but stride has ", t->stride.size());
  if (v3) {
    const std::string& n = a[6]->is(K::Global) ? a[6]->str : std::string();
    auto d = n.compare(0, 6, "torch.") == 0 ? dtype_from_torch_name(n.substr(6)) : std::nullopt;
    if (!d) bad("unsupported tensor dtype ", a[6]->repr(1));
    t->dtype = *d;
  }
  try {
    (void)t->numel();
  } catch (const Error&) {
    bad("tensor element count overflows");
  }
  auto v = make(K::Tensor);
  v->tensor = std::move(t);
  return v;
}

// REDUCE: fn(*args), for the allow-listed callables; anything else becomes an inert Object.
ValuePtr Parser::call(const ValuePtr& fn, const ValuePtr& args, int depth) {
  if (depth > 4) bad("tensor rebuilds nested too deeply");
  const auto& a = args->items;
  if (!fn->is(K::Global)) return object(class_name(fn), args);
  const std::string& n = fn->str;
  if (n == "torch._utils._rebuild_tensor") return rebuild_tensor(a, 4, false);
  if (n == "torch._utils._rebuild_tensor_v2") return rebuild_tensor(a, 4, false);
  if (n == "torch._utils._rebuild_tensor_v3") return rebuild_tensor(a, 7, true);
  if (n == "torch._utils._rebuild_parameter" || n == "torch._utils._rebuild_parameter_with_state") {
    if (a.empty()) bad(n, " without arguments");
    return a[0];
  }
  if (n == "torch._tensor._rebuild_from_type_v2" || n == "torch._tensor._rebuild_from_type") {
    // (func, type, args, state): a tensor subclass, e.g. DTensor via _rebuild_wrapper_subclass.
    if (a.size() < 3 || !a[2]->is(K::Tuple)) bad(n, " expects (func, type, args tuple, state)");
    ValuePtr r;
    if (a[0]->is(K::Global) && a[0]->str == "torch._utils._rebuild_wrapper_subclass")
      r = object(class_name(a[1]), a[2]);
    else
      r = call(a[0], a[2], depth + 1);
    if (a.size() > 3 && !a[3]->is(K::None) && !r->is(K::Tensor)) build(r, a[3]);
    return r;
  }
  if (n == "torch._utils._rebuild_wrapper_subclass")
    return object(a.empty() ? n : class_name(a[0]), args);
  if (n == "collections.OrderedDict" || n == "builtins.dict") {
    if (a.empty()) return make(K::Dict);
    if (a.size() == 1 && (a[0]->is(K::Dict) || a[0]->is(K::List) || a[0]->is(K::Tuple))) return dict_from(*a[0]);
  }
  if (n == "torch.Size" && a.size() == 1 && (a[0]->is(K::Tuple) || a[0]->is(K::List)))
    return copy_items(K::Tuple, *a[0]);
  if (n == "torch.device" && !a.empty() && a[0]->is(K::Str)) {
    std::string s = a[0]->str;
    if (a.size() > 1 && a[1]->is(K::Int)) s += ":" + std::to_string(a[1]->i);
    return make_str(K::Str, s);
  }
  if ((n == "builtins.set" || n == "builtins.frozenset") && a.size() <= 1) {
    if (a.empty()) return make(K::Set);
    if (a[0]->is(K::List) || a[0]->is(K::Tuple) || a[0]->is(K::Set)) return copy_items(K::Set, *a[0]);
  }
  if ((n == "builtins.bytes" || n == "builtins.bytearray") && a.size() <= 1) {
    if (a.empty()) return make(K::Bytes);
    if (a[0]->is(K::Bytes)) return make_str(K::Bytes, a[0]->str);
  }
  if ((n == "_codecs.encode" || n == "builtins.bytearray") && a.size() == 2 && a[0]->is(K::Str) && a[1]->is(K::Str)) {
    // Python 3 bytes in protocols < 3: encode(str, 'latin1'); bytearray(str, 'latin-1').
    std::string enc = a[1]->str;
    std::transform(enc.begin(), enc.end(), enc.begin(), [](unsigned char c) { return std::tolower(c); });
    if (enc == "utf-8" || enc == "utf8") return make_str(K::Bytes, a[0]->str);
    if (enc != "latin1" && enc != "latin-1" && enc != "iso-8859-1" && enc != "iso8859-1")
      bad("unsupported encoding '", a[1]->str, "' in ", n);
    std::vector<uint32_t> cps;
    if (!utf8_code_points(a[0]->str, cps)) bad("invalid UTF-8 in ", n);
    std::string out;
    for (uint32_t cp : cps) {
      if (cp > 0xFF) bad("character U+", cp, " not encodable as latin-1 in ", n);
      out += static_cast<char>(cp);
    }
    return make_str(K::Bytes, std::move(out));
  }
  if (n == "torch.jit._pickle.restore_type_tag" && a.size() == 2) return a[0];  // libtorch's typed containers
  if (n == "builtins.getattr" && a.size() == 2 && a[0]->is(K::Global) && a[1]->is(K::Str)) {
    // A nested class reference such as ShardedTensor.ProcessGroupState: still only a name.
    auto g = make(K::Global);
    g->str = a[0]->str + "." + a[1]->str;
    return g;
  }
  if (n == "copyreg._reconstructor" && !a.empty()) return object(class_name(a[0]), tuple({}));
  if (n == "copyreg.__newobj__" && !a.empty())
    return newobj(a[0], tuple(std::vector<ValuePtr>(a.begin() + 1, a.end())));
  return object(n, args);
}

ValuePtr Parser::newobj(const ValuePtr& cls, const ValuePtr& args) {
  if (!cls->is(K::Global)) bad("NEWOBJ of a non-class: ", cls->repr(1));
  const std::string& n = cls->str;
  if (n == "collections.OrderedDict" || n == "builtins.dict") return make(K::Dict);
  if (n == "builtins.set") return make(K::Set);
  if (n == "builtins.list") return make(K::List);
  return object(n, args);
}

// INT / LONG text: decimal digits with an optional sign.
ValuePtr Parser::int_text(std::string_view s) {
  while (!s.empty() && (s.back() == ' ' || s.back() == '\r')) s.remove_suffix(1);
  while (!s.empty() && s.front() == ' ') s.remove_prefix(1);
  if (!s.empty() && s.front() == '+') s.remove_prefix(1);
  std::string_view digits = !s.empty() && s.front() == '-' ? s.substr(1) : s;
  if (digits.empty() || !std::all_of(digits.begin(), digits.end(), [](char c) { return c >= '0' && c <= '9'; }))
    bad("invalid integer literal");
  int64_t v = 0;
  auto r = std::from_chars(s.data(), s.data() + s.size(), v);
  if (r.ec == std::errc::result_out_of_range) return big_int(make_str(K::Str, std::string(s)));
  return make_int(v);
}

// LONG1 / LONG4: little-endian two's complement.
ValuePtr Parser::long_bytes(std::string_view b) {
  size_t n = b.size();
  if (n == 0) return make_int(0);
  auto byte = [&](size_t i) { return static_cast<uint8_t>(b[i]); };
  const bool neg = byte(n - 1) & 0x80;
  if (n > 8) {  // fits only if bytes 8.. merely extend the sign of byte 7
    bool fits = bool(byte(7) & 0x80) == neg;
    for (size_t i = 8; i < n; ++i) fits = fits && byte(i) == (neg ? 0xFF : 0x00);
    if (!fits) return big_int(make_str(K::Bytes, std::string(b)));
  }
  uint64_t u = 0;
  for (size_t i = 0; i < std::min<size_t>(n, 8); ++i) u |= uint64_t(byte(i)) << (8 * i);
  if (n < 8 && neg) u |= ~uint64_t(0) << (8 * n);
  return make_int(static_cast<int64_t>(u));
}

// STRING argument: Python's codecs.escape_decode.
std::string Parser::escape_decode(std::string_view s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] != '\\') {
      out += s[i];
      continue;
    }
    if (++i == s.size()) bad("STRING ends with a backslash");
    char c = s[i];
    switch (c) {
      case '\n': break;
      case 'a': out += '\a'; break;
      case 'b': out += '\b'; break;
      case 'f': out += '\f'; break;
      case 'n': out += '\n'; break;
      case 'r': out += '\r'; break;
      case 't': out += '\t'; break;
      case 'v': out += '\v'; break;
      case '\\': case '\'': case '"': out += c; break;
      case 'x': {
        int h = i + 2 < s.size() ? hex_digit(s[i + 1]) : -1, l = h >= 0 ? hex_digit(s[i + 2]) : -1;
        if (l < 0) bad("invalid \\x escape in STRING");
        out += static_cast<char>(h * 16 + l);
        i += 2;
        break;
      }
      default:
        if (c >= '0' && c <= '7') {
          int v = c - '0';
          for (int k = 0; k < 2 && i + 1 < s.size() && s[i + 1] >= '0' && s[i + 1] <= '7'; ++k) v = v * 8 + (s[++i] - '0');
          out += static_cast<char>(v & 0xFF);
        } else {
          out += '\\';
          out += c;
        }
    }
  }
  return out;
}

// UNICODE argument: raw-unicode-escape (\uXXXX, \UXXXXXXXX; other bytes are latin-1) to UTF-8.
std::string Parser::raw_unicode_decode(std::string_view s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    size_t n = 0;
    if (s[i] == '\\' && i + 1 < s.size()) n = s[i + 1] == 'u' ? 4 : s[i + 1] == 'U' ? 8 : 0;
    if (n == 0) {
      put_utf8(out, static_cast<uint8_t>(s[i]));
      continue;
    }
    if (i + 2 + n > s.size()) bad("truncated \\u escape in UNICODE");
    uint32_t cp = 0;
    for (size_t k = 0; k < n; ++k) {
      int d = hex_digit(s[i + 2 + k]);
      if (d < 0) bad("invalid \\u escape in UNICODE");
      cp = cp * 16 + static_cast<uint32_t>(d);
    }
    if (cp > 0x10FFFF) bad("code point out of range in UNICODE");
    put_utf8(out, cp);
    i += 1 + n;
  }
  return out;
}

// At STOP: the result must be acyclic and nested at most max_depth deep. Explicit-stack DFS
// with heights memoised per node, so shared sub-trees are visited once.
void Parser::finish(const ValuePtr& root) {
  struct Frame {
    const Value* v;
    size_t next, h;
  };
  std::vector<Frame> st;
  if (has_children(*root)) {
    st.push_back({root.get(), 0, 1});
    seen_.set(root.get(), 1);
  }
  while (!st.empty()) {
    const ValuePtr* c = child(*st.back().v, st.back().next++);
    if (!c) {
      Frame f = st.back();
      st.pop_back();
      seen_.set(f.v, static_cast<uint32_t>(f.h + 1));
      if (!st.empty()) st.back().h = std::max(st.back().h, f.h + 1);
      continue;
    }
    if (!*c || !has_children(**c)) continue;
    const Value* v = c->get();
    const uint32_t s = seen_.get(v);
    if (s == 1) bad("recursive (self-containing) structures are not supported");
    if (s > 1) {  // shared, already checked: height s - 1
      if (st.size() + s - 1 > lim_.max_depth) bad("containers nested deeper than ", lim_.max_depth);
      st.back().h = std::max<size_t>(st.back().h, s);
      continue;
    }
    if (st.size() >= lim_.max_depth) bad("containers nested deeper than ", lim_.max_depth);
    seen_.set(v, 1);
    st.push_back({v, 0, 1});
  }
  checked_ = true;
}

ValuePtr Parser::parse() {
  for (;;) {
    op_pos_ = pos_;
    if (pos_ >= in_.size()) bad("truncated: no STOP opcode");
    const auto op = static_cast<uint8_t>(in_[pos_++]);
    switch (op) {
      case 0x80: {  // PROTO
        auto v = le(1);
        if (v > 5) bad("unsupported protocol ", v);
        break;
      }
      case 0x95: {  // FRAME: a length hint only
        auto n = le(8);
        if (n > left()) bad("FRAME of ", n, " bytes, only ", left(), " left");
        break;
      }
      case '.': {  // STOP
        auto r = pop();
        finish(r);
        return r;
      }
      case '(':  // MARK
        if (marks_.size() >= lim_.max_depth) bad("MARKs nested deeper than ", lim_.max_depth);
        marks_.push_back(stack_.size());
        break;
      case '0':  // POP (of an item, or of a MARK with nothing above it)
        if (stack_.size() > base()) stack_.pop_back();
        else pop_mark();
        break;
      case '1': pop_mark(); break;  // POP_MARK
      case '2': {  // DUP
        ValuePtr v = top();
        count();
        push(std::move(v));
        break;
      }
      case 'N': push(make(K::None)); break;
      case 0x88: case 0x89: {  // NEWTRUE / NEWFALSE
        auto v = make(K::Bool);
        v->b = op == 0x88;
        push(v);
        break;
      }
      case 'I': {  // INT (text; "01"/"00" are protocol-0 booleans)
        auto s = line();
        if (s == "01" || s == "00") {
          auto v = make(K::Bool);
          v->b = s == "01";
          push(v);
        } else {
          push(int_text(s));
        }
        break;
      }
      case 'L': {  // LONG (text, optional trailing L)
        auto s = line();
        if (!s.empty() && s.back() == 'L') s.remove_suffix(1);
        push(int_text(s));
        break;
      }
      case 'J': push(make_int(static_cast<int32_t>(le(4)))); break;  // BININT
      case 'K': push(make_int(static_cast<int64_t>(le(1)))); break;  // BININT1
      case 'M': push(make_int(static_cast<int64_t>(le(2)))); break;  // BININT2
      case 0x8a: push(long_bytes(text(le(1)))); break;                // LONG1
      case 0x8b: {                                                    // LONG4
        auto n = static_cast<int32_t>(le(4));
        if (n < 0) bad("negative LONG4 length");
        push(long_bytes(text(static_cast<uint64_t>(n))));
        break;
      }
      case 'F': {  // FLOAT (text)
        auto s = line();
        auto v = make(K::Float);
        auto r = std::from_chars(s.data(), s.data() + s.size(), v->f);
        if (r.ec != std::errc() || r.ptr != s.data() + s.size()) bad("invalid FLOAT literal");
        push(v);
        break;
      }
      case 'G': {  // BINFLOAT: big-endian IEEE double
        auto s = take(8);
        uint64_t u = 0;
        for (char c : s) u = (u << 8) | static_cast<uint8_t>(c);
        auto v = make(K::Float);
        std::memcpy(&v->f, &u, 8);
        push(v);
        break;
      }
      case 'S': {  // STRING: quoted, backslash-escaped
        auto s = line();
        while (!s.empty() && (s.back() == ' ' || s.back() == '\r')) s.remove_suffix(1);
        if (s.size() < 2 || s.front() != s.back() || (s.front() != '\'' && s.front() != '"'))
          bad("STRING argument must be quoted");
        push(make_str(K::Str, escape_decode(s.substr(1, s.size() - 2))));
        break;
      }
      case 'T': {  // BINSTRING
        auto n = static_cast<int32_t>(le(4));
        if (n < 0) bad("negative BINSTRING length");
        push(make_str(K::Str, std::string(text(static_cast<uint64_t>(n)))));
        break;
      }
      case 'U': push(make_str(K::Str, std::string(text(le(1))))); break;  // SHORT_BINSTRING
      case 'V': push(make_str(K::Str, raw_unicode_decode(line()))); break;  // UNICODE
      case 'X': push(make_str(K::Str, std::string(text(le(4))))); break;  // BINUNICODE
      case 0x8c: push(make_str(K::Str, std::string(text(le(1))))); break;  // SHORT_BINUNICODE
      case 0x8d: push(make_str(K::Str, std::string(text(le(8))))); break;  // BINUNICODE8
      case 'B': push(make_str(K::Bytes, std::string(text(le(4))))); break;  // BINBYTES
      case 'C': push(make_str(K::Bytes, std::string(text(le(1))))); break;  // SHORT_BINBYTES
      case 0x8e: case 0x96:  // BINBYTES8, BYTEARRAY8
        push(make_str(K::Bytes, std::string(text(le(8)))));
        break;
      case ')': push(make(K::Tuple)); break;          // EMPTY_TUPLE
      case 't': push(tuple(pop_mark())); break;       // TUPLE
      case 0x85: case 0x86: case 0x87:                // TUPLE1..3
        push(tuple(pop_n(op - 0x84)));
        break;
      case ']': push(make(K::List)); break;  // EMPTY_LIST
      case 'l': {                            // LIST
        auto v = make(K::List);
        v->items = pop_mark();
        push(v);
        break;
      }
      case 'a': {  // APPEND
        std::vector<ValuePtr> v{pop()};
        append_items(top(), v, K::List);
        break;
      }
      case 'e': {  // APPENDS
        auto v = pop_mark();
        append_items(top(), v, K::List);
        break;
      }
      case '}': push(make(K::Dict)); break;  // EMPTY_DICT
      case 'd': {                            // DICT
        auto kv = pop_mark();
        auto d = make(K::Dict);
        set_items(d, kv);
        push(d);
        break;
      }
      case 's': {  // SETITEM
        auto kv = pop_n(2);
        set_items(top(), kv);
        break;
      }
      case 'u': {  // SETITEMS
        auto kv = pop_mark();
        set_items(top(), kv);
        break;
      }
      case 0x8f: push(make(K::Set)); break;  // EMPTY_SET
      case 0x90: {                           // ADDITEMS
        auto v = pop_mark();
        append_items(top(), v, K::Set);
        break;
      }
      case 0x91: {  // FROZENSET
        auto v = make(K::Set);
        v->items = pop_mark();
        push(v);
        break;
      }
      case 'c': {  // GLOBAL "module\nname\n" (Python 2 module names mapped)
        std::string mod(line());
        std::string name(line());
        if (mod == "__builtin__") mod = "builtins";
        if (mod == "copy_reg") mod = "copyreg";
        push(make_str(K::Global, mod + "." + name));
        break;
      }
      case 0x93: {  // STACK_GLOBAL
        auto name = pop(), mod = pop();
        push(make_str(K::Global, want_str(mod, "STACK_GLOBAL module") + "." + want_str(name, "STACK_GLOBAL name")));
        break;
      }
      case 'i': {  // INST "module\nname\n" over MARK args
        std::string mod(line());
        std::string name(line());
        auto args = tuple(pop_mark());
        push(object(mod + "." + name, args));
        break;
      }
      case 'o': {  // OBJ: MARK cls args...
        auto v = pop_mark();
        if (v.empty()) bad("OBJ without a class");
        auto cls = v.front();
        push(newobj(cls, tuple(std::vector<ValuePtr>(v.begin() + 1, v.end()))));
        break;
      }
      case 'R': {  // REDUCE
        auto args = pop();
        auto fn = pop();
        if (!args->is(K::Tuple)) bad("REDUCE arguments are not a tuple: ", args->repr(1));
        push(call(fn, args));
        break;
      }
      case 0x81: {  // NEWOBJ
        auto args = pop();
        auto cls = pop();
        if (!args->is(K::Tuple)) bad("NEWOBJ arguments are not a tuple: ", args->repr(1));
        push(newobj(cls, args));
        break;
      }
      case 0x92: {  // NEWOBJ_EX (keyword arguments only reach __new__: dropped)
        pop();
        auto args = pop();
        auto cls = pop();
        if (!args->is(K::Tuple)) bad("NEWOBJ_EX arguments are not a tuple: ", args->repr(1));
        push(newobj(cls, args));
        break;
      }
      case 'b': {  // BUILD
        auto state = pop();
        build(top(), state);
        break;
      }
      case 'p': memo_put(memo_index_text("PUT")); break;  // PUT (text)
      case 'q': memo_put(le(1)); break;                    // BINPUT
      case 'r': memo_put(le(4)); break;                    // LONG_BINPUT
      case 0x94: memo_put(memo_count_); break;             // MEMOIZE
      case 'g': memo_get(memo_index_text("GET")); break;  // GET (text)
      case 'h': memo_get(le(1)); break;                    // BINGET
      case 'j': memo_get(le(4)); break;                    // LONG_BINGET
      case 'P': push(persistent(make_str(K::Str, std::string(line())))); break;  // PERSID
      case 'Q': push(persistent(pop())); break;                                  // BINPERSID
      case 0x97: case 0x98: bad("out-of-band buffers (NEXT_BUFFER/READONLY_BUFFER) are not supported");
      case 0x82: case 0x83: case 0x84: bad("extension codes (EXT1/EXT2/EXT4) are not supported");
      default: {
        static const char* hex = "0123456789abcdef";
        bad("unknown opcode 0x", hex[op >> 4], hex[op & 15]);
      }
    }
  }
}

void quote(std::string& out, const std::string& s, bool bytes) {
  constexpr size_t kMax = 64;
  static const char* hex = "0123456789abcdef";
  out += bytes ? "b'" : "'";
  for (size_t i = 0; i < s.size() && i < kMax; ++i) {
    auto c = static_cast<uint8_t>(s[i]);
    if (c == '\'' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c < 0x20 || c == 0x7F || (bytes && c >= 0x80)) {
      out += "\\x";
      out += hex[c >> 4];
      out += hex[c & 15];
    } else {
      out += static_cast<char>(c);
    }
  }
  out += s.size() > kMax ? "...'" : "'";
}

void repr_to(const Value& v, int depth, std::string& out) {
  constexpr size_t kMaxItems = 8;
  auto seq = [&](const std::vector<ValuePtr>& items, const char* open, const char* close, size_t step) {
    out += open;
    if (depth <= 0 && !items.empty()) {
      out += "...";
    } else {
      for (size_t i = 0; i + step - 1 < items.size(); i += step) {
        if (i) out += ", ";
        if (i / step >= kMaxItems) {
          out += "...";
          break;
        }
        repr_to(*items[i], depth - 1, out);
        if (step == 2) {
          out += ": ";
          repr_to(*items[i + 1], depth - 1, out);
        }
      }
      if (step == 1 && items.size() == 1 && v.is(Value::Kind::Tuple)) out += ",";
    }
    out += close;
  };
  switch (v.kind) {
    case K::None: out += "None"; break;
    case K::Bool: out += v.b ? "True" : "False"; break;
    case K::Int: out += std::to_string(v.i); break;
    case K::Float: {
      char buf[32];
      auto r = std::to_chars(buf, buf + sizeof buf, v.f);
      out.append(buf, r.ptr);
      break;
    }
    case K::Str: quote(out, v.str, false); break;
    case K::Bytes: quote(out, v.str, true); break;
    case K::Tuple: seq(v.items, "(", ")", 1); break;
    case K::List: seq(v.items, "[", "]", 1); break;
    case K::Set: seq(v.items, "{", "}", 1); break;
    case K::Dict: seq(v.items, "{", "}", 2); break;
    case K::Global: out += v.str; break;
    case K::Object:
      out += v.str;
      if (v.args) seq(v.args->items, "(", ")", 1);
      else out += "()";
      if (v.state) {
        out += " state=";
        if (depth <= 0) out += "...";
        else repr_to(*v.state, depth - 1, out);
      }
      if (!v.items.empty()) out += " +" + std::to_string(v.items.size()) + " items";
      break;
    case K::Storage:
      out += "Storage(";
      if (v.storage) {
        quote(out, v.storage->key, false);
        out += std::string(", ") + dtype_st_name(v.storage->dtype) + ", " + std::to_string(v.storage->numel);
      }
      out += ")";
      break;
    case K::Tensor:
      out += "Tensor(";
      if (v.tensor) {
        out += dtype_st_name(v.tensor->dtype);
        out += ", [";
        for (size_t i = 0; i < v.tensor->size.size(); ++i) out += (i ? ", " : "") + std::to_string(v.tensor->size[i]);
        out += "]";
      }
      out += ")";
      break;
  }
}

}  // namespace

int64_t TensorRef::numel() const {
  int64_t n = 1;
  for (int64_t s : size) {
    if (s < 0) fail("tensor has a negative size ", s);
    if (__builtin_mul_overflow(n, s, &n)) fail("tensor element count overflows int64");
  }
  return n;
}

bool TensorRef::is_contiguous() const {
  if (size.size() != stride.size()) return false;
  for (int64_t s : size)
    if (s == 0) return true;  // empty tensors are contiguous, as in torch
  int64_t expected = 1;
  for (size_t d = size.size(); d-- > 0;) {
    if (size[d] == 1) continue;
    if (stride[d] != expected || __builtin_mul_overflow(expected, size[d], &expected)) return false;
  }
  return true;
}

const std::string& Value::as_str(const char* what) const {
  if (kind != Kind::Str) fail(what, ": expected a string, found ", repr(1));
  return str;
}

int64_t Value::as_int(const char* what) const {
  if (kind == Kind::Int) return i;
  if (kind == Kind::Bool) return b;
  if (kind == Kind::Object && str == "builtins.int") fail(what, ": integer does not fit in 64 bits");
  fail(what, ": expected an integer, found ", repr(1));
}

ValuePtr Value::get(const std::string& key) const {
  if (kind != Kind::Dict && kind != Kind::Object) return nullptr;
  for (size_t k = 0; k + 1 < items.size(); k += 2)
    if (items[k]->kind == Kind::Str && items[k]->str == key) return items[k + 1];
  return nullptr;
}

ValuePtr Value::attr(const std::string& name) const {
  if (state) {
    if (state->is(Kind::Dict)) {
      if (auto v = state->get(name)) return v;
    } else if (state->is(Kind::Tuple) && state->items.size() == 2) {  // (dict, slots)
      for (size_t k : {1u, 0u})
        if (state->items[k]->is(Kind::Dict))
          if (auto v = state->items[k]->get(name)) return v;
    }
  }
  if (kind != Kind::Object) return nullptr;
  for (const auto& kf : kKnownFields) {
    if (str != kf.cls && !ends_with(str, "." + std::string(kf.cls))) continue;
    const Value* src = kf.in_state ? state.get() : args.get();
    if (!src || !src->is(Kind::Tuple)) return nullptr;
    for (size_t k = 0; k < kf.names.size() && k < src->items.size(); ++k)
      if (!kf.names[k].empty() && kf.names[k] == name) return src->items[k];
    return nullptr;
  }
  return nullptr;
}

std::string Value::repr(int depth) const {
  std::string out;
  repr_to(*this, depth, out);
  return out;
}

ValuePtr parse_pickle(const std::string& bytes, const std::string& where, const PersistentLoad& persistent_load,
                      const PickleLimits& limits) {
  Parser p(bytes, where, persistent_load, limits);
  return p.parse();
}

}  // namespace verl
