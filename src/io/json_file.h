// json_file.h — a whole JSON file parsed, or one Error naming the file ("invalid JSON: …").
// The one reader of config.json, fsdp_config.json, index and manifest files.
#pragma once
#include <nlohmann/json.hpp>
#include <string>

#include "core/error.h"
#include "io/file.h"

namespace verl {

template <class Json = nlohmann::json>
Json read_json_file(const std::string& path) {
  const std::string text = read_text_file(path);
  try {
    return Json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    fail(path, ": invalid JSON: ", e.what());
  }
}

}  // namespace verl
