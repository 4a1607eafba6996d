// paths.cpp — local-path resolution and the locked, manifest-checked copy cache.
#include "hf/paths.h"

#include <fcntl.h>
#include <spawn.h>
#include <sys/file.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <vector>

#include "core/error.h"
#include "io/file.h"
#include "core/md5.h"

extern char** environ;

namespace verl {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

bool starts_with(const std::string& s, const std::string& p) { return s.rfind(p, 0) == 0; }

std::string env_or(const char* name, const std::string& dflt) {
  const char* v = std::getenv(name);
  return v && *v ? std::string(v) : dflt;
}

// Held for the lifetime of the object: an exclusive flock on `path`.
struct FileLock {
  int fd = -1;
  explicit FileLock(const std::string& path) {
    fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) fail(path, ": cannot create lock file");
    if (::flock(fd, LOCK_EX) != 0) {
      ::close(fd);
      fail(path, ": cannot take the lock");
    }
  }
  ~FileLock() {
    if (fd >= 0) {
      ::flock(fd, LOCK_UN);
      ::close(fd);
    }
  }
};

// Listing of a copied tree: relative path → size (files only). A file itself lists as "".
json tree_manifest(const fs::path& root) {
  json files = json::object();
  if (fs::is_regular_file(root)) {
    files[""] = fs::file_size(root);
  } else if (fs::is_directory(root)) {
    for (const auto& e : fs::recursive_directory_iterator(root))
      if (e.is_regular_file()) files[fs::relative(e.path(), root).generic_string()] = e.file_size();
  }
  return files;
}

std::string basename_of(const std::string& src) {
  std::string s = src;
  while (s.size() > 1 && s.back() == '/') s.pop_back();
  auto p = s.find_last_of('/');
  std::string b = p == std::string::npos ? s : s.substr(p + 1);
  if (b.empty() || b == "." || b == "..") fail(src, ": cannot take a folder name from this path");
  return b;
}

bool on_path(const std::string& cmd) {
  std::string path = env_or("PATH", "/usr/bin:/bin");
  size_t i = 0;
  while (i <= path.size()) {
    size_t j = path.find(':', i);
    if (j == std::string::npos) j = path.size();
    fs::path cand = fs::path(path.substr(i, j - i)) / cmd;
    if (::access(cand.c_str(), X_OK) == 0) return true;
    i = j + 1;
  }
  return false;
}

void run_hdfs_get(const std::string& src, const std::string& dst) {
  if (!on_path("hdfs"))
    fail(src, ": copying an hdfs:// path needs the `hdfs` command on PATH, and none was found");
  std::vector<std::string> args = {"hdfs", "dfs", "-get", src, dst};
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid;
  if (posix_spawnp(&pid, "hdfs", nullptr, nullptr, argv.data(), environ) != 0)
    fail(src, ": cannot start `hdfs dfs -get`");
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0) {
  }
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
    fail(src, ": `hdfs dfs -get ", src, " ", dst, "` failed (exit status ",
         WIFEXITED(status) ? WEXITSTATUS(status) : -1, ")");
  if (!fs::exists(dst)) fail(src, ": `hdfs dfs -get` succeeded but produced nothing at ", dst);
}

// Copy a remote source into the cache (once; concurrent callers wait on the lock).
std::string copy_to_cache(const std::string& src, const std::string& cache_dir) {
  fs::path dir = fs::path(cache_dir.empty() ? default_cache_dir() : cache_dir) / md5_hex(src);
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) fail(dir.string(), ": cannot create cache folder: ", ec.message());
  fs::path dst = dir / basename_of(src);
  fs::path manifest_path = dir / ".manifest.json";
  FileLock lock((dir / ".lock").string());
  if (fs::exists(dst) && fs::exists(manifest_path)) {
    try {
      json m = json::parse(read_text_file(manifest_path.string()));
      if (m.value("source", "") == src && m["files"] == tree_manifest(dst)) return dst.string();
    } catch (const std::exception&) {
      // unreadable manifest: copy again
    }
  }
  fs::remove(manifest_path, ec);
  fs::remove_all(dst, ec);
  fs::path tmp = dir / (".tmp-" + std::to_string(::getpid()) + "-" + basename_of(src));
  fs::remove_all(tmp, ec);
  if (starts_with(src, "hdfs://")) run_hdfs_get(src, tmp.string());
  else fail(src, ": unsupported remote scheme");
  fs::rename(tmp, dst, ec);
  if (ec) fail(dst.string(), ": cannot move the copy into place: ", ec.message());
  json m = {{"source", src}, {"files", tree_manifest(dst)}};
  fs::path mtmp = dir / ".manifest.json.tmp";
  write_text_file(mtmp.string(), m.dump(1));
  fs::rename(mtmp, manifest_path);
  return dst.string();
}

}  // namespace

