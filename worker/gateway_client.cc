#include "worker/gateway_client.h"

#include <algorithm>
#include <cstdio>

#include "base/log.h"

namespace ddpm {
namespace {

using SteadyClock = std::chrono::steady_clock;

bool Transient(const grpc::Status& status) {
  return status.error_code() == grpc::StatusCode::UNAVAILABLE ||
         status.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED ||
         status.error_code() == grpc::StatusCode::CANCELLED;
}

}  // namespace

GatewayClient::GatewayClient(const GatewayOptions& options)
    : options_(options), stub_(MakeClient<v1::WorkerGateway>(options.channel)) {}

std::shared_ptr<v1::WorkerGateway::Stub> GatewayClient::stub() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return stub_;
}

void GatewayClient::Reconnect() {
  std::shared_ptr<v1::WorkerGateway::Stub> fresh = MakeClient<v1::WorkerGateway>(options_.channel);
  std::lock_guard<std::mutex> lock(mutex_);
  stub_ = std::move(fresh);
}

grpc::Status GatewayClient::Checked(const grpc::Status& status) {
  if (status.error_code() == grpc::StatusCode::UNAVAILABLE) Reconnect();
  return status;
}

std::unique_ptr<grpc::ClientContext> GatewayClient::Context() const {
  return MakeContext(
      options_.token,
      std::chrono::milliseconds(static_cast<int64_t>(options_.rpc_timeout_seconds * 1000)));
}

grpc::Status GatewayClient::Register(const v1::RegisterRequest& request,
                                     v1::RegisterResponse* response) {
  return Checked(stub()->Register(Context().get(), request, response));
}

grpc::Status GatewayClient::Heartbeat(const v1::HeartbeatRequest& request) {
  v1::HeartbeatResponse response;
  return Checked(stub()->Heartbeat(Context().get(), request, &response));
}

grpc::Status GatewayClient::ReportCheckpoint(const v1::ReportCheckpointRequest& request) {
  v1::ReportCheckpointResponse response;
  return Checked(stub()->ReportCheckpoint(Context().get(), request, &response));
}

grpc::Status GatewayClient::ReportEval(const v1::ReportEvalRequest& request) {
  v1::ReportEvalResponse response;
  return Checked(stub()->ReportEval(Context().get(), request, &response));
}

grpc::Status GatewayClient::ReportRunEnd(const v1::ReportRunEndRequest& request) {
  v1::ReportRunEndResponse response;
  return Checked(stub()->ReportRunEnd(Context().get(), request, &response));
}

grpc::Status GatewayClient::Leave(const v1::LeaveRequest& request) {
  v1::LeaveResponse response;
  return Checked(stub()->Leave(Context().get(), request, &response));
}

grpc::Status ReportWithRetry(const std::function<grpc::Status()>& call,
                             std::chrono::seconds patience,
                             const std::function<bool(std::chrono::milliseconds)>& wait) {
  const auto give_up = SteadyClock::now() + patience;
  auto backoff = std::chrono::milliseconds(250);
  while (true) {
    grpc::Status status = call();
    const bool retry = Transient(status) || status.error_code() == grpc::StatusCode::NOT_FOUND;
    if (!retry || SteadyClock::now() + backoff > give_up || !wait(backoff)) return status;
    backoff = std::min(backoff * 2, std::chrono::milliseconds(4000));
  }
}

CommandChannel::CommandChannel(GatewayClient& client, v1::RegisterRequest registration)
    : client_(client), registration_(std::move(registration)) {}

CommandChannel::~CommandChannel() { Stop(); }

bool CommandChannel::RegisterOnce(bool& unreachable_reported) {
  v1::RegisterRequest request = registration_;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    request.set_current_run(current_run_);
    request.set_current_step(current_step_);
  }
  v1::RegisterResponse response;
  const grpc::Status status = client_.Register(request, &response);
  std::lock_guard<std::mutex> lock(mutex_);
  if (status.ok()) {
    session_ = response.session();
    heartbeat_interval_ = response.heartbeat_interval_seconds();
    LogInfo("ddpm_worker: %s",
            ("group " + registration_.group_id() + " registered (" +
             std::to_string(registration_.world_size()) + " ranks)" +
             (request.current_run().empty() ? "" : ", training run " + request.current_run()))
                .c_str());
    unreachable_reported = false;
    return true;
  }
  if (Transient(status)) {
    if (!unreachable_reported)
      LogInfo("ddpm_worker: %s", (DescribeStatus("Register", status) + "; retrying").c_str());
    unreachable_reported = true;
    return false;
  }
  fatal_ = DescribeStatus("Register", status);
  changed_.notify_all();
  return false;
}

