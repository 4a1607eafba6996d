// output.h — publish one output (a file or a folder) so that a failed, killed or concurrent
// run never leaves a half-written result and never touches its inputs.
//
//   OutputClaim out(target, {.kind = OutputClaim::Kind::Folder, .overwrite = false,
//                            .inputs = {checkpoint_dir, hf_dir, every rank file...}});
//   write everything under out.temp();   // a fresh folder (or file path) beside the target
//   out.commit();                        // atomic rename onto the target
//   // destroyed without commit(): the temporary is removed, the target is as it was.
//
// What it guarantees, in order, in the constructor:
//  1. Inputs are compared with the target by resolved path *and* by device + inode of every
//     ancestor, so a symlinked or bind-mounted spelling of the same folder is caught: the
//     target may not be an input, nor hold one (overwriting it would delete the input).
//  2. The target is claimed exclusively: an flock on `.<name>.lock` beside it, held until the
//     claim ends. A second claim of the same target fails at once with a line naming the
//     target (and the pid that holds it); it never touches the other's output.
//  3. Temporaries `.<name>.tmp-<pid>` left beside the target by processes that are gone are
//     removed (never one that holds an input, never one of a live process).
//  4. An existing target: a file or non-empty folder is refused unless overwrite; the kind
//     must match.
// commit() renames the temporary onto the target: rename(2) with RENAME_NOREPLACE for a new
// target, RENAME_EXCHANGE to swap with an existing one (the old one is then removed), so at
// every instant the target is either the old output or the complete new one.
//
// Torch-free (POSIX + std only): the merger, `verlcpp logprob --out` and engine checkpoints
// share it. Errors are verl::Error with a one-line message naming the path.
#pragma once
#include <filesystem>
#include <string>
#include <vector>

namespace verl {

class OutputClaim {
 public:
  enum class Kind { File, Folder };
  struct Options {
    Kind kind = Kind::Folder;
    bool overwrite = false;
    std::vector<std::string> inputs;  // files or folders that must survive (need not exist)
    std::string what = "target";      // how messages name the target, e.g. "--target_dir"
  };

  OutputClaim(const std::string& target, const Options& opt);
  ~OutputClaim();  // not committed: removes the temporary and releases the claim
  OutputClaim(const OutputClaim&) = delete;
  OutputClaim& operator=(const OutputClaim&) = delete;

  const std::string& target() const { return target_; }  // absolute, normalised
  // Where to write: a freshly created empty folder (Kind::Folder) or a path that does not
  // exist yet (Kind::File), beside the target on the same file system.
  const std::string& temp() const { return temp_; }
  // Publishes temp() as the target; the claim is released. Throws Error on failure (then
  // the target is unchanged and the temporary is removed by the destructor).
  void commit();
  bool committed() const { return committed_; }

  // Exposed for tests: the name of the lock and of a temporary for `target` and `pid`.
  static std::string lock_path(const std::string& target);
  static std::string temp_path(const std::string& target, long pid);

 private:
  std::string target_, temp_, lock_;
  Options opt_;
  int lock_fd_ = -1;
  bool committed_ = false;
  void release();
  // The constructor's steps, in order.
  void refuse_inputs(const std::filesystem::path& t) const;
  void take_lock();
  void remove_dead_temps(const std::filesystem::path& t) const;
  void check_existing(const std::filesystem::path& t) const;
};

// Throws Error if `a` and `b` name the same file (device + inode, after symlinks), e.g.
// `verlcpp logprob --out` equal to `--batch`. Paths that do not exist never match.
void refuse_same_file(const std::string& a, const std::string& a_flag, const std::string& b, const std::string& b_flag);

}  // namespace verl
