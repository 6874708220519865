#include "tools/ctl.h"

#include <fcntl.h>
#include <google/protobuf/util/json_util.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>
#include <ctime>
#include <map>
#include <memory>
#include <thread>

#include "base/errors.h"
#include "base/log.h"
#include "base/sha256.h"
#include "base/text.h"
#include "config/config.h"
#include "config/eval_protocol.h"
#include "ddpm/v1/control.grpc.pb.h"
#include "proto/placement.h"
#include "proto/run_state.h"

namespace ddpm {
namespace {

using Clock = std::chrono::steady_clock;

int ExitFor(const grpc::Status& status) {
  switch (status.error_code()) {
    case grpc::StatusCode::UNAVAILABLE:
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      return kCtlUnavailable;
    case grpc::StatusCode::UNAUTHENTICATED:
    case grpc::StatusCode::PERMISSION_DENIED:
      return kCtlNoPermission;
    default:
      return kCtlFailed;
  }
}

int Report(const std::string& rpc, const grpc::Status& status) {
  LogError("ddpmctl: %s\n", DescribeStatus(rpc, status).c_str());
  return ExitFor(status);
}

std::string Time(int64_t unix_ms) {
  if (unix_ms == 0) return "-";
  const std::time_t seconds = unix_ms / 1000;
  std::tm local{};
  localtime_r(&seconds, &local);
  char text[32];
  std::strftime(text, sizeof(text), "%Y-%m-%d %H:%M:%S", &local);
  return text;
}

// A client that carries the token; a token or CA that cannot be read is reported at once.
class Client {
 public:
  explicit Client(const CtlOptions& options) : options_(options) {
    token_ = ReadToken(options.token_file, "DDPM_CONTROL_TOKEN");
    control_ = MakeClient<v1::Control>(options.channel);
  }
  std::unique_ptr<grpc::ClientContext> Context() const {
    return MakeContext(
        token_, std::chrono::milliseconds(static_cast<int64_t>(options_.timeout_seconds * 1000)));
  }
  std::unique_ptr<grpc::ClientContext> StreamContext() const { return MakeContext(token_); }
  auto& control() { return *control_; }