bool CommandChannel::Start(const std::atomic<bool>& stop_waiting) {
  bool reported = false;
  auto backoff = std::chrono::milliseconds(250);
  while (!RegisterOnce(reported)) {
    if (!fatal().empty() || stop_waiting) return false;
    std::this_thread::sleep_for(backoff);
    backoff = std::min(backoff * 2, std::chrono::milliseconds(4000));
  }
  thread_ = std::thread([this] { Run(); });
  return true;
}

void CommandChannel::Run() {
  auto backoff = std::chrono::milliseconds(250);
  bool reported = false;
  while (true) {
    std::string session;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (stop_ || !fatal_.empty()) return;
      session = session_;
    }
    if (session.empty()) {
      if (!RegisterOnce(reported)) {
        if (!fatal().empty()) return;
        std::this_thread::sleep_for(backoff);
        backoff = std::min(backoff * 2, std::chrono::milliseconds(2000));
      }
      continue;
    }
    v1::CommandsRequest request;
    request.set_group_id(registration_.group_id());
    request.set_session(session);
    grpc::ClientContext* context = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (stop_) return;
      stream_context_ = client_.StreamContext();
      context = stream_context_.get();
    }
    const std::shared_ptr<v1::WorkerGateway::Stub> stub = client_.stub();
    auto reader = stub->Commands(context, request);
    v1::GroupCommand command;
    while (reader->Read(&command)) {
      backoff = std::chrono::milliseconds(250);
      if (reported) LogInfo("ddpm_worker: the coordinator is back");
      reported = false;
      std::lock_guard<std::mutex> lock(mutex_);
      latest_ = command;
      ++version_;
      changed_.notify_all();
    }
    const grpc::Status status = reader->Finish();
    std::lock_guard<std::mutex> lock(mutex_);
    if (stop_) return;
    if (status.error_code() == grpc::StatusCode::NOT_FOUND) {
      session_.clear();  // A restarted coordinator: register again, naming the current run.
    } else if (status.error_code() == grpc::StatusCode::UNAUTHENTICATED ||
               status.error_code() == grpc::StatusCode::PERMISSION_DENIED) {
      fatal_ = DescribeStatus("Commands", status);
      changed_.notify_all();
      return;
    } else {
      if (!reported)
        LogInfo("ddpm_worker: %s", (DescribeStatus("Commands", status) + "; reconnecting").c_str());
      reported = true;
      if (status.error_code() == grpc::StatusCode::UNAVAILABLE) client_.Reconnect();
      mutex_.unlock();
      std::this_thread::sleep_for(backoff);
      mutex_.lock();
      backoff = std::min(backoff * 2, std::chrono::milliseconds(4000));
    }
  }
}

v1::GroupCommand CommandChannel::Latest(int64_t* version) const {
  std::lock_guard<std::mutex> lock(mutex_);
  if (version != nullptr) *version = version_;
  return latest_;
}

void CommandChannel::WaitForChange(int64_t seen, std::chrono::milliseconds timeout) const {
  std::unique_lock<std::mutex> lock(mutex_);
  changed_.wait_for(lock, timeout, [&] { return version_ != seen || !fatal_.empty() || stop_; });
}

void CommandChannel::SetCurrentRun(const std::string& run_id, int64_t step) {
  std::lock_guard<std::mutex> lock(mutex_);
  current_run_ = run_id;
  current_step_ = step;
}

std::string CommandChannel::fatal() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return fatal_;
}

void CommandChannel::Stop() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
    if (stream_context_) stream_context_->TryCancel();
    changed_.notify_all();
  }
  if (thread_.joinable()) thread_.join();
}

RunReporter::RunReporter(GatewayClient& client, std::chrono::seconds patience)
    : client_(client), patience_(patience), thread_([this] { Run(); }) {}

RunReporter::~RunReporter() {
  Flush(std::chrono::seconds(10));
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  changed_.notify_all();
  thread_.join();
}

void RunReporter::Post(v1::ReportCheckpointRequest request) {
  std::lock_guard<std::mutex> lock(mutex_);
  checkpoint_ = std::move(request);
  changed_.notify_all();
}

void RunReporter::Post(v1::ReportEvalRequest request) {
  std::lock_guard<std::mutex> lock(mutex_);
  evals_.push_back(std::move(request));
  changed_.notify_all();
}

