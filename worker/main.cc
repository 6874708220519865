// ddpm_worker: trains a DDPM from a YAML config. Thin main: flags to options, then the library.
#include <cstdlib>

#include "config/flags.h"
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
  flags.Add("coordinator",
            "service mode: HOST:PORT of a ddpm_coordinator; the group registers and trains the "
            "runs it assigns (no --config)",
            "");
  flags.Add("worker-token-file", "file holding the worker token (default: $DDPM_WORKER_TOKEN)", "");
  flags.Add("tls-ca", "PEM CA certificate: reach the coordinator over TLS", "");
  flags.Add("tls-cert",
            "PEM client certificate for a coordinator that requires mutual TLS (--tls-client-ca "
            "there); with --tls-key and --tls-ca",
            "");
  flags.Add("tls-key", "PEM private key of --tls-cert", "");
  flags.Add("group-id", "the group's id at the coordinator (default: HOST-PID of rank 0)", "");
  flags.Add("progress",
            "auto, bar, lines or off: a bar redrawn every step, a line per log interval, or "
            "neither; auto draws the bar only on a terminal outside mpirun and Slurm (default: "
            "$DDPM_PROGRESS, else auto)",
            "");
  flags.Add("metrics-listen",
            "HOST:PORT: each rank serves Prometheus /metrics on PORT + its local rank "
            "(default: $DDPM_WORKER_METRICS_LISTEN, else none)",
            "");
  return ddpm::RunMain(flags, argc, argv, [&] {
    ddpm::WorkerOptions options;
    options.config_path = flags.Get("config");
    options.coordinator = flags.Get("coordinator");
    if (options.config_path.empty() == options.coordinator.empty()) {
      throw ddpm::FlagError(
          "ddpm_worker: give either --config (one run) or --coordinator (service mode)");
    }
    options.worker_token_file = flags.Get("worker-token-file");
    options.tls_ca = flags.Get("tls-ca");
    options.tls_cert = flags.Get("tls-cert");
    options.tls_key = flags.Get("tls-key");
    options.group_id = flags.Get("group-id");
    options.metrics_listen = flags.Get("metrics-listen");
    if (options.metrics_listen.empty() && std::getenv("DDPM_WORKER_METRICS_LISTEN") != nullptr) {
      options.metrics_listen = std::getenv("DDPM_WORKER_METRICS_LISTEN");
    }
    const char* progress_env = std::getenv("DDPM_PROGRESS");
    if (flags.Given("progress")) {
      options.progress = ddpm::ParseProgressMode(flags.Get("progress"), "ddpm_worker --progress");
    } else if (progress_env != nullptr && *progress_env != '\0') {
      options.progress = ddpm::ParseProgressMode(progress_env, "$DDPM_PROGRESS");
    }
    options.run_dir = flags.Get("run-dir");
    options.resume = flags.GetSwitch("resume");
    options.resume_from = flags.Get("resume-from");
    options.print_params = flags.GetSwitch("print-params");
    options.print_config = flags.GetSwitch("print-config");
    return ddpm::RunWorker(options);
  });
}
