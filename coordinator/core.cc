#include "coordinator/core.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <utility>

#include "base/fence.h"
#include "base/log.h"
#include "base/random.h"
#include "base/text.h"
#include "config/batch_plan.h"
#include "config/checkpoint_selection.h"
#include "config/config.h"
#include "proto/placement.h"
#include "proto/run_state.h"

namespace ddpm {
namespace {

constexpr size_t kMaxNameLength = 64;

void CheckName(const std::string& name) {
  const bool ok =
      !name.empty() && name.size() <= kMaxNameLength &&
      std::all_of(name.begin(), name.end(), [](char c) {
        return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.';
      });
  if (!ok) {
    throw CoordinatorError(ErrorCode::kInvalidArgument, "run name '" + name + "': use 1 to " +
                                                            std::to_string(kMaxNameLength) +
                                                            " letters, digits, '-', '_' or '.'");
  }
}

Config ParseRunConfig(const std::string& yaml) {
  try {
    return LoadConfigString(yaml, "StartRun config", /*apply_env=*/false);
  } catch (const ConfigError& error) {
    throw CoordinatorError(ErrorCode::kInvalidArgument, error.what());
  }
}

}  // namespace

bool IsFinal(v1::RunState state) {
  return state == v1::STOPPED || state == v1::COMPLETED || state == v1::FAILED;
}

Coordinator::Coordinator(CoordinatorOptions options, const Clock& clock)
    : options_(std::move(options)), clock_(clock) {
  namespace fs = std::filesystem;
  std::error_code error;
  fs::create_directories(options_.data_dir, error);
  if (error) {
    throw RegistryError("data directory " + options_.data_dir + ": " + error.message());
  }
  runs_dir_ = fs::absolute(options_.runs_dir.empty() ? fs::path(options_.data_dir) / "runs"
                                                     : fs::path(options_.runs_dir))
                  .lexically_normal()
                  .string();
  // One coordinator per data directory: a second one would schedule the same runs.
  lock_ = std::make_unique<DataDirLock>(options_.data_dir);
  registry_ = std::make_unique<Registry>((fs::path(options_.data_dir) / "registry.db").string());
  for (auto& [seq, run] : registry_->LoadRuns()) {
    RunEntry& entry = runs_[run.id()];
    entry.seq = seq;
    entry.run = std::move(run);
    if (IsFinal(entry.run.state())) continue;
    try {
      entry.config = ParseRunConfig(entry.run.config_yaml());
    } catch (const CoordinatorError& error) {
      // A config this build no longer reads (a key removed since) cannot be scheduled.
      Transition(entry, v1::FAILED,
                 std::string("its stored config no longer loads: ") + error.what());
    }
  }
  started_ms_ = clock_.NowUnixMs();
  PruneEnded();
}

Coordinator::~Coordinator() { Shutdown(); }

namespace {

// When a run ended: its last transition (to its final state).
int64_t EndedAt(const v1::Run& run) {
  return run.transitions().empty() ? run.updated_unix_ms()
                                   : run.transitions(run.transitions_size() - 1).at_unix_ms();
}

}  // namespace

void ParseRetainEnded(const std::string& value, CoordinatorOptions& options) {
  const auto refuse = [&] {
    throw std::invalid_argument("--retain-ended '" + value +
                                "': give a count of runs (500) or an age (30d, 12h, 90m, 45s)");
  };
  if (value.empty()) refuse();
  size_t used = 0;
  double number = 0;
  try {
    number = std::stod(value, &used);
  } catch (const std::exception&) {
    refuse();
  }
  if (!(number > 0) || !std::isfinite(number)) refuse();
  const std::string unit = value.substr(used);
  if (unit.empty()) {
    if (number != std::floor(number)) refuse();
    options.retain_ended_count = static_cast<int64_t>(number);
    return;
  }
  const std::map<std::string, double> seconds = {{"s", 1}, {"m", 60}, {"h", 3600}, {"d", 86400}};
  const auto it = seconds.find(unit);
  if (it == seconds.end()) refuse();
  options.retain_ended_seconds = number * it->second;
}

RegistryFileSummary RestoreRegistry(const std::string& data_dir, const std::string& backup) {
  namespace fs = std::filesystem;
  std::error_code error;
  fs::create_directories(data_dir, error);
  if (error) throw RegistryError("data directory " + data_dir + ": " + error.message());
  const DataDirLock lock(data_dir);
  const RegistryFileSummary summary = InspectRegistryFile(backup);
  const fs::path registry = fs::path(data_dir) / "registry.db";
  const fs::path incoming = fs::path(data_dir) / "registry.db.restoring";
  fs::copy_file(backup, incoming, fs::copy_options::overwrite_existing, error);
  if (error) {
    throw RegistryError("cannot copy " + backup + " to " + incoming.string() + ": " +
                        error.message());
  }
  // Checked again where it landed, before anything is moved.
  InspectRegistryFile(incoming.string());
  if (fs::exists(registry)) {
    // The current registry (with its write-ahead log) stays beside, under another name: the old
    // log must not be replayed into the restored file.
    const std::string kept = registry.string() + ".replaced-" +
                             std::to_string(std::chrono::duration_cast<std::chrono::seconds>(
                                                std::chrono::system_clock::now().time_since_epoch())
                                                .count());
    for (const char* suffix : {"-wal", "-shm"}) {
      const fs::path side = registry.string() + suffix;
      if (fs::exists(side)) fs::rename(side, kept + suffix);
    }
    fs::rename(registry, kept);
    LogInfo("ddpm_coordinator: the registry it replaces is kept as %s\n", kept.c_str());
  }
  fs::rename(incoming, registry);
  return summary;
}

void Coordinator::Forget(const std::vector<std::string>& ids, const std::string& why) {
  if (ids.empty()) return;
  registry_->Transaction([&] {
    for (const std::string& id : ids) registry_->DeleteRun(id);
  });
  for (const std::string& id : ids) runs_.erase(id);
  LogInfo(
      "ddpm_coordinator: forgot %zu ended runs (%s, first %s); their run directories "
      "stay\n",
      ids.size(), why.c_str(), ids.front().c_str());
  Changed();
}

void Coordinator::PruneEnded() {
  pruned_ms_ = clock_.NowUnixMs();
  if (options_.retain_ended_count <= 0 && options_.retain_ended_seconds <= 0) return;
  std::vector<std::pair<int64_t, std::string>> ended;  // (ended at, id)
  for (const auto& [id, entry] : runs_) {
    if (IsFinal(entry.run.state())) ended.emplace_back(EndedAt(entry.run), id);
  }
  std::sort(ended.begin(), ended.end());
  std::vector<std::string> forget;
  const int64_t cutoff = pruned_ms_ - static_cast<int64_t>(options_.retain_ended_seconds * 1000);
  const size_t over = options_.retain_ended_count > 0 &&
                              ended.size() > static_cast<size_t>(options_.retain_ended_count)
                          ? ended.size() - static_cast<size_t>(options_.retain_ended_count)
                          : 0;
  for (size_t i = 0; i < ended.size(); ++i) {
    if (i < over || (options_.retain_ended_seconds > 0 && ended[i].first < cutoff)) {
      forget.push_back(ended[i].second);
    }
  }
  Forget(forget, "--retain-ended");
}

std::vector<std::string> Coordinator::DeleteRunsEndedBefore(int64_t ended_before_unix_ms) {
  if (ended_before_unix_ms <= 0) {
    throw CoordinatorError(ErrorCode::kInvalidArgument,
                           "DeleteRuns: ended_before_unix_ms is not set; give the moment before "
                           "which ended runs are forgotten");
  }
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<std::pair<int64_t, std::string>> ended;
  for (const auto& [id, entry] : runs_) {
    if (!IsFinal(entry.run.state())) continue;
    const int64_t at = EndedAt(entry.run);
    if (at < ended_before_unix_ms) ended.emplace_back(at, id);
  }
  std::sort(ended.begin(), ended.end());
  std::vector<std::string> ids;
  ids.reserve(ended.size());
  for (auto& [at, id] : ended) ids.push_back(std::move(id));
  Forget(ids, "ended before " + FormatUtc(ended_before_unix_ms));
  return ids;
}

int64_t Coordinator::BackupRegistry(const std::string& path) {
  std::lock_guard<std::mutex> lock(mutex_);
  registry_->BackupTo(path);
  return static_cast<int64_t>(runs_.size());
}

Coordinator::RunEntry& Coordinator::Find(const std::string& run) {
  return const_cast<RunEntry&>(static_cast<const Coordinator*>(this)->Find(run));
}

const Coordinator::RunEntry& Coordinator::Find(const std::string& run) const {
  if (run.empty()) {
    throw CoordinatorError(ErrorCode::kInvalidArgument, "run: empty; give a run id or name");
  }
  if (const auto it = runs_.find(run); it != runs_.end()) return it->second;
  std::vector<const RunEntry*> named;
  for (const auto& [id, entry] : runs_) {
    if (entry.run.name() == run) named.push_back(&entry);
  }
  if (named.size() == 1) return *named.front();
  if (named.empty()) throw CoordinatorError(ErrorCode::kNotFound, "no run '" + run + "'");
  std::string ids;
  for (const RunEntry* entry : named) ids += (ids.empty() ? "" : ", ") + entry->run.id();
  throw CoordinatorError(ErrorCode::kInvalidArgument,
                         "the name '" + run + "' fits runs " + ids + ": give an id");
}

Coordinator::Group& Coordinator::FindGroup(const std::string& group_id) {
  if (group_id.empty()) {
    throw CoordinatorError(ErrorCode::kInvalidArgument, "group_id: empty; give the group's id");
  }
  const auto it = groups_.find(group_id);
  if (it == groups_.end()) {
    throw CoordinatorError(ErrorCode::kNotFound,
                           "group '" + group_id + "' is not registered; register it again");
  }
  return it->second;
}

Coordinator::Group& Coordinator::GroupHolding(const std::string& group_id,
                                              const std::string& run_id, int attempt) {
  Group& group = FindGroup(group_id);
  if (run_id.empty() || group.run_id != run_id) {
    throw CoordinatorError(ErrorCode::kFailedPrecondition,
                           "group '" + group_id + "' does not hold run '" + run_id +
                               "' (it holds " +
                               (group.run_id.empty() ? "no run" : "'" + group.run_id + "'") + ")");
  }
  const int current = runs_.at(run_id).run.placement().attempt();
  if (attempt > 0 && attempt != current) {
    throw CoordinatorError(ErrorCode::kFailedPrecondition,
                           "a report of attempt " + std::to_string(attempt) + " of run " + run_id +
                               ", which is on attempt " + std::to_string(current));
  }
  return group;
}

void Coordinator::Save(const RunEntry& entry) { registry_->UpdateRun(entry.run); }

void Coordinator::Transition(RunEntry& entry, v1::RunState to, const std::string& reason) {
  v1::Transition transition;
  transition.set_from(entry.run.state());
  transition.set_to(to);
  transition.set_at_unix_ms(clock_.NowUnixMs());
  transition.set_reason(reason);
  v1::Run next = entry.run;
  next.set_state(to);
  next.set_reason(reason);
  next.set_updated_unix_ms(transition.at_unix_ms());
  registry_->Transaction([&] {
    registry_->UpdateRun(next);
    registry_->AddTransition(next.id(), transition);
  });
  *next.add_transitions() = transition;
  entry.run = std::move(next);
  LogInfo("ddpm_coordinator: run %s: %s -> %s: %s\n", entry.run.id().c_str(),
          StateName(transition.from()).c_str(), StateName(to).c_str(), reason.c_str());
  Changed();
}

void Coordinator::FailRun(RunEntry& entry, const std::string& reason, bool may_restart) {
  Transition(entry, v1::FAILED, reason);
  v1::Run& run = entry.run;
  if (!may_restart || run.restarts() >= run.max_restarts()) return;
  run.set_restarts(run.restarts() + 1);
  const int64_t resume = run.latest_checkpoint().step();
  std::string plan;
  if (run.kind() == v1::EVALUATION) {
    plan = "will go on from the results and samples already saved";
  } else if (resume > 0) {
    plan = "will resume from the checkpoint of step " + std::to_string(resume);
  } else {
    plan = "starts over: no checkpoint had committed";
  }
  Transition(entry, v1::QUEUED,
             "restart " + std::to_string(run.restarts()) + " of " +
                 std::to_string(run.max_restarts()) + ": " + plan);
}

void Coordinator::SetCommand(Group& group, v1::GroupCommand command) {
  group.command = std::move(command);
  ++group.version;
  group.command_changed->notify_all();
  Changed();
}

v1::GroupCommand Coordinator::CommandFor(const v1::Run& run) const {
  v1::GroupCommand command;
  if (run.kind() == v1::EVALUATION) {
    command.set_kind(v1::GroupCommand::EVALUATE);
    *command.mutable_evaluation() = run.evaluation();
    command.mutable_evaluation()->clear_results();
  } else {
    command.set_kind(v1::GroupCommand::TRAIN);
  }
  command.set_run_id(run.id());
  command.set_config_yaml(run.config_yaml());
  command.set_run_dir(run.run_dir());
  *command.mutable_placement() = run.placement();
  return command;
}

void Coordinator::LoseGroup(const std::string& group_id, const std::string& reason) {
  const auto it = groups_.find(group_id);
  if (it == groups_.end()) return;
  const std::string run_id = it->second.run_id;
  it->second.command_changed->notify_all();  // Its streams end (NOT_FOUND).
  groups_.erase(it);
  LogInfo("ddpm_coordinator: group %s is gone: %s\n", group_id.c_str(), reason.c_str());
  Changed();
  if (run_id.empty()) return;
  const auto run = runs_.find(run_id);
  if (run == runs_.end() || IsFinal(run->second.run.state())) return;
  // A run that was stopping is not restarted: its user asked it to stop.
  FailRun(run->second, reason, run->second.run.state() != v1::STOPPING);
}

void Coordinator::FenceRunDir(const v1::Run& run) const {
  // The new attempt's fencing token, in the run directory before its group starts: a group of
  // an older attempt that is still alive reads it there and publishes nothing more. Where this
  // process cannot reach the directory, the group's rank 0 records its attempt itself.
  try {
    std::filesystem::create_directories(run.run_dir());
    RunFence(run.run_dir()).Grant(run.placement().attempt());
  } catch (const std::exception& error) {
    LogWarning("ddpm_coordinator: warning: run %s: cannot record attempt %d in %s: %s\n",
               run.id().c_str(), run.placement().attempt(), run.run_dir().c_str(), error.what());
  }
}

void Coordinator::Schedule() {
  // Idle groups first: with none, the queue (thousands of runs, on every StartRun and tick)
  // need not be sorted.
  std::vector<Group*> idle;
  for (auto& [id, group] : groups_) {
    if (group.run_id.empty()) idle.push_back(&group);
  }
  if (idle.empty()) return;
  std::vector<RunEntry*> queued;
  for (auto& [id, entry] : runs_) {
    if (entry.run.state() == v1::QUEUED) queued.push_back(&entry);
  }
  std::sort(queued.begin(), queued.end(), [](const RunEntry* a, const RunEntry* b) {
    if (a->run.priority() != b->run.priority()) return a->run.priority() > b->run.priority();
    return a->seq < b->seq;
  });
  std::sort(idle.begin(), idle.end(),
            [](const Group* a, const Group* b) { return a->registered_seq < b->registered_seq; });
  // In priority, then submission order, each run takes the first idle group it fits; a run that
  // fits none waits without holding back the runs behind it.
  for (RunEntry* entry : queued) {
    if (idle.empty()) return;
    const Config& config = entry->config;
    for (auto group = idle.begin(); group != idle.end(); ++group) {
      v1::Run& run = entry->run;
      v1::Placement& placement = *run.mutable_placement();
      std::string how;
      if (run.kind() == v1::EVALUATION) {
        // Any group serves an evaluation: its ranks share each checkpoint's samples.
        placement.set_micro_batch(config.eval.batch_size);
        placement.set_micro_batches(1);
        placement.set_requested_micro_batches(0);
        how = std::to_string((*group)->world_size) + " rank(s) share " +
              std::to_string(config.eval.num_samples) + " samples per checkpoint" +
              (run.restarts() > 0 ? "; goes on from the samples and results saved" : "");
      } else {
        BatchPlan plan;
        try {
          plan = PlanBatch(config, (*group)->world_size);
        } catch (const ConfigError&) {
          continue;
        }
        SetPlacementPlan(plan, placement);
        placement.set_requested_micro_batches(config.train.grad_accum);
        const int64_t resume = run.latest_checkpoint().step();
        how = plan.Describe() + (resume > 0 ? "; resumes from step " + std::to_string(resume) : "");
      }
      placement.set_group_id((*group)->id);
      placement.set_world_size((*group)->world_size);
      placement.set_attempt(run.restarts() + 1);
      run.clear_ranks();
      Transition(*entry, v1::STARTING, "assigned to group " + (*group)->id + ": " + how);
      (*group)->run_id = run.id();
      FenceRunDir(run);
      SetCommand(**group, CommandFor(run));
      idle.erase(group);
      break;
    }
  }
}

v1::Run Coordinator::StartRun(const v1::StartRunRequest& request) {
  const std::string name = request.name().empty() ? "run" : request.name();
  CheckName(name);
  if (ConfigYamlSetsNothing(request.config_yaml())) {
    // Every default is the paper's run: 800,000 steps of the 35.7M-parameter UNet.
    throw CoordinatorError(ErrorCode::kInvalidArgument,
                           "config_yaml: the config sets nothing (empty, or only comments); "
                           "every default would train the paper's UNet for 800000 steps, so "
                           "give at least the keys you mean");
  }
  if (request.priority() < 0) {
    throw CoordinatorError(ErrorCode::kInvalidArgument,
                           "priority must be >= 0 (higher runs are scheduled first), got " +
                               std::to_string(request.priority()));
  }
  // Loading validates the config, its batch split over dist.world_size (or one rank) included.
  const Config config = ParseRunConfig(request.config_yaml());
  if (request.has_max_restarts() && request.max_restarts() < 0) {
    throw CoordinatorError(ErrorCode::kInvalidArgument, "max_restarts must be >= 0, got " +
                                                            std::to_string(request.max_restarts()));
  }

  v1::Run run;
  run.set_name(name);
  run.set_config_yaml(config.ToYaml());
  run.set_priority(request.priority());
  run.set_max_restarts(request.has_max_restarts() ? request.max_restarts()
                                                  : options_.default_max_restarts);
  run.set_total_steps(config.train.steps);
  std::lock_guard<std::mutex> lock(mutex_);
  const v1::Run& queued = Insert(std::move(run), config);
  LogInfo("ddpm_coordinator: run %s: queued (%lld steps, global batch %d)\n", queued.id().c_str(),
          static_cast<long long>(config.train.steps), config.train.batch_size);
  const std::string id = queued.id();
  Schedule();
  return runs_.at(id).run;
}

const v1::Run& Coordinator::Insert(v1::Run run, Config config) {
  const int64_t now = clock_.NowUnixMs();
  run.set_state(v1::QUEUED);
  run.set_reason("submitted");
  run.set_created_unix_ms(now);
  run.set_updated_unix_ms(now);
  v1::Transition transition;
  transition.set_from(v1::RUN_STATE_UNSPECIFIED);
  transition.set_to(v1::QUEUED);
  transition.set_at_unix_ms(now);
  transition.set_reason("submitted");
  int64_t seq = 0;
  registry_->Transaction([&] {
    seq = registry_->NextRunNumber();
    run.set_id(run.name() + "-" + std::to_string(seq));
    run.set_run_dir((std::filesystem::path(runs_dir_) / run.id()).string());
    registry_->InsertRun(run, seq);
    registry_->AddTransition(run.id(), transition);
  });
  *run.add_transitions() = transition;
  RunEntry& entry = runs_[run.id()];
  entry.seq = seq;
  entry.run = std::move(run);
  entry.config = std::move(config);
  Changed();
  return entry.run;
}

v1::Run Coordinator::StartEval(const v1::StartEvalRequest& request) {
  const auto invalid = [](const std::string& message) {
    return CoordinatorError(ErrorCode::kInvalidArgument, "StartEval: " + message);
  };
  std::string checkpoints;
  try {
    checkpoints = CheckpointSelection::Parse(request.checkpoints()).ToString();
  } catch (const ConfigError& error) {
    throw invalid(error.what());
  }
  if (request.priority() < 0) {
    throw invalid("priority must be >= 0, got " + std::to_string(request.priority()));
  }
  if (request.has_max_restarts() && request.max_restarts() < 0) {
    throw invalid("max_restarts must be >= 0, got " + std::to_string(request.max_restarts()));
  }
  std::lock_guard<std::mutex> lock(mutex_);
  const RunEntry& source = Find(request.run());
  const v1::Run& trained = source.run;
  if (trained.kind() == v1::EVALUATION) {
    throw invalid("run " + trained.id() + " is an evaluation job; give the training run (" +
                  trained.evaluation().source_run() + ")");
  }
  if (trained.latest_checkpoint().step() <= 0) {
    throw CoordinatorError(
        ErrorCode::kFailedPrecondition,
        "StartEval: run " + trained.id() + " has no committed checkpoint to evaluate yet");
  }
  // The steps asked for must have committed (the group picks among those still on disk).
  {
    std::vector<int64_t> committed;
    for (const v1::CheckpointInfo& info : registry_->Checkpoints(trained.id())) {
      committed.push_back(info.step());
    }
    try {
      CheckpointSelection::Parse(checkpoints).Select(committed, "run " + trained.id());
    } catch (const ConfigError& error) {
      throw CoordinatorError(ErrorCode::kNotFound, std::string("StartEval: ") + error.what());
    }
  }
  // The training run's config with the job's protocol, checked as a config file is.
  Config config = ParseRunConfig(trained.config_yaml());
  std::vector<std::pair<std::string, std::string>> overrides;
  if (request.has_num_samples()) {
    overrides.emplace_back("eval.num_samples", std::to_string(request.num_samples()));
  }
  if (!request.sampler().empty()) overrides.emplace_back("eval.sampler", request.sampler());
  if (request.has_steps()) overrides.emplace_back("eval.steps", std::to_string(request.steps()));
  if (request.has_seed()) overrides.emplace_back("eval.seed", std::to_string(request.seed()));
  if (!request.is_logits().empty()) overrides.emplace_back("eval.is_logits", request.is_logits());
  if (request.metrics_size() > 0) {
    std::string list;
    for (const std::string& metric : request.metrics()) list += (list.empty() ? "" : ", ") + metric;
    overrides.emplace_back("eval.metrics", "[" + list + "]");
  }
  if (request.has_batch_size()) {
    overrides.emplace_back("eval.batch_size", std::to_string(request.batch_size()));
  }
  if (request.has_guidance()) {
    char text[40];
    std::snprintf(text, sizeof(text), "%.17g", request.guidance());
    overrides.emplace_back("eval.guidance", text);
  }
  if (!request.reference_stats().empty()) {
    overrides.emplace_back("eval.reference_stats", request.reference_stats());
  }
  if (!request.inception_weights().empty()) {
    overrides.emplace_back("eval.inception_weights", request.inception_weights());
  }
  // The memorization report's training set: "run" is the training run's own.
  std::string memorization_train = request.memorization_train();
  if (memorization_train == "run") {
    memorization_train = "run:" + trained.run_dir();
  } else if (!memorization_train.empty()) {
    const std::size_t colon = memorization_train.find(':');
    const std::string kind = memorization_train.substr(0, colon);
    if (colon == std::string::npos || colon + 1 == memorization_train.size() ||
        (kind != "cifar10" && kind != "folder" && kind != "npz" && kind != "run")) {
      throw invalid("memorization_train (ddpmctl eval --memorization) '" + memorization_train +
                    "' is not cifar10:PATH, folder:PATH, npz:PATH, run:RUN_DIR or run");
    }
  }
  try {
    for (const auto& [key, value] : overrides) SetConfigKey(config, key, value, "StartEval");
    config.Validate();
  } catch (const ConfigError& error) {
    throw invalid(error.what());
  }
  const std::pair<const char*, const std::string*> files[] = {
      {"eval.reference_stats (ddpmctl eval --ref)", &config.eval.reference_stats},
      {"eval.inception_weights (ddpmctl eval --inception)", &config.eval.inception_weights}};
  for (const auto& [key, value] : files) {
    if (value->empty()) {
      throw invalid(std::string(key) + ": empty: run " + trained.id() +
                    "'s config names none, so give one that every group can read");
    }
  }
  const std::string name = request.name().empty() ? trained.name() + "-eval" : request.name();
  CheckName(name);
  v1::Run run;
  run.set_name(name);
  run.set_kind(v1::EVALUATION);
  run.mutable_evaluation()->set_source_run(trained.id());
  run.mutable_evaluation()->set_source_run_dir(trained.run_dir());
  run.mutable_evaluation()->set_checkpoints(checkpoints);
  run.mutable_evaluation()->set_memorization_train(memorization_train);
  run.set_config_yaml(config.ToYaml());
  run.set_priority(request.priority());
  run.set_max_restarts(request.has_max_restarts() ? request.max_restarts()
                                                  : options_.default_max_restarts);
  const v1::Run& queued = Insert(std::move(run), config);
  LogInfo(
      "ddpm_coordinator: run %s: queued: evaluates checkpoints %s of run %s (%lld samples "
      "each, %s)\n",
      queued.id().c_str(), checkpoints.c_str(), trained.id().c_str(),
      static_cast<long long>(config.eval.num_samples), Name(config.eval.sampler));
  const std::string id = queued.id();
  Schedule();
  return runs_.at(id).run;
}

v1::Run Coordinator::StopRun(const std::string& run_name, bool immediate) {
  std::lock_guard<std::mutex> lock(mutex_);
  RunEntry& entry = Find(run_name);
  const v1::RunState state = entry.run.state();
  if (IsFinal(state)) {
    throw CoordinatorError(
        ErrorCode::kFailedPrecondition,
        "run " + entry.run.id() + " has already ended (" + StateName(state) + ")");
  }
  if (state == v1::QUEUED) {
    Transition(entry, v1::STOPPED, "stopped before it was scheduled");
    return entry.run;
  }
  if (state == v1::STOPPING && !immediate) return entry.run;
  const auto group = groups_.find(entry.run.placement().group_id());
  v1::GroupCommand command;
  command.set_kind(immediate ? v1::GroupCommand::STOP_NOW : v1::GroupCommand::STOP);
  command.set_run_id(entry.run.id());
  if (immediate) {
    Transition(entry, v1::STOPPED, "stopped at once by StopRun, without a checkpoint");
  } else {
    Transition(entry, v1::STOPPING, "StopRun: checkpointing, then stopping");
  }
  if (group != groups_.end() && group->second.run_id == entry.run.id()) {
    SetCommand(group->second, command);
  }
  return entry.run;
}

v1::Run Coordinator::GetRun(const std::string& run) const {
  std::lock_guard<std::mutex> lock(mutex_);
  return Find(run).run;
}

std::vector<v1::Run> Coordinator::ListRuns(v1::RunState state) const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<const RunEntry*> entries;
  for (const auto& [id, entry] : runs_) {
    if (state == v1::RUN_STATE_UNSPECIFIED || entry.run.state() == state) entries.push_back(&entry);
  }
  std::sort(entries.begin(), entries.end(),
            [](const RunEntry* a, const RunEntry* b) { return a->seq < b->seq; });
  std::vector<v1::Run> runs;
  for (const RunEntry* entry : entries) {
    runs.push_back(entry->run);
    runs.back().clear_transitions();
  }
  return runs;
}

