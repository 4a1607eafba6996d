// test_train_cli.cpp — `verlcpp train` refuses settings and data that would train a wrong
// model, before the first step: each case gives one line on stderr, a non-zero exit and
// writes nothing (issue 8's "tried as a new user" list). Also: verl's key scoping (the actor's
// and the critic's optim.lr are different settings: the lr the run used is read back from
// metrics.jsonl), grad_clip 0 = no clipping (against a torch reference trained without
// clipping), NaN at masked positions zeroed with a warning (the update equals the clean
// data's), checkpoint files torch.load can read with weights_only=True, a rank file copied
// over another, a garbage latest_checkpointed_iteration.txt, and a save on a full disk (a
// small tmpfs: nothing left behind, the previous checkpoint still loads).
#include <gtest/gtest.h>
#include <sys/mount.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <sstream>

#include "engine_test_util.h"

namespace fs = std::filesystem;

namespace verl::test {
namespace {

fs::path g_dir;
using Tensors = std::map<std::string, at::Tensor>;

struct Cli {
  int rc = -1;
  std::string out, err;
};

std::vector<std::string> lines_of(const std::string& s) {
  std::vector<std::string> v;
  std::istringstream is(s);
  for (std::string l; std::getline(is, l);)
    if (!l.empty()) v.push_back(l);
  return v;
}
// The lines verlcpp itself printed (mpirun adds its own banner around them).
std::vector<std::string> verlcpp_lines(const std::string& s) {
  std::vector<std::string> v;
  for (const auto& l : lines_of(s))
    if (l.rfind("verlcpp: ", 0) == 0) v.push_back(l);
  return v;
}

// The step records of a metrics.jsonl.
std::vector<nlohmann::json> steps_of(const fs::path& metrics) {
  std::vector<nlohmann::json> v;
  std::ifstream f(metrics);
  for (std::string l; std::getline(f, l);)
    if (!l.empty() && l.find("\"step\"") != std::string::npos) v.push_back(nlohmann::json::parse(l));
  return v;
}

class TrainCli : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (!g_dir.empty()) return;
    g_dir = fs::temp_directory_path() / ("verlcpp_train_cli_" + std::to_string(::getpid()));
    fs::remove_all(g_dir);
    std::string log;
    ASSERT_EQ(run(train_oracle() + " make --out " + q(g_dir) + " --seqs 16", &log), 0) << log;
  }
  static void TearDownTestSuite() {
    if (!std::getenv("VERLCPP_KEEP_TMP")) fs::remove_all(g_dir);
    g_dir.clear();
  }
  // `verlcpp train` in g_dir with the base settings (checkpoints in <g_dir>/<name>/ck), stderr apart.
  static Cli train(const std::string& name, int np, const std::string& extra) {
    static int n = 0;
    const fs::path err = g_dir / ("stderr_" + std::to_string(++n));
    Cli c;
    c.rc = run("(cd " + q(g_dir) + " && " + (np > 0 ? mpirun(np) : std::string()) + verlcpp_bin() +
                   " train path=model train_files=data.safetensors train_batch_size=8 total_training_steps=3 "
                   "shuffle=false default_local_dir=" + q(g_dir / name / "ck") + " " + extra + " 2>" + q(err) + ")",
               &c.out);
    c.err = read_text_file(err.string());
    return c;
  }
  // A refused run: non-zero exit, one line naming what is wrong (the same line from every
  // rank under mpirun), nothing on stdout, and nothing written.
  static void expect_refused(const std::string& name, const std::string& extra, const std::vector<std::string>& want,
                             int np = 0) {
    SCOPED_TRACE(name + ": " + extra);
    const Cli c = train(name, np, extra);
    EXPECT_NE(c.rc, 0) << c.out << c.err;
    const auto ours = verlcpp_lines(c.err);
    ASSERT_FALSE(ours.empty()) << c.err;
    for (const auto& l : ours) EXPECT_EQ(l, ours[0]) << c.err;
    if (np == 0) {
      EXPECT_EQ(lines_of(c.err).size(), 1u) << c.err;
      EXPECT_EQ(c.out, "");
    }
    EXPECT_EQ(ours[0].rfind("verlcpp: error: ", 0), 0u) << ours[0];
    for (const auto& w : want) EXPECT_NE(ours[0].find(w), std::string::npos) << "expected '" << w << "' in: " << ours[0];
    EXPECT_FALSE(fs::exists(g_dir / name)) << "a refused run wrote " << (g_dir / name);
  }
  // <g_dir>/<name>.safetensors: the fixture's data with `edit` applied.
  static std::string data_variant(const std::string& name, const std::function<void(Tensors&)>& edit) {
    auto d = load_st((g_dir / "data.safetensors").string());
    edit(d);
    save_st((g_dir / (name + ".safetensors")).string(), d);
    return "train_files=" + name + ".safetensors";
  }
  // <g_dir>/<name>/ref_sft_3.safetensors: train_ref.py's SFT reference (3 steps, batch 8) on
  // the fixture's model and data with `args`.
  static fs::path reference(const std::string& name, const std::string& args) {
    const fs::path ref = g_dir / name;
    fs::create_directories(ref);
    fs::create_symlink(g_dir / "model", ref / "model");
    fs::create_symlink(g_dir / "data.safetensors", ref / "data.safetensors");
    std::string log;
    EXPECT_EQ(run(train_oracle() + " ref --out " + q(ref) + " --task sft --steps 3 --bs 8 " + args, &log), 0) << log;
    return ref;
  }
  static int merge(const fs::path& role_dir, const fs::path& out, std::string* log) {
    return run(verlcpp_bin() + " merge -q --backend fsdp --dtype fp32 --overwrite --local_dir " + q(role_dir) +
                   " --target_dir " + q(out),
               log);
  }
};

