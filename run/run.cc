#include "run/run.h"

#include <torch/torch.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <sstream>

#include "base/text.h"
#include "eval/evaluation.h"
#include "run/sampling.h"
#include "run/training_run.h"
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

// The step of a checkpoint directory's path (…/step_000000040), or -1.
int64_t StepOfPath(const std::string& path) {
  const std::size_t slash = path.find_last_of('/');
  long long step = -1;
  const std::string name = slash == std::string::npos ? path : path.substr(slash + 1);
  if (std::sscanf(name.c_str(), "step_%lld", &step) != 1 || name != StepName(step)) return -1;
  return step;
}

// What DDPM_FAULT_DISK_FULL makes a write fail with.
std::string InjectedDiskFull() {
  return std::string(std::strerror(ENOSPC)) + " (injected by DDPM_FAULT_DISK_FULL)";
}

BatchPlan PlanOf(const Config& config, const DistributedContext& dist, int world) {
  config.Validate(world);
  if (!dist.plan) return PlanBatch(config, world);
  CheckBatchPlan(config, *dist.plan, world);
  return *dist.plan;
}

constexpr char kMetricsHeader[] =
    "step,loss,grad_norm,lr,images_per_second,elapsed_seconds,allreduce_seconds,"
    "overlap_fraction,loss_q0,loss_q1,loss_q2,loss_q3";
constexpr char kEvalHeader[] =
    "step,fid,inception_score,inception_score_std,num_samples,sampler,sampling_steps,"
    "eval_seconds,regularized,inception_sha256,reference_sha256,nll_bits_per_dim,"
    "nll_std_error,nll_images,nll_timesteps,nll_data,is_logits,guidance,kid,kid_std,"
    "kid_subset_size,precision,recall,density,coverage,prd_reference_count";

// A CSV field: empty for what an evaluation did not measure, quoted when it holds a comma.
template <typename T>
std::string Field(bool measured, const T& value) {
  if (!measured) return "";
  std::ostringstream out;
  out << value;
  std::string text = out.str();
  if (text.find_first_of(",\"") == std::string::npos) return text;
  std::string quoted = "\"";
  for (char c : text) quoted += c == '"' ? std::string("\"\"") : std::string(1, c);
  return quoted + "\"";
}

}  // namespace

