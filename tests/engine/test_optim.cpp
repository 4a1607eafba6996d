// test_optim.cpp — optimizer and LR schedule (src/engine/optim.*) against verl 0.9.1's engine
// code run at test time by tests/oracle/ref_optim.py: FSDPEngine.optimizer_step (torch
// clip_grad_norm_ + torch.optim.AdamW, skip on a non-finite norm) over several steps with the
// engine's LR scheduler, in one process (bit-identical) and sharded over two threads acting as
// ranks with a summing all-reduce (FSDP-style flat shards); state save / load resumes exactly;
// every schedule's lr at every step equals verl's (or transformers' for "linear").
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <condition_variable>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <thread>

#include "engine/optim.h"
#include "engine_test_util.h"
#include "core/error.h"
#include "oracle_tensors.h"

namespace verl::test {
namespace {

using nlohmann::json;

struct Fixture {
  std::map<std::string, at::Tensor> t;
  json cases;
};

const Fixture& fixture() {
  static Fixture f = [] {
    std::string dir = oracle_fixture("ref_optim.py", "0");
    Fixture x;
    x.t = load_oracle_tensors(dir + "/optim.safetensors");
    std::ifstream in(dir + "/cases.json");
    x.cases = json::parse(in);
    return x;
  }();
  return f;
}

at::Tensor T(const json& name) { return fixture().t.at(name.get<std::string>()); }

LrScheduleOptions sched_opts(const json& s, int64_t total) {
  LrScheduleOptions o;
  o.lr_scheduler_type = s.value("lr_scheduler_type", std::string("constant"));
  o.total_training_steps = total;
  o.lr_warmup_steps = s.value("lr_warmup_steps", int64_t(-1));
  o.lr_warmup_steps_ratio = s.value("lr_warmup_steps_ratio", 0.0);
  o.min_lr_ratio = s.value("min_lr_ratio", 0.0);
  o.num_cycles = s.value("num_cycles", 0.5);
  o.zero_indexed_step = s.value("zero_indexed_step", true);
  return o;
}

AdamWOptions adam_opts(const json& c) {
  AdamWOptions o;
  o.lr = c["lr"].get<double>();
  o.beta1 = c["beta1"].get<double>();
  o.beta2 = c["beta2"].get<double>();
  o.eps = c["eps"].get<double>();
  o.weight_decay = c["weight_decay"].get<double>();
  return o;
}

bool same_double(double a, double b) { return (std::isnan(a) && std::isnan(b)) || a == b; }

// One process: every step bit-identical to verl's optimizer_step + lr_scheduler_step, with the
// moments allocated lazily (torch's way) and up front (reserve_state, as the engine does): a
// parameter without a gradient still has no state.
TEST(OptimAdamW, MatchesVerlOptimizerStepExactly) {
  Tally tp, ts;
  int skipped = 0;
  for (const bool reserve : {false, true})
  for (const json& c : fixture().cases.at("adamw")) {
    std::vector<at::Tensor> params;
    for (const auto& n : c["init"]) params.push_back(T(n).clone().requires_grad_(true));
    AdamW opt(params, adam_opts(c));
    if (reserve) {
      opt.reserve_state();
      EXPECT_TRUE(opt.state_dict().empty());
    }
    LrScheduler sched(c["lr"].get<double>(), sched_opts(c["sched"], c["total_training_steps"].get<int64_t>()));
    opt.set_lr(sched.lr());
    int s = 0;
    for (const json& st : c["step"]) {
      SCOPED_TRACE("case lr=" + std::to_string(c["lr"].get<double>()) + " step " + std::to_string(s));
      EXPECT_EQ(opt.lr(), st["lr_used"].get<double>());
      for (size_t j = 0; j < params.size(); ++j) {
        if (st["none"].get<int>() == static_cast<int>(j)) params[j].mutable_grad().reset();
        else params[j].mutable_grad() = T(st["grads"][j]).clone();
      }
      OptimizerStepResult r = optimizer_step(opt, c["clip_grad"].get<double>());
      double want_norm = T(st["grad_norm"]).item<double>();
      EXPECT_TRUE(same_double(r.grad_norm, want_norm)) << r.grad_norm << " vs " << want_norm;
      EXPECT_EQ(r.stepped, std::isfinite(want_norm));
      skipped += !r.stepped;
      for (size_t j = 0; j < params.size(); ++j) {
        ASSERT_TRUE(close(params[j], T(st["params"][j]), &tp, 0, 0)) << "param " << j;  // exact
        EXPECT_EQ(params[j].grad().defined(), st["grads_after"][j].get<bool>()) << "grad of " << j;
      }
      for (size_t j = 0; j < params.size(); ++j) {
        const json* ws = st["state"].contains(std::to_string(j)) ? &st["state"][std::to_string(j)] : nullptr;
        ASSERT_EQ(opt.state()[j].step.defined(), ws != nullptr) << "state of " << j;
        if (!ws) continue;
        ASSERT_TRUE(close(opt.state()[j].exp_avg, T((*ws)["exp_avg"]), &ts, 0, 0));
        ASSERT_TRUE(close(opt.state()[j].exp_avg_sq, T((*ws)["exp_avg_sq"]), &ts, 0, 0));
        EXPECT_EQ(opt.state()[j].step.item<double>(), (*ws)["step"].get<double>());
      }
      EXPECT_EQ(sched.step(), st["new_lr"].get<double>());
      opt.set_lr(sched.lr());
      ++s;
    }
  }
  EXPECT_EQ(skipped, 4);  // the inf and the nan step, twice
  tp.print("adamw params");
  ts.print("adamw state");
}

// A summing all-reduce between threads (each thread plays one rank).
struct ThreadSum {
  explicit ThreadSum(int n) : n_(n) {}
  void operator()(double* x, int64_t count) {
    std::unique_lock<std::mutex> lk(m_);
    if (acc_.empty()) acc_.assign(count, 0.0);
    for (int64_t i = 0; i < count; ++i) acc_[i] += x[i];
    const int gen = gen_;
    if (++arrived_ == n_) {
      result_ = acc_;
      acc_.clear();
      arrived_ = 0;
      ++gen_;
      cv_.notify_all();
    } else {
      cv_.wait(lk, [&] { return gen_ != gen; });
    }
    for (int64_t i = 0; i < count; ++i) x[i] = result_[i];
  }
  int n_, arrived_ = 0, gen_ = 0;
  std::vector<double> acc_, result_;
  std::mutex m_;
  std::condition_variable cv_;
};

// FSDP-style: each parameter flattened, padded to a multiple of the world size, rank r owns
// chunk r. Two ranks step their shards with the global norm from the all-reduce; the
// reassembled parameters equal the single-process torch run (up to the norm's summation order).
TEST(OptimAdamW, ShardedOverTwoRanksMatchesTorch) {
  const int world = 2;
  Tally tp, tn;
  for (const json& c : fixture().cases.at("adamw")) {
    const size_t np = c["init"].size();
    std::vector<std::vector<at::Tensor>> shards(world);
    std::vector<int64_t> chunk(np);
    for (size_t j = 0; j < np; ++j) {
      at::Tensor full = T(c["init"][j]).reshape({-1});
      chunk[j] = (full.numel() + world - 1) / world;
      at::Tensor padded = at::constant_pad_nd(full, {0, chunk[j] * world - full.numel()}, 0);
      for (int r = 0; r < world; ++r)
        shards[r].push_back(padded.slice(0, r * chunk[j], (r + 1) * chunk[j]).clone().requires_grad_(true));
    }
    ThreadSum sum(world);
    std::vector<std::vector<double>> norms(world);
    auto rank_main = [&](int r) {
      AdamW opt(shards[r], adam_opts(c));
      LrScheduler sched(c["lr"].get<double>(), sched_opts(c["sched"], c["total_training_steps"].get<int64_t>()));
      opt.set_lr(sched.lr());
      for (const json& st : c["step"]) {
        for (size_t j = 0; j < np; ++j) {
          if (st["none"].get<int>() == static_cast<int>(j)) {
            shards[r][j].mutable_grad().reset();
            continue;
          }
          at::Tensor g = T(st["grads"][j]).reshape({-1});
          g = at::constant_pad_nd(g, {0, chunk[j] * world - g.numel()}, 0);
          shards[r][j].mutable_grad() = g.slice(0, r * chunk[j], (r + 1) * chunk[j]).clone();
        }
        norms[r].push_back(optimizer_step(opt, c["clip_grad"].get<double>(), std::ref(sum)).grad_norm);
        opt.set_lr(sched.step());
      }
    };
    std::thread t1(rank_main, 1);
    rank_main(0);
    t1.join();
    const json& last = c["step"].back();
    for (size_t j = 0; j < np; ++j) {
      at::Tensor want = T(last["params"][j]);
      at::Tensor got = at::cat({shards[0][j].detach(), shards[1][j].detach()}).slice(0, 0, want.numel()).view(want.sizes());
      ASSERT_TRUE(close(got, want, &tp, 1e-5, 1e-7)) << "param " << j;
    }
    for (size_t s = 0; s < c["step"].size(); ++s) {
      double want = T(c["step"][s]["grad_norm"]).item<double>();
      EXPECT_TRUE(same_double(norms[0][s], norms[1][s]));
      if (std::isfinite(want)) EXPECT_TRUE(close(norms[0][s], want, &tn, 1e-6, 0));
      else EXPECT_FALSE(std::isfinite(norms[0][s]));
    }
  }
  tp.print("sharded adamw params");
  tn.print("sharded grad norms");
}

// k steps, save, new optimizer + scheduler from the saved state, n − k steps = n steps.
TEST(OptimAdamW, StateDictResumeIsBitExact) {
  const json& c = fixture().cases.at("adamw")[0];
  const int64_t total = c["total_training_steps"].get<int64_t>();
  auto run = [&](std::vector<at::Tensor>& params, AdamW& opt, LrScheduler& sched, size_t from, size_t to) {
    for (size_t s = from; s < to; ++s) {
      for (size_t j = 0; j < params.size(); ++j) params[j].mutable_grad() = T(c["step"][s]["grads"][j]).clone();
      optimizer_step(opt, c["clip_grad"].get<double>());
      opt.set_lr(sched.step());
    }
  };
  std::vector<std::string> names = {"a", "b", "c", "d", "e"};
  std::vector<at::Tensor> p1, p2;
  for (const auto& n : c["init"]) p1.push_back(T(n).clone().requires_grad_(true));
  AdamW o1(p1, adam_opts(c), names);
  LrScheduler s1(c["lr"].get<double>(), sched_opts(c["sched"], total));
  o1.set_lr(s1.lr());
  run(p1, o1, s1, 0, 3);
  std::map<std::string, at::Tensor> saved;
  for (auto& [k, v] : o1.state_dict()) saved[k] = v.clone();
  auto sched_saved = s1.state_dict();
  EXPECT_EQ(saved.size(), 15u);
  EXPECT_TRUE(saved.count("c.exp_avg_sq"));
  for (auto& p : p1) p2.push_back(p.detach().clone().requires_grad_(true));
  run(p1, o1, s1, 3, c["step"].size());

  AdamW o2(p2, adam_opts(c), names);
  o2.reserve_state();  // the engine's way: loading replaces the reserved moments
  o2.load_state_dict(saved);
  LrScheduler s2(c["lr"].get<double>(), sched_opts(c["sched"], total));
  s2.load_state_dict(sched_saved);
  EXPECT_EQ(s2.last_epoch(), 3);
  o2.set_lr(s2.lr());
  run(p2, o2, s2, 3, c["step"].size());
  for (size_t j = 0; j < p1.size(); ++j) EXPECT_TRUE(at::equal(p1[j], p2[j])) << j;
  EXPECT_EQ(s1.lr(), s2.lr());
}

TEST(OptimAdamW, LoadStateDictValidates) {
  std::vector<at::Tensor> params = {at::zeros({3}).requires_grad_(true), at::zeros({2, 2}).requires_grad_(true)};
  AdamW opt(params, {}, {"w", "b"});
  auto ok = [] {
    return std::map<std::string, at::Tensor>{{"w.exp_avg", at::ones({3})}, {"w.exp_avg_sq", at::ones({3})},
                                             {"w.step", at::scalar_tensor(2.0)}};
  };
  EXPECT_NO_THROW(opt.load_state_dict(ok()));
  EXPECT_EQ(opt.state()[0].step.item<float>(), 2.0f);
  EXPECT_FALSE(opt.state()[1].step.defined());
  auto bad_shape = ok();
  bad_shape["w.exp_avg"] = at::ones({4});
  EXPECT_THROW(opt.load_state_dict(bad_shape), Error);
  auto unknown = ok();
  unknown["x.step"] = at::scalar_tensor(1.0);
  EXPECT_THROW(opt.load_state_dict(unknown), Error);
  auto partial = ok();
  partial.erase("w.exp_avg_sq");
  EXPECT_THROW(opt.load_state_dict(partial), Error);
  EXPECT_THROW(AdamW(params, {}, {"w", "w"}), Error);
}

TEST(OptimSchedule, EveryStepMatchesVerl) {
  int n = 0;
  for (const json& c : fixture().cases.at("sched")) {
    const int64_t total = c["total"].get<int64_t>();
    LrScheduleOptions o = sched_opts(c["opts"], total);
    LrScheduler s(c["base_lr"].get<double>(), o);
    const auto& lrs = c["lrs"];
    SCOPED_TRACE(c["opts"].dump());
    EXPECT_EQ(s.lr(), lrs[0].get<double>()) << "at construction";
    for (size_t k = 1; k < lrs.size(); ++k) {
      double lr = s.step();
      EXPECT_EQ(lr, lrs[k].get<double>()) << "after step " << k;
      ++n;
    }
    // Scheduler state round trip mid-way.
    LrScheduler s2(c["base_lr"].get<double>(), o);
    LrScheduler s3(c["base_lr"].get<double>(), o);
    for (int k = 0; k < 5; ++k) s2.step();
    s3.load_state_dict(s2.state_dict());
    EXPECT_EQ(s3.lr(), lrs[5].get<double>());
    EXPECT_EQ(s3.step(), lrs[6].get<double>());
  }
  EXPECT_GT(n, 150);
}

TEST(OptimSchedule, RejectsBadConfig) {
  LrScheduleOptions o;
  o.lr_scheduler_type = "exponential";
  EXPECT_THROW(LrScheduler(1e-3, o), Error);
  o.lr_scheduler_type = "cosine";
  o.total_training_steps = -1;
  EXPECT_THROW(LrScheduler(1e-3, o), Error);
  o.total_training_steps = 10;
  o.min_lr_ratio = 1.5;
  EXPECT_THROW(LrScheduler(1e-3, o), Error);
}

}  // namespace
}  // namespace verl::test
