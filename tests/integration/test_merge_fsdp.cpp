// test_merge_fsdp.cpp — end to end: real FSDP2 checkpoints written by torch.distributed
// (tests/oracle/make_fsdp_ckpt.py) are merged by `verlcpp merge` and checked against the
// unsharded reference by transformers / peft (tests/oracle/check_merged.py): bit-exact
// tensors after the same dtype cast, same logits. Bad inputs must give one clear line,
// a non-zero exit and no output folder.
#include <gtest/gtest.h>

#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "test_util.h"

namespace fs = std::filesystem;
using verl::test::run;

namespace {

fs::path g_root;  // fixtures for the whole suite
// make_fsdp_ckpt.py specs (CASE:W[:DTYPE]); each lands in <root>/<CASE>_w<W>[_bf16].
const char* kCases =
    "qwen2:1,qwen2:2,qwen2:3,qwen2:4,qwen2:2:bf16,llama_tied:2,value:4,lora:2,hsdp:4,buffer:2,tiny_rows:4,"
    "fsdp1:3,fsdp1_sharded_tensor:3,shard_dim:2,qwen2_vl:2,qwen2_5_vl:3,qwen2_5_vl_tied:2";

const auto* const g_cleanup = ::testing::AddGlobalTestEnvironment(new verl::test::RemoveAtExit(&g_root));

using verl::test::oracle_script;
using verl::test::python;
using verl::test::verlcpp_bin;
std::string q(const fs::path& p) { return verl::test::quoted(p); }

class MergeFsdp : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    // Both suites (MergeFsdp, BadInput) share one set of fixtures, made once per process
    // and removed by FixtureCleanup at exit.
    if (!g_root.empty()) return;
    g_root = verl::test::fresh_suite_dir("verlcpp_merge_it_");
    // One Python process makes every case (torch is imported once).
    std::string out;
    int rc = run(python() + " " + oracle_script("make_fsdp_ckpt.py") + " --out " + q(g_root) + " --case " + kCases, &out);
    ASSERT_EQ(rc, 0) << "fixtures failed:\n" << out;
  }

  static fs::path ckpt(const std::string& c) { return g_root / c / "ckpt"; }
  static fs::path ref(const std::string& c) { return g_root / c / "ref"; }

  // Runs verlcpp merge; returns rc and output.
  int merge(const std::string& c, const fs::path& out, const std::string& extra, std::string* log,
            const fs::path& dir = {}) {
    return run(verlcpp_bin() + " merge --backend fsdp --local_dir " + q(dir.empty() ? ckpt(c) : dir) + " --target_dir " + q(out) +
                   " --quiet " + extra,
               log);
  }
  void check(const fs::path& merged, const fs::path& reference, const std::string& extra) {
    std::string out;
    int rc = run(python() + " " + oracle_script("check_merged.py") + " --merged " + q(merged) + " --ref " + q(reference) + " " + extra,
                 &out);
    EXPECT_EQ(rc, 0) << out;
  }
};

TEST_F(MergeFsdp, EveryWorldSizeBitExactFp32WithLogits) {
  for (const char* c : {"qwen2_w1", "qwen2_w2", "qwen2_w3", "qwen2_w4"}) {
    SCOPED_TRACE(c);
    const fs::path out = g_root / "out" / c;
    std::string log;
    ASSERT_EQ(merge(c, out, "--dtype fp32", &log), 0) << log;
    check(out, ref(c), "--dtype fp32 --logits");
  }
}

TEST_F(MergeFsdp, Bf16CastIsTorchIdenticalAndShardedOutput) {
  const fs::path out = g_root / "out" / "qwen2_w3_bf16";
  std::string log;
  ASSERT_EQ(merge("qwen2_w3", out, "--dtype bf16 --max-shard-size 20KB", &log), 0) << log;
  EXPECT_TRUE(fs::exists(out / "model.safetensors.index.json"));
  EXPECT_TRUE(fs::exists(out / "model-00001-of-00002.safetensors") || fs::exists(out / "model-00001-of-00003.safetensors") ||
              !fs::exists(out / "model.safetensors"));
  check(out, ref("qwen2_w3"), "--dtype bf16 --logits");
}

TEST_F(MergeFsdp, Bf16CheckpointAutoDtype) {
  const fs::path out = g_root / "out" / "qwen2_bf16_auto";
  std::string log;
  ASSERT_EQ(merge("qwen2_w2_bf16", out, "", &log), 0) << log;
  check(out, ref("qwen2_w2_bf16"), "--dtype bf16 --logits");
}

