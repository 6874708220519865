#include "worker/rank_metrics.h"

#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <prometheus/collectable.h>
#include <prometheus/text_serializer.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <stdexcept>

#include "proto/metrics.h"
#include "proto/rpc.h"

namespace ddpm {

RankRecorder::RankRecorder(int rank, std::string device, std::function<int64_t()> memory_probe)
    : rank_(rank), device_(std::move(device)), memory_probe_(std::move(memory_probe)) {
  SetRun("");
}

void RankRecorder::SetRun(const std::string& run_id) {
  std::lock_guard<std::mutex> lock(mutex_);
  run_id_ = run_id;
  has_step_ = false;
  metrics_.Clear();
  metrics_.set_rank(rank_);
  *metrics_.mutable_step_seconds_histogram() = NewHistogram(kStepSecondsBounds);
  *metrics_.mutable_allreduce_seconds_histogram() = NewHistogram(kAllReduceSecondsBounds);
  *metrics_.mutable_checkpoint_stall_seconds_histogram() =
      NewHistogram(kCheckpointStallSecondsBounds);
  *metrics_.mutable_checkpoint_write_seconds_histogram() =
      NewHistogram(kCheckpointWriteSecondsBounds);
}

void RankRecorder::RecordStep(const WorkerMetrics& m) {
  std::lock_guard<std::mutex> lock(mutex_);
  has_step_ = true;
  metrics_.set_step(m.step);
  metrics_.set_loss(m.loss);
  metrics_.set_step_seconds(m.step_seconds);
  metrics_.set_images_per_second(m.images_per_second);
  metrics_.set_allreduce_seconds(m.allreduce_seconds);
  metrics_.set_overlap_fraction(m.overlap_fraction);
  metrics_.set_exposed_seconds(m.exposed_seconds);
  metrics_.set_checkpoint_stall_seconds(m.checkpoint_stall_seconds);
  metrics_.set_checkpoint_write_seconds(m.checkpoint_write_seconds);
  Observe(*metrics_.mutable_step_seconds_histogram(), m.step_seconds);
  Observe(*metrics_.mutable_allreduce_seconds_histogram(), m.allreduce_seconds);
}

void RankRecorder::RecordProgress(int64_t count) {
  std::lock_guard<std::mutex> lock(mutex_);
  has_step_ = true;
  metrics_.set_step(count);
}

void RankRecorder::RecordCheckpoint(const CommittedCheckpoint& checkpoint) {
  std::lock_guard<std::mutex> lock(mutex_);
  Observe(*metrics_.mutable_checkpoint_stall_seconds_histogram(), checkpoint.stall_seconds);
  Observe(*metrics_.mutable_checkpoint_write_seconds_histogram(), checkpoint.write_seconds);
}

RankSnapshot RankRecorder::Snapshot() const {
  RankSnapshot snapshot;
  snapshot.device_memory_bytes = memory_probe_ ? memory_probe_() : 0;
  std::lock_guard<std::mutex> lock(mutex_);
  snapshot.run_id = run_id_;
  snapshot.has_step = has_step_;
  snapshot.metrics = metrics_;
  return snapshot;
}

int64_t ResidentMemoryBytes() {
  // statm: total program size, then resident pages.
  std::ifstream statm("/proc/self/statm");
  int64_t total_pages = 0, resident_pages = 0;
  if (!(statm >> total_pages >> resident_pages)) return 0;
  return resident_pages * static_cast<int64_t>(sysconf(_SC_PAGESIZE));
}

std::string OffsetListenAddress(const std::string& listen, int offset) {
  const size_t colon = listen.rfind(':');
  size_t used = 0;
  int port = -1;
  try {
    if (colon != std::string::npos) port = std::stoi(listen.substr(colon + 1), &used);
  } catch (const std::exception&) {
    port = -1;
  }
  if (colon == std::string::npos || colon == 0 || port < 0 || used != listen.size() - colon - 1 ||
      port + offset > 65535) {
    throw std::invalid_argument("metrics address '" + listen +
                                "' is not HOST:PORT with PORT + local rank at most 65535");
  }
  return listen.substr(0, colon) + ":" + std::to_string(port == 0 ? 0 : port + offset);
}

namespace {

class RankCollector : public prometheus::Collectable {
 public:
  explicit RankCollector(const RankRecorder& recorder) : recorder_(recorder) {}

