// The flags of an evaluation protocol, alike in every tool that measures FID and IS of a
// trained model (ddpm_fid checkpoint, ddpm_phema).
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "config/flags.h"

namespace ddpm {

/// The --inception flag's value, or $DDPM_INCEPTION_WEIGHTS when it is not given ("" if neither).
std::string InceptionWeightsFromFlags(const Flags& flags);

/// Declares --ref, --inception, --num, --sampler, --steps, --seed, --batch, --is-logits,
/// --guidance (one scale, or a comma-separated list) and --protocol.
void AddEvalFlags(Flags& flags);

/// The "eval.key" overrides those flags ask for: a flag given, else the protocol file's value,
/// else the flag's default; --inception falls back to $DDPM_INCEPTION_WEIGHTS. A --guidance
/// list sets eval.guidance to its first scale and is returned in scales (empty when not
/// given). Throws FlagError naming the program when --ref is missing or a flag does not read.
std::vector<std::pair<std::string, std::string>> EvalOverrides(const Flags& flags,
                                                               std::vector<double>* scales);

}  // namespace ddpm