TEST_F(TrainCli, ActorAndCriticOptimLrAreDifferentSettings) {
  const fs::path yaml = g_dir / "scoped.yaml";
  {
    std::ofstream o(yaml);
    o << "actor_rollout_ref:\n  actor:\n    optim:\n      lr: 1e-6\ncritic:\n  optim:\n    lr: 1e-5\n";
  }
  const std::string cfg = "--config " + q(yaml) + " total_training_steps=1";
  auto lr_used = [&](const std::string& name, const std::string& extra) {
    const Cli c = train(name, 0, cfg + " " + extra);
    EXPECT_EQ(c.rc, 0) << c.out << c.err;
    auto s = steps_of(g_dir / name / "ck" / "metrics.jsonl");
    return s.empty() ? -1.0 : s[0]["lr"].get<double>();
  };
  EXPECT_DOUBLE_EQ(lr_used("scoped_sft", "task=sft"), 1e-6);
  EXPECT_DOUBLE_EQ(lr_used("scoped_value", "task=value path=value_model"), 1e-5);
  // A bare key after the file sets the trained model's (the later wins).
  EXPECT_DOUBLE_EQ(lr_used("scoped_bare", "task=sft lr=3e-6"), 3e-6);
  // The critic's section never touches the actor.
  EXPECT_DOUBLE_EQ(lr_used("scoped_critic_override", "task=sft critic.optim.lr=1e-2"), 1e-6);
}

TEST_F(TrainCli, GradClipNegativeIsRefused) {
  expect_refused("gc_neg", "grad_clip=-1", {"grad_clip", ">= 0", "-1"});
  expect_refused("gc_neg2", "actor_rollout_ref.actor.grad_clip=-0.5", {"actor_rollout_ref.actor.grad_clip", "-0.5"});
}

TEST_F(TrainCli, GradClipZeroMeansNoClipping) {
  // References: transformers + torch AdamW without clipping (max_norm=inf is the identity) and
  // with the default clip 1.0; this data's gradient norms are above 1, so the two differ.
  const fs::path ref = reference("noclip_ref", "--grad-clip inf");
  std::string log;
  ASSERT_EQ(run(train_oracle() + " ref --out " + q(g_dir) + " --task sft --steps 3 --bs 8 --grad-clip 1", &log), 0) << log;
  const Cli c = train("gc_zero", 0, "grad_clip=0 lr=1e-3 micro_batch_size_per_gpu=3");
  ASSERT_EQ(c.rc, 0) << c.out << c.err;
  const auto steps = steps_of(g_dir / "gc_zero" / "ck" / "metrics.jsonl");
  ASSERT_EQ(steps.size(), 3u);
  EXPECT_GT(steps[0]["grad_norm"].get<double>(), 1.0);  // the same first step as the clipped run's
  ASSERT_EQ(merge(g_dir / "gc_zero" / "ck" / "global_step_3" / "actor", g_dir / "gc_zero" / "merged", &log), 0) << log;
  const std::string check = train_oracle() + " check --merged " + q(g_dir / "gc_zero" / "merged") + " --ref ";
  EXPECT_EQ(run(check + q(ref / "ref_sft_3.safetensors"), &log), 0) << log;
  EXPECT_NE(run(check + q(g_dir / "ref_sft_3.safetensors"), &log), 0) << "clipping at 1 should differ here: " << log;
}

