// The control plane at cluster scale: a ddpm_coordinator (in a process of its own, so that its
// CPU time and memory are its own) serves N simulated worker groups of
// --ranks ranks, each holding a run. Every group registers, keeps its command stream open and
// heartbeats as ddpm_worker does, from the proto alone:
//   --mode group: rank 0 sends one heartbeat per interval for the group, with the other ranks'
//                 reports (HeartbeatRequest.peers), as this build's workers do;
//   --mode rank:  every rank sends its own, as workers did before (and still do where MPI lacks
//                 MPI_THREAD_MULTIPLE).
// Rank 0 adds the run's train metrics every log interval (a registry write, as a real run's).
// The rank reports are a RankRecorder's after 200 steps (their histograms as a worker sends
// them). Over --seconds after a warm-up it measures: the coordinator's CPU (share of one core)
// and resident memory, heartbeats per second and their p50/p99 latency, ListRuns (one page of
// the default size) and GetRun p50/p99 from a client polling both, and the /metrics scrape's
// size and time. One line per N.
// usage: ddpm_bench_control_plane [--groups 64,256,1024] [--ranks 8] [--mode group|rank]
//                                 [--seconds 30] [--interval 5] [--log-every 10]
#include <fcntl.h>
#include <grpcpp/grpcpp.h>
#include <httplib.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "bench/stats.h"
#include "config/flags.h"
#include "ddpm/v1/control.grpc.pb.h"
#include "ddpm/v1/worker_gateway.grpc.pb.h"
#include "proto/rpc.h"
#include "worker/rank_metrics.h"

