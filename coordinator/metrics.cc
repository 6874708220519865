#include "coordinator/metrics.h"

#include <prometheus/metric_family.h>

#include <limits>
#include <map>
#include <string>

#include "proto/metrics.h"

namespace ddpm {
namespace {

using prometheus::MetricFamily;
using prometheus::MetricType;

bool IsActive(v1::RunState state) {
  return state == v1::STARTING || state == v1::RUNNING || state == v1::STOPPING;
}

MetricFamily Gauge(const std::string& name, const std::string& help) {
  return MetricFamilyOf(MetricType::Gauge, name, help);
}

MetricFamily Counter(const std::string& name, const std::string& help) {
  return MetricFamilyOf(MetricType::Counter, name, help);
}

MetricFamily Histogram(const std::string& name, const std::string& help) {
  return MetricFamilyOf(MetricType::Histogram, name, help);
}

// A histogram that a rank has begun to fill.
bool Filled(const v1::Histogram& histogram) { return histogram.upper_bounds_size() > 0; }

}  // namespace

std::vector<MetricFamily> CoordinatorCollector::Collect() const {
  const std::vector<v1::Run> runs = core_.ListRuns(v1::RUN_STATE_UNSPECIFIED);
  MetricFamily state = Gauge("ddpm_run_state",
                             "Run state: 1 QUEUED, 2 STARTING, 3 RUNNING, 4 STOPPING, 5 STOPPED, "
                             "6 COMPLETED, 7 FAILED");
  MetricFamily by_state = Gauge("ddpm_runs", "Runs in each state");
  MetricFamily restarts = Gauge("ddpm_run_restarts", "Restarts a run has used");
  MetricFamily step = Gauge("ddpm_train_step", "Optimizer steps done by an active run");
  MetricFamily total = Gauge("ddpm_train_total_steps", "train.steps of an active run");
  MetricFamily loss = Gauge("ddpm_train_loss", "Mean L_simple loss over the last log interval");
  MetricFamily quartile_loss =
      Gauge("ddpm_train_loss_by_timestep_quartile",
            "Mean loss over the last log interval of the samples whose timestep falls in each "
            "quarter of [0, T) (q0 .. q3)");
  MetricFamily rate = Gauge("ddpm_train_images_per_second", "Images per second of the group");
  MetricFamily lr = Gauge("ddpm_train_learning_rate", "Learning rate of the last step");
  MetricFamily grad = Gauge("ddpm_train_grad_norm", "Global gradient norm before clipping");
  MetricFamily step_seconds = Histogram("ddpm_step_seconds", "Seconds of each step, per rank");
  MetricFamily allreduce =
      Histogram("ddpm_allreduce_seconds", "Gradient all-reduce seconds of each step, per rank");
  MetricFamily overlap = Gauge("ddpm_allreduce_overlap_ratio",
                               "Share of the last step's all-reduce hidden behind backward");
  MetricFamily stall =
      Histogram("ddpm_checkpoint_stall_seconds", "Seconds each checkpoint blocked training");
  MetricFamily write = Histogram("ddpm_checkpoint_write_seconds",
                                 "Seconds each checkpoint's background write and commit took");
  MetricFamily rollbacks = Counter("ddpm_train_rollbacks_total",
                                   "Divergence rollbacks a run has made (train.on_divergence)");
  MetricFamily checkpoint_failures =
      Counter("ddpm_checkpoint_failures_total",
              "Checkpoints of a run abandoned because they could not be written");
  MetricFamily fid = Gauge("ddpm_eval_fid", "FID of the newest evaluation");
  MetricFamily inception = Gauge("ddpm_eval_inception_score", "IS of the newest evaluation");
  MetricFamily kid = Gauge("ddpm_eval_kid",
                           "KID (unbiased MMD^2, cubic kernel) of the newest evaluation that "
                           "measured it (eval.metrics kid); may be below 0");
  MetricFamily prd = Gauge("ddpm_eval_prd",
                           "Precision and recall (k = 3), density and coverage (k = 5) of the "
                           "newest evaluation that measured them (eval.metrics prd), by score");
  MetricFamily best_score = Gauge("ddpm_eval_best_score",
                                  "The score of the checkpoint a run keeps as its best "
                                  "(eval.select), by metric, with its step");
  MetricFamily best_since =
      Gauge("ddpm_eval_best_evaluations_since",
            "Evaluations since the best that did not improve on it (eval.patience stops the run "
            "at its value)");
  MetricFamily nll = Gauge("ddpm_eval_nll_bits_per_dim",
                           "The variational bound (NLL) in bits/dim on held-out images, of the "
                           "newest evaluation that measured it");
  MetricFamily job_done = Gauge("ddpm_eval_job_images_done",
                                "Images an active evaluation job has sampled (about: rank 0's "
                                "share of the checkpoint in progress times the ranks)");
  MetricFamily job_total =
      Gauge("ddpm_eval_job_images", "Images an active evaluation job samples in all");
  MetricFamily checkpoint_fid =
      Gauge("ddpm_eval_checkpoint_fid",
            "FID of a checkpoint of run (at step) measured by evaluation job job (ddpmctl eval)");
  MetricFamily checkpoint_is =
      Gauge("ddpm_eval_checkpoint_inception_score",
            "IS of a checkpoint of run (at step) measured by evaluation job job (ddpmctl eval)");
  MetricFamily checkpoint_kid =
      Gauge("ddpm_eval_checkpoint_kid",
            "KID of a checkpoint of run (at step) measured by evaluation job job (ddpmctl eval "
            "--metrics kid)");
  std::map<v1::RunState, int> counts;
  for (int s = v1::QUEUED; s <= v1::FAILED; ++s) counts[static_cast<v1::RunState>(s)] = 0;
  for (const v1::Run& run : runs) {
    ++counts[run.state()];
    AddValue(state, {{"run", run.id()}}, run.state());
    AddValue(restarts, {{"run", run.id()}}, run.restarts());
    if (run.kind() == v1::EVALUATION) {
      // Its results stay after it ends: they are facts about the training run's checkpoints.
      for (const v1::EvalResult& result : run.evaluation().results()) {
        const MetricLabels labels = {{"run", run.evaluation().source_run()},
                                     {"job", run.id()},
                                     {"step", std::to_string(result.step())}};
        AddValue(checkpoint_fid, labels, result.fid());
        AddValue(checkpoint_is, labels, result.inception_score());
        if (result.has_kid()) AddValue(checkpoint_kid, labels, result.kid());
      }
      if (IsActive(run.state()) && run.total_steps() > 0) {
        AddValue(job_done, {{"run", run.id()}}, static_cast<double>(run.metrics().step()));
        AddValue(job_total, {{"run", run.id()}}, static_cast<double>(run.total_steps()));
      }
      continue;
    }
    AddValue(rollbacks, {{"run", run.id()}}, static_cast<double>(run.metrics().rollbacks()));
    AddValue(checkpoint_failures, {{"run", run.id()}},
             static_cast<double>(run.metrics().checkpoint_failures()));
    if (!IsActive(run.state())) continue;
    const MetricLabels labels = {{"run", run.id()}};
    AddValue(step, labels, static_cast<double>(run.metrics().step()));
    AddValue(total, labels, static_cast<double>(run.total_steps()));
    if (run.metrics().at_unix_ms() != 0) {
      AddValue(loss, labels, run.metrics().loss());
      AddValue(rate, labels, run.metrics().images_per_second());
      AddValue(lr, labels, run.metrics().lr());
      AddValue(grad, labels, run.metrics().grad_norm());
      for (int q = 0; q < run.metrics().loss_by_quartile_size(); ++q) {
        const double value = run.metrics().loss_by_quartile(q);
        // A quarter that no sample of the interval drew has no value to show.
        if (value == value) {
          AddValue(quartile_loss, {{"run", run.id()}, {"quartile", "q" + std::to_string(q)}},
                   value);
        }
      }
    }
    for (const v1::RankMetrics& rank : run.ranks()) {
      if (!Filled(rank.step_seconds_histogram())) continue;
      const MetricLabels rank_labels = {{"run", run.id()}, {"rank", std::to_string(rank.rank())}};
      AddHistogram(step_seconds, rank_labels, rank.step_seconds_histogram());
      AddHistogram(allreduce, rank_labels, rank.allreduce_seconds_histogram());
      AddValue(overlap, rank_labels, rank.overlap_fraction());
      if (rank.rank() == 0) {
        AddHistogram(stall, labels, rank.checkpoint_stall_seconds_histogram());
        AddHistogram(write, labels, rank.checkpoint_write_seconds_histogram());
      }
    }
    if (run.has_latest_eval()) {
      AddValue(fid, labels, run.latest_eval().fid());
      AddValue(inception, labels, run.latest_eval().inception_score());
      const v1::EvalResult& eval = run.latest_eval();
      if (eval.has_kid()) AddValue(kid, labels, eval.kid());
      if (eval.has_precision()) {
        for (const auto& [name, value] :
             {std::pair<const char*, double>{"precision", eval.precision()},
              {"recall", eval.recall()},
              {"density", eval.density()},
              {"coverage", eval.coverage()}}) {
          AddValue(prd, {{"run", run.id()}, {"score", name}}, value);
        }
      }
    }
    if (run.latest_nll().has_nll_bits_per_dim()) {
      AddValue(nll, labels, run.latest_nll().nll_bits_per_dim());
    }
    if (run.has_best()) {
      AddValue(best_score,
               {{"run", run.id()},
                {"metric", run.best().metric()},
                {"step", std::to_string(run.best().step())}},
               run.best().score());
      AddValue(best_since, labels, run.best().evaluations_since());
    }
  }
  for (const auto& [s, count] : counts) {
    AddValue(by_state, {{"state", v1::RunState_Name(s)}}, count);
  }

  MetricFamily up = Gauge("ddpm_worker_up", "1 for each rank of a live worker group");
  MetricFamily age = Gauge("ddpm_worker_heartbeat_age_seconds", "Seconds since a rank's heartbeat");
  MetricFamily memory = Gauge("ddpm_device_memory_bytes",
                              "Bytes in use on a rank's device at its last heartbeat (CUDA "
                              "allocator on a GPU, resident memory on the CPU)");
  for (const GroupStatus& group : core_.Groups()) {
    for (size_t rank = 0; rank < group.heartbeat_age_seconds.size(); ++rank) {
      const MetricLabels labels = {{"group", group.id}, {"rank", std::to_string(rank)}};
      AddValue(up, labels, 1);
      AddValue(age, labels, group.heartbeat_age_seconds[rank]);
      if (rank < group.device_memory_bytes.size() && group.device_memory_bytes[rank] > 0) {
        const std::string device = rank < group.devices.size() ? group.devices[rank] : "unknown";
        AddValue(memory, {{"group", group.id}, {"rank", std::to_string(rank)}, {"device", device}},
                 static_cast<double>(group.device_memory_bytes[rank]));
      }
    }
  }
  return {state,
          by_state,
          restarts,
          rollbacks,
          checkpoint_failures,
          step,
          total,
          loss,
          quartile_loss,
          rate,
          lr,
          grad,
          step_seconds,
          allreduce,
          overlap,
          stall,
          write,
          fid,
          inception,
          kid,
          prd,
          best_score,
          best_since,
          nll,
          job_done,
          job_total,
          checkpoint_fid,
          checkpoint_is,
          checkpoint_kid,
          up,
          age,
          memory};
}

RpcMetrics::RpcMetrics()
    : registry_(std::make_shared<prometheus::Registry>()),
      requests_(prometheus::BuildCounter()
                    .Name("ddpm_grpc_requests_total")
                    .Help("gRPC calls the coordinator finished, by method and status code")
                    .Register(*registry_)),
      durations_(prometheus::BuildHistogram()
                     .Name("ddpm_grpc_request_duration_seconds")
                     .Help("Seconds the coordinator took to answer each unary gRPC call")
                     .Register(*registry_)) {}

void RpcMetrics::Record(const std::string& method, const std::string& code, double seconds) {
  requests_.Add({{"method", method}, {"code", code}}).Increment();
  if (seconds >= 0) {
    durations_
        .Add({{"method", method}},
             prometheus::Histogram::BucketBoundaries{0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
                                                     0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1})
        .Observe(seconds);
  }
}

}  // namespace ddpm