bool RunReporter::Flush(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(mutex_);
  return changed_.wait_for(lock, timeout, [&] { return !checkpoint_ && evals_.empty() && !busy_; });
}

int64_t RunReporter::accepted_checkpoints() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return accepted_checkpoints_;
}

int64_t RunReporter::accepted_evals() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return accepted_evals_;
}

grpc::Status RunReporter::Send(std::unique_lock<std::mutex>& lock,
                               const std::function<grpc::Status()>& call,
                               const std::function<bool()>& superseded) {
  lock.unlock();
  grpc::Status status = ReportWithRetry(call, patience_, [&](std::chrono::milliseconds pause) {
    std::unique_lock<std::mutex> waiting(mutex_);
    return !changed_.wait_for(waiting, pause, [&] { return superseded() || stop_; });
  });
  lock.lock();
  return status;
}

void RunReporter::Run() {
  std::unique_lock<std::mutex> lock(mutex_);
  while (true) {
    changed_.wait(lock, [&] { return checkpoint_ || !evals_.empty() || stop_; });
    if (!checkpoint_ && evals_.empty()) return;  // stopped with nothing to send
    busy_ = true;
    if (!evals_.empty()) {
      const v1::ReportEvalRequest request = std::move(evals_.front());
      evals_.pop_front();
      const grpc::Status status = Send(
          lock, [&] { return client_.ReportEval(request); }, [] { return false; });
      if (status.ok()) {
        ++accepted_evals_;
      } else {
        LogInfo("ddpm_worker: %s", (DescribeStatus("ReportEval", status) + " (step " +
                                    std::to_string(request.eval().step()) + ")")
                                       .c_str());
      }
    } else {
      const v1::ReportCheckpointRequest request = std::move(*checkpoint_);
      checkpoint_.reset();
      // A newer checkpoint makes this one's report moot.
      const grpc::Status status = Send(
          lock, [&] { return client_.ReportCheckpoint(request); },
          [&] { return checkpoint_.has_value(); });
      if (status.ok()) {
        ++accepted_checkpoints_;
      } else if (!checkpoint_) {
        LogInfo("ddpm_worker: %s", (DescribeStatus("ReportCheckpoint", status) + " (step " +
                                    std::to_string(request.checkpoint().step()) + ")")
                                       .c_str());
      }
    }
    busy_ = false;
    changed_.notify_all();
  }
}

Heartbeater::Heartbeater(GatewayClient& client, std::string group_id, const RankRecorder& recorder,
                         double interval_seconds, RankLink* link)
    : client_(client),
      group_id_(std::move(group_id)),
      recorder_(recorder),
      rank_(recorder.rank()),
      interval_(static_cast<int64_t>(interval_seconds * 1000)),
      link_(link) {
  pending_.set_group_id(group_id_);
  pending_.set_rank(rank_);
  thread_ = std::thread([this] { Run(); });
}

Heartbeater::~Heartbeater() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  changed_.notify_all();
  thread_.join();
}

void Heartbeater::SetRun(const std::string& run_id, int attempt) {
  std::lock_guard<std::mutex> lock(mutex_);
  pending_.set_run_id(run_id);
  pending_.set_attempt(attempt);
  pending_.clear_train_metrics();
  pending_.clear_sample_grid();
  poke_ = true;
  changed_.notify_all();
}

void Heartbeater::PushTrainMetrics(const LogMetrics& m) {
  std::lock_guard<std::mutex> lock(mutex_);
  v1::TrainMetrics& t = *pending_.mutable_train_metrics();
  t.set_step(m.step);
  t.set_total(m.total_steps);
  t.set_loss(m.loss);
  t.set_grad_norm(m.grad_norm);
  t.set_lr(m.lr);
  t.set_images_per_second(m.images_per_second);
  t.set_elapsed_seconds(m.elapsed_seconds);
  t.set_eta_seconds(m.eta_seconds);
  t.clear_loss_by_quartile();
  for (double loss : m.loss_by_quartile) t.add_loss_by_quartile(loss);
  t.set_rollbacks(m.rollbacks);
  t.set_checkpoint_failures(m.checkpoint_failures);
  t.set_last_incident(m.last_incident);
  poke_ = true;
  changed_.notify_all();
}

void Heartbeater::SetSampleGrid(const std::string& path) {
  std::lock_guard<std::mutex> lock(mutex_);
  pending_.set_sample_grid(path);
  poke_ = true;
  changed_.notify_all();
}

void Heartbeater::Poke() {
  std::lock_guard<std::mutex> lock(mutex_);
  poke_ = true;
  changed_.notify_all();
}

