// folder.h — a HuggingFace model folder's weights (model.safetensors, or shards listed
// by model.safetensors.index.json), opened lazily and looked up by tensor name.
#pragma once
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "io/safetensors.h"

namespace verl {

class HfFolder {
 public:
  explicit HfFolder(const std::string& dir);
  const std::string& dir() const { return dir_; }
  std::vector<std::string> names() const;  // sorted
  bool contains(const std::string& name) const { return where_.count(name) > 0; }
  // The reader holding `name` and its entry (throws Error naming the folder if absent).
  std::pair<const SafetensorsReader*, const StTensor*> find(const std::string& name) const;

 private:
  std::string dir_;
  std::vector<std::unique_ptr<SafetensorsReader>> files_;
  std::map<std::string, size_t> where_;  // name -> index into files_
};

}  // namespace verl
