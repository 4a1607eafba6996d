// train_config.cpp — `verlcpp train`'s settings (see train_config.h): one table of keys
// (verl path, section, type, range, default, meaning), the names each key is accepted by,
// YAML + override parsing with a check of every value when it is read, and the resolution
// of the trained role's settings into TrainSettings (EngineConfig, loss settings, job).
//
// Resolution: every assignment (file first, then the overrides in order) is kept with its
// target — a job key, the actor's, the critic's, or "the trained model's" (a key written
// without a section). A setting of the trained role takes the last assignment aimed at that
// role or at the trained model; the other role's are checked and unused.
#ifdef VERLCPP_WITH_TORCH
#include "cli/train_config.h"

#include <yaml-cpp/yaml.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <map>
#include <optional>
#include <sstream>
#include <tuple>

#include "engine/losses.h"
#include "core/error.h"

namespace verl {

namespace {

enum class Sec { Job, Role, Engine, Model };
enum class Kind { Str, Int, Num, Bool, Pair };
constexpr int kActor = 1, kCritic = 2, kBoth = 3;

struct KeySpec {
  const char* path;     // Job: the full verl path; else the path inside the section
  Sec sec;
  Kind kind;
  const char* def;      // "" with no default: unset (required, or optional where said)
  const char* range;    // Int / Num / Pair: "[lo,hi)" (inf bounds; a "-1|" prefix also allows -1); Str: "a|b|c"
  const char* help;
  const char* aliases;  // more accepted names, space-separated: inside the section, or "=x.y" a full path
  int roles;            // sections that have this key
  void (*check)(const std::string&);
};

void check_task(const std::string& s) { (void)find_task(s); }
void check_agg(const std::string& s) { (void)parse_loss_agg_mode(s); }
// The device's spelling only; whether such a device is there is checked when the engine is built.
void check_device_name(const std::string& s) {
  const bool index = s.size() > 5 && s.compare(0, 5, "cuda:") == 0 &&
                     s.find_first_not_of("0123456789", 5) == std::string::npos && s.size() <= 8;
  if (s != "cpu" && s != "cuda" && !index) fail("unknown device '", s, "' (expected cpu, cuda or cuda:N)");
}

// clang-format off
const KeySpec kKeys[] = {
  // The job: data order, steps, checkpoints, processes.
  {"task", Sec::Job, Kind::Str, "sft", "", "sft (SFT loss) | ppo (PPO/GRPO policy update; advantages come in the data) | value (value-model update). sft and ppo train the actor, value the critic", "", kBoth, check_task},
  {"data.train_files", Sec::Job, Kind::Str, "", "", "data file (safetensors, see the README) (required)", "", kBoth, nullptr},
  {"data.train_batch_size", Sec::Job, Kind::Int, "8", "[1,inf)", "sequences per optimizer step, over all ranks (a multiple of the ranks)", "", kBoth, nullptr},
  {"data.shuffle", Sec::Job, Kind::Bool, "true", "", "shuffle the data every epoch (seeded)", "", kBoth, nullptr},
  {"data.seed", Sec::Job, Kind::Int, "1", "[0,inf)", "data order seed", "", kBoth, nullptr},
  {"trainer.total_training_steps", Sec::Job, Kind::Int, "10", "[1,inf)", "optimizer steps", "", kBoth, nullptr},
  {"trainer.save_freq", Sec::Job, Kind::Int, "-1", "-1|[1,inf)", "save a checkpoint every N steps (-1: only at the end)", "", kBoth, nullptr},
  {"trainer.default_local_dir", Sec::Job, Kind::Str, "checkpoints", "", "checkpoint folder (global_step_N/<role>/ inside)", "", kBoth, nullptr},
  {"trainer.max_ckpt_to_keep", Sec::Job, Kind::Int, "-1", "-1|[1,inf)", "keep only the newest N checkpoints (-1: all)", "", kBoth, nullptr},
  {"trainer.resume_mode", Sec::Job, Kind::Str, "auto", "auto|disable|resume_path", "auto: the latest checkpoint of default_local_dir if any; resume_path: resume_from_path", "", kBoth, nullptr},
  {"trainer.resume_from_path", Sec::Job, Kind::Str, "", "", "a global_step_N folder (resume_mode resume_path)", "", kBoth, nullptr},
  {"trainer.metrics_file", Sec::Job, Kind::Str, "", "", "JSON-lines metrics (default: <default_local_dir>/metrics.jsonl)", "", kBoth, nullptr},
  {"trainer.collective_timeout", Sec::Job, Kind::Num, "600", "(0,inf)", "seconds before a stalled collective aborts the job", "=actor_rollout_ref.nccl_timeout", kBoth, nullptr},
  {"trainer.comm_backend", Sec::Job, Kind::Str, "auto", "auto|mpi|nccl|local", "auto: MPI under mpirun / srun (NCCL when the engine's device is cuda), else one process", "", kBoth, nullptr},
  {"trainer.num_threads", Sec::Job, Kind::Int, "0", "[0,4096]", "CPU threads per rank (0: cores / ranks on this node)", "", kBoth, nullptr},
  {"trainer.stop_after_steps", Sec::Job, Kind::Int, "-1", "-1|[1,inf)", "stop (after saving) once this many steps ran in this process (for tests)", "", kBoth, nullptr},
  {"actor_rollout_ref.rollout.temperature", Sec::Job, Kind::Num, "1.0", "(0,inf)", "temperature of the log-probs (as the rollout sampled)", "", kBoth, nullptr},
  // The trained model's folder.
  {"path", Sec::Model, Kind::Str, "", "", "local folder, file://, hdfs:// or a HuggingFace id in the offline cache (required)", "", kBoth, nullptr},
  {"hf_config_path", Sec::Model, Kind::Str, "", "", "config folder (default: path)", "", kBoth, nullptr},
  {"enable_gradient_checkpointing", Sec::Model, Kind::Bool, "false", "", "recompute each decoder layer in backward", "", kBoth, nullptr},
  // The trained role: optimizer, micro-batching, loss.
  {"optim.lr", Sec::Role, Kind::Num, "1e-5", "[0,inf)", "peak learning rate", "", kBoth, nullptr},
  {"optim.weight_decay", Sec::Role, Kind::Num, "0.01", "[0,inf)", "AdamW decoupled weight decay", "", kBoth, nullptr},
  {"optim.betas", Sec::Role, Kind::Pair, "0.9,0.999", "[0,1)", "AdamW betas: beta1,beta2 (or a YAML list)", "", kBoth, nullptr},
  {"optim.eps", Sec::Role, Kind::Num, "1e-8", "(0,inf)", "AdamW epsilon", "", kBoth, nullptr},
  {"optim.lr_warmup_steps", Sec::Role, Kind::Int, "-1", "", "warmup steps (<= 0: lr_warmup_steps_ratio x total_training_steps)", "", kBoth, nullptr},
  {"optim.lr_warmup_steps_ratio", Sec::Role, Kind::Num, "0.0", "[0,1]", "warmup as a fraction of total_training_steps", "", kBoth, nullptr},
  {"optim.lr_scheduler_type", Sec::Role, Kind::Str, "constant", "constant|cosine|linear", "LR schedule after warmup", "optim.warmup_style", kBoth, nullptr},
  {"optim.min_lr_ratio", Sec::Role, Kind::Num, "0.0", "[0,1]", "cosine / linear floor, as a fraction of lr", "", kBoth, nullptr},
  {"optim.num_cycles", Sec::Role, Kind::Num, "0.5", "[0,inf)", "cosine cycles", "", kBoth, nullptr},
  {"grad_clip", Sec::Role, Kind::Num, "1.0", "[0,inf)", "global gradient-norm clip (0: no clipping, as HF's Trainer)", "optim.clip_grad", kBoth, nullptr},
  {"ppo_micro_batch_size_per_gpu", Sec::Role, Kind::Int, "2", "[1,inf)", "sequences per micro-batch (fixed micro-batching)", "micro_batch_size_per_gpu =data.micro_batch_size_per_gpu", kBoth, nullptr},
  {"use_dynamic_bsz", Sec::Role, Kind::Bool, "false", "", "token-balanced micro-batches of at most ppo_max_token_len_per_gpu tokens", "=data.use_dynamic_bsz", kBoth, nullptr},
  {"ppo_max_token_len_per_gpu", Sec::Role, Kind::Int, "16384", "[1,inf)", "token budget of a micro-batch with use_dynamic_bsz", "max_token_len_per_gpu =data.max_token_len_per_gpu", kBoth, nullptr},
  {"ulysses_sequence_parallel_size", Sec::Role, Kind::Int, "1", "[1,inf)", "Ulysses sequence parallelism: groups of this many consecutive ranks share each micro-batch, a slice of the row each (divides the world; num_attention_heads divisible by it)", "fsdp_config.ulysses_sequence_parallel_size =engine.ulysses_sequence_parallel_size", kBoth, nullptr},
  {"loss_agg_mode", Sec::Role, Kind::Str, "token-mean", "", "token-mean | token-sum | seq-mean-token-sum | seq-mean-token-mean | seq-mean-token-sum-norm", "", kBoth, check_agg},
  {"clip_ratio", Sec::Role, Kind::Num, "0.2", "[0,1]", "PPO clip", "", kActor, nullptr},
  {"clip_ratio_low", Sec::Role, Kind::Num, "", "[0,1]", "PPO lower clip (default: clip_ratio)", "", kActor, nullptr},
  {"clip_ratio_high", Sec::Role, Kind::Num, "", "[0,inf)", "PPO upper clip (default: clip_ratio)", "", kActor, nullptr},
  {"clip_ratio_c", Sec::Role, Kind::Num, "3.0", "(1,inf)", "dual-clip bound", "", kActor, nullptr},
  {"entropy_coeff", Sec::Role, Kind::Num, "0.0", "", "entropy bonus coefficient", "", kActor, nullptr},
  {"use_kl_loss", Sec::Role, Kind::Bool, "false", "", "add kl_loss_coef x KL(policy || ref) (needs ref_log_probs in the data)", "", kActor, nullptr},
  {"kl_loss_coef", Sec::Role, Kind::Num, "0.001", "[0,inf)", "KL loss coefficient", "", kActor, nullptr},
  {"kl_loss_type", Sec::Role, Kind::Str, "low_var_kl", "", "kl (k1) | abs | mse (k2) | low_var_kl (k3), each optionally with + (straight-through)", "", kActor, check_kl_penalty_type},
  {"freeze_vision_tower", Sec::Role, Kind::Bool, "false", "", "vision-language models: the vision tower (patch embedding, blocks, merger) gets no gradient and no optimizer state", "", kBoth, nullptr},
  {"cliprange_value", Sec::Role, Kind::Num, "0.5", "[0,inf)", "value clip", "", kCritic, nullptr},
  // The trained model's engine (FSDP).
  {"dtype", Sec::Engine, Kind::Str, "fp32", "", "compute dtype: fp32, or bf16 (mixed precision: fp32 master weights and gradients); fp16 is not implemented", "param_dtype mixed_precision.param_dtype", kBoth, check_param_dtype},
  {"device", Sec::Engine, Kind::Str, "cpu", "", "where the engine computes: cpu, cuda (this rank's current GPU; under mpirun the local rank's) or cuda:N; with cuda and mpirun the collectives run over NCCL", "=trainer.device", kBoth, check_device_name},
  {"fsdp_size", Sec::Engine, Kind::Int, "-1", "-1|[1,inf)", "ranks per shard group: -1 all, else a divisor of the world (hybrid sharding)", "", kBoth, nullptr},
  {"expert_parallel_size", Sec::Engine, Kind::Int, "1", "[1,inf)", "MoE: experts split over groups of this many consecutive ranks (a divisor of the world and of num_experts; not with hybrid sharding)", "", kBoth, nullptr},
  // VeOmni's engine fields (verl's VeOmniEngineConfig), as far as they apply on the CPU.
  {"init_device", Sec::Engine, Kind::Str, "meta", "meta|cpu", "where parameters are built: meta and cpu both read each rank's shard straight from the safetensors files (no rank holds the model); cuda / npu are not available in this build", "", kBoth, nullptr},
  {"basic_modules", Sec::Engine, Kind::Str, "", "", "extra FSDP wrap units by class name (a YAML list or A,B), added to the model's own no-split units: its decoder-layer class (e.g. Qwen3MoeDecoderLayer) is already a unit and accepted; any other class is refused", "", kBoth, nullptr},
  {"enable_full_shard", Sec::Engine, Kind::Bool, "true", "", "false: no sharding, every rank holds a whole replica and gradients are averaged (DDP; fsdp_size 1)", "", kBoth, nullptr},
  {"enable_reentrant", Sec::Engine, Kind::Bool, "true", "", "accepted: gradient checkpointing recomputes each layer in its backward either way (same numbers)", "", kBoth, nullptr},
  {"enable_fsdp_offload", Sec::Engine, Kind::Bool, "false", "", "accepted: parameters already live in host memory on the CPU", "", kBoth, nullptr},
  {"moe_implementation", Sec::Engine, Kind::Str, "fused", "eager|fused", "MoE experts: both run the one grouped implementation (each expert's matmuls over the tokens routed to it)", "", kBoth, nullptr},
  {"attn_implementation", Sec::Engine, Kind::Str, "sdpa", "eager|sdpa|flash_attention_2|flash_attention_3", "attention is SDPA within each packed sequence on the CPU whatever the name (the same math)", "", kBoth, nullptr},
  {"reshard_after_forward", Sec::Engine, Kind::Bool, "true", "", "free each unit's gathered parameters after its forward", "", kBoth, nullptr},
  {"forward_prefetch", Sec::Engine, Kind::Bool, "false", "", "accepted (collectives are blocking here)", "", kBoth, nullptr},
  {"param_offload", Sec::Engine, Kind::Bool, "false", "", "accepted: parameters already live in host memory on the CPU", "", kBoth, nullptr},
  {"optimizer_offload", Sec::Engine, Kind::Bool, "false", "", "accepted: optimizer state already lives in host memory on the CPU", "", kBoth, nullptr},
};
// clang-format on
constexpr int kNumKeys = static_cast<int>(sizeof(kKeys) / sizeof(kKeys[0]));

// Where the keys of a section live, per role, and without a section.
struct Section {
  const char* actor;
  const char* critic;
  const char* critic_alt;  // nullptr: none
  const char* unscoped;
};
const Section& section(Sec s) {
  static const Section role{"actor_rollout_ref.actor.", "critic.", nullptr, ""};
  static const Section engine{"actor_rollout_ref.actor.fsdp_config.", "critic.fsdp.", "critic.model.fsdp_config.", "engine."};
  static const Section model{"actor_rollout_ref.model.", "critic.model.", nullptr, "model."};
  static const Section job{"", "", nullptr, ""};
  return s == Sec::Role ? role : s == Sec::Engine ? engine : s == Sec::Model ? model : job;
}

enum class Who { Job, Actor, Critic, Trained };
struct Target {
  int spec;
  Who who;
};

std::string last_part(const std::string& k) { return k.substr(k.rfind('.') == std::string::npos ? 0 : k.rfind('.') + 1); }

std::vector<std::string> split_ws(const char* s) {
  std::istringstream is(s);
  std::vector<std::string> v;
  for (std::string w; is >> w;) v.push_back(w);
  return v;
}

// Every accepted name of every key → what it sets.
class Registry {
 public:
  static const Registry& get() {
    static const Registry r;
    return r;
  }
  const Target* find(const std::string& key) const {
    auto it = names_.find(key);
    return it == names_.end() ? nullptr : &it->second;
  }