namespace ddpm::bench {
namespace {

namespace fs = std::filesystem;

/// A benchmark that could not set itself up: a binary that did not start, an RPC refused.
class BenchError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

constexpr const char* kControl = "bench-control";
constexpr const char* kWorker = "bench-worker";
const char* kConfig =
    "model: {ch: 16, ch_mult: [1, 2], num_res_blocks: 1, attn_resolutions: [8], image_size: 16, "
    "norm_groups: 8}\ntrain: {steps: 800000, batch_size: 128, log_every: 100}\n";

// A real ddpm_coordinator in a process of its own (fork and exec: this process has gRPC threads,
// so a forked child must not use gRPC), serving on free ports; returns its pid and fills the
// gRPC address and the /metrics port, read from DATA_DIR/address and its log.
pid_t Spawn(const std::string& binary, const fs::path& dir, double interval, std::string& address,
            int& metrics_port) {
  fs::create_directories(dir);
  const std::string log = (dir / "coordinator.log").string();
  std::fflush(stdout);
  const pid_t child = fork();
  if (child == 0) {
    prctl(PR_SET_PDEATHSIG, SIGTERM);  // The coordinator goes with the benchmark.
    const int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    dup2(fd, STDOUT_FILENO);
    dup2(fd, STDERR_FILENO);
    setenv("DDPM_CONTROL_TOKEN", kControl, 1);
    setenv("DDPM_WORKER_TOKEN", kWorker, 1);
    setenv("DDPM_VIEWER_TOKEN", "bench-viewer", 1);
    const std::string data = "--data-dir=" + dir.string();
    const std::string beat = "--heartbeat-interval=" + std::to_string(interval);
    execl(binary.c_str(), binary.c_str(), data.c_str(), "--listen=127.0.0.1:0",
          "--metrics-listen=127.0.0.1:0", "--http-listen=", beat.c_str(), "--heartbeat-timeout=600",
          static_cast<char*>(nullptr));
    std::_Exit(127);
  }
  for (int i = 0; i < 300; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    std::ifstream in(log);
    const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const size_t at = text.find("metrics at http://127.0.0.1:");
    std::ifstream address_file(dir / "address");
    if (at == std::string::npos || !std::getline(address_file, address)) continue;
    metrics_port = std::stoi(text.substr(at + std::strlen("metrics at http://127.0.0.1:")));
    return child;
  }
  throw BenchError(binary + " did not start; see " + log);
}

// One asynchronous call on the completion queue.
struct Call {
  virtual ~Call() = default;
  // ok: the completion queue's verdict. Returns false when the call is over (delete it).
  virtual bool Done(bool ok) = 0;
};

struct Latencies {
  std::mutex mutex;
  std::vector<double> ms;
  int64_t failed = 0;
  std::string first_error;
};

struct HeartbeatCall : Call {
  grpc::ClientContext context;
  v1::HeartbeatResponse response;
  grpc::Status status;
  Clock::time_point start = Clock::now();
  std::unique_ptr<grpc::ClientAsyncResponseReader<v1::HeartbeatResponse>> reader;
  Latencies* latencies = nullptr;
  bool Done(bool) override {
    const double ms = Ms(start);
    std::lock_guard<std::mutex> lock(latencies->mutex);
    if (status.ok()) {
      latencies->ms.push_back(ms);
    } else {
      if (latencies->failed++ == 0) latencies->first_error = DescribeStatus("Heartbeat", status);
    }
    return false;
  }
};

// A group's command stream, read until it ends.
struct StreamCall : Call {
  grpc::ClientContext context;
  v1::GroupCommand command;
  std::unique_ptr<grpc::ClientAsyncReader<v1::GroupCommand>> reader;
  std::atomic<int64_t>* commands = nullptr;
  bool started = false;
  bool Done(bool ok) override {
    if (!ok) return false;
    if (started) ++*commands;
    started = true;
    reader->Read(&command, this);
    return true;
  }
};

void Drain(grpc::CompletionQueue& queue) {
  void* tag = nullptr;
  bool ok = false;
  while (queue.Next(&tag, &ok)) {
    auto* call = static_cast<Call*>(tag);
    if (!call->Done(ok)) delete call;
  }
}

// A worker's report of one rank after 200 steps, histograms and all.
v1::RankMetrics RankReport(int rank, const std::string& run) {
  RankRecorder recorder(rank, "cuda:" + std::to_string(rank), [] { return int64_t{40} << 30; });
  recorder.SetRun(run);
  std::mt19937 random(rank);
  std::uniform_real_distribution<double> jitter(0.9, 1.1);
  for (int step = 1; step <= 200; ++step) {
    WorkerMetrics m;
    m.step = step;
    m.rank = rank;
    m.loss = 0.03 * jitter(random);
    m.step_seconds = 0.11 * jitter(random);
    m.images_per_second = 16 / m.step_seconds;
    m.allreduce_seconds = 0.02 * jitter(random);
    m.overlap_fraction = 0.9;
    m.exposed_seconds = 0.002;
    recorder.RecordStep(m);
  }
  return recorder.Snapshot().metrics;
}

struct Result {
  double cpu_share = 0, rss_mb = 0, heartbeats_per_second = 0;
  Latencies heartbeats, list, get;
  std::vector<double> scrape_ms;
  size_t scrape_bytes = 0;
  int64_t commands = 0;
};

void Simulate(const std::string& coordinator, int groups, int ranks, bool per_group, double seconds,
              double interval, double log_every, Result& result) {
  const fs::path dir =
      fs::temp_directory_path() /
      ("ddpm-bench-control-" + std::to_string(getpid()) + "-" + std::to_string(groups));
  fs::remove_all(dir);
  std::string address;
  int metrics_port = 0;
  const pid_t child = Spawn(coordinator, dir, interval, address, metrics_port);

  // A connection per 16 groups, as many hosts would open.
  std::vector<decltype(MakeClient<v1::WorkerGateway>(std::shared_ptr<grpc::Channel>()))> gateways;
  for (int i = 0; i < (groups + 15) / 16; ++i) {
    grpc::ChannelArguments args;
    args.SetInt("ddpm.bench.connection", i);
    gateways.push_back(MakeClient<v1::WorkerGateway>(
        grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args)));
  }
  ChannelOptions control_channel;
  control_channel.address = address;
  control_channel.max_message_bytes = 64 << 20;
  auto control = MakeClient<v1::Control>(control_channel);

