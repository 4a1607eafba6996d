// output.cpp — exclusive claim, temporary beside the target, atomic publish (see output.h).
#include "io/output.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <system_error>

#include "core/error.h"

namespace fs = std::filesystem;

namespace verl {

namespace {

std::string err() { return std::strerror(errno); }

struct Id {
  dev_t dev = 0;
  ino_t ino = 0;
  bool ok = false;
  bool operator==(const Id& o) const { return ok && o.ok && dev == o.dev && ino == o.ino; }
};
Id id_of(const fs::path& p) {  // follows symlinks
  struct stat st {};
  if (::stat(p.c_str(), &st) != 0) return {};
  return {st.st_dev, st.st_ino, true};
}

bool path_exists_nofollow(const fs::path& p) {
  struct stat st {};
  return ::lstat(p.c_str(), &st) == 0;
}

// True if `inner` is `outer` or lies below it (both normalised, absolute).
bool is_within(const fs::path& inner, const fs::path& outer) {
  auto i = inner.begin(), o = outer.begin();
  for (; o != outer.end(); ++o, ++i)
    if (i == inner.end() || *i != *o) return false;
  return true;
}

fs::path resolved(const fs::path& p) {
  std::error_code ec;
  fs::path r = fs::weakly_canonical(p, ec);
  return ec ? fs::absolute(p).lexically_normal() : r;
}

// Is `input` (existing) the folder/file `where`, or inside it? By resolved path and by the
// device + inode of every ancestor of the input's resolved path.
bool holds_input(const fs::path& where, const fs::path& input) {
  const fs::path rw = resolved(where), ri = resolved(input);
  if (is_within(ri, rw)) return true;
  const Id w = id_of(where);
  if (!w.ok) return false;
  for (fs::path a = ri;; a = a.parent_path()) {
    if (id_of(a) == w) return true;
    if (a == a.parent_path()) break;
  }
  return false;
}

bool process_alive(long pid) {
  if (pid <= 0) return false;
  if (::kill(static_cast<pid_t>(pid), 0) == 0) return true;
  return errno == EPERM;
}

int rename_flags(const fs::path& from, const fs::path& to, unsigned flags) {
  return ::renameat2(AT_FDCWD, from.c_str(), AT_FDCWD, to.c_str(), flags);
}

}  // namespace

std::string OutputClaim::lock_path(const std::string& target) {
  const fs::path t(target);
  return (t.parent_path() / ("." + t.filename().string() + ".lock")).string();
}
std::string OutputClaim::temp_path(const std::string& target, long pid) {
  const fs::path t(target);
  return (t.parent_path() / ("." + t.filename().string() + ".tmp-" + std::to_string(pid))).string();
}

OutputClaim::OutputClaim(const std::string& target, const Options& opt) : opt_(opt) {
  if (target.empty()) fail(opt.what, ": empty path");
  fs::path t = fs::absolute(target).lexically_normal();
  if (t.filename().empty()) t = t.parent_path();
  target_ = t.string();
  const std::string& w = opt.what;
  refuse_inputs(t);
  std::error_code ec;
  const fs::path parent = t.parent_path();
  fs::create_directories(parent, ec);
  if (ec) fail(w, " ", target_, ": cannot create its parent folder: ", ec.message());
  if (!fs::is_directory(parent)) fail(w, " ", target_, ": ", parent.string(), " is not a folder");
  take_lock();
  try {
    remove_dead_temps(t);
    check_existing(t);
    temp_ = temp_path(target_, ::getpid());
    if (opt.kind == Kind::Folder) {
      fs::remove_all(temp_, ec);
      if (::mkdir(temp_.c_str(), 0755) != 0) fail(w, " ", target_, ": cannot write in ", parent.string(), ": ", err());
    }
  } catch (...) {
    release();
    throw;
  }
}

// 1. Never an input: the target may not be one, nor hold one.
void OutputClaim::refuse_inputs(const fs::path& t) const {
  for (const auto& in : opt_.inputs) {
    if (in.empty() || !path_exists_nofollow(in)) continue;
    if (holds_input(t, in))
      fail(opt_.what, " ", target_, ": ", resolved(t) == resolved(in) ? "is" : "holds", " the input ", in,
           " (same file system object after symlinks and mounts): refusing to write there");
  }
}

// 2. Exclusive claim: flock on a lock file beside the target. The lock file's inode is
//    re-checked after locking, so one unlinked by a finishing holder is not trusted.
void OutputClaim::take_lock() {
  const std::string& w = opt_.what;
  lock_ = lock_path(target_);
  for (int attempt = 0;; ++attempt) {
    int fd = ::open(lock_.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0644);
    if (fd < 0) fail(w, " ", target_, ": cannot create the lock ", lock_, ": ", err());
    if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
      const int e = errno;
      char buf[32] = {0};
      const ssize_t n = ::pread(fd, buf, sizeof buf - 1, 0);
      ::close(fd);
      if (e == EWOULDBLOCK) {
        std::string who = n > 0 ? std::string(buf, static_cast<size_t>(n)) : std::string("?");
        while (!who.empty() && (who.back() == '\n' || who.back() == ' ')) who.pop_back();
        fail(w, " ", target_, ": another process (pid ", who, ") is writing it right now; wait for it or choose another target");
      }
      fail(w, " ", target_, ": cannot lock ", lock_, ": ", std::strerror(e));
    }
    struct stat a {}, b {};
    if (::fstat(fd, &a) == 0 && ::stat(lock_.c_str(), &b) == 0 && a.st_dev == b.st_dev && a.st_ino == b.st_ino) {
      lock_fd_ = fd;
      break;
    }
    ::close(fd);
    if (attempt >= 20) fail(w, " ", target_, ": lock ", lock_, " keeps changing under us");
  }
  const std::string me = std::to_string(::getpid()) + "\n";
  if (::ftruncate(lock_fd_, 0) != 0 || ::pwrite(lock_fd_, me.data(), me.size(), 0) < 0) { /* pid is informative only */ }
}