namespace {

// The query a page token belongs to: its filter, hashed (FNV-1a 64) so that a token of another
// query is told apart.
uint64_t QueryHash(const v1::ListRunsRequest& request) {
  const std::string query = std::to_string(request.state()) + "\n" + request.name_prefix();
  uint64_t hash = 1469598103934665603ULL;
  for (const unsigned char c : query) hash = (hash ^ c) * 1099511628211ULL;
  return hash;
}

// "r1.<query hash hex>.<last seq>": opaque to clients, checked here.
std::string PageToken(const v1::ListRunsRequest& request, int64_t last_seq) {
  char token[64];
  std::snprintf(token, sizeof(token), "r1.%016llx.%lld",
                static_cast<unsigned long long>(QueryHash(request)),
                static_cast<long long>(last_seq));
  return token;
}

// The last submission position the token's page listed.
int64_t AfterToken(const v1::ListRunsRequest& request) {
  const std::string& token = request.page_token();
  if (token.empty()) return 0;
  unsigned long long hash = 0;
  long long last = 0;
  char tail = 0;
  if (token.size() > 48 ||
      std::sscanf(token.c_str(), "r1.%16llx.%lld%c", &hash, &last, &tail) != 2 || last < 0) {
    throw CoordinatorError(
        ErrorCode::kInvalidArgument,
        "page_token '" + token + "' is not a token this coordinator gave; list again without it");
  }
  if (hash != QueryHash(request)) {
    throw CoordinatorError(ErrorCode::kInvalidArgument,
                           "page_token '" + token +
                               "' was given for another query (state or name_prefix); list "
                               "again without it, or with that query's filters");
  }
  return last;
}

}  // namespace

