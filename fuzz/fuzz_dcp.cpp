// fuzz_dcp.cpp — libFuzzer target for the PyTorch DCP reader (io/dcp.h): `.metadata` pickle
// + one `.distcp` file. Input layout: 4-byte little-endian length L, L bytes of `.metadata`,
// the rest is `__0_0.distcp` (seeds: fuzz/make_dcp_seeds.py, from real torch dcp.save
// checkpoints). Both files are written into a private folder under /dev/shm, the folder is
// opened, and every tensor of at most 64k elements is read whole, every byte item read.
// Anything but a verl::Error is a bug (ASan/UBSan report memory errors).
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "io/dcp.h"
#include "core/error.h"

namespace {

const std::string& folder() {
  static const std::string d = [] {
    std::string p = (std::filesystem::exists("/dev/shm") ? "/dev/shm" : "/tmp") + std::string("/fuzz_dcp_") +
                    std::to_string(::getpid());
    std::filesystem::create_directories(p);
    return p;
  }();
  return d;
}

void put(const std::string& path, const uint8_t* d, size_t n) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) __builtin_trap();
  if (n && std::fwrite(d, 1, n, f) != n) __builtin_trap();
  std::fclose(f);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* d, size_t n) {
  if (n < 4) return 0;
  size_t len = d[0] | (d[1] << 8) | (d[2] << 16) | (static_cast<size_t>(d[3]) << 24);
  if (len > n - 4) len = n - 4;
  put(folder() + "/.metadata", d + 4, len);
  put(folder() + "/__0_0.distcp", d + 4 + len, n - 4 - len);
  try {
    verl::DcpCheckpoint ck(folder());
    for (const auto& t : ck.tensors()) {
      if (t.numel() > (1 << 16)) continue;
      std::vector<uint8_t> buf(static_cast<size_t>(t.numel()) * verl::dtype_size(t.dtype) + 1);
      ck.read_tensor(t, buf.data());
    }
    for (const auto& k : ck.byte_keys()) ck.read_bytes(k);
  } catch (const verl::Error&) {
  }
  return 0;
}
