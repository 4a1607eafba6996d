// test_merge_megatron.cpp — end to end: real Megatron-Core distributed checkpoints written by
// megatron-core's own dist_checkpointing.save from TP/PP/EP gloo ranks (and one written by
// torch.distributed.checkpoint directly, per-layer keys, safetensors items) — see
// tests/oracle/make_megatron_ckpt.py — are merged by `verlcpp merge --backend megatron` and
// checked against the unsharded HF reference by tests/oracle/check_merged.py: bit-exact
// tensors after the same dtype cast, same logits. Bad inputs: one clear line, non-zero
// exit, no output folder.
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <filesystem>
#include <fstream>

#include "test_util.h"

namespace fs = std::filesystem;
using verl::test::run;

namespace {

fs::path g_root;
const char* kCases =
    "qwen2_tp2,qwen2_pp2,qwen2_tp2pp2,llama_tied_tp2,qwen3_tp2,value_tp2pp2,qwen3_moe_ep2,qwen2_moe_tp2ep2,"
    "mixtral_ep2,dcp_per_layer,qwen2_tp2_padvocab,qwen2_tp2_singleton,qwen3_moe_ep2_singleton";

const auto* const g_cleanup = ::testing::AddGlobalTestEnvironment(new verl::test::RemoveAtExit(&g_root));

using verl::test::oracle_script;
using verl::test::python;
using verl::test::verlcpp_bin;
std::string q(const fs::path& p) { return verl::test::quoted(p); }

class MergeMegatron : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (!g_root.empty()) return;
    g_root = verl::test::fresh_suite_dir("verlcpp_merge_mega_");
    std::string out;
    int rc = run(python() + " " + oracle_script("make_megatron_ckpt.py") + " --out " + q(g_root) + " --case " + kCases, &out);
    ASSERT_EQ(rc, 0) << "fixtures failed:\n" << out;
  }
  static fs::path ckpt(const std::string& c) { return g_root / c / "ckpt"; }
  static fs::path ref(const std::string& c) { return g_root / c / "ref"; }

  int merge(const fs::path& dir, const fs::path& out, const std::string& extra, std::string* log) {
    return run(verlcpp_bin() + " merge --backend megatron --local_dir " + q(dir) + " --target_dir " + q(out) + " --quiet " + extra,
               log);
  }
  void check(const fs::path& merged, const fs::path& reference, const std::string& extra) {
    std::string out;
    int rc = run(python() + " " + oracle_script("check_merged.py") + " --merged " + q(merged) + " --ref " + q(reference) + " " + extra,
                 &out);
    EXPECT_EQ(rc, 0) << out;
  }
};

TEST_F(MergeMegatron, EveryLayoutBitExactFp32WithLogits) {
  // Dense GQA (TP, PP, TP x PP), tied embeddings, q/k norms, MoE over EP (with TP), torch-DCP
  // per-layer keys with safetensors items, and a vocabulary padded to a multiple of 16 x TP
  // (make_vocab_size_divisible_by: 302 -> 320 rows, trimmed back to vocab_size), and
  // sharded_state_dict's singleton_local_shards layout (per-layer keys, linear_fc1 as separate
  // weight_w / weight_v items, experts as experts.experts.<e>.…), dense and MoE.
  for (const char* c : {"qwen2_tp2", "qwen2_pp2", "qwen2_tp2pp2", "llama_tied_tp2", "qwen3_tp2", "qwen3_moe_ep2",
                        "qwen2_moe_tp2ep2", "mixtral_ep2", "dcp_per_layer", "qwen2_tp2_padvocab", "qwen2_tp2_singleton",
                        "qwen3_moe_ep2_singleton"}) {
    SCOPED_TRACE(c);
    const fs::path out = g_root / "out" / c;
    std::string log;
    ASSERT_EQ(merge(ckpt(c), out, "--dtype fp32", &log), 0) << log;
    check(out, ref(c), "--dtype fp32 --logits");
  }
}

TEST_F(MergeMegatron, ValueModelHead) {
  const fs::path out = g_root / "out" / "value";
  std::string log;
  ASSERT_EQ(merge(ckpt("value_tp2pp2"), out, "--dtype fp32 --is-value-model", &log), 0) << log;
  check(out, ref("value_tp2pp2"), "--dtype fp32 --logits");
}