TEST_F(MergeFsdp, TiedEmbeddingsHaveNoLmHead) {
  const fs::path out = g_root / "out" / "tied";
  std::string log;
  ASSERT_EQ(merge("llama_tied_w2", out, "--dtype fp32", &log), 0) << log;
  check(out, ref("llama_tied_w2"), "--dtype fp32 --logits");
}

TEST_F(MergeFsdp, ValueModelWithEmptyShards) {
  for (const char* c : {"value_w4", "tiny_rows_w4"}) {
    SCOPED_TRACE(c);
    const fs::path out = g_root / "out" / c;
    std::string log;
    ASSERT_EQ(merge(c, out, "--dtype fp32 --is-value-model", &log), 0) << log;
    check(out, ref(c), "--dtype fp32 --logits");
  }
}

TEST_F(MergeFsdp, Fsdp1ShardedStateDict) {
  // FSDP1 SHARDED_STATE_DICT: DTensors with a device mesh, ShardedTensors without one.
  for (const char* c : {"fsdp1_w3", "fsdp1_sharded_tensor_w3"}) {
    SCOPED_TRACE(c);
    const fs::path out = g_root / "out" / c;
    std::string log;
    ASSERT_EQ(merge(c, out, "--dtype fp32", &log), 0) << log;
    check(out, ref(c), "--dtype fp32 --logits");
  }
}

TEST_F(MergeFsdp, ShardOnDimOne) {
  // verl's get_shard_placement_fn: Shard(1) where dim 0 does not divide the world size.
  const fs::path out = g_root / "out" / "shard_dim";
  std::string log;
  ASSERT_EQ(merge("shard_dim_w2", out, "--dtype fp32", &log), 0) << log;
  check(out, ref("shard_dim_w2"), "--dtype fp32 --logits");
}

TEST_F(MergeFsdp, HsdpReadsOneReplica) {
  const fs::path out = g_root / "out" / "hsdp";
  std::string log;
  ASSERT_EQ(merge("hsdp_w4", out, "--dtype fp32", &log), 0) << log;
  check(out, ref("hsdp_w4"), "--dtype fp32 --logits");
}

TEST_F(MergeFsdp, PersistentBufferKeptOnce) {
  const fs::path out = g_root / "out" / "buffer";
  std::string log;
  ASSERT_EQ(merge("buffer_w2", out, "--dtype fp32", &log), 0) << log;
  check(out, ref("buffer_w2"), "--dtype fp32 --state " + q(g_root / "buffer_w2" / "ref_state.safetensors"));
}

TEST_F(MergeFsdp, LoraAdapterAndFused) {
  const fs::path out = g_root / "out" / "lora";
  std::string log;
  ASSERT_EQ(merge("lora_w2", out, "--dtype fp32", &log), 0) << log;
  check(out, ref("lora_w2"), "--dtype fp32 --adapter " + q(g_root / "lora_w2" / "ref_adapter"));
  const fs::path fused = g_root / "out" / "lora_fused";
  ASSERT_EQ(merge("lora_w2", fused, "--dtype fp32 --fuse-lora", &log), 0) << log;
  check(fused, g_root / "lora_w2" / "ref_fused", "--dtype fp32 --logits --tolerance 1e-5");
}

TEST_F(MergeFsdp, LoraWithoutAlphaIsAnError) {
  const fs::path dir = g_root / "lora_noalpha";
  fs::copy(ckpt("lora_w2"), dir, fs::copy_options::recursive);
  fs::remove(dir / "lora_train_meta.json");
  std::string log;
  EXPECT_NE(merge("", g_root / "out" / "lora_noalpha", "", &log, dir), 0);
  EXPECT_NE(log.find("lora_alpha"), std::string::npos) << log;
  EXPECT_FALSE(fs::exists(g_root / "out" / "lora_noalpha"));
  EXPECT_EQ(merge("", g_root / "out" / "lora_alpha16", "--lora-alpha 16 --dtype fp32", &log, dir), 0) << log;
  check(g_root / "out" / "lora_alpha16", ref("lora_w2"), "--dtype fp32 --adapter " + q(g_root / "lora_w2" / "ref_adapter"));
}