v1::ListRunsResponse Coordinator::ListRunsPage(const v1::ListRunsRequest& request) const {
  if (request.page_size() < 0) {
    throw CoordinatorError(ErrorCode::kInvalidArgument, "page_size must be >= 0 (0: the default, " +
                                                            std::to_string(kDefaultPageSize) +
                                                            "), got " +
                                                            std::to_string(request.page_size()));
  }
  const int64_t after = AfterToken(request);
  v1::ListRunsResponse response;
  int size = request.page_size() == 0 ? kDefaultPageSize : request.page_size();
  if (size > kMaxPageSize) {
    response.set_notice("page_size " + std::to_string(size) + " is over the maximum; clamped to " +
                        std::to_string(kMaxPageSize));
    size = kMaxPageSize;
  }
  response.set_page_size(size);
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<const RunEntry*> entries;
  for (const auto& [id, entry] : runs_) {
    if (entry.seq <= after) continue;
    if (request.state() != v1::RUN_STATE_UNSPECIFIED && entry.run.state() != request.state()) {
      continue;
    }
    if (entry.run.name().compare(0, request.name_prefix().size(), request.name_prefix()) != 0) {
      continue;
    }
    entries.push_back(&entry);
  }
  const auto end =
      entries.size() > static_cast<size_t>(size) ? entries.begin() + size : entries.end();
  std::partial_sort(entries.begin(), end, entries.end(),
                    [](const RunEntry* a, const RunEntry* b) { return a->seq < b->seq; });
  for (auto it = entries.begin(); it != end; ++it) {
    v1::Run& run = *response.add_runs();
    run = (*it)->run;
    run.clear_transitions();
  }
  if (end != entries.end()) response.set_next_page_token(PageToken(request, (*(end - 1))->seq));
  return response;
}

