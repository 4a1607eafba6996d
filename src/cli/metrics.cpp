// metrics.cpp — the metrics logger of `verlcpp train` (see metrics.h).
#ifdef VERLCPP_WITH_TORCH
#include "cli/metrics.h"

#include <sys/resource.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <vector>

#include "dist/comm.h"
#include "core/error.h"

namespace verl {

namespace {

double now_s() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

std::string fmt_duration(double s) {
  char b[32];
  if (s < 60) std::snprintf(b, sizeof b, "%.0fs", s);
  else std::snprintf(b, sizeof b, "%dm%02ds", int(s) / 60, int(s) % 60);
  return b;
}

}  // namespace

MetricsLogger::MetricsLogger(Comm& world, const std::string& path, const std::string& prefix, int64_t total_steps)
    : world_(world), path_(path), prefix_(prefix), total_(total_steps), lead_(world.rank() == 0),
      tty_(lead_ && ::isatty(2)), started_(now_s()) {
  if (!lead_) return;
  namespace fs = std::filesystem;
  std::error_code ec;
  if (fs::path(path).has_parent_path()) fs::create_directories(fs::path(path).parent_path(), ec);
  file_ = std::make_unique<std::ofstream>(path, std::ios::app);
  if (!*file_) fail(path, ": cannot open the metrics file for writing");
}

MetricsLogger::~MetricsLogger() = default;

void MetricsLogger::write(const std::string& json_line) {
  *file_ << json_line << "\n";
  file_->flush();
  if (!*file_) fail(path_, ": cannot write metrics (disk full?)");
}

void MetricsLogger::clear_bar() {
  if (tty_) std::fprintf(stderr, "\r\033[K");
}

void MetricsLogger::log_step(int64_t step, const FsdpEngine::TrainStepResult& r, double seconds) {
  // Over ranks: loss and the MoE load-balancing loss are sums of micro-batch parts (÷ dp), the
  // other metrics are averaged.
  const StepMetrics& sm = r.metrics;
  std::vector<std::string> names;
  std::vector<double> vals;
  for (const auto& [k, v] : sm.metrics) {
    names.push_back(k);
    vals.push_back(k == "loss" || k == "moe_aux_loss" ? v : v / std::max(1, sm.num_micro_batches));
  }
  vals.push_back(static_cast<double>(sm.tokens));
  world_.all_reduce(vals.data(), vals.size(), DType::F64, ReduceOp::Sum);
  ++ran_;
  if (!lead_) return;
  const int W = world_.size();
  nlohmann::json j;
  j["step"] = step;
  for (size_t i = 0; i < names.size(); ++i) j[names[i] == "loss" ? "loss" : prefix_ + "/" + names[i]] = vals[i] / W;
  j["grad_norm"] = r.opt.grad_norm;
  j["lr"] = r.lr;
  j["tokens"] = vals.back();
  j["tokens_per_s"] = vals.back() / seconds;
  j["step_time_s"] = seconds;
  write(j.dump());
  clear_bar();
  const std::string aux = j.contains(prefix_ + "/moe_aux_loss")
                              ? " moe_aux_loss " + std::to_string(j[prefix_ + "/moe_aux_loss"].get<double>())
                              : std::string();
  std::printf("step %lld/%lld loss %.6f%s grad_norm %.4f lr %.3g tokens/s %.0f\n", (long long)step, (long long)total_,
              j.value("loss", 0.0), aux.c_str(), r.opt.grad_norm, r.lr, j["tokens_per_s"].get<double>());
  std::fflush(stdout);
  if (tty_) {
    const double eta = (now_s() - started_) / static_cast<double>(ran_) * static_cast<double>(total_ - step);
    const int w = 30, done = static_cast<int>(w * step / total_);
    std::fprintf(stderr, "training [%s%s] %lld/%lld ETA %s", std::string(done, '#').c_str(), std::string(w - done, ' ').c_str(),
                 (long long)step, (long long)total_, fmt_duration(eta).c_str());
    std::fflush(stderr);
  }
}

void MetricsLogger::message(const std::string& line) {
  if (!lead_) return;
  clear_bar();
  std::printf("%s\n", line.c_str());
  std::fflush(stdout);
}

void MetricsLogger::finish() {
  if (tty_) std::fprintf(stderr, "\n");
  struct rusage ru;
  ::getrusage(RUSAGE_SELF, &ru);
  double rss[1] = {static_cast<double>(ru.ru_maxrss) / 1024.0};  // MiB
  world_.all_reduce(rss, 1, DType::F64, ReduceOp::Max);
  if (!lead_) return;
  std::printf("peak RSS per rank (max over ranks): %.0f MiB\n", rss[0]);
  std::fflush(stdout);
  write(nlohmann::json({{"summary", true}, {"peak_rss_mib_max_rank", rss[0]}, {"ranks", world_.size()}}).dump());
}

}  // namespace verl
#endif