  std::vector<prometheus::MetricFamily> Collect() const override {
    using prometheus::MetricType;
    const RankSnapshot snapshot = recorder_.Snapshot();
    const std::string rank = std::to_string(recorder_.rank());
    prometheus::MetricFamily memory =
        MetricFamilyOf(MetricType::Gauge, "ddpm_rank_device_memory_bytes",
                       "Bytes in use on this rank's device (CUDA allocator on a GPU, resident "
                       "memory on the CPU)");
    AddValue(memory, {{"rank", rank}, {"device", recorder_.device()}},
             static_cast<double>(snapshot.device_memory_bytes));
    if (snapshot.run_id.empty() || !snapshot.has_step) return {memory};
    const MetricLabels labels = {{"run", snapshot.run_id}, {"rank", rank}};
    prometheus::MetricFamily step =
        MetricFamilyOf(MetricType::Gauge, "ddpm_rank_step", "The last step this rank finished");
    AddValue(step, labels, static_cast<double>(snapshot.metrics.step()));
    prometheus::MetricFamily step_seconds = MetricFamilyOf(
        MetricType::Histogram, "ddpm_rank_step_seconds", "Seconds of each step on this rank");
    AddHistogram(step_seconds, labels, snapshot.metrics.step_seconds_histogram());
    prometheus::MetricFamily allreduce =
        MetricFamilyOf(MetricType::Histogram, "ddpm_rank_allreduce_seconds",
                       "Gradient all-reduce seconds of each step on this rank");
    AddHistogram(allreduce, labels, snapshot.metrics.allreduce_seconds_histogram());
    return {memory, step, step_seconds, allreduce};
  }

 private:
  const RankRecorder& recorder_;
};

}  // namespace

RankMetricsEndpoint::RankMetricsEndpoint(const RankRecorder& recorder, const std::string& listen)
    : collector_(std::make_shared<RankCollector>(recorder)) {
  const std::string where =
      "rank " + std::to_string(recorder.rank()) + ": cannot serve /metrics on " + listen;
  const size_t colon = listen.rfind(':');
  if (colon == std::string::npos) throw RpcSetupError(where + ": not HOST:PORT");
  std::string host = listen.substr(0, colon);
  if (host.size() > 1 && host.front() == '[' && host.back() == ']')
    host = host.substr(1, host.size() - 2);
  const std::string port = listen.substr(colon + 1);
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  addrinfo* found = nullptr;
  if (const int error =
          getaddrinfo(host.empty() ? nullptr : host.c_str(), port.c_str(), &hints, &found);
      error != 0) {
    throw RpcSetupError(where + ": " + gai_strerror(error));
  }
  std::string failure = "no address";
  for (addrinfo* address = found; address != nullptr && listen_fd_ < 0;
       address = address->ai_next) {
    const int fd =
        socket(address->ai_family, address->ai_socktype | SOCK_CLOEXEC, address->ai_protocol);
    if (fd < 0) continue;
    const int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(fd, address->ai_addr, address->ai_addrlen) == 0 && ::listen(fd, 16) == 0) {
      listen_fd_ = fd;
    } else {
      failure = std::strerror(errno);
      close(fd);
    }
  }
  freeaddrinfo(found);
  if (listen_fd_ < 0) throw RpcSetupError(where + ": " + failure);
  sockaddr_storage bound{};
  socklen_t length = sizeof(bound);
  getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&bound), &length);
  port_ = ntohs(bound.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port
                                            : reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
  thread_ = std::thread([this] { Serve(); });
}

RankMetricsEndpoint::~RankMetricsEndpoint() {
  stop_ = true;
  if (thread_.joinable()) thread_.join();
  close(listen_fd_);
}

namespace {

// Sends all of text, or gives up on a client that went away.
void SendAll(int fd, const std::string& text) {
  size_t sent = 0;
  while (sent < text.size()) {
    const ssize_t n = send(fd, text.data() + sent, text.size() - sent, MSG_NOSIGNAL);
    if (n <= 0) return;
    sent += static_cast<size_t>(n);
  }
}

}  // namespace

void RankMetricsEndpoint::Serve() {
  while (!stop_) {
    pollfd waiting{listen_fd_, POLLIN, 0};
    if (poll(&waiting, 1, 200) <= 0) continue;
    const int client = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (client < 0) continue;
    // One request per connection: read its head (at most 8 KiB, 2 s), then answer and close.
    const timeval timeout{2, 0};
    setsockopt(client, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
    std::string request;
    char buffer[1024];
    while (request.find("\r\n\r\n") == std::string::npos && request.size() < 8192) {
      const ssize_t n = recv(client, buffer, sizeof(buffer), 0);
      if (n <= 0) break;
      request.append(buffer, static_cast<size_t>(n));
    }
    const std::string line = request.substr(0, request.find("\r\n"));
    std::string status = "404 Not Found", type = "text/plain",
                body = "only GET /metrics is served\n";
    if (line.rfind("GET /metrics ", 0) == 0 || line.rfind("GET /metrics?", 0) == 0) {
      status = "200 OK";
      type = "text/plain; version=0.0.4; charset=utf-8";
      try {
        body = prometheus::TextSerializer().Serialize(collector_->Collect());
      } catch (const std::exception& error) {
        status = "500 Internal Server Error";
        type = "text/plain";
        body = std::string(error.what()) + "\n";
      }
    } else if (line.rfind("GET ", 0) != 0) {
      status = "405 Method Not Allowed";
      body = "only GET /metrics is served\n";
    }
    SendAll(client, "HTTP/1.1 " + status + "\r\nContent-Type: " + type + "\r\nContent-Length: " +
                        std::to_string(body.size()) + "\r\nConnection: close\r\n\r\n" + body);
    close(client);
  }
}

}  // namespace ddpm
