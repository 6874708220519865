#include "coordinator/metrics.h"

#include <prometheus/metric_family.h>

#include <map>
#include <string>

namespace ddpm {
namespace {

using prometheus::ClientMetric;
using prometheus::MetricFamily;

MetricFamily Gauge(const std::string& name, const std::string& help) {
  MetricFamily family;
  family.name = name;
  family.help = help;
  family.type = prometheus::MetricType::Gauge;
  return family;
}

void Add(MetricFamily& family, std::vector<ClientMetric::Label> labels, double value) {
  ClientMetric& metric = family.metric.emplace_back();
  metric.label = std::move(labels);
  metric.gauge.value = value;
}

bool IsActive(v1::RunState state) {
  return state == v1::STARTING || state == v1::RUNNING || state == v1::STOPPING;
}

}  // namespace

std::vector<MetricFamily> CoordinatorCollector::Collect() const {
  const std::vector<v1::Run> runs = core_.ListRuns(v1::RUN_STATE_UNSPECIFIED);
  MetricFamily state = Gauge("ddpm_run_state",
                             "Run state: 1 QUEUED, 2 STARTING, 3 RUNNING, 4 STOPPING, 5 STOPPED, "
                             "6 COMPLETED, 7 FAILED");
  MetricFamily by_state = Gauge("ddpm_runs", "Runs in each state");
  MetricFamily step = Gauge("ddpm_train_step", "Optimizer steps done by an active run");
  MetricFamily total = Gauge("ddpm_train_total_steps", "train.steps of an active run");
  MetricFamily loss = Gauge("ddpm_train_loss", "Mean L_simple loss over the last log interval");
  MetricFamily rate = Gauge("ddpm_train_images_per_second", "Images per second of the group");
  MetricFamily lr = Gauge("ddpm_train_learning_rate", "Learning rate of the last step");
  MetricFamily grad = Gauge("ddpm_train_grad_norm", "Global gradient norm before clipping");
  MetricFamily fid = Gauge("ddpm_eval_fid", "FID of the newest evaluation");
  MetricFamily inception = Gauge("ddpm_eval_inception_score", "IS of the newest evaluation");
  MetricFamily restarts = Gauge("ddpm_run_restarts", "Restarts a run has used");
  std::map<v1::RunState, int> counts;
  for (int s = v1::QUEUED; s <= v1::FAILED; ++s) counts[static_cast<v1::RunState>(s)] = 0;
  for (const v1::Run& run : runs) {
    ++counts[run.state()];
    Add(state, {{"run", run.id()}}, run.state());
    Add(restarts, {{"run", run.id()}}, run.restarts());
    if (!IsActive(run.state())) continue;
    const std::vector<ClientMetric::Label> labels = {{"run", run.id()}};
    Add(step, labels, static_cast<double>(run.metrics().step()));
    Add(total, labels, static_cast<double>(run.total_steps()));
    if (run.metrics().at_unix_ms() != 0) {
      Add(loss, labels, run.metrics().loss());
      Add(rate, labels, run.metrics().images_per_second());
      Add(lr, labels, run.metrics().lr());
      Add(grad, labels, run.metrics().grad_norm());
    }
    if (run.has_latest_eval()) {
      Add(fid, labels, run.latest_eval().fid());
      Add(inception, labels, run.latest_eval().inception_score());
    }
  }
  for (const auto& [s, count] : counts) Add(by_state, {{"state", v1::RunState_Name(s)}}, count);

  MetricFamily up = Gauge("ddpm_worker_up", "1 for each rank of a live worker group");
  MetricFamily age = Gauge("ddpm_worker_heartbeat_age_seconds", "Seconds since a rank's heartbeat");
  for (const GroupStatus& group : core_.Groups()) {
    for (size_t rank = 0; rank < group.heartbeat_age_seconds.size(); ++rank) {
      const std::vector<ClientMetric::Label> labels = {{"group", group.id},
                                                       {"rank", std::to_string(rank)}};
      Add(up, labels, 1);
      Add(age, labels, group.heartbeat_age_seconds[rank]);
    }
  }
  return {state, by_state, step, total, loss, rate, lr, grad, fid, inception, restarts, up, age};
}

}  // namespace ddpm
