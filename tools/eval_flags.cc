#include "tools/eval_flags.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>

#include "config/eval_protocol.h"

namespace ddpm {

void AddEvalFlags(Flags& flags) {
  flags.Add("ref", "reference statistics .npz (mu, sigma), e.g. CIFAR-10 train's", "");
  flags.Add("inception", "the FID Inception weights (default: $DDPM_INCEPTION_WEIGHTS)", "");
  flags.Add("num", "samples, split over the ranks (the paper: 50000)", "50000");
  flags.Add("sampler", "ddpm, ddim or heun (default: the config's eval.sampler)", "");
  flags.Add("steps", "sampler steps (default: the config's eval.steps; 0: the sampler's own)", "");
  flags.Add("seed", "sample i draws from (seed, i) (default: the config's eval.seed)", "");
  flags.Add("batch", "samples per forward pass on each rank", "100");
  flags.Add("is-logits", "unbiased (the original TF code's) or biased", "unbiased");
  flags.Add("guidance",
            "a class-conditional model's guidance w (its samples class-balanced; default: the "
            "config's eval.guidance)",
            "");
  flags.Add("metrics",
            "scores beside FID and IS, comma-separated: kid, prd (default: the config's "
            "eval.metrics)",
            "");
  flags.Add("protocol",
            "an evaluation protocol file (configs/eval/paper.yaml, quick.yaml); flags given "
            "override it",
            "");
}

std::string InceptionWeightsFromFlags(const Flags& flags) {
  std::string weights = flags.Get("inception");
  if (weights.empty() && std::getenv("DDPM_INCEPTION_WEIGHTS") != nullptr) {
    weights = std::getenv("DDPM_INCEPTION_WEIGHTS");
  }
  return weights;
}

std::vector<std::pair<std::string, std::string>> EvalOverrides(const Flags& flags,
                                                               std::vector<double>* scales) {
  const std::string inception = InceptionWeightsFromFlags(flags);
  const std::string ref = flags.GetRequired("ref");
  // Every setting goes through the config loader, checked as a config file is: a flag given,
  // else the protocol file's value, else the flag's default.
  std::vector<std::pair<std::string, std::string>> overrides = {
      {"eval.inception_weights", inception}, {"eval.reference_stats", ref}};
  const std::vector<std::pair<std::string, std::string>> protocol =
      flags.Given("protocol") ? LoadEvalProtocol(flags.Get("protocol"))
                              : std::vector<std::pair<std::string, std::string>>{};
  std::vector<double> listed;
  if (flags.Given("guidance")) listed = flags.GetDoubleList("guidance");
  const std::pair<const char*, const char*> settings[] = {
      {"num", "eval.num_samples"},  {"batch", "eval.batch_size"}, {"is-logits", "eval.is_logits"},
      {"sampler", "eval.sampler"},  {"steps", "eval.steps"},      {"seed", "eval.seed"},
      {"guidance", "eval.guidance"}};
  for (const auto& [flag, key] : settings) {
    if (std::string(flag) == "guidance" && listed.size() > 1) {
      char first[32];
      std::snprintf(first, sizeof(first), "%.17g", listed.front());
      overrides.emplace_back(key, first);
      continue;
    }
    const auto in_protocol =
        std::find_if(protocol.begin(), protocol.end(),
                     [key = std::string(key)](const auto& entry) { return entry.first == key; });
    if (flags.Given(flag)) {
      overrides.emplace_back(key, flags.Get(flag));
    } else if (in_protocol != protocol.end()) {
      overrides.push_back(*in_protocol);
    } else if (!flags.Get(flag).empty()) {
      overrides.emplace_back(key, flags.Get(flag));  // the flag's default
    }
  }
  if (flags.Given("metrics"))
    overrides.emplace_back("eval.metrics", "[" + flags.Get("metrics") + "]");
  if (scales != nullptr) *scales = listed;
  return overrides;
}

}  // namespace ddpm
