#include "run/run_checkpoints.h"

#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <utility>

#include "base/file_io.h"
#include "base/log.h"
#include "base/text.h"
#include "run/lead_or_all.h"
#include "trainer/image_io.h"

namespace ddpm {

int64_t StepOfCheckpointPath(const std::string& path) {
  const std::size_t slash = path.find_last_of('/');
  long long step = -1;
  const std::string name = slash == std::string::npos ? path : path.substr(slash + 1);
  if (std::sscanf(name.c_str(), "step_%lld", &step) != 1 || name != StepName(step)) return -1;
  return step;
}

std::string InjectedDiskFull() {
  return std::string(std::strerror(ENOSPC)) + " (injected by DDPM_FAULT_DISK_FULL)";
}

RunCheckpoints::RunCheckpoints(const Config& config, const TrainOptions& options,
                               const RunConsole& console, Communicator& comm,
                               const FaultInjection& fault)
    : config_(config),
      options_(options),
      console_(console),
      comm_(comm),
      fault_(fault),
      checkpoints_(options.run_dir + "/checkpoints"),
      snapshots_(options.run_dir + "/phema"),
      fence_(options.run_dir),
      best_(config.eval, options.run_dir + "/checkpoints") {}

RunCheckpoints::~RunCheckpoints() = default;

std::string RunCheckpoints::Stale(const std::string& path) const {
  return fence_.Stale(CheckpointAttempt(path), StepOfCheckpointPath(path));
}

std::optional<CheckpointDir::Loaded> RunCheckpoints::FindResumable() const {
  const auto warn = [this](const std::string& message) {
    console_.Say("ddpm: warning: %s\n", message.c_str());
  };
  if (!options_.resume_from.empty()) return LoadCheckpointAt(options_.resume_from, warn);
  const std::vector<int64_t> existing = checkpoints_.Steps();
  if (options_.resume) {
    std::optional<CheckpointDir::Loaded> loaded =
        checkpoints_.LoadLatestValid(warn, [this](const std::string& path) { return Stale(path); });
    if (!loaded && !existing.empty()) {
      throw CheckpointError(checkpoints_.dir() +
                            ": no checkpoint there can be read (see the warnings above); move "
                            "them aside to start afresh");
    }
    return loaded;
  }
  if (!existing.empty()) {
    throw RunError(options_.run_dir + " already holds checkpoints (newest: step " +
                   std::to_string(existing.front()) +
                   "); pass --resume to continue that run, or choose another --run-dir");
  }
  return std::nullopt;
}

void RunCheckpoints::TakeFence(const std::optional<CheckpointDir::Loaded>& loaded) {
  OnLeadOrAll(comm_, "take the run's fence", [&] {
    MakeDirectories(options_.run_dir);
    fence_.Began(options_.attempt, loaded ? StepOfCheckpointPath(loaded->path) : 0);
  });
  if (console_.lead()) {
    MakeDirectories(options_.run_dir + "/samples");
    // Before any rank writes (they all pass the broadcasts of joining the world first).
    checkpoints_.RemoveTemporaries();
    snapshots_.RemoveTemporaries();
  }
}

void RunCheckpoints::StartWriters(int64_t step, bool resumed, IncidentHook on_incident) {
  on_incident_ = std::move(on_incident);
  const int rank = comm_.rank(), world = comm_.world_size();
  const auto check_fence = [this](const std::string& what) {
    fence_.Check(options_.attempt, what);
  };
  // Every rank copies its share at the step boundary and writes it in the background; rank 0
  // commits, unless a newer attempt holds the run. A checkpoint waits for the one before.
  writer_ = std::make_unique<CheckpointWriter>(
      checkpoints_.dir(), rank, world, config_.train.keep_checkpoints, config_.dist.timeout_seconds,
      [this](std::size_t, std::size_t) {
        if (inject_disk_full_) throw CheckpointError(InjectedDiskFull());
      });
  writer_->set_fence(options_.attempt, check_fence);
  if (console_.lead() && options_.on_checkpoint) {
    // Save waits for the previous checkpoint, so the times are this commit's.
    writer_->set_on_commit([writer = writer_.get(), &on_checkpoint = options_.on_checkpoint](
                               int64_t committed_step, const std::string& dir) {
      const CheckpointTimes times = writer->times();
      on_checkpoint({committed_step, dir, times.stall_seconds, times.write_seconds});
    });
  }
  if (config_.train.phema_snapshot_every > 0) {
    // Snapshots after the step this run starts from belong to a trajectory it will retrace
    // (or, after a rollback, leave): they are written again as it passes them.
    DropSnapshotsAfter(step);
    snapshot_writer_ = std::make_unique<CheckpointWriter>(snapshots_.dir(), rank, world,
                                                          /*keep=*/0, config_.dist.timeout_seconds);
    snapshot_writer_->set_fence(options_.attempt, check_fence);
    last_snapshot_step_ = step;
  }
  last_saved_step_ = resumed ? step : -1;
}

void RunCheckpoints::Save(int64_t step, const std::map<std::string, torch::Tensor>& replicated,
                          const std::map<std::string, torch::Tensor>& own) {
  last_saved_step_ = step;
  inject_disk_full_ = fault_.DiskFull(step);
  writer_->Save(step, replicated, own);
  // write_seconds is now the previous checkpoint's (0 before the first has been written).
  times_ = writer_->times();
  const std::string previous =
      times_.write_seconds > 0
          ? " (the previous one took " + FormatSeconds(times_.write_seconds, 2) + ")"
          : "";
  console_.Say(
      "ddpm: checkpoint of step %lld: training resumed after %.2fs, writing in the "
      "background%s\n",
      static_cast<long long>(step), times_.stall_seconds, previous.c_str());
}

void RunCheckpoints::Settle(bool strict) {
  std::string committed;
  try {
    committed = writer_->Wait();
  } catch (const FencedError& error) {
    // Not the disk's fault: a newer attempt holds the run. The next step boundary stops.
    console_.Say("ddpm: %s\n", error.what());
    superseded_ = true;
    if (strict) throw;
    return;
  } catch (const std::exception& error) {
    if (strict) throw;
    // Each rank says what failed on it; rank 0, which commits, counts the checkpoint once.
    if (!console_.lead()) {
      LogWarning("ddpm: rank %d: warning: its shard of a checkpoint failed: %s\n", comm_.rank(),
                 error.what());
      return;
    }
    ++failures_;
    ++consecutive_failures_;
    error_ = error.what();
    console_.Say(
        "ddpm: warning: a checkpoint could not be written and was abandoned (%s); `latest` and "
        "the older checkpoints are untouched; training goes on (%d in a row; the run stops at "
        "%d, train.max_checkpoint_failures)\n",
        error.what(), consecutive_failures_, config_.train.max_checkpoint_failures);
    on_incident_("checkpoint failed: " + error_, true);
    return;
  }
  times_.write_seconds = writer_->times().write_seconds;
  if (console_.lead() && !committed.empty() && committed != committed_) {
    committed_ = committed;
    consecutive_failures_ = 0;
    console_.Say("ddpm: checkpoint %s committed (written in %.2fs)\n", committed.c_str(),
                 writer_->times().write_seconds);
  }
}

bool RunCheckpoints::Finish() {
  // Only rank 0 commits, so only it can see that the fence refused the commit: it tells all.
  int64_t fenced = 0;
  try {
    Settle(true);
  } catch (const FencedError&) {
    fenced = 1;
  }
  if (comm_.world_size() > 1) {
    torch::Tensor word = torch::tensor({fenced}, torch::kLong);
    comm_.Broadcast(word, 0, "broadcast of the last checkpoint's fence");
    fenced = word.item<int64_t>();
  }
  return fenced == 0;
}

void RunCheckpoints::Drain() {
  try {
    writer_->Wait();
  } catch (const std::exception& error) {
    console_.Say("ddpm: the last checkpoint of this attempt was not committed: %s\n", error.what());
  }
}

bool RunCheckpoints::Superseded(bool now) {
  const int attempt = options_.attempt;
  if (attempt == 0 || superseded_) return superseded_;
  const auto clock_now = std::chrono::steady_clock::now();
  if (!now && std::chrono::duration<double>(clock_now - fence_read_).count() <
                  options_.fence_check_seconds) {
    return false;
  }
  fence_read_ = clock_now;
  try {
    superseded_ = fence_.Current() > attempt;
  } catch (const std::exception& error) {
    console_.Say("ddpm: warning: %s; carrying on as attempt %d\n", error.what(), attempt);
  }
  if (superseded_) {
    console_.Say(
        "ddpm: attempt %d of this run has been superseded by attempt %d (%s); this "
        "group stops and writes nothing more into %s\n",
        attempt, fence_.Current(), fence_.path().c_str(), options_.run_dir.c_str());
  }
  return superseded_;
}

bool RunCheckpoints::FailingTooOften() const {
  return consecutive_failures_ >= config_.train.max_checkpoint_failures;
}

std::string RunCheckpoints::FailureError() const {
  return console_.lead()
             ? std::to_string(consecutive_failures_) +
                   " checkpoints in a row could not be written (train.max_checkpoint_failures); "
                   "the last error: " +
                   error_
             : std::string("rank 0 stopped the run: its checkpoints kept failing to write");
}

bool RunCheckpoints::SnapshotDue(int64_t step) const {
  return snapshot_writer_ &&
         (step % config_.train.phema_snapshot_every == 0 || step == config_.train.steps);
}

void RunCheckpoints::SaveSnapshot(int64_t step,
                                  const std::map<std::string, torch::Tensor>& replicated) {
  SettleSnapshot();
  last_snapshot_step_ = step;
  snapshot_writer_->Save(step, replicated, {});
}

void RunCheckpoints::SettleSnapshot() {
  if (!snapshot_writer_) return;
  try {
    const std::string committed = snapshot_writer_->Wait();
    if (!committed.empty())
      console_.Say("ddpm: post-hoc EMA snapshot %s committed\n", committed.c_str());
  } catch (const FencedError& error) {
    console_.Say("ddpm: %s\n", error.what());
    superseded_ = true;
  } catch (const std::exception& error) {
    if (console_.lead()) {
      on_incident_(std::string("post-hoc EMA snapshot failed: ") + error.what(), false);
      console_.Say(
          "ddpm: warning: a post-hoc EMA snapshot could not be written and was abandoned (%s); "
          "the other snapshots are untouched and training goes on\n",
          error.what());
    } else {
      LogWarning("ddpm: rank %d: warning: its shard of a post-hoc EMA snapshot failed: %s\n",
                 comm_.rank(), error.what());
    }
  }
}

void RunCheckpoints::DropSnapshotsAfter(int64_t step) {
  if (!console_.lead()) return;
  if (const int removed = snapshots_.RemoveAfter(step); removed > 0) {
    console_.Say(
        "ddpm: removed %d post-hoc EMA snapshot(s) after step %lld, which this run "
        "writes again from its own trajectory\n",
        removed, static_cast<long long>(step));
  }
}

CheckpointDir::Loaded RunCheckpoints::RollBackTarget(int64_t at, const std::string& cause) {
  // The pending checkpoint first (its weights were good): committed, or abandoned.
  Settle(false);
  // Rank 0 picks the newest checkpoint that reads and verifies; every rank loads that one.
  std::optional<CheckpointDir::Loaded> loaded;
  int64_t step = -1;
  if (console_.lead()) {
    loaded = checkpoints_.LoadLatestValid(
        [this](const std::string& message) {
          console_.Say("ddpm: warning: %s\n", message.c_str());
        },
        [this](const std::string& path) { return Stale(path); });
    if (loaded) step = StepOfCheckpointPath(loaded->path);
  }
  if (comm_.world_size() > 1) {
    torch::Tensor word = torch::tensor({step}, torch::kLong);
    comm_.Broadcast(word, 0,
                    "broadcast of the rollback's checkpoint at step " + std::to_string(at));
    step = word.item<int64_t>();
  }
  if (step < 0 || step >= at) {
    throw DivergedError("training diverged (" + cause +
                        ") and there is no checkpoint before step " + std::to_string(at) + " in " +
                        checkpoints_.dir() +
                        " to roll back to; train.on_divergence: rollback needs one");
  }
  if (!loaded) {
    loaded = CheckpointDir::Loaded{checkpoints_.PathFor(step),
                                   ReadCheckpoint(checkpoints_.PathFor(step))};
  }
  if (snapshot_writer_) {
    SettleSnapshot();
    DropSnapshotsAfter(step);
    last_snapshot_step_ = step;
  }
  last_saved_step_ = step;
  return std::move(*loaded);
}

void RunCheckpoints::PromoteBest(int64_t step, double score) {
  if (!console_.lead()) return;
  const std::string path = checkpoints_.PathFor(step);
  if (last_saved_step_ != step || committed_ != path) {
    console_.Say(
        "ddpm: eval.select: step %lld's %s %s is the best, but its checkpoint was not "
        "committed; `best` stays (%s)\n",
        static_cast<long long>(step), Name(best_.select()), FormatNumber(score).c_str(),
        best_.Describe().c_str());
    return;
  }
  if (fault_.KillBeforeBest(step)) {
    console_.Say("ddpm: DDPM_FAULT_KILL_BEFORE_BEST: killed before `best` moves to %s\n",
                 path.c_str());
    std::raise(SIGKILL);
  }
  const std::string before = best_.Describe();
  try {
    best_.Move(step, score,
               [this](const std::string& what) { fence_.Check(options_.attempt, what); });
    console_.Say("ddpm: eval.select: %s (was: %s); %s/best -> %s\n", best_.Describe().c_str(),
                 before.c_str(), checkpoints_.dir().c_str(), StepName(step).c_str());
  } catch (const FencedError& error) {
    console_.Say("ddpm: %s\n", error.what());
    superseded_ = true;
  }
}

}  // namespace ddpm