TrainingRun::TrainingRun(const Config& config, const TrainOptions& options,
                         const DistributedContext& dist)
    : config_(config),
      options_(options),
      dist_(dist),
      comm_(dist.comm != nullptr ? *dist.comm : solo_),
      rank_(comm_.rank()),
      world_(comm_.world_size()),
      plan_(PlanOf(config, dist, world_)),
      console_(rank_ == 0, options.progress),
      threads_(ConfigureThreads(config.train, dist.local_ranks)),
      device_(dist.device.empty() ? ResolveDevice(config.train) : dist.device),
      checkpoints_(options.run_dir + "/checkpoints"),
      fence_(options.run_dir),
      attempt_(options.attempt),
      snapshots_(options.run_dir + "/phema"),
      window_(device_),
      best_(config.eval, options.run_dir + "/checkpoints") {
  comm_.set_timeout(config_.dist.timeout());
  fault_ = FaultInjection::FromEnvironment(rank_);
  spikes_ = LossSpikeDetector(config_.train.spike_factor);
  const std::optional<CheckpointDir::Loaded> loaded = FindCheckpoint();
  resumed_ = loaded.has_value();
  // Rank 0 records where this attempt began, unless a newer attempt already holds the run; then
  // every rank refuses together, before anything is written.
  int64_t refused = 0;  // 1: superseded, 2: the fence file is unusable
  std::string refusal;
  if (console_.lead()) {
    try {
      MakeDirectories(options_.run_dir);
      fence_.Began(attempt_, loaded ? StepOfPath(loaded->path) : 0);
    } catch (const FencedError& error) {
      refused = 1;
      refusal = error.what();
    } catch (const std::exception& error) {
      refused = 2;
      refusal = error.what();
    }
  }
  if (world_ > 1) {
    torch::Tensor word = torch::tensor({refused}, torch::kLong);
    comm_.Broadcast(word, 0, "broadcast of the attempt's fence");
    refused = word.item<int64_t>();
  }
  if (refused != 0 && refusal.empty()) refusal = "rank 0 could not take the run's fence";
  if (refused == 1) throw FencedError(refusal);
  if (refused == 2) throw std::runtime_error(refusal);
  if (console_.lead()) {
    MakeDirectories(options_.run_dir + "/samples");
    // Before any rank writes (they all pass the broadcasts of JoinWorld first).
    checkpoints_.RemoveTemporaries();
    snapshots_.RemoveTemporaries();
  }
  console_.Say("ddpm: resolved config\n%s", config_.ToTable().c_str());
  dataset_ = MakeDataset(config_);
  if (config_.model.num_classes > 0) {
    // A conditional model needs every image's class; the mapping goes beside the config.
    CheckLabels(*dataset_, config_.model.num_classes);
    const std::vector<std::string> names = dataset_->class_names();
    std::string mapping, file;
    for (std::size_t k = 0; k < names.size(); ++k) {
      mapping += (k == 0 ? "" : ", ") + std::to_string(k) + " " + names[k];
      file += std::to_string(k) + " " + names[k] + "\n";
    }
    console_.Say("ddpm: %d classes: %s; label dropout %.2f (classifier-free guidance)\n",
                 config_.model.num_classes, mapping.c_str(), config_.train.label_dropout);
    if (console_.lead()) WriteFileAtomically(options_.run_dir + "/classes.txt", file);
  }
  trainer_ = std::make_unique<Trainer>(config_, device_, rank_, plan_.micro_batches);
  if (loaded) Resume(*loaded);
  JoinWorld();
  if (console_.lead()) {
    std::ofstream resolved(options_.run_dir + "/config.yaml");
    resolved << config_.ToYaml();
  }
  console_.Say(
      "ddpm: %s\nddpm: UNet with %lld parameters on %s, %d threads per rank; %s (%s); run dir "
      "%s\n",
      dataset_->Describe().c_str(), static_cast<long long>(CountParameters(*trainer_->model())),
      device_.str().c_str(), threads_, plan_.Describe().c_str(), comm_.backend().c_str(),
      options_.run_dir.c_str());
  if (console_.lead()) {
    metrics_csv_ = CsvLog(options_.run_dir + "/metrics.csv", kMetricsHeader, resumed_);
  }

  // Every rank copies its share at the step boundary and writes it in the background; rank 0
  // commits, unless a newer attempt holds the run. A checkpoint waits for the one before.
  writer_ = std::make_unique<CheckpointWriter>(
      checkpoints_.dir(), rank_, world_, config_.train.keep_checkpoints,
      config_.dist.timeout_seconds, [this](std::size_t, std::size_t) {
        if (inject_disk_full_) throw CheckpointError(InjectedDiskFull());
      });
  writer_->set_fence(attempt_, [this](const std::string& what) { fence_.Check(attempt_, what); });
  if (console_.lead() && options_.on_checkpoint) {
    // Save waits for the previous checkpoint, so the times are this commit's.
    writer_->set_on_commit([writer = writer_.get(), &on_checkpoint = options_.on_checkpoint](
                               int64_t step, const std::string& dir) {
      const CheckpointTimes times = writer->times();
      on_checkpoint({step, dir, times.stall_seconds, times.write_seconds});
    });
  }
  if (config_.train.phema_snapshot_every > 0) {
    // Snapshots after the step this run starts from belong to a trajectory it will retrace
    // (or, after a rollback, leave): they are written again as it passes them.
    DropSnapshotsAfter(trainer_->step());
    snapshot_writer_ = std::make_unique<CheckpointWriter>(snapshots_.dir(), rank_, world_,
                                                          /*keep=*/0, config_.dist.timeout_seconds);
    snapshot_writer_->set_fence(attempt_,
                                [this](const std::string& what) { fence_.Check(attempt_, what); });
    last_snapshot_step_ = trainer_->step();
  }
  last_saved_step_ = resumed_ ? trainer_->step() : -1;
  first_step_ = trainer_->step();
  signals_ = std::make_unique<RunSignals>(config_.dist.timeout_seconds);
  shard_ = DataShard::Of(plan_.global_batch, rank_, plan_.ranks);
  loader_ = std::make_unique<BatchLoader>(*dataset_, shard_, config_.data.random_flip,
                                          config_.train.seed, cursor_, config_.data.prefetch);
  // FID and IS every eval.every steps, the bound every eval.nll_every: the network, the
  // reference and the held-out images load now, so that a missing file fails the run before
  // it trains.
  if (config_.eval.every > 0) evaluator_ = std::make_unique<RunEvaluator>(config_, device_);
  if (config_.eval.nll_every > 0) held_out_ = OpenHeldOut(config_);
  if ((evaluator_ || held_out_.data) && console_.lead()) {
    eval_csv_ = CsvLog(options_.run_dir + "/eval.csv", kEvalHeader, resumed_);
  }
  if (best_.active() && console_.lead()) {
    best_.Resume(resumed_ ? trainer_->step() : 0, options_.run_dir + "/eval.csv",
                 [this](const std::string& line) { console_.Say("%s\n", line.c_str()); });
  }
  progress_ = std::make_unique<RankProgress>(options_.run_dir, rank_, world_);
  progress_->Finished(trainer_->step());
}

TrainingRun::~TrainingRun() = default;

std::optional<CheckpointDir::Loaded> TrainingRun::FindCheckpoint() const {
  const auto warn = [this](const std::string& message) {
    console_.Say("ddpm: warning: %s\n", message.c_str());
  };
  if (!options_.resume_from.empty()) return LoadCheckpointAt(options_.resume_from, warn);
  const std::vector<int64_t> existing = checkpoints_.Steps();
  if (options_.resume) {
    std::optional<CheckpointDir::Loaded> loaded =
        checkpoints_.LoadLatestValid(warn, [this](const std::string& path) {
          return fence_.Stale(CheckpointAttempt(path), StepOfPath(path));
        });
    if (!loaded && !existing.empty()) {
      throw CheckpointError(checkpoints_.dir() +
                            ": no checkpoint there can be read (see the warnings above); move "
                            "them aside to start afresh");
    }
    return loaded;
  }
  if (!existing.empty()) {
    throw std::runtime_error(options_.run_dir + " already holds checkpoints (newest: step " +
                             std::to_string(existing.front()) +
                             "); pass --resume to continue that run, or choose another --run-dir");
  }
  return std::nullopt;
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
      StateForRank(loaded.tensors, rank_, device_, config_.train.seed, loaded.path);
  const int64_t saved_world = RequireTensor(state, keys::kWorldSize, loaded.path).item<int64_t>();
  if (saved_world != world_) {
    console_.Say(
        "ddpm: warning: the checkpoint was written by %lld rank(s) and this run has %d; "
        "timesteps, noise and data order continue exactly, dropout is statistically "
        "equivalent, not bitwise\n",
        static_cast<long long>(saved_world), world_);
  }
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
    rollbacks_ = it->second.item<int64_t>();
  }
  if (const auto it = state.find(keys::kLrScale); it != state.end()) {
    trainer_->set_lr_scale(it->second.item<double>());
  }
  if (const auto it = state.find(keys::kCheckpointFailures); it != state.end()) {
    checkpoint_failures_ = it->second.item<int64_t>();
  }
  cursor_.epoch = RequireTensor(state, keys::kDataEpoch, loaded.path).item<int64_t>();
  cursor_.offset = RequireTensor(state, keys::kDataOffset, loaded.path).item<int64_t>();
  const int64_t saved_threads = RequireTensor(state, keys::kThreads, loaded.path).item<int64_t>();
  if (saved_threads != threads_) {
    console_.Say(
        "ddpm: warning: the checkpoint was written with %lld threads per rank and this run "
        "uses %d; results will not be bitwise identical to an uninterrupted run\n",
        static_cast<long long>(saved_threads), threads_);
  }
  console_.Say("ddpm: resumed from %s at step %lld (epoch %lld, offset %lld)\n",
               loaded.path.c_str(), static_cast<long long>(trainer_->step()),
               static_cast<long long>(cursor_.epoch), static_cast<long long>(cursor_.offset));
}

