// fuzz_zip.cpp — libFuzzer target for the zip reader. The input becomes the contents of an
// in-memory file (memfd), opened whole and again at a small base offset; every member found
// is read. Anything but a verl::Error is a bug, and every member must lie inside the file.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <memory>
#include <string>

#include "core/error.h"
#include "io/zip.h"

namespace {

void exercise(const std::shared_ptr<const verl::File>& f, uint64_t base) {
  try {
    verl::ZipReader z(f, base);
    for (const auto& e : z.entries()) {
      if (e.data_offset < base || e.data_offset > f->size() || e.size > f->size() - e.data_offset) __builtin_trap();
      if (z.find(e.name) != &e) __builtin_trap();
      char buf[64];
      const size_t k = e.size < sizeof buf ? static_cast<size_t>(e.size) : sizeof buf;
      z.read_at(e, e.size - k, buf, k);
      if (e.size <= (1u << 16)) z.read(e);
    }
    z.torch_prefix();
  } catch (const verl::Error&) {
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* d, size_t n) {
  static const int fd = memfd_create("fuzz_zip", 0);
  if (fd < 0 || ftruncate(fd, 0) != 0) __builtin_trap();
  for (size_t off = 0; off < n;) {
    ssize_t w = pwrite(fd, d + off, n - off, static_cast<off_t>(off));
    if (w <= 0) __builtin_trap();
    off += static_cast<size_t>(w);
  }
  auto f = std::make_shared<const verl::File>("/proc/self/fd/" + std::to_string(fd));
  exercise(f, 0);
  if (n > 0) exercise(f, d[0] % 8);
  return 0;
}
