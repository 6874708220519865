// ddpm_sample: draws EMA samples from a checkpoint or weights file into PNGs; under mpirun the
// ranks share the images. Thin main.
#include <cstdio>

#include "base/log.h"
#include "tools/sample.h"
#include "tools/tool_world.h"

int main(int argc, char** argv) {
  ddpm::Flags flags("ddpm_sample",
                    "Draws samples with a trained model's EMA weights and writes them as PNG; "
                    "under mpirun, across the ranks.");
  ddpm::AddSampleFlags(flags);
  return ddpm::RunMain(flags, argc, argv, [&] {
    ddpm::ToolWorld world(&argc, &argv);
    return world.Run("ddpm_sample", [&] {
      const auto written =
          ddpm::RunSampleJob(ddpm::SampleJobFromFlags(flags), world.comm(),
                             [&world](ddpm::TrainedModel& trained) { world.Place(trained); });
      if (world.comm().world_size() == 1 && !written.empty()) {
        ddpm::LogInfo("ddpm_sample: wrote %zu file%s, first %s\n", written.size(),
                      written.size() == 1 ? "" : "s", written.front().c_str());
      }
      return 0;
    });
  });
}