TEST_F(MergeFsdp, TestModeReportsDifferences) {
  std::string log;
  int rc = run(verlcpp_bin() + " merge test --backend fsdp --local_dir " + q(ckpt("qwen2_w2")) + " --test_hf_dir " +
                   q(ref("qwen2_w2")) + " --atol 0 --rtol 0",
               &log);
  EXPECT_EQ(rc, 0) << log;
  // Against another model: every tensor differs, so it must fail and say so.
  rc = run(verlcpp_bin() + " merge --test --backend fsdp --local_dir " + q(ckpt("qwen2_w2")) + " --test_hf_dir " +
               q(ref("llama_tied_w2")),
           &log);
  EXPECT_EQ(rc, 1) << log;
  EXPECT_NE(log.find("FAILED"), std::string::npos) << log;
}

TEST_F(MergeFsdp, TargetIsRefusedOrReplacedAtomically) {
  const fs::path out = g_root / "out" / "exists";
  fs::create_directories(out);
  std::ofstream(out / "keep.txt") << "x";
  std::string log;
  EXPECT_NE(merge("qwen2_w2", out, "", &log), 0);
  EXPECT_NE(log.find("--overwrite"), std::string::npos) << log;
  EXPECT_TRUE(fs::exists(out / "keep.txt"));
  ASSERT_EQ(merge("qwen2_w2", out, "--overwrite --dtype fp32", &log), 0) << log;
  EXPECT_FALSE(fs::exists(out / "keep.txt"));
  check(out, ref("qwen2_w2"), "--dtype fp32");
  for (const auto& e : fs::directory_iterator(out.parent_path()))
    EXPECT_EQ(e.path().filename().string().find(".exists.tmp"), std::string::npos) << "temporary folder left behind";
}

// --- bad input: one line, non-zero exit, nothing written ------------------------------

class BadInput : public MergeFsdp {
 protected:
  fs::path broken(const std::string& name, const std::string& from = "qwen2_w2") {
    const fs::path dir = g_root / "bad" / name;
    fs::remove_all(dir);
    fs::create_directories(dir.parent_path());
    fs::copy(ckpt(from), dir, fs::copy_options::recursive);
    return dir;
  }
  void tamper(const fs::path& file, const std::string& mode) {
    std::string out;
    ASSERT_EQ(run(python() + " " + oracle_script("tamper_ckpt.py") + " --file " + q(file) + " --mode " + mode, &out), 0) << out;
  }
  // Sizes and modification times of every file under dir: inputs must stay untouched.
  static std::map<std::string, std::pair<uintmax_t, fs::file_time_type>> snapshot(const fs::path& dir) {
    std::map<std::string, std::pair<uintmax_t, fs::file_time_type>> m;
    for (const auto& e : fs::recursive_directory_iterator(dir))
      if (e.is_regular_file()) m[e.path().string()] = {e.file_size(), e.last_write_time()};
    return m;
  }
  void expect_error(const fs::path& dir, const std::string& must_mention, const std::string& extra = "") {
    const fs::path out = g_root / "bad_out" / dir.filename();
    const auto before = snapshot(dir);
    std::string log;
    int rc = merge("", out, extra, &log, dir);
    EXPECT_EQ(snapshot(dir), before) << "inputs changed";
    EXPECT_NE(rc, 0) << log;
    EXPECT_NE(log.find("verlcpp: error:"), std::string::npos) << log;
    EXPECT_NE(log.find(must_mention), std::string::npos) << "message should mention '" << must_mention << "': " << log;
    size_t lines = 0;
    for (char ch : log) lines += ch == '\n';
    EXPECT_EQ(lines, 1u) << log;
    EXPECT_FALSE(fs::exists(out));
    if (fs::exists(out.parent_path())) {
      for (const auto& e : fs::directory_iterator(out.parent_path()))
        EXPECT_EQ(e.path().filename().string().find(".tmp-"), std::string::npos) << e.path();
    }
  }
};

TEST_F(BadInput, TruncatedShard) {
  auto dir = broken("truncated");
  const fs::path f = dir / "model_world_size_2_rank_1.pt";
  fs::resize_file(f, fs::file_size(f) / 2);
  expect_error(dir, "model_world_size_2_rank_1.pt");
}

TEST_F(BadInput, CorruptedZipDirectory) {
  auto dir = broken("corrupt");
  const fs::path f = dir / "model_world_size_2_rank_0.pt";
  const auto size = fs::file_size(f);
  std::fstream io(f, std::ios::in | std::ios::out | std::ios::binary);
  io.seekp(static_cast<std::streamoff>(size - 22));  // end-of-central-directory record
  io.write("garbage!garbage!garbag", 22);
  io.close();
  expect_error(dir, "model_world_size_2_rank_0.pt");
}

TEST_F(BadInput, MissingRank) {
  auto dir = broken("missing");
  fs::remove(dir / "model_world_size_2_rank_1.pt");
  expect_error(dir, "model_world_size_2_rank_1.pt");
}

