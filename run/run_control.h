// What steers a running training run from outside its step: the signals (stop, checkpoint,
// sample), the control word rank 0 broadcasts at every step boundary so that every rank acts
// on the same step, the fault-injection hook of the tests, and the per-rank progress files
// that name a stuck rank. Torch-free.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

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

/// A test hook: DDPM_FAULT_INJECT="rank=R,step=S[,hang]" makes rank R throw (or hang) before
/// step S, to check that one failing rank ends the whole job.
class FaultInjection {
 public:
  /// Reads DDPM_FAULT_INJECT for rank; throws std::invalid_argument when it is malformed.
  static FaultInjection FromEnvironment(int rank);
  /// Throws (or hangs) when next_step is the injected one.
  void MaybeFail(int64_t next_step) const;

 private:
  int64_t step_ = -1;
  bool hang_ = false;
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
