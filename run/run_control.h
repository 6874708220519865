// What steers a running training run from outside its step: the signals (stop, checkpoint,
// sample), the control word rank 0 broadcasts at every step boundary so that every rank acts
// on the same step, the fault-injection hook of the tests, and the per-rank progress files
// that name a stuck rank. Torch-free.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace ddpm {

class SignalScope;

/// What rank 0 decided at a step boundary; every rank receives the same.
struct ControlDecision {
  /// Checkpoint now (SIGUSR1).
  bool checkpoint = false;
  /// Draw a sample grid now (SIGUSR2).
  bool sample = false;
  /// Stop: with a checkpoint, unless abandon.
  bool stop = false;
  /// The stop came from the run's caller (TrainOptions::poll_stop), not a signal.
  bool requested = false;
  /// Stop without a checkpoint.
  bool abandon = false;
  /// The stop is because a newer attempt holds the run directory (base/fence.h): nothing more
  /// is written.
  bool superseded = false;
  /// The stop is because checkpoints kept failing (train.max_checkpoint_failures): the run
  /// ends with that error.
  bool failed = false;
  /// The signal that stopped the run (SIGINT or SIGTERM), or 0.
  int signal = 0;

  /// As one integer, for the broadcast.
  int64_t Encode() const;
  static ControlDecision Decode(int64_t word);
};

/// Installs the run's signal handlers for its lifetime: SIGINT and SIGTERM stop the run at the
/// next step boundary (a second one exits at once, and a stop that takes longer than the grace
/// period is ended by SIGALRM), SIGUSR1 asks for a checkpoint, SIGUSR2 for a sample grid. One
/// at a time per process.
class RunSignals {
 public:
  explicit RunSignals(double grace_seconds);
  ~RunSignals();
  RunSignals(const RunSignals&) = delete;
  RunSignals& operator=(const RunSignals&) = delete;

  /// The requests that arrived since the last call (each is taken once), as a decision.
  ControlDecision Take();

 private:
  std::unique_ptr<SignalScope> stop_, requests_;
};

/// Test hooks. DDPM_FAULT_INJECT="rank=R,step=S[,hang|,nan]" makes rank R throw (or hang)
/// before step S, to check that one failing rank ends the whole job, or feed step S, once, a
/// batch of NaNs (nan), to check divergence handling. DDPM_FAULT_DISK_FULL="FROM-TO" makes every
/// write of the run directory at steps FROM..TO fail as on a full disk (ENOSPC), on every rank.
class FaultInjection {
 public:
  /// Reads the variables for rank; throws std::invalid_argument when one is malformed.
  static FaultInjection FromEnvironment(int rank);
  /// Throws (or hangs) when next_step is the injected one.
  void MaybeFail(int64_t next_step) const;
  /// What step next_step's input must be multiplied by: NaN once, at the step of a nan fault; 1
  /// otherwise.
  double TakeInputScale(int64_t next_step);
  /// Whether writes at step fail as on a full disk.
  bool DiskFull(int64_t step) const { return step >= disk_full_from_ && step <= disk_full_to_; }
  /// The score DDPM_FAULT_EVAL_SCORES=STEP:SCORE,... plants as the evaluation's eval.select
  /// score at step, if any.
  std::optional<double> PlantedScore(int64_t step) const;
  /// Whether DDPM_FAULT_KILL_BEFORE_BEST=STEP asks rank 0 to die (SIGKILL) right before it
  /// moves `best` to step.
  bool KillBeforeBest(int64_t step) const { return step == kill_before_best_; }

 private:
  std::map<int64_t, double> planted_scores_;
  int64_t kill_before_best_ = -1;
  int64_t step_ = -1;
  bool hang_ = false;
  double input_scale_ = 1;  // NaN for the nan fault
  bool input_taken_ = false;
  int64_t disk_full_from_ = 1;
  int64_t disk_full_to_ = 0;
};

/// The loss spike test of train.spike_factor: a logged loss above factor times the median of
/// the recent logged losses (at least 5 of them, the last 21) is a divergence. Fed the loss every
/// rank logged alike, it decides alike on every rank.
class LossSpikeDetector {
 public:
  /// factor 0 turns the test off.
  explicit LossSpikeDetector(double factor) : factor_(factor) {}
  /// "" for a loss that is no spike (it joins the history), else the cause in words, naming the
  /// step (a spike never joins the history; a loss that is not finite is not this test's).
  std::string Check(double loss, int64_t step);

 private:
  double factor_;
  std::vector<double> recent_;
};

/// Where each rank has got to, one small file per rank in RUN_DIR/ranks/ (a folder all ranks
/// share, as the checkpoints need): what a rank whose collective timed out reads to name the
/// rank that is behind. Nothing for a world of one. Never fails the run: progress is a
/// diagnostic.
class RankProgress {
 public:
  RankProgress(const std::string& run_dir, int rank, int world);
  ~RankProgress();
  RankProgress(const RankProgress&) = delete;
  RankProgress& operator=(const RankProgress&) = delete;

  /// This rank is computing step.
  void Inside(int64_t step);
  /// This rank has finished step.
  void Finished(int64_t step);
  /// "progress: rank 0 inside step 3, rank 1 after step 2; behind: rank 1".
  std::string Describe() const;

 private:
  std::string PathOf(int rank) const;
  void Write(int64_t value);

  std::string dir_;
  int world_;
  int fd_ = -1;
};

}  // namespace ddpm
