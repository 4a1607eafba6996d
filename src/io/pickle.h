// pickle.h — a safe reader for Python pickles (protocols 2–5) that executes nothing.
//
// The stream is interpreted into a tree of Values. A small allow-list of callables is given
// meaning (torch tensor rebuilds v2/v3, the tensor-subclass rebuild used by DTensor,
// OrderedDict, torch.Size, torch.device, dtypes, storages, _codecs.encode); every other
// GLOBAL/REDUCE/NEWOBJ/BUILD becomes an inert Object record holding its class name, its
// constructor arguments and its state, so callers can read fields of unknown classes
// (DTensorSpec, DeviceMesh, placements, DCP metadata) without running their code.
// Memo references share Values, as in Python. Sizes, memo, stack and nesting depth are
// bounded; malformed input throws Error naming `where` and the byte offset.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/dtype.h"

namespace verl {

struct Value;
using ValuePtr = std::shared_ptr<Value>;

// A storage referenced by a persistent id ('storage', <cls>, key, location, numel).
struct StorageRef {
  std::string key;       // record name under <prefix>/data/
  DType dtype = DType::U8;
  std::string location;  // "cpu", "cuda:0", ... (ignored)
  int64_t numel = 0;     // element count of the storage
};

// A plain tensor: a strided view of a storage.
struct TensorRef {
  StorageRef storage;
  DType dtype = DType::U8;  // = storage dtype (v3 may state it separately)
  int64_t storage_offset = 0;  // in elements
  std::vector<int64_t> size, stride;
  int64_t numel() const;
  bool is_contiguous() const;
};

struct Value {
  enum class Kind {
    None, Bool, Int, Float, Str, Bytes, Tuple, List, Dict, Set,
    Global,   // a class/function reference: module + "." + name in `str`
    Object,   // an inert instance: cls (Global), args, state, plus list/dict items
    Storage,  // persistent-id storage
    Tensor,   // torch tensor rebuild
  };
  Kind kind = Kind::None;
  bool b = false;
  int64_t i = 0;
  double f = 0;
  std::string str;                // Str, Bytes, Global ("module.name"), Object class name
  std::vector<ValuePtr> items;    // Tuple, List, Set; Dict as k0,v0,k1,v1,...
  ValuePtr args;                  // Object: constructor args (Tuple) or nullptr
  ValuePtr state;                 // Object: BUILD state or nullptr
  std::shared_ptr<StorageRef> storage;
  std::shared_ptr<TensorRef> tensor;

  // Convenience accessors; they throw Error naming `what` on a kind mismatch.
  bool is(Kind k) const { return kind == k; }
  const std::string& as_str(const char* what = "value") const;
  int64_t as_int(const char* what = "value") const;
  // Dict lookup by string key (nullptr if absent or not a dict).
  ValuePtr get(const std::string& key) const;
  size_t dict_size() const { return items.size() / 2; }
  // Object attribute: looks in the BUILD state (dict, or the 2nd element of a
  // (dict, slots) tuple); nullptr if absent.
  ValuePtr attr(const std::string& name) const;
  std::string repr(int depth = 2) const;  // short text for error messages
};

struct PickleLimits {
  size_t max_depth = 256;        // container nesting
  size_t max_items = 50'000'000; // total items created
  size_t max_string = 1u << 30;  // single string / bytes
  size_t max_memo = 10'000'000;
};

// Called for each persistent id; must return the Value that stands for it.
using PersistentLoad = std::function<ValuePtr(const ValuePtr& pid)>;

// Parses a pickle. Without a persistent_load, torch storage ids ('storage', cls, key,
// location, numel) are turned into Storage values by the default rule.
ValuePtr parse_pickle(const std::string& bytes, const std::string& where,
                      const PersistentLoad& persistent_load = nullptr,
                      const PickleLimits& limits = {});

}  // namespace verl
