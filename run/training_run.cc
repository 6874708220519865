#include "run/training_run.h"

#include <torch/torch.h>

#include <algorithm>
#include <csignal>
#include <fstream>
#include <limits>
#include <sstream>
#include <utility>

#include "base/file_io.h"
#include "base/text.h"
#include "run/sampling.h"
#include "trainer/checkpoint_keys.h"
#include "trainer/device.h"
#include "trainer/image_io.h"
#include "trainer/tensor_io.h"

namespace ddpm {
namespace {

namespace keys = checkpoint_keys;

// The loader's bytes as model input in [-1, 1] on device. To a GPU the bytes travel as uint8,
// a quarter of the floats' size, from pinned memory and without making the host wait.
torch::Tensor ToModelInput(const std::vector<uint8_t>& bytes, int64_t count, int channels, int size,
                           torch::Device device) {
  torch::Tensor pixels = torch::from_blob(const_cast<uint8_t*>(bytes.data()),
                                          {count, channels, size, size}, torch::kUInt8);
  if (device.is_cuda()) pixels = pixels.pin_memory().to(device, /*non_blocking=*/true);
  return pixels.to(torch::kFloat32).div_(127.5).sub_(1.0);
}

// The lines of one section of Config::ToYaml().
std::string SectionYaml(const Config& config, const std::string& section) {
  std::istringstream in(config.ToYaml());
  std::string line, out;
  bool inside = false;
  while (std::getline(in, line)) {
    if (!line.empty() && line[0] != ' ') inside = line == section + ":";
    if (inside) out += line + "\n";
  }
  return out;
}

BatchPlan PlanOf(const Config& config, const DistributedContext& dist, int world) {
  config.Validate(world);
  if (!dist.plan) return PlanBatch(config, world);
  CheckBatchPlan(config, *dist.plan, world);
  return *dist.plan;
}

}  // namespace

TrainingRun::TrainingRun(const Config& config, const TrainOptions& options,
                         const DistributedContext& dist)
    : config_(config),
      options_(options),
      dist_(dist),
      comm_(dist.comm != nullptr ? *dist.comm : solo_),
      plan_(PlanOf(config, dist, comm_.world_size())),
      console_(comm_.rank() == 0, options.progress),
      threads_(ConfigureThreads(config.train, dist.local_ranks)),
      device_(dist.device.empty() ? ResolveDevice(config.train) : dist.device),
      fault_(FaultInjection::FromEnvironment(comm_.rank())),
      checkpoints_(config_, options_, console_, comm_, fault_),
      guard_(config_.train, comm_),
      report_(config_, options_, console_, fault_, device_, comm_.world_size()) {
  comm_.set_timeout(config_.dist.timeout());
  const std::optional<CheckpointDir::Loaded> loaded = checkpoints_.FindResumable();
  // Rank 0 records where this attempt began, unless a newer attempt already holds the run; then
  // every rank refuses together, before anything is written.
  checkpoints_.TakeFence(loaded);
  console_.Say("ddpm: resolved config\n%s", config_.ToTable().c_str());
  OpenData();
  trainer_ = std::make_unique<Trainer>(config_, device_, rank(), plan_.micro_batches);
  if (loaded) Resume(*loaded);
  JoinWorld();
  if (console_.lead()) {
    std::ofstream resolved(options_.run_dir + "/config.yaml");
    resolved << config_.ToYaml();
  }
  console_.Say(
      "ddpm: %s\nddpm: UNet with %lld parameters on %s, %d threads per rank; %s (%s); run dir "
      "%s\n",
      data_.dataset->Describe().c_str(),
      static_cast<long long>(CountParameters(*trainer_->model())), device_.str().c_str(), threads_,
      plan_.Describe().c_str(), comm_.backend().c_str(), options_.run_dir.c_str());
  StartRun(loaded.has_value());
}

TrainingRun::~TrainingRun() = default;

void TrainingRun::OpenData() {
  data_.dataset = MakeDataset(config_);
  if (config_.model.num_classes == 0) return;
  // A conditional model needs every image's class; the mapping goes beside the config.
  CheckLabels(*data_.dataset, config_.model.num_classes);
  const std::vector<std::string> names = data_.dataset->class_names();
  std::string mapping, file;
  for (std::size_t k = 0; k < names.size(); ++k) {
    mapping += (k == 0 ? "" : ", ") + std::to_string(k) + " " + names[k];
    file += std::to_string(k) + " " + names[k] + "\n";
  }
  console_.Say("ddpm: %d classes: %s; label dropout %.2f (classifier-free guidance)\n",
               config_.model.num_classes, mapping.c_str(), config_.train.label_dropout);
  if (console_.lead()) WriteFileAtomically(options_.run_dir + "/classes.txt", file);
}

void TrainingRun::StartRun(bool resumed) {
  report_.OpenMetrics(resumed);
  const int64_t step = trainer_->step();
  checkpoints_.StartWriters(step, resumed, [this](const std::string& text, bool report_now) {
    report_.Incident(text, report_now, trainer_->step(), Counters());
  });
  signals_ = std::make_unique<RunSignals>(config_.dist.timeout_seconds);
  data_.shard = DataShard::Of(plan_.global_batch, rank(), plan_.ranks);
  data_.loader =
      std::make_unique<BatchLoader>(*data_.dataset, data_.shard, config_.data.random_flip,
                                    config_.train.seed, data_.cursor, config_.data.prefetch);
  // FID and IS every eval.every steps, the bound every eval.nll_every: the network, the
  // reference and the held-out images load now, so that a missing file fails the run before
  // it trains.
  evaluations_ = std::make_unique<RunEvaluations>(config_, console_, fault_, device_);
  if (evaluations_->active()) report_.OpenEval(resumed);
  if (checkpoints_.best().active() && console_.lead()) {
    checkpoints_.best().Resume(
        resumed ? step : 0, options_.run_dir + "/eval.csv",
        [this](const std::string& line) { console_.Say("%s\n", line.c_str()); });
  }
  progress_ = std::make_unique<RankProgress>(options_.run_dir, rank(), world());
  progress_->Finished(step);
}

void TrainingRun::Resume(const CheckpointDir::Loaded& loaded) {
  const Config saved = ConfigFromCheckpoint(loaded.tensors, loaded.path);
  for (const char* section : {"model", "diffusion"}) {
    if (SectionYaml(saved, section) != SectionYaml(config_, section)) {
      throw ConfigError(loaded.path + ": the checkpoint's " + section +
                        " section differs from this config's; resume with the config it was "
                        "trained with.\ncheckpoint:\n" +
                        SectionYaml(saved, section) + "this config:\n" +
                        SectionYaml(config_, section));
    }
  }
  // Each rank continues its own dropout stream. A rank the checkpoint's world did not have
  // starts one derived from (seed, rank, step): the run is then statistically, not bitwise,
  // the one it would have been.
  const std::map<std::string, torch::Tensor> state =
      StateForRank(loaded.tensors, rank(), device_, config_.train.seed, loaded.path);
  WarnAboutResumedWorld(state, loaded.path);
  trainer_->LoadState(state, loaded.path);
  if (trainer_->timestep_sampler().uses_losses() &&
      state.find(keys::kTimestepLossHistory) == state.end()) {
    console_.Say(
        "ddpm: the checkpoint holds no timestep loss history (it was trained with "
        "train.timestep_sampler: uniform); timesteps stay uniform until %d losses per timestep "
        "are seen again\n",
        TimestepSampler::kHistory);
  }
  // The run's history (absent from checkpoints older than it).
  if (const auto it = state.find(keys::kRollbacks); it != state.end()) {
    guard_.set_rollbacks(it->second.item<int64_t>());
  }
  if (const auto it = state.find(keys::kLrScale); it != state.end()) {
    trainer_->set_lr_scale(it->second.item<double>());
  }
  if (const auto it = state.find(keys::kCheckpointFailures); it != state.end()) {
    checkpoints_.set_failures(it->second.item<int64_t>());
  }
  data_.cursor.epoch = RequireTensor(state, keys::kDataEpoch, loaded.path).item<int64_t>();
  data_.cursor.offset = RequireTensor(state, keys::kDataOffset, loaded.path).item<int64_t>();
  console_.Say("ddpm: resumed from %s at step %lld (epoch %lld, offset %lld)\n",
               loaded.path.c_str(), static_cast<long long>(trainer_->step()),
               static_cast<long long>(data_.cursor.epoch),
               static_cast<long long>(data_.cursor.offset));
}

void TrainingRun::WarnAboutResumedWorld(const std::map<std::string, torch::Tensor>& state,
                                        const std::string& path) const {
  const int64_t saved_world = RequireTensor(state, keys::kWorldSize, path).item<int64_t>();
  if (saved_world != world()) {
    console_.Say(
        "ddpm: warning: the checkpoint was written by %lld rank(s) and this run has %d; "
        "timesteps, noise and data order continue exactly, dropout is statistically "
        "equivalent, not bitwise\n",
        static_cast<long long>(saved_world), world());
  }
  const int64_t saved_threads = RequireTensor(state, keys::kThreads, path).item<int64_t>();
  if (saved_threads != threads_) {
    console_.Say(
        "ddpm: warning: the checkpoint was written with %lld threads per rank and this run "
        "uses %d; results will not be bitwise identical to an uninterrupted run\n",
        static_cast<long long>(saved_threads), threads_);
  }
}

void TrainingRun::JoinWorld() {
  if (world() > 1) {
    torch::NoGradGuard no_grad;
    std::map<std::string, torch::Tensor> state = trainer_->State();
    for (auto& [name, tensor] : state) {
      if (name.rfind(keys::kRngPrefix, 0) == 0) continue;
      comm_.Broadcast(tensor, 0, "broadcast of the initial " + name);
    }
    trainer_->LoadState(state, "rank 0's broadcast");
  }
  if (world() > 1 || dist_.make_data_parallel) {
    if (!dist_.make_data_parallel) {
      throw std::logic_error("RunTraining: a world of " + std::to_string(world()) +
                             " ranks needs DistributedContext::make_data_parallel");
    }
    ranks_ = dist_.make_data_parallel(*trainer_);
    trainer_->set_data_parallel(ranks_.get());
  }
}

ControlDecision TrainingRun::Decide() {
  ControlDecision decision = console_.lead() ? signals_->Take() : ControlDecision{};
  if (console_.lead() && checkpoints_.Superseded(false)) {
    decision = ControlDecision{};
    decision.stop = decision.abandon = decision.superseded = true;
  }
  if (console_.lead() && !decision.stop && checkpoints_.FailingTooOften()) {
    decision = ControlDecision{};
    decision.stop = decision.abandon = decision.failed = true;
  }
  if (console_.lead() && options_.poll_stop && !decision.stop) {
    const StopRequest request = options_.poll_stop();
    if (request != StopRequest::kNone) {
      decision.stop = decision.requested = true;
      decision.abandon = request == StopRequest::kAbandon;
    }
  }
  if (world() > 1) {
    torch::Tensor word = torch::tensor({decision.Encode()}, torch::kLong);
    comm_.Broadcast(
        word, 0,
        "broadcast of the control decision before step " + std::to_string(trainer_->step() + 1));
    decision = ControlDecision::Decode(word.item<int64_t>());
  }
  return decision;
}

void TrainingRun::TrainStep() {
  fault_.MaybeFail(trainer_->step() + 1);
  progress_->Inside(trainer_->step() + 1);
  const auto step_start = std::chrono::steady_clock::now();
  LoadedBatch batch = data_.loader->Next();
  torch::Tensor input = ToModelInput(batch.pixels, batch.count, data_.dataset->channels(),
                                     data_.dataset->image_size(), device_);
  if (const double scale = fault_.TakeInputScale(trainer_->step() + 1); scale != 1) {
    input.mul_(scale);
  }
  torch::Tensor labels;
  if (config_.model.num_classes > 0) {
    labels = torch::tensor(batch.labels, torch::kLong);
  }
  const StepStats stats = trainer_->Step(input, data_.shard.first, labels);
  report_.NoteSampler(trainer_->timestep_sampler().loss_aware(), trainer_->step());
  data_.cursor = batch.after;
  report_.CountStep();
  progress_->Finished(trainer_->step());
  RecordStep(stats, SecondsSince(step_start));

  const int64_t step = trainer_->step();
  if (step % config_.train.log_every == 0 || step == config_.train.steps) {
    Log(stats.lr);
  } else {
    report_.Bar(step, result_.last_metrics.loss);
  }
}

void TrainingRun::RecordStep(const StepStats& stats, double step_seconds) {
  const CommStats comm_stats = ranks_ ? ranks_->last_stats() : CommStats{};
  report_.window().Add(stats.values, comm_stats.allreduce_seconds, comm_stats.overlap_fraction);
  WorkerMetrics& m = result_.last_metrics;
  m.step = trainer_->step();
  m.rank = rank();
  m.lr = stats.lr;
  m.step_seconds = step_seconds;
  m.images_per_second = plan_.rank_batch() / std::max(m.step_seconds, 1e-9);
  m.checkpoint_stall_seconds = checkpoints_.times().stall_seconds;
  m.checkpoint_write_seconds = checkpoints_.times().write_seconds;
  m.allreduce_seconds = comm_stats.allreduce_seconds;
  m.overlap_fraction = comm_stats.overlap_fraction;
  m.exposed_seconds = comm_stats.exposed_seconds;
  if (options_.on_step) options_.on_step(m);
}

void TrainingRun::ReadPendingValues() {
  guard_.Saw(report_.window().ReadPending(trainer_->step(), rank()));
  result_.last_metrics.loss = report_.window().last_read_loss();
  result_.last_metrics.grad_norm = report_.window().last_read_grad_norm();
}

void TrainingRun::Log(double lr) {
  const int64_t step = trainer_->step();
  ReadPendingValues();  // waits for the device: the rate below counts finished steps
  report_.MeasureWindow(step, plan_.global_batch);
  // The loss over every rank's samples, the per-quartile sums and counts, and how many ranks
  // saw the loss diverge.
  constexpr int kDivergedSlot = 1 + 2 * kTimestepQuartiles;
  torch::Tensor sums = torch::empty({kDivergedSlot + 1}, torch::kFloat64);
  double* packed = sums.data_ptr<double>();
  const StepValues& values = report_.window().values();
  packed[0] = report_.window().mean_loss();
  for (int q = 0; q < kTimestepQuartiles; ++q) {
    packed[1 + q] = values.quartile_loss_sum[q];
    packed[1 + kTimestepQuartiles + q] = values.quartile_count[q];
  }
  packed[kDivergedSlot] = guard_.seen() ? 1 : 0;
  comm_.AllReduce(sums, ReduceOp::kSum, "all-reduce of the loss at step " + std::to_string(step));
  const double* summed = sums.data_ptr<double>();
  if (summed[kDivergedSlot] > 0) {
    RollBack(guard_.Cause());
    return;
  }
  result_.last_loss = summed[0] / world();
  // Every rank computes the same: the loss above is all-reduced.
  if (const std::string spike = guard_.CheckSpike(result_.last_loss, step); !spike.empty()) {
    RollBack(spike);
    return;
  }
  std::array<double, kTimestepQuartiles> loss_by_quartile{};
  for (int q = 0; q < kTimestepQuartiles; ++q) {
    const double count = summed[1 + kTimestepQuartiles + q];
    loss_by_quartile[q] =
        count > 0 ? summed[1 + q] / count : std::numeric_limits<double>::quiet_NaN();
  }
  report_.Log(step, result_.last_loss, lr, loss_by_quartile, Counters(),
              [this] { return !checkpoints_.Superseded(true); });
}

void TrainingRun::RollBack(const std::string& cause) {
  const Rollback rollback = guard_.RollBack(cause, *trainer_, checkpoints_, device_);
  // The data of the steps that diverged is skipped: the loader and the cursor go on from where
  // they are, and only the trainer went back.
  report_.RestartWindow();
  progress_->Finished(rollback.step);
  console_.Say("ddpm: %s (%s)\n", rollback.text.c_str(), rollback.path.c_str());
  report_.Incident(rollback.text, true, trainer_->step(), Counters());
}

void TrainingRun::Checkpoint() {
  // One checkpoint per step: a second request at the same step (SIGUSR1 right after a periodic
  // one) has nothing new to write.
  if (checkpoints_.SavedAt(trainer_->step())) return;
  ReadPendingValues();
  // No checkpoint of weights that diverged on any rank: roll back first.
  if (const std::string diverged = guard_.Agree(trainer_->step()); !diverged.empty()) {
    RollBack(diverged);
    return;
  }
  checkpoints_.Settle(false);  // the previous one: committed, or abandoned and counted
  const auto [replicated, own] = CheckpointState();
  checkpoints_.Save(trainer_->step(), replicated, own);
}

std::pair<std::map<std::string, torch::Tensor>, std::map<std::string, torch::Tensor>>
TrainingRun::CheckpointState() const {
  std::map<std::string, torch::Tensor> replicated = trainer_->StateViews();
  std::map<std::string, torch::Tensor> own = {{keys::kRng, replicated.at(keys::kRng)}};
  replicated.erase(keys::kRng);
  replicated[keys::kDataEpoch] = Int64Tensor(data_.cursor.epoch);
  replicated[keys::kDataOffset] = Int64Tensor(data_.cursor.offset);
  replicated[keys::kThreads] = Int64Tensor(threads_);
  replicated[keys::kConfig] = TextTensor(config_.ToYaml());
  replicated[keys::kRollbacks] = Int64Tensor(guard_.rollbacks());
  replicated[keys::kLrScale] = torch::scalar_tensor(trainer_->lr_scale(), torch::kFloat64);
  replicated[keys::kCheckpointFailures] = Int64Tensor(checkpoints_.failures());
  return {std::move(replicated), std::move(own)};
}

bool TrainingRun::FinishCheckpoint() {
  if (checkpoints_.Finish()) return true;
  result_.superseded = true;
  console_.Say("ddpm: attempt %d stopped at step %lld: a newer attempt holds %s\n",
               options_.attempt, static_cast<long long>(trainer_->step()),
               options_.run_dir.c_str());
  return false;
}

void TrainingRun::Snapshot() {
  const int64_t step = trainer_->step();
  if (checkpoints_.SnapshotAt(step)) return;
  // No snapshot of weights that diverged on any rank; a checkpoint of this very step has
  // already asked every rank.
  if (!checkpoints_.SavedAt(step)) {
    ReadPendingValues();
    if (const std::string diverged = guard_.Agree(step); !diverged.empty()) {
      RollBack(diverged);
      return;
    }
  }
  std::map<std::string, torch::Tensor> replicated = trainer_->PhemaViews();
  replicated[keys::kConfig] = TextTensor(config_.ToYaml());
  checkpoints_.SaveSnapshot(step, replicated);
}

void TrainingRun::WriteSamples(int64_t step) {
  if (console_.lead()) {
    const std::string path = options_.run_dir + "/samples/" + StepName(step) + ".png";
    const auto start = std::chrono::steady_clock::now();
    // The other ranks of this node wait idle meanwhile: rank 0 borrows their threads.
    const int node_ranks = std::max(1, dist_.local_ranks);
    if (device_.is_cpu() && node_ranks > 1) torch::set_num_threads(threads_ * node_ranks);
    // A conditional model's grid: one row per class, as many images each as fit num_images.
    const auto classes = static_cast<int>(ClassesToSample(config_).size());
    const int columns = classes == 0 ? 0 : (config_.sample.num_images + classes - 1) / classes;
    const int count = classes == 0 ? config_.sample.num_images : columns * classes;
    const torch::Tensor images =
        SampleImages(trainer_->diffusion(), trainer_->ema_model(), config_, count, count,
                     "sampling " + std::to_string(count) + " EMA images", console_.progress());
    torch::set_num_threads(threads_);
    // A superseded attempt never replaces the current attempt's grid; a failed write (a full
    // disk) never takes training down.
    bool written = false;
    if (!checkpoints_.Superseded(true)) {
      report_.Tolerate("sample grid", step, [&] {
        WriteSampleGrid(images, path, columns);
        written = true;
      });
    }
    if (written) {
      console_.Say("ddpm: wrote %s (%.1fs)\n", path.c_str(), SecondsSince(start));
      result_.sample_grids.push_back(path);
      if (options_.on_sample_grid) options_.on_sample_grid(path);
    }
  }
  // Rather than a barrier, in which MPI would spin on the cores rank 0 samples with, the other
  // ranks sleep until rank 0 says it is done.
  torch::Tensor done = torch::ones({1}, torch::kLong);
  comm_.WaitForBroadcast(done, 0, "the end of the sample grid of step " + std::to_string(step));
}

void TrainingRun::Evaluate(int64_t step, bool fid, bool nll) {
  const auto eval_start = std::chrono::steady_clock::now();
  EvalReport report =
      evaluations_->Measure(step, fid, nll, *trainer_, comm_, checkpoints_.best().select());
  if (console_.lead() && !checkpoints_.Superseded(true)) report_.EvalRow(report);
  if (checkpoints_.best().active()) UpdateBest(step, report);
  if (console_.lead() && options_.on_eval) options_.on_eval(report);
  // Evaluation is not training: keep it out of images/s, elapsed and the ETA.
  report_.ExcludeFromTraining(std::chrono::steady_clock::now() - eval_start);
}

void TrainingRun::UpdateBest(int64_t step, EvalReport& report) {
  BestKeeper& best = checkpoints_.best();
  // Rank 0 decides, so that every rank checkpoints and stops alike: 0 the evaluation did not
  // measure the score, 1 it improved, 2 it did not, 3 it did not and eval.patience is used up.
  const std::optional<double> score = SelectedScore(best.select(), report);
  torch::Tensor word = torch::zeros({1}, torch::kLong);
  if (console_.lead() && score) {
    word[0] = best.Improves(*score) ? 1 : (best.CountNoImprovement() ? 3 : 2);
  }
  comm_.Broadcast(word, 0, "broadcast of eval.select's decision at step " + std::to_string(step));
  const int64_t decision = word.item<int64_t>();
  if (decision == 1) {
    // The step's checkpoint, committed, before `best` names it.
    Checkpoint();
    if (checkpoints_.SavedAt(step)) checkpoints_.Settle(false);
    checkpoints_.PromoteBest(step, *score);
  } else if (decision >= 2 && console_.lead()) {
    const std::optional<BestStatus> status = best.Status();
    console_.Say(
        "ddpm: eval.select: step %lld's %s %s does not improve on the %s (%d in a row%s)\n",
        static_cast<long long>(step), Name(best.select()), FormatNumber(*score).c_str(),
        best.Describe().c_str(), status ? status->evaluations_since : 0,
        config_.eval.patience > 0
            ? (", eval.patience " + std::to_string(config_.eval.patience)).c_str()
            : "");
  }
  if (decision == 3) {
    result_.completed_early =
        "stopped early by eval.patience: " + std::to_string(config_.eval.patience) +
        " evaluations in a row did not improve on the best " + Name(best.select()) +
        (console_.lead() ? " (" + best.Describe() + ")" : std::string());
    console_.Say("ddpm: %s\n", result_.completed_early.c_str());
  }
  if (console_.lead()) report.best = best.Status();
}

TrainResult TrainingRun::Run() {
  report_.Start(trainer_->step());
  const int64_t total = config_.train.steps;
  ControlDecision stop;
  try {
    while (trainer_->step() < total) {
      const ControlDecision decision = Decide();
      if (decision.checkpoint) Checkpoint();
      if (decision.sample) WriteSamples(trainer_->step());
      if (decision.stop) {
        stop = decision;
        break;
      }
      TrainStep();
      const int64_t step = trainer_->step();
      const TrainConfig& t = config_.train;
      if (step != total && t.checkpoint_every > 0 && step % t.checkpoint_every == 0) Checkpoint();
      if (trainer_->step() == step && checkpoints_.SnapshotDue(step)) Snapshot();
      if (step != total && t.sample_every > 0 && step % t.sample_every == 0) WriteSamples(step);
      const bool fid = evaluations_->FidDue(step), nll = evaluations_->NllDue(step);
      if (fid || nll) Evaluate(step, fid, nll);
      if (!result_.completed_early.empty()) break;
    }
  } catch (const CommError& error) {
    // Name the rank that is behind, if the others' progress shows one.
    if (world() > 1) throw CommError(std::string(error.what()) + "; " + progress_->Describe());
    throw;
  }
  Finish(stop);
  return Result();
}

void TrainingRun::Finish(const ControlDecision& stop) {
  result_.steps = trainer_->step();
  checkpoints_.SettleSnapshot();
  if (stop.superseded) {
    // Whatever was still being written is refused by the fence; nothing else is written.
    checkpoints_.Drain();
    result_.superseded = true;
    console_.Say("ddpm: attempt %d stopped at step %lld: a newer attempt holds %s\n",
                 options_.attempt, static_cast<long long>(result_.steps), options_.run_dir.c_str());
    return;
  }
  if (stop.failed) throw CheckpointError(checkpoints_.FailureError());
  if (stop.requested) {
    result_.stopped_by = stop.abandon ? StopRequest::kAbandon : StopRequest::kStop;
  }
  if (stop.abandon) {
    if (!FinishCheckpoint()) return;
    console_.Say("ddpm: stopped at step %lld without a checkpoint, as asked\n",
                 static_cast<long long>(result_.steps));
    return;
  }
  if (stop.stop) {
    result_.interrupted_by = stop.signal;
    console_.Say("ddpm: %s at step %lld; saving a checkpoint\n",
                 stop.signal == 0 ? "asked to stop"
                                  : (stop.signal == SIGINT ? "caught SIGINT" : "caught SIGTERM"),
                 static_cast<long long>(result_.steps));
    Checkpoint();
    if (!FinishCheckpoint()) return;
    console_.Say("ddpm: stopped; continue with --resume --run-dir %s\n", options_.run_dir.c_str());
    return;
  }
  Complete();
}

void TrainingRun::Complete() {
  if (result_.steps != report_.first_step()) Checkpoint();
  if (!FinishCheckpoint()) return;
  WriteSamples(result_.steps);
  if (console_.lead() && !checkpoints_.Superseded(true)) {
    result_.ema_weights = options_.run_dir + "/ema_weights.pt";
    SaveTensors(StateDict(*trainer_->ema_model()), result_.ema_weights);
  }
  console_.Say("ddpm: trained to step %lld (%lld this run) in %s; EMA weights in %s\n",
               static_cast<long long>(result_.steps),
               static_cast<long long>(report_.steps_trained()),
               FormatDuration(report_.elapsed()).c_str(), result_.ema_weights.c_str());
}

TrainResult TrainingRun::Result() {
  result_.rollbacks = guard_.rollbacks();
  result_.checkpoint_failures = checkpoints_.failures();
  result_.checkpoint = checkpoints_.committed();
  result_.last_metrics.checkpoint_stall_seconds = checkpoints_.times().stall_seconds;
  result_.last_metrics.checkpoint_write_seconds = checkpoints_.times().write_seconds;
  return result_;
}

TrainResult RunTraining(const Config& config, const TrainOptions& options,
                        const DistributedContext& dist) {
  TrainingRun run(config, options, dist);
  return run.Run();
}

}  // namespace ddpm
