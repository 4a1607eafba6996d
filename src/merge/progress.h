// progress.h — a progress line on stderr (tensors, bytes, rate, ETA), drawn only when
// stderr is a terminal, at most ten times a second.
#pragma once
#include <chrono>
#include <cstdint>
#include <string>

namespace verl {

class Progress {
 public:
  Progress(std::string label, uint64_t total_items, uint64_t total_bytes, bool enabled);
  void add(uint64_t items, uint64_t bytes);
  void finish();
  double elapsed() const;

 private:
  std::string label_;
  uint64_t total_items_, total_bytes_, items_ = 0, bytes_ = 0;
  bool enabled_, drawn_ = false;
  std::chrono::steady_clock::time_point start_, last_;
  void draw(bool force);
};

std::string human_bytes(double b);

}  // namespace verl