void TrainingRun::JoinWorld() {
  if (world_ > 1) {
    torch::NoGradGuard no_grad;
    std::map<std::string, torch::Tensor> state = trainer_->State();
    for (auto& [name, tensor] : state) {
      if (name.rfind(keys::kRngPrefix, 0) == 0) continue;
      comm_.Broadcast(tensor, 0, "broadcast of the initial " + name);
    }
    trainer_->LoadState(state, "rank 0's broadcast");
    trainer_->set_communicator(&comm_);
  }
  if (world_ > 1 || dist_.make_gradient_sync) {
    if (!dist_.make_gradient_sync) {
      throw std::logic_error("RunTraining: a world of " + std::to_string(world_) +
                             " ranks needs DistributedContext::make_gradient_sync");
    }
    sync_ = dist_.make_gradient_sync(*trainer_);
    trainer_->set_gradient_sync(sync_.get());
  }
}

ControlDecision TrainingRun::Decide() {
  ControlDecision decision = console_.lead() ? signals_->Take() : ControlDecision{};
  if (console_.lead() && Superseded(false)) {
    decision = ControlDecision{};
    decision.stop = decision.abandon = decision.superseded = true;
  }
  if (console_.lead() && !decision.stop &&
      consecutive_failures_ >= config_.train.max_checkpoint_failures) {
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
  if (world_ > 1) {
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
  const auto step_start = Clock::now();
  LoadedBatch batch = loader_->Next();
  torch::Tensor input = ToModelInput(batch.pixels, batch.count, dataset_->channels(),
                                     dataset_->image_size(), device_);
  if (const double scale = fault_.TakeInputScale(trainer_->step() + 1); scale != 1) {
    input.mul_(scale);
  }
  torch::Tensor labels;
  if (config_.model.num_classes > 0) {
    labels = torch::tensor(batch.labels, torch::kLong);
  }
  const StepStats stats = trainer_->Step(input, shard_.first, labels);
  if (trainer_->timestep_sampler().loss_aware() != sampler_warm_) {
    sampler_warm_ = !sampler_warm_;
    if (sampler_warm_) {
      console_.Say(
          "ddpm: timestep sampler: every timestep has its last %d losses at step %lld; t is "
          "drawn in proportion to sqrt(E[L_t^2]) from here\n",
          TimestepSampler::kHistory, static_cast<long long>(trainer_->step()));
    }
  }
  cursor_ = batch.after;
  ++steps_trained_;
  progress_->Finished(trainer_->step());
  const CommStats comm_stats = sync_ ? sync_->last_stats() : CommStats{};
  window_.Add(stats.values, comm_stats.allreduce_seconds, comm_stats.overlap_fraction);

  WorkerMetrics& m = result_.last_metrics;
  m.step = trainer_->step();
  m.rank = rank_;
  m.lr = stats.lr;
  m.step_seconds = SecondsSince(step_start);
  m.images_per_second = plan_.rank_batch() / std::max(m.step_seconds, 1e-9);
  m.allreduce_seconds = comm_stats.allreduce_seconds;
  m.overlap_fraction = comm_stats.overlap_fraction;
  m.exposed_seconds = comm_stats.exposed_seconds;
  if (options_.on_step) options_.on_step(m);

  const int64_t step = trainer_->step();
  const int64_t total = config_.train.steps;
  if (step % config_.train.log_every == 0 || step == total) {
    Log(stats.lr);
  } else {
    console_.ProgressBar(step, total, m.loss, last_rate_,
                         SecondsSince(start_) / steps_trained_ * (total - step));
  }
}

void TrainingRun::ReadPendingValues() {
  const std::string diverged = window_.ReadPending(trainer_->step(), rank_);
  if (!diverged.empty()) {
    if (config_.train.on_divergence == DivergencePolicy::kStop) {
      throw std::runtime_error("training diverged: " + diverged);
    }
    if (divergence_.empty()) divergence_ = diverged;
  }
  result_.last_metrics.loss = window_.last_read_loss();
  result_.last_metrics.grad_norm = window_.last_read_grad_norm();
}

void TrainingRun::Log(double lr) {
  const int64_t step = trainer_->step();
  const int64_t total = config_.train.steps;
  ReadPendingValues();  // waits for the device: the rate below counts finished steps
  const double elapsed = SecondsSince(start_);
  const double eta = elapsed / static_cast<double>(std::max<int64_t>(steps_trained_, 1)) *
                     static_cast<double>(total - step);
  last_rate_ = window_.steps() * plan_.global_batch / std::max(SecondsSince(window_start_), 1e-9);
  // The loss over every rank's samples, the per-quartile sums and counts, and how many ranks
  // saw the loss diverge.
  constexpr int kDivergedSlot = 1 + 2 * kTimestepQuartiles;
  torch::Tensor sums = torch::empty({kDivergedSlot + 1}, torch::kFloat64);
  double* packed = sums.data_ptr<double>();
  const StepValues& values = window_.values();
  packed[0] = window_.mean_loss();
  for (int q = 0; q < kTimestepQuartiles; ++q) {
    packed[1 + q] = values.quartile_loss_sum[q];
    packed[1 + kTimestepQuartiles + q] = values.quartile_count[q];
  }
  packed[kDivergedSlot] = divergence_.empty() ? 0 : 1;
  comm_.AllReduce(sums, ReduceOp::kSum, "all-reduce of the loss at step " + std::to_string(step));
  const double* summed = sums.data_ptr<double>();
  if (summed[kDivergedSlot] > 0) {
    RollBack(divergence_.empty() ? "the loss is not finite on another rank" : divergence_);
    return;
  }
  result_.last_loss = summed[0] / world_;
  // Every rank computes the same: the loss above is all-reduced.
  if (const std::string spike = spikes_.Check(result_.last_loss, step); !spike.empty()) {
    RollBack(spike);
    return;
  }
  std::array<double, kTimestepQuartiles> loss_by_quartile{};
  std::array<std::string, kTimestepQuartiles> quartile_fields;
  for (int q = 0; q < kTimestepQuartiles; ++q) {
    const double count = summed[1 + kTimestepQuartiles + q];
    loss_by_quartile[q] =
        count > 0 ? summed[1 + q] / count : std::numeric_limits<double>::quiet_NaN();
    if (count > 0) {
      std::ostringstream field;
      field << loss_by_quartile[q];
      quartile_fields[q] = field.str();
    }
  }
  std::string comm_text;
  if (world_ > 1) {
    char text[96];
    std::snprintf(text, sizeof(text), " | all-reduce %.1f ms, %.0f%% hidden",
                  1000 * window_.mean_allreduce_seconds(), 100 * window_.mean_overlap());
    comm_text = text;
  }
  console_.Progress(
      "step %lld/%lld | loss %.4f | grad %.3f | lr %.2e | %.1f img/s%s | elapsed %s | eta %s\n",
      static_cast<long long>(step), static_cast<long long>(total), result_.last_loss,
      window_.mean_grad_norm(), lr, last_rate_, comm_text.c_str(), FormatDuration(elapsed).c_str(),
      FormatDuration(eta).c_str());
  if (console_.lead() && options_.on_log) {
    LogMetrics log;
    log.step = step;
    log.total_steps = total;
    log.loss = result_.last_loss;
    log.grad_norm = window_.mean_grad_norm();
    log.lr = lr;
    log.images_per_second = last_rate_;
    log.elapsed_seconds = elapsed;
    log.eta_seconds = eta;
    log.loss_by_quartile = loss_by_quartile;
    log.rollbacks = rollbacks_;
    log.checkpoint_failures = checkpoint_failures_;
    log.last_incident = last_incident_;
    last_log_ = log;
    options_.on_log(log);
  }
  // A superseded attempt never adds to the current attempt's metrics.csv.
  if (console_.lead() && !Superseded(true)) {
    Tolerate("metrics.csv row", step, [&] {
      metrics_csv_.Row(step, result_.last_loss, window_.mean_grad_norm(), lr, last_rate_, elapsed,
                       window_.mean_allreduce_seconds(), window_.mean_overlap(), quartile_fields[0],
                       quartile_fields[1], quartile_fields[2], quartile_fields[3]);
    });
  }
  window_.Reset();
  window_start_ = Clock::now();
}

void TrainingRun::Checkpoint() {
  // One checkpoint per step: a second request at the same step (SIGUSR1 right after a periodic
  // one) has nothing new to write.
  if (trainer_->step() == last_saved_step_) return;
  ReadPendingValues();
  // No checkpoint of weights that diverged on any rank: roll back first.
  if (const std::string diverged = AgreeOnDivergence(); !diverged.empty()) {
    RollBack(diverged);
    return;
  }
  SettleCheckpoint(false);  // the previous one: committed, or abandoned and counted
  last_saved_step_ = trainer_->step();
  std::map<std::string, torch::Tensor> replicated = trainer_->StateViews();
  std::map<std::string, torch::Tensor> own = {{keys::kRng, replicated.at(keys::kRng)}};
  replicated.erase(keys::kRng);
  replicated[keys::kDataEpoch] = Int64Tensor(cursor_.epoch);
  replicated[keys::kDataOffset] = Int64Tensor(cursor_.offset);
  replicated[keys::kThreads] = Int64Tensor(threads_);
  replicated[keys::kConfig] = TextTensor(config_.ToYaml());
  replicated[keys::kRollbacks] = Int64Tensor(rollbacks_);
  replicated[keys::kLrScale] = torch::scalar_tensor(trainer_->lr_scale(), torch::kFloat64);
  replicated[keys::kCheckpointFailures] = Int64Tensor(checkpoint_failures_);
  inject_disk_full_ = fault_.DiskFull(trainer_->step());
  writer_->Save(trainer_->step(), replicated, own);
  // write_seconds is now the previous checkpoint's (0 before the first has been written).
  const CheckpointTimes times = writer_->times();
  result_.last_metrics.checkpoint_stall_seconds = times.stall_seconds;
  result_.last_metrics.checkpoint_write_seconds = times.write_seconds;
  const std::string previous =
      times.write_seconds > 0
          ? " (the previous one took " + FormatSeconds(times.write_seconds, 2) + ")"
          : "";
  console_.Say(
      "ddpm: checkpoint of step %lld: training resumed after %.2fs, writing in the "
      "background%s\n",
      static_cast<long long>(trainer_->step()), times.stall_seconds, previous.c_str());
}

void TrainingRun::Snapshot() {
  if (trainer_->step() == last_snapshot_step_) return;
  // No snapshot of weights that diverged on any rank; a checkpoint of this very step has
  // already asked every rank.
  if (trainer_->step() != last_saved_step_) {
    ReadPendingValues();
    if (const std::string diverged = AgreeOnDivergence(); !diverged.empty()) {
      RollBack(diverged);
      return;
    }
  }
  SettleSnapshot();
  last_snapshot_step_ = trainer_->step();
  std::map<std::string, torch::Tensor> replicated = trainer_->PhemaViews();
  replicated[keys::kConfig] = TextTensor(config_.ToYaml());
  snapshot_writer_->Save(trainer_->step(), replicated, {});
}

void TrainingRun::SettleSnapshot() {
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
      last_incident_ = std::string("post-hoc EMA snapshot failed: ") + error.what();
      console_.Say(
          "ddpm: warning: a post-hoc EMA snapshot could not be written and was abandoned (%s); "
          "the other snapshots are untouched and training goes on\n",
          error.what());
    } else {
      std::fprintf(stderr,
                   "ddpm: rank %d: warning: its shard of a post-hoc EMA snapshot failed: %s\n",
                   rank_, error.what());
    }
  }
}

