// paths.h — turn the model's `path`, `hf_config_path` and `tokenizer_path` into local copies.
// Local folders and file:// pass through; hdfs:// is copied with `hdfs dfs -get`; a
// HuggingFace model id ("org/name") is found in the offline HF cache. Remote copies land in
// <cache>/<md5(src)>/<basename> under a file lock with a manifest re-checked on reuse. The
// model is then always built from the local_* paths (verl's seed fix), never the remote ones.
#pragma once
#include <string>

namespace verl {

struct ModelPaths {
  std::string path, hf_config_path, tokenizer_path;                    // as given
  std::string local_path, local_hf_config_path, local_tokenizer_path;  // resolved
};

// Cache root: `cache_dir` if non-empty, else $VERLCPP_CACHE, else $HOME/.cache/verlcpp.
std::string default_cache_dir();
// One path → its local copy (copying if remote). Throws Error with a clear message.
std::string resolve_local_path(const std::string& src, const std::string& cache_dir = "");
// hf_config_path and tokenizer_path default to path when empty.
ModelPaths resolve_model_paths(const std::string& path, const std::string& hf_config_path = "",
                               const std::string& tokenizer_path = "", const std::string& cache_dir = "");
// The snapshot folder of an HF model id in the offline cache, or "" if absent.
std::string find_in_hf_cache(const std::string& model_id);

}  // namespace verl