std::vector<double> Heartbeater::PeerAges() const {
  std::lock_guard<std::mutex> lock(mutex_);
  const auto now = std::chrono::steady_clock::now();
  std::vector<double> ages;
  ages.push_back(0);
  for (const auto& [rank, heard] : peers_) {
    ages.resize(std::max<size_t>(ages.size(), rank + 1), -1);
    ages[rank] = std::chrono::duration<double>(now - heard.second).count();
  }
  return ages;
}

v1::PeerReport Heartbeater::Report(const v1::HeartbeatRequest& pending) const {
  v1::PeerReport report;
  report.set_rank(rank_);
  report.set_run_id(pending.run_id());
  report.set_attempt(pending.attempt());
  const RankSnapshot snapshot = recorder_.Snapshot();
  report.set_device_memory_bytes(snapshot.device_memory_bytes);
  if (!pending.run_id().empty() && snapshot.run_id == pending.run_id() && snapshot.has_step) {
    *report.mutable_rank_metrics() = snapshot.metrics;
  }
  return report;
}

void Heartbeater::CollectPeers() {
  const auto now = std::chrono::steady_clock::now();
  for (auto& [rank, bytes] : link_->Collect()) {
    v1::PeerReport report;
    if (rank <= 0 || !report.ParseFromString(bytes)) continue;
    report.set_rank(rank);  // The sender, as the link knows it.
    peers_[rank] = {std::move(report), now};
  }
}

void Heartbeater::AddPeers(v1::HeartbeatRequest& request) const {
  const auto now = std::chrono::steady_clock::now();
  for (const auto& [rank, heard] : peers_) {
    v1::PeerReport& peer = *request.add_peers();
    peer = heard.first;
    peer.set_age_ms(
        std::chrono::duration_cast<std::chrono::milliseconds>(now - heard.second).count());
  }
}

void Heartbeater::Run() {
  grpc::StatusCode last_error = grpc::StatusCode::OK;
  bool post_refused = false;
  // Rank 0 with a link takes in its peers' reports every second, so that their ages are true to
  // within a second, and sends every interval.
  const auto collect_every = std::min(interval_, std::chrono::milliseconds(1000));
  auto next_send = std::chrono::steady_clock::now();
  std::unique_lock<std::mutex> lock(mutex_);
  while (!stop_) {
    if (link_ != nullptr && rank_ > 0) {
      const std::string report = Report(pending_).SerializeAsString();
      poke_ = false;
      lock.unlock();
      const bool posted = link_->Post(report);
      lock.lock();
      if (!posted && !post_refused) {
        LogWarning("ddpm_worker: rank %d: rank 0 is not taking this rank's reports; they wait\n",
                   rank_);
      }
      post_refused = !posted;
      changed_.wait_for(lock, interval_, [&] { return stop_ || poke_; });
      continue;
    }
    if (link_ != nullptr) {
      CollectPeers();
      if (!poke_ && std::chrono::steady_clock::now() < next_send) {
        changed_.wait_for(lock, collect_every, [&] { return stop_ || poke_; });
        continue;
      }
    }
    next_send = std::chrono::steady_clock::now() + interval_;
    v1::HeartbeatRequest request = pending_;
    if (link_ != nullptr) AddPeers(request);
    // Train metrics and a sample grid go out once; rank metrics every time.
    pending_.clear_train_metrics();
    pending_.clear_sample_grid();
    poke_ = false;
    lock.unlock();
    const RankSnapshot snapshot = recorder_.Snapshot();
    request.set_device_memory_bytes(snapshot.device_memory_bytes);
    if (!request.run_id().empty() && snapshot.run_id == request.run_id() && snapshot.has_step) {
      *request.mutable_rank_metrics() = snapshot.metrics;
    }
    const grpc::Status status = client_.Heartbeat(request);
    lock.lock();
    if (!status.ok() && status.error_code() != last_error) {
      // Once per kind of failure: a coordinator restart shows as UNAVAILABLE, then NOT_FOUND
      // until rank 0 has registered the group again.
      LogWarning("ddpm_worker: rank %d: %s\n", rank_, DescribeStatus("Heartbeat", status).c_str());
    }
    if (!status.ok() && request.has_train_metrics() && !pending_.has_train_metrics()) {
      *pending_.mutable_train_metrics() = request.train_metrics();  // Try it again next time.
    }
    last_error = status.error_code();
    changed_.wait_for(lock, link_ != nullptr ? collect_every : interval_,
                      [&] { return stop_ || poke_; });
  }
}

}  // namespace ddpm
