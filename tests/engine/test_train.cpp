// test_train.cpp — `verlcpp train` end to end over 1, 2 and 4 MPI ranks: the parameters after
// k steps (merged from the sharded checkpoint with `verlcpp merge`) against an independent
// reference trained with transformers + torch.optim.AdamW (+ verl's PPO loss) on one process
// (tests/oracle/train_ref.py); fixed and dynamic micro-batching, gradient checkpointing,
// hybrid sharding, Ulysses sequence parallelism, an MoE model with its load-balancing loss; exact resume; a kill -9 during saving leaves a loadable checkpoint; bad
// configuration gives one clear line.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <thread>

#include "engine_test_util.h"

namespace fs = std::filesystem;

namespace verl::test {
namespace {

fs::path g_dir;

class Train : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (!g_dir.empty()) return;
    g_dir = fs::temp_directory_path() / ("verlcpp_train_" + std::to_string(::getpid()));
    fs::remove_all(g_dir);
    std::string log;
    ASSERT_EQ(run(train_oracle() + " make --out " + q(g_dir) + " --seqs 16", &log), 0) << log;
    ASSERT_EQ(run(train_oracle() + " ref --out " + q(g_dir) + " --task sft --steps 3 --bs 8", &log), 0) << log;
    ASSERT_EQ(run(train_oracle() + " ref --out " + q(g_dir) + " --task ppo --steps 3 --bs 8", &log), 0) << log;
    ASSERT_EQ(run(train_oracle() + " ref --out " + q(g_dir) + " --task value --steps 3 --bs 8", &log), 0) << log;
  }
  static void TearDownTestSuite() {
    if (!std::getenv("VERLCPP_KEEP_TMP")) fs::remove_all(g_dir);
    g_dir.clear();
  }
  // Trains into <g_dir>/<name>/ck; returns the command's status.
  int train(const std::string& name, int np, const std::string& extra, std::string* log) {
    const fs::path d = g_dir / name;
    return run("cd " + q(g_dir) + " && " + (np > 0 ? mpirun(np) : std::string()) + verlcpp_bin() +
                   " train path=model train_files=data.safetensors train_batch_size=8 total_training_steps=3 lr=1e-3 "
                   "shuffle=false resume_mode=auto default_local_dir=" +
                   q(d / "ck") + " " + extra,
               log);
  }
  int merge(const std::string& name, int step, std::string* log, const std::string& role = "actor") {
    const fs::path d = g_dir / name;
    return run(verlcpp_bin() + " merge -q --backend fsdp --dtype fp32 --overwrite --local_dir " +
                   q(d / "ck" / ("global_step_" + std::to_string(step)) / role) + " --target_dir " + q(d / "merged"),
               log);
  }
  void check(const std::string& name, const std::string& ref, const std::string& extra = "",
             const std::string& role = "actor") {
    std::string log;
    ASSERT_EQ(merge(name, 3, &log, role), 0) << log;
    EXPECT_EQ(run(train_oracle() + " check --merged " + q(g_dir / name / "merged") + " --ref " + q(g_dir / ref) + " " + extra,
                  &log),
              0)
        << log;
  }
};

TEST_F(Train, SftMatchesTorchOnOneTwoFourRanks) {
  for (int np : {0, 2, 4}) {
    SCOPED_TRACE(np);
    const std::string name = "sft_np" + std::to_string(np);
    std::string log;
    ASSERT_EQ(train(name, np, "micro_batch_size_per_gpu=3", &log), 0) << log;
    EXPECT_NE(log.find("step 3/3"), std::string::npos) << log;
    check(name, "ref_sft_3.safetensors");
  }
}

TEST_F(Train, DynamicBatchingAndGradientCheckpointingMatch) {
  std::string log;
  ASSERT_EQ(train("sft_dyn_gc", 2, "use_dynamic_bsz=true max_token_len_per_gpu=48 enable_gradient_checkpointing=true", &log), 0)
      << log;
  check("sft_dyn_gc", "ref_sft_3.safetensors");
  ASSERT_EQ(train("sft_hybrid", 4, "fsdp_size=2 micro_batch_size_per_gpu=1", &log), 0) << log;
  check("sft_hybrid", "ref_sft_3.safetensors");
}

