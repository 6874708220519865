// ddpmctl's commands over the Control service: start, eval, stop, list, get, watch, delete,
// backup.
#pragma once

#include <cstdint>
#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include "config/flags.h"
#include "proto/rpc.h"

namespace ddpm {

/// Exit codes of ddpmctl, after sysexits.h where one fits.
enum CtlExit {
  kCtlOk = 0,
  /// The coordinator refused the request, or the watched run failed.
  kCtlFailed = 1,
  /// A bad command line.
  kCtlUsage = 2,
  /// The coordinator could not be reached (EX_UNAVAILABLE).
  kCtlUnavailable = 69,
  /// A local file (config, token, CA) could not be read (EX_NOINPUT).
  kCtlNoInput = 66,
  /// The token was refused (EX_NOPERM).
  kCtlNoPermission = 77,
  /// A local output file (a backup) could not be written (EX_CANTCREAT).
  kCtlCantCreate = 73,
};

/// What every command needs.
struct CtlOptions {
  ChannelOptions channel;
  /// File of the control token; empty: $DDPM_CONTROL_TOKEN.
  std::string token_file;
  /// Print JSON (one object per line for watch) instead of text.
  bool json = false;
  /// Seconds a unary call may take.
  double timeout_seconds = 30;
  /// Draw a progress bar (a terminal) or print plain lines.
  bool terminal = false;
  /// Where output goes.
  FILE* out = stdout;
};

struct StartOptions {
  std::string config_path;
  std::string name;
  int priority = 0;
  /// Negative: the coordinator's default.
  int max_restarts = -1;
};

/// An evaluation job (ddpmctl eval): unset optionals keep the training run's eval.* settings.
struct EvalOptions {
  std::string run;
  /// latest, all, every:K or a step.
  std::string checkpoints = "latest";
  std::optional<int64_t> num_samples;
  std::string sampler;
  std::optional<int> steps;
  std::optional<uint64_t> seed;
  std::optional<int> batch_size;
  std::optional<double> guidance;
  /// Scores beside FID and IS ("kid", "prd"); empty: the run's eval.metrics.
  std::vector<std::string> metrics;
  /// The training set of a memorization report of each checkpoint ("run": the run's own).
  std::string memorization_train;
  std::string is_logits;
  std::string reference_stats;
  std::string inception_weights;
  std::string name;
  int priority = 0;
  /// Negative: the coordinator's default.
  int max_restarts = -1;
};

/// --max-restarts of command ("ddpmctl start"): -1 (the coordinator's default) when not given;
/// throws FlagError for a negative number.
int MaxRestartsFromFlags(const Flags& flags, const std::string& command);
/// ddpmctl eval's request from its flags: each setting from its flag, else from --protocol's
/// file, else left to the training run's eval.* (the coordinator validates the result once,
/// with Config::Validate). Throws FlagError for a value that is not a number.
EvalOptions EvalOptionsFromFlags(const Flags& flags);

/// Each returns a CtlExit code and prints results (or one error line on stderr).
/// Queues a run; its id goes to *run_id when given.
int CtlStart(const CtlOptions& options, const StartOptions& start, std::string* run_id = nullptr);
/// Queues an evaluation job; its id goes to *run_id when given.
int CtlEval(const CtlOptions& options, const EvalOptions& eval, std::string* run_id = nullptr);
int CtlStop(const CtlOptions& options, const std::string& run, bool immediate);
int CtlList(const CtlOptions& options, const std::string& state,
            const std::string& name_prefix = "");
int CtlGet(const CtlOptions& options, const std::string& run);
/// Follows a run to its end; reconnects if the coordinator restarts. Exit 0 for COMPLETED or
/// STOPPED, 1 for FAILED.
int CtlWatch(const CtlOptions& options, const std::string& run);
int CtlDelete(const CtlOptions& options, const std::string& run);
/// Forgets every run that ended before the moment when: an age back from now ("30d", "12h",
/// "90m") or a UTC date or time ("2026-11-01", "2026-11-01T12:00:00Z"). Run directories stay.
int CtlDeleteEndedBefore(const CtlOptions& options, const std::string& when);
/// The moment --ended-before names, in milliseconds since the Unix epoch, from now_unix_ms;
/// throws std::invalid_argument naming when.
int64_t ParseEndedBefore(const std::string& when, int64_t now_unix_ms);
/// Writes an online, consistent copy of the coordinator's registry to file: into a temporary
/// file beside it, checked against the coordinator's SHA-256, then renamed, so that file is
/// whole or untouched. kCtlCantCreate, naming file, when it cannot be written.
int CtlBackup(const CtlOptions& options, const std::string& file);
/// grpc.health.v1's status of service ("" the server) with no token: prints it; kCtlOk when
/// SERVING, kCtlFailed otherwise, kCtlUnavailable when the coordinator cannot be reached.
int CtlHealth(const CtlOptions& options, const std::string& service);

}  // namespace ddpm
