// Evaluation protocols as files (configs/eval/*.yaml): the eval.* settings that make an FID or
// IS comparable with a published one, for `ddpm_fid checkpoint --protocol` and
// `ddpmctl eval --protocol`. The files name no paths: reference statistics and Inception
// weights are the machine's (--ref, --inception, or the run's config). Torch-free.
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace ddpm {

/// The keys a protocol may set, under eval: num_samples, sampler, steps, seed, is_logits,
/// batch_size, guidance (a class-conditional model's).
const std::vector<std::string>& EvalProtocolKeys();

/// The protocol file's settings as ("eval.KEY", YAML value) in the file's order, each checked
/// as a config file's value is; throws ConfigError naming the file and the key (a key outside
/// eval, or one a protocol does not set).
std::vector<std::pair<std::string, std::string>> LoadEvalProtocol(const std::string& path);

}  // namespace ddpm