TEST_F(MergeMegatron, Bf16ShardedOutputAndAutoDtype) {
  const fs::path out = g_root / "out" / "bf16";
  std::string log;
  ASSERT_EQ(merge(ckpt("qwen2_tp2pp2"), out, "--dtype bf16 --max-shard-size 20KB", &log), 0) << log;
  EXPECT_TRUE(fs::exists(out / "model.safetensors.index.json"));
  EXPECT_FALSE(fs::exists(out / "model.safetensors"));
  check(out, ref("qwen2_tp2pp2"), "--dtype bf16 --logits");
  // auto: the config's dtype (float32 here).
  const fs::path out2 = g_root / "out" / "auto";
  ASSERT_EQ(merge(ckpt("qwen2_moe_tp2ep2"), out2, "", &log), 0) << log;
  check(out2, ref("qwen2_moe_tp2ep2"), "--dtype fp32");
}

TEST_F(MergeMegatron, FolderLayouts) {
  std::string log;
  // The dist_ckpt folder itself (config found in ../huggingface).
  const fs::path direct = g_root / "out" / "direct";
  ASSERT_EQ(merge(ckpt("qwen2_tp2") / "model" / "dist_ckpt", direct, "--dtype fp32", &log), 0) << log;
  check(direct, ref("qwen2_tp2"), "--dtype fp32");
  // The layout before verl's v2: <dir>/dist_ckpt and <dir>/huggingface.
  const fs::path legacy = g_root / "legacy";
  fs::create_directories(legacy);
  fs::copy(ckpt("qwen2_tp2") / "model" / "dist_ckpt", legacy / "dist_ckpt", fs::copy_options::recursive);
  fs::copy(ckpt("qwen2_tp2") / "model" / "huggingface", legacy / "huggingface", fs::copy_options::recursive);
  const fs::path lout = g_root / "out" / "legacy";
  ASSERT_EQ(merge(legacy, lout, "--dtype fp32", &log), 0) << log;
  check(lout, ref("qwen2_tp2"), "--dtype fp32");
}

TEST_F(MergeMegatron, TestModeReportsDifferences) {
  std::string log;
  int rc = run(verlcpp_bin() + " merge test --backend megatron --local_dir " + q(ckpt("qwen3_moe_ep2")) + " --test_hf_dir " +
                   q(ref("qwen3_moe_ep2")) + " --atol 0 --rtol 0",
               &log);
  EXPECT_EQ(rc, 0) << log;
  rc = run(verlcpp_bin() + " merge --test --backend megatron --local_dir " + q(ckpt("qwen2_tp2")) + " --test_hf_dir " +
               q(ref("qwen2_pp2")),
           &log);
  EXPECT_EQ(rc, 1) << log;
  EXPECT_NE(log.find("FAILED"), std::string::npos) << log;
}

// --- bad input: one line, non-zero exit, nothing written ------------------------------

