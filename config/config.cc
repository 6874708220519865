#include "config/config.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iomanip>
#include <iterator>
#include <set>
#include <sstream>

#include "base/log.h"
#include "config/batch_plan.h"

extern char** environ;

namespace ddpm {
namespace {

template <typename E>
struct EnumNames;
template <>
struct EnumNames<ScheduleKind> {
  static constexpr const char* kNames[] = {"linear", "cosine"};
};
template <>
struct EnumNames<Objective> {
  static constexpr const char* kNames[] = {"eps", "x0", "v"};
};
template <>
struct EnumNames<LossKind> {
  static constexpr const char* kNames[] = {"l2", "l1", "hybrid", "vlb"};
};
template <>
struct EnumNames<LossWeighting> {
  static constexpr const char* kNames[] = {"none", "p2", "min_snr"};
};
template <>
struct EnumNames<VarianceKind> {
  static constexpr const char* kNames[] = {"fixedlarge", "fixedsmall"};
};
template <>
struct EnumNames<SamplerKind> {
  static constexpr const char* kNames[] = {"ddpm", "ddim", "heun"};
};
template <>
struct EnumNames<DatasetKind> {
  static constexpr const char* kNames[] = {"shapes", "cifar10", "folder"};
};
template <>
struct EnumNames<CifarSplit> {
  static constexpr const char* kNames[] = {"train", "test"};
};
template <>
struct EnumNames<Precision> {
  static constexpr const char* kNames[] = {"fp32", "bf16"};
};
template <>
struct EnumNames<DivergencePolicy> {
  static constexpr const char* kNames[] = {"stop", "rollback"};
};

template <>
struct EnumNames<TimestepSamplerKind> {
  static constexpr const char* kNames[] = {"uniform", "loss_second_moment"};
};

template <>
struct EnumNames<EvalSelect> {
  static constexpr const char* kNames[] = {"none", "fid", "kid", "nll"};
};
template <>
struct EnumNames<IsLogits> {
  static constexpr const char* kNames[] = {"unbiased", "biased"};
};

template <typename E>
std::string AllowedList() {
  std::string out;
  for (const char* name : EnumNames<E>::kNames) {
    if (!out.empty()) out += ", ";
    out += name;
  }
  return out;
}

// Calls visit(section, key, field) for every field of the config, in file order. Loading,
// environment overrides, unknown-key checks, printing and YAML output all walk this one list.
template <typename Cfg, typename Visitor>
void VisitFields(Cfg& c, Visitor&& visit) {
  visit("model", "ch", c.model.ch);
  visit("model", "ch_mult", c.model.ch_mult);
  visit("model", "num_res_blocks", c.model.num_res_blocks);
  visit("model", "attn_resolutions", c.model.attn_resolutions);
  visit("model", "dropout", c.model.dropout);
  visit("model", "image_size", c.model.image_size);
  visit("model", "in_channels", c.model.in_channels);
  visit("model", "norm_groups", c.model.norm_groups);
  visit("model", "learn_sigma", c.model.learn_sigma);
  visit("model", "num_classes", c.model.num_classes);
  visit("diffusion", "timesteps", c.diffusion.timesteps);
  visit("diffusion", "schedule", c.diffusion.schedule);
  visit("diffusion", "beta_start", c.diffusion.beta_start);
  visit("diffusion", "beta_end", c.diffusion.beta_end);
  visit("diffusion", "cosine_s", c.diffusion.cosine_s);
  visit("diffusion", "objective", c.diffusion.objective);
  visit("diffusion", "loss", c.diffusion.loss);
  visit("diffusion", "vlb_weight", c.diffusion.vlb_weight);
  visit("diffusion", "weighting", c.diffusion.weighting);
  visit("diffusion", "p2_gamma", c.diffusion.p2_gamma);
  visit("diffusion", "p2_k", c.diffusion.p2_k);
  visit("diffusion", "min_snr_gamma", c.diffusion.min_snr_gamma);
  visit("train", "steps", c.train.steps);
  visit("train", "batch_size", c.train.batch_size);
  visit("train", "grad_accum", c.train.grad_accum);
  visit("train", "lr", c.train.lr);
  visit("train", "warmup_steps", c.train.warmup_steps);
  visit("train", "adam_beta1", c.train.adam_beta1);
  visit("train", "adam_beta2", c.train.adam_beta2);
  visit("train", "adam_eps", c.train.adam_eps);
  visit("train", "timestep_sampler", c.train.timestep_sampler);
  visit("train", "grad_clip", c.train.grad_clip);
  visit("train", "ema_decay", c.train.ema_decay);
  visit("train", "label_dropout", c.train.label_dropout);
  visit("train", "phema_snapshot_every", c.train.phema_snapshot_every);
  visit("train", "phema_sigma_rels", c.train.phema_sigma_rels);
  visit("train", "seed", c.train.seed);
  visit("train", "log_every", c.train.log_every);
  visit("train", "sample_every", c.train.sample_every);
  visit("train", "threads", c.train.threads);
  visit("train", "device", c.train.device);
  visit("train", "precision", c.train.precision);
  visit("train", "channels_last", c.train.channels_last);
  visit("train", "cuda_graphs", c.train.cuda_graphs);
  visit("train", "checkpoint_every", c.train.checkpoint_every);
  visit("train", "keep_checkpoints", c.train.keep_checkpoints);
  visit("train", "max_checkpoint_failures", c.train.max_checkpoint_failures);
  visit("train", "on_divergence", c.train.on_divergence);
  visit("train", "max_rollbacks", c.train.max_rollbacks);
  visit("train", "rollback_lr_scale", c.train.rollback_lr_scale);
  visit("train", "spike_factor", c.train.spike_factor);
  visit("data", "dataset", c.data.dataset);
  visit("data", "path", c.data.path);
  visit("data", "split", c.data.split);
  visit("data", "prefetch", c.data.prefetch);
  visit("data", "shapes_size", c.data.shapes_size);
  visit("data", "random_flip", c.data.random_flip);
  visit("sample", "sampler", c.sample.sampler);
  visit("sample", "variance", c.sample.variance);
  visit("sample", "steps", c.sample.steps);
  visit("sample", "timesteps", c.sample.timesteps);
  visit("sample", "eta", c.sample.eta);
  visit("sample", "clip_x0", c.sample.clip_x0);
  visit("sample", "churn", c.sample.churn);
  visit("sample", "s_noise", c.sample.s_noise);
  visit("sample", "num_images", c.sample.num_images);
  visit("sample", "seed", c.sample.seed);
  visit("sample", "classes", c.sample.classes);
  visit("sample", "guidance", c.sample.guidance);
  visit("eval", "every", c.eval.every);
  visit("eval", "num_samples", c.eval.num_samples);
  visit("eval", "batch_size", c.eval.batch_size);
  visit("eval", "sampler", c.eval.sampler);
  visit("eval", "steps", c.eval.steps);
  visit("eval", "seed", c.eval.seed);
  visit("eval", "guidance", c.eval.guidance);
  visit("eval", "inception_weights", c.eval.inception_weights);
  visit("eval", "reference_stats", c.eval.reference_stats);
  visit("eval", "is_logits", c.eval.is_logits);
  visit("eval", "nll_every", c.eval.nll_every);
  visit("eval", "nll_images", c.eval.nll_images);
  visit("eval", "nll_timesteps", c.eval.nll_timesteps);
  visit("eval", "metrics", c.eval.metrics);
  visit("eval", "select", c.eval.select);
  visit("eval", "patience", c.eval.patience);
  visit("dist", "bucket_mb", c.dist.bucket_mb);
  visit("dist", "timeout_seconds", c.dist.timeout_seconds);
  visit("dist", "world_size", c.dist.world_size);
  visit("dist", "max_micro_batch", c.dist.max_micro_batch);
}

constexpr const char* kSections[] = {"model",  "diffusion", "train", "data",
                                     "sample", "eval",      "dist"};

std::string Where(const std::string& origin, const YAML::Node& node) {
  const YAML::Mark mark = node.Mark();
  if (mark.line < 0) return origin;
  return origin + ":" + std::to_string(mark.line + 1) + ":" + std::to_string(mark.column + 1);
}

std::string ScalarText(const YAML::Node& node) {
  if (node.IsScalar()) return "'" + node.Scalar() + "'";
  if (node.IsSequence()) return "a list";
  if (node.IsMap()) return "a mapping";
  return "nothing";
}

[[noreturn]] void Fail(const std::string& where, const std::string& key, const std::string& what) {
  throw ConfigError(where + ": " + key + ": " + what);
}

// Parses one YAML node into a field of type T; errors name the key and what was expected.
template <typename T>
T ParseScalar(const YAML::Node& node, const std::string& where, const std::string& key,
              const char* expected) {
  if (!node.IsScalar())
    Fail(where, key, std::string("expected ") + expected + ", got " + ScalarText(node));
  try {
    return node.as<T>();
  } catch (const YAML::Exception&) {
    Fail(where, key, std::string("expected ") + expected + ", got " + ScalarText(node));
  }
}

void Parse(const YAML::Node& n, int& out, const std::string& w, const std::string& k) {
  out = ParseScalar<int>(n, w, k, "an integer");
}
void Parse(const YAML::Node& n, int64_t& out, const std::string& w, const std::string& k) {
  out = ParseScalar<int64_t>(n, w, k, "an integer");
}
void Parse(const YAML::Node& n, uint64_t& out, const std::string& w, const std::string& k) {
  if (n.IsScalar() && !n.Scalar().empty() && n.Scalar()[0] == '-') {
    Fail(w, k, "expected a non-negative integer, got " + ScalarText(n));
  }
  out = ParseScalar<uint64_t>(n, w, k, "a non-negative integer");
}
void Parse(const YAML::Node& n, double& out, const std::string& w, const std::string& k) {
  out = ParseScalar<double>(n, w, k, "a number");
  if (!std::isfinite(out)) Fail(w, k, "expected a finite number, got " + ScalarText(n));
}
void Parse(const YAML::Node& n, bool& out, const std::string& w, const std::string& k) {
  out = ParseScalar<bool>(n, w, k, "true or false");
}
void Parse(const YAML::Node& n, std::string& out, const std::string& w, const std::string& k) {
  out = ParseScalar<std::string>(n, w, k, "a string");
}
void Parse(const YAML::Node& n, std::vector<int>& out, const std::string& w, const std::string& k) {
  if (!n.IsSequence()) Fail(w, k, "expected a list of integers, got " + ScalarText(n));
  std::vector<int> values;
  for (std::size_t i = 0; i < n.size(); ++i) {
    values.push_back(ParseScalar<int>(n[i], w, k + "[" + std::to_string(i) + "]", "an integer"));
  }
  out = std::move(values);
}
void Parse(const YAML::Node& n, std::vector<std::string>& out, const std::string& w,
           const std::string& k) {
  if (!n.IsSequence()) Fail(w, k, "expected a list of names, got " + ScalarText(n));
  std::vector<std::string> values;
  for (std::size_t i = 0; i < n.size(); ++i) {
    values.push_back(
        ParseScalar<std::string>(n[i], w, k + "[" + std::to_string(i) + "]", "a name"));
  }
  out = std::move(values);
}
void Parse(const YAML::Node& n, std::vector<double>& out, const std::string& w,
           const std::string& k) {
  if (!n.IsSequence()) Fail(w, k, "expected a list of numbers, got " + ScalarText(n));
  std::vector<double> values(n.size());
  for (std::size_t i = 0; i < n.size(); ++i)
    Parse(n[i], values[i], w, k + "[" + std::to_string(i) + "]");
  out = std::move(values);
}
template <typename E, typename = std::enable_if_t<std::is_enum_v<E>>>
void Parse(const YAML::Node& n, E& out, const std::string& w, const std::string& k) {
  const auto text = ParseScalar<std::string>(n, w, k, "a name");
  const auto& names = EnumNames<E>::kNames;
  for (std::size_t i = 0; i < std::size(names); ++i) {
    if (text == names[i]) {
      out = static_cast<E>(i);
      return;
    }
  }
  Fail(w, k, "'" + text + "' is not one of: " + AllowedList<E>());
}

std::string Format(int v) { return std::to_string(v); }
std::string Format(int64_t v) { return std::to_string(v); }
std::string Format(uint64_t v) { return std::to_string(v); }
std::string Format(bool v) { return v ? "true" : "false"; }
std::string Format(double v) {
  std::ostringstream out;
  out << std::setprecision(17) << v;
  return out.str();
}
std::string Format(const std::string& v) {
  YAML::Emitter out;
  out << YAML::DoubleQuoted << v;
  return out.c_str();
}
std::string Format(const std::vector<int>& v) {
  std::string out = "[";
  for (std::size_t i = 0; i < v.size(); ++i) out += (i ? ", " : "") + std::to_string(v[i]);
  return out + "]";
}
std::string Format(const std::vector<std::string>& v) {
  std::string out = "[";
  for (std::size_t i = 0; i < v.size(); ++i) out += (i ? ", " : "") + Format(v[i]);
  return out + "]";
}
std::string Format(const std::vector<double>& v) {
  std::string out = "[";
  for (std::size_t i = 0; i < v.size(); ++i) out += (i ? ", " : "") + Format(v[i]);
  return out + "]";
}
template <typename E, typename = std::enable_if_t<std::is_enum_v<E>>>
std::string Format(E v) {
  return EnumNames<E>::kNames[static_cast<int>(v)];
}

std::string KeysOf(const Config& c, const std::string& section) {
  std::string keys;
  VisitFields(c, [&](const char* s, const char* k, const auto&) {
    if (section == s) keys += (keys.empty() ? "" : ", ") + std::string(k);
  });
  return keys;
}

// Keys renamed: read under their old names too, with a warning on stderr (once per process).
struct RenamedKey {
  const char* section;
  const char* old_key;
  const char* key;
};
constexpr RenamedKey kRenamedKeys[] = {{"dist", "max_rank_batch", "max_micro_batch"}};

// The key's name now: key itself, or the new name of a renamed one (warned about at where).
std::string CurrentKey(const std::string& section, const std::string& key,
                       const std::string& where) {
  static std::atomic<bool> warned[std::size(kRenamedKeys)] = {};
  for (std::size_t i = 0; i < std::size(kRenamedKeys); ++i) {
    const RenamedKey& renamed = kRenamedKeys[i];
    if (section != renamed.section || key != renamed.old_key) continue;
    if (!warned[i].exchange(true)) {
      LogWarning("%s: warning: %s.%s is now %s.%s; read as that\n", where.c_str(), renamed.section,
                 renamed.old_key, renamed.section, renamed.key);
    }
    return renamed.key;
  }
  return key;
}

// A mapping's key as text; a key that is itself a list or mapping is refused by its place.
std::string KeyText(const YAML::Node& key, const std::string& origin) {
  if (!key.IsScalar()) {
    throw ConfigError(Where(origin, key) + ": a key must be a plain name, not a list or mapping");
  }
  return key.Scalar();
}

void ApplyYaml(Config& c, const YAML::Node& root, const std::string& origin) {
  if (root.IsNull()) return;
  if (!root.IsMap())
    throw ConfigError(Where(origin, root) + ": the config must be a mapping of sections");
  std::string sections;
  for (const char* s : kSections) sections += (sections.empty() ? "" : ", ") + std::string(s);
  for (const auto& section_item : root) {
    const std::string section = KeyText(section_item.first, origin);
    const YAML::Node& body = section_item.second;
    if (std::find_if(std::begin(kSections), std::end(kSections),
                     [&](const char* s) { return section == s; }) == std::end(kSections)) {
      throw ConfigError(Where(origin, section_item.first) + ": unknown section '" + section +
                        "' (sections: " + sections + ")");
    }
    if (body.IsNull()) continue;
    if (!body.IsMap()) {
      throw ConfigError(Where(origin, body) + ": " + section + ": expected a mapping of keys");
    }
    std::set<std::string> given;
    for (const auto& item : body) {
      const std::string key =
          CurrentKey(section, KeyText(item.first, origin), Where(origin, item.first));
      if (!given.insert(key).second) {
        throw ConfigError(Where(origin, item.first) + ": " + section + "." + key +
                          " is given twice (under its old name and its new one?)");
      }
      bool found = false;
      VisitFields(c, [&](const char* s, const char* k, auto& field) {
        if (section == s && key == k) {
          Parse(item.second, field, Where(origin, item.second), section + "." + key);
          found = true;
        }
      });
      if (!found) {
        throw ConfigError(Where(origin, item.first) + ": unknown key '" + section + "." + key +
                          "' (" + section + " keys: " + KeysOf(c, section) + ")");
      }
    }
  }
}

std::string Upper(std::string s) {
  for (char& ch : s) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
  return s;
}

std::string ToLower(std::string s) {
  for (char& ch : s) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  return s;
}

// Applies DDPM_<SECTION>_<KEY>=value overrides. The value is parsed as YAML, so lists work:
// DDPM_MODEL_CH_MULT="[1, 2]".
void ApplyEnvironment(Config& c) {
  for (char** env = environ; env != nullptr && *env != nullptr; ++env) {
    const std::string entry = *env;
    const auto eq = entry.find('=');
    if (eq == std::string::npos) continue;
    const std::string name = entry.substr(0, eq);
    for (const char* section : kSections) {
      const std::string prefix = "DDPM_" + Upper(section) + "_";
      if (name.rfind(prefix, 0) != 0) continue;
      const std::string key_upper =
          Upper(CurrentKey(section, ToLower(name.substr(prefix.size())), "environment " + name));
      bool found = false;
      VisitFields(c, [&](const char* s, const char* k, auto& field) {
        if (std::string(section) == s && key_upper == Upper(k)) {
          YAML::Node value;
          try {
            value = YAML::Load(entry.substr(eq + 1));
          } catch (const YAML::Exception& e) {
            throw ConfigError("environment " + name + ": " + e.msg);
          }
          Parse(value, field, "environment " + name, std::string(s) + "." + k);
          found = true;
        }
      });
      if (!found) {
        throw ConfigError("environment " + name + ": " + section + " has no key matching '" +
                          key_upper + "' (" + section + " keys: " + KeysOf(c, section) + ")");
      }
    }
  }
}

[[noreturn]] void Invalid(const std::string& key, const std::string& what) {
  throw ConfigError("config: " + key + ": " + what);
}

}  // namespace

const char* Name(ScheduleKind v) { return EnumNames<ScheduleKind>::kNames[static_cast<int>(v)]; }
const char* Name(Objective v) { return EnumNames<Objective>::kNames[static_cast<int>(v)]; }
const char* Name(LossKind v) { return EnumNames<LossKind>::kNames[static_cast<int>(v)]; }
const char* Name(LossWeighting v) { return EnumNames<LossWeighting>::kNames[static_cast<int>(v)]; }
const char* Name(VarianceKind v) { return EnumNames<VarianceKind>::kNames[static_cast<int>(v)]; }
const char* Name(SamplerKind v) { return EnumNames<SamplerKind>::kNames[static_cast<int>(v)]; }
const char* Name(DatasetKind v) { return EnumNames<DatasetKind>::kNames[static_cast<int>(v)]; }
const char* Name(CifarSplit v) { return EnumNames<CifarSplit>::kNames[static_cast<int>(v)]; }
const char* Name(Precision v) { return EnumNames<Precision>::kNames[static_cast<int>(v)]; }
const char* Name(IsLogits v) { return EnumNames<IsLogits>::kNames[static_cast<int>(v)]; }
const char* Name(EvalSelect v) { return EnumNames<EvalSelect>::kNames[static_cast<int>(v)]; }

bool EvalConfig::Computes(const std::string& metric) const {
  return metric == "fid" || metric == "is" ||
         std::find(metrics.begin(), metrics.end(), metric) != metrics.end();
}
const char* Name(TimestepSamplerKind v) {
  return EnumNames<TimestepSamplerKind>::kNames[static_cast<int>(v)];
}
const char* Name(DivergencePolicy v) {
  return EnumNames<DivergencePolicy>::kNames[static_cast<int>(v)];
}

int EvalSamplerSteps(const Config& config) {
  SampleConfig sample;
  sample.sampler = config.eval.sampler;
  sample.steps = config.eval.steps;
  return sample.ResolvedSteps(config.diffusion.timesteps);
}

int SampleConfig::ResolvedSteps(int diffusion_timesteps) const {
  if (steps > 0) return steps;
  switch (sampler) {
    case SamplerKind::kDdpm:
      return diffusion_timesteps;
    case SamplerKind::kDdim:
      return std::min(100, diffusion_timesteps);
    case SamplerKind::kHeun:
      return std::min(18, diffusion_timesteps);
  }
  return diffusion_timesteps;
}

double MaxPhemaSigmaRel() {
  // Where d/dg log((g + 1) / ((g + 2)^2 (g + 3))) = 0, i.e. g^2 + 3g + 1 = 0.
  const double peak = (std::sqrt(5.0) - 3.0) / 2.0;
  return std::sqrt((peak + 1) / ((peak + 2) * (peak + 2) * (peak + 3)));
}

void Config::Validate(int world_size) const {
  const ModelConfig& m = model;
  if (m.ch < 4 || m.ch % 2 != 0)
    Invalid("model.ch", "must be an even number >= 4, got " + std::to_string(m.ch));
  if (m.ch_mult.empty()) Invalid("model.ch_mult", "must list at least one level");
  for (int mult : m.ch_mult) {
    if (mult < 1)
      Invalid("model.ch_mult", "every multiplier must be >= 1, got " + Format(m.ch_mult));
  }
  if (m.num_res_blocks < 1)
    Invalid("model.num_res_blocks", "must be >= 1, got " + std::to_string(m.num_res_blocks));
  if (m.dropout < 0 || m.dropout >= 1)
    Invalid("model.dropout", "must be in [0, 1), got " + Format(m.dropout));
  if (m.in_channels < 1)
    Invalid("model.in_channels", "must be >= 1, got " + std::to_string(m.in_channels));
  if (!(train.label_dropout >= 0 && train.label_dropout < 1)) {
    Invalid("train.label_dropout", "must be in [0, 1), got " + Format(train.label_dropout));
  }
  if (train.phema_snapshot_every < 0) {
    Invalid("train.phema_snapshot_every",
            "must be >= 0 (0: no post-hoc EMA), got " + Format(train.phema_snapshot_every));
  }
  if (train.phema_snapshot_every > 0) {
    const double max_sigma_rel = MaxPhemaSigmaRel();
    if (train.phema_sigma_rels.empty()) {
      Invalid("train.phema_sigma_rels",
              "must list at least one profile when "
              "train.phema_snapshot_every > 0");
    }
    for (std::size_t i = 0; i < train.phema_sigma_rels.size(); ++i) {
      const double s = train.phema_sigma_rels[i];
      if (!(s > 0 && s <= max_sigma_rel)) {
        Invalid("train.phema_sigma_rels",
                Format(s) + " is outside (0, " + Format(max_sigma_rel) +
                    "], the relative standard deviations a power-function EMA has");
      }
      for (std::size_t j = 0; j < i; ++j) {
        if (train.phema_sigma_rels[j] == s) {
          Invalid("train.phema_sigma_rels", Format(s) + " is listed twice");
        }
      }
    }
  }
  if (m.num_classes < 0 || m.num_classes > 100000) {
    Invalid("model.num_classes",
            "must be in [0, 100000] (0: unconditional), got " + std::to_string(m.num_classes));
  }
  for (int k : sample.classes) {
    if (k < 0 || k >= m.num_classes) {
      Invalid("sample.classes",
              std::to_string(k) + " is not a class of this model, whose classes are " +
                  (m.num_classes == 0 ? std::string("none (model.num_classes 0)")
                                      : "0.." + std::to_string(m.num_classes - 1)));
    }
  }
  if (!std::isfinite(sample.guidance)) {
    Invalid("sample.guidance", "must be a finite number, got " + Format(sample.guidance));
  }
  if (!std::isfinite(eval.guidance)) {
    Invalid("eval.guidance", "must be a finite number, got " + Format(eval.guidance));
  }
  if (m.norm_groups < 1)
    Invalid("model.norm_groups", "must be >= 1, got " + std::to_string(m.norm_groups));
  const int levels = static_cast<int>(m.ch_mult.size());
  const int shrink = 1 << (levels - 1);
  if (m.image_size < shrink || m.image_size % shrink != 0) {
    Invalid("model.image_size",
            std::to_string(m.image_size) +
                " must be a multiple of 2^(levels-1) = " + std::to_string(shrink) + " for " +
                std::to_string(levels) + " levels in model.ch_mult");
  }
  for (int mult : m.ch_mult) {
    if ((m.ch * mult) % m.norm_groups != 0) {
      Invalid("model.norm_groups", std::to_string(m.norm_groups) +
                                       " does not divide level width model.ch x " +
                                       std::to_string(mult) + " = " + std::to_string(m.ch * mult));
    }
  }
  std::vector<int> sizes;
  sizes.reserve(levels);
  for (int level = 0; level < levels; ++level) sizes.push_back(m.image_size >> level);
  for (int res : m.attn_resolutions) {
    if (std::find(sizes.begin(), sizes.end(), res) == sizes.end()) {
      Invalid("model.attn_resolutions",
              std::to_string(res) + " is not a feature-map size of this UNet " + Format(sizes));
    }
  }

  const DiffusionConfig& d = diffusion;
  if (d.timesteps < 2)
    Invalid("diffusion.timesteps", "must be >= 2, got " + std::to_string(d.timesteps));
  if (d.schedule == ScheduleKind::kLinear) {
    const std::string got = ", got " + Format(d.beta_start) + " and " + Format(d.beta_end);
    if (!(d.beta_end > 0 && d.beta_end < 1)) {
      Invalid("diffusion.beta_end",
              "the linear schedule needs 0 < beta_start < beta_end < 1" + got);
    }
    if (!(d.beta_start > 0 && d.beta_start < d.beta_end)) {
      Invalid("diffusion.beta_start",
              "the linear schedule needs 0 < beta_start < beta_end < 1" + got);
    }
  }
  if (d.cosine_s <= 0) Invalid("diffusion.cosine_s", "must be > 0, got " + Format(d.cosine_s));
  if (d.vlb_weight < 0)
    Invalid("diffusion.vlb_weight", "must be >= 0, got " + Format(d.vlb_weight));
  if (d.loss == LossKind::kHybrid && !model.learn_sigma) {
    Invalid("diffusion.loss",
            "hybrid trains the learned variances and needs model.learn_sigma: true (without it "
            "the bound's term has no gradient; use vlb to train the bound)");
  }
  if ((d.loss == LossKind::kHybrid || d.loss == LossKind::kVlb) &&
      d.weighting != LossWeighting::kNone) {
    Invalid("diffusion.weighting", std::string("must be none with diffusion.loss: ") +
                                       Name(d.loss) + ", which weights the bound's terms itself");
  }
  if (d.p2_k <= 0) Invalid("diffusion.p2_k", "must be > 0, got " + Format(d.p2_k));
  if (d.p2_gamma < 0) Invalid("diffusion.p2_gamma", "must be >= 0, got " + Format(d.p2_gamma));
  if (d.min_snr_gamma <= 0)
    Invalid("diffusion.min_snr_gamma", "must be > 0, got " + Format(d.min_snr_gamma));

  const TrainConfig& t = train;
  if (t.steps < 0) Invalid("train.steps", "must be >= 0, got " + std::to_string(t.steps));
  if (t.batch_size < 1)
    Invalid("train.batch_size", "must be >= 1, got " + std::to_string(t.batch_size));
  if (t.grad_accum < 1)
    Invalid("train.grad_accum", "must be >= 1, got " + std::to_string(t.grad_accum));
  PlanBatch(*this, dist.world_size > 0 ? dist.world_size : world_size);
  if (t.lr <= 0) Invalid("train.lr", "must be > 0, got " + Format(t.lr));
  if (t.warmup_steps < 0)
    Invalid("train.warmup_steps", "must be >= 0, got " + std::to_string(t.warmup_steps));
  if (t.adam_beta1 < 0 || t.adam_beta1 >= 1)
    Invalid("train.adam_beta1", "must be in [0, 1), got " + Format(t.adam_beta1));
  if (t.adam_beta2 < 0 || t.adam_beta2 >= 1)
    Invalid("train.adam_beta2", "must be in [0, 1), got " + Format(t.adam_beta2));
  if (t.adam_eps <= 0) Invalid("train.adam_eps", "must be > 0, got " + Format(t.adam_eps));
  if (t.grad_clip < 0)
    Invalid("train.grad_clip", "must be >= 0 (0 disables), got " + Format(t.grad_clip));
  if (t.ema_decay < 0 || t.ema_decay > 1)
    Invalid("train.ema_decay", "must be in [0, 1], got " + Format(t.ema_decay));
  if (t.log_every < 1)
    Invalid("train.log_every", "must be >= 1, got " + std::to_string(t.log_every));
  if (t.sample_every < 0)
    Invalid("train.sample_every", "must be >= 0, got " + std::to_string(t.sample_every));
  if (t.threads < 0)
    Invalid("train.threads", "must be >= 0 (0 means automatic), got " + std::to_string(t.threads));
  if (t.device != "auto" && t.device != "cpu" && t.device != "cuda") {
    Invalid("train.device", "'" + t.device + "' is not one of: auto, cpu, cuda");
  }

  if (t.checkpoint_every < 0)
    Invalid("train.checkpoint_every", "must be >= 0, got " + std::to_string(t.checkpoint_every));
  if (t.keep_checkpoints < 1)
    Invalid("train.keep_checkpoints", "must be >= 1, got " + std::to_string(t.keep_checkpoints));
  if (t.max_checkpoint_failures < 1) {
    Invalid("train.max_checkpoint_failures",
            "must be >= 1, got " + std::to_string(t.max_checkpoint_failures));
  }
  if (t.max_rollbacks < 0)
    Invalid("train.max_rollbacks", "must be >= 0, got " + std::to_string(t.max_rollbacks));
  if (!(t.rollback_lr_scale > 0 && t.rollback_lr_scale <= 1)) {
    Invalid("train.rollback_lr_scale", "must be in (0, 1], got " + Format(t.rollback_lr_scale));
  }
  if (!(t.spike_factor == 0 || t.spike_factor > 1)) {
    Invalid("train.spike_factor", "must be 0 (off) or > 1, got " + Format(t.spike_factor));
  }
  if (data.dataset != DatasetKind::kShapes && data.path.empty()) {
    Invalid("data.path", std::string("data.dataset ") + Name(data.dataset) + " needs a path");
  }
  if (data.prefetch < 1)
    Invalid("data.prefetch", "must be >= 1, got " + std::to_string(data.prefetch));
  if (data.dataset == DatasetKind::kCifar10 && (m.image_size != 32 || m.in_channels != 3)) {
    Invalid("model.image_size",
            "CIFAR-10 images are 3 x 32 x 32; the model is " + std::to_string(m.in_channels) +
                " x " + std::to_string(m.image_size) + " x " + std::to_string(m.image_size));
  }
  if (data.shapes_size < 1)
    Invalid("data.shapes_size", "must be >= 1, got " + std::to_string(data.shapes_size));

  if (sample.steps < 0 || sample.steps > d.timesteps) {
    Invalid("sample.steps", "must be in [1, diffusion.timesteps = " + std::to_string(d.timesteps) +
                                "], or 0 for the sampler's default, got " +
                                std::to_string(sample.steps));
  }
  if (!sample.timesteps.empty()) {
    if (sample.sampler != SamplerKind::kDdpm) {
      Invalid("sample.timesteps", "respaces the ddpm sampler only; sample.sampler is " +
                                      std::string(Name(sample.sampler)));
    }
    for (std::size_t i = 0; i < sample.timesteps.size(); ++i) {
      const int t = sample.timesteps[i];
      if (t < 0 || t >= d.timesteps || (i > 0 && t <= sample.timesteps[i - 1])) {
        Invalid("sample.timesteps", "must increase strictly within [0, diffusion.timesteps = " +
                                        std::to_string(d.timesteps) + "), got " +
                                        Format(sample.timesteps));
      }
    }
  }
  if (sample.eta < 0) Invalid("sample.eta", "must be >= 0, got " + Format(sample.eta));
  if (sample.churn < 0) Invalid("sample.churn", "must be >= 0, got " + Format(sample.churn));
  if (!(sample.s_noise > 0))
    Invalid("sample.s_noise", "must be > 0, got " + Format(sample.s_noise));
  if (sample.num_images < 1)
    Invalid("sample.num_images", "must be >= 1, got " + std::to_string(sample.num_images));
  if (eval.every < 0)
    Invalid("eval.every", "must be >= 0 (0: never), got " + std::to_string(eval.every));
  if (eval.num_samples < 10) {
    Invalid("eval.num_samples",
            "must be >= 10 (the Inception Score's 10 splits need a sample "
            "each), got " +
                std::to_string(eval.num_samples));
  }
  if (eval.batch_size < 1)
    Invalid("eval.batch_size", "must be >= 1, got " + std::to_string(eval.batch_size));
  if (eval.steps < 0 || eval.steps > d.timesteps) {
    Invalid("eval.steps", "must be in [1, diffusion.timesteps = " + std::to_string(d.timesteps) +
                              "], or 0 for the sampler's default, got " +
                              std::to_string(eval.steps));
  }
  if (eval.every > 0 && eval.inception_weights.empty()) {
    Invalid("eval.inception_weights",
            "eval.every is set, so the FID Inception weights are needed: download "
            "pt_inception-2015-12-05-6726825d.pth from "
            "https://github.com/mseitzer/pytorch-fid/releases/tag/fid_weights and give its path");
  }
  if (eval.every > 0 && eval.reference_stats.empty()) {
    Invalid("eval.reference_stats",
            "eval.every is set, so reference statistics are needed: a .npz with mu and sigma "
            "(`ddpm_fid stats --data cifar10:PATH --out FILE`, or the published CIFAR-10 file)");
  }
  if (eval.nll_every < 0)
    Invalid("eval.nll_every", "must be >= 0 (0: never), got " + std::to_string(eval.nll_every));
  if (eval.nll_images < 1)
    Invalid("eval.nll_images", "must be >= 1, got " + std::to_string(eval.nll_images));
  if (eval.nll_timesteps != 0 && (eval.nll_timesteps < 2 || eval.nll_timesteps > d.timesteps)) {
    Invalid("eval.nll_timesteps",
            "must be 0 (all T) or in [2, diffusion.timesteps = " + std::to_string(d.timesteps) +
                "], got " + std::to_string(eval.nll_timesteps));
  }
  static constexpr const char* kMetrics[] = {"fid", "is", "kid", "prd"};
  for (std::size_t i = 0; i < eval.metrics.size(); ++i) {
    const std::string& metric = eval.metrics[i];
    if (std::find(std::begin(kMetrics), std::end(kMetrics), metric) == std::end(kMetrics)) {
      Invalid("eval.metrics", "'" + metric + "' is not one of: fid, is, kid, prd");
    }
    if (std::find(eval.metrics.begin(), eval.metrics.begin() + i, metric) !=
        eval.metrics.begin() + i) {
      Invalid("eval.metrics", "'" + metric + "' is listed twice");
    }
  }
  if (eval.patience < 0)
    Invalid("eval.patience",
            "must be >= 0 (0: never stop early), got " + std::to_string(eval.patience));
  if (eval.patience > 0 && eval.select == EvalSelect::kNone) {
    Invalid("eval.patience",
            "waits for the best of a score, so it needs eval.select (fid, kid or nll)");
  }
  if ((eval.select == EvalSelect::kFid || eval.select == EvalSelect::kKid) && eval.every <= 0) {
    Invalid("eval.select", std::string(Name(eval.select)) +
                               " is measured every eval.every steps, which is 0 (never)");
  }
  if (eval.select == EvalSelect::kKid && !eval.Computes("kid")) {
    Invalid("eval.select", "kid needs kid in eval.metrics, which is " + Format(eval.metrics));
  }
  if (eval.select == EvalSelect::kNll && eval.nll_every <= 0) {
    Invalid("eval.select", "nll is measured every eval.nll_every steps, which is 0 (never)");
  }
  if (!(dist.bucket_mb > 0))
    Invalid("dist.bucket_mb", "must be > 0, got " + Format(dist.bucket_mb));
  if (!(dist.timeout_seconds > 0))
    Invalid("dist.timeout_seconds", "must be > 0, got " + Format(dist.timeout_seconds));
  if (dist.world_size < 0)
    Invalid("dist.world_size", "must be >= 0 (0: any), got " + std::to_string(dist.world_size));
  if (dist.max_micro_batch < 0) {
    Invalid("dist.max_micro_batch",
            "must be >= 0 (0: no limit), got " + std::to_string(dist.max_micro_batch));
  }
}

std::string Config::ToTable() const {
  std::size_t width = 0;
  VisitFields(*this, [&](const char* s, const char* k, const auto&) {
    width = std::max(width, std::string(s).size() + 1 + std::string(k).size());
  });
  std::ostringstream out;
  const std::string rule(width + 2, '-');
  out << rule << "+" << std::string(24, '-') << "\n";
  VisitFields(*this, [&](const char* s, const char* k, const auto& field) {
    const std::string key = std::string(s) + "." + k;
    out << " " << std::left << std::setw(static_cast<int>(width)) << key << " | " << Format(field)
        << "\n";
  });
  out << rule << "+" << std::string(24, '-') << "\n";
  return out.str();
}

std::string Config::ToYaml() const {
  std::ostringstream out;
  std::string current;
  VisitFields(*this, [&](const char* s, const char* k, const auto& field) {
    if (current != s) {
      current = s;
      out << s << ":\n";
    }
    out << "  " << k << ": " << Format(field) << "\n";
  });
  return out.str();
}

void SetConfigKey(Config& config, const std::string& key, const std::string& yaml_value,
                  const std::string& origin) {
  const auto dot = key.find('.');
  const std::string section = dot == std::string::npos ? "" : key.substr(0, dot);
  YAML::Node root;
  try {
    root[section][key.substr(dot == std::string::npos ? 0 : dot + 1)] = YAML::Load(yaml_value);
  } catch (const YAML::Exception& e) {
    throw ConfigError(origin + ": " + key + ": " + e.msg);
  }
  if (dot == std::string::npos) throw ConfigError(origin + ": '" + key + "' is not section.key");
  ApplyYaml(config, root, origin);
}

Config LoadConfigString(const std::string& yaml, const std::string& origin, bool apply_env) {
  YAML::Node root;
  try {
    root = YAML::Load(yaml);
  } catch (const YAML::ParserException& e) {
    throw ConfigError(origin + ":" + std::to_string(e.mark.line + 1) + ":" +
                      std::to_string(e.mark.column + 1) + ": YAML syntax error: " + e.msg);
  }
  Config config;
  ApplyYaml(config, root, origin);
  if (apply_env) ApplyEnvironment(config);
  config.Validate();
  return config;
}

bool ConfigYamlSetsNothing(const std::string& yaml) {
  YAML::Node root;
  try {
    root = YAML::Load(yaml);
  } catch (const YAML::ParserException&) {
    return false;
  }
  return root.IsNull() || (root.IsMap() && root.size() == 0);
}

Config LoadConfigFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw ConfigError(path + ": cannot open the config file");
  std::stringstream text;
  text << in.rdbuf();
  return LoadConfigString(text.str(), path, /*apply_env=*/true);
}

}  // namespace ddpm