TEST_F(BadInput, WrongWorldSizeInConfig) {
  auto dir = broken("wrong_ws");
  std::ofstream(dir / "fsdp_config.json") << R"({"FSDP_version": 2, "world_size": 4})";
  expect_error(dir, "world_size 4");
}

TEST_F(BadInput, ShapesDisagreeAcrossRanks) {
  auto dir = broken("shapes");
  std::string out;
  int rc = run(python() + " " + oracle_script("tamper_ckpt.py") + " --file " + q(dir / "model_world_size_2_rank_1.pt") +
                   " --mode shrink",
               &out);
  ASSERT_EQ(rc, 0) << out;
  expect_error(dir, "model_world_size_2_rank_1.pt");
}

TEST_F(BadInput, UnknownPlacement) {
  auto dir = broken("partial");
  std::string out;
  int rc = run(python() + " " + oracle_script("tamper_ckpt.py") + " --file " + q(dir / "model_world_size_2_rank_0.pt") +
                   " --mode partial",
               &out);
  ASSERT_EQ(rc, 0) << out;
  expect_error(dir, "Partial");
}

TEST_F(BadInput, UnwritableTarget) {
  const fs::path file = g_root / "bad" / "a_file";
  fs::create_directories(file.parent_path());
  std::ofstream(file) << "x";
  std::string log;
  int rc = merge("qwen2_w2", file / "out", "", &log);
  EXPECT_NE(rc, 0) << log;
  EXPECT_NE(log.find("verlcpp: error:"), std::string::npos) << log;
}

TEST_F(BadInput, WrongFlags) {
  std::string log;
  EXPECT_NE(run(verlcpp_bin() + " merge --backend fsdp --local_dir /nonexistent --target_dir /tmp/x_verlcpp", &log), 0);
  EXPECT_NE(log.find("/nonexistent"), std::string::npos) << log;
  EXPECT_NE(run(verlcpp_bin() + " merge --backend fsdp --local_dir . --target_dir /tmp/x --dtype fp8", &log), 0);
  EXPECT_NE(run(verlcpp_bin() + " merge --bogus", &log), 0);
}

}  // namespace