  // A run per group, then the groups: each takes the next queued run.
  std::vector<std::string> runs;
  for (int g = 0; g < groups; ++g) {
    v1::StartRunRequest start;
    start.set_name("r" + std::to_string(g));
    start.set_config_yaml(kConfig);
    // Equal priorities: placed in submission order, run g on group g.
    v1::StartRunResponse started;
    const grpc::Status status = control->StartRun(MakeContext(kControl).get(), start, &started);
    if (!status.ok()) throw BenchError(DescribeStatus("StartRun", status));
    runs.push_back(started.run().id());
  }
  std::vector<v1::RankMetrics> reports;
  reports.reserve(ranks);
  for (int r = 0; r < ranks; ++r) reports.push_back(RankReport(r, "template"));
  grpc::CompletionQueue queue;
  std::atomic<int64_t> commands{0};
  std::thread drainer([&] { Drain(queue); });
  std::vector<StreamCall*> streams;
  for (int g = 0; g < groups; ++g) {
    v1::RegisterRequest group;
    group.set_group_id("g" + std::to_string(g));
    group.set_world_size(ranks);
    for (int r = 0; r < ranks; ++r) {
      group.add_hostnames("node" + std::to_string(g) + "-" + std::to_string(r / 8));
      group.add_devices("cuda:" + std::to_string(r % 8));
    }
    v1::RegisterResponse registered;
    auto& gateway = *gateways[g / 16];
    const grpc::Status status = gateway.Register(MakeContext(kWorker).get(), group, &registered);
    if (!status.ok()) throw BenchError(DescribeStatus("Register", status));
    auto* stream = new StreamCall;
    stream->commands = &commands;
    stream->context.AddMetadata("authorization", std::string("Bearer ") + kWorker);
    v1::CommandsRequest request;
    request.set_group_id(group.group_id());
    request.set_session(registered.session());
    // Prepared, then started: its first completion may come before an async call returns.
    stream->reader = gateway.PrepareAsyncCommands(&stream->context, request, &queue);
    stream->reader->StartCall(stream);
    streams.push_back(stream);
  }

