// What the run does when things go wrong around it: a newer attempt holds its directory
// (fencing), a checkpoint, grid or metrics row cannot be written (a full disk), the loss
// diverges (rollback). Each case names its cause and loses no good checkpoint.
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <string>
#include <vector>

#include "base/fence.h"
#include "config/config.h"
#include "run/run.h"
#include "run/run_control.h"
#include "run/run_log.h"
#include "trainer/checkpoint.h"
#include "trainer/checkpoint_keys.h"

namespace ddpm {
namespace {

namespace fs = std::filesystem;
namespace keys = checkpoint_keys;

std::string FreshDir(const std::string& name) {
  const fs::path dir =
      fs::temp_directory_path() / ("ddpm_hardening_" + std::to_string(getpid())) / name;
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir.string();
}

std::string Text(const std::string& path) {
  std::ifstream in(path);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// Sets an environment variable for one scope.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const std::string& value) : name_(name) {
    setenv(name, value.c_str(), 1);
  }
  ~ScopedEnv() { unsetenv(name_); }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  const char* name_;
};

Config TinyRun(int64_t steps) {
  Config config = LoadConfigString(R"(
model: {ch: 16, ch_mult: [1, 2], num_res_blocks: 1, attn_resolutions: [8], image_size: 16,
        norm_groups: 8, dropout: 0.1}
diffusion: {timesteps: 100}
train: {batch_size: 8, lr: 0.001, warmup_steps: 5, ema_decay: 0.9, threads: 1, log_every: 5,
        checkpoint_every: 5, keep_checkpoints: 10, device: cpu}
data: {shapes_size: 64}
sample: {sampler: ddim, steps: 2, num_images: 4}
)");
  config.train.steps = steps;
  return config;
}

std::map<std::string, torch::Tensor> Small(float value) {
  return {{"w", torch::full({100}, value)}, {keys::kStep, torch::tensor(int64_t{1})}};
}

bool AllFinite(const std::map<std::string, torch::Tensor>& tensors, const std::string& prefix) {
  for (const auto& [name, tensor] : tensors) {
    if (name.rfind(prefix, 0) == 0 && !torch::isfinite(tensor).all().item<bool>()) return false;
  }
  return true;
}

std::vector<std::string> Temporaries(const std::string& dir) {
  std::vector<std::string> found;
  for (const auto& entry : fs::directory_iterator(dir)) {
    const std::string name = entry.path().filename().string();
    if (name.find(".tmp") != std::string::npos) found.push_back(name);
  }
  return found;
}

// ---- Fencing ----------------------------------------------------------------------------

TEST(Fencing, AWriterOfASupersededAttemptPublishesNothing) {
  const std::string run = FreshDir("fenced_writer");
  const std::string dir = run + "/checkpoints";
  const RunFence fence(run);
  fence.Grant(1);
  {
    CheckpointWriter writer(dir, 0, 1, 5, 60);
    writer.set_fence(1, [&](const std::string& what) { fence.Check(1, what); });
    writer.Save(10, Small(1), {});
    EXPECT_EQ(writer.Wait(), dir + "/step_000000010");
    EXPECT_EQ(CheckpointAttempt(dir + "/step_000000010"), 1) << "the manifest records the attempt";

    fence.Grant(2);  // the coordinator gave the run to a new attempt
    writer.Save(20, Small(2), {});
    try {
      writer.Wait();
      FAIL() << "a superseded attempt must not commit";
    } catch (const FencedError& e) {
      EXPECT_NE(std::string(e.what()).find("superseded by attempt 2"), std::string::npos)
          << e.what();
      EXPECT_NE(std::string(e.what()).find("the checkpoint of step 20"), std::string::npos)
          << e.what();
    }
  }
  EXPECT_EQ(CheckpointDir(dir).Steps(), (std::vector<int64_t>{10}));
  EXPECT_EQ(Text(dir + "/latest"), "step_000000010\n");
  EXPECT_TRUE(Temporaries(dir).empty()) << Temporaries(dir).front();
}

TEST(Fencing, ResumeSkipsWhatASupersededAttemptCommittedAfterTheNewOneBegan) {
  const std::string run = FreshDir("stale_resume");
  const std::string dir = run + "/checkpoints";
  const RunFence fence(run);
  fence.Grant(1);
  SaveCheckpoint(dir, 10, Small(1), 5);  // attempt 0 writer; marks no attempt
  fence.Grant(2);
  fence.Began(2, 10);
  // Attempt 1, still alive behind a partition, commits step 15 after attempt 2 began at 10 (the
  // race the fence check cannot close: it read the fence just before the grant).
  {
    CheckpointWriter old_attempt(dir, 0, 1, 5, 60);
    old_attempt.set_fence(1, nullptr);
    old_attempt.Save(15, Small(15), {});
    old_attempt.Wait();
  }
  EXPECT_EQ(Text(dir + "/latest"), "step_000000015\n");
  std::vector<std::string> warnings;
  const auto loaded = CheckpointDir(dir).LoadLatestValid(
      [&](const std::string& w) { warnings.push_back(w); },
      [&](const std::string& path) {
        const int64_t step = std::stoll(path.substr(path.rfind("step_") + 5));
        return fence.Stale(CheckpointAttempt(path), step);
      });
  ASSERT_TRUE(loaded);
  EXPECT_EQ(loaded->path, dir + "/step_000000010");
  ASSERT_FALSE(warnings.empty());
  EXPECT_NE(warnings[0].find("committed by attempt 1 after attempt 2 had begun from step 10"),
            std::string::npos)
      << warnings[0];
}

TEST(Fencing, ARunWhoseAttemptIsSupersededStopsAndWritesNothingMore) {
  const std::string run = FreshDir("superseded_run");
  const RunFence fence(run);
  fence.Grant(1);
  TrainOptions options;
  options.run_dir = run;
  options.attempt = 1;
  options.fence_check_seconds = 0;
  // The coordinator moves the run to attempt 2 once step 5's checkpoint has committed.
  std::atomic<bool> committed{false};
  int64_t granted_at = -1;
  options.on_checkpoint = [&](const CommittedCheckpoint&) { committed = true; };
  options.on_step = [&](const WorkerMetrics& m) {
    if (m.step >= 7 && committed && granted_at < 0) {
      fence.Grant(2);
      granted_at = m.step;
    }
  };
  const TrainResult result = RunTraining(TinyRun(20), options);
  ASSERT_GE(granted_at, 7);
  ASSERT_LT(granted_at, 10) << "step 5's commit took three steps' time";
  EXPECT_TRUE(result.superseded);
  EXPECT_EQ(result.steps, granted_at) << "it stops at the next step boundary";
  EXPECT_EQ(CheckpointDir(run + "/checkpoints").Steps(), (std::vector<int64_t>{5}));
  EXPECT_FALSE(fs::exists(run + "/ema_weights.pt"));
  EXPECT_TRUE(fs::is_empty(run + "/samples"));
  EXPECT_EQ(fence.Read()[0].began_at_step, 0) << "attempt 1 recorded where it began";

  // Started again as attempt 1, it refuses before it trains or writes anything.
  const std::string metrics = Text(run + "/metrics.csv");
  options.resume = true;
  options.on_step = nullptr;
  EXPECT_THROW(RunTraining(TinyRun(20), options), FencedError);
  EXPECT_EQ(Text(run + "/metrics.csv"), metrics);
  // Attempt 2 resumes from attempt 1's step 5 and finishes.
  options.attempt = 2;
  const TrainResult second = RunTraining(TinyRun(20), options);
  EXPECT_FALSE(second.superseded);
  EXPECT_EQ(second.steps, 20);
  EXPECT_EQ(fence.Read()[1].began_at_step, 5);
  EXPECT_EQ(CheckpointAttempt(second.checkpoint), 2);
}

// ---- A full disk ------------------------------------------------------------------------

TEST(FullDisk, FailedCheckpointsAreAbandonedCleanlyAndTrainingGoesOn) {
  // Every write of the run at steps 5..10 fails as on a full disk: the checkpoints of 5 and 10,
  // the metrics rows of 5 and 10. Training goes on; 15 and 20 commit.
  const std::string run = FreshDir("disk_full");
  const ScopedEnv full("DDPM_FAULT_DISK_FULL", "5-10");
  TrainOptions options;
  options.run_dir = run;
  std::vector<LogMetrics> logs;
  options.on_log = [&](const LogMetrics& m) { logs.push_back(m); };
  const TrainResult result = RunTraining(TinyRun(20), options);
  EXPECT_EQ(result.steps, 20);
  EXPECT_EQ(result.checkpoint_failures, 2);
  const std::string dir = run + "/checkpoints";
  EXPECT_EQ(CheckpointDir(dir).Steps(), (std::vector<int64_t>{20, 15}));
  EXPECT_EQ(Text(dir + "/latest"), "step_000000020\n");
  EXPECT_TRUE(Temporaries(dir).empty()) << Temporaries(dir).front();
  const auto checkpoint = ReadCheckpoint(dir + "/step_000000020");
  EXPECT_EQ(checkpoint.at(keys::kCheckpointFailures).item<int64_t>(), 2);
  // metrics.csv holds whole rows only: the header and steps 15 and 20.
  const std::string csv = Text(run + "/metrics.csv");
  EXPECT_EQ(std::count(csv.begin(), csv.end(), '\n'), 3) << csv;
  EXPECT_EQ(csv.find("\n5,"), std::string::npos);
  EXPECT_NE(csv.find("\n15,"), std::string::npos);
  // The coordinator hears of it with the log metrics.
  ASSERT_FALSE(logs.empty());
  EXPECT_EQ(logs.back().checkpoint_failures, 2);
  EXPECT_NE(logs.back().last_incident.find("No space left on device"), std::string::npos)
      << logs.back().last_incident;
}

TEST(FullDisk, CheckpointsThatKeepFailingStopTheRunNamingTheError) {
  const std::string run = FreshDir("disk_full_stop");
  const ScopedEnv full("DDPM_FAULT_DISK_FULL", "0-1000");
  Config config = TinyRun(40);
  config.train.max_checkpoint_failures = 2;
  TrainOptions options;
  options.run_dir = run;
  try {
    RunTraining(config, options);
    FAIL() << "two failed checkpoints in a row must stop the run";
  } catch (const CheckpointError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("2 checkpoints in a row could not be written "
                        "(train.max_checkpoint_failures)"),
              std::string::npos)
        << what;
    EXPECT_NE(what.find("No space left on device (injected by DDPM_FAULT_DISK_FULL)"),
              std::string::npos)
        << what;
  }
  EXPECT_TRUE(CheckpointDir(run + "/checkpoints").Steps().empty());
  EXPECT_TRUE(Temporaries(run + "/checkpoints").empty());
}

