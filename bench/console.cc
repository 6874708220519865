// What the console costs the coordinator. A coordinator (core, gRPC and console, in a child
// process of its own so that its CPU time is its own) holds --runs runs and one run of
// --history-steps steps logged every 100; then, side by side:
//   1. GET /api/v1/runs (the runs page's list) against gRPC ListRuns, each --requests times in
//      a row: p50 and p99 latency and the coordinator's CPU seconds per request;
//   2. the same GET while --viewers live viewers hold /api/v1/events streams open and a group's
//      heartbeats change a run 10 times a second (each change wakes every stream);
//   3. GET .../metrics of the long run (its curve, thinned to the console's 2000 points);
//   4. a heartbeat's registry write without and with the history row (Registry, in process).
// usage: ddpm_bench_console [--runs N] [--viewers V] [--requests R] [--history-steps S]
#include "coordinator/console.h"

#include <httplib.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "bench/stats.h"
#include "config/flags.h"
#include "coordinator/registry.h"
#include "coordinator/service.h"
#include "ddpm/v1/control.grpc.pb.h"
#include "ddpm/v1/worker_gateway.grpc.pb.h"
#include "proto/rpc.h"

namespace ddpm::bench {
namespace {

namespace fs = std::filesystem;
constexpr const char* kControl = "bench-control";
constexpr const char* kWorker = "bench-worker";
constexpr const char* kViewer = "bench-viewer";
const char* kConfig =
    "model: {ch: 16, ch_mult: [1, 2], num_res_blocks: 1, attn_resolutions: [8], image_size: 16, "
    "norm_groups: 8}\ntrain: {steps: 100000, batch_size: 4, log_every: 100}\n";

// The coordinator in this (child) process until SIGTERM; writes "GRPC HTTP" ports to fd.
[[noreturn]] void Serve(const fs::path& dir, int fd) {
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  CoordinatorOptions core_options;
  core_options.data_dir = dir.string();
  core_options.heartbeat_timeout_seconds = 600;
  SystemClock clock;
  Coordinator core(core_options, clock);
  ServerOptions options;
  options.listen = "127.0.0.1:0";
  options.metrics_listen = "";
  options.http_listen = "127.0.0.1:0";
  options.control_token = kControl;
  options.worker_token = kWorker;
  options.viewer_token = kViewer;
  CoordinatorServer server(core, options);
  const std::string ports =
      std::to_string(server.port()) + " " + std::to_string(server.console()->port()) + "\n";
  (void)!write(fd, ports.data(), ports.size());
  close(fd);
  int signal = 0;
  sigwait(&signals, &signal);
  server.Shutdown();
  std::_Exit(0);
}

struct Timing {
  std::vector<double> ms;
  double cpu_seconds = 0;
};

template <typename Call>
Timing Measure(pid_t coordinator, int requests, Call call) {
  Timing timing;
  const double cpu = ProcessCpuSeconds(coordinator);
  for (int i = 0; i < requests; ++i) {
    const auto start = Clock::now();
    call();
    timing.ms.push_back(Ms(start));
  }
  timing.cpu_seconds = ProcessCpuSeconds(coordinator) - cpu;
  return timing;
}

void Print(const char* what, const Timing& timing) {
  std::printf("%-58s p50 %7.2f ms  p99 %7.2f ms  coordinator CPU %6.2f ms/request\n", what,
              Quantile(timing.ms, 0.5), Quantile(timing.ms, 0.99),
              1000 * timing.cpu_seconds / static_cast<double>(timing.ms.size()));
}

int Run(const Flags& flags) {
  const int runs = static_cast<int>(flags.GetInt("runs"));
  const int viewers = static_cast<int>(flags.GetInt("viewers"));
  const int requests = static_cast<int>(flags.GetInt("requests"));
  const int64_t history_steps = flags.GetInt("history-steps");
  const fs::path dir =
      fs::temp_directory_path() / ("ddpm-bench-console-" + std::to_string(getpid()));
  fs::remove_all(dir);
  int pipe_fds[2];
  if (pipe(pipe_fds) != 0) return 1;
  const pid_t child = fork();
  if (child == 0) {
    close(pipe_fds[0]);
    // The coordinator goes with the benchmark, however the benchmark ends.
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    Serve(dir, pipe_fds[1]);
  }
  close(pipe_fds[1]);
  char buffer[64] = {};
  (void)!read(pipe_fds[0], buffer, sizeof(buffer) - 1);
  close(pipe_fds[0]);
  int grpc_port = 0, http_port = 0;
  std::sscanf(buffer, "%d %d", &grpc_port, &http_port);
  ChannelOptions channel;
  channel.address = "127.0.0.1:" + std::to_string(grpc_port);
  channel.max_message_bytes = 64 << 20;
  auto control = MakeClient<v1::Control>(channel);
  auto gateway = MakeClient<v1::WorkerGateway>(channel);

  // The registry: runs, and one run on a group with its whole history.
  for (int i = 0; i < runs; ++i) {
    v1::StartRunRequest start;
    start.set_name("r" + std::to_string(i));
    start.set_config_yaml(kConfig);
    v1::StartRunResponse started;
    if (!control->StartRun(MakeContext(kControl).get(), start, &started).ok()) return 1;
  }
  v1::RegisterRequest group;
  group.set_group_id("bench");
  group.set_world_size(1);
  v1::RegisterResponse registered;
  if (!gateway->Register(MakeContext(kWorker).get(), group, &registered).ok()) return 1;
  const std::string long_run = "r0-1";  // scheduled first
  const auto beat = [&](int64_t step) {
    v1::HeartbeatRequest heartbeat;
    heartbeat.set_group_id("bench");
    heartbeat.set_rank(0);
    heartbeat.set_run_id(long_run);
    heartbeat.set_attempt(1);
    heartbeat.mutable_rank_metrics()->set_step(step);
    v1::TrainMetrics& m = *heartbeat.mutable_train_metrics();
    m.set_step(step);
    m.set_loss(0.03 + 1.0 / std::sqrt(static_cast<double>(step)));
    m.set_lr(2e-4);
    m.set_grad_norm(1);
    m.set_images_per_second(900);
    for (int q = 0; q < 4; ++q) m.add_loss_by_quartile(m.loss() * (4 - q));
    v1::HeartbeatResponse response;
    gateway->Heartbeat(MakeContext(kWorker).get(), heartbeat, &response);
  };
  for (int64_t step = 100; step <= history_steps; step += 100) beat(step);
  std::printf(
      "coordinator (pid %d): %d runs; %s with %lld history rows (%lld steps, log_every "
      "100); registry %.1f MiB\n",
      child, runs, long_run.c_str(), static_cast<long long>(history_steps / 100),
      static_cast<long long>(history_steps),
      static_cast<double>(
          fs::file_size(dir / "registry.db") +
          (fs::exists(dir / "registry.db-wal") ? fs::file_size(dir / "registry.db-wal") : 0)) /
          (1 << 20));

  httplib::Client http("127.0.0.1", http_port);
  http.set_keep_alive(true);
  const httplib::Headers auth = {{"Authorization", std::string("Bearer ") + kViewer}};
  size_t json_bytes = 0;
  const Timing rest = Measure(child, requests, [&] {
    const auto response = http.Get("/api/v1/runs", auth);
    json_bytes = response ? response->body.size() : 0;
  });
  size_t proto_bytes = 0;
  const Timing grpc = Measure(child, requests, [&] {
    v1::ListRunsResponse list;
    control->ListRuns(MakeContext(kControl).get(), v1::ListRunsRequest(), &list);
    proto_bytes = list.ByteSizeLong();
  });
  std::printf("%d runs: /api/v1/runs %.0f KiB of JSON, ListRuns %.0f KiB of Protobuf\n", runs,
              json_bytes / 1024.0, proto_bytes / 1024.0);
  Print("GET /api/v1/runs (no viewers)", rest);
  Print("gRPC Control.ListRuns (no viewers)", grpc);

  // Live viewers: each holds an event stream; a heartbeat changes the run 10 times a second.
  std::atomic<bool> done{false};
  std::atomic<int64_t> events{0};
  std::vector<std::thread> threads;
  threads.reserve(static_cast<size_t>(viewers) + 1);
  for (int v = 0; v < viewers; ++v) {
    threads.emplace_back([&] {
      httplib::Client client("127.0.0.1", http_port);
      client.set_read_timeout(60, 0);
      client.Get("/api/v1/events", auth, [&](const char* data, size_t size) {
        for (size_t i = 0; i + 1 < size; ++i) events += data[i] == '\n' && data[i + 1] == '\n';
        return !done;
      });
    });
  }
  threads.emplace_back([&] {
    int64_t step = history_steps;
    while (!done) {
      beat(step += 100);
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  });
  std::this_thread::sleep_for(std::chrono::seconds(2));
  const double idle_cpu = ProcessCpuSeconds(child);
  const auto idle_start = Clock::now();
  std::this_thread::sleep_for(std::chrono::seconds(5));
  const double streaming_cpu = (ProcessCpuSeconds(child) - idle_cpu) / (Ms(idle_start) / 1000);
  const Timing busy = Measure(child, requests, [&] { http.Get("/api/v1/runs", auth); });
  const Timing busy_grpc = Measure(child, requests, [&] {
    v1::ListRunsResponse list;
    control->ListRuns(MakeContext(kControl).get(), v1::ListRunsRequest(), &list);
  });
  std::printf(
      "%d live viewers on /api/v1/events, 10 heartbeats/s: the coordinator at %.1f%% of "
      "one core with no requests; %lld events delivered\n",
      viewers, 100 * streaming_cpu, static_cast<long long>(events.load()));
  Print("GET /api/v1/runs (with the viewers)", busy);
  Print("gRPC Control.ListRuns (with the viewers)", busy_grpc);
  const Timing curve = Measure(child, std::max(10, requests / 10), [&] {
    http.Get(("/api/v1/runs/" + long_run + "/metrics").c_str(), auth);
  });
  Print(("GET .../metrics of " + std::to_string(history_steps / 100) + " rows (<= 2000 points)")
            .c_str(),
        curve);
  done = true;
  // Wake the streams so that they see done.
  beat(history_steps + 1000000);
  for (std::thread& thread : threads) thread.join();
  if (const double keep = flags.GetDouble("keep-seconds"); keep > 0) {
    // For bench/console_page.py: the same coordinator, for a browser to load its pages.
    std::printf("console http://127.0.0.1:%d/ viewer token %s long run %s (kept %.0f s)\n",
                http_port, kViewer, long_run.c_str(), keep);
    std::fflush(stdout);
    std::this_thread::sleep_for(std::chrono::duration<double>(keep));
  }
  kill(child, SIGTERM);
  waitpid(child, nullptr, 0);

  // A heartbeat's registry write: the run record (as before the history) and the record plus
  // the history row in one transaction (now), each on a fresh registry, side by side.
  const auto cost = [&](bool history) {
    const fs::path file = dir / (history ? "with.db" : "without.db");
    Registry registry(file.string());
    v1::Run run;
    run.set_id("h-1");
    run.set_name("h");
    run.set_config_yaml(kConfig);
    registry.InsertRun(run, 1);
    const auto start = Clock::now();
    constexpr int kWrites = 2000;
    for (int i = 1; i <= kWrites; ++i) {
      run.mutable_metrics()->set_step(int64_t{100} * i);
      run.mutable_metrics()->set_loss(1.0 / i);
      for (int q = 0; q < 4 && run.metrics().loss_by_quartile_size() < 4; ++q) {
        run.mutable_metrics()->add_loss_by_quartile(0.1);
      }
      registry.Transaction([&] {
        if (history) registry.AddMetricRow(run.id(), run.metrics());
        registry.UpdateRun(run);
      });
    }
    return Ms(start) / kWrites;
  };
  const double without = cost(false), with = cost(true);
  std::printf(
      "a metrics heartbeat's registry write (synchronous=FULL): %.3f ms without the "
      "history row, %.3f ms with it (x%.2f)\n",
      without, with, with / without);
  fs::remove_all(dir);
  return 0;
}

}  // namespace
}  // namespace ddpm::bench

int main(int argc, char** argv) {
  ddpm::Flags flags("ddpm_bench_console",
                    "What the console costs the coordinator: /api/v1/runs against gRPC ListRuns, "
                    "with and without live viewers, a long run's curve, and the history's cost "
                    "in a heartbeat.");
  flags.Add("runs", "runs in the registry", "1000");
  flags.Add("viewers", "live viewers holding /api/v1/events open", "50");
  flags.Add("requests", "requests per measurement", "200");
  flags.Add("history-steps", "steps of the long run (a row every 100)", "100000");
  flags.Add("keep-seconds", "keep the coordinator serving this long after (bench/console_page.py)",
            "0");
  return ddpm::RunMain(flags, argc, argv, [&] { return ddpm::bench::Run(flags); });
}
