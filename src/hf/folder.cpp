// folder.cpp — see folder.h.
#include "hf/folder.h"

#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/json_file.h"

namespace fs = std::filesystem;

namespace verl {

HfFolder::HfFolder(const std::string& dir) : dir_(dir) {
  if (!fs::is_directory(dir)) fail(dir, ": no such model folder");
  const fs::path index = fs::path(dir) / "model.safetensors.index.json";
  std::vector<std::string> files;
  if (fs::exists(index)) {
    const nlohmann::json j = read_json_file(index.string());
    if (!j.contains("weight_map") || !j["weight_map"].is_object()) fail(index.string(), ": no weight_map object");
    std::map<std::string, size_t> file_idx;
    for (auto& [name, f] : j["weight_map"].items()) {
      if (!f.is_string()) fail(index.string(), ": weight_map['", name, "'] is not a file name");
      const std::string fn = f.get<std::string>();
      if (fn.find('/') != std::string::npos || fn == "..") fail(index.string(), ": weight_map names a path outside the folder: ", fn);
      if (!file_idx.count(fn)) {
        file_idx[fn] = files_.size();
        files_.push_back(std::make_unique<SafetensorsReader>((fs::path(dir) / fn).string()));
      }
      const auto& r = *files_[file_idx[fn]];
      if (!r.find(name)) fail(r.path(), ": tensor '", name, "' listed in the index is not in the file");
      where_[name] = file_idx[fn];
    }
  } else if (fs::exists(fs::path(dir) / "model.safetensors")) {
    files_.push_back(std::make_unique<SafetensorsReader>((fs::path(dir) / "model.safetensors").string()));
    for (const auto& t : files_[0]->tensors()) where_[t.name] = 0;
  } else {
    fail(dir, ": no model.safetensors or model.safetensors.index.json");
  }
}

std::vector<std::string> HfFolder::names() const {
  std::vector<std::string> n;
  for (const auto& [k, v] : where_) n.push_back(k);
  return n;
}

std::pair<const SafetensorsReader*, const StTensor*> HfFolder::find(const std::string& name) const {
  auto it = where_.find(name);
  if (it == where_.end()) fail(dir_, ": no tensor '", name, "'");
  const SafetensorsReader* r = files_[it->second].get();
  return {r, r->find(name)};
}

}  // namespace verl