TEST(FullDisk, ACsvRowThatCannotBeWrittenIsAnErrorNamingTheFile) {
  // /dev/full fails every write with ENOSPC.
  if (!fs::exists("/dev/full")) GTEST_SKIP() << "this system has no /dev/full";
  CsvLog log("/dev/full", "a,b", true);
  try {
    log.Row(1, 2);
    FAIL() << "a write to /dev/full must fail";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("/dev/full: cannot append a row: No space left on "
                                         "device"),
              std::string::npos)
        << e.what();
  }
}

TEST(CsvLogs, AResumedLogAppendsAndOneOfOtherColumnsIsKeptAside) {
  const fs::path dir = fs::temp_directory_path() / ("ddpm_csv_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  const std::string path = (dir / "eval.csv").string();
  auto read = [](const std::string& file) {
    std::ifstream in(file);
    return std::string(std::istreambuf_iterator<char>(in), {});
  };
  {
    CsvLog log(path, "step,fid", false);
    log.Row(10, 4.5);
  }
  {
    CsvLog log(path, "step,fid", true);  // the same columns: appended
    log.Row(20, 3.5);
  }
  EXPECT_EQ(read(path), "step,fid\n10,4.5\n20,3.5\n");
  {
    CsvLog log(path, "step,fid,nll", true);  // a newer version's columns
    log.Row(30, 3.25, 3.75);
  }
  EXPECT_EQ(read(path), "step,fid,nll\n30,3.25,3.75\n");
  EXPECT_EQ(read(path + ".old"), "step,fid\n10,4.5\n20,3.5\n");
  fs::remove_all(dir);
}

// ---- Divergence -------------------------------------------------------------------------

TEST(Rollback, ANanRollsBackToTheLastCheckpointSkipsItsDataAndFinishes) {
  // Step 13 gets a batch of NaNs: the weights are NaN from there on. The log of step 15 sees
  // it; the run goes back to step 10's checkpoint, past the data of steps 11-15, halves the
  // learning rate, and trains to 20.
  const std::string run = FreshDir("rollback");
  const ScopedEnv nan("DDPM_FAULT_INJECT", "rank=0,step=13,nan");
  Config config = TinyRun(20);
  config.train.on_divergence = DivergencePolicy::kRollback;
  config.train.rollback_lr_scale = 0.5;
  TrainOptions options;
  options.run_dir = run;
  std::vector<LogMetrics> logs;
  options.on_log = [&](const LogMetrics& m) { logs.push_back(m); };
  const TrainResult result = RunTraining(config, options);
  EXPECT_EQ(result.steps, 20);
  EXPECT_EQ(result.rollbacks, 1);
  const auto checkpoint = ReadCheckpoint(result.checkpoint);
  EXPECT_TRUE(AllFinite(checkpoint, keys::kModelPrefix));
  EXPECT_TRUE(AllFinite(checkpoint, keys::kEmaPrefix));
  EXPECT_EQ(checkpoint.at(keys::kRollbacks).item<int64_t>(), 1);
  EXPECT_EQ(checkpoint.at(keys::kLrScale).item<double>(), 0.5);
  // 25 batches of 8 were drawn (steps 1-15, then 11-20 again): 200 images of a 64-image epoch.
  const int64_t drawn = checkpoint.at(keys::kDataEpoch).item<int64_t>() * 64 +
                        checkpoint.at(keys::kDataOffset).item<int64_t>();
  EXPECT_EQ(drawn, 200);
  ASSERT_FALSE(logs.empty());
  EXPECT_EQ(logs.back().rollbacks, 1);
  EXPECT_NE(logs.back().last_incident.find("rollback 1 of 3 at step 15"), std::string::npos)
      << logs.back().last_incident;
  EXPECT_NE(logs.back().last_incident.find("restored the checkpoint of step 10"), std::string::npos)
      << logs.back().last_incident;
}

TEST(Rollback, WithNoCheckpointToGoBackToTheRunStopsSayingSo) {
  const std::string run = FreshDir("rollback_none");
  const ScopedEnv nan("DDPM_FAULT_INJECT", "rank=0,step=2,nan");
  Config config = TinyRun(20);
  config.train.on_divergence = DivergencePolicy::kRollback;
  TrainOptions options;
  options.run_dir = run;
  try {
    RunTraining(config, options);
    FAIL() << "there is nothing to roll back to";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("no checkpoint before step 5"), std::string::npos)
        << e.what();
  }
}