// 3. Temporaries of processes that are gone (we hold the claim, so nobody that respects it is
//    writing one). Never one that holds an input.
void OutputClaim::remove_dead_temps(const fs::path& t) const {
  std::error_code ec;
  const std::string stem = "." + t.filename().string() + ".tmp-";
  for (const auto& e : fs::directory_iterator(t.parent_path(), ec)) {
    const std::string n = e.path().filename().string();
    if (n.compare(0, stem.size(), stem) != 0 || n.size() == stem.size()) continue;
    const std::string digits = n.substr(stem.size());
    if (digits.find_first_not_of("0123456789") != std::string::npos || digits.size() > 9) continue;
    const long pid = std::stol(digits);
    if (pid != ::getpid() && process_alive(pid)) continue;
    bool holds = false;
    for (const auto& in : opt_.inputs)
      if (!in.empty() && path_exists_nofollow(in) && holds_input(e.path(), in)) holds = true;
    if (holds) continue;
    std::error_code rec;
    fs::remove_all(e.path(), rec);
  }
}

// 4. What is there now: the right kind, and empty unless --overwrite.
void OutputClaim::check_existing(const fs::path& t) const {
  const std::string& w = opt_.what;
  const bool folder = opt_.kind == Kind::Folder;
  std::error_code ec;
  struct stat st {};
  if (::lstat(target_.c_str(), &st) != 0) return;
  const bool is_dir = fs::is_directory(t);  // a symlink to a folder counts as a folder
  if (folder && !is_dir) fail(w, " ", target_, ": exists and is not a folder");
  if (!folder && is_dir) fail(w, " ", target_, ": is a folder, expected a file path");
  if (!opt_.overwrite) {
    if (!folder) fail(w, " ", target_, ": exists (pass --overwrite to replace it)");
    if (!fs::is_empty(t, ec)) fail(w, " ", target_, ": exists and is not empty (pass --overwrite to replace it)");
  }
}

OutputClaim::~OutputClaim() {
  if (!committed_ && !temp_.empty()) {
    std::error_code ec;
    fs::remove_all(temp_, ec);
  }
  release();
}

void OutputClaim::release() {
  if (lock_fd_ < 0) return;
  ::unlink(lock_.c_str());  // before unlocking: a waiter that opened it re-checks the inode
  ::close(lock_fd_);
  lock_fd_ = -1;
}

void OutputClaim::commit() {
  if (committed_) return;
  if (lock_fd_ < 0) fail(opt_.what, " ", target_, ": commit without a claim");
  const std::string& w = opt_.what;
  const fs::path t(target_), tmp(temp_);
  const bool folder = opt_.kind == Kind::Folder;
  std::error_code ec;
  if (!path_exists_nofollow(tmp)) fail(w, " ", target_, ": nothing was written to ", temp_);
  // Re-check the target: something may have appeared since the claim (not another verlcpp).
  const bool exists = path_exists_nofollow(t);
  if (exists && !opt_.overwrite) {
    if (!folder) fail(w, " ", target_, ": appeared while writing; not replacing it");
    if (!fs::is_empty(t, ec)) fail(w, " ", target_, ": was filled by someone else while writing; not replacing it");
    if (::rmdir(target_.c_str()) != 0) fail(w, " ", target_, ": cannot replace the empty folder: ", err());
  }
  if (!exists || !opt_.overwrite) {
    if (rename_flags(tmp, t, RENAME_NOREPLACE) != 0) {
      if (errno != EINVAL && errno != ENOSYS) fail(w, " ", target_, ": cannot publish ", temp_, ": ", err());
      if (::rename(tmp.c_str(), t.c_str()) != 0) fail(w, " ", target_, ": cannot publish ", temp_, ": ", err());
    }
  } else if (!folder) {
    if (::rename(tmp.c_str(), t.c_str()) != 0) fail(w, " ", target_, ": cannot replace it: ", err());
  } else {
    // Swap the complete new folder with the old one, then remove the old one (now at temp).
    if (rename_flags(tmp, t, RENAME_EXCHANGE) == 0) {
      committed_ = true;
      fs::remove_all(tmp, ec);
    } else {
      if (errno != EINVAL && errno != ENOSYS) fail(w, " ", target_, ": cannot replace it: ", err());
      const fs::path old = t.parent_path() / ("." + t.filename().string() + ".old-" + std::to_string(::getpid()));
      if (::rename(t.c_str(), old.c_str()) != 0) fail(w, " ", target_, ": cannot move the old one aside: ", err());
      if (::rename(tmp.c_str(), t.c_str()) != 0) {
        const std::string e = err();
        ::rename(old.c_str(), t.c_str());
        fail(w, " ", target_, ": cannot publish ", temp_, ": ", e);
      }
      fs::remove_all(old, ec);
    }
  }
  committed_ = true;
  release();
}

void refuse_same_file(const std::string& a, const std::string& a_flag, const std::string& b, const std::string& b_flag) {
  const Id ia = id_of(a), ib = id_of(b);
  if (ia == ib || (!a.empty() && !b.empty() && resolved(a) == resolved(b)))
    fail(a_flag, " ", a, " and ", b_flag, " ", b, " are the same file: refusing to overwrite the input");
}

}  // namespace verl
