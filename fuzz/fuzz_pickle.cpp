// fuzz_pickle.cpp — libFuzzer target for the safe pickle reader: any byte string must either
// parse into a bounded, acyclic Value tree or throw verl::Error; never crash, leak or hang.
// The result is walked with the accessors callers use (repr, get, attr, as_int, numel).
#include <cstddef>
#include <cstdint>
#include <string>
#include <unordered_set>

#include "core/error.h"
#include "io/pickle.h"

namespace {

// Visits each shared Value once (a DAG can have exponentially many paths).
void walk(const verl::Value& v, int depth, std::unordered_set<const verl::Value*>& seen) {
  if (!seen.insert(&v).second) return;
  (void)v.repr(2);
  (void)v.attr("dim");
  (void)v.attr("shape");
  (void)v.get("_local_tensor");
  try {
    (void)v.as_int("fuzz");
  } catch (const verl::Error&) {
  }
  if (v.tensor) {
    try {
      (void)v.tensor->numel();
    } catch (const verl::Error&) {
    }
    (void)v.tensor->is_contiguous();
  }
  if (depth > 300) __builtin_trap();  // the parser bounds nesting at max_depth (256)
  for (const auto& c : v.items) walk(*c, depth + 1, seen);
  if (v.args) walk(*v.args, depth + 1, seen);
  if (v.state) walk(*v.state, depth + 1, seen);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  verl::PickleLimits lim;
  lim.max_items = 200'000;  // keep amplification (BUILD merges, copies) small per input
  lim.max_string = 1 << 20;
  lim.max_memo = 100'000;
  try {
    auto v = verl::parse_pickle(std::string(reinterpret_cast<const char*>(data), size), "fuzz", nullptr, lim);
    std::unordered_set<const verl::Value*> seen;
    walk(*v, 0, seen);
  } catch (const verl::Error&) {
  }
  return 0;
}
