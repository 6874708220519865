// ddpm_sample: a checkpoint's (or a weights file's) EMA model to PNG samples.
#pragma once

#include "trainer/flags.h"
#include "trainer/train_loop.h"

namespace ddpm {

/// Declares ddpm_sample's flags.
void AddSampleFlags(Flags& flags);
/// The job the parsed flags ask for; throws FlagError for a bad combination.
SampleJob SampleJobFromFlags(const Flags& flags);

}  // namespace ddpm
