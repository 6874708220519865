// Divergence during training (train.on_divergence): a loss that is not finite on any rank, or a
// spike of the logged loss, stops the run or rolls every rank back to the newest good
// checkpoint with a smaller learning rate.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <string>

#include "config/config.h"
#include "run/run_checkpoints.h"
#include "run/run_control.h"
#include "trainer/communicator.h"
#include "trainer/trainer.h"

namespace ddpm {

/// A rollback done: the step restored, its checkpoint, and what happened in words.
struct Rollback {
  int64_t step = 0;
  std::string path;
  std::string text;
};

/// One rank's divergence state: what it saw and has not yet agreed on with the others, the
/// rollbacks over the run's life, and the recent logged losses. Used from the training thread.
class DivergenceGuard {
 public:
  DivergenceGuard(const TrainConfig& train, Communicator& comm);

  /// This rank saw a loss that is not finite (StepWindow::ReadPending's words): thrown for
  /// train.on_divergence stop, else kept for the next agreement.
  void Saw(const std::string& diverged);
  /// Whether this rank saw a divergence not yet agreed on.
  bool seen() const { return !divergence_.empty(); }
  /// The divergence that any rank saw since the last check, agreed on by every rank (an
  /// all-reduce when rolling back in a world of more than one); "" when none did.
  std::string Agree(int64_t step);
  /// This rank's cause, or words for another rank's (once a collective said one diverged).
  std::string Cause() const;
  /// "" for a logged loss that is no spike (train.spike_factor), else the cause in words.
  std::string CheckSpike(double loss, int64_t step) { return spikes_.Check(loss, step); }
  /// Every rank at the same step: throws for train.on_divergence stop (or when no rollback is
  /// left, or no checkpoint to go back to); otherwise restores the trainer from the newest good
  /// checkpoint and scales the learning rate. The data cursor stays past the steps that
  /// diverged.
  Rollback RollBack(const std::string& cause, Trainer& trainer, RunCheckpoints& checkpoints,
                    torch::Device device);
  /// Rollbacks over the run's life (carried by the checkpoints).
  int64_t rollbacks() const { return rollbacks_; }
  void set_rollbacks(int64_t rollbacks) { rollbacks_ = rollbacks; }

 private:
  const TrainConfig& train_;
  Communicator& comm_;
  std::string divergence_;
  int64_t rollbacks_ = 0;
  LossSpikeDetector spikes_;
};

}  // namespace ddpm
