// ddpm_nll: the variational bound (NLL) of a trained model on a dataset in bits/dim, with the
// term of every timestep as CSV and a PNG plot. Thin main over tools/nll.h. Under mpirun every
// rank takes its share of the batches (on GPU local_rank when the device is CUDA), the float64
// sums are all-reduced, and rank 0 reports and writes the files.
#include "config/flags.h"
#include "tools/nll.h"
#include "tools/tool_world.h"
#include "tools/trained_model.h"

int main(int argc, char** argv) {
  ddpm::Flags flags("ddpm_nll",
                    "Computes the variational bound (the NLL of Ho et al., Table 1) of a trained "
                    "model's EMA weights on a dataset, in bits/dim; under mpirun, across the "
                    "ranks.");
  ddpm::AddNllFlags(flags);
  return ddpm::RunMain(flags, argc, argv, [&] {
    ddpm::ToolWorld world(&argc, &argv);
    return world.Run("ddpm_nll", [&] {
      const ddpm::NllJob job = ddpm::NllJobFromFlags(flags);
      ddpm::TrainedModel trained = ddpm::LoadTrainedModel(flags, job.overrides, "ddpm_nll");
      world.Place(trained);
      return ddpm::RunNllJob(job, trained, world.comm());
    });
  });
}
