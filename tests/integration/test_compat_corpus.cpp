// test_compat_corpus.cpp — every checkpoint in tests/compat/corpus/ (written by torch
// 2.4 … 2.15 and megatron-core 0.13, 0.18 and 0.19 themselves, see tests/compat/README.md) is merged by
// `verlcpp merge --dtype fp32`
// and must equal its unsharded reference (ref.safetensors, written by the same release from
// the model before sharding) bit for bit: same names, dtypes, shapes and bytes; LoRA entries
// also compare the adapter. MANIFEST.tsv lists what each release wrote; every written entry
// must be present, so a lost corpus file fails the test instead of shrinking it.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "io/safetensors.h"
#include "test_util.h"

namespace fs = std::filesystem;
using verl::test::run;

namespace {

std::string q(const fs::path& p) { return "'" + p.string() + "'"; }
fs::path corpus() { return fs::path(verl::test::source_dir()) / "tests" / "compat" / "corpus"; }

// Differences between two safetensors files, one line each ("" when identical).
std::string compare(const fs::path& merged, const fs::path& ref) {
  verl::SafetensorsReader a(merged.string()), b(ref.string());
  std::ostringstream out;
  std::set<std::string> names;
  for (const auto& t : b.tensors()) names.insert(t.name);
  for (const auto& t : a.tensors())
    if (!names.count(t.name)) out << "extra tensor " << t.name << "\n";
  for (const auto& rt : b.tensors()) {
    const verl::StTensor* mt = a.find(rt.name);
    if (!mt) {
      out << "missing tensor " << rt.name << "\n";
      continue;
    }
    if (mt->dtype != rt.dtype || mt->shape != rt.shape) {
      out << rt.name << ": dtype/shape differ\n";
      continue;
    }
    if (std::memcmp(a.data(*mt), b.data(rt), rt.nbytes()) != 0) out << rt.name << ": bytes differ\n";
  }
  return out.str();
}

struct Entry {
  std::string torch, name, status;
};
std::vector<Entry> manifest() {
  std::vector<Entry> out;
  std::ifstream f(corpus() / "MANIFEST.tsv");
  std::string line;
  std::getline(f, line);  // header
  while (std::getline(f, line)) {
    std::istringstream ls(line);
    Entry e;
    std::getline(ls, e.torch, '\t');
    std::getline(ls, e.name, '\t');
    std::getline(ls, e.status, '\t');
    if (!e.name.empty()) out.push_back(e);
  }
  return out;
}

TEST(CompatCorpus, EveryEntryMergesBitExact) {
  const auto entries = manifest();
  ASSERT_GE(entries.size(), 30u) << "tests/compat/corpus/MANIFEST.tsv is missing or short";
  verl::test::TempDir tmp;
  std::set<std::string> releases;
  size_t merged = 0;
  for (const auto& e : entries) {
    // "2.13.0" (torch, FSDP) or "mcore-0.19.2" (megatron-core, torch_dist).
    const bool megatron = e.torch.rfind("mcore-", 0) == 0;
    const std::string major_minor = e.torch.substr(0, e.torch.rfind('.'));
    const fs::path dir = corpus() / ((megatron ? "" : "torch-") + major_minor) / e.name;
    SCOPED_TRACE(e.torch + " " + e.name);
    if (e.status != "written") {
      EXPECT_FALSE(fs::exists(dir)) << "skipped in the manifest but present";
      continue;
    }
    ASSERT_TRUE(fs::exists(dir / "ckpt")) << dir;
    const fs::path out = tmp.path / major_minor / e.name;
    std::string log;
    const int rc = run(verl::test::verlcpp_bin() + " merge --backend " + (megatron ? "megatron" : "fsdp") + " --local_dir " + q(dir / "ckpt") +
                           " --target_dir " + q(out) + " --dtype fp32 --quiet",
                       &log);
    ASSERT_EQ(rc, 0) << log;
    EXPECT_EQ(compare(out / "model.safetensors", dir / "ref.safetensors"), "");
    if (fs::exists(dir / "ref_adapter.safetensors"))
      EXPECT_EQ(compare(out / "lora_adapter" / "adapter_model.safetensors", dir / "ref_adapter.safetensors"), "");
    releases.insert(megatron ? major_minor : "torch-" + major_minor);
    ++merged;
  }
  for (const char* r : {"torch-2.4", "torch-2.6", "torch-2.9", "torch-2.12", "torch-2.13", "torch-2.15", "mcore-0.13",
                        "mcore-0.18", "mcore-0.19"})
    EXPECT_TRUE(releases.count(r)) << "no entry of " << r;
  std::printf("merged %zu corpus checkpoints of %zu releases bit for bit\n", merged, releases.size());
}

// The comparison itself must see a difference: one flipped byte of a reference.
TEST(CompatCorpus, ComparisonDetectsAFlippedByte) {
  verl::test::TempDir tmp;
  const fs::path ref = corpus() / "torch-2.13" / "fsdp2_w2" / "ref.safetensors";
  ASSERT_TRUE(fs::exists(ref));
  const fs::path bad = tmp.path / "bad.safetensors";
  fs::copy_file(ref, bad);
  {
    std::fstream io(bad, std::ios::in | std::ios::out | std::ios::binary);
    io.seekp(static_cast<std::streamoff>(fs::file_size(bad) - 3));
    io.put('\x5a');
  }
  EXPECT_NE(compare(bad, ref), "");
}

}  // namespace