void TrainingRun::DropSnapshotsAfter(int64_t step) {
  if (!console_.lead()) return;
  if (const int removed = snapshots_.RemoveAfter(step); removed > 0) {
    console_.Say(
        "ddpm: removed %d post-hoc EMA snapshot(s) after step %lld, which this run "
        "writes again from its own trajectory\n",
        removed, static_cast<long long>(step));
  }
}

void TrainingRun::SettleCheckpoint(bool strict) {
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
      std::fprintf(stderr, "ddpm: rank %d: warning: its shard of a checkpoint failed: %s\n", rank_,
                   error.what());
      return;
    }
    ++checkpoint_failures_;
    ++consecutive_failures_;
    checkpoint_error_ = error.what();
    last_incident_ = "checkpoint failed: " + checkpoint_error_;
    console_.Say(
        "ddpm: warning: a checkpoint could not be written and was abandoned (%s); `latest` and "
        "the older checkpoints are untouched; training goes on (%d in a row; the run stops at "
        "%d, train.max_checkpoint_failures)\n",
        error.what(), consecutive_failures_, config_.train.max_checkpoint_failures);
    ReportIncidents();
    return;
  }
  result_.last_metrics.checkpoint_write_seconds = writer_->times().write_seconds;
  if (console_.lead() && !committed.empty() && committed != result_.checkpoint) {
    result_.checkpoint = committed;
    consecutive_failures_ = 0;
    console_.Say("ddpm: checkpoint %s committed (written in %.2fs)\n", committed.c_str(),
                 writer_->times().write_seconds);
  }
}