namespace {

// --- issue 9 §3: never a wrong model, never lost data -----------------------------------

TEST_F(BadInput, SymlinkedInputAsTargetWithOverwrite) {
  // --local_dir reached through a symlink, --target_dir the real folder, --overwrite: the
  // rank files must survive (they used to be deleted).
  auto dir = broken("symlinked");
  const fs::path link = g_root / "bad" / "symlinked_link";
  fs::remove(link);
  fs::create_directory_symlink(dir, link);
  const auto before = snapshot(dir);
  for (auto [in, out] : {std::pair{link, dir}, std::pair{dir, link}, std::pair{link, dir.parent_path()}}) {
    std::string log;
    EXPECT_NE(merge("", out, "--overwrite", &log, in), 0) << log;
    EXPECT_NE(log.find("the input"), std::string::npos) << log;
    EXPECT_EQ(snapshot(dir), before);
  }
}

TEST_F(BadInput, ValueThatIsNotATensor) {
  for (const char* mode : {"int", "record"}) {
    SCOPED_TRACE(mode);
    auto dir = broken(std::string("not_tensor_") + mode);
    tamper(dir / "model_world_size_2_rank_1.pt", mode);  // on one rank only
    expect_error(dir, mode == std::string("int") ? "is an int, not a tensor" : "argparse.Namespace object, not a tensor");
  }
  auto dir = broken("only_record");
  tamper(dir / "model_world_size_2_rank_0.pt", "only_record");
  expect_error(dir, "key 'x' is a argparse.Namespace object, not a tensor");
}

TEST_F(BadInput, ZeroTensorsIsAnError) {
  auto dir = broken("only_extra");
  for (const char* r : {"model_world_size_2_rank_0.pt", "model_world_size_2_rank_1.pt"}) tamper(dir / r, "only_extra");
  expect_error(dir, "no model tensors");
}

TEST_F(BadInput, KeyOnSomeRanksOnly) {
  auto dir = broken("drop_key");
  tamper(dir / "model_world_size_2_rank_1.pt", "drop_key");
  expect_error(dir, "is missing");
}

TEST_F(BadInput, RankFilesSwappedOrCopied) {
  auto dir = broken("swapped");
  fs::rename(dir / "model_world_size_2_rank_0.pt", dir / "tmp.pt");
  fs::rename(dir / "model_world_size_2_rank_1.pt", dir / "model_world_size_2_rank_0.pt");
  fs::rename(dir / "tmp.pt", dir / "model_world_size_2_rank_1.pt");
  expect_error(dir, "saved by rank 1");
  auto copied = broken("copied");
  fs::copy_file(copied / "model_world_size_2_rank_0.pt", copied / "model_world_size_2_rank_1.pt",
                fs::copy_options::overwrite_existing);
  expect_error(copied, "was saved by rank 0 (DeviceMesh._rank) but the file name says rank 1");
}

TEST_F(BadInput, GlobalShapeSmallerThanShards) {
  auto dir = broken("global_small");
  for (const char* r : {"model_world_size_2_rank_0.pt", "model_world_size_2_rank_1.pt"}) tamper(dir / r, "global_small");
  expect_error(dir, "smaller than the shards");
}

TEST_F(BadInput, ConfigOfAnotherModel) {
  // A Llama config (tied, other sizes) on Qwen2 weights: refused before anything is written,
  // and the error is the only line even without --quiet (no info line before it).
  const fs::path out = g_root / "bad_out" / "other_config";
  std::string log;
  int rc = run(verlcpp_bin() + " merge --backend fsdp --local_dir " + q(ckpt("qwen2_w2")) + " --target_dir " + q(out) +
                   " --hf_model_config_path " + q(ckpt("llama_tied_w2") / "huggingface"),
               &log);
  EXPECT_NE(rc, 0) << log;
  EXPECT_EQ(log.rfind("verlcpp: error: ", 0), 0u) << log;
  EXPECT_NE(log.find("hidden_size 72"), std::string::npos) << log;
  EXPECT_EQ(std::count(log.begin(), log.end(), '\n'), 1) << log;
  EXPECT_FALSE(fs::exists(out));
  // Same sizes, but the config says tied while the checkpoint's lm_head is its own tensor.
  auto dir = broken("tied_config");
  std::string cfg = verl::test::slurp(dir / "huggingface" / "config.json");
  const auto p = cfg.find("\"tie_word_embeddings\": false");
  ASSERT_NE(p, std::string::npos) << cfg;
  cfg.replace(p, std::strlen("\"tie_word_embeddings\": false"), "\"tie_word_embeddings\": true");
  std::ofstream(dir / "huggingface" / "config.json") << cfg;
  expect_error(dir, "lm_head.weight differs from model.embed_tokens.weight");
}

TEST_F(BadInput, ConcurrentMergeIntoTheSameTarget) {
  // Another merge holds the target's claim: this one fails at once with a clear line and
  // touches neither the other's temporary nor the existing output.
  const fs::path out = g_root / "bad_out" / "concurrent";
  fs::remove_all(out);
  std::string log;
  ASSERT_EQ(merge("qwen2_w2", out, "--dtype fp32", &log), 0) << log;
  const fs::path lock = out.parent_path() / ".concurrent.lock";
  const fs::path other_tmp = out.parent_path() / (".concurrent.tmp-" + std::to_string(::getpid()));
  fs::create_directories(other_tmp);
  std::ofstream(other_tmp / "half.safetensors") << "the other merge's work";
  // flock(1) holds the lock (as a running merge does) until its stdin closes.
  FILE* holder = ::popen(("exec flock -x " + q(lock) + " cat >/dev/null").c_str(), "w");
  ASSERT_NE(holder, nullptr);
  for (int i = 0; i < 500; ++i) {  // wait until flock holds it (it creates the file first)
    if (run("flock -n -x " + q(lock) + " true") != 0) break;
    ::usleep(20000);
  }
  const int rc = merge("qwen2_w2", out, "--overwrite", &log);
  ::pclose(holder);
  EXPECT_NE(rc, 0) << log;
  EXPECT_NE(log.find("another process"), std::string::npos) << log;
  EXPECT_TRUE(fs::exists(other_tmp / "half.safetensors")) << "the other merge's temporary was touched";
  check(out, ref("qwen2_w2"), "--dtype fp32");
  fs::remove_all(other_tmp);
}

TEST_F(BadInput, FifoInsteadOfARankFile) {
  auto dir = broken("fifo");
  fs::remove(dir / "model_world_size_2_rank_1.pt");
  ASSERT_EQ(::mkfifo((dir / "model_world_size_2_rank_1.pt").c_str(), 0644), 0);
  expect_error(dir, "model_world_size_2_rank_1.pt: is not a regular file (a FIFO)");
}

TEST_F(MergeFsdp, StaleTemporaryOfAKilledMergeIsRemoved) {
  const fs::path out = g_root / "out" / "stale";
  const pid_t p = ::fork();
  if (p == 0) ::_exit(0);
  ::waitpid(p, nullptr, 0);
  const fs::path stale = out.parent_path() / (".stale.tmp-" + std::to_string(p));
  fs::create_directories(stale);
  std::ofstream(stale / "model.safetensors") << std::string(1 << 16, 'x');
  std::string log;
  ASSERT_EQ(merge("qwen2_w2", out, "--dtype fp32", &log), 0) << log;
  EXPECT_FALSE(fs::exists(stale)) << "a dead merge's temporary folder must be removed";
  check(out, ref("qwen2_w2"), "--dtype fp32");
}

TEST_F(MergeFsdp, TargetInsideTheCheckpointCanBeReplaced) {
  // CKPT/merged is not an input: merging there twice (--overwrite) works and leaves CKPT alone.
  const fs::path dir = g_root / "inside";
  fs::remove_all(dir);
  fs::copy(ckpt("qwen2_w2"), dir, fs::copy_options::recursive);
  std::string log;
  ASSERT_EQ(merge("", dir / "merged", "--dtype fp32", &log, dir), 0) << log;
  ASSERT_EQ(merge("", dir / "merged", "--dtype fp32 --overwrite", &log, dir), 0) << log;
  check(dir / "merged", ref("qwen2_w2"), "--dtype fp32");
  EXPECT_TRUE(fs::exists(dir / "model_world_size_2_rank_1.pt"));
  // The HF folder is an input, though.
  EXPECT_NE(merge("", dir / "huggingface", "--overwrite", &log, dir), 0);
  EXPECT_NE(log.find("the input"), std::string::npos) << log;
  EXPECT_TRUE(fs::exists(dir / "huggingface" / "config.json"));
}

TEST_F(BadInput, MissingLocalDirSaysSo) {
  std::string log;
  EXPECT_NE(run(verlcpp_bin() + " merge --backend fsdp --local_dir " + q(g_root / "no_such_ckpt") + " --target_dir " +
                    q(g_root / "bad_out" / "nothing"),
                &log),
            0);
  EXPECT_NE(log.find("--local_dir " + (g_root / "no_such_ckpt").string() + ": no such folder"), std::string::npos) << log;
  EXPECT_FALSE(fs::exists(g_root / "bad_out" / "nothing"));
}

TEST_F(BadInput, LogprobOutEqualToBatchIsRefused) {
  std::string help;
  run(verlcpp_bin() + " --help", &help);
  if (help.find("logprob") == std::string::npos) GTEST_SKIP() << "verlcpp built without the engine";
  const fs::path batch = g_root / "bad" / "batch.safetensors";
  std::ofstream(batch) << "not even read";
  fs::remove(g_root / "bad" / "batch_link.safetensors");
  fs::create_symlink(batch, g_root / "bad" / "batch_link.safetensors");
  for (const char* out : {"batch.safetensors", "batch_link.safetensors"}) {
    std::string log;
    EXPECT_NE(run(verlcpp_bin() + " logprob --model " + q(g_root / "no_model") + " --batch " + q(batch) + " --out " +
                      q(g_root / "bad" / out),
                  &log),
              0);
    EXPECT_NE(log.find("same file"), std::string::npos) << log;
    EXPECT_EQ(verl::test::slurp(batch), "not even read");
  }
}

// --- verlcpp's own flat-unit checkpoints: rank, world size and step in every file ------

TEST_F(MergeFsdp, VerlcppFlatRankWorldStep) {
  const fs::path flat = g_root / "verlcpp_flat", old = g_root / "verlcpp_flat_old";
  std::string log;
  ASSERT_EQ(run(python() + " " + oracle_script("tamper_ckpt.py") + " --mode to_verlcpp_flat --file " + q(g_root / "qwen2_w2") +
                    " --out " + q(flat) + " --world 2 --step 5",
                &log),
            0)
      << log;
  ASSERT_EQ(run(python() + " " + oracle_script("tamper_ckpt.py") + " --mode to_verlcpp_flat --file " + q(g_root / "qwen2_w2") +
                    " --out " + q(old) + " --world 2 --no-rank-key",
                &log),
            0)
      << log;
  // Both merge to the reference; the rank key is not a parameter.
  for (const auto& d : {flat, old}) {
    const fs::path out = g_root / "out" / d.filename();
    ASSERT_EQ(merge("", out, "--dtype fp32", &log, d), 0) << log;
    check(out, ref("qwen2_w2"), "--dtype fp32 --logits");
  }
  // Swapped rank files.
  const fs::path sw = g_root / "bad" / "verlcpp_swapped";
  fs::remove_all(sw);
  fs::create_directories(sw.parent_path());
  fs::copy(flat, sw, fs::copy_options::recursive);
  fs::rename(sw / "model_world_size_2_rank_0.pt", sw / "t.pt");
  fs::rename(sw / "model_world_size_2_rank_1.pt", sw / "model_world_size_2_rank_0.pt");
  fs::rename(sw / "t.pt", sw / "model_world_size_2_rank_1.pt");
  EXPECT_NE(merge("", g_root / "bad_out" / "verlcpp_swapped", "", &log, sw), 0);
  EXPECT_NE(log.find("written by rank 1 of world size 2 (_verlcpp.rank_world_step) but its name says rank 0"),
            std::string::npos)
      << log;
  // A rank file of another step.
  const fs::path mixed = g_root / "bad" / "verlcpp_mixed";
  fs::remove_all(mixed);
  fs::copy(flat, mixed, fs::copy_options::recursive);
  ASSERT_EQ(run(python() + " " + oracle_script("tamper_ckpt.py") + " --mode to_verlcpp_flat --file " + q(g_root / "qwen2_w2") +
                    " --out " + q(g_root / "bad" / "verlcpp_step9") + " --world 2 --step 9",
                &log),
            0);
  fs::copy_file(g_root / "bad" / "verlcpp_step9" / "model_world_size_2_rank_1.pt", mixed / "model_world_size_2_rank_1.pt",
                fs::copy_options::overwrite_existing);
  EXPECT_NE(merge("", g_root / "bad_out" / "verlcpp_mixed", "", &log, mixed), 0);
  EXPECT_NE(log.find("saved at step 9"), std::string::npos) << log;
  EXPECT_FALSE(fs::exists(g_root / "bad_out" / "verlcpp_mixed"));
}

}  // namespace