TEST_F(Train, UlyssesSequenceParallelMatchesTorch) {
  // sp = 2 over 2 ranks; sp = 2 × dp = 2 over 4 ranks with dynamic batching whose budget is
  // max_token_len_per_gpu × sp (24 × 2: sequences of up to 40 tokens fit only through the × sp)
  // and gradient checkpointing; the critic at sp = 2. verl's key paths.
  std::string log;
  ASSERT_EQ(train("sft_sp2", 2, "ulysses_sequence_parallel_size=2 micro_batch_size_per_gpu=3", &log), 0) << log;
  EXPECT_NE(log.find("sequence parallel 2"), std::string::npos) << log;
  check("sft_sp2", "ref_sft_3.safetensors");
  ASSERT_EQ(train("sft_sp2_dp2", 4,
                  "actor_rollout_ref.actor.ulysses_sequence_parallel_size=2 use_dynamic_bsz=true max_token_len_per_gpu=24 "
                  "enable_gradient_checkpointing=true",
                  &log),
            0)
      << log;
  check("sft_sp2_dp2", "ref_sft_3.safetensors");
  ASSERT_EQ(train("value_sp2", 2,
                  "task=value path=value_model cliprange_value=0.5 micro_batch_size_per_gpu=2 "
                  "critic.ulysses_sequence_parallel_size=2",
                  &log),
            0)
      << log;
  check("value_sp2", "ref_value_3.safetensors", "--rtol 1e-4", "critic");
}

TEST_F(Train, MoeSftWithLoadBalancingLossMatchesTransformers) {
  // Qwen2-MoE (shared expert, a dense layer, output_router_logits with router_aux_loss_coef
  // 0.2): the SFT loss + transformers' load-balancing loss of each micro-batch (a forward),
  // weighted by its tokens. One micro-batch on one rank; two ranks × one micro-batch with
  // gradient checkpointing (the recomputed forward must not count twice); two ranks × two.
  // Parameters within 1e-4 (measured ≤ 3.5e-5; the losses agree to 7 digits): the dense cases'
  // 1e-5 is crossed by AdamW turning ~1e-7 gradient differences of the routers into steps. A
  // reference with the wrong grouping (one aux over the batch instead of four) differs by 0.76.
  std::string log;
  const fs::path fx = g_dir / "moe_fx";
  ASSERT_EQ(run(train_oracle() + " make --family qwen2_moe --out " + q(fx) + " --seqs 16", &log), 0) << log;
  struct Case {
    std::string name;
    int np, groups;
    std::string extra;
  };
  const Case cases[] = {{"moe_np0", 0, 1, "micro_batch_size_per_gpu=8"},
                        {"moe_np2_gc", 2, 2, "micro_batch_size_per_gpu=4 enable_gradient_checkpointing=true"},
                        {"moe_np2_mb2", 2, 4, "micro_batch_size_per_gpu=2"},
                        // Expert parallelism: the experts split over the two ranks; the merged
                        // checkpoint has every expert under its HF name and loads in transformers.
                        {"moe_np2_ep2", 2, 2, "micro_batch_size_per_gpu=4 expert_parallel_size=2"}};
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    const fs::path d = g_dir / c.name;
    fs::create_directories(d);
    fs::copy(fx, d / "fx", fs::copy_options::recursive);
    ASSERT_EQ(run(train_oracle() + " ref --out " + q(d / "fx") + " --task sft --steps 3 --bs 8 --aux-groups " +
                      std::to_string(c.groups),
                  &log),
              0)
        << log;
    ASSERT_EQ(run("cd " + q(d) + " && " + (c.np > 0 ? mpirun(c.np) : std::string()) + verlcpp_bin() +
                      " train path=fx/model train_files=fx/data.safetensors train_batch_size=8 total_training_steps=3 "
                      "lr=1e-3 shuffle=false default_local_dir=" + q(d / "ck") + " " + c.extra,
                  &log),
              0)
        << log;
    EXPECT_NE(log.find("moe_aux_loss"), std::string::npos) << log;
    ASSERT_EQ(merge(c.name, 3, &log), 0) << log;
    EXPECT_EQ(run(train_oracle() + " check --merged " + q(d / "merged") + " --ref " +
                      q(d / "fx" / "ref_sft_3.safetensors") + " --rtol 1e-4 --load",
                  &log),
              0)
        << log;
  }
}

TEST_F(Train, PpoMatchesVerlsPolicyLoss) {
  std::string log;
  ASSERT_EQ(train("ppo", 2, "task=ppo clip_ratio=0.2 micro_batch_size_per_gpu=2", &log), 0) << log;
  check("ppo", "ref_ppo_3.safetensors");
}

TEST_F(Train, ValueModelMatchesVerlsValueLoss) {
  std::string log;
  ASSERT_EQ(train("value", 2, "task=value path=value_model cliprange_value=0.5 micro_batch_size_per_gpu=2", &log), 0) << log;
  // Losses agree to 7 digits; a one-output head gives many near-zero gradient entries, which
  // AdamW scales up to lr-sized steps, so parameters are compared at 1e-4.
  check("value", "ref_value_3.safetensors", "--rtol 1e-4", "critic");
}