std::string default_cache_dir() {
  std::string v = env_or("VERLCPP_CACHE", "");
  if (!v.empty()) return v;
  return env_or("HOME", "/tmp") + "/.cache/verlcpp";
}

std::string find_in_hf_cache(const std::string& model_id) {
  std::string hub = env_or("HF_HUB_CACHE", env_or("HUGGINGFACE_HUB_CACHE", ""));
  if (hub.empty()) hub = env_or("HF_HOME", env_or("HOME", "/tmp") + "/.cache/huggingface") + "/hub";
  std::string name = "models--" + model_id;
  for (size_t p; (p = name.find('/')) != std::string::npos;) name.replace(p, 1, "--");
  fs::path repo = fs::path(hub) / name;
  fs::path snaps = repo / "snapshots";
  if (!fs::is_directory(snaps)) return "";
  fs::path ref = repo / "refs" / "main";
  if (fs::exists(ref)) {
    std::string rev = read_text_file(ref.string());
    while (!rev.empty() && (rev.back() == '\n' || rev.back() == ' ')) rev.pop_back();
    if (fs::is_directory(snaps / rev)) return (snaps / rev).string();
  }
  // No refs/main: the most recently written snapshot.
  fs::path best;
  fs::file_time_type best_t{};
  for (const auto& e : fs::directory_iterator(snaps))
    if (e.is_directory() && (best.empty() || e.last_write_time() > best_t)) best = e.path(), best_t = e.last_write_time();
  return best.string();
}

std::string resolve_local_path(const std::string& src, const std::string& cache_dir) {
  if (src.empty()) fail("model path is empty");
  if (starts_with(src, "file://")) {
    std::string p = src.substr(7);
    if (!fs::exists(p)) fail(src, ": no such file or folder");
    return p;
  }
  if (starts_with(src, "hdfs://")) return copy_to_cache(src, cache_dir);
  auto scheme = src.find("://");
  if (scheme != std::string::npos)
    fail(src, ": unsupported scheme '", src.substr(0, scheme), "://' (supported: local paths, file://, hdfs://, HF model ids)");
  if (fs::exists(src)) return src;
  // "org/name" (or "name") that is not a local path: the offline HF cache.
  bool looks_like_id = !src.empty() && src[0] != '/' && src[0] != '.' &&
                       std::count(src.begin(), src.end(), '/') <= 1;
  if (looks_like_id) {
    std::string snap = find_in_hf_cache(src);
    if (!snap.empty()) return snap;
    fail(src, ": not a local path, and not found in the offline HuggingFace cache (",
         env_or("HF_HOME", "$HOME/.cache/huggingface"), "/hub/models--", [&] {
           std::string n = src;
           for (size_t p; (p = n.find('/')) != std::string::npos;) n.replace(p, 1, "--");
           return n;
         }(), ")");
  }
  fail(src, ": no such file or folder");
}

ModelPaths resolve_model_paths(const std::string& path, const std::string& hf_config_path,
                               const std::string& tokenizer_path, const std::string& cache_dir) {
  ModelPaths p;
  p.path = path;
  p.hf_config_path = hf_config_path.empty() ? path : hf_config_path;
  p.tokenizer_path = tokenizer_path.empty() ? path : tokenizer_path;
  p.local_path = resolve_local_path(p.path, cache_dir);
  p.local_hf_config_path = p.hf_config_path == p.path ? p.local_path : resolve_local_path(p.hf_config_path, cache_dir);
  p.local_tokenizer_path = p.tokenizer_path == p.path ? p.local_path : resolve_local_path(p.tokenizer_path, cache_dir);
  return p;
}

}  // namespace verl
