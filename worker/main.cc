// ddpm_worker: trains a DDPM from a YAML config. Thin main: flags to options, then the library.
#include "trainer/flags.h"
#include "worker/worker.h"

int main(int argc, char** argv) {
  ddpm::Flags flags("ddpm_worker",
                    "Trains a DDPM (Ho et al. 2020) from a YAML config. DDPM_<SECTION>_<KEY>\n"
                    "environment variables override config keys, e.g. DDPM_TRAIN_STEPS=100.");
  flags.Add("config", "path of the YAML config", "");
  flags.Add("run-dir", "run directory for logs, sample grids and weights", "runs/default");
  flags.AddSwitch("resume", "continue from the run directory's newest valid checkpoint, if any");
  flags.Add("resume-from", "continue from this checkpoint file", "");
  flags.AddSwitch("print-params", "print the UNet's parameter count for the config and exit");
  flags.AddSwitch("print-config", "print the resolved config as YAML and exit");
  return ddpm::RunMain(flags, argc, argv, [&] {
    ddpm::WorkerOptions options;
    options.config_path = flags.Get("config");
    if (options.config_path.empty()) throw ddpm::FlagError("ddpm_worker: --config is required");
    options.run_dir = flags.Get("run-dir");
    options.resume = flags.GetSwitch("resume");
    options.resume_from = flags.Get("resume-from");
    options.print_params = flags.GetSwitch("print-params");
    options.print_config = flags.GetSwitch("print-config");
    return ddpm::RunWorker(options);
  });
}
