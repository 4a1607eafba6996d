// fuzz_safetensors.cpp — libFuzzer target for the safetensors header validator. The first
// 8 bytes of the input are the data-area size (little-endian), the rest is the header text.
// Anything but a verl::Error is a bug; an accepted header must satisfy the documented
// invariants (sorted names, exact byte lengths, offsets tiling the data area).
#include <cstdint>
#include <string>

#include "core/error.h"
#include "io/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* d, size_t n) {
  if (n < 8) return 0;
  uint64_t data_size = 0;
  for (int i = 7; i >= 0; --i) data_size = data_size << 8 | d[i];
  std::vector<verl::StTensor> ts;
  std::map<std::string, std::string> md;
  try {
    verl::parse_safetensors_header(std::string(reinterpret_cast<const char*>(d) + 8, n - 8), data_size, "fuzz",
                                   &ts, &md);
  } catch (const verl::Error&) {
    return 0;
  }
  uint64_t covered = 0;
  for (size_t i = 0; i < ts.size(); ++i) {
    const auto& t = ts[i];
    if (i && !(ts[i - 1].name < t.name)) __builtin_trap();
    if (t.begin > t.end || t.end > data_size) __builtin_trap();
    if (static_cast<uint64_t>(t.numel()) * verl::dtype_size(t.dtype) != t.nbytes()) __builtin_trap();
    covered += t.nbytes();
  }
  if (covered != data_size) __builtin_trap();
  return 0;
}