TEST_F(Train, Bf16MixedPrecisionStaysClose) {
  // bf16 compute, fp32 master weights and gradient reduction. Documented tolerance: every
  // step's loss within 1e-3 (relative) of the fp32 reference, and the parameter update within
  // 15% of the reference update (||θ − θ_ref|| / ||θ_ref − θ_0||). Per-element comparisons
  // are meaningless here: AdamW moves every weight by ~lr whatever its gradient's size.
  std::string log;
  ASSERT_EQ(train("bf16", 2, "param_dtype=bf16 micro_batch_size_per_gpu=4", &log), 0) << log;
  check("bf16", "ref_sft_3.safetensors",
        "--update-rtol 0.15 --loss-rtol 1e-3 --init " + q(g_dir / "model") + " --metrics " +
            q(g_dir / "bf16" / "ck" / "metrics.jsonl"));
}

TEST_F(Train, ResumeIsBitExact) {
  std::string log;
  ASSERT_EQ(train("straight", 2, "total_training_steps=4 micro_batch_size_per_gpu=3", &log), 0) << log;
  ASSERT_EQ(train("resumed", 2, "total_training_steps=4 micro_batch_size_per_gpu=3 stop_after_steps=2", &log), 0) << log;
  EXPECT_EQ(log.find("step 3/4"), std::string::npos) << "should have stopped after 2 steps: " << log;
  ASSERT_EQ(train("resumed", 2, "total_training_steps=4 micro_batch_size_per_gpu=3", &log), 0) << log;
  EXPECT_NE(log.find("resumed from"), std::string::npos) << log;
  EXPECT_EQ(log.find("step 2/4"), std::string::npos) << "resume must start at step 3: " << log;
  ASSERT_EQ(merge("straight", 4, &log), 0) << log;
  ASSERT_EQ(merge("resumed", 4, &log), 0) << log;
  EXPECT_EQ(run(train_oracle() + " check --exact --merged " + q(g_dir / "resumed" / "merged") + " --ref " +
                    q(g_dir / "straight" / "merged" / "model.safetensors"),
                &log),
            0)
      << log;
}

TEST_F(Train, KillDuringSaveLeavesALoadableCheckpoint) {
  // Save every step, kill -9 the whole job at several moments; the checkpoint named by
  // latest_checkpointed_iteration.txt must always merge and resume.
  for (int delay_ms : {1500, 2300, 3100}) {
    SCOPED_TRACE(delay_ms);
    const std::string name = "kill" + std::to_string(delay_ms);
    const fs::path d = g_dir / name;
    const std::string cmd = "cd " + q(g_dir) + " && exec " + mpirun(2) + verlcpp_bin() +
                            " train path=model train_files=data.safetensors train_batch_size=8 total_training_steps=400 "
                            "lr=1e-4 shuffle=false save_freq=1 resume_mode=auto default_local_dir=" +
                            q(d / "ck") + " >/dev/null 2>&1";
    pid_t pid = ::fork();
    if (pid == 0) {
      ::setpgid(0, 0);
      ::execl("/bin/sh", "sh", "-c", cmd.c_str(), static_cast<char*>(nullptr));
      ::_exit(127);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms));
    ::kill(-pid, SIGKILL);
    int status = 0;
    ::waitpid(pid, &status, 0);
    run("pkill -9 -f " + q((d / "ck").string()) + " 2>/dev/null; sleep 0.2");  // ranks outside the group
    const fs::path latest = d / "ck" / "latest_checkpointed_iteration.txt";
    if (!fs::exists(latest)) continue;  // killed before the first save: nothing to check
    const int step = std::stoi(read_text_file(latest.string()));
    std::string log;
    EXPECT_EQ(run(verlcpp_bin() + " merge -q --backend fsdp --dtype fp32 --local_dir " +
                      q(d / "ck" / ("global_step_" + std::to_string(step)) / "actor") + " --target_dir " + q(d / "m"),
                  &log),
              0)
        << log;
    EXPECT_EQ(run("cd " + q(g_dir) + " && " + mpirun(2) + verlcpp_bin() +
                      " train path=model train_files=data.safetensors train_batch_size=8 lr=1e-4 shuffle=false "
                      "resume_mode=auto total_training_steps=" +
                      std::to_string(step + 1) + " default_local_dir=" + q(d / "ck"),
                  &log),
              0)
        << log;
    EXPECT_NE(log.find("resumed from"), std::string::npos) << log;
  }
}

TEST_F(Train, BadConfigIsOneClearLine) {
  std::string log;
  EXPECT_NE(train("bad1", 0, "no_such_key=1", &log), 0);
  EXPECT_NE(log.find("unknown config key 'no_such_key'"), std::string::npos) << log;
  EXPECT_NE(train("bad2", 0, "loss_agg_mode=token-median", &log), 0);
  EXPECT_NE(log.find("token-median"), std::string::npos) << log;
  EXPECT_NE(train("bad3", 0, "train_files=/nonexistent.safetensors", &log), 0);
  EXPECT_NE(log.find("/nonexistent.safetensors"), std::string::npos) << log;
  EXPECT_NE(train("bad4", 2, "train_batch_size=7", &log), 0);
  EXPECT_NE(log.find("multiple"), std::string::npos) << log;
}

}  // namespace
}  // namespace verl::test