TEST(Rollback, RollbacksAreLimitedByMaxRollbacks) {
  // A learning rate of 1e30 diverges again after every rollback.
  const std::string run = FreshDir("rollback_limit");
  Config config = TinyRun(40);
  config.train.on_divergence = DivergencePolicy::kRollback;
  config.train.max_rollbacks = 2;
  TrainOptions options;
  options.run_dir = run;
  RunTraining(TinyRun(5), options);  // a good checkpoint at step 5
  config.train.lr = 1e30;
  options.resume = true;
  try {
    RunTraining(config, options);
    FAIL() << "the third divergence must stop the run";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("diverged again after 2 rollback(s), "
                                         "train.max_rollbacks"),
              std::string::npos)
        << e.what();
  }
  EXPECT_EQ(CheckpointDir(run + "/checkpoints").Steps(), (std::vector<int64_t>{5}));
}

TEST(Rollback, ALossAboveSpikeFactorTimesTheRecentMedianIsASpike) {
  LossSpikeDetector off(0);
  for (int i = 0; i < 10; ++i) EXPECT_EQ(off.Check(i == 9 ? 1e9 : 1.0, i), "") << "factor 0: off";

  LossSpikeDetector spikes(3);
  // Too little history to judge: even a large loss passes (and joins it).
  for (const double loss : {1.0, 0.9, 1.1, 30.0}) EXPECT_EQ(spikes.Check(loss, 1), "");
  EXPECT_EQ(spikes.Check(1.0, 5), "");  // history 1.0, 0.9, 1.1, 30, 1.0: median 1.0
  EXPECT_EQ(spikes.Check(2.9, 6), "") << "under 3 x the median";
  // History 0.9, 1.0, 1.0, 1.1, 2.9, 30: the median (upper of the middle two) is 1.1.
  const std::string cause = spikes.Check(3.4, 7);
  EXPECT_NE(cause.find("a loss spike at step 7: 3.4 is above 3 x 1.1, the median of the last 6 "
                       "logged losses (train.spike_factor)"),
            std::string::npos)
      << cause;
  // The spike did not join the history: the same loss is a spike again.
  EXPECT_NE(spikes.Check(3.4, 8), "");
  EXPECT_EQ(spikes.Check(std::nan(""), 9), "") << "a NaN is the non-finite test's";
}

TEST(Rollback, DivergenceSettingsAreValidatedByName) {
  for (const auto& [yaml, expected] : std::vector<std::pair<std::string, std::string>>{
           {"train: {on_divergence: retry}", "train.on_divergence"},
           {"train: {rollback_lr_scale: 0}", "train.rollback_lr_scale: must be in (0, 1]"},
           {"train: {spike_factor: 0.5}", "train.spike_factor: must be 0 (off) or > 1"},
           {"train: {max_rollbacks: -1}", "train.max_rollbacks: must be >= 0"},
           {"train: {max_checkpoint_failures: 0}", "train.max_checkpoint_failures: must be >= 1"},
       }) {
    try {
      LoadConfigString(yaml).Validate(1);
      FAIL() << yaml;
    } catch (const ConfigError& e) {
      EXPECT_NE(std::string(e.what()).find(expected), std::string::npos) << e.what();
    }
  }
}

}  // namespace
}  // namespace ddpm