 private:
  const CtlOptions& options_;
  std::string token_;
  std::unique_ptr<v1::Control::Stub> control_;
};

// Runs body with a client; local setup errors (token, CA, config file) exit with kCtlNoInput.
template <typename Body>
int WithClient(const CtlOptions& options, Body body) {
  std::unique_ptr<Client> client;
  try {
    client = std::make_unique<Client>(options);
  } catch (const std::exception& error) {
    LogError("ddpmctl: %s\n", error.what());
    return kCtlNoInput;
  }
  return body(*client);
}

void PrintRunSummary(FILE* out, const v1::Run& run) {
  std::fprintf(out, "run %s (%s): %s: %s\n", run.id().c_str(), run.name().c_str(),
               StateName(run.state()).c_str(), run.reason().c_str());
}

void PrintRunDetails(FILE* out, const v1::Run& run) {
  const auto row = [out](const char* key, const std::string& value) {
    if (!value.empty()) std::fprintf(out, "  %-18s %s\n", key, value.c_str());
  };
  std::fprintf(out, "run %s\n", run.id().c_str());
  row("name", run.name());
  row("state", StateName(run.state()));
  row("reason", run.reason());
  const bool job = run.kind() == v1::EVALUATION;
  if (job) {
    row("evaluates", "checkpoints " + run.evaluation().checkpoints() + " of run " +
                         run.evaluation().source_run() + " (" + run.evaluation().source_run_dir() +
                         ")");
    row("images", std::to_string(run.metrics().step()) + " / " +
                      (run.total_steps() > 0 ? std::to_string(run.total_steps())
                                             : std::string("? (chosen when it starts)")));
    if (run.metrics().at_unix_ms() != 0) {
      char text[128];
      std::snprintf(text, sizeof(text), "%.2f images/s, eta %s", run.metrics().images_per_second(),
                    FormatDuration(run.metrics().eta_seconds()).c_str());
      row("metrics", text);
    }
  } else {
    row("step", std::to_string(run.metrics().step()) + " / " + std::to_string(run.total_steps()));
  }
  if (!job && run.metrics().at_unix_ms() != 0) {
    char text[160];
    std::snprintf(text, sizeof(text), "loss %.4f, grad norm %.3f, lr %.2e, %.1f images/s, eta %s",
                  run.metrics().loss(), run.metrics().grad_norm(), run.metrics().lr(),
                  run.metrics().images_per_second(),
                  FormatDuration(run.metrics().eta_seconds()).c_str());
    row("metrics", text);
  }
  if (run.metrics().rollbacks() > 0 || run.metrics().checkpoint_failures() > 0) {
    row("incidents",
        std::to_string(run.metrics().rollbacks()) + " divergence rollback(s), " +
            std::to_string(run.metrics().checkpoint_failures()) +
            " checkpoint(s) that failed to write; newest: " + run.metrics().last_incident());
  }
  if (job && !run.placement().group_id().empty()) {
    const v1::Placement& p = run.placement();
    row("placement", "group " + p.group_id() + ": " + std::to_string(p.world_size()) + " ranks x " +
                         std::to_string(p.micro_batch()) + " samples per forward pass (attempt " +
                         std::to_string(p.attempt()) + ")");
  } else if (!run.placement().group_id().empty()) {
    const v1::Placement& p = run.placement();
    row("placement", "group " + p.group_id() + ": " + DescribePlacementPlan(p) + " (attempt " +
                         std::to_string(p.attempt()) + ")");
  }
  // A class-conditional model: its classes (their names are in the run directory's
  // classes.txt, written from the data) and its label dropout; post-hoc EMA's snapshots.
  try {
    const Config config = LoadConfigString(run.config_yaml(), "run " + run.id(), false);
    if (config.model.num_classes > 0) {
      row("classes", std::to_string(config.model.num_classes) + " (names in " + run.run_dir() +
                         "/classes.txt), label dropout " +
                         FormatNumber(config.train.label_dropout) + ", sample guidance " +
                         FormatNumber(config.sample.guidance));
    }
    // Post-hoc EMA: where the snapshots go, and of which profiles.
    std::string profiles;
    for (double s : config.train.phema_sigma_rels) {
      profiles += (profiles.empty() ? "" : ", ") + FormatNumber(s);
    }
    row("post-hoc ema", config.train.phema_snapshot_every > 0
                            ? "snapshots every " +
                                  std::to_string(config.train.phema_snapshot_every) + " steps in " +
                                  run.run_dir() + "/phema (sigma_rel " + profiles +
                                  "; ddpm_phema reconstructs any length)"
                            : std::string("off (train.phema_snapshot_every 0)"));
  } catch (const ConfigError&) {
    // A config this build cannot read: the coordinator says so in the run's state.
  }
  row("priority", std::to_string(run.priority()));
  row("restarts", std::to_string(run.restarts()) + " of " + std::to_string(run.max_restarts()));
  row("run dir", run.run_dir());
  if (run.latest_checkpoint().step() > 0) {
    row("checkpoint", run.latest_checkpoint().path() + " (step " +
                          std::to_string(run.latest_checkpoint().step()) + ")");
  }
  row("sample grid", run.sample_grid());
  row("ema weights", run.ema_weights());
  if (run.has_latest_eval()) {
    const v1::EvalResult& eval = run.latest_eval();
    char text[256];
    const std::string logits =
        (eval.is_logits().empty() ? "" : " (" + eval.is_logits() + " logits)") +
        (eval.has_guidance() ? " class-balanced, guidance " + FormatNumber(eval.guidance()) : "");
    std::snprintf(text, sizeof(text),
                  "FID %.3f, IS %.3f +- %.3f%s at step %lld (%lld samples, %s %d steps, %.0fs%s)",
                  eval.fid(), eval.inception_score(), eval.inception_score_std(), logits.c_str(),
                  static_cast<long long>(eval.step()), static_cast<long long>(eval.num_samples()),
                  eval.sampler().c_str(), eval.sampling_steps(), eval.seconds(),
                  eval.regularized() ? ", covariances regularized" : "");
    row("eval", text);
    if (eval.has_kid()) {
      std::snprintf(text, sizeof(text), "%.6f +- %.6f (%d subsets of %lld)", eval.kid(),
                    eval.kid_std(), eval.kid_subsets(),
                    static_cast<long long>(eval.kid_subset_size()));
      row("kid", text);
    }
    if (eval.has_precision()) {
      std::snprintf(text, sizeof(text),
                    "precision %.4f, recall %.4f (k = 3); density %.4f, coverage %.4f (k = 5); "
                    "against %lld reference features",
                    eval.precision(), eval.recall(), eval.density(), eval.coverage(),
                    static_cast<long long>(eval.prd_reference_count()));
      row("prd", text);
    }
    if (!eval.inception_sha256().empty()) {
      row("eval hashes", "Inception " + eval.inception_sha256().substr(0, 16) + ", reference " +
                             eval.reference_sha256().substr(0, 16));
    }
  }
  if (run.has_best()) {
    const v1::BestCheckpointInfo& best = run.best();
    char text[160];
    std::snprintf(text, sizeof(text), "%s %.6g at step %lld", best.metric().c_str(), best.score(),
                  static_cast<long long>(best.step()));
    std::string since;
    if (run.kind() != v1::EVALUATION) {
      since = "; " + std::to_string(best.evaluations_since()) + " evaluation(s) since" +
              (best.patience() > 0 ? " of eval.patience " + std::to_string(best.patience()) : "");
    }
    row("best", std::string(text) + " (" + best.path() + since + ")");
  }
  if (run.latest_nll().has_nll_bits_per_dim()) {
    const v1::EvalResult& eval = run.latest_nll();
    const bool full = eval.nll_timesteps() == eval.nll_timesteps_total();
    char text[384];
    std::snprintf(text, sizeof(text),
                  "%.4f +- %.4f bits/dim at step %lld (%lld %s images, %s %d of %d timesteps)",
                  eval.nll_bits_per_dim(), eval.nll_std_error(),
                  static_cast<long long>(eval.step()), static_cast<long long>(eval.nll_images()),
                  eval.nll_data().c_str(), full ? "all" : "estimated from", eval.nll_timesteps(),
                  eval.nll_timesteps_total());
    row("nll", text);
  }
  if (job && !run.evaluation().memorization_train().empty()) {
    row("memorization", "against " + run.evaluation().memorization_train() +
                            " (memorization/step_*/ in the run dir)");
  }
  if (job && run.evaluation().results_size() > 0) {
    std::fprintf(
        out, "  results (FID and IS per checkpoint; sweep.csv and sweep.png in the run dir):\n");
    std::fprintf(out, "    %10s %12s %20s %22s %9s  %s\n", "STEP", "FID", "IS", "KID", "SAMPLES",
                 "PROTOCOL");
    for (const v1::EvalResult& r : run.evaluation().results()) {
      char is[64];
      std::snprintf(is, sizeof(is), "%.4f +- %.4f", r.inception_score(), r.inception_score_std());
      char kid[64] = "-";
      if (r.has_kid()) std::snprintf(kid, sizeof(kid), "%.6f +- %.6f", r.kid(), r.kid_std());
      std::fprintf(out, "    %10lld %12.4f %20s %22s %9lld  %s %d steps, %s logits%s%s\n",
                   static_cast<long long>(r.step()), r.fid(), is, kid,
                   static_cast<long long>(r.num_samples()), r.sampler().c_str(), r.sampling_steps(),
                   r.is_logits().c_str(),
                   r.has_guidance() ? (", guidance " + FormatNumber(r.guidance())).c_str() : "",
                   r.regularized() ? ", covariances regularized" : "");
    }
  }
  row("created", Time(run.created_unix_ms()));
  if (run.transitions_size() > 0) std::fprintf(out, "  transitions:\n");
  for (const v1::Transition& t : run.transitions()) {
    std::fprintf(out, "    %s  %-9s -> %-9s %s\n", Time(t.at_unix_ms()).c_str(),
                 t.from() == v1::RUN_STATE_UNSPECIFIED ? "" : StateName(t.from()).c_str(),
                 StateName(t.to()).c_str(), t.reason().c_str());
  }
}

}  // namespace

int CtlStart(const CtlOptions& options, const StartOptions& start, std::string* run_id) {
  v1::StartRunRequest request;
  try {
    request.set_config_yaml(ReadTextFile(start.config_path, "config"));
  } catch (const std::exception& error) {
    LogError("ddpmctl: %s\n", error.what());
    return kCtlNoInput;
  }
  request.set_name(start.name);
  request.set_priority(start.priority);
  if (start.max_restarts >= 0) request.set_max_restarts(start.max_restarts);
  return WithClient(options, [&](Client& client) {
    v1::StartRunResponse response;
    const grpc::Status status =
        client.control().StartRun(client.Context().get(), request, &response);
    if (!status.ok()) return Report("StartRun", status);
    if (run_id != nullptr) *run_id = response.run().id();
    if (options.json) {
      // The whole response: the run and its page's address.
      std::fprintf(options.out, "%s\n", ToJson(response).c_str());
    } else {
      std::fprintf(options.out, "started run %s (%s)\n", response.run().id().c_str(),
                   StateName(response.run().state()).c_str());
      if (!response.page_url().empty()) {
        std::fprintf(options.out, "its page: %s\n", response.page_url().c_str());
      }
    }
    return static_cast<int>(kCtlOk);
  });
}

int CtlEval(const CtlOptions& options, const EvalOptions& eval, std::string* run_id) {
  v1::StartEvalRequest request;
  request.set_run(eval.run);
  request.set_checkpoints(eval.checkpoints);
  if (eval.num_samples) request.set_num_samples(*eval.num_samples);
  request.set_sampler(eval.sampler);
  if (eval.steps) request.set_steps(*eval.steps);
  if (eval.seed) request.set_seed(*eval.seed);
  if (eval.batch_size) request.set_batch_size(*eval.batch_size);
  if (eval.guidance) request.set_guidance(*eval.guidance);
  request.set_is_logits(eval.is_logits);
  for (const std::string& metric : eval.metrics) request.add_metrics(metric);
  request.set_memorization_train(eval.memorization_train);
  request.set_reference_stats(eval.reference_stats);
  request.set_inception_weights(eval.inception_weights);
  request.set_name(eval.name);
  request.set_priority(eval.priority);
  if (eval.max_restarts >= 0) request.set_max_restarts(eval.max_restarts);
  return WithClient(options, [&](Client& client) {
    v1::StartEvalResponse response;
    const auto context = client.Context();
    const grpc::Status status = client.control().StartEval(context.get(), request, &response);
    if (!status.ok()) return Report("StartEval", status);
    if (run_id != nullptr) *run_id = response.run().id();
    if (options.json) {
      std::fprintf(options.out, "%s\n", ToJson(response.run()).c_str());
    } else {
      std::fprintf(options.out, "started evaluation job %s of run %s, checkpoints %s (%s)\n",
                   response.run().id().c_str(), response.run().evaluation().source_run().c_str(),
                   response.run().evaluation().checkpoints().c_str(),
                   StateName(response.run().state()).c_str());
    }
    return static_cast<int>(kCtlOk);
  });
}

int CtlStop(const CtlOptions& options, const std::string& run, bool immediate) {
  return WithClient(options, [&](Client& client) {
    v1::StopRunRequest request;
    request.set_run(run);
    request.set_immediate(immediate);
    v1::StopRunResponse response;
    const grpc::Status status =
        client.control().StopRun(client.Context().get(), request, &response);
    if (!status.ok()) return Report("StopRun", status);
    if (options.json) {
      std::fprintf(options.out, "%s\n", ToJson(response.run()).c_str());
    } else {
      PrintRunSummary(options.out, response.run());
    }
    return static_cast<int>(kCtlOk);
  });
}

int CtlList(const CtlOptions& options, const std::string& state, const std::string& name_prefix) {
  v1::ListRunsRequest request;
  request.set_name_prefix(name_prefix);
  if (!state.empty()) {
    v1::RunState filter = v1::RUN_STATE_UNSPECIFIED;
    if (!v1::RunState_Parse(state, &filter) || filter == v1::RUN_STATE_UNSPECIFIED) {
      LogError(
          "ddpmctl: --state %s: use QUEUED, STARTING, RUNNING, STOPPING, STOPPED, "
          "COMPLETED or FAILED\n",
          state.c_str());
      return kCtlUsage;
    }
    request.set_state(filter);
  }
  return WithClient(options, [&](Client& client) {
    // Every page, as one list.
    v1::ListRunsResponse response;
    request.set_page_size(1000);
    do {
      v1::ListRunsResponse page;
      const grpc::Status status = client.control().ListRuns(client.Context().get(), request, &page);
      if (!status.ok()) return Report("ListRuns", status);
      for (v1::Run& run : *page.mutable_runs()) *response.add_runs() = std::move(run);
      request.set_page_token(page.next_page_token());
    } while (!request.page_token().empty());
    if (options.json) {
      std::fprintf(options.out, "%s\n", ToJson(response).c_str());
      return static_cast<int>(kCtlOk);
    }
    std::fprintf(options.out, "%-24s %-10s %15s %9s %9s  %s\n", "RUN", "STATE", "STEP", "LOSS",
                 "IMG/S", "UPDATED");
    for (const v1::Run& run : response.runs()) {
      const std::string step =
          std::to_string(run.metrics().step()) + "/" + std::to_string(run.total_steps());
      std::fprintf(options.out, "%-24s %-10s %15s %9.4f %9.1f  %s\n", run.id().c_str(),
                   StateName(run.state()).c_str(), step.c_str(), run.metrics().loss(),
                   run.metrics().images_per_second(), Time(run.updated_unix_ms()).c_str());
    }
    return static_cast<int>(kCtlOk);
  });
}

int CtlGet(const CtlOptions& options, const std::string& run) {
  return WithClient(options, [&](Client& client) {
    v1::GetRunRequest request;
    request.set_run(run);
    v1::GetRunResponse response;
    const grpc::Status status = client.control().GetRun(client.Context().get(), request, &response);
    if (!status.ok()) return Report("GetRun", status);
    if (options.json) {
      std::fprintf(options.out, "%s\n", ToJson(response.run()).c_str());
    } else {
      PrintRunDetails(options.out, response.run());
    }
    return static_cast<int>(kCtlOk);
  });
}

int CtlDelete(const CtlOptions& options, const std::string& run) {
  return WithClient(options, [&](Client& client) {
    v1::DeleteRunRequest request;
    request.set_run(run);
    v1::DeleteRunResponse response;
    const grpc::Status status =
        client.control().DeleteRun(client.Context().get(), request, &response);
    if (!status.ok()) return Report("DeleteRun", status);
    if (options.json) {
      std::fprintf(options.out, "{\"deleted\":\"%s\"}\n", run.c_str());
    } else {
      std::fprintf(options.out, "deleted run %s\n", run.c_str());
    }
    return static_cast<int>(kCtlOk);
  });
}

int64_t ParseEndedBefore(const std::string& when, int64_t now_unix_ms) {
  const auto refuse = [&]() -> int64_t {
    throw std::invalid_argument("--ended-before '" + when +
                                "': give an age (30d, 12h, 90m) or a UTC date or time "
                                "(2026-11-01, 2026-11-01T12:00:00Z)");
  };
  // An age: a number and a unit.
  size_t used = 0;
  double number = 0;
  try {
    number = std::stod(when, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  const std::string unit = when.substr(used);
  if (used > 0 && (unit == "s" || unit == "m" || unit == "h" || unit == "d")) {
    if (!(number >= 0) || !std::isfinite(number)) return refuse();
    const double seconds = number * (unit == "s"   ? 1
                                     : unit == "m" ? 60
                                     : unit == "h" ? 3600
                                                   : 86400);
    return now_unix_ms - static_cast<int64_t>(seconds * 1000);
  }
  // A date, or a date and time, in UTC.
  std::tm utc{};
  const char* end = strptime(when.c_str(), "%Y-%m-%dT%H:%M:%SZ", &utc);
  if (end == nullptr || *end != '\0') {
    utc = {};
    end = strptime(when.c_str(), "%Y-%m-%d", &utc);
    if (end == nullptr || *end != '\0') return refuse();
  }
  return static_cast<int64_t>(timegm(&utc)) * 1000;
}

int CtlDeleteEndedBefore(const CtlOptions& options, const std::string& when) {
  int64_t before = 0;
  try {
    before = ParseEndedBefore(when, std::chrono::duration_cast<std::chrono::milliseconds>(
                                        std::chrono::system_clock::now().time_since_epoch())
                                        .count());
  } catch (const std::invalid_argument& error) {
    LogError("ddpmctl: %s\n", error.what());
    return kCtlUsage;
  }
  return WithClient(options, [&](Client& client) {
    v1::DeleteRunsRequest request;
    request.set_ended_before_unix_ms(before);
    v1::DeleteRunsResponse response;
    const grpc::Status status =
        client.control().DeleteRuns(client.Context().get(), request, &response);
    if (!status.ok()) return Report("DeleteRuns", status);
    if (options.json) {
      std::fprintf(options.out, "%s\n", ToJson(response).c_str());
    } else {
      std::fprintf(options.out,
                   "deleted %d runs that ended before %s (their run directories stay)\n",
                   response.deleted_size(), FormatUtc(before).c_str());
      for (const std::string& id : response.deleted()) {
        std::fprintf(options.out, "  %s\n", id.c_str());
      }
    }
    return static_cast<int>(kCtlOk);
  });
}

int CtlBackup(const CtlOptions& options, const std::string& file) {
  return WithClient(options, [&](Client& client) {
    // The copy goes to a temporary file beside file, made first: a path that cannot be written
    // is refused before the coordinator is asked for anything.
    const std::string partial = file + ".partial-" + std::to_string(::getpid());
    const int fd = ::open(partial.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) {
      LogError("%s", ErrnoMessage("ddpmctl: cannot write the backup to " + file).c_str());
      return static_cast<int>(kCtlCantCreate);
    }
    // Whatever goes wrong from here, nothing is left at either path.
    const auto discard = [&](int code) {
      ::close(fd);
      ::unlink(partial.c_str());
      return code;
    };
    const std::unique_ptr<grpc::ClientContext> context = client.StreamContext();
    v1::BackupRegistryRequest request;
    auto reader = client.control().BackupRegistry(context.get(), request);
    v1::BackupChunk chunk;
    Sha256 hash;
    int64_t written = 0, total = -1, runs = 0;
    std::string sha256;
    while (reader->Read(&chunk)) {
      const std::string& data = chunk.data();
      size_t done = 0;
      while (done < data.size()) {
        const ssize_t n = ::write(fd, data.data() + done, data.size() - done);
        if (n < 0) {
          if (errno == EINTR) continue;
          LogError("%s", ErrnoMessage("ddpmctl: cannot write the backup to " + file).c_str());
          context->TryCancel();
          reader->Finish();
          return discard(kCtlCantCreate);
        }
        done += static_cast<size_t>(n);
      }
      hash.Update(data);
      written += static_cast<int64_t>(data.size());
      total = chunk.total_bytes();
      if (!chunk.sha256().empty()) {
        sha256 = chunk.sha256();
        runs = chunk.runs();
      }
    }
    const grpc::Status status = reader->Finish();
    if (!status.ok()) return discard(Report("BackupRegistry", status));
    const std::string got = hash.HexDigest();
    if (written != total || sha256.empty() || got != sha256) {
      LogError(
          "ddpmctl: the backup arrived damaged (%lld of %lld bytes, SHA-256 %s, the "
          "coordinator's %s); %s is untouched\n",
          static_cast<long long>(written), static_cast<long long>(total), got.c_str(),
          sha256.empty() ? "missing" : sha256.c_str(), file.c_str());
      return discard(kCtlFailed);
    }
    if (::fsync(fd) != 0 || ::close(fd) != 0 || ::rename(partial.c_str(), file.c_str()) != 0) {
      LogError("%s", ErrnoMessage("ddpmctl: cannot write the backup to " + file).c_str());
      ::unlink(partial.c_str());
      return static_cast<int>(kCtlCantCreate);
    }
    if (options.json) {
      std::fprintf(options.out,
                   "{\"file\":\"%s\",\"bytes\":%lld,\"runs\":%lld,\"sha256\":\"%s\"}\n",
                   file.c_str(), static_cast<long long>(written), static_cast<long long>(runs),
                   sha256.c_str());
    } else {
      std::fprintf(options.out,
                   "backed up %lld runs to %s (%.1f MB, sha256 %s); restore with: "
                   "ddpm_coordinator --data-dir DIR --restore %s\n",
                   static_cast<long long>(runs), file.c_str(), written / 1e6, sha256.c_str(),
                   file.c_str());
    }
    return static_cast<int>(kCtlOk);
  });
}

namespace {

// Draws watch output: a progress bar on a terminal, plain lines elsewhere, JSON lines for --json.
class WatchPrinter {
 public:
  explicit WatchPrinter(const CtlOptions& options) : options_(options) {}

  void Event(const v1::WatchRunEvent& event) {
    const v1::Run& run = event.run();
    if (options_.json) {
      std::fprintf(options_.out, "%s\n", ToJson(event).c_str());
      std::fflush(options_.out);
      return;
    }
    // After a reconnect the first event repeats the whole history: print only what is new.
    for (int i = printed_transitions_; i < run.transitions_size(); ++i) {
      const v1::Transition& t = run.transitions(i);
      ClearBar();
      std::fprintf(options_.out, "%s  %s%s%s: %s\n", Time(t.at_unix_ms()).c_str(),
                   t.from() == v1::RUN_STATE_UNSPECIFIED ? "" : StateName(t.from()).c_str(),
                   t.from() == v1::RUN_STATE_UNSPECIFIED ? "" : " -> ", StateName(t.to()).c_str(),
                   t.reason().c_str());
    }
    printed_transitions_ = std::max(printed_transitions_, run.transitions_size());
    const bool job = run.kind() == v1::EVALUATION;
    // An evaluation job's results, each once.
    for (int i = printed_results_; i < run.evaluation().results_size(); ++i) {
      const v1::EvalResult& r = run.evaluation().results(i);
      ClearBar();
      std::fprintf(options_.out, "checkpoint step %lld: FID %.4f, IS %.4f +- %.4f (%lld samples)\n",
                   static_cast<long long>(r.step()), r.fid(), r.inception_score(),
                   r.inception_score_std(), static_cast<long long>(r.num_samples()));
    }
    printed_results_ = std::max(printed_results_, run.evaluation().results_size());
    if (event.metrics() && run.metrics().step() > last_step_) {
      last_step_ = run.metrics().step();
      const v1::TrainMetrics& m = run.metrics();
      if (options_.terminal) {
        DrawBar(run);
      } else if (job) {
        std::fprintf(options_.out, "images %lld/%lld images/s %.2f eta %s\n",
                     static_cast<long long>(m.step()), static_cast<long long>(run.total_steps()),
                     m.images_per_second(), FormatDuration(m.eta_seconds()).c_str());
      } else {
        std::fprintf(options_.out, "step %lld/%lld loss %.4f images/s %.1f eta %s\n",
                     static_cast<long long>(m.step()), static_cast<long long>(run.total_steps()),
                     m.loss(), m.images_per_second(), FormatDuration(m.eta_seconds()).c_str());
      }
    }
    std::fflush(options_.out);
  }

  void Finish(const v1::Run& run) {
    if (options_.json) return;
    ClearBar();
    if (run.kind() == v1::EVALUATION) {
      std::fprintf(options_.out,
                   "run %s %s: %d checkpoint(s) evaluated; sweep.csv and sweep.png in %s\n",
                   run.id().c_str(), StateName(run.state()).c_str(),
                   run.evaluation().results_size(), run.run_dir().c_str());
      std::fflush(options_.out);
      return;
    }
    std::fprintf(options_.out, "run %s %s at step %lld/%lld\n", run.id().c_str(),
                 StateName(run.state()).c_str(), static_cast<long long>(run.metrics().step()),
                 static_cast<long long>(run.total_steps()));
    if (!run.sample_grid().empty())
      std::fprintf(options_.out, "  sample grid  %s\n", run.sample_grid().c_str());
    if (!run.latest_checkpoint().path().empty())
      std::fprintf(options_.out, "  checkpoint   %s\n", run.latest_checkpoint().path().c_str());
    if (!run.ema_weights().empty())
      std::fprintf(options_.out, "  ema weights  %s\n", run.ema_weights().c_str());
    std::fflush(options_.out);
  }

  void Note(const std::string& text) {
    if (options_.json) return;
    ClearBar();
    std::fprintf(options_.out, "%s\n", text.c_str());
    std::fflush(options_.out);
  }

 private:
  void DrawBar(const v1::Run& run) {
    const v1::TrainMetrics& m = run.metrics();
    const int width = 30;
    const double done = run.total_steps() > 0
                            ? std::min(1.0, static_cast<double>(m.step()) / run.total_steps())
                            : 0;
    const int filled = static_cast<int>(done * width);
    std::string bar(filled, '#');
    bar += std::string(width - filled, '.');
    if (run.kind() == v1::EVALUATION) {
      std::fprintf(options_.out, "\r\033[K[%s] %3.0f%% images %lld/%lld | %.2f img/s | eta %s",
                   bar.c_str(), 100 * done, static_cast<long long>(m.step()),
                   static_cast<long long>(run.total_steps()), m.images_per_second(),
                   FormatDuration(m.eta_seconds()).c_str());
    } else {
      std::fprintf(options_.out,
                   "\r\033[K[%s] %3.0f%% step %lld/%lld | loss %.4f | %.1f img/s | eta %s",
                   bar.c_str(), 100 * done, static_cast<long long>(m.step()),
                   static_cast<long long>(run.total_steps()), m.loss(), m.images_per_second(),
                   FormatDuration(m.eta_seconds()).c_str());
    }
    bar_shown_ = true;
  }
  void ClearBar() {
    if (!bar_shown_) return;
    std::fprintf(options_.out, "\r\033[K");
    bar_shown_ = false;
  }

  const CtlOptions& options_;
  int printed_transitions_ = 0;
  int printed_results_ = 0;
  int64_t last_step_ = 0;
  bool bar_shown_ = false;
};

// How long watch keeps trying to reach a coordinator that went away (a restart).
constexpr std::chrono::seconds kReconnectFor(120);

}  // namespace

int CtlWatch(const CtlOptions& options, const std::string& run) {
  return WithClient(options, [&](Client& client) {
    WatchPrinter printer(options);
    v1::WatchRunRequest request;
    request.set_run(run);
    auto unavailable_since = Clock::time_point::max();
    auto backoff = std::chrono::milliseconds(250);
    v1::Run last;
    bool announced = false;
    while (true) {
      auto context = client.StreamContext();
      std::unique_ptr<grpc::ClientReader<v1::WatchRunEvent>> reader =
          client.control().WatchRun(context.get(), request);
      v1::WatchRunEvent event;
      while (reader->Read(&event)) {
        unavailable_since = Clock::time_point::max();
        backoff = std::chrono::milliseconds(250);
        if (announced) {
          printer.Note("ddpmctl: reconnected");
          announced = false;
        }
        last = event.run();
        printer.Event(event);
      }
      const grpc::Status status = reader->Finish();
      if (status.ok()) {
        printer.Finish(last);
        return static_cast<int>(last.state() == v1::FAILED ? kCtlFailed : kCtlOk);
      }
      if (status.error_code() != grpc::StatusCode::UNAVAILABLE) {
        return Report("WatchRun", status);
      }
      // The coordinator restarted or is unreachable: keep trying for a while.
      const auto now = Clock::now();
      if (unavailable_since == Clock::time_point::max()) unavailable_since = now;
      if (now - unavailable_since > kReconnectFor) return Report("WatchRun", status);
      if (!announced) {
        printer.Note("ddpmctl: " + DescribeStatus("WatchRun", status) + "; reconnecting");
        announced = true;
      }
      std::this_thread::sleep_for(backoff);
      backoff = std::min(backoff * 2, std::chrono::milliseconds(4000));
    }
  });
}

int CtlHealth(const CtlOptions& options, const std::string& service) {
  const std::shared_ptr<grpc::Channel> channel = MakeChannel(options.channel);
  std::string status;
  try {
    status = CheckHealth(channel, service, options.timeout_seconds);
  } catch (const RpcSetupError& error) {
    LogError("ddpmctl: %s: %s\n", options.channel.address.c_str(), error.what());
    return kCtlUnavailable;
  }
  std::printf("%s\n", status.c_str());
  return status == "SERVING" ? kCtlOk : kCtlFailed;
}

int MaxRestartsFromFlags(const Flags& flags, const std::string& command) {
  if (!flags.Given("max-restarts")) return -1;
  const auto max_restarts = static_cast<int>(flags.GetInt("max-restarts"));
  if (max_restarts < 0) {
    throw FlagError(command + ": --max-restarts must be >= 0, got " + flags.Get("max-restarts"));
  }
  return max_restarts;
}

EvalOptions EvalOptionsFromFlags(const Flags& flags) {
  EvalOptions eval;
  eval.run = flags.Get("RUN");
  eval.checkpoints = flags.Get("checkpoint");
  // A flag given, else the protocol file's value, else the training run's eval.* setting.
  std::map<std::string, std::string> values;
  if (flags.Given("protocol")) {
    for (const auto& [key, value] : LoadEvalProtocol(flags.Get("protocol"))) {
      values[key.substr(5)] = value;  // without "eval."
    }
  }
  const std::pair<const char*, const char*> settings[] = {
      {"num", "num_samples"},  {"batch", "batch_size"}, {"is-logits", "is_logits"},
      {"sampler", "sampler"},  {"steps", "steps"},      {"seed", "seed"},
      {"guidance", "guidance"}};
  for (const auto& [flag, key] : settings) {
    if (flags.Given(flag)) values[key] = flags.Get(flag);
  }
  const auto integer = [&](const char* key, const char* flag) {
    try {
      size_t used = 0;
      const long long value = std::stoll(values.at(key), &used);
      if (used != values.at(key).size()) throw std::invalid_argument(key);
      return value;
    } catch (const std::exception&) {
      throw FlagError(std::string("ddpmctl eval: --") + flag + " '" + values.at(key) +
                      "' is not an integer");
    }
  };
  // Their ranges are the config's: Config::Validate checks them once, where the coordinator
  // applies them to the run's config.
  if (values.count("num_samples") != 0) eval.num_samples = integer("num_samples", "num");
  if (values.count("batch_size") != 0) {
    eval.batch_size = static_cast<int>(integer("batch_size", "batch"));
  }
  if (values.count("steps") != 0) eval.steps = static_cast<int>(integer("steps", "steps"));
  if (values.count("seed") != 0) eval.seed = static_cast<uint64_t>(integer("seed", "seed"));
  if (values.count("guidance") != 0) {
    try {
      size_t used = 0;
      eval.guidance = std::stod(values["guidance"], &used);
      if (used != values["guidance"].size()) throw std::invalid_argument("guidance");
    } catch (const std::exception&) {
      throw FlagError("ddpmctl eval: --guidance '" + values["guidance"] + "' is not a number");
    }
  }
  eval.sampler = values["sampler"];
  eval.is_logits = values["is_logits"];
  if (flags.Given("metrics")) eval.metrics = SplitList(flags.Get("metrics"));
  eval.memorization_train = flags.Get("memorization");
  eval.reference_stats = flags.Get("ref");
  eval.inception_weights = flags.Get("inception");
  eval.name = flags.Get("name");
  eval.priority = static_cast<int>(flags.GetInt("priority"));
  eval.max_restarts = MaxRestartsFromFlags(flags, "ddpmctl eval");
  return eval;
}

}  // namespace ddpm