void Coordinator::DeleteRun(const std::string& run) {
  std::lock_guard<std::mutex> lock(mutex_);
  RunEntry& entry = Find(run);
  if (!IsFinal(entry.run.state())) {
    throw CoordinatorError(ErrorCode::kFailedPrecondition, "run " + entry.run.id() + " is " +
                                                               StateName(entry.run.state()) +
                                                               "; stop it before deleting it");
  }
  const std::string id = entry.run.id();
  registry_->Transaction([&] { registry_->DeleteRun(id); });
  runs_.erase(id);
  Changed();
}

v1::MetricHistory Coordinator::MetricHistory(const std::string& run, int64_t since_step,
                                             int max_points) const {
  if (max_points < 2) {
    throw CoordinatorError(ErrorCode::kInvalidArgument,
                           "max_points must be >= 2, got " + std::to_string(max_points));
  }
  std::vector<v1::TrainMetrics> rows;
  v1::MetricHistory history;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    history.set_run(Find(run).run.id());
    rows = registry_->MetricRows(history.run(), since_step);
  }
  history.set_rows(static_cast<int64_t>(rows.size()));
  history.set_since_step(since_step);
  history.set_max_points(max_points);
  history.set_downsampled(rows.size() > static_cast<size_t>(max_points));
  for (size_t index : ThinKeepingExtremes(rows, static_cast<size_t>(max_points))) {
    *history.add_points() = std::move(rows[index]);
  }
  return history;
}

