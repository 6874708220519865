// The coordinator's gRPC server in process, on a free loopback port, with real clients: every
// RPC, bearer-token checks, the message-size limit, TLS, and a /metrics scrape.
#include "coordinator/service.h"

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <httplib.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <future>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "coordinator/console.h"
#include "ddpm/v1/control.grpc.pb.h"
#include "ddpm/v1/worker_gateway.grpc.pb.h"
#include "proto/rpc.h"
#include "tests/grpc_probes.h"
#include "tests/http_get.h"
#include "worker/gateway_client.h"

namespace ddpm {
namespace {

namespace fs = std::filesystem;

constexpr const char* kControlToken = "control-secret";
constexpr const char* kWorkerToken = "worker-secret";

const char* kTinyConfig =
    "model: {ch: 16, ch_mult: [1, 2], num_res_blocks: 1, attn_resolutions: [8], image_size: 16, "
    "norm_groups: 8}\ntrain: {steps: 50, batch_size: 4}\n";

class ServiceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("ddpm-service-" + std::to_string(::getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    core_options_.data_dir = dir_.string();
    server_options_.listen = "127.0.0.1:0";
    server_options_.metrics_listen = "127.0.0.1:0";
    server_options_.control_token = kControlToken;
    server_options_.worker_token = kWorkerToken;
    server_options_.max_message_bytes = 64 << 10;
  }
  void TearDown() override {
    server_.reset();
    core_.reset();
    fs::remove_all(dir_);
  }
  void StartServer() {
    core_ = std::make_unique<Coordinator>(core_options_, clock_);
    server_ = std::make_unique<CoordinatorServer>(*core_, server_options_);
    ASSERT_GT(server_->port(), 0);
  }
  ChannelOptions Channel() const {
    ChannelOptions options;
    options.address = "127.0.0.1:" + std::to_string(server_->port());
    return options;
  }
  auto Control() { return MakeClient<v1::Control>(Channel()); }
  auto Gateway() { return MakeClient<v1::WorkerGateway>(Channel()); }
  static std::unique_ptr<grpc::ClientContext> Ctx(const std::string& token) {
    return MakeContext(token, std::chrono::seconds(10));
  }

  fs::path dir_;
  SystemClock clock_;
  CoordinatorOptions core_options_;
  ServerOptions server_options_;
  std::unique_ptr<Coordinator> core_;
  std::unique_ptr<CoordinatorServer> server_;
};

TEST_F(ServiceTest, HealthAndReflectionAnswerWithoutATokenAndHealthTurnsNotServingOnShutdown) {
  StartServer();
  const std::shared_ptr<grpc::Channel> channel = MakeChannel(Channel());
  // A plain client with no token: grpc.health.v1 says SERVING for the server and both services.
  EXPECT_EQ(CheckHealth(channel, "", 10), "SERVING");
  EXPECT_EQ(CheckHealth(channel, "ddpm.v1.Control", 10), "SERVING");
  EXPECT_EQ(CheckHealth(channel, "ddpm.v1.WorkerGateway", 10), "SERVING");
  EXPECT_EQ(CheckHealth(channel, "ddpm.v1.Nothing", 10), "SERVICE_UNKNOWN");
  // Reflection lists the services, as grpcurl-style tools ask.
  const std::vector<std::string> services = ReflectedServices(channel, 10);
  for (const char* name : {"ddpm.v1.Control", "ddpm.v1.WorkerGateway"}) {
    EXPECT_NE(std::find(services.begin(), services.end(), name), services.end())
        << name << " not among the " << services.size() << " reflected services";
  }
  // A watcher sees SERVING, then NOT_SERVING once shutdown has begun.
  std::vector<std::string> seen;
  std::promise<void> serving;
  std::thread watcher([&] {
    WatchHealth(channel, "", 20, [&](const std::string& status) {
      seen.push_back(status);
      if (status == "SERVING" && seen.size() == 1) serving.set_value();
      return status == "SERVING";
    });
  });
  ASSERT_EQ(serving.get_future().wait_for(std::chrono::seconds(10)), std::future_status::ready);
  server_->Shutdown();
  watcher.join();
  EXPECT_EQ(seen, (std::vector<std::string>{"SERVING", "NOT_SERVING"}));
}

TEST_F(ServiceTest, HealthIsNotServingWhileTheRegistryRefusesWritesAndServingAgainAfter) {
  server_options_.health_probe_seconds = 0.1;
  StartServer();
  const std::shared_ptr<grpc::Channel> channel = MakeChannel(Channel());
  ASSERT_EQ(CheckHealth(channel, "", 10), "SERVING");
  // The registry's write-ahead log made immutable: even root's writes fail (ext4's chattr +i).
  const std::string wal = (dir_ / "registry.db-wal").string();
  if (std::system(("chattr +i '" + wal + "' 2> /dev/null").c_str()) != 0) {
    GTEST_SKIP() << "chattr +i is not supported on " << wal
                 << "'s file system, so the registry cannot be made to refuse writes";
  }
  auto status_becomes = [&](const std::string& wanted) {
    for (int i = 0; i < 100; ++i) {
      if (CheckHealth(channel, "ddpm.v1.Control", 10) == wanted) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return false;
  };
  EXPECT_TRUE(status_becomes("NOT_SERVING"));
  EXPECT_EQ(CheckHealth(channel, "", 10), "NOT_SERVING");
  ASSERT_EQ(std::system(("chattr -i '" + wal + "'").c_str()), 0);
  EXPECT_TRUE(status_becomes("SERVING"));
}

TEST_F(ServiceTest, EveryRpcEndToEndWithRealClients) {
  StartServer();
  auto control = Control();
  auto gateway = Gateway();

  v1::StartRunRequest start;
  start.set_config_yaml(kTinyConfig);
  start.set_name("svc");
  v1::StartRunResponse started;
  ASSERT_TRUE(control->StartRun(Ctx(kControlToken).get(), start, &started).ok());
  EXPECT_EQ(started.run().id(), "svc-1");
  EXPECT_EQ(started.run().state(), v1::QUEUED);

  // A worker group registers and hears its assignment on the command stream.
  v1::RegisterRequest registration;
  registration.set_group_id("group-a");
  registration.set_world_size(2);
  registration.add_hostnames("h0");
  registration.add_hostnames("h1");
  v1::RegisterResponse registered;
  ASSERT_TRUE(gateway->Register(Ctx(kWorkerToken).get(), registration, &registered).ok());
  EXPECT_FALSE(registered.session().empty());
  v1::CommandsRequest commands;
  commands.set_group_id("group-a");
  commands.set_session(registered.session());
  auto stream_context = MakeContext(kWorkerToken, std::chrono::seconds(20));
  auto reader = gateway->Commands(stream_context.get(), commands);
  v1::GroupCommand command;
  ASSERT_TRUE(reader->Read(&command));
  EXPECT_EQ(command.kind(), v1::GroupCommand::TRAIN);
  EXPECT_EQ(command.run_id(), "svc-1");
  EXPECT_EQ(command.placement().micro_batch(), 2);

  // A watcher follows the run from here to its end. Its first event (the run as it stands)
  // says it is subscribed: only then may the heartbeats below come, or it could miss them.
  std::vector<v1::WatchRunEvent> watched;
  grpc::Status watch_status;
  std::promise<void> subscribed;
  std::thread watcher([&] {
    auto client = Control();
    auto context = MakeContext(kControlToken, std::chrono::seconds(30));
    v1::WatchRunRequest request;
    request.set_run("svc");
    auto events = client->WatchRun(context.get(), request);
    v1::WatchRunEvent event;
    bool first = true;
    while (events->Read(&event)) {
      watched.push_back(event);
      if (first) subscribed.set_value();
      first = false;
    }
    if (first) subscribed.set_value();
    watch_status = events->Finish();
  });
  ASSERT_EQ(subscribed.get_future().wait_for(std::chrono::seconds(20)), std::future_status::ready)
      << "the watcher got no first event";

  v1::HeartbeatRequest beat;
  beat.set_group_id("group-a");
  beat.set_run_id("svc-1");
  beat.set_attempt(1);
  beat.mutable_rank_metrics()->set_step(10);
  beat.mutable_train_metrics()->set_step(10);
  beat.mutable_train_metrics()->set_loss(0.5);
  v1::HeartbeatResponse beat_response;
  ASSERT_TRUE(gateway->Heartbeat(Ctx(kWorkerToken).get(), beat, &beat_response).ok());
  beat.set_rank(1);
  beat.clear_train_metrics();
  ASSERT_TRUE(gateway->Heartbeat(Ctx(kWorkerToken).get(), beat, &beat_response).ok());

  v1::ReportCheckpointRequest checkpoint;
  checkpoint.set_group_id("group-a");
  checkpoint.set_run_id("svc-1");
  checkpoint.mutable_checkpoint()->set_step(10);
  checkpoint.mutable_checkpoint()->set_path("/x/step_000000010");
  v1::ReportCheckpointResponse checkpoint_response;
  ASSERT_TRUE(
      gateway->ReportCheckpoint(Ctx(kWorkerToken).get(), checkpoint, &checkpoint_response).ok());
  v1::ReportEvalRequest eval;
  eval.set_group_id("group-a");
  eval.set_run_id("svc-1");
  eval.mutable_eval()->set_step(10);
  eval.mutable_eval()->set_fid(42.5);
  eval.mutable_eval()->set_inception_score(3.25);
  v1::ReportEvalResponse eval_response;
  ASSERT_TRUE(gateway->ReportEval(Ctx(kWorkerToken).get(), eval, &eval_response).ok());
  // A later evaluation of the bound alone keeps the FID of step 10 as the newest FID.
  v1::ReportEvalRequest bound;
  bound.set_group_id("group-a");
  bound.set_run_id("svc-1");
  bound.mutable_eval()->set_step(20);
  bound.mutable_eval()->set_nll_bits_per_dim(3.75);
  bound.mutable_eval()->set_nll_images(1000);
  ASSERT_TRUE(gateway->ReportEval(Ctx(kWorkerToken).get(), bound, &eval_response).ok());

  v1::GetRunRequest get;
  get.set_run("svc-1");
  v1::GetRunResponse got;
  ASSERT_TRUE(control->GetRun(Ctx(kControlToken).get(), get, &got).ok());
  EXPECT_EQ(got.run().state(), v1::RUNNING);
  EXPECT_EQ(got.run().latest_checkpoint().step(), 10);
  EXPECT_DOUBLE_EQ(got.run().latest_eval().fid(), 42.5);
  EXPECT_EQ(got.run().latest_eval().step(), 10);
  EXPECT_DOUBLE_EQ(got.run().latest_nll().nll_bits_per_dim(), 3.75);
  EXPECT_EQ(got.run().latest_nll().step(), 20);
  EXPECT_DOUBLE_EQ(got.run().metrics().loss(), 0.5);
  EXPECT_EQ(got.run().ranks_size(), 2);

  // The metrics endpoint shows the run.
  const std::string scraped = HttpGet(server_->metrics_port(), "/metrics");
  EXPECT_NE(scraped.find("ddpm_run_state{run=\"svc-1\"} 3"), std::string::npos) << scraped;
  EXPECT_NE(scraped.find("ddpm_train_loss{run=\"svc-1\"} 0.5"), std::string::npos);
  EXPECT_NE(scraped.find("ddpm_eval_fid{run=\"svc-1\"} 42.5"), std::string::npos);
  EXPECT_NE(scraped.find("ddpm_eval_nll_bits_per_dim{run=\"svc-1\"} 3.75"), std::string::npos);
  EXPECT_NE(scraped.find("ddpm_worker_up{group=\"group-a\",rank=\"1\"} 1"), std::string::npos);

  // A graceful stop reaches the group as STOP; its report ends the run.
  v1::StopRunRequest stop;
  stop.set_run("svc");
  v1::StopRunResponse stopped;
  ASSERT_TRUE(control->StopRun(Ctx(kControlToken).get(), stop, &stopped).ok());
  EXPECT_EQ(stopped.run().state(), v1::STOPPING);
  ASSERT_TRUE(reader->Read(&command));
  EXPECT_EQ(command.kind(), v1::GroupCommand::STOP);
  v1::ReportRunEndRequest end;
  end.set_group_id("group-a");
  end.set_run_id("svc-1");
  end.set_attempt(1);
  end.set_outcome(v1::ReportRunEndRequest::STOPPED);
  end.set_step(12);
  v1::ReportRunEndResponse end_response;
  ASSERT_TRUE(gateway->ReportRunEnd(Ctx(kWorkerToken).get(), end, &end_response).ok());
  ASSERT_TRUE(reader->Read(&command));
  EXPECT_EQ(command.kind(), v1::GroupCommand::IDLE);
  watcher.join();
  EXPECT_TRUE(watch_status.ok()) << watch_status.error_message();
  ASSERT_FALSE(watched.empty());
  EXPECT_EQ(watched.back().run().state(), v1::STOPPED);
  bool saw_metrics = false, saw_stopping = false;
  for (const v1::WatchRunEvent& event : watched) {
    saw_metrics |= event.metrics();
    saw_stopping |= event.transition().to() == v1::STOPPING;
  }
  EXPECT_TRUE(saw_metrics);
  EXPECT_TRUE(saw_stopping);

  v1::ListRunsRequest list;
  list.set_state(v1::STOPPED);
  v1::ListRunsResponse listed;
  ASSERT_TRUE(control->ListRuns(Ctx(kControlToken).get(), list, &listed).ok());
  ASSERT_EQ(listed.runs_size(), 1);
  EXPECT_EQ(listed.runs(0).transitions_size(), 0);
  v1::DeleteRunRequest remove;
  remove.set_run("svc-1");
  v1::DeleteRunResponse removed;
  ASSERT_TRUE(control->DeleteRun(Ctx(kControlToken).get(), remove, &removed).ok());
  const grpc::Status gone = control->GetRun(Ctx(kControlToken).get(), get, &got);
  EXPECT_EQ(gone.error_code(), grpc::StatusCode::NOT_FOUND);

  v1::LeaveRequest leave;
  leave.set_group_id("group-a");
  leave.set_reason("test over");
  v1::LeaveResponse left;
  ASSERT_TRUE(gateway->Leave(Ctx(kWorkerToken).get(), leave, &left).ok());
  EXPECT_TRUE(core_->Groups().empty());
  stream_context->TryCancel();
}

// A group's command stream over the wire: one that closes and opens again a second later
// (a network blip) keeps its run; one that closes for good loses it within the stream grace
// plus one heartbeat interval, long before the heartbeat timeout.
TEST_F(ServiceTest, AClosedCommandStreamLosesItsRunWithinTheGraceAndABlipDoesNot) {
  core_options_.stream_grace_seconds = 3;
  core_options_.heartbeat_interval_seconds = 1;
  core_options_.heartbeat_timeout_seconds = 120;
  StartServer();
  auto control = Control();
  auto gateway = Gateway();
  v1::StartRunRequest start;
  start.set_config_yaml(kTinyConfig);
  start.set_name("blip");
  v1::StartRunResponse started;
  ASSERT_TRUE(control->StartRun(Ctx(kControlToken).get(), start, &started).ok());
  v1::RegisterRequest registration;
  registration.set_group_id("g");
  registration.set_world_size(1);
  v1::RegisterResponse registered;
  ASSERT_TRUE(gateway->Register(Ctx(kWorkerToken).get(), registration, &registered).ok());
  v1::CommandsRequest commands;
  commands.set_group_id("g");
  commands.set_session(registered.session());
  // Opens the stream and reads the group's current command.
  auto open = [&](std::unique_ptr<grpc::ClientContext>& context) {
    context = MakeContext(kWorkerToken, std::chrono::seconds(60));
    auto reader = gateway->Commands(context.get(), commands);
    v1::GroupCommand command;
    EXPECT_TRUE(reader->Read(&command));
    EXPECT_EQ(command.kind(), v1::GroupCommand::TRAIN);
    return reader;
  };
  auto state = [&] {
    v1::GetRunRequest get;
    get.set_run("blip");
    v1::GetRunResponse got;
    EXPECT_TRUE(control->GetRun(Ctx(kControlToken).get(), get, &got).ok());
    return got.run();
  };
  std::unique_ptr<grpc::ClientContext> context;
  auto reader = open(context);
  v1::HeartbeatRequest beat;
  beat.set_group_id("g");
  beat.set_run_id("blip-1");
  beat.set_attempt(1);
  beat.mutable_rank_metrics()->set_step(3);
  v1::HeartbeatResponse beat_response;
  ASSERT_TRUE(gateway->Heartbeat(Ctx(kWorkerToken).get(), beat, &beat_response).ok());
  ASSERT_EQ(state().state(), v1::RUNNING);

  // A 1 s blip: the stream drops and the group is back with its session a second later.
  context->TryCancel();
  reader->Finish();
  std::this_thread::sleep_for(std::chrono::seconds(1));
  reader = open(context);
  std::this_thread::sleep_for(std::chrono::seconds(4));
  v1::Run run = state();
  EXPECT_EQ(run.state(), v1::RUNNING) << run.reason();
  EXPECT_EQ(run.restarts(), 0);

  // The group's process is gone: its stream closes and nothing comes back.
  context->TryCancel();
  reader->Finish();
  const auto closed = std::chrono::steady_clock::now();
  while (state().state() == v1::RUNNING &&
         std::chrono::steady_clock::now() - closed < std::chrono::seconds(30)) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - closed).count();
  run = state();
  EXPECT_EQ(run.state(), v1::QUEUED);
  EXPECT_EQ(run.restarts(), 1);
  EXPECT_GE(seconds, core_options_.stream_grace_seconds - 0.1);
  EXPECT_LE(seconds, core_options_.stream_grace_seconds + core_options_.heartbeat_interval_seconds);
  EXPECT_NE(run.transitions(run.transitions_size() - 2).reason().find("command stream closed"),
            std::string::npos)
      << run.transitions(run.transitions_size() - 2).reason();
  EXPECT_TRUE(core_->Groups().empty());
}

// Rank 0's side of one heartbeat per group, over the wire: rank 1 posts its reports to rank 0
// through the link (never to the coordinator: its own client points nowhere), rank 0 forwards
// them, and once rank 1 falls silent (stopped, as by SIGSTOP) the coordinator names it.
TEST_F(ServiceTest, RankZeroSendsTheGroupsHeartbeatAndASilentRankIsNamed) {
  core_options_.heartbeat_interval_seconds = 0.2;
  core_options_.heartbeat_timeout_seconds = 2;
  StartServer();
  struct Link : RankLink {
    std::mutex mutex;
    std::vector<std::pair<int, std::string>> queue;
    int rank = 0;
    std::shared_ptr<Link> peer;
    bool Post(const std::string& report) override {
      std::lock_guard<std::mutex> lock(peer->mutex);
      peer->queue.emplace_back(rank, report);
      return true;
    }
    std::vector<std::pair<int, std::string>> Collect() override {
      std::lock_guard<std::mutex> lock(mutex);
      return std::exchange(queue, {});
    }
  };
  auto zero = std::make_shared<Link>();
  auto one = std::make_shared<Link>();
  one->rank = 1;
  one->peer = zero;
  auto control = Control();
  v1::StartRunRequest start;
  start.set_config_yaml(kTinyConfig);
  start.set_name("gathered");
  v1::StartRunResponse started;
  ASSERT_TRUE(control->StartRun(Ctx(kControlToken).get(), start, &started).ok());
  GatewayOptions options;
  options.channel = Channel();
  options.token = kWorkerToken;
  GatewayClient client(options);
  GatewayOptions nowhere = options;
  nowhere.channel.address = "127.0.0.1:1";
  nowhere.rpc_timeout_seconds = 0.2;
  GatewayClient unreachable(nowhere);
  v1::RegisterRequest registration;
  registration.set_group_id("g");
  registration.set_world_size(2);
  v1::RegisterResponse registered;
  ASSERT_TRUE(client.Register(registration, &registered).ok());
  RankRecorder recorder0(0, "cpu", [] { return int64_t{100}; });
  RankRecorder recorder1(1, "cpu", [] { return int64_t{111}; });
  Heartbeater rank0(client, "g", recorder0, 0.2, zero.get());
  auto rank1 = std::make_unique<Heartbeater>(unreachable, "g", recorder1, 0.2, one.get());
  rank0.SetRun("gathered-1", 1);
  rank1->SetRun("gathered-1", 1);
  // Rank 1 is heard through rank 0: fresh, with its device's bytes.
  auto rank1_heard = [&] {
    const std::vector<GroupStatus> groups = core_->Groups();
    return groups.size() == 1 && groups[0].device_memory_bytes[1] == 111 &&
           groups[0].heartbeat_age_seconds[1] < 1;
  };
  for (int i = 0; i < 100 && !rank1_heard(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ASSERT_TRUE(rank1_heard());
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));
  ASSERT_TRUE(rank1_heard()) << "rank 1 went stale while it was posting";
  EXPECT_LT(rank0.PeerAges().at(1), 1.0);
  // Rank 1 stops: rank 0 goes on, and the coordinator loses the group naming rank 1.
  rank1.reset();
  auto control_get = [&] {
    v1::GetRunRequest get;
    get.set_run("gathered");
    v1::GetRunResponse got;
    EXPECT_TRUE(control->GetRun(Ctx(kControlToken).get(), get, &got).ok());
    return got.run();
  };
  for (int i = 0; i < 200 && control_get().restarts() == 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  const v1::Run run = control_get();
  ASSERT_EQ(run.restarts(), 1);
  bool named = false;
  for (const v1::Transition& transition : run.transitions()) {
    named |= transition.reason().find("no heartbeat from rank 1 of group g") != std::string::npos;
  }
  EXPECT_TRUE(named) << run.DebugString();
}

// The worker's side across a coordinator restart: reports posted while the coordinator is down
// return at once; of checkpoints only the newest is sent, of evaluations every one; they are
// accepted once the restarted coordinator knows the group again (the command channel registers
// it anew, naming its run; until then it answers NOT_FOUND, and they go again).
TEST_F(ServiceTest, RunReportsOutliveACoordinatorRestartWithTheNewestCheckpointAndEveryEval) {
  StartServer();
  const int port = server_->port();
  v1::StartRunRequest start;
  start.set_config_yaml(kTinyConfig);
  start.set_name("svc");
  v1::StartRunResponse started;
  ASSERT_TRUE(Control()->StartRun(Ctx(kControlToken).get(), start, &started).ok());

  GatewayOptions options;
  options.channel = Channel();
  options.token = kWorkerToken;
  GatewayClient client(options);
  v1::RegisterRequest registration;
  registration.set_group_id("group-a");
  registration.set_world_size(1);
  registration.add_hostnames("h0");
  CommandChannel channel(client, registration);
  const std::atomic<bool> never(false);
  ASSERT_TRUE(channel.Start(never));
  for (int i = 0; i < 200 && channel.Latest().kind() != v1::GroupCommand::TRAIN; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ASSERT_EQ(channel.Latest().kind(), v1::GroupCommand::TRAIN);
  ASSERT_EQ(channel.Latest().run_id(), "svc-1");
  channel.SetCurrentRun("svc-1", 30);

  // The coordinator goes away; two checkpoint reports and two evaluations (a FID at step 20, a
  // bound at step 30) come meanwhile.
  server_.reset();
  core_.reset();
  RunReporter reports(client, std::chrono::seconds(60));
  for (int step : {20, 30}) {
    v1::ReportCheckpointRequest request;
    request.set_group_id("group-a");
    request.set_run_id("svc-1");
    request.set_attempt(1);
    request.mutable_checkpoint()->set_step(step);
    request.mutable_checkpoint()->set_path(dir_.string() + "/step_" + std::to_string(step));
    reports.Post(request);
    v1::ReportEvalRequest eval;
    eval.set_group_id("group-a");
    eval.set_run_id("svc-1");
    eval.set_attempt(1);
    eval.mutable_eval()->set_step(step);
    if (step == 20) {
      eval.mutable_eval()->set_fid(41.5);
      eval.mutable_eval()->set_num_samples(64);
    } else {
      eval.mutable_eval()->set_nll_bits_per_dim(5.25);
      eval.mutable_eval()->set_nll_images(16);
    }
    reports.Post(eval);
  }
  EXPECT_FALSE(reports.Flush(std::chrono::milliseconds(300))) << "sent with no coordinator";
  EXPECT_EQ(reports.accepted_checkpoints(), 0);
  EXPECT_EQ(reports.accepted_evals(), 0);

  // The same coordinator comes back on the same port with its registry.
  server_options_.listen = "127.0.0.1:" + std::to_string(port);
  StartServer();
  ASSERT_EQ(server_->port(), port);
  ASSERT_TRUE(reports.Flush(std::chrono::seconds(30))) << "the reports were not sent";
  const std::vector<GroupStatus> groups = core_->Groups();
  ASSERT_EQ(groups.size(), 1U) << "the channel did not register the group again";
  EXPECT_EQ(groups[0].id, "group-a");
  EXPECT_EQ(groups[0].run_id, "svc-1") << "the group came back without its run";
  EXPECT_EQ(reports.accepted_checkpoints(), 1);
  EXPECT_EQ(reports.accepted_evals(), 2);
  v1::GetRunRequest get;
  get.set_run("svc-1");
  v1::GetRunResponse got;
  ASSERT_TRUE(Control()->GetRun(Ctx(kControlToken).get(), get, &got).ok());
  EXPECT_EQ(got.run().latest_checkpoint().step(), 30);
  EXPECT_EQ(got.run().latest_checkpoint().path(), dir_.string() + "/step_30");
  EXPECT_EQ(got.run().latest_eval().step(), 20);
  EXPECT_DOUBLE_EQ(got.run().latest_eval().fid(), 41.5);
  EXPECT_EQ(got.run().latest_nll().step(), 30);
  EXPECT_DOUBLE_EQ(got.run().latest_nll().nll_bits_per_dim(), 5.25);
  EXPECT_NE(got.run().state(), v1::FAILED) << got.run().reason();
  EXPECT_EQ(got.run().restarts(), 0);
  channel.Stop();
}

TEST_F(ServiceTest, WrongOrMissingTokensAreUnauthenticated) {
  StartServer();
  auto control = Control();
  auto gateway = Gateway();
  v1::ListRunsRequest list;
  v1::ListRunsResponse listed;
  grpc::ClientContext bare;
  EXPECT_EQ(control->ListRuns(&bare, list, &listed).error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(control->ListRuns(Ctx("guess").get(), list, &listed).error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
  // Each service takes only its own token.
  EXPECT_EQ(control->ListRuns(Ctx(kWorkerToken).get(), list, &listed).error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
  v1::RegisterRequest registration;
  registration.set_group_id("g");
  registration.set_world_size(1);
  v1::RegisterResponse registered;
  EXPECT_EQ(gateway->Register(Ctx(kControlToken).get(), registration, &registered).error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_TRUE(core_->Groups().empty());
  EXPECT_TRUE(control->ListRuns(Ctx(kControlToken).get(), list, &listed).ok());
}

TEST_F(ServiceTest, RefusedRequestsGetTheirCodeAndOversizedOnesTheLimit) {
  StartServer();
  auto control = Control();
  v1::StartRunRequest start;
  start.set_config_yaml("train: {stepz: 3}\n");
  v1::StartRunResponse started;
  const grpc::Status unknown = control->StartRun(Ctx(kControlToken).get(), start, &started);
  EXPECT_EQ(unknown.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(unknown.error_message().find("train.stepz"), std::string::npos);
  start.set_config_yaml(std::string(kTinyConfig) + "#" + std::string(100 << 10, 'x') + "\n");
  EXPECT_EQ(control->StartRun(Ctx(kControlToken).get(), start, &started).error_code(),
            grpc::StatusCode::RESOURCE_EXHAUSTED);
  v1::StopRunRequest stop;
  stop.set_run("ghost");
  v1::StopRunResponse stopped;
  EXPECT_EQ(control->StopRun(Ctx(kControlToken).get(), stop, &stopped).error_code(),
            grpc::StatusCode::NOT_FOUND);
  EXPECT_TRUE(core_->ListRuns(v1::RUN_STATE_UNSPECIFIED).empty());
}

TEST_F(ServiceTest, ServesTlsWhenGivenACertificate) {
  if (std::system("command -v openssl > /dev/null 2>&1") != 0) {
    GTEST_SKIP() << "openssl is not installed: cannot make a test certificate (apt-get install "
                    "openssl)";
  }
  fs::create_directories(dir_);
  const std::string cert = (dir_ / "cert.pem").string(), key = (dir_ / "key.pem").string();
  const std::string make =
      "openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=localhost -addext "
      "subjectAltName=IP:127.0.0.1,DNS:localhost -keyout " +
      key + " -out " + cert + " > /dev/null 2>&1";
  ASSERT_EQ(std::system(make.c_str()), 0) << make;
  server_options_.tls_cert = cert;
  server_options_.tls_key = key;
  server_options_.http_listen = "127.0.0.1:0";
  server_options_.viewer_token = "viewer-secret";
  StartServer();
  ChannelOptions tls = Channel();
  tls.tls_ca = cert;
  auto secure = MakeClient<v1::Control>(tls);
  v1::ListRunsRequest list;
  v1::ListRunsResponse listed;
  const grpc::Status ok = secure->ListRuns(Ctx(kControlToken).get(), list, &listed);
  EXPECT_TRUE(ok.ok()) << ok.error_message();
  // A plaintext client cannot talk to it.
  EXPECT_FALSE(Control()->ListRuns(Ctx(kControlToken).get(), list, &listed).ok());
  // The console serves HTTPS with the same certificate, and no plain HTTP.
  ASSERT_NE(server_->console(), nullptr);
  const int port = server_->console()->port();
  EXPECT_EQ(server_->console()->url(), "https://127.0.0.1:" + std::to_string(port) + "/");
  httplib::SSLClient https("127.0.0.1", port);
  https.set_ca_cert_path(cert.c_str());
  https.enable_server_certificate_verification(true);
  const auto runs = https.Get("/api/v1/runs", {{"Authorization", "Bearer viewer-secret"}});
  ASSERT_TRUE(runs) << httplib::to_string(runs.error());
  EXPECT_EQ(runs->status, 200);
  httplib::Client plain("127.0.0.1", port);
  plain.set_read_timeout(5, 0);
  const auto refused = plain.Get("/api/v1/runs", {{"Authorization", "Bearer viewer-secret"}});
  EXPECT_FALSE(refused && refused->status == 200);
}

TEST_F(ServiceTest, MutualTlsAdmitsOnlyWorkerGroupsWithACertificateOfTheClientCa) {
  if (std::system("command -v openssl > /dev/null 2>&1") != 0) {
    GTEST_SKIP() << "openssl is not installed: cannot make test certificates (apt-get install "
                    "openssl)";
  }
  fs::create_directories(dir_);
  const auto path = [&](const std::string& name) { return (dir_ / name).string(); };
  // The server's own certificate; the workers' CA and a worker certificate it signed; and a
  // certificate of the same name that nobody signed.
  const std::string make =
      "cd " + dir_.string() +
      " && openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=localhost -addext "
      "subjectAltName=IP:127.0.0.1,DNS:localhost -keyout server.key -out server.pem"
      " && openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=workers-ca -keyout ca.key "
      "-out ca.pem"
      " && openssl req -newkey rsa:2048 -nodes -subj /CN=group -keyout worker.key -out worker.csr"
      " && openssl x509 -req -in worker.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 "
      "-out worker.pem"
      " && openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=group -keyout rogue.key "
      "-out rogue.pem > /dev/null 2>&1";
  ASSERT_EQ(std::system((make + " > /dev/null 2>&1").c_str()), 0) << make;
  server_options_.tls_cert = path("server.pem");
  server_options_.tls_key = path("server.key");
  server_options_.tls_client_ca = path("ca.pem");
  StartServer();

  const auto gateway = [&](const std::string& cert, const std::string& key) {
    ChannelOptions options = Channel();
    options.tls_ca = path("server.pem");
    options.tls_cert = cert;
    options.tls_key = key;
    return MakeClient<v1::WorkerGateway>(options);
  };
  v1::RegisterRequest registration;
  registration.set_group_id("g");
  registration.set_world_size(1);
  v1::RegisterResponse registered;
  // No client certificate: refused by name, even with the right token.
  const grpc::Status bare =
      gateway("", "")->Register(Ctx(kWorkerToken).get(), registration, &registered);
  EXPECT_EQ(bare.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_NE(bare.error_message().find("client certificate signed by the coordinator's "
                                      "--tls-client-ca"),
            std::string::npos)
      << bare.error_message();
  // A certificate the CA did not sign: the handshake fails.
  EXPECT_FALSE(gateway(path("rogue.pem"), path("rogue.key"))
                   ->Register(Ctx(kWorkerToken).get(), registration, &registered)
                   .ok());
  // The CA's worker certificate, with the worker token: in.
  const grpc::Status signed_in = gateway(path("worker.pem"), path("worker.key"))
                                     ->Register(Ctx(kWorkerToken).get(), registration, &registered);
  EXPECT_TRUE(signed_in.ok()) << signed_in.error_message();
  // ddpmctl's Control calls need no client certificate, only TLS and the control token.
  ChannelOptions control = Channel();
  control.tls_ca = path("server.pem");
  v1::ListRunsRequest list;
  v1::ListRunsResponse listed;
  const grpc::Status listed_ok =
      MakeClient<v1::Control>(control)->ListRuns(Ctx(kControlToken).get(), list, &listed);
  EXPECT_TRUE(listed_ok.ok()) << listed_ok.error_message();
}

TEST_F(ServiceTest, TokensAppearInNoErrorMessage) {
  StartServer();
  v1::ListRunsRequest list;
  v1::ListRunsResponse listed;
  // The wrong token, and the worker token on the control service: refused without echoing
  // either token (or the right one).
  for (const std::string& token : {std::string("guess-1234"), std::string(kWorkerToken)}) {
    const grpc::Status refused = Control()->ListRuns(Ctx(token).get(), list, &listed);
    EXPECT_EQ(refused.error_code(), grpc::StatusCode::UNAUTHENTICATED);
    for (const std::string& secret : {token, std::string(kControlToken)}) {
      EXPECT_EQ(refused.error_message().find(secret), std::string::npos) << refused.error_message();
    }
  }
}

TEST(ServiceSetup, MetricsBindLoopbackByDefaultAndMutualTlsNeedsTls) {
  const ServerOptions defaults;
  EXPECT_EQ(defaults.metrics_listen.rfind("127.0.0.1:", 0), 0u) << defaults.metrics_listen;
  EXPECT_EQ(defaults.listen.rfind("127.0.0.1:", 0), 0u) << defaults.listen;
  CoordinatorOptions core_options;
  core_options.data_dir =
      (fs::temp_directory_path() / ("ddpm-mtls-" + std::to_string(getpid()))).string();
  SystemClock clock;
  Coordinator core(core_options, clock);
  ServerOptions options;
  options.listen = "127.0.0.1:0";
  options.metrics_listen = "";
  options.control_token = "c";
  options.worker_token = "w";
  options.tls_client_ca = "/nonexistent/ca.pem";
  try {
    CoordinatorServer server(core, options);
    FAIL() << "mutual TLS without TLS must be refused";
  } catch (const RpcSetupError& e) {
    EXPECT_NE(std::string(e.what()).find("--tls-client-ca (mutual TLS for worker groups) needs "
                                         "TLS"),
              std::string::npos)
        << e.what();
  }
  ChannelOptions half;
  half.tls_ca = "/nonexistent/ca.pem";
  half.tls_cert = "/nonexistent/cert.pem";
  EXPECT_THROW(MakeChannel(half), RpcSetupError) << "a client certificate without its key";
  fs::remove_all(core_options.data_dir);
}

TEST(ServiceSetup, TokensMustBeSetAndDistinct) {
  CoordinatorOptions core_options;
  core_options.data_dir =
      (fs::temp_directory_path() / ("ddpm-setup-" + std::to_string(getpid()))).string();
  SystemClock clock;
  Coordinator core(core_options, clock);
  ServerOptions options;
  options.listen = "127.0.0.1:0";
  options.metrics_listen = "";
  options.control_token = "same";
  options.worker_token = "same";
  EXPECT_THROW(CoordinatorServer(core, options), RpcSetupError);
  options.worker_token = "";
  EXPECT_THROW(CoordinatorServer(core, options), RpcSetupError);
  fs::remove_all(core_options.data_dir);
}

}  // namespace
}  // namespace ddpm
