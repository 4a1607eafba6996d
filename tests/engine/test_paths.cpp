// test_paths.cpp — local-path resolution: pass-through, hdfs:// through a stand-in `hdfs`
// command (copy once under a lock, manifest re-checked, model still builds after the source
// disappears), the offline HF cache, md5 naming as Python's hashlib, clear errors.
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <filesystem>
#include <thread>

#include "engine/forward_step.h"
#include "engine_test_util.h"
#include "hf/paths.h"

namespace verl::test {
namespace {
namespace fs = std::filesystem;

// A stand-in `hdfs` on PATH: `hdfs dfs -get hdfs://ns/REL DST` copies $FAKE_HDFS_ROOT/REL to DST
// and logs each call.
struct FakeHdfs {
  TempDir tmp;
  std::string old_path, root, log;
  FakeHdfs() {
    fs::create_directories(tmp / "bin");
    root = tmp / "hdfs_root";
    log = tmp / "calls.log";
    fs::create_directories(root);
    std::string script = tmp / "bin/hdfs";
    write_text_file(script,
                    "#!/bin/sh\n# stand-in hdfs for tests\n[ \"$1\" = dfs ] && [ \"$2\" = -get ] || exit 2\n"
                    "echo \"$3\" >> \"" + log + "\"\nrel=${3#hdfs://ns/}\nsleep 0.2\n"
                    "cp -r \"" + root + "/$rel\" \"$4\"\n");
    ::chmod(script.c_str(), 0755);
    old_path = std::getenv("PATH");
    setenv("PATH", ((tmp / "bin") + ":" + old_path).c_str(), 1);
  }
  ~FakeHdfs() { setenv("PATH", old_path.c_str(), 1); }
  int calls() const {
    if (!fs::exists(log)) return 0;
    std::string s = read_text_file(log);
    return int(std::count(s.begin(), s.end(), '\n'));
  }
};

TEST(Paths, Md5MatchesPythonHashlib) {
  for (std::string s : {std::string(), std::string("hdfs://ns/models/qwen2"), std::string(200, 'x')}) {
    std::string got;
    run(python() + " -c \"import hashlib,sys; print(hashlib.md5(sys.argv[1].encode()).hexdigest(), end='')\" '" + s + "'", &got);
    EXPECT_EQ(md5_hex(s), got) << s;
  }
}

TEST(Paths, LocalAndFilePathsPassThrough) {
  TempDir tmp;
  EXPECT_EQ(resolve_local_path(tmp.path.string()), tmp.path.string());
  EXPECT_EQ(resolve_local_path("file://" + tmp.path.string()), tmp.path.string());
  ModelPaths p = resolve_model_paths(tmp.path.string());
  EXPECT_EQ(p.local_hf_config_path, tmp.path.string());
  EXPECT_EQ(p.local_tokenizer_path, tmp.path.string());
  EXPECT_THROW(resolve_local_path("file:///no/such/folder"), Error);
  EXPECT_THROW(resolve_local_path("s3://bucket/model"), Error);
}

TEST(Paths, HdfsCopyOnceThenBuildAfterSourceDisappears) {
  const std::string fx = engine_fixtures();
  FakeHdfs hdfs;
  const std::string cache_dir = hdfs.tmp / "cache";  // (one TempDir per test: they share a name)
  fs::create_directories(hdfs.root + "/models");
  fs::copy(fx + "/qwen2", hdfs.root + "/models/qwen2", fs::copy_options::recursive);
  const std::string src = "hdfs://ns/models/qwen2";
  // Concurrent resolvers copy once (the lock), all get the same path.
  std::vector<std::string> got(4);
  std::vector<std::thread> ts;
  for (int i = 0; i < 4; ++i) ts.emplace_back([&, i] { got[i] = resolve_local_path(src, cache_dir); });
  for (auto& t : ts) t.join();
  EXPECT_EQ(hdfs.calls(), 1);
  const std::string want = cache_dir + "/" + md5_hex(src) + "/qwen2";
  for (const auto& g : got) EXPECT_EQ(g, want);
  // The source disappears: the cached copy is reused and the model builds from local paths.
  fs::remove_all(hdfs.root + "/models/qwen2");
  ModelPaths p = resolve_model_paths(src, "", "", cache_dir);
  EXPECT_EQ(p.local_path, want);
  EXPECT_EQ(p.local_hf_config_path, want);
  EXPECT_EQ(hdfs.calls(), 1);
  auto m = Transformer::load(p.local_hf_config_path, p.local_path, at::kFloat);
  auto ref = Transformer::load(fx + "/qwen2", fx + "/qwen2", at::kFloat);
  Batch b;
  b.sequences["input_ids"] = Jagged::from_lengths(at::arange(10, at::kLong), {4, 6});
  EXPECT_TRUE(at::equal(infer_batch(*m, b, {}).log_probs.values, infer_batch(*ref, b, {}).log_probs.values));
}

TEST(Paths, ManifestMismatchRecopies) {
  const std::string fx = engine_fixtures();
  FakeHdfs hdfs;
  const std::string cache_dir = hdfs.tmp / "cache";  // (one TempDir per test: they share a name)
  fs::create_directories(hdfs.root + "/m");
  fs::copy(fx + "/qwen3", hdfs.root + "/m/qwen3", fs::copy_options::recursive);
  std::string local = resolve_local_path("hdfs://ns/m/qwen3", cache_dir);
  EXPECT_EQ(hdfs.calls(), 1);
  EXPECT_EQ(resolve_local_path("hdfs://ns/m/qwen3", cache_dir), local);
  EXPECT_EQ(hdfs.calls(), 1);
  // A damaged copy (a truncated file) no longer matches its manifest: copied again.
  auto size = fs::file_size(local + "/model.safetensors");
  fs::resize_file(local + "/model.safetensors", size / 2);
  EXPECT_EQ(resolve_local_path("hdfs://ns/m/qwen3", cache_dir), local);
  EXPECT_EQ(hdfs.calls(), 2);
  EXPECT_EQ(fs::file_size(local + "/model.safetensors"), size);
}

TEST(Paths, MissingHdfsCommandIsAClearError) {
  TempDir cache;
  std::string old = std::getenv("PATH");
  setenv("PATH", cache.path.c_str(), 1);
  const std::string msg = error_of([&] { resolve_local_path("hdfs://ns/x/model", cache.path.string()); });
  setenv("PATH", old.c_str(), 1);
  EXPECT_NE(msg.find("needs the `hdfs` command"), std::string::npos) << msg;
}

TEST(Paths, HfModelIdFromOfflineCache) {
  TempDir home;
  std::string snap = home / "hub/models--org--tiny-model/snapshots/abc123";
  fs::create_directories(snap);
  fs::create_directories(home / "hub/models--org--tiny-model/refs");
  write_text_file(home / "hub/models--org--tiny-model/refs/main", "abc123");
  write_text_file(snap + "/config.json", "{}");
  const char* old = std::getenv("HF_HOME");
  std::string saved = old ? old : "";
  setenv("HF_HOME", home.path.c_str(), 1);
  EXPECT_EQ(resolve_local_path("org/tiny-model"), snap);
  const std::string msg = error_of([&] { resolve_local_path("org/absent-model"); });
  EXPECT_NE(msg.find("models--org--absent-model"), std::string::npos) << msg;
  if (old) setenv("HF_HOME", saved.c_str(), 1);
  else unsetenv("HF_HOME");
}

}  // namespace
}  // namespace verl::test