std::vector<v1::CheckpointInfo> Coordinator::Checkpoints(const std::string& run) const {
  std::lock_guard<std::mutex> lock(mutex_);
  return registry_->Checkpoints(Find(run).run.id());
}

std::vector<v1::EvalResult> Coordinator::Evals(const std::string& run) const {
  std::lock_guard<std::mutex> lock(mutex_);
  return registry_->Evals(Find(run).run.id());
}

uint64_t Coordinator::WaitForChange(uint64_t seen,
                                    std::chrono::steady_clock::time_point deadline) const {
  std::unique_lock<std::mutex> lock(mutex_);
  changed_.wait_until(lock, deadline, [&] { return change_ != seen || shutdown_; });
  return change_;
}

void Coordinator::Changed() {
  ++change_;
  changed_.notify_all();
}

std::vector<size_t> ThinKeepingExtremes(const std::vector<v1::TrainMetrics>& rows,
                                        size_t max_points) {
  std::vector<size_t> kept;
  if (rows.size() <= max_points) {
    for (size_t i = 0; i < rows.size(); ++i) kept.push_back(i);
    return kept;
  }
  // The first and last rows, then per bucket of the rows between them the lowest and the
  // highest loss, in step order: at most 2 + 2 * buckets <= max_points.
  const size_t buckets = (max_points - 2) / 2;
  const size_t inner = rows.size() - 2;
  kept.push_back(0);
  for (size_t bucket = 0; bucket < buckets; ++bucket) {
    const size_t begin = 1 + bucket * inner / buckets;
    const size_t end = 1 + (bucket + 1) * inner / buckets;
    if (begin >= end) continue;
    size_t lowest = begin, highest = begin;
    for (size_t i = begin; i < end; ++i) {
      if (rows[i].loss() < rows[lowest].loss()) lowest = i;
      if (rows[i].loss() > rows[highest].loss()) highest = i;
    }
    kept.push_back(std::min(lowest, highest));
    if (highest != lowest) kept.push_back(std::max(lowest, highest));
  }
  kept.push_back(rows.size() - 1);
  return kept;
}

