#include "run/divergence_guard.h"

#include <map>
#include <sstream>
#include <stdexcept>

namespace ddpm {

DivergenceGuard::DivergenceGuard(const TrainConfig& train, Communicator& comm)
    : train_(train), comm_(comm), spikes_(train.spike_factor) {}

void DivergenceGuard::Saw(const std::string& diverged) {
  if (diverged.empty()) return;
  if (train_.on_divergence == DivergencePolicy::kStop) {
    throw DivergedError("training diverged: " + diverged);
  }
  if (divergence_.empty()) divergence_ = diverged;
}

std::string DivergenceGuard::Cause() const {
  return divergence_.empty() ? "the loss is not finite on another rank" : divergence_;
}

std::string DivergenceGuard::Agree(int64_t step) {
  double any = divergence_.empty() ? 0 : 1;
  if (train_.on_divergence == DivergencePolicy::kRollback && comm_.world_size() > 1) {
    torch::Tensor flag = torch::tensor({any}, torch::kFloat64);
    comm_.AllReduce(flag, ReduceOp::kSum,
                    "all-reduce of divergence at step " + std::to_string(step));
    any = flag.item<double>();
  }
  if (any == 0) return "";
  return Cause();
}

Rollback DivergenceGuard::RollBack(const std::string& cause, Trainer& trainer,
                                   RunCheckpoints& checkpoints, torch::Device device) {
  const int64_t at = trainer.step();
  if (train_.on_divergence == DivergencePolicy::kStop) {
    throw DivergedError("training diverged: " + cause);
  }
  if (rollbacks_ >= train_.max_rollbacks) {
    throw DivergedError("training diverged again after " + std::to_string(rollbacks_) +
                        " rollback(s), train.max_rollbacks: " + cause);
  }
  const CheckpointDir::Loaded loaded = checkpoints.RollBackTarget(at, cause);
  const int64_t step = StepOfCheckpointPath(loaded.path);
  const std::map<std::string, torch::Tensor> state =
      StateForRank(loaded.tensors, comm_.rank(), device, train_.seed, loaded.path);
  trainer.LoadState(state, loaded.path);
  trainer.set_lr_scale(trainer.lr_scale() * train_.rollback_lr_scale);
  ++rollbacks_;
  divergence_.clear();
  std::ostringstream text;
  text << "rollback " << rollbacks_ << " of " << train_.max_rollbacks << " at step " << at << ": "
       << cause << "; restored the checkpoint of step " << step << ", skipping the data of steps "
       << step + 1 << "-" << at << "; learning rate x" << trainer.lr_scale();
  return {step, loaded.path, text.str()};
}

}  // namespace ddpm
