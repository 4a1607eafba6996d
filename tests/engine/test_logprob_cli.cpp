// test_logprob_cli.cpp — `verlcpp logprob` end to end against transformers (computed at test
// time): fp32 and bf16 log-probs and entropy, values of a value model, per-sample temperature,
// under mpirun with Ulysses sequence parallelism, and one-line errors on bad input without leaving an output file behind.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>

#include "engine_test_util.h"

namespace verl::test {
namespace {
namespace fs = std::filesystem;

std::string logprob_cmd(const std::string& model, const std::string& batch, const std::string& out,
                        const std::string& extra) {
  return verlcpp_bin() + " logprob --model " + model + " --batch " + batch + " --out " + out + " " + extra;
}

TEST(LogprobCli, Bf16MatchesTransformers) {
  const std::string fx = engine_fixtures();
  TempDir tmp;
  for (std::string name : {"qwen2", "llama_tied", "qwen3"}) {
    std::string out;
    ASSERT_EQ(run(logprob_cmd(fx + "/" + name, fx + "/batch.safetensors", tmp / "o.safetensors",
                              "--dtype bf16 --entropy --temperature 0.7 --max-token-len 64"), &out), 0) << out;
    auto got = load_st(tmp / "o.safetensors");
    auto ref = load_st(fx + "/ref_" + name + "_bf16.safetensors");
    EXPECT_LE(mean_abs_diff(got.at("log_probs"), ref.at("log_probs")), 2e-2) << name;
    EXPECT_LE(mean_abs_diff(got.at("entropy"), ref.at("entropy")), 2e-2) << name;
    // and close to the fp32 truth as well
    auto ref32 = load_st(fx + "/ref_" + name + "_fp32.safetensors");
    EXPECT_LE(mean_abs_diff(got.at("log_probs"), ref32.at("log_probs")), 5e-2) << name;
  }
}

TEST(LogprobCli, Fp32MatchesTransformersWithPerSampleTemperature) {
  const std::string fx = engine_fixtures();
  TempDir tmp;
  std::string out;
  ASSERT_EQ(run(logprob_cmd(fx + "/qwen2", fx + "/batch_temp.safetensors", tmp / "o.safetensors",
                            "--entropy --micro-batch-size 3 -q"), &out), 0) << out;
  EXPECT_EQ(out, "");  // quiet
  auto got = load_st(tmp / "o.safetensors");
  auto ref = load_st(fx + "/ref_qwen2_fp32_temp.safetensors");
  EXPECT_EQ(got.at("log_probs").scalar_type(), at::kFloat);
  EXPECT_LE(max_abs_diff(got.at("log_probs"), ref.at("log_probs")), 1e-4);
  EXPECT_LE(max_abs_diff(got.at("entropy"), ref.at("entropy")), 1e-4);
}

TEST(LogprobCli, MpirunWithSequenceParallelismMatchesTransformers) {
  // The FSDP engine forward only over MPI ranks: sp = 2 over 2 ranks, sp = 2 × dp = 2 over 4
  // (the batch split between the two groups); llama_tied has one kv head (< sp).
  const std::string fx = engine_fixtures();
  TempDir tmp;
  struct Case {
    int np;
    std::string model, batch, ref, extra;
  };
  const Case cases[] = {
      {2, "qwen2", "batch_temp", "ref_qwen2_fp32_temp", "--micro-batch-size 3"},
      {4, "qwen2", "batch_temp", "ref_qwen2_fp32_temp", "--max-token-len 40"},
      {4, "llama_tied", "batch", "ref_llama_tied_fp32", "--temperature 0.7 --micro-batch-size 2"},
      {2, "value", "batch", "ref_value_fp32", ""},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.model + " np " + std::to_string(c.np) + " " + c.extra);
    std::string out;
    const bool value = c.model == "value";
    ASSERT_EQ(run(mpirun(c.np) + logprob_cmd(fx + "/" + c.model, fx + "/" + c.batch + ".safetensors", tmp / "o.safetensors",
                                             "--sp 2 " + std::string(value ? "" : "--entropy ") + c.extra),
                  &out),
              0)
        << out;
    EXPECT_NE(out.find("ranks (sp 2)"), std::string::npos) << out;
    auto got = load_st(tmp / "o.safetensors");
    auto ref = load_st(fx + "/" + c.ref + ".safetensors");
    for (const char* k : value ? std::vector<const char*>{"values"} : std::vector<const char*>{"log_probs", "entropy"}) {
      ASSERT_EQ(got.at(k).sizes(), ref.at(k).sizes()) << k;
      EXPECT_LE(max_abs_diff(got.at(k), ref.at(k)), 1e-4) << k;
    }
  }
  // sp must divide the ranks; without mpirun there is one rank.
  std::string out;
  EXPECT_NE(run(logprob_cmd(fx + "/qwen2", fx + "/batch.safetensors", tmp / "x.safetensors", "--sp 2"), &out), 0);
  EXPECT_NE(out.find("must divide the number of ranks (1; start the ranks with mpirun -np N)"), std::string::npos) << out;
  EXPECT_FALSE(fs::exists(tmp / "x.safetensors"));
}

TEST(LogprobCli, ValueModelWritesValues) {
  const std::string fx = engine_fixtures();
  TempDir tmp;
  std::string out;
  ASSERT_EQ(run(logprob_cmd(fx + "/value", fx + "/batch.safetensors", tmp / "v.safetensors", "-q"), &out), 0) << out;
  auto got = load_st(tmp / "v.safetensors");
  EXPECT_EQ(got.count("log_probs"), 0u);
  auto ref = load_st(fx + "/ref_value_fp32.safetensors");
  EXPECT_LE(max_abs_diff(got.at("values"), ref.at("values")), 1e-4);
  ASSERT_EQ(run(logprob_cmd(fx + "/value", fx + "/batch.safetensors", tmp / "v.safetensors", "--dtype bf16 -q"), &out), 0);
  EXPECT_LE(mean_abs_diff(load_st(tmp / "v.safetensors").at("values"), load_st(fx + "/ref_value_bf16.safetensors").at("values")), 2e-2);
  ASSERT_NE(run(logprob_cmd(fx + "/value", fx + "/batch.safetensors", tmp / "e.safetensors", "--entropy"), &out), 0);
  EXPECT_NE(out.find("value model"), std::string::npos) << out;
}

TEST(LogprobCli, BadInputIsOneLineErrorAndNoOutput) {
  const std::string fx = engine_fixtures();
  TempDir tmp;
  auto ids = at::tensor(std::vector<int64_t>{1, 2, 3, 4, 5});
  struct Case {
    std::map<std::string, at::Tensor> in;
    std::string model, expect;
  };
  std::vector<Case> cases = {
      {{{"input_ids", ids}}, "qwen2", "missing tensor 'cu_seqlens'"},
      {{{"input_ids", ids}, {"cu_seqlens", at::tensor(std::vector<int64_t>{0, 2, 4})}}, "qwen2", "cu_seqlens ends at 4"},
      {{{"input_ids", ids}, {"cu_seqlens", at::tensor(std::vector<int64_t>{0, 3, 3, 5})}}, "qwen2", "strictly increasing"},
      {{{"input_ids", ids.to(at::kInt)}, {"cu_seqlens", at::tensor(std::vector<int64_t>{0, 5})}}, "qwen2", "1-D I64"},
      {{{"input_ids", at::tensor(std::vector<int64_t>{1, 999})}, {"cu_seqlens", at::tensor(std::vector<int64_t>{0, 2})}},
       "qwen2", "outside the vocabulary"},
      {{{"input_ids", ids}, {"cu_seqlens", at::tensor(std::vector<int64_t>{0, 5})}, {"temperature", at::zeros({1})}},
       "qwen2", "must be positive"},
      {{{"input_ids", ids}, {"cu_seqlens", at::tensor(std::vector<int64_t>{0, 5})}}, "no_such_model", "no such file"},
  };
  for (const auto& c : cases) {
    save_st(tmp / "in.safetensors", c.in);
    std::string out;
    int rc = run(logprob_cmd(fx + "/" + c.model, tmp / "in.safetensors", tmp / "o.safetensors", ""), &out);
    EXPECT_NE(rc, 0) << c.expect;
    EXPECT_EQ(out.rfind("verlcpp: error: ", 0), 0u) << out;
    EXPECT_NE(out.find(c.expect), std::string::npos) << out;
    EXPECT_EQ(std::count(out.begin(), out.end(), '\n'), 1) << out;
    EXPECT_FALSE(fs::exists(tmp / "o.safetensors"));
  }
  // A sequence longer than the token budget.
  std::string out;
  EXPECT_NE(run(logprob_cmd(fx + "/qwen2", fx + "/batch.safetensors", tmp / "o.safetensors", "--max-token-len 10"), &out), 0);
  EXPECT_NE(out.find("more than max_token_len 10"), std::string::npos) << out;
  // A device that is not there (this machine has no GPU; skipped where one is) or is misspelt:
  // one line before anything is read or written.
  const char* cuda_env = std::getenv("CUDA_VISIBLE_DEVICES");
  const bool no_gpu = !fs::exists("/dev/nvidia0") || (cuda_env && std::string(cuda_env).empty());
  std::vector<std::pair<std::string, std::string>> devices = {{"--device tpu", "unknown device 'tpu'"},
                                                              {"--device cuda:x", "unknown device 'cuda:x'"}};
  if (no_gpu) devices.push_back({"--device cuda", "device 'cuda': no CUDA device is available"});
  for (const auto& [flag, expect] : devices) {
    std::string o;
    EXPECT_NE(run(logprob_cmd(fx + "/qwen2", fx + "/batch.safetensors", tmp / "o.safetensors", flag), &o), 0) << flag;
    EXPECT_EQ(o.rfind("verlcpp: error: ", 0), 0u) << o;
    EXPECT_NE(o.find(expect), std::string::npos) << o;
    EXPECT_EQ(std::count(o.begin(), o.end(), '\n'), 1) << o;
    EXPECT_FALSE(fs::exists(tmp / "o.safetensors"));
  }
  // Leftover temporary files: none.
  for (const auto& e : fs::directory_iterator(tmp.path))
    EXPECT_EQ(e.path().filename().string().find(".tmp"), std::string::npos) << e.path();
}

}  // namespace
}  // namespace verl::test
