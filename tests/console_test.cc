// The web console in process over a real core, with a real HTTP client on a free loopback port:
// the security headers, each refusal by name (tokens, roles, cross-site POSTs, files outside
// the runs directory), the JSON API over the Protobuf messages, the metric history, and the
// live event streams. The page itself is tested in a real browser (tests/browser_console.py).
#include "coordinator/console.h"

#include <google/protobuf/util/json_util.h>
#include <gtest/gtest.h>
#include <httplib.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <future>
#include <string>

#include "coordinator/service.h"
#include "ddpm/v1/control.grpc.pb.h"
#include "proto/rpc.h"

namespace ddpm {
namespace {

namespace fs = std::filesystem;

constexpr const char* kViewer = "viewer-secret-7f3a";
constexpr const char* kControl = "control-secret-91bc";

const char* kConfig =
    "model: {ch: 16, ch_mult: [1, 2], num_res_blocks: 1, attn_resolutions: [8], image_size: 16, "
    "norm_groups: 8}\ntrain: {steps: 100, batch_size: 4, checkpoint_every: 10}\n";

template <typename Message>
Message Parse(const std::string& json) {
  Message message;
  const auto status = google::protobuf::util::JsonStringToMessage(json, &message);
  EXPECT_TRUE(status.ok()) << json;
  return message;
}

class ConsoleTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("ddpm-console-" + std::to_string(::getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    CoordinatorOptions options;
    options.data_dir = dir_.string();
    core_ = std::make_unique<Coordinator>(options, clock_);
    ConsoleOptions console;
    console.listen = "127.0.0.1:0";
    console.viewer_token = kViewer;
    console.control_token = kControl;
    console.max_points = 50;
    console_ = std::make_unique<Console>(*core_, console);
    client_ = std::make_unique<httplib::Client>("127.0.0.1", console_->port());
    client_->set_read_timeout(10, 0);
  }
  void TearDown() override {
    client_.reset();
    console_.reset();
    core_.reset();
    fs::remove_all(dir_);
  }
  httplib::Result Get(const std::string& path, const std::string& token) {
    httplib::Headers headers;
    if (!token.empty()) headers.emplace("Authorization", "Bearer " + token);
    return client_->Get(path.c_str(), headers);
  }
  httplib::Result Post(const std::string& path, const std::string& token, const std::string& body,
                       const std::string& type = "application/json",
                       const std::string& origin = "") {
    httplib::Headers headers;
    if (!token.empty()) headers.emplace("Authorization", "Bearer " + token);
    if (!origin.empty()) headers.emplace("Origin", origin);
    return client_->Post(path.c_str(), headers, body, type.c_str());
  }
  // The status and the one-line error of a refused request.
  static std::pair<int, std::string> Refusal(const httplib::Result& result) {
    if (!result) return {0, "no response"};
    return {result->status, Parse<v1::ApiError>(result->body).error()};
  }
  v1::Run Queue(const std::string& name) {
    v1::StartRunRequest request;
    request.set_name(name);
    request.set_config_yaml(kConfig);
    return core_->StartRun(request);
  }

  fs::path dir_;
  FakeClock clock_;
  std::unique_ptr<Coordinator> core_;
  std::unique_ptr<Console> console_;
  std::unique_ptr<httplib::Client> client_;
};

TEST_F(ConsoleTest, ThePageAndTheApiSendTheSecurityHeadersAndThePageHoldsNoData) {
  const v1::Run run = Queue("alpha");
  for (const std::string path : {"/", "/app.js", "/style.css", "/chart.min.js"}) {
    const auto page = Get(path, "");
    ASSERT_TRUE(page) << path;
    EXPECT_EQ(page->status, 200) << path;
    const std::string csp = page->get_header_value("Content-Security-Policy");
    EXPECT_NE(csp.find("frame-ancestors 'none'"), std::string::npos) << csp;
    EXPECT_NE(csp.find("script-src 'self'"), std::string::npos) << csp;
    EXPECT_EQ(csp.find("unsafe-inline"), std::string::npos) << csp;
    EXPECT_EQ(page->get_header_value("X-Content-Type-Options"), "nosniff");
    // Static files, the same for everyone: no run, no token.
    EXPECT_EQ(page->body.find(run.id()), std::string::npos) << path;
    EXPECT_EQ(page->body.find(kViewer), std::string::npos) << path;
    EXPECT_EQ(page->body.find(kControl), std::string::npos) << path;
  }
  const auto index = Get("/", "");
  EXPECT_EQ(index->get_header_value("Content-Type"), "text/html; charset=utf-8");
  // No inline script: every <script> has a src.
  EXPECT_EQ(index->body.find("<script>"), std::string::npos);
  const auto api = Get("/api/v1/runs", kViewer);
  ASSERT_TRUE(api);
  EXPECT_EQ(api->status, 200);
  EXPECT_EQ(api->get_header_value("X-Content-Type-Options"), "nosniff");
  EXPECT_NE(api->get_header_value("Content-Security-Policy").find("frame-ancestors 'none'"),
            std::string::npos);
  EXPECT_EQ(api->get_header_value("Cache-Control"), "no-store");
}

TEST_F(ConsoleTest, EachRefusalNamesWhatWasRefused) {
  const v1::Run run = Queue("alpha");
  const std::string stop = "/api/v1/runs/" + run.id() + ":stop";
  EXPECT_EQ(Refusal(Get("/api/v1/runs", "")),
            std::make_pair(401, std::string("no bearer token: send the viewer or the control "
                                            "token as 'Authorization: Bearer TOKEN'")));
  EXPECT_EQ(Refusal(Get("/api/v1/runs", "guess")),
            std::make_pair(401, std::string("the bearer token is neither the viewer nor the "
                                            "control token")));
  EXPECT_EQ(Refusal(Get("/api/v1/runs/" + run.id(), "")).first, 401);
  EXPECT_EQ(Refusal(Post(stop, kViewer, "{}")),
            std::make_pair(
                403, "POST " + stop + " needs the control token; the viewer token only reads"));
  // What a cross-site form can send: a form's content types, or a page of another origin.
  const std::string multipart =
      "--x\r\nContent-Disposition: form-data; name=\"immediate\"\r\n\r\ntrue\r\n--x--\r\n";
  for (const auto& [type, body] : std::vector<std::pair<std::string, std::string>>{
           {"application/x-www-form-urlencoded", "immediate=true"},
           {"multipart/form-data; boundary=x", multipart},
           {"text/plain", "immediate=true"}}) {
    EXPECT_EQ(Refusal(Post(stop, kControl, body, type)),
              std::make_pair(415, "POST " + stop + " takes Content-Type application/json, not '" +
                                      type + "'"));
  }
  EXPECT_EQ(Refusal(Post(stop, kControl, "{}", "application/json", "https://evil.example")),
            std::make_pair(403, "POST " + stop +
                                    " from origin https://evil.example refused: actions come "
                                    "from the console's own page"));
  EXPECT_EQ(Refusal(Get("/api/v1/runs?state=DONE", kViewer)),
            std::make_pair(400, std::string("query parameter state='DONE' is not a run state "
                                            "(QUEUED .. FAILED)")));
  EXPECT_EQ(Refusal(Get("/api/v1/runs/ghost", kViewer)),
            std::make_pair(404, std::string("no run 'ghost'")));
  EXPECT_EQ(Refusal(Get("/api/v1/runs/" + run.id() + "/metrics?since=ten", kViewer)),
            std::make_pair(400, std::string("query parameter since='ten' is not a whole number")));
  const auto unknown_field = Refusal(Post(stop, kControl, R"({"right_now": true})"));
  EXPECT_EQ(unknown_field.first, 400);
  EXPECT_NE(unknown_field.second.find("not a ddpm.v1.StopRunRequest in JSON"), std::string::npos)
      << unknown_field.second;
  EXPECT_NE(unknown_field.second.find("right_now"), std::string::npos) << unknown_field.second;
  EXPECT_EQ(Refusal(Get("/api/v1/nothing", kViewer)),
            std::make_pair(404, std::string("GET /api/v1/nothing: no such page or API call")));
  // None of it changed the run.
  EXPECT_EQ(core_->GetRun(run.id()).state(), v1::QUEUED);
}

TEST_F(ConsoleTest, TheViewerTokenSeesEverythingAndOnlyTheControlTokenActs) {
  const v1::Run run = Queue("alpha");
  EXPECT_EQ(Parse<v1::Session>(Get("/api/v1/session", kViewer)->body).role(), "viewer");
  EXPECT_EQ(Parse<v1::Session>(Get("/api/v1/session", kControl)->body).role(), "control");
  for (const std::string token : {kViewer, kControl}) {
    const auto list = Parse<v1::ListRunsResponse>(Get("/api/v1/runs", token)->body);
    ASSERT_EQ(list.runs_size(), 1);
    EXPECT_EQ(list.runs(0).id(), run.id());
    EXPECT_EQ(Parse<v1::GetRunResponse>(Get("/api/v1/runs/" + run.id(), token)->body)
                  .run()
                  .transitions_size(),
              1);
    EXPECT_EQ(
        Parse<v1::ListRunsResponse>(Get("/api/v1/runs?state=RUNNING", token)->body).runs_size(), 0);
  }
  // Start, stop and delete with the control token.
  v1::StartRunRequest start;
  start.set_name("beta");
  start.set_config_yaml(kConfig);
  start.set_priority(3);
  const auto started = Post("/api/v1/runs", kControl, ToJson(start));
  ASSERT_EQ(started->status, 201) << started->body;
  const auto response = Parse<v1::StartRunResponse>(started->body);
  EXPECT_EQ(response.run().priority(), 3);
  EXPECT_EQ(response.page_url(), console_->url() + "#/runs/" + response.run().id());
  const auto stopped = Post("/api/v1/runs/" + run.id() + ":stop", kControl, "{}");
  ASSERT_EQ(stopped->status, 200) << stopped->body;
  EXPECT_EQ(Parse<v1::StopRunResponse>(stopped->body).run().state(), v1::STOPPED);
  EXPECT_EQ(Post("/api/v1/runs/" + run.id() + ":delete", kControl, "{}")->status, 200);
  EXPECT_EQ(Refusal(Get("/api/v1/runs/" + run.id(), kControl)).first, 404);
  // A config that does not load is refused naming the key, and nothing is stored.
  start.set_config_yaml("train: {stepz: 3}\n");
  const auto bad = Refusal(Post("/api/v1/runs", kControl, ToJson(start)));
  EXPECT_EQ(bad.first, 400);
  EXPECT_NE(bad.second.find("stepz"), std::string::npos) << bad.second;
  EXPECT_EQ(core_->ListRuns(v1::RUN_STATE_UNSPECIFIED).size(), 1U);
}

TEST_F(ConsoleTest, RunFilesAreServedOnlyFromInsideTheRunsDirectory) {
  const v1::Run run = Queue("alpha");
  const fs::path run_dir = run.run_dir();
  fs::create_directories(run_dir / "samples");
  const std::string png = std::string("\x89PNG\r\n\x1a\n", 8) + "grid bytes";
  std::ofstream(run_dir / "samples" / "step_000000010.png", std::ios::binary) << png;
  // Files outside the runs directory, and ways to reach them.
  const fs::path outside = dir_ / "secret.png";
  std::ofstream(outside) << "not yours";
  fs::create_symlink(outside, run_dir / "samples" / "leak.png");
  fs::create_directory_symlink(dir_, run_dir / "up");
  std::ofstream(run_dir / "config.yaml") << "train: {}";
  const std::string files = "/api/v1/runs/" + run.id() + "/files/";

  const auto served = Get(files + "samples/step_000000010.png", kViewer);
  ASSERT_TRUE(served);
  EXPECT_EQ(served->status, 200);
  EXPECT_EQ(served->body, png);
  EXPECT_EQ(served->get_header_value("Content-Type"), "image/png");
  EXPECT_EQ(Refusal(Get(files + "samples/step_000000010.png", "")).first, 401);

  EXPECT_EQ(Refusal(Get(files + "../../secret.png", kViewer)),
            std::make_pair(403, std::string("file '../../secret.png': '..' leads out of the run "
                                            "directory")));
  EXPECT_EQ(Refusal(Get(files + "samples/%2e%2e/%2e%2e/%2e%2e/secret.png", kViewer)),
            std::make_pair(403, std::string("file 'samples/../../../secret.png': '..' leads out "
                                            "of the run directory")));
  EXPECT_EQ(Refusal(Get(files + outside.string(), kViewer)),
            std::make_pair(403, "file '" + outside.string() +
                                    "': an absolute path; give one relative to the run"));
  EXPECT_EQ(Refusal(Get(files + "samples/leak.png", kViewer)),
            std::make_pair(403, std::string("file 'samples/leak.png': it leads (through a "
                                            "symlink) out of the run directory")));
  EXPECT_EQ(Refusal(Get(files + "up/secret.png", kViewer)),
            std::make_pair(403, std::string("file 'up/secret.png': it leads (through a "
                                            "symlink) out of the run directory")));
  EXPECT_EQ(Refusal(Get(files + "config.yaml", kViewer)),
            std::make_pair(403, std::string("file 'config.yaml': only .png and .csv files of a "
                                            "run are served")));
  EXPECT_EQ(Refusal(Get(files + "samples/none.png", kViewer)),
            std::make_pair(403, std::string("file 'samples/none.png': no such file in the run "
                                            "directory")));
  // The check itself, without HTTP: a run directory that is not under the runs directory.
  EXPECT_THROW(ResolveRunFile(core_->runs_dir(), dir_.string(), "secret.png"), FileRefused);
}

TEST_F(ConsoleTest, TheHistoryAndTheScorecardComeFromTheRegistryAndTheRunDirectory) {
  const v1::Run run = Queue("alpha");
  v1::RegisterRequest group;
  group.set_group_id("g");
  group.set_world_size(2);
  group.add_hostnames("node-a");
  group.add_hostnames("node-b");
  group.add_devices("cpu");
  group.add_devices("cpu");
  core_->Register(group);
  for (int64_t step = 1; step <= 80; ++step) {
    v1::HeartbeatRequest beat;
    beat.set_group_id("g");
    beat.set_rank(0);
    beat.set_run_id(run.id());
    beat.mutable_rank_metrics()->set_step(step);
    beat.mutable_rank_metrics()->set_step_seconds(0.25);
    beat.mutable_train_metrics()->set_step(step);
    beat.mutable_train_metrics()->set_loss(step == 33 ? 9.0 : 1.0 / static_cast<double>(step));
    core_->Heartbeat(beat);
  }
  for (const int64_t step : {10, 20}) {
    v1::ReportCheckpointRequest checkpoint;
    checkpoint.set_group_id("g");
    checkpoint.set_run_id(run.id());
    checkpoint.mutable_checkpoint()->set_step(step);
    checkpoint.mutable_checkpoint()->set_path(run.run_dir() + "/checkpoints/step_" +
                                              std::to_string(step));
    core_->ReportCheckpoint(checkpoint);
  }
  v1::ReportEvalRequest eval;
  eval.set_group_id("g");
  eval.set_run_id(run.id());
  eval.mutable_eval()->set_step(20);
  eval.mutable_eval()->set_fid(41.25);
  eval.mutable_eval()->set_inception_score(2.5);
  eval.mutable_eval()->set_num_samples(100);
  core_->ReportEval(eval);
  fs::create_directories(fs::path(run.run_dir()) / "samples");
  for (const int step : {9, 18, 30}) {
    char name[32];
    std::snprintf(name, sizeof(name), "step_%09d.png", step);
    std::ofstream(fs::path(run.run_dir()) / "samples" / name) << "png";
  }

  // 80 rows, served at most max_points (the console's cap, 50) with the spike kept.
  const auto history =
      Parse<v1::MetricHistory>(Get("/api/v1/runs/" + run.id() + "/metrics", kViewer)->body);
  EXPECT_EQ(history.rows(), 80);
  EXPECT_TRUE(history.downsampled());
  EXPECT_LE(history.points_size(), 50);
  EXPECT_EQ(history.max_points(), 50);
  bool spike = false;
  for (const auto& point : history.points()) spike = spike || point.step() == 33;
  EXPECT_TRUE(spike);
  const auto since = Parse<v1::MetricHistory>(
      Get("/api/v1/runs/" + run.id() + "/metrics?since=70&max_points=5000", kViewer)->body);
  EXPECT_EQ(since.points_size(), 10);
  EXPECT_EQ(since.points(0).step(), 71);

  const auto card =
      Parse<v1::Scorecard>(Get("/api/v1/runs/" + run.id() + "/checkpoints", kViewer)->body);
  ASSERT_EQ(card.rows_size(), 2);
  ASSERT_EQ(card.grids_size(), 3);
  EXPECT_EQ(card.grids(2).path(), "samples/step_000000030.png");
  EXPECT_EQ(card.rows(0).checkpoint().step(), 10);
  EXPECT_EQ(card.rows(0).grid().step(), 9);  // nearest to 10
  EXPECT_FALSE(card.rows(0).has_eval());
  EXPECT_EQ(card.rows(1).grid().step(), 18);
  EXPECT_DOUBLE_EQ(card.rows(1).eval().fid(), 41.25);

  const auto evaluations =
      Parse<v1::Evaluations>(Get("/api/v1/runs/" + run.id() + "/evaluations", kViewer)->body);
  ASSERT_EQ(evaluations.evaluations_size(), 1);
  ASSERT_EQ(evaluations.sweeps_size(), 1);
  EXPECT_EQ(evaluations.sweeps(0).against(), "step");
  EXPECT_DOUBLE_EQ(evaluations.sweeps(0).points(0).fid(), 41.25);

  const auto groups = Parse<v1::ListGroupsResponse>(Get("/api/v1/groups", kViewer)->body);
  ASSERT_EQ(groups.groups_size(), 1);
  EXPECT_EQ(groups.groups(0).run(), run.id());
  ASSERT_EQ(groups.groups(0).ranks_size(), 2);
  EXPECT_EQ(groups.groups(0).ranks(1).host(), "node-b");
  EXPECT_EQ(groups.groups(0).ranks(0).step(), 80);
  EXPECT_DOUBLE_EQ(groups.groups(0).ranks(0).step_seconds(), 0.25);
}

TEST_F(ConsoleTest, AWatchStreamSendsTheRunThenEachChangeUntilItEnds) {
  const v1::Run run = Queue("alpha");
  std::promise<std::string> received;
  std::thread watcher([&] {
    httplib::Client client("127.0.0.1", console_->port());
    client.set_read_timeout(20, 0);
    std::string text;
    client.Get(("/api/v1/runs/" + run.id() + "/watch").c_str(),
               httplib::Headers{{"Authorization", std::string("Bearer ") + kViewer}},
               [&](const char* data, size_t size) {
                 text.append(data, size);
                 return true;
               });
    received.set_value(text);
  });
  // Give the stream its first event, then stop the run: STOPPED at once, and the stream ends.
  for (int i = 0; i < 100 && core_->GetRun(run.id()).state() == v1::QUEUED; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    if (i == 10) core_->StopRun(run.id(), false);
  }
  auto future = received.get_future();
  ASSERT_EQ(future.wait_for(std::chrono::seconds(20)), std::future_status::ready);
  watcher.join();
  const std::string text = future.get();
  // Each frame: "event: run" and one data line of a WatchRunEvent.
  std::vector<v1::WatchRunEvent> events;
  size_t at = 0;
  while ((at = text.find("event: run\ndata: ", at)) != std::string::npos) {
    at += 17;
    events.push_back(Parse<v1::WatchRunEvent>(text.substr(at, text.find('\n', at) - at)));
  }
  ASSERT_GE(events.size(), 2U) << text;
  EXPECT_EQ(events.front().run().state(), v1::QUEUED);
  EXPECT_EQ(events.back().run().state(), v1::STOPPED);
  EXPECT_EQ(events.back().transition().to(), v1::STOPPED);
  EXPECT_NE(text.find("event: end\n"), std::string::npos) << text;
}

TEST(ConsoleInService, StartRunOverGrpcGivesTheRunsPageAndTheConsoleNeedsBothTokens) {
  const fs::path dir =
      fs::temp_directory_path() / ("ddpm-console-grpc-" + std::to_string(::getpid()));
  fs::remove_all(dir);
  CoordinatorOptions core_options;
  core_options.data_dir = dir.string();
  SystemClock clock;
  Coordinator core(core_options, clock);
  ServerOptions options;
  options.listen = "127.0.0.1:0";
  options.metrics_listen = "";
  options.http_listen = "127.0.0.1:0";
  options.control_token = kControl;
  options.worker_token = "worker-secret";
  // The console without a viewer token refuses to start, naming it.
  try {
    CoordinatorServer refused(core, options);
    FAIL() << "a console without a viewer token started";
  } catch (const RpcSetupError& error) {
    EXPECT_STREQ(error.what(), "the console needs a viewer and a control token");
  }
  options.viewer_token = kViewer;
  CoordinatorServer server(core, options);
  ASSERT_NE(server.console(), nullptr);
  ChannelOptions channel;
  channel.address = "127.0.0.1:" + std::to_string(server.port());
  auto control = MakeClient<v1::Control>(channel);
  v1::StartRunRequest request;
  request.set_name("paged");
  request.set_config_yaml(kConfig);
  v1::StartRunResponse response;
  ASSERT_TRUE(control->StartRun(MakeContext(kControl).get(), request, &response).ok());
  EXPECT_EQ(response.page_url(), "http://127.0.0.1:" + std::to_string(server.console()->port()) +
                                     "/#/runs/" + response.run().id());
  server.Shutdown();
  fs::remove_all(dir);
}

}  // namespace
}  // namespace ddpm