// --- vision-language models -----------------------------------------------------------

using ojson = nlohmann::ordered_json;
ojson read_config(const fs::path& dir) { return ojson::parse(verl::test::slurp(dir / "config.json")); }
void write_config(const fs::path& dir, const ojson& j) { verl::test::spit(dir / "config.json", j.dump(2) + "\n"); }
// A transformers-5 vision-language config in the older layout (Qwen/Qwen2-VL-7B-Instruct's):
// the text model's fields at the top level, no text_config.
ojson flatten_text_config(ojson j) {
  const ojson t = j["text_config"];
  j.erase("text_config");
  for (const auto& [k, v] : t.items())
    if (!j.contains(k) && k != "model_type") j[k] = v;
  return j;
}

TEST_F(MergeFsdp, VisionLanguageBitExactWithImageTextLogits) {
  // Qwen2-VL (world 2), Qwen2.5-VL (world 3, uneven shards) and a tied Qwen2.5-VL: the merged
  // folder loads with the model's own class, its tensors are save_pretrained's (names and
  // bits; no lm_head when tied), its processor files are copied, and an image + text input
  // gives the unsharded model's logits.
  for (const char* c : {"qwen2_vl_w2", "qwen2_5_vl_w3", "qwen2_5_vl_tied_w2"}) {
    SCOPED_TRACE(c);
    const fs::path out = g_root / "out" / c;
    std::string log;
    ASSERT_EQ(merge(c, out, "--dtype fp32", &log), 0) << log;
    for (const char* f : {"preprocessor_config.json", "chat_template.json", "video_preprocessor_config.json"})
      EXPECT_TRUE(fs::exists(out / f)) << f;
    check(out, ref(c), "--dtype fp32 --logits");
  }
  const fs::path bf16 = g_root / "out" / "qwen2_5_vl_bf16";
  std::string log;
  ASSERT_EQ(merge("qwen2_5_vl_w3", bf16, "--dtype bf16 --max-shard-size 100KB", &log), 0) << log;
  EXPECT_TRUE(fs::exists(bf16 / "model.safetensors.index.json"));
  check(bf16, ref("qwen2_5_vl_w3"), "--dtype bf16 --logits");
}

