// vision_language.cpp — see vision_language.h.
#include "merge/vision_language.h"

#include <set>

#include "core/error.h"

namespace verl {

namespace {
bool starts_with(const std::string& s, const std::string& p) { return s.compare(0, p.size(), p) == 0; }

// One tensor of a vision block that only this architecture's tower has.
const char* block_marker(const std::string& arch) {
  if (arch == "Qwen2VLForConditionalGeneration") return "mlp.fc1.weight";       // Qwen2VLVisionBlock: fc1 / fc2
  if (arch == "Qwen2_5_VLForConditionalGeneration") return "mlp.gate_proj.weight";  // Qwen2_5_VLVisionBlock: SwiGLU
  return nullptr;
}
}  // namespace

std::string vision_language_saved_name(const std::string& arch, const std::string& name) {
  if (!is_vision_language_architecture(arch)) return name;
  static const std::string lm = "model.language_model.", vis = "model.visual.";
  if (starts_with(name, lm)) return "model." + name.substr(lm.size());
  if (starts_with(name, vis)) return "visual." + name.substr(vis.size());
  return name;
}

void check_vision_tower(const ConfigShapes& cfg, const std::string& c, const std::vector<std::string>& names,
                        const std::function<const std::vector<int64_t>*(const std::string&)>& shape,
                        const std::string& hint) {
  std::string prefix;  // "visual." (merged names) or "model.visual." (an architecture we do not rename)
  for (const auto& n : names)
    for (const char* p : {"visual.", "model.visual."})
      if (prefix.empty() && starts_with(n, p)) prefix = p;
  const std::string arch = cfg.architecture.empty() ? std::string("(none)") : cfg.architecture;
  if (prefix.empty()) {
    if (cfg.vision)
      fail(c, ": architecture ", arch, " has a vision_config but the checkpoint has no vision tower (no visual.* ",
           "tensors)", hint);
    return;
  }
  if (!cfg.vision)
    fail(c, ": the checkpoint has a vision tower (", prefix, "* tensors) but the config (architecture ", arch,
         ") has no vision_config", hint);
  std::set<int64_t> blocks;
  const std::string bp = prefix + "blocks.";
  for (const auto& n : names) {
    if (!starts_with(n, bp)) continue;
    const std::string num = n.substr(bp.size(), n.find('.', bp.size()) - bp.size());
    if (!num.empty() && num.size() < 9 && num.find_first_not_of("0123456789") == std::string::npos)
      blocks.insert(std::stoll(num));
  }
  if (const char* marker = block_marker(cfg.architecture); marker && !blocks.empty()) {
    const std::string want = bp + std::to_string(*blocks.begin()) + "." + marker;
    if (!shape(want))
      fail(c, ": architecture ", arch, " but the checkpoint's vision blocks have no ", want,
           " (the vision tower of another model)", hint);
  }
  if (cfg.vision_depth && !blocks.empty() && static_cast<int64_t>(blocks.size()) != *cfg.vision_depth)
    fail(c, ": vision_config.depth ", *cfg.vision_depth, " but the checkpoint has ", blocks.size(), " vision blocks",
         hint);
  const std::string patch = prefix + "patch_embed.proj.weight";
  if (const auto* p = shape(patch); p && !p->empty() && cfg.vision_width && (*p)[0] != *cfg.vision_width)
    fail(c, ": the vision width in vision_config is ", *cfg.vision_width, " but the checkpoint's ", patch, " has ",
         (*p)[0], " rows", hint);
  const std::string out = prefix + "merger.mlp.2.weight";
  if (const auto* o = shape(out); o && !o->empty() && cfg.vision_out && (*o)[0] != *cfg.vision_out)
    fail(c, ": the vision output width in vision_config is ", *cfg.vision_out, " but the checkpoint's ", out,
         " has ", (*o)[0], " rows", hint);
}

}  // namespace verl