bool TrainingRun::FinishCheckpoint() {
  // Only rank 0 commits, so only it can see that the fence refused the commit: it tells all.
  int64_t fenced = 0;
  try {
    SettleCheckpoint(true);
  } catch (const FencedError&) {
    fenced = 1;
  }
  if (world_ > 1) {
    torch::Tensor word = torch::tensor({fenced}, torch::kLong);
    comm_.Broadcast(word, 0, "broadcast of the last checkpoint's fence");
    fenced = word.item<int64_t>();
  }
  if (fenced != 0) {
    result_.superseded = true;
    console_.Say("ddpm: attempt %d stopped at step %lld: a newer attempt holds %s\n", attempt_,
                 static_cast<long long>(trainer_->step()), options_.run_dir.c_str());
  }
  return fenced == 0;
}

template <typename Write>
void TrainingRun::Tolerate(const char* what, int64_t step, Write&& write) {
  try {
    if (fault_.DiskFull(step)) throw std::runtime_error(InjectedDiskFull());
    write();
  } catch (const std::exception& error) {
    console_.Say("ddpm: warning: the %s of step %lld could not be written (%s); training goes on\n",
                 what, static_cast<long long>(step), error.what());
  }
}

bool TrainingRun::Superseded(bool now) {
  if (attempt_ == 0 || superseded_) return superseded_;
  if (!now && std::chrono::duration<double>(Clock::now() - fence_read_).count() <
                  options_.fence_check_seconds) {
    return false;
  }
  fence_read_ = Clock::now();
  try {
    superseded_ = fence_.Current() > attempt_;
  } catch (const std::exception& error) {
    console_.Say("ddpm: warning: %s; carrying on as attempt %d\n", error.what(), attempt_);
  }
  if (superseded_) {
    console_.Say(
        "ddpm: attempt %d of this run has been superseded by attempt %d (%s); this "
        "group stops and writes nothing more into %s\n",
        attempt_, fence_.Current(), fence_.path().c_str(), options_.run_dir.c_str());
  }
  return superseded_;
}

std::string TrainingRun::AgreeOnDivergence() {
  double any = divergence_.empty() ? 0 : 1;
  if (config_.train.on_divergence == DivergencePolicy::kRollback && world_ > 1) {
    torch::Tensor flag = torch::tensor({any}, torch::kFloat64);
    comm_.AllReduce(flag, ReduceOp::kSum,
                    "all-reduce of divergence at step " + std::to_string(trainer_->step()));
    any = flag.item<double>();
  }
  if (any == 0) return "";
  return divergence_.empty() ? "the loss is not finite on another rank" : divergence_;
}

