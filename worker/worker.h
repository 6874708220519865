// ddpm_worker: one training process. Torch-free header.
#pragma once

#include <string>

#include "run/run.h"

namespace ddpm {

/// What the ddpm_worker command line asks for.
struct WorkerOptions {
  /// The run's YAML config.
  std::string config_path;
  /// Run directory for logs, samples and weights.
  std::string run_dir = "runs/default";
  /// Continue from the run directory's newest valid checkpoint, if any.
  bool resume = false;
  /// Continue from this checkpoint file.
  std::string resume_from;
  /// Print the UNet's parameter count for the config and exit.
  bool print_params = false;
  /// Print the resolved config as YAML and exit.
  bool print_config = false;
  /// Service mode: the coordinator's HOST:PORT. Then runs come from it, not from config_path.
  std::string coordinator;
  /// File of the worker token; empty: $DDPM_WORKER_TOKEN.
  std::string worker_token_file;
  /// PEM CA certificate to reach the coordinator over TLS; empty: plaintext.
  std::string tls_ca;
  /// PEM client certificate and key, for a coordinator that requires mutual TLS.
  std::string tls_cert;
  std::string tls_key;
  /// The group's id; empty: "<host>-<pid of rank 0>".
  std::string group_id;
  /// HOST:PORT: each rank serves its own /metrics on PORT + its local rank (PORT 0: any free
  /// port); empty: none.
  std::string metrics_listen;
  /// How rank 0 shows training progress on stdout.
  ProgressMode progress = ProgressMode::kAuto;
};

/// Runs what options ask for; returns the process exit code (128 + signal when Ctrl-C or
/// SIGTERM stopped training). Throws on bad input.
int RunWorker(const WorkerOptions& options);

}  // namespace ddpm