 private:
  std::map<std::string, Target> names_;
  void add(const std::string& name, Target t) {
    auto [it, fresh] = names_.emplace(name, t);
    if (!fresh && (it->second.spec != t.spec || it->second.who != t.who)) fail("internal: config name '", name, "' is ambiguous");
  }
  Registry() {
    for (int i = 0; i < kNumKeys; ++i) {
      const KeySpec& k = kKeys[i];
      std::vector<std::string> rel = {k.path}, full;
      for (const auto& a : split_ws(k.aliases)) (a[0] == '=' ? full : rel).push_back(a[0] == '=' ? a.substr(1) : a);
      const Section& s = section(k.sec);
      const Who unscoped = k.sec == Sec::Job ? Who::Job : Who::Trained;
      for (const auto& r : rel) {
        if (k.sec != Sec::Job && (k.roles & kActor)) add(s.actor + r, {i, Who::Actor});
        if (k.sec != Sec::Job && (k.roles & kCritic)) add(s.critic + r, {i, Who::Critic});
        if (k.sec != Sec::Job && (k.roles & kCritic) && s.critic_alt) add(s.critic_alt + r, {i, Who::Critic});
        add(s.unscoped + r, {i, unscoped});
        add(last_part(r), {i, unscoped});
      }
      for (const auto& f : full) add(f, {i, unscoped});
    }
  }
};

int spec_index(const std::string& path) {
  for (int i = 0; i < kNumKeys; ++i)
    if (path == kKeys[i].path) return i;
  fail("internal: no config key ", path);
}

// The verl path of a key in the given role's section.
std::string canonical(const KeySpec& k, Who role) {
  const Section& s = section(k.sec);
  return std::string(role == Who::Critic ? s.critic : s.actor) + k.path;
}

// Numeric range: "" (any), "[lo,hi)" with inf bounds, a "-1|" prefix also allowing -1.
struct Range {
  bool any = true, minus_one = false, lo_in = true, hi_in = true;
  double lo = -INFINITY, hi = INFINITY;
  explicit Range(std::string r) {
    if (r.empty()) return;
    any = false;
    if (r.rfind("-1|", 0) == 0) minus_one = true, r = r.substr(3);
    lo_in = r.front() == '[';
    hi_in = r.back() == ']';
    const std::string body = r.substr(1, r.size() - 2);
    const std::string a = body.substr(0, body.find(',')), b = body.substr(body.find(',') + 1);
    lo = a == "-inf" ? -INFINITY : std::stod(a);
    hi = b == "inf" ? INFINITY : std::stod(b);
  }
  bool ok(double v) const {
    if (any || (minus_one && v == -1)) return true;
    return (lo_in ? v >= lo : v > lo) && (hi_in ? v <= hi : v < hi);
  }
  std::string describe() const {
    auto num = [](double d) {
      std::ostringstream os;
      os << d;
      return os.str();
    };
    std::string s = minus_one ? "-1 or " : "";
    if (std::isinf(hi)) return s + (lo_in ? ">= " : "> ") + num(lo);
    return s + "in " + (lo_in ? "[" : "(") + num(lo) + ", " + num(hi) + (hi_in ? "]" : ")");
  }
};

std::string trim(const std::string& s) {
  const size_t b = s.find_first_not_of(" \t\r\n"), e = s.find_last_not_of(" \t\r\n");
  return b == std::string::npos ? "" : s.substr(b, e - b + 1);
}

std::optional<double> parse_number(const std::string& s) {
  if (s.empty()) return std::nullopt;
  char* end = nullptr;
  errno = 0;
  const double d = std::strtod(s.c_str(), &end);
  if (end != s.c_str() + s.size() || errno == ERANGE || !std::isfinite(d)) return std::nullopt;
  return d;
}

double checked_number(const KeySpec& k, const std::string& v, bool integer) {
  const std::optional<double> d = parse_number(v);
  const Range r(k.range);
  const std::string want = std::string(integer ? "an integer" : "a finite number") + (r.any ? "" : " " + r.describe());
  if (!d || (integer && (*d != std::floor(*d) || std::fabs(*d) > 9e15 || v.find_first_of(".eE") != std::string::npos)))
    fail("expected ", want, ", got '", v, "'");
  if (!r.ok(*d)) fail("expected ", want, ", got ", v);
  return *d;
}

// The value checked against its key's type and range, in a canonical spelling.
std::string normalize(const KeySpec& k, const std::string& v) {
  switch (k.kind) {
    case Kind::Int:
    case Kind::Num: checked_number(k, v, k.kind == Kind::Int); return v;
    case Kind::Bool: {
      std::string s = v;
      for (auto& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
      if (s == "true" || s == "1" || s == "yes" || s == "on") return "true";
      if (s == "false" || s == "0" || s == "no" || s == "off") return "false";
      fail("expected true or false, got '", v, "'");
    }
    case Kind::Pair: {
      std::string s = v;
      if (s.size() >= 2 && s.front() == '[' && s.back() == ']') s = s.substr(1, s.size() - 2);
      const size_t comma = s.find(',');
      if (comma == std::string::npos || s.find(',', comma + 1) != std::string::npos)
        fail("expected two numbers 'a,b' (or a YAML list), got '", v, "'");
      const std::string a = trim(s.substr(0, comma)), b = trim(s.substr(comma + 1));
      checked_number(k, a, false);
      checked_number(k, b, false);
      return a + "," + b;
    }
    case Kind::Str: break;
  }
  if (*k.range) {
    const std::string choices = std::string("|") + k.range + "|";
    if (choices.find("|" + v + "|") == std::string::npos) fail("expected one of ", k.range, ", got '", v, "'");
  }
  if (k.check) k.check(v);
  return v;
}

struct Assign {
  int spec;
  Who who;
  bool unset;         // null / empty: back to the default
  std::string value;  // normalized
};

// The assignments in order, and their resolution for the trained role.
class Values {
 public:
  void set(const std::string& key, const std::string& raw, bool null, const std::string& origin) {
    const Target* t = Registry::get().find(key);
    if (!t) fail(origin, ": unknown config key '", key, "' (", hint(key), "see `verlcpp train --help` for the keys)");
    const std::string v = trim(raw);
    const bool unset = null || v.empty() || v == "null" || v == "~";
    std::string norm;
    if (!unset) {
      try {
        norm = normalize(kKeys[t->spec], v);
      } catch (const Error& e) {
        fail("config key ", key, " (", origin, "): ", e.what());
      }
    }
    a_.push_back({t->spec, t->who, unset, norm});
  }
  void bind(Who role) { role_ = role; }
  // The value (or default) of a key for the bound role; nullopt when unset without a default.
  std::optional<std::string> raw(const std::string& path) const {
    const int i = spec_index(path);
    for (auto it = a_.rbegin(); it != a_.rend(); ++it) {
      if (it->spec != i || (it->who != Who::Job && it->who != Who::Trained && it->who != role_)) continue;
      if (!it->unset) return it->value;
      break;
    }
    if (*kKeys[i].def) return std::string(kKeys[i].def);
    return std::nullopt;
  }
  std::string str(const std::string& p) const { return raw(p).value_or(""); }
  double num(const std::string& p) const { return std::stod(str(p)); }
  int64_t integer(const std::string& p) const { return std::stoll(str(p)); }
  bool flag(const std::string& p) const { return str(p) == "true"; }
  std::pair<double, double> pair(const std::string& p) const {
    const std::string s = str(p);
    return {std::stod(s.substr(0, s.find(','))), std::stod(s.substr(s.find(',') + 1))};
  }
  // Every key of this job by its verl path.
  nlohmann::json effective() const {
    nlohmann::json j = nlohmann::json::object();
    for (const KeySpec& k : kKeys) {
      if (k.sec != Sec::Job && !(k.roles & (role_ == Who::Critic ? kCritic : kActor))) continue;
      j[k.sec == Sec::Job ? std::string(k.path) : canonical(k, role_)] = str(k.path);
    }
    return j;
  }
  std::string name(const std::string& path) const {
    const KeySpec& k = kKeys[spec_index(path)];
    return k.sec == Sec::Job ? k.path : canonical(k, role_);
  }

 private:
  std::vector<Assign> a_;
  Who role_ = Who::Trained;
  static std::string hint(const std::string& key) {
    const Target* t = Registry::get().find(last_part(key));
    if (!t || key == last_part(key)) return "";
    const KeySpec& k = kKeys[t->spec];
    if (k.sec == Sec::Job) return std::string("did you mean ") + k.path + "? ";
    std::string h = std::string(k.path) + " is a key of ";
    if (k.roles & kActor) h += canonical(k, Who::Actor);
    if (k.roles == kBoth) h += " and ";
    if (k.roles & kCritic) h += canonical(k, Who::Critic);
    return h + "; ";
  }
};

void walk_yaml(const YAML::Node& n, const std::string& prefix, Values& c, const std::string& file) {
  if (n.IsMap()) {
    for (const auto& kv : n) {
      const std::string k = kv.first.as<std::string>();
      walk_yaml(kv.second, prefix.empty() ? k : prefix + "." + k, c, file);
    }
  } else if (prefix.empty()) {
    if (!n.IsNull()) fail(file, ": expected a mapping of config keys");
  } else if (n.IsScalar()) {
    c.set(prefix, n.as<std::string>(), false, file);
  } else if (n.IsSequence()) {
    std::string s;
    for (const auto& e : n) {
      if (!e.IsScalar()) fail("config key ", prefix, " (", file, "): expected a list of plain values");
      s += (s.empty() ? "" : ",") + e.as<std::string>();
    }
    c.set(prefix, s, false, file);
  } else {
    c.set(prefix, "", true, file);
  }
}

Values read_values(const TrainArgs& a) {
  Values v;
  if (!a.config_file.empty()) {
    YAML::Node root;
    try {
      root = YAML::LoadFile(a.config_file);
    } catch (const YAML::Exception& e) {
      fail(a.config_file, ": ", e.what());
    }
    walk_yaml(root, "", v, a.config_file);
  }
  for (const auto& o : a.overrides) {
    const auto eq = o.find('=');
    if (eq == std::string::npos || eq == 0) fail("command line: '", o, "': expected key=value");
    v.set(trim(o.substr(0, eq)), o.substr(eq + 1), false, "command line");
  }
  return v;
}

void read_job(const Values& v, TrainSettings& s) {
  s.model_path = v.str("path");
  s.hf_config_path = v.str("hf_config_path");
  if (s.model_path.empty()) fail("config: the model is required: ", v.name("path"), " (or path=...)");
  s.train_files = v.str("data.train_files");
  if (s.train_files.empty()) fail("config: data.train_files is required (the safetensors data file)");
  s.train_batch_size = v.integer("data.train_batch_size");
  s.shuffle = v.flag("data.shuffle");
  s.seed = v.integer("data.seed");
  s.total_training_steps = v.integer("trainer.total_training_steps");
  s.save_freq = v.integer("trainer.save_freq");
  s.stop_after_steps = v.integer("trainer.stop_after_steps");
  s.max_ckpt_to_keep = static_cast<int>(v.integer("trainer.max_ckpt_to_keep"));
  s.ckpt_dir = v.str("trainer.default_local_dir");
  if (s.ckpt_dir.empty()) fail("config: trainer.default_local_dir must not be empty");
  s.resume_mode = v.str("trainer.resume_mode");
  s.resume_from_path = v.str("trainer.resume_from_path");
  if (s.resume_mode == "resume_path" && s.resume_from_path.empty())
    fail("config: trainer.resume_mode resume_path needs trainer.resume_from_path");
  s.metrics_file = v.str("trainer.metrics_file");
  s.comm.backend = v.str("trainer.comm_backend");
  s.comm.timeout_s = v.num("trainer.collective_timeout");
  s.num_threads = static_cast<int>(v.integer("trainer.num_threads"));
}

void read_engine(const Values& v, const TrainSettings& s, EngineConfig& e) {
  e.param_dtype = v.str("dtype");
  e.device = v.str("device");
  e.fsdp.fsdp_size = static_cast<int>(v.integer("fsdp_size"));
  if (!v.flag("enable_full_shard")) {
    if (e.fsdp.fsdp_size != -1 && e.fsdp.fsdp_size != 1)
      fail("config: enable_full_shard false (a whole replica per rank) contradicts fsdp_size ", e.fsdp.fsdp_size);
    e.fsdp.fsdp_size = 1;
  }
  e.fsdp.expert_parallel_size = static_cast<int>(v.integer("expert_parallel_size"));
  {  // "A,B" (a YAML list arrives so), "[A, B]" from the command line, "" / "[]" / "null": none
    std::string b = v.str("basic_modules"), item;
    if (b == "null" || b == "None") b.clear();
    for (char ch : b + ",") {
      if (ch == ',') {
        if (!item.empty()) e.basic_modules.push_back(item);
        item.clear();
      } else if (ch != '[' && ch != ']' && ch != ' ' && ch != '\'' && ch != '"') {
        item += ch;
      }
    }
  }
  e.fsdp.reshard_after_forward = v.flag("reshard_after_forward");
  e.fsdp.gradient_checkpointing = v.flag("enable_gradient_checkpointing");
  e.fsdp.forward_prefetch = v.flag("forward_prefetch");
  e.fsdp.freeze_vision = v.flag("freeze_vision_tower");
  e.micro_batch_size_per_gpu = static_cast<int>(v.integer("ppo_micro_batch_size_per_gpu"));
  e.use_dynamic_bsz = v.flag("use_dynamic_bsz");
  e.max_token_len_per_gpu = v.integer("ppo_max_token_len_per_gpu");
  e.ulysses_sequence_parallel_size = static_cast<int>(v.integer("ulysses_sequence_parallel_size"));
  e.adamw.lr = v.num("optim.lr");
  e.adamw.weight_decay = v.num("optim.weight_decay");
  e.adamw.eps = v.num("optim.eps");
  std::tie(e.adamw.beta1, e.adamw.beta2) = v.pair("optim.betas");
  e.grad_clip = v.num("grad_clip");
  e.lr_schedule.lr_scheduler_type = v.str("optim.lr_scheduler_type");
  e.lr_schedule.total_training_steps = s.total_training_steps;
  e.lr_schedule.lr_warmup_steps = v.integer("optim.lr_warmup_steps");
  e.lr_schedule.lr_warmup_steps_ratio = v.num("optim.lr_warmup_steps_ratio");
  e.lr_schedule.min_lr_ratio = v.num("optim.min_lr_ratio");
  e.lr_schedule.num_cycles = v.num("optim.num_cycles");
  e.temperature = v.num("actor_rollout_ref.rollout.temperature");
}

void read_loss(const Values& v, LossSettings& l) {
  PpoLossConfig& pc = l.ppo;
  pc.clip.clip_ratio = v.num("clip_ratio");
  if (auto lo = v.raw("clip_ratio_low")) pc.clip.clip_ratio_low = std::stod(*lo);
  if (auto hi = v.raw("clip_ratio_high")) pc.clip.clip_ratio_high = std::stod(*hi);
  pc.clip.clip_ratio_c = v.num("clip_ratio_c");
  pc.loss_agg_mode = parse_loss_agg_mode(v.str("loss_agg_mode"));
  pc.entropy_coeff = v.num("entropy_coeff");
  pc.use_kl_loss = v.flag("use_kl_loss");
  pc.kl_loss_coef = v.num("kl_loss_coef");
  pc.kl_loss_type = v.str("kl_loss_type");
  l.cliprange_value = v.num("cliprange_value");
}

std::string type_column(const KeySpec& k) {
  if (k.kind == Kind::Bool) return "bool";
  if (k.kind == Kind::Str) return *k.range ? k.range : "str";
  const Range r(k.range);
  const char* t = k.kind == Kind::Int ? "int" : k.kind == Kind::Num ? "num" : "2 nums";
  return r.any ? t : std::string(t) + " " + r.describe();
}

}  // namespace

TrainSettings load_train_settings(const TrainArgs& a) {
  Values v = read_values(a);
  TrainSettings s;
  s.task = &find_task(v.str("task"));
  v.bind(s.task->role == "critic" ? Who::Critic : Who::Actor);
  read_job(v, s);
  read_engine(v, s, s.engine);
  read_loss(v, s.loss);
  s.effective = v.effective();
  return s;
}

std::string train_config_help() {
  std::string s =
      "Config keys. --config FILE.yaml nests them as verl's configs do; key=value arguments override it (the\n"
      "later wins). The trained model's keys live in its role's section, as in verl's ppo_trainer.yaml:\n"
      "  actor  (task sft, ppo): actor_rollout_ref.actor.KEY, actor_rollout_ref.actor.fsdp_config.KEY (engine),\n"
      "                          actor_rollout_ref.model.KEY (model)\n"
      "  critic (task value):    critic.KEY, critic.fsdp.KEY or critic.model.fsdp_config.KEY (engine), critic.model.KEY\n"
      "so actor_rollout_ref.actor.optim.lr and critic.optim.lr are different settings; the section not trained is\n"
      "checked but unused. A key without a section sets the trained model's: its last part (lr=1e-6, fsdp_size=2,\n"
      "path=...) or verl's SFT-trainer layout (optim.lr, engine.fsdp_size, model.path). Job keys are data.*,\n"
      "trainer.* (or their last part). Every value is checked for type and range; an unknown key is an error.\n"
      "The data file is checked before the model is built (ids inside the vocabulary, finite values wherever\n"
      "loss_mask != 0, a loss token in every step's batch); NaN / inf where loss_mask is 0 are set to 0 with a\n"
      "warning (they would make every gradient NaN). See the README for the data format.\n";
  const char* heads[] = {"Job", "Model (actor_rollout_ref.model.* | critic.model.* | model.*)",
                         "Trained role (actor_rollout_ref.actor.* | critic.* | no section)",
                         "Engine (actor_rollout_ref.actor.fsdp_config.* | critic.fsdp.* | engine.*)"};
  const Sec order[] = {Sec::Job, Sec::Model, Sec::Role, Sec::Engine};
  for (int g = 0; g < 4; ++g) {
    s += std::string("\n") + heads[g] + ":\n";
    for (const KeySpec& k : kKeys) {
      if (k.sec != order[g]) continue;
      const std::string def = *k.def ? std::string("[") + k.def + "]" : "";
      const char* only = k.roles == kActor ? " (actor only)" : k.roles == kCritic ? " (critic only)" : "";
      char line[768];
      std::snprintf(line, sizeof line, "  %-38s %-25s %-12s %s%s\n", k.path, type_column(k).c_str(), def.c_str(), k.help, only);
      s += line;
      std::string also;
      for (auto al : split_ws(k.aliases)) also += (also.empty() ? "" : ", ") + (al[0] == '=' ? al.substr(1) : al);
      if (!also.empty()) s += "      also: " + also + "\n";
    }
  }
  return s;
}

}  // namespace verl
#endif