std::vector<v1::WatchRunEvent> Coordinator::WaitForRunEvents(
    const std::string& run_id, WatchCursor& cursor, std::chrono::steady_clock::time_point deadline,
    bool& done) {
  std::unique_lock<std::mutex> lock(mutex_);
  done = false;
  while (true) {
    const auto it = runs_.find(run_id);
    if (it == runs_.end()) {
      if (!cursor.started) throw CoordinatorError(ErrorCode::kNotFound, "no run '" + run_id + "'");
      done = true;  // Deleted while watched.
      return {};
    }
    const RunEntry& entry = it->second;
    std::vector<v1::WatchRunEvent> events;
    if (!cursor.started) {
      cursor.started = true;
      events.emplace_back().mutable_run()->CopyFrom(entry.run);
      cursor.transitions = entry.run.transitions_size();
      cursor.metrics_version = entry.metrics_version;
    }
    for (; cursor.transitions < static_cast<size_t>(entry.run.transitions_size());
         ++cursor.transitions) {
      v1::WatchRunEvent& event = events.emplace_back();
      *event.mutable_run() = entry.run;
      *event.mutable_transition() = entry.run.transitions(static_cast<int>(cursor.transitions));
    }
    if (cursor.metrics_version != entry.metrics_version) {
      cursor.metrics_version = entry.metrics_version;
      v1::WatchRunEvent& event = events.emplace_back();
      *event.mutable_run() = entry.run;
      event.set_metrics(true);
    }
    done = IsFinal(entry.run.state());
    if (!events.empty() || done) return events;
    if (shutdown_) {
      throw CoordinatorError(ErrorCode::kUnavailable, "the coordinator is shutting down");
    }
    if (changed_.wait_until(lock, deadline) == std::cv_status::timeout) return {};
  }
}

v1::RegisterResponse Coordinator::Register(const v1::RegisterRequest& request) {
  if (request.group_id().empty()) {
    throw CoordinatorError(ErrorCode::kInvalidArgument, "Register: group_id is empty");
  }
  // Bounded: the core keeps a heartbeat slot per rank (a garbled size once asked for 11 GB).
  constexpr int kMaxWorldSize = 1 << 16;
  if (request.world_size() < 1 || request.world_size() > kMaxWorldSize) {
    throw CoordinatorError(ErrorCode::kInvalidArgument,
                           "Register: group '" + request.group_id() +
                               "': world_size must be in [1, " + std::to_string(kMaxWorldSize) +
                               "], got " + std::to_string(request.world_size()));
  }
  for (const auto* list : {&request.hostnames(), &request.devices()}) {
    if (!list->empty() && list->size() != request.world_size()) {
      throw CoordinatorError(ErrorCode::kInvalidArgument,
                             "Register: group '" + request.group_id() + "' names " +
                                 std::to_string(list->size()) + " hosts or devices for " +
                                 std::to_string(request.world_size()) + " ranks");
    }
  }
  std::lock_guard<std::mutex> lock(mutex_);
  const int64_t now = clock_.NowUnixMs();
  if (const auto it = groups_.find(request.group_id());
      it != groups_.end() && it->second.open_streams == 0 && it->second.stream_closed_ms != 0) {
    // Back within the stream grace (a new process, or a connection that lost its session):
    // the registration below takes the group's place and says whether it still trains its run.
    LogInfo("ddpm_coordinator: group %s registers again %s after its command stream closed\n",
            it->first.c_str(), FormatSeconds((now - it->second.stream_closed_ms) / 1000.0).c_str());
    it->second.command_changed->notify_all();
    groups_.erase(it);
  }
  if (const auto it = groups_.find(request.group_id()); it != groups_.end()) {
    int64_t last = 0;
    for (int64_t at : it->second.last_heartbeat_ms) last = std::max(last, at);
    throw CoordinatorError(ErrorCode::kAlreadyExists,
                           "group '" + request.group_id() + "' is already registered (" +
                               std::to_string(it->second.world_size) + " ranks, last heartbeat " +
                               FormatSeconds((now - last) / 1000.0) +
                               " ago); group ids must be unique among live groups");
  }
  Group& group = groups_[request.group_id()];
  group.id = request.group_id();
  group.session = RandomHex(16);
  group.world_size = request.world_size();
  group.hostnames.assign(request.hostnames().begin(), request.hostnames().end());
  group.devices.assign(request.devices().begin(), request.devices().end());
  group.last_heartbeat_ms.assign(group.world_size, now);
  group.device_memory_bytes.assign(group.world_size, 0);
  group.registered_seq = ++next_group_seq_;
  v1::GroupCommand command;
  command.set_kind(v1::GroupCommand::IDLE);
  std::string note;
  if (!request.current_run().empty()) {
    const auto run = runs_.find(request.current_run());
    const bool holds = run != runs_.end() && !IsFinal(run->second.run.state()) &&
                       run->second.run.state() != v1::QUEUED &&
                       run->second.run.placement().group_id() == group.id;
    if (holds) {
      group.run_id = run->first;
      if (run->second.run.state() == v1::STOPPING) {
        command.set_kind(v1::GroupCommand::STOP);
        command.set_run_id(run->first);
      } else {
        command = CommandFor(run->second.run);
      }
      note = "; it carries on with run " + run->first + " at step " +
             std::to_string(request.current_step());
    } else {
      note = "; it must drop run " + request.current_run() + ", which it no longer holds";
    }
  }
  SetCommand(group, command);
  // Runs this group held before a coordinator restart and no longer trains are lost.
  for (auto& [id, entry] : runs_) {
    const v1::RunState state = entry.run.state();
    if (id == group.run_id || IsFinal(state) || state == v1::QUEUED ||
        entry.run.placement().group_id() != group.id) {
      continue;
    }
    FailRun(entry, "group " + group.id + " came back without it", state != v1::STOPPING);
  }
  LogInfo("ddpm_coordinator: group %s registered (%d ranks)%s\n", group.id.c_str(),
          group.world_size, note.c_str());
  v1::RegisterResponse response;
  response.set_session(group.session);
  response.set_heartbeat_interval_seconds(options_.heartbeat_interval_seconds);
  response.set_heartbeat_timeout_seconds(options_.heartbeat_timeout_seconds);
  Schedule();
  return response;
}

std::optional<v1::GroupCommand> Coordinator::WaitForCommand(
    const std::string& group_id, const std::string& session, int64_t& version,
    std::chrono::steady_clock::time_point deadline) {
  std::unique_lock<std::mutex> lock(mutex_);
  while (true) {
    const auto it = groups_.find(group_id);
    if (it == groups_.end() || it->second.session != session) {
      throw CoordinatorError(ErrorCode::kNotFound, "group '" + group_id + "' has no session '" +
                                                       session + "'; register again");
    }
    if (shutdown_) {
      throw CoordinatorError(ErrorCode::kUnavailable, "the coordinator is shutting down");
    }
    if (it->second.version != version) {
      version = it->second.version;
      return it->second.command;
    }
    const std::shared_ptr<std::condition_variable> changed = it->second.command_changed;
    if (changed->wait_until(lock, deadline) == std::cv_status::timeout) return std::nullopt;
  }
}

