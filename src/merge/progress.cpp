// progress.cpp — see progress.h.
#include "merge/progress.h"

#include <unistd.h>

#include <cstdio>

namespace verl {

std::string human_bytes(double b) {
  const char* u[] = {"B", "KB", "MB", "GB", "TB"};
  int i = 0;
  while (b >= 1000 && i < 4) { b /= 1000; ++i; }
  char buf[32];
  std::snprintf(buf, sizeof buf, i ? "%.2f %s" : "%.0f %s", b, u[i]);
  return buf;
}

Progress::Progress(std::string label, uint64_t total_items, uint64_t total_bytes, bool enabled)
    : label_(std::move(label)), total_items_(total_items), total_bytes_(total_bytes),
      enabled_(enabled && ::isatty(2)), start_(std::chrono::steady_clock::now()), last_(start_) {}

double Progress::elapsed() const {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
}

void Progress::add(uint64_t items, uint64_t bytes) {
  items_ += items;
  bytes_ += bytes;
  draw(false);
}

void Progress::draw(bool force) {
  if (!enabled_) return;
  auto now = std::chrono::steady_clock::now();
  if (!force && now - last_ < std::chrono::milliseconds(100)) return;
  last_ = now;
  const double t = elapsed();
  const double frac = total_bytes_ ? double(bytes_) / double(total_bytes_) : 1.0;
  const int width = 28, fill = static_cast<int>(frac * width);
  std::string bar(fill, '#');
  bar.resize(width, ' ');
  const double rate = t > 0 ? bytes_ / t : 0;
  const double eta = rate > 0 ? (total_bytes_ - bytes_) / rate : 0;
  std::fprintf(stderr, "\r%s [%s] %3.0f%% %llu/%llu tensors %s/%s %s/s ETA %.0fs   ", label_.c_str(), bar.c_str(),
               frac * 100, (unsigned long long)items_, (unsigned long long)total_items_, human_bytes(bytes_).c_str(),
               human_bytes(total_bytes_).c_str(), human_bytes(rate).c_str(), eta);
  drawn_ = true;
}

void Progress::finish() {
  if (!enabled_) return;
  draw(true);
  std::fprintf(stderr, "\n");
}

}  // namespace verl