class MegatronBadInput : public MergeMegatron {
 protected:
  fs::path broken(const std::string& name) {
    const fs::path dir = g_root / "bad" / name;
    fs::remove_all(dir);
    fs::create_directories(dir.parent_path());
    fs::copy(ckpt("qwen2_tp2pp2"), dir, fs::copy_options::recursive);
    return dir;
  }
  static fs::path dist(const fs::path& dir) { return dir / "model" / "dist_ckpt"; }
  void expect_error(const fs::path& dir, const std::string& must_mention, const std::string& extra = "") {
    const fs::path out = g_root / "bad_out" / dir.filename();
    std::string log;
    int rc = merge(dir, out, extra, &log);
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
  // Rewrites .metadata with a Python edit of the unpickled Metadata object `md`.
  void edit_metadata(const fs::path& dir, const std::string& code) {
    std::string out;
    const std::string script = (g_root / "edit.py").string();
    std::ofstream(script) << "import pickle, sys\np = sys.argv[1]\nmd = pickle.load(open(p, 'rb'))\n" << code
                          << "\npickle.dump(md, open(p, 'wb'))\n";
    ASSERT_EQ(run(python() + " " + script + " " + q(dist(dir) / ".metadata"), &out), 0) << out;
  }
};

TEST_F(MegatronBadInput, TruncatedDistcp) {
  auto dir = broken("truncated");
  const fs::path f = dist(dir) / "__1_0.distcp";
  fs::resize_file(f, fs::file_size(f) / 2);
  expect_error(dir, "__1_0.distcp");
}

TEST_F(MegatronBadInput, MissingDistcp) {
  auto dir = broken("missing");
  fs::remove(dist(dir) / "__3_0.distcp");
  expect_error(dir, "__3_0.distcp");
}

TEST_F(MegatronBadInput, CorruptMetadata) {
  auto dir = broken("corrupt");
  std::ofstream(dist(dir) / ".metadata", std::ios::trunc) << "\x80\x04garbage";
  expect_error(dir, ".metadata");
}

TEST_F(MegatronBadInput, CorruptItem) {
  auto dir = broken("item");
  const fs::path f = dist(dir) / "__0_0.distcp";
  const auto size = fs::file_size(f);
  std::fstream io(f, std::ios::in | std::ios::out | std::ios::binary);
  std::string junk(static_cast<size_t>(size), 'x');
  io.write(junk.data(), static_cast<std::streamsize>(junk.size()));
  io.close();
  expect_error(dir, "__0_0.distcp");
}

TEST_F(MegatronBadInput, ChunkGap) {
  auto dir = broken("gap");
  edit_metadata(dir, "md.state_dict_metadata['decoder.layers.self_attention.linear_qkv.weight'].chunks.pop()");
  expect_error(dir, "gap");
}

TEST_F(MegatronBadInput, ChunkOverlap) {
  auto dir = broken("overlap");
  edit_metadata(dir,
                "cs = md.state_dict_metadata['decoder.layers.mlp.linear_fc2.weight'].chunks\n"
                "import torch\n"
                "cs[1] = type(cs[1])(offsets=torch.Size(cs[0].offsets), sizes=cs[1].sizes)");
  expect_error(dir, "overlap");
}

TEST_F(MegatronBadInput, UnsupportedArchitecture) {
  auto dir = broken("arch");
  const fs::path cfg = dir / "model" / "huggingface" / "config.json";
  std::string text = verl::test::slurp(cfg);
  const std::string from = "Qwen2ForCausalLM";
  text.replace(text.find(from), from.size(), "GPTNeoXForCausalLM");
  std::ofstream(cfg, std::ios::trunc) << text;
  expect_error(dir, "supported: LlamaForCausalLM");
}

TEST_F(MegatronBadInput, VisionLanguageModelIsRefusedByArchitecture) {
  // No name map for a Megatron vision tower / projector: refused by the config's architecture,
  // whatever the distributed checkpoint holds.
  auto dir = broken("vlm");
  const fs::path cfg = dir / "model" / "huggingface" / "config.json";
  std::string text = verl::test::slurp(cfg);
  const std::string from = "Qwen2ForCausalLM";
  text.replace(text.find(from), from.size(), "Qwen2_5_VLForConditionalGeneration");
  std::ofstream(cfg, std::ios::trunc) << text;
  expect_error(dir, "vision-language model 'Qwen2_5_VLForConditionalGeneration' is not supported by the Megatron backend");
}

TEST_F(MegatronBadInput, NotACheckpoint) {
  const fs::path dir = g_root / "bad" / "empty";
  fs::create_directories(dir);
  expect_error(dir, "no Megatron distributed checkpoint");
}

// Issue 9 §3 for the Megatron backend: FIFOs are refused instead of hanging, the checkpoint is
// never the target, and an HF config of another model is refused before writing.
TEST_F(MegatronBadInput, FifoInsteadOfADistcpOrMetadata) {
  for (const char* f : {"__2_0.distcp", ".metadata"}) {
    SCOPED_TRACE(f);
    auto dir = broken(std::string("fifo") + (f[0] == '.' ? "_md" : "_distcp"));
    fs::remove(dist(dir) / f);
    ASSERT_EQ(::mkfifo((dist(dir) / f).c_str(), 0644), 0);
    expect_error(dir, std::string(f) + ": is not a regular file (a FIFO)");
  }
}

TEST_F(MegatronBadInput, CheckpointIsNeverTheTarget) {
  auto dir = broken("self_target");
  const fs::path link = g_root / "bad" / "self_target_link";
  fs::remove(link);
  fs::create_directory_symlink(dir, link);
  for (const fs::path& out : {dir, dir / "model", dist(dir)}) {
    std::string log;
    EXPECT_NE(merge(link, out, "--overwrite", &log), 0) << log;
    EXPECT_NE(log.find("the input"), std::string::npos) << log;
  }
  EXPECT_TRUE(fs::exists(dist(dir) / ".metadata"));
  EXPECT_TRUE(fs::exists(dist(dir) / "__0_0.distcp"));
}

TEST_F(MegatronBadInput, ConfigOfAnotherModel) {
  auto dir = broken("other_config");
  const fs::path cfg = dir / "model" / "huggingface" / "config.json";
  std::string text = verl::test::slurp(cfg);
  const std::string from = "\"num_hidden_layers\": 3";
  const auto p = text.find(from);
  ASSERT_NE(p, std::string::npos) << text;
  text.replace(p, from.size(), "\"num_hidden_layers\": 2");
  std::ofstream(cfg) << text;
  expect_error(dir, "should have 2 layers (num_hidden_layers)");
}

}  // namespace
