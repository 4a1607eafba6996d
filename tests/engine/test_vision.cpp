// test_vision.cpp — vision-language models (Qwen2-VL, Qwen2.5-VL) in the engine against
// transformers, computed at test time by tests/oracle/vlm_fixtures.py on tiny random models:
// mRoPE position ids equal get_rope_index's; log-probs and entropy of image+text, video+image+text
// and text-only sequences packed together (fp32, <= 1e-4; bf16 near transformers' bf16) through `verlcpp logprob` in one process (the dense
// model), under mpirun (the FSDP engine forward only, vision blocks and merger as units) and
// with Ulysses sequence parallelism (vision features computed on the rank that holds the
// tokens); one-line errors for images that do not fit the data.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>

#include "engine_test_util.h"
#include "hf/config.h"
#include "model/vision.h"

namespace verl::test {
namespace {
namespace fs = std::filesystem;

const char* kModels[] = {"qwen2_vl", "qwen2_5_vl"};

std::string vlm_fixtures() { return oracle_fixture("vlm_fixtures.py"); }

std::string logprob_cmd(const std::string& model, const std::string& batch, const std::string& out, const std::string& extra) {
  return verlcpp_bin() + " logprob --model " + model + " --batch " + batch + " --out " + out + " --temperature 0.7 " + extra;
}

// The batch file's sequences with their per-sample multi_modal_inputs, as verl hands them over.
struct FileBatch {
  at::Tensor ids;
  std::vector<int64_t> cu;
  std::vector<TensorDict> mm;
};
FileBatch read_file_batch(const std::string& fx) {
  auto m = load_st(fx + "/batch.safetensors");
  FileBatch b;
  b.ids = m.at("input_ids");
  const at::Tensor cu = m.at("cu_seqlens");
  b.cu.assign(cu.data_ptr<int64_t>(), cu.data_ptr<int64_t>() + cu.numel());
  b.mm.resize(b.cu.size() - 1);
  // Images (videos) in order, one per run of image (video) tokens.
  struct Kind {
    const char *pixels, *grid;
    int64_t token;
  };
  for (const Kind& k : {Kind{"pixel_values", "image_grid_thw", 250}, Kind{"pixel_values_videos", "video_grid_thw", 251}}) {
    const at::Tensor grid = m.at(k.grid), px = m.at(k.pixels);
    int64_t item = 0, row = 0;
    const int64_t* p = b.ids.data_ptr<int64_t>();
    for (size_t s = 0; s + 1 < b.cu.size(); ++s) {
      const int64_t first = item, first_row = row;
      for (int64_t t = b.cu[s]; t < b.cu[s + 1]; ++t)
        if (p[t] == k.token && (t == b.cu[s] || p[t - 1] != k.token)) row += grid[item++].prod().item<int64_t>();
      if (item == first) continue;
      b.mm[s][k.pixels] = px.narrow(0, first_row, row - first_row);
      b.mm[s][k.grid] = grid.narrow(0, first, item - first);
      if (k.token == 251) b.mm[s]["second_per_grid_ts"] = m.at("second_per_grid_ts").narrow(0, first, item - first);
    }
  }
  return b;
}

TEST(VisionLanguage, ConfigAsTransformersReadsIt) {
  // transformers 5's layout (text_config, vision_config) of the fixture's models.
  const std::string fx = vlm_fixtures();
  const ModelConfig q2 = load_model_config(fx + "/qwen2_vl"), q25 = load_model_config(fx + "/qwen2_5_vl");
  EXPECT_EQ(q2.family, Family::Qwen2);
  EXPECT_EQ(q2.hidden_size, 64);
  EXPECT_TRUE(q2.attention_bias);
  EXPECT_FALSE(q2.vision->qwen2_5);
  EXPECT_EQ(q2.vision->width, 32);
  EXPECT_EQ(q2.vision->mlp_hidden, 64);
  EXPECT_EQ(q2.vision->hidden_act, "quick_gelu");
  EXPECT_EQ(q2.vision->mrope_section, (std::vector<int>{2, 3, 3}));
  EXPECT_EQ(q2.vision->image_token_id, 250);
  EXPECT_TRUE(q25.vision->qwen2_5);
  EXPECT_EQ(q25.vision->fullatt_block_indexes, (std::vector<int>{1}));
  EXPECT_EQ(q25.vision->window_size, 16);
  EXPECT_EQ(q25.vision->out_hidden, 64);
  // Errors name the file and the field; the Megatron merger refuses vision-language models.
  std::string text = read_text_file(fx + "/qwen2_vl/config.json");
  auto j = nlohmann::json::parse(text);
  auto expect_error = [](const nlohmann::json& c, const std::string& want, ConfigUse use = ConfigUse::Engine) {
    try {
      parse_model_config(c.dump(), "cfg.json", use);
      ADD_FAILURE() << "no error, expected " << want;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(want), std::string::npos) << e.what();
    }
  };
  auto no_section = j;
  no_section["text_config"]["rope_parameters"].erase("mrope_section");
  expect_error(no_section, "needs rope_parameters.mrope_section");
  auto no_vision = j;
  no_vision.erase("vision_config");
  expect_error(no_vision, "needs a vision_config");
  auto bad_act = j;
  bad_act["vision_config"]["hidden_act"] = "relu6";
  expect_error(bad_act, "vision_config.hidden_act 'relu6' is not supported");
  expect_error(j, "not supported by the Megatron backend", ConfigUse::Megatron);
}

TEST(VisionLanguage, MropePositionsMatchTransformers) {
  const std::string fx = vlm_fixtures();
  const FileBatch b = read_file_batch(fx);
  for (const char* name : kModels) {
    SCOPED_TRACE(name);
    const ModelConfig c = load_model_config(fx + "/" + name);
    ASSERT_TRUE(c.vision.has_value());
    const at::Tensor ref = load_st(fx + "/ref_" + std::string(name) + "_fp32.safetensors").at("position_ids");
    const int64_t nnz = b.cu.back();
    const VisionRow r = prepare_vision_row(c, b.ids, b.cu, b.mm, 0, nnz, nnz);
    ASSERT_EQ(r.position_ids.sizes(), ref.sizes());
    EXPECT_TRUE(at::equal(r.position_ids, ref.to(at::kLong)));
    // Every image and video token takes a feature; sp-style slices of the padded row cover the same tokens.
    const int64_t vision_tokens = ((b.ids == 250) | (b.ids == 251)).sum().item<int64_t>();
    EXPECT_EQ(r.inputs.token_index.numel(), vision_tokens);
    const int64_t padded = (nnz + 2) / 3 * 3, part = padded / 3;
    int64_t tokens = 0;
    for (int k = 0; k < 3; ++k) {
      const VisionRow s = prepare_vision_row(c, b.ids, b.cu, b.mm, k * part, part, padded);
      EXPECT_EQ(s.position_ids.size(1), part);
      if (s.inputs.token_index.defined()) tokens += s.inputs.token_index.numel();
    }
    EXPECT_EQ(tokens, vision_tokens);
  }
}

void expect_matches(const std::string& got_path, const std::string& ref_path, double tol, const std::string& what) {
  auto got = load_st(got_path);
  auto ref = load_st(ref_path);
  for (const char* k : {"log_probs", "entropy"}) {
    ASSERT_EQ(got.at(k).sizes(), ref.at(k).sizes()) << what << " " << k;
    const double d = max_abs_diff(got.at(k), ref.at(k));
    EXPECT_LE(d, tol) << what << " " << k;
    std::printf("[ max |diff| %s %s: %.3g ]\n", what.c_str(), k, d);
  }
}

TEST(VisionLanguage, LogprobMatchesTransformers) {
  // One process (the dense model), packed three ways: the whole batch in one row, fixed
  // micro-batches of 2 and token-balanced micro-batches.
  const std::string fx = vlm_fixtures();
  TempDir tmp;
  for (const char* name : kModels) {
    for (std::string extra : {"", "--micro-batch-size 2", "--max-token-len 60"}) {
      std::string out;
      ASSERT_EQ(run(logprob_cmd(fx + "/" + name, fx + "/batch.safetensors", tmp / "o.safetensors", "--entropy -q " + extra),
                    &out),
                0)
          << out;
      expect_matches(tmp / "o.safetensors", fx + "/ref_" + std::string(name) + "_fp32.safetensors", 1e-4,
                     std::string(name) + " " + extra);
    }
  }
}

TEST(VisionLanguage, Bf16LogprobIsCloseToTransformersBf16) {
  const std::string fx = vlm_fixtures();
  TempDir tmp;
  for (const char* name : kModels) {
    std::string out;
    ASSERT_EQ(run(logprob_cmd(fx + "/" + name, fx + "/batch.safetensors", tmp / "o.safetensors", "--entropy -q --dtype bf16"),
                  &out),
              0)
        << out;
    auto got = load_st(tmp / "o.safetensors");
    auto ref = load_st(fx + "/ref_" + std::string(name) + "_bf16.safetensors");
    auto truth = load_st(fx + "/ref_" + std::string(name) + "_fp32.safetensors");
    for (const char* k : {"log_probs", "entropy"}) {
      // Near transformers' bf16, and no further from the fp32 truth than transformers' bf16 is.
      const double d = mean_abs_diff(got.at(k), ref.at(k)), ours = mean_abs_diff(got.at(k), truth.at(k)),
                   theirs = mean_abs_diff(ref.at(k), truth.at(k));
      EXPECT_LE(d, 2e-2) << name << " " << k;
      EXPECT_LE(ours, 1.25 * theirs) << name << " " << k;
      std::printf("[ mean |diff| %s bf16 %s: %.3g vs transformers bf16; vs fp32 %.3g (transformers bf16: %.3g) ]\n", name,
                  k, d, ours, theirs);
    }
  }
}

TEST(VisionLanguage, FsdpEngineLogprobMatchesTransformers) {
  // Under mpirun: the FSDP engine forward only (the vision tower's units sharded over the ranks;
  // a rank whose micro-batch has no image still runs the tower's collectives), and Ulysses
  // sequence parallelism (sp = 2: each rank runs the images whose tokens it holds).
  const std::string fx = vlm_fixtures();
  TempDir tmp;
  for (const char* name : kModels) {
    // (--sp 2 alone: the whole batch in one row, whose halves split an image between the ranks.)
    for (std::string extra : {"--micro-batch-size 1", "--sp 2", "--sp 2 --micro-batch-size 2", "--sp 2 --max-token-len 50"}) {
      std::string out;
      ASSERT_EQ(run(mpirun(2) + logprob_cmd(fx + "/" + name, fx + "/batch.safetensors", tmp / "o.safetensors", "--entropy " + extra),
                    &out),
                0)
          << out;
      expect_matches(tmp / "o.safetensors", fx + "/ref_" + std::string(name) + "_fp32.safetensors", 1e-4,
                     std::string(name) + " np 2 " + extra);
    }
  }
}

TEST(VisionLanguage, ImagesThatDoNotFitAreOneLineErrors) {
  const std::string fx = vlm_fixtures();
  TempDir tmp;
  auto m = load_st(fx + "/batch.safetensors");
  struct Case {
    std::string model;
    std::map<std::string, at::Tensor> in;
    std::string expect;
  };
  auto with = [&](const std::string& k, const at::Tensor& t) {
    auto c = m;
    c[k] = t;
    return c;
  };
  const at::Tensor grid = m.at("image_grid_thw");
  std::vector<Case> cases = {
      {"qwen2_vl", with("image_grid_thw", grid.narrow(0, 0, grid.size(0) - 1)), "rows for image_grid_thw"},
      {"qwen2_vl", with("pixel_values", m.at("pixel_values").narrow(1, 0, 10)), "must be [patches, 96]"},
      {"qwen2_vl", with("image_grid_thw", grid * at::tensor(std::vector<int64_t>{1, 2, 1}).view({1, 3})), "rows for image_grid_thw"},
  };
  {
    auto c = m;
    c.erase("image_grid_thw");
    cases.push_back({"qwen2_vl", c, "needs both"});
  }
  for (const auto& c : cases) {
    save_st(tmp / "in.safetensors", c.in);
    std::string out;
    EXPECT_NE(run(logprob_cmd(fx + "/" + c.model, tmp / "in.safetensors", tmp / "o.safetensors", ""), &out), 0) << c.expect;
    EXPECT_EQ(out.rfind("verlcpp: error: ", 0), 0u) << out;
    EXPECT_NE(out.find(c.expect), std::string::npos) << out;
    EXPECT_EQ(std::count(out.begin(), out.end(), '\n'), 1) << out;
    EXPECT_FALSE(fs::exists(tmp / "o.safetensors"));
  }
  // Images for a text-only model.
  const std::string text = engine_fixtures() + "/qwen2";
  std::string out;
  EXPECT_NE(run(logprob_cmd(text, fx + "/batch.safetensors", tmp / "o.safetensors", ""), &out), 0);
  EXPECT_NE(out.find("is a text-only model"), std::string::npos) << out;
}

// `verlcpp train` (SFT, 3 steps of 4 sequences, micro-batches of 1) of a vision-language model
// over 2 data-parallel ranks, over 2 sequence-parallel ranks and in one process: the merged checkpoint loads in transformers and equals
// transformers + torch AdamW trained on the same batches (tests/oracle/vlm_train_ref.py).
void sft_matches_torch(const std::string& family, const std::string& extra, const std::string& ref_args) {
  TempDir tmp;
  const fs::path dir = tmp.path;
  const std::string oracle = python() + " " + source_dir() + "/tests/oracle/vlm_train_ref.py";
  std::string log;
  ASSERT_EQ(run(oracle + " make --out " + q(dir) + " --family " + family, &log), 0) << log;
  ASSERT_EQ(run(oracle + " ref --out " + q(dir) + " --steps 3 --bs 4 --lr 1e-3 " + ref_args, &log), 0) << log;
  // 2 data-parallel ranks (and with the decoder layers recomputed in backward); 2 ranks of one
  // Ulysses group (sp = 2); one process.
  const std::pair<int, std::string> runs[] = {
      {2, ""}, {2, "enable_gradient_checkpointing=true"}, {2, "ulysses_sequence_parallel_size=2"}, {0, ""}};
  int k = 0;
  for (const auto& [np, sp] : runs) {
    SCOPED_TRACE(family + " np " + std::to_string(np) + " " + sp + " " + extra);
    const fs::path ck = dir / ("ck" + std::to_string(k)), merged = dir / ("merged" + std::to_string(k));
    ++k;
    ASSERT_EQ(run("(cd " + q(dir) + " && " + (np ? mpirun(np) : std::string()) + verlcpp_bin() +
                      " train path=model train_files=data.safetensors train_batch_size=4 total_training_steps=3 "
                      "shuffle=false lr=1e-3 micro_batch_size_per_gpu=1 default_local_dir=" + q(ck) + " " + sp + " " +
                      extra + ")",
                  &log),
              0)
        << log;
    ASSERT_EQ(run(verlcpp_bin() + " merge -q --backend fsdp --dtype fp32 --overwrite --local_dir " +
                      q(ck / "global_step_3" / "actor") + " --target_dir " + q(merged),
                  &log),
              0)
        << log;
    EXPECT_EQ(run(oracle + " check --merged " + q(merged) + " --ref " + q(dir / "ref_3") + " --rtol 3e-5", &log), 0) << log;
    std::printf("[ %s np %d %s %s: %s ]\n", family.c_str(), np, sp.c_str(), extra.c_str(), log.c_str());
  }
}

TEST(VisionLanguage, SftOverTwoRanksMatchesOneProcessAndTorch) { sft_matches_torch("qwen2_5_vl", "", ""); }

TEST(VisionLanguage, SftWithFrozenVisionTowerMatchesTorch) {
  sft_matches_torch("qwen2_vl", "freeze_vision_tower=true", "--freeze-vision");
}

}  // namespace
}  // namespace verl::test
