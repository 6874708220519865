// ddpm_phema: reconstructs a post-hoc EMA of any length from a run's snapshots. Thin main.
#include "tools/phema.h"

int main(int argc, char** argv) {
  ddpm::Flags flags("ddpm_phema",
                    "Reconstructs the EMA of any relative standard deviation (sigma_rel) at any "
                    "snapshot step from the power-function profiles a run stored "
                    "(train.phema_snapshot_every), as weights files for ddpm_sample, ddpm_fid and "
                    "torch.load; with --evaluate yes, FID and IS of each against sigma_rel.");
  ddpm::AddPhemaFlags(flags);
  return ddpm::RunMain(flags, argc, argv, [&] {
    ddpm::RunPhema(ddpm::PhemaJobFromFlags(flags));
    return 0;
  });
}