void TrainingRun::RollBack(const std::string& cause) {
  const int64_t at = trainer_->step();
  const TrainConfig& t = config_.train;
  if (t.on_divergence == DivergencePolicy::kStop) {
    throw std::runtime_error("training diverged: " + cause);
  }
  if (rollbacks_ >= t.max_rollbacks) {
    throw std::runtime_error("training diverged again after " + std::to_string(rollbacks_) +
                             " rollback(s), train.max_rollbacks: " + cause);
  }
  // The pending checkpoint first (its weights were good): committed, or abandoned.
  SettleCheckpoint(false);
  // Rank 0 picks the newest checkpoint that reads and verifies; every rank loads that one.
  std::optional<CheckpointDir::Loaded> loaded;
  int64_t step = -1;
  if (console_.lead()) {
    loaded = checkpoints_.LoadLatestValid(
        [this](const std::string& message) {
          console_.Say("ddpm: warning: %s\n", message.c_str());
        },
        [this](const std::string& path) {
          return fence_.Stale(CheckpointAttempt(path), StepOfPath(path));
        });
    if (loaded) step = StepOfPath(loaded->path);
  }
  if (world_ > 1) {
    torch::Tensor word = torch::tensor({step}, torch::kLong);
    comm_.Broadcast(word, 0,
                    "broadcast of the rollback's checkpoint at step " + std::to_string(at));
    step = word.item<int64_t>();
  }
  if (step < 0 || step >= at) {
    throw std::runtime_error("training diverged (" + cause +
                             ") and there is no checkpoint before step " + std::to_string(at) +
                             " in " + checkpoints_.dir() +
                             " to roll back to; train.on_divergence: rollback needs one");
  }
  if (!loaded)
    loaded = CheckpointDir::Loaded{checkpoints_.PathFor(step),
                                   ReadCheckpoint(checkpoints_.PathFor(step))};
  const std::map<std::string, torch::Tensor> state =
      StateForRank(loaded->tensors, rank_, device_, t.seed, loaded->path);
  trainer_->LoadState(state, loaded->path);
  if (snapshot_writer_) {
    SettleSnapshot();
    DropSnapshotsAfter(step);
    last_snapshot_step_ = step;
  }
  trainer_->set_lr_scale(trainer_->lr_scale() * t.rollback_lr_scale);
  ++rollbacks_;
  // The data of the steps that diverged is skipped: the loader and cursor_ go on from where
  // they are, and only the trainer went back.
  window_.DropPending();
  window_.Reset();
  window_start_ = Clock::now();
  divergence_.clear();
  last_saved_step_ = step;
  progress_->Finished(step);
  std::ostringstream text;
  text << "rollback " << rollbacks_ << " of " << t.max_rollbacks << " at step " << at << ": "
       << cause << "; restored the checkpoint of step " << step << ", skipping the data of steps "
       << step + 1 << "-" << at << "; learning rate x" << trainer_->lr_scale();
  last_incident_ = text.str();
  console_.Say("ddpm: %s (%s)\n", last_incident_.c_str(), loaded->path.c_str());
  ReportIncidents();
}

void TrainingRun::ReportIncidents() {
  result_.rollbacks = rollbacks_;
  result_.checkpoint_failures = checkpoint_failures_;
  if (!console_.lead() || !options_.on_log) return;
  LogMetrics log = last_log_;
  log.step = trainer_->step();
  log.total_steps = config_.train.steps;
  log.rollbacks = rollbacks_;
  log.checkpoint_failures = checkpoint_failures_;
  log.last_incident = last_incident_;
  options_.on_log(log);
}

