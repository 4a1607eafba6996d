// test_output.cpp — io/output.h: a claimed target is published atomically, an aborted one
// leaves nothing, a second claim of the same target fails without touching the first, stale
// temporaries of dead processes are removed (never a live one's, never one holding an
// input), and inputs reached through symlinks or hard links are never a target.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <optional>

#include "core/error.h"
#include "io/file.h"
#include "io/output.h"
#include "test_util.h"

namespace fs = std::filesystem;
using verl::Error;
using verl::OutputClaim;

namespace {

using verl::test::error_of;
using verl::test::slurp;
using verl::test::spit;

// Entries of `dir` whose name starts with `prefix`.
int count_prefixed(const fs::path& dir, const std::string& prefix) {
  int n = 0;
  for (const auto& e : fs::directory_iterator(dir)) n += e.path().filename().string().rfind(prefix, 0) == 0;
  return n;
}

long dead_pid() {
  const pid_t p = ::fork();
  if (p == 0) ::_exit(0);
  int st = 0;
  ::waitpid(p, &st, 0);
  return p;
}

OutputClaim::Options folder_opts(std::vector<std::string> inputs = {}, bool overwrite = false) {
  OutputClaim::Options o;
  o.kind = OutputClaim::Kind::Folder;
  o.overwrite = overwrite;
  o.inputs = std::move(inputs);
  o.what = "--target_dir";
  return o;
}

TEST(Output, FolderPublishedOnlyOnCommit) {
  verl::test::TempDir d;
  const fs::path target = d.path / "out";
  {
    OutputClaim c(target.string(), folder_opts());
    ASSERT_TRUE(fs::is_directory(c.temp()));
    EXPECT_EQ(fs::path(c.temp()).parent_path(), d.path);
    EXPECT_TRUE(fs::exists(OutputClaim::lock_path(target.string())));
    spit(fs::path(c.temp()) / "a.txt", "new");
    EXPECT_FALSE(fs::exists(target));
    c.commit();
  }
  EXPECT_EQ(slurp(target / "a.txt"), "new");
  EXPECT_EQ(count_prefixed(d.path, ".out."), 0) << "temporary or lock left behind";
}

TEST(Output, AbortLeavesNothing) {
  verl::test::TempDir d;
  const fs::path target = d.path / "out";
  {
    OutputClaim c(target.string(), folder_opts());
    spit(fs::path(c.temp()) / "half.bin", "xx");
  }
  EXPECT_FALSE(fs::exists(target));
  EXPECT_EQ(count_prefixed(d.path, ".out."), 0);
}

TEST(Output, NonEmptyTargetNeedsOverwriteAndIsSwappedWhole) {
  verl::test::TempDir d;
  const fs::path target = d.path / "out";
  fs::create_directories(target);
  spit(target / "old.txt", "old");
  EXPECT_NE(error_of([&] { OutputClaim c(target.string(), folder_opts()); }).find("--overwrite"), std::string::npos);
  EXPECT_EQ(slurp(target / "old.txt"), "old");
  EXPECT_EQ(count_prefixed(d.path, ".out."), 0);
  {
    OutputClaim c(target.string(), folder_opts({}, true));
    spit(fs::path(c.temp()) / "new.txt", "new");
    EXPECT_EQ(slurp(target / "old.txt"), "old") << "the old output must stay until commit";
    c.commit();
  }
  EXPECT_FALSE(fs::exists(target / "old.txt"));
  EXPECT_EQ(slurp(target / "new.txt"), "new");
  EXPECT_EQ(count_prefixed(d.path, ".out."), 0);
  // An empty existing folder is fine without --overwrite.
  const fs::path empty = d.path / "empty";
  fs::create_directories(empty);
  {
    OutputClaim c(empty.string(), folder_opts());
    spit(fs::path(c.temp()) / "x", "1");
    c.commit();
  }
  EXPECT_EQ(slurp(empty / "x"), "1");
}

TEST(Output, SecondClaimFailsAndLeavesTheFirstAlone) {
  verl::test::TempDir d;
  const fs::path target = d.path / "out";
  OutputClaim first(target.string(), folder_opts());
  spit(fs::path(first.temp()) / "mine.txt", "first");
  const std::string m = error_of([&] { OutputClaim second(target.string(), folder_opts({}, true)); });
  EXPECT_NE(m.find("another process"), std::string::npos) << m;
  EXPECT_NE(m.find(std::to_string(::getpid())), std::string::npos) << m;
  EXPECT_NE(m.find(target.string()), std::string::npos) << m;
  ASSERT_TRUE(fs::exists(fs::path(first.temp()) / "mine.txt"));
  first.commit();
  EXPECT_EQ(slurp(target / "mine.txt"), "first");
  // Released: a new claim (with --overwrite) now works.
  OutputClaim again(target.string(), folder_opts({}, true));
}

TEST(Output, SecondClaimFromAnotherProcessFails) {
  verl::test::TempDir d;
  const fs::path target = d.path / "out";
  OutputClaim first(target.string(), folder_opts());
  const pid_t p = ::fork();
  if (p == 0) {
    try {
      OutputClaim second(target.string(), folder_opts({}, true));
      ::_exit(0);
    } catch (const Error& e) {
      ::_exit(std::string(e.what()).find("another process") != std::string::npos ? 7 : 1);
    }
  }
  int st = 0;
  ::waitpid(p, &st, 0);
  ASSERT_TRUE(WIFEXITED(st));
  EXPECT_EQ(WEXITSTATUS(st), 7);
  EXPECT_TRUE(fs::is_directory(first.temp()));
}

TEST(Output, StaleTemporariesOfDeadProcessesAreRemoved) {
  verl::test::TempDir d;
  const fs::path target = d.path / "out";
  const fs::path stale = OutputClaim::temp_path(target.string(), dead_pid());
  const fs::path live = OutputClaim::temp_path(target.string(), ::getppid());
  const fs::path other = OutputClaim::temp_path((d.path / "other").string(), dead_pid());
  for (const auto& p : {stale, live, other}) {
    fs::create_directories(p / "sub");
    spit(p / "sub" / "f", "x");
  }
  {
    OutputClaim c(target.string(), folder_opts());
  }
  EXPECT_FALSE(fs::exists(stale)) << "a dead process's temporary must be removed";
  EXPECT_TRUE(fs::exists(live)) << "a live process's temporary must stay";
  EXPECT_TRUE(fs::exists(other)) << "another target's temporary must stay";
}

TEST(Output, StaleTemporaryHoldingAnInputIsKept) {
  verl::test::TempDir d;
  const fs::path target = d.path / "out";
  const fs::path stale = OutputClaim::temp_path(target.string(), dead_pid());
  fs::create_directories(stale / "ckpt");
  spit(stale / "ckpt" / "model.pt", "weights");
  {
    OutputClaim c(target.string(), folder_opts({(stale / "ckpt").string()}));
  }
  EXPECT_EQ(slurp(stale / "ckpt" / "model.pt"), "weights");
}

TEST(Output, InputIsNeverTheTargetThroughSymlinks) {
  verl::test::TempDir d;
  const fs::path ckpt = d.path / "real" / "ckpt";
  fs::create_directories(ckpt);
  spit(ckpt / "model_world_size_1_rank_0.pt", "weights");
  fs::create_directory_symlink(d.path / "real", d.path / "link");
  const fs::path via_link = d.path / "link" / "ckpt";
  // Input through the symlink, target the real folder (and the other way round), overwrite.
  for (auto [in, tgt] : {std::pair{via_link, ckpt}, std::pair{ckpt, via_link}}) {
    const std::string m = error_of([&] { OutputClaim c(tgt.string(), folder_opts({in.string()}, true)); });
    EXPECT_NE(m.find("the input"), std::string::npos) << m;
  }
  // A target that holds the input (its parent).
  const std::string m = error_of([&] { OutputClaim c((d.path / "link").string(), folder_opts({ckpt.string()}, true)); });
  EXPECT_NE(m.find("holds the input"), std::string::npos) << m;
  EXPECT_EQ(slurp(ckpt / "model_world_size_1_rank_0.pt"), "weights");
  EXPECT_EQ(count_prefixed(d.path, ".ckpt."), 0);
  EXPECT_EQ(count_prefixed(d.path / "real", ".ckpt."), 0);
  // A target inside the input folder is fine: it replaces nothing of it.
  OutputClaim inside((ckpt / "merged").string(), folder_opts({ckpt.string()}));
}

TEST(Output, FileTargets) {
  verl::test::TempDir d;
  const fs::path out = d.path / "out.safetensors";
  OutputClaim::Options o;
  o.kind = OutputClaim::Kind::File;
  o.what = "--out";
  {
    OutputClaim c(out.string(), o);
    EXPECT_FALSE(fs::exists(c.temp()));
    spit(c.temp(), "one");
    c.commit();
  }
  EXPECT_EQ(slurp(out), "one");
  EXPECT_NE(error_of([&] { OutputClaim c(out.string(), o); }).find("--overwrite"), std::string::npos);
  o.overwrite = true;
  {
    OutputClaim c(out.string(), o);
    spit(c.temp(), "two");
    EXPECT_EQ(slurp(out), "one");
    c.commit();
  }
  EXPECT_EQ(slurp(out), "two");
  // The input itself, through a hard link.
  const fs::path batch = d.path / "batch.safetensors";
  spit(batch, "batch");
  fs::create_hard_link(batch, d.path / "hard.safetensors");
  o.inputs = {batch.string()};
  EXPECT_NE(error_of([&] { OutputClaim c((d.path / "hard.safetensors").string(), o); }).find("the input"), std::string::npos);
  EXPECT_EQ(slurp(batch), "batch");
  // A folder where a file is expected.
  fs::create_directories(d.path / "dir");
  EXPECT_NE(error_of([&] { OutputClaim c((d.path / "dir").string(), o); }).find("is a folder"), std::string::npos);
}

TEST(Output, RefuseSameFile) {
  verl::test::TempDir d;
  const fs::path a = d.path / "a.safetensors";
  spit(a, "x");
  fs::create_symlink(a, d.path / "sym");
  fs::create_hard_link(a, d.path / "hard");
  for (const char* other : {"a.safetensors", "sym", "hard", "./a.safetensors"}) {
    const std::string m = error_of([&] { verl::refuse_same_file((d.path / other).string(), "--out", a.string(), "--batch"); });
    EXPECT_NE(m.find("same file"), std::string::npos) << other;
  }
  EXPECT_EQ(error_of([&] { verl::refuse_same_file((d.path / "new").string(), "--out", a.string(), "--batch"); }), "");
}

}  // namespace

namespace {
// Inputs are opened only if they are regular files: a FIFO must fail at once, not hang.
TEST(Output, InputFifoIsRefusedWithoutHanging) {
  verl::test::TempDir d;
  const fs::path fifo = d.path / "model_world_size_1_rank_0.pt";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0644), 0);
  const std::string m = error_of([&] { verl::File f(fifo.string()); });
  EXPECT_NE(m.find("not a regular file (a FIFO)"), std::string::npos) << m;
  EXPECT_NE(m.find(fifo.string()), std::string::npos) << m;
  EXPECT_NE(error_of([&] { verl::File f("/dev/null"); }).find("character device"), std::string::npos);
}
}  // namespace
