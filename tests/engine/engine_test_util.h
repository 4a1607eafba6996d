// engine_test_util.h — helpers for the engine tests: fixtures made by tests/oracle scripts
// (random HF models, batches, transformers / verl references) generated at test time once per
// script version under a file lock and shared by the test processes; safetensors → tensors;
// shell helpers of the `verlcpp train` tests.
#pragma once
#include <ATen/ATen.h>
#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <map>
#include <string>

#include "batch/batch.h"
#include "core/error.h"
#include "io/file.h"
#include "io/safetensors.h"
#include "core/md5.h"
#include "model/torch_dtype.h"
#include "test_util.h"

namespace verl::test {

#ifdef VERLCPP_SOURCE_DIR
// CTest's per-test ENVIRONMENT may not reach gtest-discovered tests: fall back to build paths.
inline const bool kEngineEnvDefaults = [] {
  ::setenv("VERLCPP_SRC", VERLCPP_SOURCE_DIR, 0);
  ::setenv("VERLCPP_BIN", VERLCPP_BIN_PATH, 0);
  ::setenv("VERLCPP_PYTHON", VERLCPP_PYTHON_PATH, 0);
  return true;
}();
#endif

// Runs `python tests/oracle/<script> <out> <args>` once per script content; returns <out>.
inline std::string oracle_fixture(const std::string& script, const std::string& args = "") {
  namespace fs = std::filesystem;
  std::string src = source_dir() + "/tests/oracle/" + script;
  std::string key = md5_hex(read_text_file(src) + "|" + args);
  const char* env = std::getenv("VERLCPP_FIXTURE_CACHE");
  fs::path base = env && *env ? fs::path(env) : fs::temp_directory_path() / ("verlcpp-engine-fixtures-" + std::to_string(::getuid()));
  fs::create_directories(base);
  fs::path out = base / (fs::path(script).stem().string() + "-" + key.substr(0, 12));
  int fd = ::open((base / ".lock").c_str(), O_RDWR | O_CREAT, 0644);
  ::flock(fd, LOCK_EX);
  if (!fs::exists(out / ".done")) {
    fs::remove_all(out);
    fs::create_directories(out);
    std::string log;
    int rc = run(python() + " " + src + " " + out.string() + " " + args, &log);
    if (rc == 0) write_text_file((out / ".done").string(), "ok\n");
    else ADD_FAILURE() << script << " failed:\n" << log;
  }
  ::flock(fd, LOCK_UN);
  ::close(fd);
  return out.string();
}

inline std::string engine_fixtures() { return oracle_fixture("engine_fixtures.py"); }

// Every tensor of a safetensors file, copied out.
inline std::map<std::string, at::Tensor> load_st(const std::string& path) {
  SafetensorsReader r(path);
  std::map<std::string, at::Tensor> m;
  for (const auto& t : r.tensors()) m[t.name] = read_st_tensor(r, t);
  return m;
}

// A batch file of engine_fixtures.py: input_ids + cu_seqlens (+ per-sample temperature).
inline Batch load_batch(const std::string& path) {
  auto m = load_st(path);
  at::Tensor cu = m.at("cu_seqlens");
  std::vector<int64_t> off(cu.data_ptr<int64_t>(), cu.data_ptr<int64_t>() + cu.numel());
  Batch b;
  b.sequences["input_ids"] = Jagged{m.at("input_ids"), off};
  if (m.count("temperature")) b.tensors["temperature"] = m.at("temperature");
  return b;
}

inline void save_st(const std::string& path, const std::map<std::string, at::Tensor>& m) {
  std::vector<StSpec> specs;
  for (const auto& [k, t] : m) {
    specs.push_back({k, to_dtype(t.scalar_type()), std::vector<int64_t>(t.sizes().begin(), t.sizes().end())});
  }
  SafetensorsWriter w(path, specs);
  for (const auto& [k, t] : m) {
    at::Tensor c = t.contiguous();
    w.write(c.data_ptr(), c.nbytes());
  }
  w.finish();
}

// Shell helpers of the `verlcpp train` tests: a single-quoted path, tests/oracle/train_ref.py
// with the pinned Python, and the mpirun prefix for np ranks (as root, oversubscribed).
inline std::string q(const std::filesystem::path& p) { return "'" + p.string() + "'"; }
inline std::string train_oracle() { return python() + " " + source_dir() + "/tests/oracle/train_ref.py"; }
inline std::string mpirun(int np) {
  return "OMPI_MCA_btl_vader_single_copy_mechanism=none mpirun --allow-run-as-root --oversubscribe --bind-to none -np " +
         std::to_string(np) + " ";
}

inline double max_abs_diff(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}
inline double mean_abs_diff(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().mean().item<double>();
}

}  // namespace verl::test