TEST_F(MergeFsdp, VisionLanguageOlderConfigLayout) {
  // The same checkpoint with its config in the pre-transformers-5 layout merges the same way
  // (the config check reads the top-level fields), and transformers reads the result.
  const fs::path dir = g_root / "vl_flat", reference = g_root / "vl_flat_ref";
  fs::remove_all(dir);
  fs::remove_all(reference);
  fs::copy(ckpt("qwen2_vl_w2"), dir, fs::copy_options::recursive);
  fs::copy(ref("qwen2_vl_w2"), reference, fs::copy_options::recursive);
  const ojson flat = flatten_text_config(read_config(dir / "huggingface"));
  ASSERT_FALSE(flat.contains("text_config"));
  ASSERT_EQ(flat["vocab_size"], 320);
  write_config(dir / "huggingface", flat);
  ojson flat_ref = flatten_text_config(read_config(reference));
  write_config(reference, flat_ref);
  const fs::path out = g_root / "out" / "vl_flat";
  std::string log;
  ASSERT_EQ(merge("", out, "--dtype fp32", &log, dir), 0) << log;
  check(out, reference, "--dtype fp32 --logits");
  // The text fields are checked in this layout too.
  ojson wrong = flat;
  wrong["num_hidden_layers"] = 3;
  write_config(dir / "huggingface", wrong);
  EXPECT_NE(merge("", g_root / "out" / "vl_flat_wrong", "--dtype fp32", &log, dir), 0) << log;
  EXPECT_NE(log.find("num_hidden_layers 3 but the checkpoint has 2 layers"), std::string::npos) << log;
  EXPECT_FALSE(fs::exists(g_root / "out" / "vl_flat_wrong"));
}