TEST_F(TrainCli, MicroBatchSizeZeroIsRefused) {
  expect_refused("mbs0", "micro_batch_size_per_gpu=0", {"micro_batch_size_per_gpu", ">= 1", "0"});
  expect_refused("mbs0b", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=0", {"ppo_micro_batch_size_per_gpu"});
}

TEST_F(TrainCli, FsdpSizeMustDivideTheWorld) {
  expect_refused("fsdp3", "fsdp_size=3", {"fsdp_size = 3", "divisor", "2 ranks"}, 2);
  expect_refused("fsdp0", "actor_rollout_ref.actor.fsdp_config.fsdp_size=0", {"fsdp_config.fsdp_size", "-1 or >= 1"});
}

TEST_F(TrainCli, UlyssesSizeMustDivideTheWorldAndTheHeads) {
  expect_refused("sp3", "ulysses_sequence_parallel_size=3", {"ulysses_sequence_parallel_size = 3", "divide the world size (2 ranks)"}, 2);
  // 4 attention heads
  expect_refused("sp3h", "actor_rollout_ref.actor.fsdp_config.ulysses_sequence_parallel_size=3",
                 {"ulysses_sequence_parallel_size = 3", "num_attention_heads (4) must be divisible by it"}, 3);
  expect_refused("sp0", "ulysses_sequence_parallel_size=0", {"ulysses_sequence_parallel_size", "0"});
}

TEST_F(TrainCli, VeOmniEngineFields) {
  // Accepted where they apply; cuda / a wrong name / a contradiction is one line.
  expect_refused("init_cuda", "init_device=cuda", {"init_device", "cuda", "meta|cpu"});
  expect_refused("moe_impl", "moe_implementation=triton", {"moe_implementation", "triton"});
  expect_refused("attn_impl", "attn_implementation=native-sparse", {"attn_implementation", "native-sparse"});
  expect_refused("full_shard", "enable_full_shard=false fsdp_size=2", {"enable_full_shard", "fsdp_size 2"}, 2);
  expect_refused("ep_dense", "expert_parallel_size=2", {"expert_parallel_size = 2", "has no experts"}, 2);
  expect_refused("ep3", "expert_parallel_size=3", {"expert_parallel_size = 3", "divide the world size"}, 2);
  // basic_modules: a class inside the decoder layer (or any other than the layer's) would be a unit this
  // engine does not make; the message names it and the layer class (the fixture is a Qwen2)
  expect_refused("basic_mlp", "basic_modules=[Qwen2MLP]", {"basic_modules", "'Qwen2MLP'", "Qwen2DecoderLayer"});
  expect_refused("basic_two", "actor_rollout_ref.actor.fsdp_config.basic_modules=Qwen2DecoderLayer,Qwen2Attention",
                 {"'Qwen2Attention'"});
}

TEST_F(TrainCli, DeviceIsCheckedBeforeAnyWork) {
  expect_refused("dev_tpu", "device=tpu", {"device", "tpu", "cpu, cuda or cuda:N"});
  expect_refused("dev_alias", "trainer.device=cuda:x", {"trainer.device", "cuda:x"});
  // No GPU on this machine (skipped where one is visible): the engine's device is not there.
  const char* cuda_env = std::getenv("CUDA_VISIBLE_DEVICES");
  if (!fs::exists("/dev/nvidia0") || (cuda_env && std::string(cuda_env).empty()))
    expect_refused("dev_cuda", "device=cuda", {"device 'cuda'", "no CUDA device is available"});
}

TEST_F(TrainCli, EnableFullShardFalseIsDdpAndMatchesTorch) {
  // Whole replicas on 2 ranks (gradients averaged), VeOmni's other fields set (basic_modules naming
  // transformers' Qwen2 _no_split_modules, already the unit): transformers + torch AdamW's
  // parameters, as with sharding.
  const fs::path ref = reference("ddp_ref", "");
  std::string log;
  const Cli c = train("ddp", 2,
                      "lr=1e-3 enable_full_shard=false init_device=meta enable_reentrant=false moe_implementation=eager "
                      "attn_implementation=flash_attention_2 enable_fsdp_offload=true micro_batch_size_per_gpu=2 "
                      "basic_modules=[Qwen2DecoderLayer]");
  ASSERT_EQ(c.rc, 0) << c.out << c.err;
  const fs::path role = g_dir / "ddp" / "ck" / "global_step_3" / "actor";
  EXPECT_NE(read_text_file((role / "fsdp_config.json").string()).find("\"fsdp_size\": 1"), std::string::npos);
  ASSERT_EQ(merge(role, g_dir / "ddp" / "merged", &log), 0) << log;
  EXPECT_EQ(run(train_oracle() + " check --merged " + q(g_dir / "ddp" / "merged") + " --ref " +
                    q(ref / "ref_sft_3.safetensors"),
                &log),
            0)
      << log;
}

TEST_F(TrainCli, Fp16IsRefused) {
  expect_refused("fp16", "param_dtype=fp16", {"param_dtype", "fp16 is not implemented"});
  expect_refused("fp16b", "actor_rollout_ref.actor.fsdp_config.dtype=float16", {"float16 is not implemented"});
  expect_refused("dtype_x", "param_dtype=fp8", {"param_dtype", "fp8"});
}

TEST_F(TrainCli, IllTypedAndOutOfRangeValuesAreRefused) {
  expect_refused("t1", "lr=fast", {"config key lr", "'fast'"});
  expect_refused("t2", "train_batch_size=2.5", {"train_batch_size", "integer", "2.5"});
  expect_refused("t3", "use_dynamic_bsz=maybe", {"use_dynamic_bsz", "true or false"});
  expect_refused("t4", "betas=0.9", {"betas", "two numbers"});
  expect_refused("t5", "optim.betas=[0.9,1.0]", {"optim.betas", "[0, 1)", "1.0"});
  expect_refused("t6", "lr=nan", {"lr", "'nan'"});
  expect_refused("t7", "total_training_steps=0", {"total_training_steps", ">= 1"});
  expect_refused("t8", "lr_scheduler_type=exp", {"lr_scheduler_type", "constant|cosine|linear"});
  expect_refused("t9", "clip_ratio_c=1", {"clip_ratio_c", "> 1"});
  expect_refused("t10", "lr_warmup_steps_ratio=1.5", {"lr_warmup_steps_ratio", "[0, 1]"});
  expect_refused("t11", "task=dpo", {"task", "'dpo'", "sft, ppo, value"});
  expect_refused("t12", "loss_agg_mode=token-median", {"loss_agg_mode", "token-median"});
  const fs::path yaml = g_dir / "typed.yaml";
  {
    std::ofstream o(yaml);
    o << "critic:\n  optim:\n    weight_decay: lots\n";
  }
  expect_refused("t13", "--config " + q(yaml), {"critic.optim.weight_decay", yaml.string(), "'lots'"});
}

TEST_F(TrainCli, UnknownAndMisScopedKeysAreRefused) {
  expect_refused("k1", "no_such_key=1", {"unknown config key 'no_such_key'"});
  expect_refused("k2", "critic.clip_ratio=0.1", {"unknown config key 'critic.clip_ratio'", "actor_rollout_ref.actor.clip_ratio"});
  expect_refused("k3", "actor_rollout_ref.actor.cliprange_value=0.1", {"unknown config key", "critic.cliprange_value"});
  expect_refused("k4", "actor_rollout_ref.actor.optim.lrr=0.1", {"unknown config key 'actor_rollout_ref.actor.optim.lrr'"});
}

TEST_F(TrainCli, NanAtMaskedPositionsIsZeroedWithAWarning) {
  int64_t nan_count = 0;
  const std::string nan_data = data_variant("data_nan_masked", [&](Tensors& d) {
    at::Tensor masked = d.at("loss_mask") == 0;
    at::Tensor cu = d.at("cu_seqlens");
    for (int64_t i = 1; i < cu.numel(); ++i) masked[cu[i].item<int64_t>() - 1] = true;  // never trained
    nan_count = masked.sum().item<int64_t>();
    d.at("advantages").masked_fill_(masked, NAN);
  });
  const std::string ppo = "task=ppo total_training_steps=1 micro_batch_size_per_gpu=4 ";
  const Cli clean = train("nan_clean", 0, ppo);
  ASSERT_EQ(clean.rc, 0) << clean.out << clean.err;
  const Cli c = train("nan_masked", 0, ppo + nan_data);
  ASSERT_EQ(c.rc, 0) << c.out << c.err;
  const auto err = lines_of(c.err);
  ASSERT_EQ(err.size(), 1u) << c.err;
  EXPECT_EQ(err[0].rfind("verlcpp: warning: ", 0), 0u) << err[0];
  EXPECT_NE(err[0].find("'advantages': " + std::to_string(nan_count) + " non-finite"), std::string::npos) << err[0];
  EXPECT_NE(err[0].find("in 16 sequence(s) set to 0"), std::string::npos) << err[0];
  // Masked positions do not count: the update is the clean data's, not a skipped one.
  const auto a = steps_of(g_dir / "nan_clean" / "ck" / "metrics.jsonl"), b = steps_of(g_dir / "nan_masked" / "ck" / "metrics.jsonl");
  ASSERT_EQ(a.size(), 1u);
  ASSERT_EQ(b.size(), 1u);
  for (const char* k : {"loss", "grad_norm", "actor/pg_clipfrac", "actor/ppo_kl"}) EXPECT_EQ(a[0][k], b[0][k]) << k;
  EXPECT_TRUE(std::isfinite(b[0]["grad_norm"].get<double>()));
}

TEST_F(TrainCli, NanAtTrainedPositionsIsRefused) {
  int64_t pos = -1;
  const std::string one = data_variant("data_nan_trained", [&](Tensors& d) {
    const int64_t start = d.at("cu_seqlens")[3].item<int64_t>();
    at::Tensor m = d.at("loss_mask");
    for (pos = start; m[pos].item<float>() == 0; ++pos) {}
    d.at("advantages")[pos] = NAN;
  });
  const auto cu = load_st((g_dir / "data.safetensors").string()).at("cu_seqlens");
  expect_refused("nan_trained", "task=ppo " + one,
                 {"'advantages' has 1 non-finite", "trained positions", "sequence 3, position " +
                                                                            std::to_string(pos - cu[3].item<int64_t>())});
  const std::string all = data_variant("data_all_nan", [](Tensors& d) { d.at("old_log_probs").fill_(NAN); });
  expect_refused("all_nan", "task=ppo " + all, {"'old_log_probs' has", "non-finite value(s) (NaN or inf) at trained"});
  const std::string ret = data_variant("data_inf_returns", [&](Tensors& d) { d.at("returns")[pos] = INFINITY; });
  expect_refused("inf_returns", "task=value path=value_model " + ret, {"'returns' has 1 non-finite"});
}

TEST_F(TrainCli, AllZeroLossMaskIsRefused) {
  const std::string zero = data_variant("data_zero_mask", [](Tensors& d) { d.at("loss_mask").zero_(); });
  expect_refused("zero_mask", zero, {"'loss_mask' is 0 at every position"});
  // Only the last position of each sequence set: it never counts (no next token).
  const std::string last = data_variant("data_last_only", [](Tensors& d) {
    d.at("loss_mask").zero_();
    at::Tensor cu = d.at("cu_seqlens");
    for (int64_t i = 1; i < cu.numel(); ++i) d.at("loss_mask")[cu[i].item<int64_t>() - 1] = 1.0f;
  });
  expect_refused("last_only", last, {"'loss_mask' is 0 at every position"});
  const std::string nan = data_variant("data_nan_mask", [](Tensors& d) { d.at("loss_mask")[9] = NAN; });
  expect_refused("nan_mask", nan, {"'loss_mask' has 1 negative or non-finite"});
}

TEST_F(TrainCli, StepWithoutLossTokenIsRefused) {
  // Without shuffle, step 2 takes sequences 8..15: no loss token there.
  const std::string v = data_variant("data_empty_step", [](Tensors& d) {
    const int64_t from = d.at("cu_seqlens")[8].item<int64_t>();
    d.at("loss_mask").narrow(0, from, d.at("loss_mask").numel() - from).zero_();
  });
  expect_refused("empty_step", v, {"the batch of step 2", "no loss token"});
}

TEST_F(TrainCli, OutOfVocabularyIdIsRefused) {
  const std::string v = data_variant("data_oov", [](Tensors& d) { d.at("input_ids")[d.at("cu_seqlens")[5].item<int64_t>() + 2] = 96; });
  expect_refused("oov", v, {"1 token id(s)", "vocabulary [0, 96)", "first 96 at sequence 5, position 2"});
  const std::string neg = data_variant("data_negative_id", [](Tensors& d) { d.at("input_ids")[0] = -1; });
  expect_refused("neg_id", neg, {"vocabulary", "first -1 at sequence 0, position 0"});
}

TEST_F(TrainCli, RankFilesLoadWithTorchLoadAndACopiedOneIsRefused) {
  const Cli c = train("ranks", 2, "total_training_steps=1");
  ASSERT_EQ(c.rc, 0) << c.out << c.err;
  const fs::path d = g_dir / "ranks" / "ck" / "global_step_1" / "actor";
  // torch.load with its default weights_only=True; every file records {rank, world, step}.
  run_python("import torch\n"
             "for r in range(2):\n"
             "    for k in ('model', 'optim', 'extra_state'):\n"
             "        sd = torch.load('" + d.string() + "/%s_world_size_2_rank_%d.pt' % (k, r))\n"
             "        assert sd['_verlcpp.rank_world_step'].tolist() == [r, 2, 1], (k, r, sd['_verlcpp.rank_world_step'])\n"
             "    assert torch.load('" + d.string() + "/extra_state_world_size_2_rank_%d.pt' % r)['global_step'] == 1\n",
             g_dir.string());
  fs::copy_file(d / "model_world_size_2_rank_0.pt", d / "model_world_size_2_rank_1.pt", fs::copy_options::overwrite_existing);
  const auto before = fs::file_size(g_dir / "ranks" / "ck" / "metrics.jsonl");
  const Cli r = train("ranks", 2, "total_training_steps=2");
  EXPECT_NE(r.rc, 0) << r.out << r.err;
  const auto ours = verlcpp_lines(r.err);
  ASSERT_FALSE(ours.empty()) << r.err;
  EXPECT_NE(ours[0].find("model_world_size_2_rank_1.pt: holds rank 0 of world size 2"), std::string::npos) << ours[0];
  EXPECT_FALSE(fs::exists(g_dir / "ranks" / "ck" / "global_step_2"));
  EXPECT_EQ(fs::file_size(g_dir / "ranks" / "ck" / "metrics.jsonl"), before);
}

TEST_F(TrainCli, GarbageLatestIterationIsRefused) {
  const Cli c = train("latest", 0, "total_training_steps=1");
  ASSERT_EQ(c.rc, 0) << c.out << c.err;
  const fs::path ck = g_dir / "latest" / "ck", latest = ck / "latest_checkpointed_iteration.txt";
  const auto before = fs::file_size(ck / "metrics.jsonl");
  for (const std::string& garbage : {std::string("garbage\n"), std::string(""), std::string("-3"), std::string("1x")}) {
    write_text_file(latest.string(), garbage);
    const Cli r = train("latest", 0, "total_training_steps=2");
    EXPECT_NE(r.rc, 0) << r.out;
    ASSERT_EQ(lines_of(r.err).size(), 1u) << r.err;
    EXPECT_NE(r.err.find(latest.string() + ": expected the number of the last saved step"), std::string::npos) << r.err;
    EXPECT_EQ(r.err.find("stoll"), std::string::npos) << r.err;
  }
  write_text_file(latest.string(), "7\n");
  const Cli r = train("latest", 0, "total_training_steps=2");
  EXPECT_NE(r.rc, 0);
  EXPECT_NE(r.err.find("names step 7 but"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(ck / "global_step_2"));
  EXPECT_EQ(fs::file_size(ck / "metrics.jsonl"), before);
}

// A small disk: a tmpfs (as root), else a file-size limit on the process (ulimit -f).
struct SmallDisk {
  fs::path dir;
  bool mounted = false;
  SmallDisk(const fs::path& d, uint64_t bytes) : dir(d) {
    fs::create_directories(dir);
    const std::string opts = "size=" + std::to_string(bytes);
    mounted = ::mount("tmpfs", dir.c_str(), "tmpfs", 0, opts.c_str()) == 0;
  }
  ~SmallDisk() {
    if (mounted) ::umount2(dir.c_str(), MNT_DETACH);
  }
  // What to prefix the run with when there is no tmpfs: files stop growing at `bytes`.
  std::string limit(uint64_t bytes) const {
    return mounted ? "" : "trap '' XFSZ; ulimit -f " + std::to_string(bytes / 1024) + "; ";
  }
};

TEST_F(TrainCli, SaveOnAFullDiskLeavesNothingBehind) {
  // One checkpoint's disk usage, measured on a normal folder.
  const Cli probe = train("disk_probe", 0, "total_training_steps=1");
  ASSERT_EQ(probe.rc, 0) << probe.out << probe.err;
  uint64_t ckpt = 0, largest = 0;
  for (const auto& e : fs::recursive_directory_iterator(g_dir / "disk_probe" / "ck" / "global_step_1"))
    if (e.is_regular_file()) {
      ckpt += (e.file_size() + 4095) / 4096 * 4096;
      largest = std::max<uint64_t>(largest, e.file_size());
    }
  // Room for one checkpoint and a half: the first save fits, the second does not.
  SmallDisk disk(g_dir / "disk", ckpt * 3 / 2 + 16 * 4096);
  const fs::path ck = disk.dir / "ck";
  const std::string common = "metrics_file=" + q(g_dir / "disk_metrics.jsonl") + " default_local_dir=" + q(ck);
  std::string log;
  ASSERT_EQ(run("cd " + q(g_dir) + " && " + verlcpp_bin() +
                    " train path=model train_files=data.safetensors train_batch_size=8 lr=1e-3 shuffle=false "
                    "total_training_steps=1 " + common, &log), 0) << log;
  const fs::path err = g_dir / "disk_stderr", script = g_dir / "disk_run.sh";
  write_text_file(script.string(), disk.limit(largest / 2) + "cd " + q(g_dir) + " && exec " + verlcpp_bin() +
                                       " train path=model train_files=data.safetensors train_batch_size=8 lr=1e-3 "
                                       "shuffle=false total_training_steps=2 " + common + " 2>" + q(err) + "\n");
  const int rc = run("bash " + q(script), &log);
  const std::string e = read_text_file(err.string());
  EXPECT_NE(rc, 0) << log << e;
  ASSERT_EQ(lines_of(e).size(), 1u) << e;
  EXPECT_NE(e.find(disk.mounted ? "No space left on device" : "File too large"), std::string::npos) << e;
  EXPECT_NE(e.find("global_step_2/actor not saved (nothing of it left behind)"), std::string::npos) << e;
  EXPECT_FALSE(fs::exists(ck / "global_step_2")) << "a partial checkpoint was left behind";
  EXPECT_EQ(read_text_file((ck / "latest_checkpointed_iteration.txt").string()), "1");
  // The previous checkpoint still merges and resumes.
  EXPECT_EQ(merge(ck / "global_step_1" / "actor", g_dir / "disk_merged", &log), 0) << log;
  ASSERT_EQ(run("cd " + q(g_dir) + " && " + verlcpp_bin() +
                    " train path=model train_files=data.safetensors train_batch_size=8 lr=1e-3 shuffle=false "
                    "total_training_steps=1 " + common, &log), 0) << log;
  EXPECT_NE(log.find("resumed from"), std::string::npos) << log;
}

TEST_F(TrainCli, HelpExplainsTheKeys) {
  std::string out;
  ASSERT_EQ(run(verlcpp_bin() + " train --help", &out), 0) << out;
  for (const char* k : {"actor_rollout_ref.actor.KEY", "critic.KEY", "data.train_batch_size", "trainer.total_training_steps",
                        "optim.lr", "grad_clip", "0: no clipping", "fsdp_size", "fp16 is not implemented",
                        "ppo_micro_batch_size_per_gpu", "also: micro_batch_size_per_gpu", "cliprange_value"})
    EXPECT_NE(out.find(k), std::string::npos) << k;
}

}  // namespace
}  // namespace verl::test
