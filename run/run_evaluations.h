// A training run's evaluations of its EMA model: FID and IS (with KID and PRD where
// eval.metrics asks) every eval.every steps, and the bound on held-out images every
// eval.nll_every, over every rank.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <memory>

#include "config/config.h"
#include "eval/likelihood.h"
#include "eval/report.h"
#include "run/run_control.h"
#include "run/run_log.h"
#include "trainer/communicator.h"
#include "trainer/trainer.h"

namespace ddpm {

class RunEvaluator;

/// The evaluations one rank takes part in. The network, the reference and the held-out images
/// load at construction, so that a missing file fails the run before it trains.
class RunEvaluations {
 public:
  RunEvaluations(const Config& config, const RunConsole& console, const FaultInjection& fault,
                 torch::Device device);
  ~RunEvaluations();
  RunEvaluations(const RunEvaluations&) = delete;
  RunEvaluations& operator=(const RunEvaluations&) = delete;

  /// Whether the run evaluates at all (and so keeps eval.csv).
  bool active() const { return evaluator_ != nullptr || held_out_.data != nullptr; }
  /// Whether FID and IS, or the bound, are due at step (every interval, and the last step).
  bool FidDue(int64_t step) const;
  bool NllDue(int64_t step) const;
  /// Measures what is due at step on trainer's EMA model over every rank of comm, saying each
  /// result; a score DDPM_FAULT_EVAL_SCORES plants for select replaces the measured one.
  EvalReport Measure(int64_t step, bool fid, bool nll, Trainer& trainer, Communicator& comm,
                     EvalSelect select);

 private:
  void MeasureFid(EvalReport& report, Trainer& trainer, Communicator& comm);
  void MeasureNll(EvalReport& report, Trainer& trainer, Communicator& comm);

  const Config& config_;
  const RunConsole& console_;
  const FaultInjection& fault_;
  const torch::Device device_;
  std::unique_ptr<RunEvaluator> evaluator_;
  HeldOutImages held_out_;
};

}  // namespace ddpm