void Coordinator::OpenStream(const std::string& group_id, const std::string& session) {
  std::lock_guard<std::mutex> lock(mutex_);
  const auto it = groups_.find(group_id);
  if (it == groups_.end() || it->second.session != session) {
    throw CoordinatorError(ErrorCode::kNotFound, "group '" + group_id + "' has no session '" +
                                                     session + "'; register again");
  }
  Group& group = it->second;
  ++group.open_streams;
  if (group.stream_closed_ms != 0) {
    LogInfo("ddpm_coordinator: group %s is back %s after its command stream closed\n",
            group_id.c_str(),
            FormatSeconds((clock_.NowUnixMs() - group.stream_closed_ms) / 1000.0).c_str());
    group.stream_closed_ms = 0;
  }
}

void Coordinator::CloseStream(const std::string& group_id, const std::string& session) {
  std::lock_guard<std::mutex> lock(mutex_);
  const auto it = groups_.find(group_id);
  if (it == groups_.end() || it->second.session != session || it->second.open_streams == 0) return;
  Group& group = it->second;
  if (--group.open_streams > 0 || shutdown_) return;
  group.stream_closed_ms = std::max<int64_t>(clock_.NowUnixMs(), 1);
  LogInfo(
      "ddpm_coordinator: group %s's command stream closed; it is lost unless it comes "
      "back within %s\n",
      group_id.c_str(), FormatSeconds(options_.stream_grace_seconds).c_str());
}

void Coordinator::Heartbeat(const v1::HeartbeatRequest& request) {
  std::lock_guard<std::mutex> lock(mutex_);
  Group& group = FindGroup(request.group_id());
  if (request.rank() < 0 || request.rank() >= group.world_size) {
    throw CoordinatorError(ErrorCode::kInvalidArgument,
                           "Heartbeat: group '" + group.id + "' has ranks 0.." +
                               std::to_string(group.world_size - 1) + ", not " +
                               std::to_string(request.rank()));
  }
  for (const v1::PeerReport& peer : request.peers()) {
    if (request.rank() != 0 || peer.rank() <= 0 || peer.rank() >= group.world_size) {
      throw CoordinatorError(ErrorCode::kInvalidArgument,
                             "Heartbeat: group '" + group.id + "': rank " +
                                 std::to_string(request.rank()) + " forwards a report of rank " +
                                 std::to_string(peer.rank()) +
                                 "; only rank 0 forwards, and only of ranks 1.." +
                                 std::to_string(group.world_size - 1));
    }
  }
  if (!request.run_id().empty()) GroupHolding(group.id, request.run_id(), request.attempt());
  const int64_t now = clock_.NowUnixMs();
  group.last_heartbeat_ms[request.rank()] = now;
  group.device_memory_bytes[request.rank()] = request.device_memory_bytes();
  // The peers rank 0 heard from: each as fresh as its report.
  for (const v1::PeerReport& peer : request.peers()) {
    const int64_t heard = now - std::max<int64_t>(peer.age_ms(), 0);
    group.last_heartbeat_ms[peer.rank()] = std::max(group.last_heartbeat_ms[peer.rank()], heard);
    group.device_memory_bytes[peer.rank()] = peer.device_memory_bytes();
  }
  if (request.run_id().empty()) return;
  RunEntry& entry = runs_.at(request.run_id());
  v1::Run& run = entry.run;
  bool save = false;
  auto record_rank = [&](int rank, const v1::RankMetrics& metrics) {
    while (run.ranks_size() < group.world_size) run.add_ranks()->set_rank(run.ranks_size());
    *run.mutable_ranks(rank) = metrics;
    run.mutable_ranks(rank)->set_rank(rank);
  };
  if (request.has_rank_metrics()) record_rank(request.rank(), request.rank_metrics());
  for (const v1::PeerReport& peer : request.peers()) {
    // A peer still on the previous run (or attempt) has nothing to say about this one.
    if (peer.has_rank_metrics() && peer.run_id() == request.run_id() &&
        peer.attempt() == request.attempt()) {
      record_rank(peer.rank(), peer.rank_metrics());
    }
  }
  // A training run's log interval also goes into its metric history (the console's curves).
  bool history_row = false;
  if (request.rank() == 0 && request.has_train_metrics()) {
    *run.mutable_metrics() = request.train_metrics();
    run.mutable_metrics()->set_at_unix_ms(now);
    // An evaluation job knows its images in all once its group has chosen the checkpoints.
    if (run.kind() == v1::EVALUATION) run.set_total_steps(request.train_metrics().total());
    history_row = run.kind() == v1::TRAINING && request.train_metrics().step() > 0;
    ++entry.metrics_version;
    save = true;
  }
  if (request.rank() == 0 && !request.sample_grid().empty() &&
      request.sample_grid() != run.sample_grid()) {
    run.set_sample_grid(request.sample_grid());
    save = true;
  }
  if (run.state() == v1::STARTING && request.rank() == 0 && request.has_rank_metrics() &&
      request.rank_metrics().step() > 0) {
    if (request.rank_metrics().step() > run.metrics().step()) {
      run.mutable_metrics()->set_step(request.rank_metrics().step());
    }
    if (history_row) registry_->AddMetricRow(run.id(), run.metrics());
    Transition(entry, v1::RUNNING,
               "group " + group.id +
                   (run.kind() == v1::EVALUATION ? " is evaluating (" : " is training (step ") +
                   std::to_string(request.rank_metrics().step()) +
                   (run.kind() == v1::EVALUATION ? " images)" : ")"));
    return;
  }
  if (save) {
    run.set_updated_unix_ms(now);
    registry_->Transaction([&] {
      if (history_row) registry_->AddMetricRow(run.id(), run.metrics());
      registry_->UpdateRun(run);
    });
    Changed();
  }
}

void Coordinator::ReportCheckpoint(const v1::ReportCheckpointRequest& request) {
  std::lock_guard<std::mutex> lock(mutex_);
  GroupHolding(request.group_id(), request.run_id(), request.attempt());
  RunEntry& entry = runs_.at(request.run_id());
  v1::CheckpointInfo checkpoint = request.checkpoint();
  checkpoint.set_at_unix_ms(clock_.NowUnixMs());
  v1::Run next = entry.run;
  if (checkpoint.step() >= next.latest_checkpoint().step())
    *next.mutable_latest_checkpoint() = checkpoint;
  next.set_updated_unix_ms(checkpoint.at_unix_ms());
  registry_->Transaction([&] {
    registry_->AddCheckpoint(next.id(), checkpoint);
    registry_->UpdateRun(next);
  });
  entry.run = std::move(next);
  Changed();
}