void TrainingRun::WriteSamples(int64_t step) {
  if (console_.lead()) {
    const std::string path = options_.run_dir + "/samples/" + StepName(step) + ".png";
    const auto start = Clock::now();
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
    if (!Superseded(true)) {
      Tolerate("sample grid", step, [&] {
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
  const auto eval_start = Clock::now();
  EvalReport report;
  report.step = step;
  if (fid) {
    console_.Say("ddpm: evaluating FID and IS of %lld EMA samples at step %lld\n",
                 static_cast<long long>(config_.eval.num_samples), static_cast<long long>(step));
    int64_t reported = 0;
    report = evaluator_->Evaluate(
        trainer_->diffusion(), trainer_->ema_model(), comm_, step,
        [&](int64_t done, int64_t share) {
          if (done * 10 / share > reported * 10 / share || done == share) {
            console_.Progress("ddpm: eval: rank 0 has %lld/%lld of its samples (%.0fs)\n",
                              static_cast<long long>(done), static_cast<long long>(share),
                              SecondsSince(eval_start));
          }
          reported = done;
        });
    console_.Say(
        "ddpm: eval at step %lld: FID %.4f, IS %.4f +- %.4f (%s logits; %lld samples%s, %s %d "
        "steps, %.1fs%s; Inception sha256 %.12s, reference sha256 %.12s)\n",
        static_cast<long long>(step), report.fid, report.inception_score,
        report.inception_score_std, report.is_logits.c_str(),
        static_cast<long long>(report.num_samples),
        report.guided ? (", class-balanced, guidance " + FormatNumber(report.guidance)).c_str()
                      : "",
        report.sampler.c_str(), report.sampling_steps, SecondsSince(eval_start),
        report.regularized ? "; covariances regularized with eps" : "",
        report.inception_sha256.c_str(), report.reference_sha256.c_str());
    std::istringstream scores(DescribeKidAndPrd(report));
    for (std::string line; std::getline(scores, line);) {
      console_.Say("ddpm: eval at step %lld: %s\n", static_cast<long long>(step), line.c_str());
    }
  }
  if (nll) {
    const auto nll_start = Clock::now();
    const EvalConfig& e = config_.eval;
    console_.Say("ddpm: evaluating the bound of the EMA model on %lld %s images at step %lld\n",
                 static_cast<long long>(e.nll_images), held_out_.description.c_str(),
                 static_cast<long long>(step));
    BoundOptions options;
    options.num_images = e.nll_images;
    options.num_timesteps = e.nll_timesteps;
    options.variance = config_.sample.variance;
    options.seed = e.seed;
    options.batch_size = e.batch_size;
    int64_t reported = 0;
    const BoundReport bound = MeasureBound(
        trainer_->diffusion(), trainer_->ema_model(), *held_out_.data, options, comm_, device_,
        [&](int64_t done, int64_t share) {
          if (done * 10 / share > reported * 10 / share || done == share) {
            console_.Progress(
                "ddpm: eval: rank 0 has %lld/%lld of its image-timesteps of the bound (%.0fs)\n",
                static_cast<long long>(done), static_cast<long long>(share),
                SecondsSince(nll_start));
          }
          reported = done;
        });
    report.has_nll = true;
    report.nll_bits_per_dim = bound.total_mean;
    report.nll_std_error = bound.total_std_error;
    report.nll_images = bound.images;
    report.nll_data = held_out_.description;
    report.nll_timesteps = static_cast<int>(bound.timesteps.size());
    report.nll_timesteps_total = bound.timesteps_in_all;
    console_.Say(
        "ddpm: eval at step %lld: NLL %.4f +- %.4f bits/dim (%lld %s images, %s %d timesteps, "
        "%.1fs)\n",
        static_cast<long long>(step), report.nll_bits_per_dim, report.nll_std_error,
        static_cast<long long>(report.nll_images), report.nll_data.c_str(),
        bound.full() ? "all" : "a stratified estimate from", report.nll_timesteps,
        SecondsSince(nll_start));
  }
  report.seconds = SecondsSince(eval_start);
  if (const std::optional<double> planted = fault_.PlantedScore(step);
      planted && best_.active() && SelectedScore(best_.select(), report)) {
    console_.Say("ddpm: DDPM_FAULT_EVAL_SCORES: step %lld's %s planted as %s\n",
                 static_cast<long long>(step), Name(best_.select()),
                 FormatNumber(*planted).c_str());
    (best_.select() == EvalSelect::kFid   ? report.fid
     : best_.select() == EvalSelect::kKid ? report.kid
                                          : report.nll_bits_per_dim) = *planted;
  }
  if (console_.lead() && !Superseded(true)) {
    Tolerate("eval.csv row", step, [&] {
      const bool f = report.has_fid(), n = report.has_nll;
      eval_csv_.Row(step, Field(f, report.fid), Field(f, report.inception_score),
                    Field(f, report.inception_score_std), Field(f, report.num_samples),
                    Field(f, report.sampler), Field(f, report.sampling_steps), report.seconds,
                    Field(f, report.regularized), Field(f, report.inception_sha256),
                    Field(f, report.reference_sha256), Field(n, report.nll_bits_per_dim),
                    Field(n, report.nll_std_error), Field(n, report.nll_images),
                    Field(n, report.nll_timesteps), Field(n, report.nll_data),
                    Field(f, report.is_logits), Field(f && report.guided, report.guidance),
                    Field(report.has_kid, report.kid), Field(report.has_kid, report.kid_std),
                    Field(report.has_kid, report.kid_subset_size),
                    Field(report.has_prd, report.precision), Field(report.has_prd, report.recall),
                    Field(report.has_prd, report.density), Field(report.has_prd, report.coverage),
                    Field(report.has_prd, report.prd_reference_count));
    });
  }
  if (best_.active()) UpdateBest(step, report);
  if (console_.lead() && options_.on_eval) options_.on_eval(report);
  // Evaluation is not training: keep it out of images/s, elapsed and the ETA.
  const auto spent = Clock::now() - eval_start;
  start_ += spent;
  window_start_ += spent;
}

void TrainingRun::UpdateBest(int64_t step, EvalReport& report) {
  // Rank 0 decides, so that every rank checkpoints and stops alike: 0 the evaluation did not
  // measure the score, 1 it improved, 2 it did not, 3 it did not and eval.patience is used up.
  const std::optional<double> score = SelectedScore(best_.select(), report);
  torch::Tensor word = torch::zeros({1}, torch::kLong);
  if (console_.lead() && score) {
    word[0] = best_.Improves(*score) ? 1 : (best_.CountNoImprovement() ? 3 : 2);
  }
  comm_.Broadcast(word, 0, "broadcast of eval.select's decision at step " + std::to_string(step));
  const int64_t decision = word.item<int64_t>();
  if (decision == 1) {
    // The step's checkpoint, committed, before `best` names it.
    Checkpoint();
    if (last_saved_step_ == step) SettleCheckpoint(false);
    if (console_.lead()) {
      const std::string path = checkpoints_.PathFor(step);
      if (last_saved_step_ != step || result_.checkpoint != path) {
        console_.Say(
            "ddpm: eval.select: step %lld's %s %s is the best, but its checkpoint was not "
            "committed; `best` stays (%s)\n",
            static_cast<long long>(step), Name(best_.select()), FormatNumber(*score).c_str(),
            best_.Describe().c_str());
      } else {
        if (fault_.KillBeforeBest(step)) {
          console_.Say("ddpm: DDPM_FAULT_KILL_BEFORE_BEST: killed before `best` moves to %s\n",
                       path.c_str());
          std::raise(SIGKILL);
        }
        const std::string before = best_.Describe();
        try {
          best_.Move(step, *score,
                     [this](const std::string& what) { fence_.Check(attempt_, what); });
          console_.Say("ddpm: eval.select: %s (was: %s); %s/best -> %s\n", best_.Describe().c_str(),
                       before.c_str(), checkpoints_.dir().c_str(), StepName(step).c_str());
        } catch (const FencedError& error) {
          console_.Say("ddpm: %s\n", error.what());
          superseded_ = true;
        }
      }
    }
  } else if (decision >= 2 && console_.lead()) {
    const std::optional<BestStatus> status = best_.Status();
    console_.Say(
        "ddpm: eval.select: step %lld's %s %s does not improve on the %s (%d in a row%s)\n",
        static_cast<long long>(step), Name(best_.select()), FormatNumber(*score).c_str(),
        best_.Describe().c_str(), status ? status->evaluations_since : 0,
        config_.eval.patience > 0
            ? (", eval.patience " + std::to_string(config_.eval.patience)).c_str()
            : "");
  }
  if (decision == 3) {
    completed_early_ = "stopped early by eval.patience: " + std::to_string(config_.eval.patience) +
                       " evaluations in a row did not improve on the best " + Name(best_.select()) +
                       (console_.lead() ? " (" + best_.Describe() + ")" : std::string());
    console_.Say("ddpm: %s\n", completed_early_.c_str());
  }
  if (console_.lead()) report.best = best_.Status();
}

TrainResult TrainingRun::Run() {
  start_ = window_start_ = Clock::now();
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
      if (snapshot_writer_ && trainer_->step() == step &&
          (step % t.phema_snapshot_every == 0 || step == total)) {
        Snapshot();
      }
      if (step != total && t.sample_every > 0 && step % t.sample_every == 0) WriteSamples(step);
      const EvalConfig& e = config_.eval;
      const bool fid = evaluator_ && (step % e.every == 0 || step == total);
      const bool nll = held_out_.data && (step % e.nll_every == 0 || step == total);
      if (fid || nll) Evaluate(step, fid, nll);
      if (!completed_early_.empty()) break;
    }
  } catch (const CommError& error) {
    // Name the rank that is behind, if the others' progress shows one.
    if (world_ > 1) throw CommError(std::string(error.what()) + "; " + progress_->Describe());
    throw;
  }
  return Finish(stop);
}

TrainResult TrainingRun::Finish(const ControlDecision& stop) {
  result_.steps = trainer_->step();
  result_.rollbacks = rollbacks_;
  result_.checkpoint_failures = checkpoint_failures_;
  SettleSnapshot();
  if (stop.superseded) {
    // Whatever was still being written is refused by the fence; nothing else is written.
    try {
      writer_->Wait();
    } catch (const std::exception& error) {
      console_.Say("ddpm: the last checkpoint of this attempt was not committed: %s\n",
                   error.what());
    }
    result_.superseded = true;
    console_.Say("ddpm: attempt %d stopped at step %lld: a newer attempt holds %s\n", attempt_,
                 static_cast<long long>(result_.steps), options_.run_dir.c_str());
    return result_;
  }
  if (stop.failed) {
    throw CheckpointError(
        console_.lead()
            ? std::to_string(consecutive_failures_) +
                  " checkpoints in a row could not be written (train.max_checkpoint_failures); "
                  "the last error: " +
                  checkpoint_error_
            : std::string("rank 0 stopped the run: its checkpoints kept failing to write"));
  }
  if (stop.requested) {
    result_.stopped_by = stop.abandon ? StopRequest::kAbandon : StopRequest::kStop;
  }
  if (stop.abandon) {
    if (!FinishCheckpoint()) return result_;
    console_.Say("ddpm: stopped at step %lld without a checkpoint, as asked\n",
                 static_cast<long long>(result_.steps));
    return result_;
  }
  if (stop.stop) {
    result_.interrupted_by = stop.signal;
    console_.Say("ddpm: %s at step %lld; saving a checkpoint\n",
                 stop.signal == 0 ? "asked to stop"
                                  : (stop.signal == SIGINT ? "caught SIGINT" : "caught SIGTERM"),
                 static_cast<long long>(result_.steps));
    Checkpoint();
    if (!FinishCheckpoint()) return result_;
    console_.Say("ddpm: stopped; continue with --resume --run-dir %s\n", options_.run_dir.c_str());
    return result_;
  }
  result_.completed_early = completed_early_;
  if (result_.steps != first_step_) Checkpoint();
  if (!FinishCheckpoint()) return result_;
  WriteSamples(result_.steps);
  if (console_.lead() && !Superseded(true)) {
    result_.ema_weights = options_.run_dir + "/ema_weights.pt";
    SaveTensors(StateDict(*trainer_->ema_model()), result_.ema_weights);
  }
  console_.Say("ddpm: trained to step %lld (%lld this run) in %s; EMA weights in %s\n",
               static_cast<long long>(result_.steps), static_cast<long long>(steps_trained_),
               FormatDuration(SecondsSince(start_)).c_str(), result_.ema_weights.c_str());
  return result_;
}

TrainResult RunTraining(const Config& config, const TrainOptions& options,
                        const DistributedContext& dist) {
  TrainingRun run(config, options, dist);
  return run.Run();
}

}  // namespace ddpm
