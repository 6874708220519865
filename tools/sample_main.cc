// ddpm_sample: draws EMA samples from a checkpoint or weights file into PNGs. Thin main.
#include <cstdio>

#include "tools/sample.h"

int main(int argc, char** argv) {
  ddpm::Flags flags("ddpm_sample",
                    "Draws samples with a trained model's EMA weights and writes them as PNG.");
  ddpm::AddSampleFlags(flags);
  return ddpm::RunMain(flags, argc, argv, [&] {
    const auto written = ddpm::RunSampleJob(ddpm::SampleJobFromFlags(flags));
    std::printf("ddpm_sample: wrote %zu file%s, first %s\n", written.size(),
                written.size() == 1 ? "" : "s", written.front().c_str());
    return 0;
  });
}