  // Who sends when: every heartbeat of an interval at its own moment, spread evenly.
  struct Beat {
    int group;
    int rank;  // -1: rank 0 for the whole group
  };
  std::vector<Beat> schedule;
  for (int g = 0; g < groups; ++g) {
    if (per_group) {
      schedule.push_back({g, -1});
    } else {
      for (int r = 0; r < ranks; ++r) schedule.push_back({g, r});
    }
  }
  std::shuffle(schedule.begin(), schedule.end(), std::mt19937(1));
  std::atomic<bool> measuring{false}, stop{false};
  std::atomic<int64_t> sent{0};
  std::vector<int64_t> beats_of_group(groups, 0);
  std::thread sender([&] {
    const auto spacing = std::chrono::duration<double>(interval / schedule.size());
    auto next = Clock::now();
    while (!stop) {
      for (const Beat& beat : schedule) {
        if (stop) break;
        next += std::chrono::duration_cast<Clock::duration>(spacing);
        std::this_thread::sleep_until(next);
        const int rank = beat.rank < 0 ? 0 : beat.rank;
        v1::HeartbeatRequest request;
        request.set_group_id("g" + std::to_string(beat.group));
        request.set_rank(rank);
        request.set_run_id(runs[beat.group]);
        request.set_attempt(1);
        request.set_device_memory_bytes(int64_t{40} << 30);
        const int64_t step = 100 * (1 + beats_of_group[beat.group]);
        *request.mutable_rank_metrics() = reports[rank];
        request.mutable_rank_metrics()->set_step(step);
        if (beat.rank < 0) {
          for (int r = 1; r < ranks; ++r) {
            v1::PeerReport& peer = *request.add_peers();
            peer.set_rank(r);
            peer.set_run_id(runs[beat.group]);
            peer.set_attempt(1);
            *peer.mutable_rank_metrics() = reports[r];
            peer.mutable_rank_metrics()->set_step(step);
            peer.set_device_memory_bytes(int64_t{40} << 30);
            peer.set_age_ms(500);
          }
        }
        if (rank == 0) {
          // The log interval's metrics with every (log_every / interval)-th heartbeat.
          const auto every = std::max<int64_t>(1, std::llround(log_every / interval));
          if (beats_of_group[beat.group] % every == 0) {
            v1::TrainMetrics& m = *request.mutable_train_metrics();
            m.set_step(step);
            m.set_total(800000);
            m.set_loss(0.03);
            m.set_lr(2e-4);
            m.set_grad_norm(1);
            m.set_images_per_second(1100);
            for (int q = 0; q < 4; ++q) m.add_loss_by_quartile(0.01 * (4 - q));
          }
          ++beats_of_group[beat.group];
        }
        auto* call = new HeartbeatCall;
        call->latencies = measuring ? &result.heartbeats : nullptr;
        if (call->latencies == nullptr) {
          static Latencies ignored;
          call->latencies = &ignored;
        }
        call->context.AddMetadata("authorization", std::string("Bearer ") + kWorker);
        call->context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
        call->reader = gateways[beat.group / 16]->AsyncHeartbeat(&call->context, request, &queue);
        call->reader->Finish(&call->response, &call->status, call);
        if (measuring) ++sent;
      }
    }
  });
  // A person's view: ListRuns (one default page) and GetRun of a random run, in turn.
  std::thread viewer([&] {
    std::mt19937 random(2);
    while (!stop) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      if (!measuring) continue;
      auto start = Clock::now();
      v1::ListRunsResponse list;
      const grpc::Status listed =
          control->ListRuns(MakeContext(kControl).get(), v1::ListRunsRequest(), &list);
      {
        std::lock_guard<std::mutex> lock(result.list.mutex);
        if (listed.ok())
          result.list.ms.push_back(Ms(start));
        else
          ++result.list.failed;
      }
      start = Clock::now();
      v1::GetRunRequest get;
      get.set_run(runs[random() % runs.size()]);
      v1::GetRunResponse got;
      const grpc::Status gotten = control->GetRun(MakeContext(kControl).get(), get, &got);
      std::lock_guard<std::mutex> lock(result.get.mutex);
      if (gotten.ok())
        result.get.ms.push_back(Ms(start));
      else
        ++result.get.failed;
    }
  });
  // Warm-up: every group heard from (its run RUNNING) before the window opens.
  std::this_thread::sleep_for(std::chrono::duration<double>(2 * interval));
  const double cpu_start = ProcessCpuSeconds(child);
  const auto window = Clock::now();
  measuring = true;
  httplib::Client scraper("127.0.0.1", metrics_port);
  scraper.set_read_timeout(30, 0);
  while (SecondsSince(window) < seconds) {
    std::this_thread::sleep_for(std::chrono::seconds(5));
    const auto start = Clock::now();
    const auto scraped = scraper.Get("/metrics");
    if (scraped && scraped->status == 200) {
      result.scrape_ms.push_back(Ms(start));
      result.scrape_bytes = scraped->body.size();
    }
  }
  measuring = false;
  const double elapsed = SecondsSince(window);
  result.cpu_share = (ProcessCpuSeconds(child) - cpu_start) / elapsed;
  result.rss_mb = ProcessRssMb(child);
  result.heartbeats_per_second = static_cast<double>(sent) / elapsed;
  result.commands = commands;
  stop = true;
  sender.join();
  viewer.join();
  kill(child, SIGTERM);
  waitpid(child, nullptr, 0);
  for (StreamCall* stream : streams) stream->context.TryCancel();
  queue.Shutdown();
  drainer.join();
  fs::remove_all(dir);
}