void Coordinator::ReportEval(const v1::ReportEvalRequest& request) {
  std::lock_guard<std::mutex> lock(mutex_);
  GroupHolding(request.group_id(), request.run_id(), request.attempt());
  RunEntry& entry = runs_.at(request.run_id());
  v1::EvalResult eval = request.eval();
  eval.set_at_unix_ms(clock_.NowUnixMs());
  v1::Run next = entry.run;
  // The newest FID and the newest bound: an evaluation may hold either or both.
  const bool has_fid = eval.num_samples() > 0 || !eval.has_nll_bits_per_dim();
  if (has_fid && eval.step() >= next.latest_eval().step()) {
    *next.mutable_latest_eval() = eval;
  }
  if (eval.has_nll_bits_per_dim() && eval.step() >= next.latest_nll().step()) {
    *next.mutable_latest_nll() = eval;
  }
  if (request.has_best()) *next.mutable_best() = request.best();
  if (next.kind() == v1::EVALUATION) {
    // One result per checkpoint, in step order; a repeated report (a retry) replaces its own.
    auto* results = next.mutable_evaluation()->mutable_results();
    auto at = std::find_if(results->begin(), results->end(),
                           [&](const v1::EvalResult& r) { return r.step() >= eval.step(); });
    if (at != results->end() && at->step() == eval.step()) {
      *at = eval;
    } else {
      const int index = static_cast<int>(at - results->begin());
      results->Add()->CopyFrom(eval);
      for (int i = results->size() - 1; i > index; --i) results->SwapElements(i, i - 1);
    }
  }
  next.set_updated_unix_ms(eval.at_unix_ms());
  registry_->Transaction([&] {
    registry_->AddEval(next.id(), eval);
    registry_->UpdateRun(next);
  });
  entry.run = std::move(next);
  ++entry.metrics_version;
  Changed();
}

void Coordinator::ReportRunEnd(const v1::ReportRunEndRequest& request) {
  std::lock_guard<std::mutex> lock(mutex_);
  Group& group = GroupHolding(request.group_id(), request.run_id(), request.attempt());
  RunEntry& entry = runs_.at(request.run_id());
  v1::Run& run = entry.run;
  if (request.step() > run.metrics().step()) run.mutable_metrics()->set_step(request.step());
  if (!request.sample_grid().empty()) run.set_sample_grid(request.sample_grid());
  if (!request.ema_weights().empty()) run.set_ema_weights(request.ema_weights());
  group.run_id.clear();
  v1::GroupCommand idle;
  idle.set_kind(v1::GroupCommand::IDLE);
  SetCommand(group, idle);
  const std::string at =
      (run.kind() == v1::EVALUATION ? "" : " at step " + std::to_string(request.step())) +
      " on group " + group.id;
  const v1::RunState state = run.state();
  switch (request.outcome()) {
    case v1::ReportRunEndRequest::COMPLETED:
      if (!IsFinal(state)) {
        // A run that ended early (eval.patience) says why.
        Transition(entry, v1::COMPLETED,
                   (!request.message().empty()     ? request.message()
                    : run.kind() == v1::EVALUATION ? "evaluated every checkpoint it chose"
                                                   : "trained to the last step") +
                       at);
      }
      break;
    case v1::ReportRunEndRequest::STOPPED:
      if (!IsFinal(state)) Transition(entry, v1::STOPPED, "stopped with a checkpoint" + at);
      break;
    case v1::ReportRunEndRequest::INTERRUPTED:
      if (state == v1::STOPPING) {
        Transition(entry, v1::STOPPED, "stopped with a checkpoint" + at);
      } else if (!IsFinal(state)) {
        FailRun(entry, "the group was interrupted" + at + ": " + request.message(), true);
      }
      break;
    default:
      // An error the group reports would repeat on a restart: the run is not re-queued.
      if (!IsFinal(state)) FailRun(entry, "error" + at + ": " + request.message(), false);
      break;
  }
  run.set_updated_unix_ms(clock_.NowUnixMs());
  Save(entry);
  Schedule();
}

void Coordinator::Leave(const v1::LeaveRequest& request) {
  std::lock_guard<std::mutex> lock(mutex_);
  FindGroup(request.group_id());
  LoseGroup(request.group_id(), "it left: " + request.reason());
  Schedule();
}

bool Coordinator::RegistryWritable(std::string* error) {
  std::lock_guard<std::mutex> lock(mutex_);
  try {
    if (!registry_) throw RegistryError("the registry is closed");
    registry_->ProbeWritable();
    return true;
  } catch (const std::exception& failure) {
    if (error != nullptr) *error = failure.what();
    return false;
  }
}

void Coordinator::Tick() {
  std::lock_guard<std::mutex> lock(mutex_);
  const int64_t now = clock_.NowUnixMs();
  const double timeout = options_.heartbeat_timeout_seconds;
  std::vector<std::pair<std::string, std::string>> lost;
  for (const auto& [id, group] : groups_) {
    if (group.open_streams == 0 && group.stream_closed_ms != 0) {
      const double gone = (now - group.stream_closed_ms) / 1000.0;
      if (gone > options_.stream_grace_seconds) {
        lost.emplace_back(id, "group " + id + "'s command stream closed " + FormatSeconds(gone) +
                                  " ago and it did not come back within the grace of " +
                                  FormatSeconds(options_.stream_grace_seconds));
        continue;
      }
    }
    for (int rank = 0; rank < group.world_size; ++rank) {
      const double age = (now - group.last_heartbeat_ms[rank]) / 1000.0;
      if (age > timeout) {
        lost.emplace_back(id, "no heartbeat from rank " + std::to_string(rank) + " of group " + id +
                                  " for " + FormatSeconds(age) + " (timeout " +
                                  FormatSeconds(timeout) + ")");
        break;
      }
    }
  }
  for (const auto& [id, reason] : lost) LoseGroup(id, reason);
  if (now - pruned_ms_ >= 10000) PruneEnded();
  // Runs whose group has not come back since this coordinator started.
  if ((now - started_ms_) / 1000.0 > timeout) {
    for (auto& [id, entry] : runs_) {
      const v1::RunState state = entry.run.state();
      if (IsFinal(state) || state == v1::QUEUED) continue;
      const std::string& group = entry.run.placement().group_id();
      if (groups_.count(group) != 0) continue;
      FailRun(entry,
              "group " + group + " did not come back within " + FormatSeconds(timeout) +
                  " of the coordinator's start",
              state != v1::STOPPING);
    }
  }
  Schedule();
}

void Coordinator::Shutdown() {
  std::lock_guard<std::mutex> lock(mutex_);
  shutdown_ = true;
  for (auto& [id, group] : groups_) group.command_changed->notify_all();
  Changed();
}

std::vector<GroupStatus> Coordinator::Groups() const {
  std::lock_guard<std::mutex> lock(mutex_);
  const int64_t now = clock_.NowUnixMs();
  std::vector<GroupStatus> groups;
  for (const auto& [id, group] : groups_) {
    GroupStatus& status = groups.emplace_back();
    status.id = id;
    status.world_size = group.world_size;
    status.run_id = group.run_id;
    for (int64_t at : group.last_heartbeat_ms) {
      status.heartbeat_age_seconds.push_back((now - at) / 1000.0);
    }
    status.hostnames = group.hostnames;
    status.devices = group.devices;
    status.device_memory_bytes = group.device_memory_bytes;
  }
  return groups;
}

}  // namespace ddpm
