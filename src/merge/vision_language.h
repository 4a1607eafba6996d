// vision_language.h — what the FSDP merger knows of vision-language models (Qwen2-VL,
// Qwen2.5-VL, as verl's merger loads them with AutoModelForVision2Seq): the names their
// tensors get in the merged folder, and the check of the vision tower against config.json.
//
// Names: transformers >= 4.52 (and 5) keeps the language model under `model.language_model.`
// and the vision tower under `model.visual.`, so verl's FSDP shards hold those names; older
// releases hold `model.` and `visual.`. save_pretrained writes the older names (it reverses
// the model's checkpoint conversion mapping), every transformers release loads them, and so
// does verl's own merger output: the merged folder uses them too.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "hf/config.h"

namespace verl {

// The merged-folder name of checkpoint tensor `name` of a model of architecture `arch`
// (unchanged unless `arch` is one of vision_language_architectures()).
std::string vision_language_saved_name(const std::string& arch, const std::string& name);

// The vision tower must be the one config.json describes: a vision_config if and only if the
// checkpoint has `visual.*` (or `model.visual.*`) tensors; for the known architectures, that
// architecture's block layout, and depth, width and output width equal to the tensors'.
// `names` are the merged names; `shape` gives a merged tensor's shape (nullptr: absent).
// Fails with one line naming `cfg_path`, the field and the tensor; `hint` ends the line.
void check_vision_tower(const ConfigShapes& cfg, const std::string& cfg_path, const std::vector<std::string>& names,
                        const std::function<const std::vector<int64_t>*(const std::string&)>& shape,
                        const std::string& hint);

}  // namespace verl