int Run(const Flags& flags) {
  const int ranks = static_cast<int>(flags.GetInt("ranks"));
  const std::string mode = flags.Get("mode");
  if (mode != "group" && mode != "rank") throw FlagError("--mode is group or rank, not " + mode);
  const double seconds = flags.GetDouble("seconds");
  const double interval = flags.GetDouble("interval");
  const double log_every = flags.GetDouble("log-every");
  // The coordinator binary: the flag, else the build's, beside this benchmark's folder.
  std::string coordinator = flags.Get("coordinator");
  if (coordinator.empty()) {
    coordinator = (fs::read_symlink("/proc/self/exe").parent_path().parent_path() / "coordinator" /
                   "ddpm_coordinator")
                      .string();
  }
  std::printf(
      "%s (%s), %d ranks a group, every %.0f s, train metrics every %.0f s; %.0f s "
      "measured after a %.0f s warm-up; %u CPUs\n",
      mode == "group" ? "one heartbeat per group" : "one heartbeat per rank",
      mode == "group" ? "rank 0 forwards its peers" : "each rank its own", ranks, interval,
      log_every, seconds, 2 * interval, std::thread::hardware_concurrency());
  std::printf("%-14s %7s %9s %8s %16s %16s %16s %9s %9s\n", "groups x ranks", "hb/s", "CPU", "RSS",
              "heartbeat p50/99", "ListRuns p50/99", "GetRun p50/99", "/metrics", "scrape");
  for (double n : flags.GetDoubleList("groups")) {
    const int groups = static_cast<int>(n);
    Result result;
    Simulate(coordinator, groups, ranks, mode == "group", seconds, interval, log_every, result);
    const auto pair = [](Latencies& l) {
      char text[32];
      std::snprintf(text, sizeof(text), "%.0f / %.0f ms", Quantile(l.ms, 0.5),
                    Quantile(l.ms, 0.99));
      return std::string(text);
    };
    const std::string size = std::to_string(result.scrape_bytes / 1024) + " KB";
    char scrape[32];
    std::snprintf(scrape, sizeof(scrape), "%.0f ms", Quantile(result.scrape_ms, 0.5));
    std::printf("%5d x %-6d %7.0f %8.0f%% %5.0f MB %16s %16s %16s %9s %9s\n", groups, ranks,
                result.heartbeats_per_second, 100 * result.cpu_share, result.rss_mb,
                pair(result.heartbeats).c_str(), pair(result.list).c_str(),
                pair(result.get).c_str(), size.c_str(), scrape);
    if (result.heartbeats.failed > 0) {
      std::printf("  %lld heartbeats failed, the first: %s\n",
                  static_cast<long long>(result.heartbeats.failed),
                  result.heartbeats.first_error.c_str());
    }
    std::fflush(stdout);
  }
  return 0;
}

}  // namespace
}  // namespace ddpm::bench

int main(int argc, char** argv) {
  ddpm::Flags flags("ddpm_bench_control_plane",
                    "The coordinator under N simulated groups of worker ranks: CPU, memory, "
                    "heartbeat, ListRuns and GetRun latency, /metrics.");
  flags.Add("groups", "comma-separated numbers of groups", "64,256,1024");
  flags.Add("ranks", "ranks in each group", "8");
  flags.Add("mode", "group (rank 0 forwards its peers) or rank (every rank heartbeats)", "group");
  flags.Add("seconds", "seconds measured for each number of groups", "30");
  flags.Add("interval", "heartbeat interval, seconds (the coordinator's default)", "5");
  flags.Add("log-every", "seconds between a run's train metrics", "10");
  flags.Add("coordinator",
            "the ddpm_coordinator binary to measure (another build's, to compare; default: "
            "this build's)",
            "");
  return ddpm::RunMain(flags, argc, argv, [&] { return ddpm::bench::Run(flags); });
}
