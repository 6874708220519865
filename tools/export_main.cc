// ddpm_export: a checkpoint's EMA (or raw) weights as one state dict for Python's torch.load.
// Thin main: flags to an ExportJob, then the library.
#include "config/flags.h"
#include "tools/export.h"

int main(int argc, char** argv) {
  ddpm::Flags flags("ddpm_export",
                    "Writes a checkpoint's weights as one state dict that PyTorch's torch.load\n"
                    "reads, with the UNet's parameter names, and the config beside it (.yaml).");
  flags.Add("checkpoint",
            "a checkpoint directory, a checkpoints folder or a run directory (its newest valid "
            "checkpoint), or RUN_DIR/best (the checkpoint eval.select kept)",
            "");
  flags.Add("out", "the state dict file to write", "model.pt");
  flags.Add("weights", "ema (for sampling) or model (the raw trained weights)", "ema");
  return ddpm::RunMain(flags, argc, argv, [&] {
    ddpm::ExportJob job;
    job.checkpoint = flags.GetRequired("checkpoint");
    job.out = flags.Get("out");
    job.which = flags.Get("weights");
    ddpm::RunExport(job);
    return 0;
  });
}
