#include "config/eval_protocol.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>

#include "config/config.h"

namespace ddpm {

const std::vector<std::string>& EvalProtocolKeys() {
  static const std::vector<std::string> keys = {"num_samples", "sampler",    "steps",   "seed",
                                                "is_logits",   "batch_size", "guidance"};
  return keys;
}

std::vector<std::pair<std::string, std::string>> LoadEvalProtocol(const std::string& path) {
  YAML::Node root;
  try {
    root = YAML::LoadFile(path);
  } catch (const YAML::BadFile&) {
    throw ConfigError(path + ": cannot read the evaluation protocol file");
  } catch (const YAML::Exception& error) {
    throw ConfigError(path + ": not YAML: " + error.what());
  }
  if (!root.IsMap()) throw ConfigError(path + ": an evaluation protocol is a map with eval: {...}");
  std::vector<std::pair<std::string, std::string>> settings;
  for (const auto& section : root) {
    const std::string name = section.first.as<std::string>();
    if (name != "eval" || !section.second.IsMap()) {
      throw ConfigError(path + ": '" + name +
                        "': a protocol sets only eval: {...} (the model and run come from the "
                        "checkpoint)");
    }
    for (const auto& entry : section.second) {
      const std::string key = entry.first.as<std::string>();
      const auto& allowed = EvalProtocolKeys();
      if (std::find(allowed.begin(), allowed.end(), key) == allowed.end()) {
        std::string list;
        for (const std::string& k : allowed) list += (list.empty() ? "" : ", ") + k;
        throw ConfigError(path + ": eval." + key + ": a protocol sets " + list +
                          " (files such as reference_stats are the machine's: give them as "
                          "flags)");
      }
      if (!entry.second.IsScalar()) {
        throw ConfigError(path + ": eval." + key + ": expected a single value");
      }
      settings.emplace_back("eval." + key, entry.second.Scalar());
    }
  }
  // Checked as a config file's values are (types, names, ranges).
  Config check;
  for (const auto& [key, value] : settings) SetConfigKey(check, key, value, path);
  try {
    check.Validate();
  } catch (const ConfigError& error) {
    throw ConfigError(path + ": " + error.what());
  }
  return settings;
}

}  // namespace ddpm
