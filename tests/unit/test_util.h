// test_util.h — helpers shared by the tests: a scratch folder per test, running Python (the
// pinned venv) to build fixtures / references at test time, whole-file reads and writes, and
// the message of the verl::Error a call throws.
#pragma once
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include "core/error.h"

namespace verl::test {

inline std::string python() {
  const char* p = std::getenv("VERLCPP_PYTHON");
  return (p && *p) ? p : "/opt/verlcpp/venv/bin/python";
}
inline std::string source_dir() {
  const char* p = std::getenv("VERLCPP_SRC");
  return (p && *p) ? p : ".";
}
inline std::string verlcpp_bin() {
  const char* p = std::getenv("VERLCPP_BIN");
  return (p && *p) ? p : "build/verlcpp";
}

// A fresh folder removed at the end of the test.
struct TempDir {
  std::filesystem::path path;
  TempDir() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    std::string name = info ? std::string(info->test_suite_name()) + "_" + info->name() : "t";
    path = std::filesystem::temp_directory_path() /
           ("verlcpp_" + name + "_" + std::to_string(::getpid()));
    std::filesystem::remove_all(path);
    std::filesystem::create_directories(path);
  }
  ~TempDir() {
    if (!std::getenv("VERLCPP_KEEP_TMP")) std::filesystem::remove_all(path);
  }
  std::string operator/(const std::string& s) const { return (path / s).string(); }
};

// A path quoted for the shell ('...').
inline std::string quoted(const std::filesystem::path& p) { return "'" + p.string() + "'"; }
// tests/oracle/<script>, the Python that makes fixtures and references.
inline std::string oracle_script(const std::string& script) { return source_dir() + "/tests/oracle/" + script; }

// A suite's fixture folder, made once per test process: <tmp>/<prefix><pid>, fresh.
inline std::filesystem::path fresh_suite_dir(const std::string& prefix) {
  const auto d = std::filesystem::temp_directory_path() / (prefix + std::to_string(::getpid()));
  std::filesystem::remove_all(d);
  std::filesystem::create_directories(d);
  return d;
}
// Removes *dir when the test program ends (VERLCPP_KEEP_TMP keeps it); register it once with
// ::testing::AddGlobalTestEnvironment(new RemoveAtExit(&dir)).
class RemoveAtExit : public ::testing::Environment {
 public:
  explicit RemoveAtExit(const std::filesystem::path* dir) : dir_(dir) {}
  void TearDown() override {
    if (!dir_->empty() && !std::getenv("VERLCPP_KEEP_TMP")) std::filesystem::remove_all(*dir_);
  }

 private:
  const std::filesystem::path* dir_;
};

// Runs a shell command, returns its exit status; output captured into *out if given.
inline int run(const std::string& cmd, std::string* out = nullptr) {
  std::string full = cmd + " 2>&1";
  FILE* f = ::popen(full.c_str(), "r");
  if (!f) return -1;
  std::string buf;
  char tmp[4096];
  size_t n;
  while ((n = fread(tmp, 1, sizeof tmp, f)) > 0) buf.append(tmp, n);
  int rc = ::pclose(f);
  if (out) *out = buf;
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

// Runs a Python snippet with the pinned interpreter; fails the test on a non-zero exit.
inline std::string run_python(const std::string& code, const std::string& dir) {
  std::string script = dir + "/snippet_" + std::to_string(std::rand()) + ".py";
  {
    std::ofstream o(script);
    o << code;
  }
  std::string out;
  int rc = run(python() + " " + script, &out);
  EXPECT_EQ(rc, 0) << "python failed:\n" << out;
  return out;
}

// The bytes of a file (an existing one: a missing file fails the test).
inline std::string slurp(const std::filesystem::path& p) {
  std::ifstream f(p, std::ios::binary);
  EXPECT_TRUE(f.good()) << p;
  return {std::istreambuf_iterator<char>(f), {}};
}
// Writes `s` as the whole file.
inline void spit(const std::filesystem::path& p, const std::string& s) { std::ofstream(p, std::ios::binary) << s; }

// The message of the verl::Error that `f` throws; `none` when it throws nothing.
template <class F>
std::string error_of(F&& f, const std::string& none = "") {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return none;
}

}  // namespace verl::test
