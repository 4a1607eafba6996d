// test_balance.cpp — micro-batching against verl's own seqlen_balancing (installed verl
// package, run at test time on random cases: identical partitions), plus fixed micro-batches,
// the data-parallel count hook, the inverse permutation and per-split meta copies.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "batch/batch.h"
#include "engine_test_util.h"

namespace verl::test {
namespace {

nlohmann::json balance_cases() {
  std::string dir = oracle_fixture("ref_balance.py", "");
  return nlohmann::json::parse(read_text_file(dir + "/cases.json"));
}

TEST(Balance, KarmarkarKarpMatchesVerl) {
  auto j = balance_cases();
  ASSERT_GE(j["karmarkar_karp"].size(), 300u);
  for (const auto& c : j["karmarkar_karp"]) {
    auto vals = c["values"].get<std::vector<int64_t>>();
    Partitions got = get_seqlen_balanced_partitions(vals, c["k"].get<int>(), c["equal_size"].get<bool>());
    ASSERT_EQ(got, c["partitions"].get<Partitions>()) << c.dump();
  }
}

TEST(Balance, RearrangeMicroBatchesMatchesVerl) {
  auto j = balance_cases();
  int checked = 0;
  for (const auto& c : j["rearrange"]) {
    DynamicBatchOptions o;
    o.max_token_len = c["max_token_len"].get<int64_t>();
    const auto& opt = c["options"];
    if (opt.contains("min_num_micro_batch")) o.min_num_micro_batch = opt["min_num_micro_batch"].get<int>();
    if (opt.contains("num_batches_divided_by")) o.num_batches_divided_by = opt["num_batches_divided_by"].get<int>();
    o.use_dynamic_bsz_balance = opt["use_dynamic_bsz_balance"].get<bool>();
    auto lens = c["lengths"].get<std::vector<int64_t>>();
    if (c["error"].is_null()) {
      ASSERT_EQ(rearrange_micro_batches(lens, o), c["partitions"].get<Partitions>()) << c.dump();
      ++checked;
    } else {
      EXPECT_THROW(rearrange_micro_batches(lens, o), Error) << c.dump();
    }
  }
  EXPECT_GE(checked, 250);
}

TEST(Balance, TooLongSampleIsAClearError) {
  DynamicBatchOptions o;
  o.max_token_len = 100;
  try {
    rearrange_micro_batches({10, 150, 20}, o);
    FAIL();
  } catch (const Error& e) {
    std::string m = e.what();
    EXPECT_NE(m.find("sample 1 has 150 tokens"), std::string::npos) << m;
  }
}

TEST(Balance, DpHookMakesEveryRankUseTheSameCount) {
  // Two ranks: the other one needs 5 micro-batches; this one alone would need 2.
  DynamicBatchOptions o;
  o.max_token_len = 100;
  std::vector<int64_t> lens(10, 18);  // 180 tokens → 2 micro-batches locally
  EXPECT_EQ(rearrange_micro_batches(lens, o).size(), 2u);
  int calls = 0;
  o.dp_max = [&](std::vector<int64_t>& v) {
    if (calls++ == 0) v[0] = std::max<int64_t>(v[0], 5);  // the count all-reduce
  };
  Partitions p = rearrange_micro_batches(lens, o);
  EXPECT_EQ(p.size(), 5u);
  EXPECT_GE(calls, 3);  // count, constraints, within-limit
  calls = 0;
  o.num_batches_divided_by = 4;
  EXPECT_EQ(rearrange_micro_batches(lens, o).size(), 8u);
}

TEST(Balance, FixedMicroBatchesKeepOrderWithSmallerLast) {
  Partitions p = fixed_micro_batches(7, 3);
  EXPECT_EQ(p, (Partitions{{0, 1, 2}, {3, 4, 5}, {6}}));
  EXPECT_THROW(fixed_micro_batches(7, 0), Error);
}

TEST(Balance, ReverseIndexRestoresOrder) {
  Partitions p = {{4, 1}, {0, 3}, {2}};
  std::vector<int> rev = reverse_index(p);
  std::vector<int> flat = {4, 1, 0, 3, 2};
  for (int i = 0; i < 5; ++i) EXPECT_EQ(flat[rev[i]], i);
  EXPECT_THROW(reverse_index({{0, 0}}), Error);
}

TEST(BatchSplit, EachPieceOwnsItsMeta) {
  Batch b;
  b.tensors["adv"] = at::arange(6, at::kFloat);
  b.sequences["input_ids"] = Jagged::from_lengths(at::arange(12, at::kLong), {1, 2, 3, 1, 2, 3});
  b.non_tensors["uid"] = {"a", "b", "c", "d", "e", "f"};
  b.non_tensors["multi_modal_inputs"] = std::vector<nlohmann::json>(6, nlohmann::json{{"k", {1, 2}}});
  b.meta = {{"temperature", 1.0}, {"nested", {{"step", 1}}}};
  std::vector<Batch> parts = b.split({{5, 0}, {1, 2, 3}, {4}});
  parts[0].meta["nested"]["step"] = 99;
  parts[0].meta["leak"] = true;
  parts[0].non_tensors["multi_modal_inputs"][0]["k"] = 0;
  EXPECT_EQ(parts[1].meta["nested"]["step"], 1);
  EXPECT_FALSE(parts[2].meta.contains("leak"));
  EXPECT_EQ(b.meta["nested"]["step"], 1);
  EXPECT_EQ(b.non_tensors["multi_modal_inputs"][5]["k"], nlohmann::json({1, 2}));
  // Samples travel together.
  EXPECT_EQ(parts[0].size(), 2);
  EXPECT_EQ(parts[0].non_tensors["uid"][0], "f");
  EXPECT_FLOAT_EQ(parts[0].tensors["adv"][0].item<float>(), 5.f);
  EXPECT_TRUE(at::equal(parts[0].sequences["input_ids"].at(0), at::tensor(std::vector<int64_t>{9, 10, 11})));
  EXPECT_TRUE(at::equal(parts[0].sequences["input_ids"].at(1), at::tensor(std::vector<int64_t>{0})));
  // concat of the pieces + inverse permutation gives the original batch back.
  Batch back = Batch::concat(parts).select(reverse_index({{5, 0}, {1, 2, 3}, {4}}));
  EXPECT_TRUE(at::equal(back.tensors["adv"], b.tensors["adv"]));
  EXPECT_TRUE(at::equal(back.sequences["input_ids"].values, b.sequences["input_ids"].values));
  EXPECT_EQ(back.non_tensors["uid"], b.non_tensors["uid"]);
}

TEST(BatchSplit, MismatchedSizesAreAnError) {
  Batch b;
  b.tensors["a"] = at::zeros({3});
  b.non_tensors["uid"] = {"x", "y"};
  EXPECT_THROW(b.size(), Error);
}

}  // namespace
}  // namespace verl::test