TEST_F(BadInput, VisionLanguageConfigOfAnotherModel) {
  const fs::path vl_hf = ckpt("qwen2_vl_w2") / "huggingface";
  // Qwen2.5-VL's config (same text model) on Qwen2-VL weights: another vision tower.
  {
    auto dir = broken("vl_other_tower", "qwen2_vl_w2");
    fs::copy_file(ckpt("qwen2_5_vl_w3") / "huggingface" / "config.json", dir / "huggingface" / "config.json",
                  fs::copy_options::overwrite_existing);
    expect_error(dir, "visual.blocks.0.mlp.gate_proj.weight (the vision tower of another model)");
  }
  // A text model's config on vision-language weights: the vocabulary differs ...
  {
    auto dir = broken("vl_text_config", "qwen2_vl_w2");
    fs::copy_file(ckpt("qwen2_w2") / "huggingface" / "config.json", dir / "huggingface" / "config.json",
                  fs::copy_options::overwrite_existing);
    expect_error(dir, "vocab_size 301 but the checkpoint's model.language_model.embed_tokens.weight has 320 rows");
  }
  // ... and where the text sizes agree, the vision tower without a vision_config is refused.
  {
    auto dir = broken("vl_no_vision_config", "qwen2_vl_w2");
    ojson j = flatten_text_config(read_config(vl_hf));
    j.erase("vision_config");
    j["architectures"] = {"Qwen2ForCausalLM"};
    j["model_type"] = "qwen2";
    write_config(dir / "huggingface", j);
    expect_error(dir, "has a vision tower (model.visual.* tensors) but the config (architecture Qwen2ForCausalLM) has no "
                      "vision_config");
  }
  // A vision-language config on text-only weights of the same text sizes.
  {
    auto dir = broken("vl_config_on_text", "qwen2_w2");
    ojson j = read_config(vl_hf);
    j["text_config"]["vocab_size"] = 301;
    j["text_config"]["max_position_embeddings"] = 128;
    write_config(dir / "huggingface", j);
    expect_error(dir, "has a vision_config but the checkpoint has no vision tower");
  }
  // Vision sizes: depth and width.
  {
    auto dir = broken("vl_depth", "qwen2_vl_w2");
    ojson j = read_config(vl_hf);
    j["vision_config"]["depth"] = 3;
    write_config(dir / "huggingface", j);
    expect_error(dir, "vision_config.depth 3 but the checkpoint has 2 vision blocks");
  }
  {
    auto dir = broken("vl_width", "qwen2_5_vl_w3");
    ojson j = read_config(ckpt("qwen2_5_vl_w3") / "huggingface");
    j["vision_config"]["hidden_size"] = 48;
    write_config(dir / "huggingface", j);
    expect_error(dir, "vision width in vision_config is 48 but the checkpoint's visual.patch_embed.proj.weight has 32 rows");
  }
  {
    auto dir = broken("vl_out", "qwen2_vl_w2");
    ojson j = read_config(vl_hf);
    j["vision_config"]["hidden_size"] = 96;
    write_config(dir / "huggingface", j);
    expect_error(dir, "vision output width in vision_config is 96 but the checkpoint's visual.merger.mlp.2.weight has 64 rows");
  }
}
