// The coordinator's core without gRPC: the run state machine, scheduling decisions, heartbeats
// and restarts on a fake clock, persistence across a restart, and refused input that changes
// nothing stored.
#include <gtest/gtest.h>
#include <sqlite3.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "coordinator/core.h"

namespace ddpm {
namespace {

namespace fs = std::filesystem;

// A tiny config; batch and world-size keys vary per test.
std::string ConfigYaml(int batch = 8, const std::string& dist = "") {
  return "model: {ch: 16, ch_mult: [1, 2], num_res_blocks: 1, attn_resolutions: [8], "
         "image_size: 16, norm_groups: 8}\n"
         "train: {steps: 100, batch_size: " +
         std::to_string(batch) + ", checkpoint_every: 10}\n" +
         (dist.empty() ? "" : "dist: " + dist + "\n");
}

v1::StartRunRequest Start(const std::string& name, const std::string& yaml, int priority = 0) {
  v1::StartRunRequest request;
  request.set_name(name);
  request.set_config_yaml(yaml);
  request.set_priority(priority);
  return request;
}

v1::RegisterRequest Group(const std::string& id, int world) {
  v1::RegisterRequest request;
  request.set_group_id(id);
  request.set_world_size(world);
  return request;
}

class CoordinatorTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("ddpm-core-" + std::to_string(::getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    options_.data_dir = dir_.string();
    options_.heartbeat_interval_seconds = 1;
    options_.heartbeat_timeout_seconds = 10;
    core_ = std::make_unique<Coordinator>(options_, clock_);
  }
  void TearDown() override {
    core_.reset();
    fs::remove_all(dir_);
  }
  void Reopen() {
    core_.reset();
    core_ = std::make_unique<Coordinator>(options_, clock_);
  }
  // The group's command now.
  v1::GroupCommand CommandOf(const std::string& group, const std::string& session) {
    int64_t version = 0;
    return *core_->WaitForCommand(group, session, version, std::chrono::steady_clock::now());
  }
  // Everything stored, as one string to compare before and after a refused request.
  std::string Stored() {
    std::string all;
    for (const v1::Run& run : core_->ListRuns(v1::RUN_STATE_UNSPECIFIED)) {
      all += core_->GetRun(run.id()).SerializeAsString();
    }
    return all;
  }
  void Heartbeat(const std::string& group, int rank, const std::string& run, int64_t step) {
    v1::HeartbeatRequest request;
    request.set_group_id(group);
    request.set_rank(rank);
    request.set_run_id(run);
    request.mutable_rank_metrics()->set_step(step);
    core_->Heartbeat(request);
  }

  fs::path dir_;
  FakeClock clock_;
  CoordinatorOptions options_;
  std::unique_ptr<Coordinator> core_;
};

TEST_F(CoordinatorTest, StartRunQueuesAndRecordsTheTransition) {
  const v1::Run run = core_->StartRun(Start("alpha", ConfigYaml()));
  EXPECT_EQ(run.id(), "alpha-1");
  EXPECT_EQ(run.state(), v1::QUEUED);
  EXPECT_EQ(run.total_steps(), 100);
  EXPECT_EQ(run.run_dir(), (fs::absolute(dir_) / "runs" / "alpha-1").lexically_normal().string());
  ASSERT_EQ(run.transitions_size(), 1);
  EXPECT_EQ(run.transitions(0).from(), v1::RUN_STATE_UNSPECIFIED);
  EXPECT_EQ(run.transitions(0).to(), v1::QUEUED);
  EXPECT_EQ(run.transitions(0).at_unix_ms(), clock_.NowUnixMs());
}

TEST_F(CoordinatorTest, RefusedStartRunsNameTheProblemAndStoreNothing) {
  const std::string before = Stored();
  const auto refused = [&](const std::string& yaml, const std::string& expected) {
    try {
      core_->StartRun(Start("bad", yaml));
      ADD_FAILURE() << "accepted: " << yaml;
    } catch (const CoordinatorError& error) {
      EXPECT_EQ(error.code(), ErrorCode::kInvalidArgument);
      EXPECT_NE(std::string(error.what()).find(expected), std::string::npos) << error.what();
    }
  };
  refused("model: {ch: [16\n", "YAML syntax error");
  refused("model: {chh: 16}\n", "model.chh");
  refused(ConfigYaml(8, "{world_size: 3}"),
          "train.batch_size: 8 does not divide into world size 3");
  refused(ConfigYaml(8, "{world_size: 16}"),
          "train.batch_size: 8 does not divide into world size 16");
  // A config that sets nothing would train the paper's UNet for 800k steps.
  refused("", "config_yaml: the config sets nothing");
  refused("# only a comment\n\n", "config_yaml: the config sets nothing");
  refused("{}\n", "config_yaml: the config sets nothing");
  v1::StartRunRequest low = Start("low", ConfigYaml());
  low.set_priority(-1);
  try {
    core_->StartRun(low);
    ADD_FAILURE() << "a negative priority was accepted";
  } catch (const CoordinatorError& error) {
    EXPECT_EQ(error.code(), ErrorCode::kInvalidArgument);
    EXPECT_NE(std::string(error.what()).find("priority must be >= 0"), std::string::npos)
        << error.what();
  }
  EXPECT_EQ(Stored(), before);
  // No run number was used up by the refusals.
  EXPECT_EQ(core_->StartRun(Start("good", ConfigYaml())).id(), "good-1");
}

TEST_F(CoordinatorTest, AnEmptyRunOrGroupIdIsAnInvalidArgumentNotAMissingRun) {
  core_->StartRun(Start("alpha", ConfigYaml()));
  const auto invalid = [](const std::function<void()>& call, const std::string& expected) {
    try {
      call();
      ADD_FAILURE() << "accepted an empty id";
    } catch (const CoordinatorError& error) {
      EXPECT_EQ(error.code(), ErrorCode::kInvalidArgument) << error.what();
      EXPECT_NE(std::string(error.what()).find(expected), std::string::npos) << error.what();
    }
  };
  invalid([&] { core_->GetRun(""); }, "run: empty");
  invalid([&] { core_->StopRun("", false); }, "run: empty");
  invalid([&] { core_->DeleteRun(""); }, "run: empty");
  v1::HeartbeatRequest beat;
  invalid([&] { core_->Heartbeat(beat); }, "group_id: empty");
  // A run that is not there is still NOT_FOUND.
  try {
    core_->GetRun("nope");
    ADD_FAILURE() << "found a run that does not exist";
  } catch (const CoordinatorError& error) {
    EXPECT_EQ(error.code(), ErrorCode::kNotFound);
  }
}

TEST_F(CoordinatorTest, SchedulesByPriorityThenFifoAndDerivesThePerRankBatch) {
  core_->StartRun(Start("first", ConfigYaml(8, "{max_micro_batch: 2}")));
  core_->StartRun(Start("urgent", ConfigYaml(8, "{max_micro_batch: 2}"), 5));
  core_->StartRun(Start("second", ConfigYaml(8, "{max_micro_batch: 2}")));
  const std::string session = core_->Register(Group("g", 2)).session();
  // The higher priority goes first.
  v1::Run urgent = core_->GetRun("urgent");
  EXPECT_EQ(urgent.state(), v1::STARTING);
  // Batch 8 over 2 ranks is 4 per rank; at most 2 per micro-batch: 2 x 2 micro-batches.
  EXPECT_EQ(urgent.placement().world_size(), 2);
  EXPECT_EQ(urgent.placement().micro_batch(), 2);
  EXPECT_EQ(urgent.placement().micro_batches(), 2);
  const v1::GroupCommand train = CommandOf("g", session);
  EXPECT_EQ(train.kind(), v1::GroupCommand::TRAIN);
  EXPECT_EQ(train.run_id(), "urgent-2");
  // The split travels in the placement; the config is sent as it was submitted.
  EXPECT_EQ(urgent.placement().requested_micro_batches(), 1);
  EXPECT_EQ(train.placement().micro_batches(), 2);
  EXPECT_NE(train.config_yaml().find("grad_accum: 1"), std::string::npos) << train.config_yaml();
  EXPECT_EQ(core_->GetRun("first").state(), v1::QUEUED);

  // When it ends, the group takes the oldest of the equal-priority runs.
  v1::ReportRunEndRequest end;
  end.set_group_id("g");
  end.set_run_id("urgent-2");
  end.set_outcome(v1::ReportRunEndRequest::COMPLETED);
  end.set_step(100);
  core_->ReportRunEnd(end);
  EXPECT_EQ(core_->GetRun("urgent").state(), v1::COMPLETED);
  EXPECT_EQ(core_->GetRun("first").state(), v1::STARTING);
  EXPECT_EQ(core_->GetRun("second").state(), v1::QUEUED);
}

TEST_F(CoordinatorTest, ARunWaitsForAGroupOfItsWorldSizeWithoutBlockingOthers) {
  core_->StartRun(Start("four", ConfigYaml(8, "{world_size: 4}")));
  core_->StartRun(Start("any", ConfigYaml(6)));
  core_->Register(Group("pair", 2));
  EXPECT_EQ(core_->GetRun("four").state(), v1::QUEUED);
  const v1::Run any = core_->GetRun("any");
  EXPECT_EQ(any.state(), v1::STARTING);
  EXPECT_EQ(any.placement().micro_batch(), 3);
  core_->Register(Group("quad", 4));
  EXPECT_EQ(core_->GetRun("four").state(), v1::STARTING);
  EXPECT_EQ(core_->GetRun("four").placement().group_id(), "quad");
}

TEST_F(CoordinatorTest, GracefulStopGoesThroughStoppingAndTheGroupTakesTheNextRun) {
  core_->StartRun(Start("a", ConfigYaml()));
  const std::string session = core_->Register(Group("g", 1)).session();
  Heartbeat("g", 0, "a-1", 0);
  EXPECT_EQ(core_->GetRun("a").state(), v1::STARTING);  // Loading: no step yet.
  Heartbeat("g", 0, "a-1", 3);
  EXPECT_EQ(core_->GetRun("a").state(), v1::RUNNING);
  EXPECT_EQ(core_->StopRun("a", false).state(), v1::STOPPING);
  EXPECT_EQ(CommandOf("g", session).kind(), v1::GroupCommand::STOP);
  core_->StartRun(Start("b", ConfigYaml()));
  EXPECT_EQ(core_->GetRun("b").state(), v1::QUEUED);  // The group is still busy.
  v1::ReportRunEndRequest end;
  end.set_group_id("g");
  end.set_run_id("a-1");
  end.set_outcome(v1::ReportRunEndRequest::STOPPED);
  end.set_step(7);
  core_->ReportRunEnd(end);
  const v1::Run a = core_->GetRun("a");
  EXPECT_EQ(a.state(), v1::STOPPED);
  std::vector<v1::RunState> path;
  for (const v1::Transition& t : a.transitions()) path.push_back(t.to());
  EXPECT_EQ(path, (std::vector<v1::RunState>{v1::QUEUED, v1::STARTING, v1::RUNNING, v1::STOPPING,
                                             v1::STOPPED}));
  EXPECT_EQ(core_->GetRun("b").state(), v1::STARTING);
  EXPECT_EQ(CommandOf("g", session).run_id(), "b-2");
}

TEST_F(CoordinatorTest, MissedHeartbeatsFailTheRunAndRequeueItFromItsCheckpoint) {
  v1::StartRunRequest request = Start("a", ConfigYaml());
  request.set_max_restarts(1);
  core_->StartRun(request);
  core_->Register(Group("g", 2));
  Heartbeat("g", 0, "a-1", 5);
  v1::ReportCheckpointRequest checkpoint;
  checkpoint.set_group_id("g");
  checkpoint.set_run_id("a-1");
  checkpoint.mutable_checkpoint()->set_step(10);
  checkpoint.mutable_checkpoint()->set_path("/runs/a-1/checkpoints/step_000000010");
  core_->ReportCheckpoint(checkpoint);
  // Rank 1 goes quiet; rank 0 keeps beating.
  clock_.Advance(6);
  Heartbeat("g", 0, "a-1", 12);
  core_->Tick();
  EXPECT_EQ(core_->GetRun("a").state(), v1::RUNNING);
  clock_.Advance(5);
  core_->Tick();
  v1::Run a = core_->GetRun("a");
  EXPECT_EQ(a.state(), v1::QUEUED);
  EXPECT_EQ(a.restarts(), 1);
  const int n = a.transitions_size();
  EXPECT_EQ(a.transitions(n - 2).to(), v1::FAILED);
  EXPECT_NE(a.transitions(n - 2).reason().find("no heartbeat from rank 1 of group g"),
            std::string::npos)
      << a.transitions(n - 2).reason();
  EXPECT_NE(a.transitions(n - 1).reason().find("resume from the checkpoint of step 10"),
            std::string::npos);
  // A new group resumes it as attempt 2; a report from attempt 1 is refused.
  core_->Register(Group("h", 2));
  a = core_->GetRun("a");
  EXPECT_EQ(a.state(), v1::STARTING);
  EXPECT_EQ(a.placement().attempt(), 2);
  EXPECT_NE(a.reason().find("resumes from step 10"), std::string::npos) << a.reason();
  checkpoint.set_group_id("h");
  checkpoint.set_attempt(1);
  EXPECT_THROW(core_->ReportCheckpoint(checkpoint), CoordinatorError);
  // Its second loss uses up max_restarts: it stays FAILED.
  clock_.Advance(11);
  core_->Tick();
  EXPECT_EQ(core_->GetRun("a").state(), v1::FAILED);
}

TEST_F(CoordinatorTest, AClosedCommandStreamLosesTheGroupAfterTheGraceUnlessItComesBack) {
  options_.stream_grace_seconds = 3;
  Reopen();
  core_->StartRun(Start("a", ConfigYaml()));
  core_->StartRun(Start("b", ConfigYaml()));
  const std::string g = core_->Register(Group("g", 1)).session();
  const std::string h = core_->Register(Group("h", 1)).session();
  core_->OpenStream("g", g);
  core_->OpenStream("h", h);
  EXPECT_THROW(core_->OpenStream("g", "not-its-session"), CoordinatorError);
  // g blips: its stream closes and opens again 1 s later, within the grace.
  core_->CloseStream("g", g);
  clock_.Advance(1);
  core_->Tick();
  core_->OpenStream("g", g);
  clock_.Advance(5);
  Heartbeat("g", 0, "a-1", 3);
  Heartbeat("h", 0, "b-2", 3);
  core_->Tick();
  EXPECT_EQ(core_->GetRun("a").state(), v1::RUNNING);
  // h's process dies: its stream closes and nothing comes back. Within the grace it holds its
  // run (heartbeats are long from timing out); one tick past it, the run is re-queued.
  core_->CloseStream("h", h);
  clock_.Advance(2.9);
  core_->Tick();
  EXPECT_EQ(core_->GetRun("b").state(), v1::RUNNING);
  clock_.Advance(0.2);
  core_->Tick();
  const v1::Run b = core_->GetRun("b");
  EXPECT_EQ(b.state(), v1::QUEUED);
  const std::string reason = b.transitions(b.transitions_size() - 2).reason();
  EXPECT_NE(reason.find("group h's command stream closed 3.1 s ago"), std::string::npos) << reason;
  EXPECT_NE(reason.find("grace of 3"), std::string::npos) << reason;
  // Its stream cannot open with the lost session, and a group that comes back registers anew.
  EXPECT_THROW(core_->OpenStream("h", h), CoordinatorError);
  // g's process is replaced within the grace by one with the same group id that still trains
  // a: the registration takes the group's place and keeps the run.
  core_->CloseStream("g", g);
  clock_.Advance(1);
  v1::RegisterRequest again = Group("g", 1);
  again.set_current_run("a-1");
  again.set_current_step(4);
  const std::string g2 = core_->Register(again).session();
  EXPECT_NE(g2, g);
  EXPECT_EQ(CommandOf("g", g2).kind(), v1::GroupCommand::TRAIN);
  clock_.Advance(5);
  Heartbeat("g", 0, "a-1", 5);
  core_->Tick();
  EXPECT_EQ(core_->GetRun("a").state(), v1::RUNNING);
  EXPECT_EQ(core_->GetRun("a").restarts(), 0);
  // A group whose stream is open is still unique: a second registration is refused.
  core_->OpenStream("g", g2);
  EXPECT_THROW(core_->Register(Group("g", 1)), CoordinatorError);
  // Two streams of one group (a reconnect racing the old one's close): only the last to close
  // starts the grace.
  core_->OpenStream("g", g2);
  core_->CloseStream("g", g2);
  clock_.Advance(10);
  Heartbeat("g", 0, "a-1", 6);
  core_->Tick();
  EXPECT_EQ(core_->GetRun("a").state(), v1::RUNNING);
}

// One heartbeat per group: rank 0 forwards its peers' reports, each as old as rank 0 says. A
// peer rank 0 stops hearing from ages until the timeout names it; forwarding is rank 0's alone.
TEST_F(CoordinatorTest, RankZeroForwardsItsPeersAndAPeerItStopsHearingFromIsNamed) {
  core_->StartRun(Start("a", ConfigYaml()));
  core_->Register(Group("g", 4));
  auto beat = [&](int64_t age_of_rank_2) {
    v1::HeartbeatRequest request;
    request.set_group_id("g");
    request.set_run_id("a-1");
    request.mutable_rank_metrics()->set_step(7);
    for (int rank = 1; rank < 4; ++rank) {
      v1::PeerReport& peer = *request.add_peers();
      peer.set_rank(rank);
      peer.set_run_id("a-1");
      peer.mutable_rank_metrics()->set_step(7);
      peer.mutable_rank_metrics()->set_loss(rank / 10.0);
      peer.set_device_memory_bytes(int64_t{1000} * rank);
      peer.set_age_ms(rank == 2 ? age_of_rank_2 : 200);
    }
    core_->Heartbeat(request);
  };
  beat(200);
  const v1::Run a = core_->GetRun("a");
  EXPECT_EQ(a.state(), v1::RUNNING);
  ASSERT_EQ(a.ranks_size(), 4);
  EXPECT_EQ(a.ranks(3).rank(), 3);
  EXPECT_DOUBLE_EQ(a.ranks(3).loss(), 0.3);
  EXPECT_EQ(core_->Groups()[0].device_memory_bytes[2], 2000);
  // Rank 2 goes quiet: rank 0 keeps forwarding its last report, older each time.
  for (int second = 1; second <= 9; ++second) {
    clock_.Advance(1);
    beat(int64_t{1000} * second);
    core_->Tick();
  }
  EXPECT_NEAR(core_->Groups()[0].heartbeat_age_seconds[2], 9.0, 1e-9);
  EXPECT_NEAR(core_->Groups()[0].heartbeat_age_seconds[3], 0.2, 1e-9);
  EXPECT_EQ(core_->GetRun("a").state(), v1::RUNNING);
  clock_.Advance(1.5);
  beat(10500);
  core_->Tick();
  const v1::Run lost = core_->GetRun("a");
  EXPECT_EQ(lost.state(), v1::QUEUED);
  const std::string reason = lost.transitions(lost.transitions_size() - 2).reason();
  EXPECT_NE(reason.find("no heartbeat from rank 2 of group g"), std::string::npos) << reason;

  // Only rank 0 forwards, and only ranks of the group.
  core_->Register(Group("h", 2));
  v1::HeartbeatRequest wrong;
  wrong.set_group_id("h");
  wrong.set_rank(1);
  wrong.add_peers()->set_rank(1);
  try {
    core_->Heartbeat(wrong);
    ADD_FAILURE() << "rank 1 forwarded a report";
  } catch (const CoordinatorError& error) {
    EXPECT_EQ(error.code(), ErrorCode::kInvalidArgument);
    EXPECT_NE(std::string(error.what()).find("only rank 0 forwards"), std::string::npos)
        << error.what();
  }
  wrong.set_rank(0);
  wrong.mutable_peers(0)->set_rank(2);
  EXPECT_THROW(core_->Heartbeat(wrong), CoordinatorError);
}

// Ended runs pruned by count at start, by age as the clock moves, and on request; runs still
// queued or running are never touched, and neither is any run's directory.
TEST_F(CoordinatorTest, EndedRunsArePrunedByCountByAgeAndOnRequestAndTheirFilesStay) {
  std::vector<std::string> ended;
  for (int i = 0; i < 5; ++i) {
    ended.push_back(core_->StartRun(Start("e" + std::to_string(i), ConfigYaml())).id());
    core_->StopRun(ended.back(), true);  // Not scheduled: STOPPED at once.
    clock_.Advance(60);
  }
  const std::string waiting = core_->StartRun(Start("waiting", ConfigYaml())).id();
  const fs::path kept = fs::path(core_->GetRun(ended[0]).run_dir()) / "notes.txt";
  fs::create_directories(kept.parent_path());
  std::ofstream(kept) << "mine";
  auto ids = [&] {
    std::vector<std::string> all;
    for (const v1::Run& run : core_->ListRuns(v1::RUN_STATE_UNSPECIFIED)) all.push_back(run.id());
    return all;
  };
  // By count, at start: the 3 newest ended runs stay, and the queued one.
  ParseRetainEnded("3", options_);
  EXPECT_EQ(options_.retain_ended_count, 3);
  Reopen();
  EXPECT_EQ(ids(), (std::vector<std::string>{ended[2], ended[3], ended[4], waiting}));
  EXPECT_TRUE(fs::exists(kept));
  // By age, as time passes: e2 ended 180 s ago, e3 120 s, e4 60 s; keep what ended within 150 s.
  options_.retain_ended_count = 0;
  ParseRetainEnded("2.5m", options_);
  EXPECT_DOUBLE_EQ(options_.retain_ended_seconds, 150);
  Reopen();
  EXPECT_EQ(ids(), (std::vector<std::string>{ended[3], ended[4], waiting}));
  clock_.Advance(40);  // e3 ended 160 s ago now: the next prune (every 10 s) forgets it.
  core_->Tick();
  EXPECT_EQ(ids(), (std::vector<std::string>{ended[4], waiting}));
  // On request: every run that ended before a moment, oldest first; the queued one stays.
  options_.retain_ended_seconds = 0;
  Reopen();
  EXPECT_EQ(core_->DeleteRunsEndedBefore(clock_.NowUnixMs()), std::vector<std::string>{ended[4]});
  EXPECT_EQ(ids(), std::vector<std::string>{waiting});
  EXPECT_TRUE(core_->DeleteRunsEndedBefore(clock_.NowUnixMs()).empty());
  try {
    core_->DeleteRunsEndedBefore(0);
    ADD_FAILURE() << "a moment of 0 was taken";
  } catch (const CoordinatorError& error) {
    EXPECT_EQ(error.code(), ErrorCode::kInvalidArgument);
  }
  // Gone from the registry too, and the files are still there.
  Reopen();
  EXPECT_EQ(ids(), std::vector<std::string>{waiting});
  EXPECT_TRUE(fs::exists(kept));
  for (const char* bad : {"", "0", "-3", "1.5", "3w", "d", "12 h", "nan"}) {
    CoordinatorOptions options;
    EXPECT_THROW(ParseRetainEnded(bad, options), std::invalid_argument) << "'" << bad << "'";
  }
}

// A run that keeps a best checkpoint reports it with each evaluation; the coordinator keeps the
// newest (GetRun, the registry across a restart) and the evaluation's KID and PRD with it, in the
// run and in its history of evaluations; a
// run that ends early on eval.patience is COMPLETED with its reason.
TEST_F(CoordinatorTest, TheBestCheckpointAndAnEarlyCompletionAreKeptWithTheirReason) {
  core_->StartRun(Start("keeper", ConfigYaml()));
  core_->Register(Group("g", 1));
  v1::ReportEvalRequest eval;
  eval.set_group_id("g");
  eval.set_run_id("keeper-1");
  eval.mutable_eval()->set_step(20);
  eval.mutable_eval()->set_fid(7.5);
  eval.mutable_eval()->set_num_samples(100);
  eval.mutable_eval()->set_kid(-0.0025);
  eval.mutable_eval()->set_precision(0.625);
  v1::BestCheckpointInfo& best = *eval.mutable_best();
  best.set_step(10);
  best.set_path("/runs/keeper-1/checkpoints/step_000000010");
  best.set_metric("fid");
  best.set_score(6.25);
  best.set_evaluations_since(1);
  best.set_patience(2);
  core_->ReportEval(eval);
  const v1::Run run = core_->GetRun("keeper-1");
  ASSERT_TRUE(run.has_best());
  EXPECT_EQ(run.best().SerializeAsString(), best.SerializeAsString());
  EXPECT_EQ(run.latest_eval().kid(), -0.0025);
  EXPECT_EQ(run.latest_eval().precision(), 0.625);
  v1::ReportRunEndRequest end;
  end.set_group_id("g");
  end.set_run_id("keeper-1");
  end.set_outcome(v1::ReportRunEndRequest::COMPLETED);
  end.set_step(30);
  end.set_message("stopped early by eval.patience: 2 evaluations in a row did not improve");
  core_->ReportRunEnd(end);
  Reopen();
  const v1::Run ended = core_->GetRun("keeper-1");
  EXPECT_EQ(ended.state(), v1::COMPLETED);
  EXPECT_EQ(ended.reason(),
            "stopped early by eval.patience: 2 evaluations in a row did not improve at step 30 on "
            "group g");
  EXPECT_EQ(ended.best().step(), 10);
  EXPECT_EQ(ended.best().score(), 6.25);
  // The evaluation's history keeps KID and PRD too (schema 4: the whole record).
  const std::vector<v1::EvalResult> history = core_->Evals("keeper-1");
  ASSERT_EQ(history.size(), 1u);
  EXPECT_EQ(history[0].kid(), -0.0025);
  EXPECT_EQ(history[0].precision(), 0.625);
}

// A backup taken while the coordinator runs restores into another data directory with every
// run, transition, checkpoint, evaluation and history row; a restore is refused while a
// coordinator holds the directory, and a file that is not a registry changes nothing.
TEST_F(CoordinatorTest, ABackupRestoresEveryRunAndABadOneOrABusyDirectoryIsRefused) {
  for (int i = 0; i < 30; ++i) core_->StartRun(Start("r" + std::to_string(i), ConfigYaml()));
  core_->Register(Group("g", 1));
  v1::HeartbeatRequest beat;
  beat.set_group_id("g");
  beat.set_run_id("r0-1");
  beat.mutable_rank_metrics()->set_step(10);
  beat.mutable_train_metrics()->set_step(10);
  beat.mutable_train_metrics()->set_loss(0.25);
  core_->Heartbeat(beat);
  v1::ReportCheckpointRequest checkpoint;
  checkpoint.set_group_id("g");
  checkpoint.set_run_id("r0-1");
  checkpoint.mutable_checkpoint()->set_step(10);
  checkpoint.mutable_checkpoint()->set_path("/runs/r0-1/checkpoints/step_000000010");
  core_->ReportCheckpoint(checkpoint);
  v1::ReportEvalRequest eval;
  eval.set_group_id("g");
  eval.set_run_id("r0-1");
  eval.mutable_eval()->set_step(10);
  eval.mutable_eval()->set_fid(12.5);
  core_->ReportEval(eval);
  core_->StopRun("r5-6", true);
  const std::string before = Stored();
  const fs::path backup = dir_ / "backup.db";
  EXPECT_EQ(core_->BackupRegistry(backup.string()), 30);
  // The copy is a whole registry, though the coordinator has it open in WAL mode.
  const RegistryFileSummary summary = InspectRegistryFile(backup.string());
  EXPECT_EQ(summary.runs, 30);
  // Refused while a coordinator holds the directory.
  EXPECT_THROW(RestoreRegistry(options_.data_dir, backup.string()), DataDirInUse);
  // Restored into a fresh directory, everything is there.
  const fs::path elsewhere = dir_ / "restored";
  EXPECT_EQ(RestoreRegistry(elsewhere.string(), backup.string()).runs, 30);
  CoordinatorOptions restored_options = options_;
  restored_options.data_dir = elsewhere.string();
  {
    Coordinator restored(restored_options, clock_);
    std::string after;
    for (const v1::Run& run : restored.ListRuns(v1::RUN_STATE_UNSPECIFIED)) {
      after += restored.GetRun(run.id()).SerializeAsString();
    }
    EXPECT_EQ(after, before);
    ASSERT_EQ(restored.Checkpoints("r0-1").size(), 1u);
    EXPECT_EQ(restored.Evals("r0-1").at(0).fid(), 12.5);
    EXPECT_EQ(restored.MetricHistory("r0-1", 0, 10).rows(), 1);
  }
  // Restoring over a registry keeps the replaced one beside it.
  EXPECT_EQ(RestoreRegistry(elsewhere.string(), backup.string()).runs, 30);
  int replaced = 0;
  for (const auto& entry : fs::directory_iterator(elsewhere)) {
    replaced += entry.path().filename().string().rfind("registry.db.replaced-", 0) == 0 &&
                entry.path().extension() != ".db-wal";
  }
  EXPECT_GE(replaced, 1);
  // Not a registry: refused by name, nothing replaced.
  const fs::path garbage = dir_ / "garbage.db";
  std::ofstream(garbage) << "not a database, just words, and more words than a header holds "
                            "so that SQLite reads it as a file and finds no database in it";
  const auto registry_size = fs::file_size(elsewhere / "registry.db");
  try {
    RestoreRegistry(elsewhere.string(), garbage.string());
    ADD_FAILURE() << "a garbage file was restored";
  } catch (const RegistryError& error) {
    EXPECT_NE(std::string(error.what()).find(garbage.string()), std::string::npos) << error.what();
  }
  EXPECT_EQ(fs::file_size(elsewhere / "registry.db"), registry_size);
  EXPECT_FALSE(fs::exists(elsewhere / "registry.db.restoring"));
}

TEST_F(CoordinatorTest, ARestartedCoordinatorKeepsEveryRunAndTakesBackItsGroup) {
  core_->StartRun(Start("a", ConfigYaml()));
  core_->StartRun(Start("b", ConfigYaml()));
  core_->Register(Group("g", 1));
  Heartbeat("g", 0, "a-1", 4);
  core_->StopRun("b", false);
  const std::string before = Stored();
  Reopen();
  EXPECT_EQ(Stored(), before);
  EXPECT_EQ(core_->GetRun("a").state(), v1::RUNNING);
  EXPECT_EQ(core_->GetRun("b").transitions_size(), 2);
  // The group comes back, naming its run: it carries on.
  v1::RegisterRequest again = Group("g", 1);
  again.set_current_run("a-1");
  again.set_current_step(9);
  const std::string session = core_->Register(again).session();
  EXPECT_EQ(CommandOf("g", session).kind(), v1::GroupCommand::TRAIN);
  clock_.Advance(11);
  Heartbeat("g", 0, "a-1", 20);
  core_->Tick();
  EXPECT_EQ(core_->GetRun("a").state(), v1::RUNNING);
  // The next run gets the next number, even after a delete.
  core_->DeleteRun("b");
  EXPECT_EQ(core_->StartRun(Start("c", ConfigYaml())).id(), "c-3");
}

// An evaluation job of run a-1's checkpoints, with the files the protocol needs.
v1::StartEvalRequest Eval(const std::string& checkpoints) {
  v1::StartEvalRequest request;
  request.set_run("a");
  request.set_checkpoints(checkpoints);
  request.set_num_samples(50);
  request.set_sampler("heun");
  request.set_reference_stats("/data/cifar10_train.npz");
  request.set_inception_weights("/data/pt_inception.pth");
  return request;
}

TEST_F(CoordinatorTest, EvaluationJobsAreCheckedQueuedOnAnyGroupRestartedAndKeepTheirResults) {
  core_->StartRun(Start("a", ConfigYaml(8, "{world_size: 2}")));
  // Nothing to evaluate before a checkpoint has committed.
  try {
    core_->StartEval(Eval("latest"));
    FAIL() << "an evaluation of a run without checkpoints was queued";
  } catch (const CoordinatorError& error) {
    EXPECT_EQ(error.code(), ErrorCode::kFailedPrecondition);
    EXPECT_NE(std::string(error.what()).find("run a-1 has no committed checkpoint"),
              std::string::npos)
        << error.what();
  }
  const std::string session = core_->Register(Group("g", 2)).session();
  for (int64_t step : {10, 20, 30}) {
    v1::ReportCheckpointRequest checkpoint;
    checkpoint.set_group_id("g");
    checkpoint.set_run_id("a-1");
    checkpoint.mutable_checkpoint()->set_step(step);
    core_->ReportCheckpoint(checkpoint);
  }
  // Each refusal names its culprit and stores nothing.
  const std::string before = Stored();
  const std::vector<std::pair<v1::StartEvalRequest, std::string>> refused = [] {
    std::vector<std::pair<v1::StartEvalRequest, std::string>> cases;
    cases.emplace_back(Eval("sometimes"), "checkpoints 'sometimes'");
    cases.emplace_back(Eval("every:0"), "checkpoints 'every:0'");
    cases.emplace_back(Eval("25"),
                       "checkpoints 25 of run a-1: no such checkpoint (it has 10, 20, 30)");
    cases.emplace_back(Eval("every:7"), "checkpoints every:7 of run a-1: no such checkpoint");
    v1::StartEvalRequest few = Eval("all");
    few.set_num_samples(1);
    cases.emplace_back(few, "eval.num_samples: must be >= 10");
    v1::StartEvalRequest sampler = Eval("all");
    sampler.set_sampler("euler");
    cases.emplace_back(sampler, "eval.sampler");
    v1::StartEvalRequest no_reference = Eval("all");
    no_reference.clear_reference_stats();
    cases.emplace_back(no_reference, "eval.reference_stats (ddpmctl eval --ref): empty");
    v1::StartEvalRequest unknown = Eval("all");
    unknown.set_run("nosuch");
    cases.emplace_back(unknown, "no run 'nosuch'");
    return cases;
  }();
  for (const auto& [request, expected] : refused) {
    try {
      core_->StartEval(request);
      ADD_FAILURE() << "queued: " << expected;
    } catch (const CoordinatorError& error) {
      EXPECT_NE(std::string(error.what()).find(expected), std::string::npos)
          << error.what() << " (expected: " << expected << ")";
    }
  }
  EXPECT_EQ(Stored(), before);

  // The job takes the training run's config with its own protocol, and any idle group: a group
  // of 3 serves it although the training config asks for 2 ranks.
  v1::StartEvalRequest request = Eval("every:20");
  request.set_max_restarts(1);
  const v1::Run queued = core_->StartEval(request);
  EXPECT_EQ(queued.id(), "a-eval-2");
  EXPECT_EQ(queued.kind(), v1::EVALUATION);
  EXPECT_EQ(queued.evaluation().source_run(), "a-1");
  EXPECT_EQ(queued.evaluation().checkpoints(), "every:20");
  EXPECT_EQ(queued.evaluation().source_run_dir(), core_->GetRun("a").run_dir());
  EXPECT_NE(queued.config_yaml().find("num_samples: 50"), std::string::npos)
      << queued.config_yaml();
  EXPECT_NE(queued.config_yaml().find("sampler: heun"), std::string::npos);
  EXPECT_EQ(queued.state(), v1::QUEUED);  // g holds a-1
  const std::string h = core_->Register(Group("h", 3)).session();
  v1::Run job = core_->GetRun("a-eval-2");
  EXPECT_EQ(job.state(), v1::STARTING);
  EXPECT_EQ(job.placement().world_size(), 3);
  const v1::GroupCommand command = CommandOf("h", h);
  EXPECT_EQ(command.kind(), v1::GroupCommand::EVALUATE);
  EXPECT_EQ(command.run_dir(), job.run_dir());
  EXPECT_EQ(command.evaluation().checkpoints(), "every:20");
  EXPECT_EQ(command.evaluation().source_run_dir(), job.evaluation().source_run_dir());

  // Progress: the images in all arrive with the metrics; results keep step order, and a
  // repeated report replaces its own.
  v1::HeartbeatRequest beat;
  beat.set_group_id("h");
  beat.set_run_id("a-eval-2");
  beat.mutable_rank_metrics()->set_step(10);
  beat.mutable_train_metrics()->set_step(10);
  beat.mutable_train_metrics()->set_total(100);
  core_->Heartbeat(beat);
  job = core_->GetRun("a-eval-2");
  EXPECT_EQ(job.state(), v1::RUNNING);
  EXPECT_EQ(job.total_steps(), 100);
  const auto report = [&](int64_t step, double fid) {
    v1::ReportEvalRequest eval;
    eval.set_group_id("h");
    eval.set_run_id("a-eval-2");
    eval.mutable_eval()->set_step(step);
    eval.mutable_eval()->set_fid(fid);
    eval.mutable_eval()->set_num_samples(50);
    core_->ReportEval(eval);
  };
  report(20, 7.5);
  report(10, 9.0);  // not planned by this job, but any order must come out sorted
  report(20, 7.25);
  job = core_->GetRun("a-eval-2");
  ASSERT_EQ(job.evaluation().results_size(), 2);
  EXPECT_EQ(job.evaluation().results(0).step(), 10);
  EXPECT_EQ(job.evaluation().results(1).step(), 20);
  EXPECT_EQ(job.evaluation().results(1).fid(), 7.25);

  // A lost group re-queues the job to go on from what it saved; the results stay, through a
  // coordinator restart too.
  clock_.Advance(11);
  Heartbeat("g", 0, "a-1", 40);
  Heartbeat("g", 1, "a-1", 40);
  core_->Tick();
  job = core_->GetRun("a-eval-2");
  EXPECT_EQ(job.state(), v1::QUEUED);
  EXPECT_NE(job.reason().find("will go on from the results and samples already saved"),
            std::string::npos)
      << job.reason();
  Reopen();
  job = core_->GetRun("a-eval-2");
  EXPECT_EQ(job.kind(), v1::EVALUATION);
  EXPECT_EQ(job.evaluation().results_size(), 2);
  const std::string k = core_->Register(Group("k", 1)).session();
  job = core_->GetRun("a-eval-2");
  EXPECT_EQ(job.state(), v1::STARTING);
  EXPECT_EQ(job.placement().attempt(), 2);
  EXPECT_EQ(CommandOf("k", k).kind(), v1::GroupCommand::EVALUATE);
  v1::ReportRunEndRequest end;
  end.set_group_id("k");
  end.set_run_id("a-eval-2");
  end.set_outcome(v1::ReportRunEndRequest::COMPLETED);
  core_->ReportRunEnd(end);
  job = core_->GetRun("a-eval-2");
  EXPECT_EQ(job.state(), v1::COMPLETED);
  EXPECT_EQ(job.reason(), "evaluated every checkpoint it chose on group k");
  // An evaluation job is not itself something to evaluate.
  v1::StartEvalRequest of_job = Eval("all");
  of_job.set_run("a-eval-2");
  EXPECT_THROW(core_->StartEval(of_job), CoordinatorError);
}

// Runs sql on the registry file and returns the first column of its rows as text ("NULL").
std::vector<std::string> Query(const fs::path& db, const std::string& sql) {
  sqlite3* handle = nullptr;
  EXPECT_EQ(sqlite3_open(db.string().c_str(), &handle), SQLITE_OK);
  std::vector<std::string> rows;
  char* error = nullptr;
  const int code = sqlite3_exec(
      handle, sql.c_str(),
      [](void* out, int, char** values, char**) {
        static_cast<std::vector<std::string>*>(out)->push_back(values[0] ? values[0] : "NULL");
        return 0;
      },
      &rows, &error);
  EXPECT_EQ(code, SQLITE_OK) << sql << ": " << (error ? error : "");
  sqlite3_free(error);
  sqlite3_close(handle);
  return rows;
}

TEST_F(CoordinatorTest, ARegistryOfSchemaOneGainsTheBoundsColumnAndKeepsItsEvaluations) {
  core_->StartRun(Start("a", ConfigYaml()));
  core_->Register(Group("g", 1));
  core_.reset();
  // The file as a coordinator before the bound wrote it: evals without nll_bits_per_dim,
  // user_version 1, one evaluation of FID.
  const fs::path db = dir_ / "registry.db";
  Query(db,
        "DROP TABLE evals; CREATE TABLE evals (run_id TEXT NOT NULL REFERENCES runs(id) ON "
        "DELETE CASCADE, step INTEGER NOT NULL, fid REAL NOT NULL, inception_score REAL NOT "
        "NULL, num_samples INTEGER NOT NULL, at_unix_ms INTEGER NOT NULL); INSERT INTO "
        "evals VALUES('a-1', 5, 40.5, 2.5, 100, 1); PRAGMA user_version=1;");
  Reopen();
  EXPECT_EQ(Query(db, "PRAGMA user_version"), std::vector<std::string>{"4"});
  v1::RegisterRequest again = Group("g", 1);
  again.set_current_run("a-1");
  core_->Register(again);
  v1::ReportEvalRequest bound;
  bound.set_group_id("g");
  bound.set_run_id("a-1");
  bound.mutable_eval()->set_step(10);
  bound.mutable_eval()->set_nll_bits_per_dim(3.75);
  core_->ReportEval(bound);
  EXPECT_EQ(Query(db,
                  "SELECT step || ' ' || ifnull(nll_bits_per_dim, 'NULL') FROM evals "
                  "ORDER BY rowid"),
            (std::vector<std::string>{"5 NULL", "10 3.75"}));
  // The run record keeps the bound apart from the FID.
  EXPECT_DOUBLE_EQ(core_->GetRun("a").latest_nll().nll_bits_per_dim(), 3.75);
  EXPECT_FALSE(core_->GetRun("a").has_latest_eval());
  Reopen();
  EXPECT_DOUBLE_EQ(core_->GetRun("a").latest_nll().nll_bits_per_dim(), 3.75);
}

TEST_F(CoordinatorTest, AGroupThatDoesNotComeBackAfterARestartLosesItsRun) {
  core_->StartRun(Start("a", ConfigYaml()));
  core_->Register(Group("g", 1));
  Heartbeat("g", 0, "a-1", 4);
  Reopen();
  clock_.Advance(5);
  core_->Tick();
  EXPECT_EQ(core_->GetRun("a").state(), v1::RUNNING);
  clock_.Advance(6);
  core_->Tick();
  const v1::Run a = core_->GetRun("a");
  EXPECT_EQ(a.state(), v1::QUEUED);
  EXPECT_NE(a.transitions(a.transitions_size() - 2).reason().find("did not come back"),
            std::string::npos);
}

TEST_F(CoordinatorTest, CallsFromManyThreadsAtOnceKeepEveryRunAndTheGroupsConsistent) {
  // What the gRPC server does: every call from its own thread. Under ThreadSanitizer
  // (scripts/sanitize.sh) this is the core's race check; here it checks the outcome.
  core_->Register(Group("g", 1));
  const std::string session = core_->Register(Group("h", 2)).session();
  constexpr int kThreads = 4, kRuns = 10;
  std::vector<std::thread> threads;
  threads.reserve(kThreads);
  std::atomic<int> refused{0};
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kRuns; ++i) {
        core_->StartRun(Start("t" + std::to_string(t), ConfigYaml(8), i % 3));
        core_->ListRuns(v1::RUN_STATE_UNSPECIFIED);
        core_->Tick();
        try {
          Heartbeat("g", 0, "", 0);
          core_->GetRun("t" + std::to_string(t) + "-" + std::to_string(1 + i));
        } catch (const CoordinatorError&) {
          ++refused;  // an id another thread took: refused by name, never a crash
        }
        int64_t version = 0;
        core_->WaitForCommand("h", session, version, std::chrono::steady_clock::now());
        core_->Groups();
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  const std::vector<v1::Run> runs = core_->ListRuns(v1::RUN_STATE_UNSPECIFIED);
  ASSERT_EQ(runs.size(), static_cast<size_t>(kThreads * kRuns));
  std::set<std::string> ids;
  int placed = 0;
  for (const v1::Run& run : runs) {
    ids.insert(run.id());
    placed += run.state() == v1::STARTING ? 1 : 0;
  }
  EXPECT_EQ(ids.size(), runs.size()) << "every run has its own id";
  EXPECT_EQ(placed, 2) << "one run on each of the two groups, the rest queued";
  EXPECT_LT(refused.load(), kThreads * kRuns);
}

TEST_F(CoordinatorTest, RefusedWorkerAndControlCallsChangeNothing) {
  core_->StartRun(Start("a", ConfigYaml()));
  core_->StartRun(Start("b", ConfigYaml()));
  core_->Register(Group("g", 1));
  const std::string before = Stored();
  const auto code_of = [](const std::function<void()>& call) {
    try {
      call();
    } catch (const CoordinatorError& error) {
      return error.code();
    }
    ADD_FAILURE() << "not refused";
    return ErrorCode::kUnavailable;
  };
  EXPECT_EQ(code_of([&] { core_->StopRun("nope", false); }), ErrorCode::kNotFound);
  EXPECT_EQ(code_of([&] { core_->Register(Group("g", 1)); }), ErrorCode::kAlreadyExists);
  EXPECT_EQ(code_of([&] { Heartbeat("g", 0, "b-2", 1); }), ErrorCode::kFailedPrecondition);
  EXPECT_EQ(code_of([&] { Heartbeat("nobody", 0, "a-1", 1); }), ErrorCode::kNotFound);
  EXPECT_EQ(code_of([&] { Heartbeat("g", 3, "a-1", 1); }), ErrorCode::kInvalidArgument);
  EXPECT_EQ(code_of([&] { core_->DeleteRun("a"); }), ErrorCode::kFailedPrecondition);
  EXPECT_EQ(code_of([&] { core_->Register(Group("h", 0)); }), ErrorCode::kInvalidArgument);
  EXPECT_EQ(Stored(), before);
  EXPECT_EQ(core_->Groups().size(), 1u);
}

TEST_F(CoordinatorTest, WatchReportsEachTransitionAndMetricsUntilTheEnd) {
  core_->StartRun(Start("a", ConfigYaml()));
  Coordinator::WatchCursor cursor;
  bool done = false;
  const auto soon = [] { return std::chrono::steady_clock::now() + std::chrono::milliseconds(50); };
  std::vector<v1::WatchRunEvent> events = core_->WaitForRunEvents("a-1", cursor, soon(), done);
  ASSERT_EQ(events.size(), 1u);
  EXPECT_FALSE(events[0].has_transition());
  core_->Register(Group("g", 1));
  v1::HeartbeatRequest beat;
  beat.set_group_id("g");
  beat.set_run_id("a-1");
  beat.mutable_rank_metrics()->set_step(5);
  beat.mutable_train_metrics()->set_step(5);
  beat.mutable_train_metrics()->set_loss(0.25);
  core_->Heartbeat(beat);
  events = core_->WaitForRunEvents("a-1", cursor, soon(), done);
  ASSERT_EQ(events.size(), 3u);
  EXPECT_EQ(events[0].transition().to(), v1::STARTING);
  EXPECT_EQ(events[1].transition().to(), v1::RUNNING);
  EXPECT_TRUE(events[2].metrics());
  EXPECT_DOUBLE_EQ(events[2].run().metrics().loss(), 0.25);
  EXPECT_FALSE(done);
  core_->StopRun("a-1", true);
  events = core_->WaitForRunEvents("a-1", cursor, soon(), done);
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].transition().to(), v1::STOPPED);
  EXPECT_TRUE(done);
}

}  // namespace
}  // namespace ddpm

namespace ddpm {
namespace {

// Rank 0's heartbeat with a log interval's metrics, as the worker sends it.
v1::HeartbeatRequest MetricsHeartbeat(const std::string& run, int64_t step, double loss) {
  v1::HeartbeatRequest request;
  request.set_group_id("g");
  request.set_rank(0);
  request.set_run_id(run);
  request.mutable_rank_metrics()->set_step(step);
  v1::TrainMetrics& metrics = *request.mutable_train_metrics();
  metrics.set_step(step);
  metrics.set_loss(loss);
  metrics.set_lr(1e-4 * static_cast<double>(step));
  metrics.set_grad_norm(0.5 + static_cast<double>(step));
  metrics.set_images_per_second(100 + static_cast<double>(step));
  for (int q = 0; q < 4; ++q) metrics.add_loss_by_quartile(q == 2 ? std::nan("") : loss * (q + 1));
  return request;
}

TEST_F(CoordinatorTest, EveryLogIntervalGoesIntoTheHistoryWhichARestartKeeps) {
  core_->StartRun(Start("a", ConfigYaml()));
  core_->Register(Group("g", 1));
  for (int64_t step = 10; step <= 100; step += 10) {
    core_->Heartbeat(MetricsHeartbeat("a-1", step, 1.0 / static_cast<double>(step)));
  }
  // A restarted attempt logs step 50 again: its row replaces the first one.
  core_->Heartbeat(MetricsHeartbeat("a-1", 50, 7.0));
  const auto check = [&](const v1::MetricHistory& history) {
    ASSERT_EQ(history.points_size(), 10);
    EXPECT_EQ(history.rows(), 10);
    EXPECT_FALSE(history.downsampled());
    for (int i = 0; i < 10; ++i) {
      const v1::TrainMetrics& point = history.points(i);
      const int64_t step = int64_t{10} * (i + 1);
      const double loss = step == 50 ? 7.0 : 1.0 / static_cast<double>(step);
      EXPECT_EQ(point.step(), step);
      EXPECT_DOUBLE_EQ(point.loss(), loss);
      EXPECT_DOUBLE_EQ(point.lr(), 1e-4 * static_cast<double>(step));
      EXPECT_DOUBLE_EQ(point.grad_norm(), 0.5 + static_cast<double>(step));
      EXPECT_DOUBLE_EQ(point.images_per_second(), 100 + static_cast<double>(step));
      ASSERT_EQ(point.loss_by_quartile_size(), 4);
      EXPECT_DOUBLE_EQ(point.loss_by_quartile(3), loss * 4);
      EXPECT_TRUE(std::isnan(point.loss_by_quartile(2)));  // no sample fell there: NULL
      EXPECT_EQ(point.at_unix_ms(), clock_.NowUnixMs());
    }
  };
  check(core_->MetricHistory("a-1", -1, 100));
  const v1::MetricHistory since = core_->MetricHistory("a", 70, 100);
  ASSERT_EQ(since.points_size(), 3);
  EXPECT_EQ(since.points(0).step(), 80);
  Reopen();
  check(core_->MetricHistory("a-1", -1, 100));
  // Deleting the run deletes its history.
  core_->StopRun("a-1", true);
  core_->DeleteRun("a-1");
  EXPECT_EQ(Query(dir_ / "registry.db", "SELECT count(*) FROM metric_history"),
            std::vector<std::string>{"0"});
}

TEST_F(CoordinatorTest, ARegistryOfSchemaTwoGainsTheHistoryAndKeepsItsRuns) {
  core_->StartRun(Start("a", ConfigYaml()));
  core_.reset();
  const fs::path db = dir_ / "registry.db";
  // The file as a coordinator before the history wrote it.
  Query(db, "DROP TABLE metric_history; PRAGMA user_version=2;");
  Reopen();
  EXPECT_EQ(Query(db, "PRAGMA user_version"), std::vector<std::string>{"4"});
  EXPECT_EQ(core_->GetRun("a").state(), v1::QUEUED);
  core_->Register(Group("g", 1));
  core_->Heartbeat(MetricsHeartbeat("a-1", 10, 0.25));
  EXPECT_EQ(Query(db, "SELECT step || ' ' || loss FROM metric_history"),
            std::vector<std::string>{"10 0.25"});
  // A file of a newer schema is refused by name.
  core_.reset();
  Query(db, "PRAGMA user_version=5;");
  try {
    Reopen();
    FAIL() << "a schema-5 registry was opened";
  } catch (const RegistryError& error) {
    EXPECT_NE(std::string(error.what()).find("schema version 5 is newer than this coordinator's 4"),
              std::string::npos)
        << error.what();
  }
}

TEST(ThinKeepingExtremes, KeepsEveryRowThatFitsAndTheExtremesOfThoseThatDoNot) {
  std::vector<v1::TrainMetrics> rows(10000);
  for (size_t i = 0; i < rows.size(); ++i) {
    rows[i].set_step(static_cast<int64_t>(i + 1) * 100);
    // A smooth decay with a spike and a dip that a stride would miss.
    rows[i].set_loss(1.0 / std::sqrt(1.0 + static_cast<double>(i)));
  }
  rows[7777].set_loss(50.0);
  rows[4243].set_loss(1e-6);
  const std::vector<size_t> kept = ThinKeepingExtremes(rows, 500);
  EXPECT_LE(kept.size(), 500U);
  EXPECT_GE(kept.size(), 490U);
  EXPECT_EQ(kept.front(), 0U);
  EXPECT_EQ(kept.back(), rows.size() - 1);
  EXPECT_TRUE(std::is_sorted(kept.begin(), kept.end()));
  EXPECT_EQ(std::adjacent_find(kept.begin(), kept.end()), kept.end());
  EXPECT_NE(std::find(kept.begin(), kept.end(), 7777U), kept.end());
  EXPECT_NE(std::find(kept.begin(), kept.end(), 4243U), kept.end());
  // The thinned curve's range is the whole curve's.
  double lowest = 1e9, highest = 0;
  for (size_t index : kept) {
    lowest = std::min(lowest, rows[index].loss());
    highest = std::max(highest, rows[index].loss());
  }
  EXPECT_EQ(lowest, 1e-6);
  EXPECT_EQ(highest, 50.0);
  // Rows that fit are all kept.
  std::vector<v1::TrainMetrics> few(rows.begin(), rows.begin() + 7);
  EXPECT_EQ(ThinKeepingExtremes(few, 7), (std::vector<size_t>{0, 1, 2, 3, 4, 5, 6}));
}

}  // namespace
}  // namespace ddpm

namespace ddpm {
namespace {

TEST_F(CoordinatorTest, ASecondCoordinatorOnTheDataDirectoryIsRefusedNamingTheHolder) {
  core_->StartRun(Start("a", ConfigYaml()));
  char host[256] = {};
  ::gethostname(host, sizeof(host) - 1);
  try {
    Coordinator second(options_, clock_);
    FAIL() << "a second coordinator opened " << dir_;
  } catch (const DataDirInUse& error) {
    const std::string expected = "data dir " + dir_.string() + " is in use by pid " +
                                 std::to_string(::getpid()) + " on host " + host + " since ";
    EXPECT_EQ(std::string(error.what()).rfind(expected, 0), 0U) << error.what();
    EXPECT_NE(std::string(error.what()).find("(" + (dir_ / "LOCK").string() + ")"),
              std::string::npos)
        << error.what();
  }
  // The refused one changed nothing; once the holder is gone the directory opens at once.
  EXPECT_EQ(core_->ListRuns(v1::RUN_STATE_UNSPECIFIED).size(), 1U);
  Reopen();
  EXPECT_EQ(core_->GetRun("a").state(), v1::QUEUED);
}

}  // namespace
}  // namespace ddpm

namespace ddpm {
namespace {

TEST_F(CoordinatorTest, TenThousandRunsListOverPagesEachExactlyOnceWhileRunsAreAdded) {
  // 10,000 submissions are 10,000 registry commits: on tmpfs where there is one, so that the
  // test spends its time listing rather than in fsync.
  if (fs::is_directory("/dev/shm")) {
    core_.reset();
    fs::remove_all(dir_);
    dir_ = fs::path("/dev/shm") / dir_.filename();
    fs::remove_all(dir_);
    options_.data_dir = dir_.string();
    Reopen();
  }
  core_->Register(Group("g", 1));  // one run trains, the rest queue: states differ
  constexpr int kRuns = 10000;
  for (int i = 0; i < kRuns; ++i) {
    core_->StartRun(Start(i % 2 == 0 ? "even" : "odd", ConfigYaml()));
  }
  std::vector<std::string> listed;
  v1::ListRunsRequest request;
  request.set_page_size(700);
  int pages = 0, added = 0;
  do {
    const v1::ListRunsResponse page = core_->ListRunsPage(request);
    EXPECT_EQ(page.page_size(), 700);
    EXPECT_LE(page.runs_size(), 700);
    for (const v1::Run& run : page.runs()) listed.push_back(run.id());
    request.set_page_token(page.next_page_token());
    // Runs submitted between pages come on a later page.
    if (++pages <= 5) {
      core_->StartRun(Start("late", ConfigYaml()));
      ++added;
    }
  } while (!request.page_token().empty());
  ASSERT_EQ(listed.size(), static_cast<size_t>(kRuns + added));
  EXPECT_EQ(std::set<std::string>(listed.begin(), listed.end()).size(), listed.size());
  // In submission order: run ids end in their submission number.
  for (size_t i = 0; i < listed.size(); ++i) {
    EXPECT_EQ(listed[i].substr(listed[i].rfind('-') + 1), std::to_string(i + 1)) << i;
    if (testing::Test::HasFailure()) break;
  }
  // The default page, and a filter by name prefix and state over pages.
  EXPECT_EQ(core_->ListRunsPage(v1::ListRunsRequest()).runs_size(), Coordinator::kDefaultPageSize);
  v1::ListRunsRequest odd;
  odd.set_name_prefix("od");
  odd.set_state(v1::QUEUED);
  odd.set_page_size(1000);
  int odd_runs = 0;
  do {
    const v1::ListRunsResponse page = core_->ListRunsPage(odd);
    for (const v1::Run& run : page.runs()) {
      EXPECT_EQ(run.name(), "odd");
      EXPECT_EQ(run.state(), v1::QUEUED);
      ++odd_runs;
    }
    odd.set_page_token(page.next_page_token());
  } while (!odd.page_token().empty());
  EXPECT_EQ(odd_runs, kRuns / 2);
}

TEST_F(CoordinatorTest, PageTokensOfAnotherQueryOrGarbledAreRefusedAndLargePagesClamped) {
  for (int i = 0; i < 5; ++i) core_->StartRun(Start("r", ConfigYaml()));
  v1::ListRunsRequest request;
  request.set_page_size(2);
  const v1::ListRunsResponse first = core_->ListRunsPage(request);
  ASSERT_FALSE(first.next_page_token().empty());
  const auto refused = [&](const v1::ListRunsRequest& bad, const std::string& expected) {
    try {
      core_->ListRunsPage(bad);
      ADD_FAILURE() << "accepted page_token '" << bad.page_token() << "'";
    } catch (const CoordinatorError& error) {
      EXPECT_EQ(error.code(), ErrorCode::kInvalidArgument);
      EXPECT_EQ(error.what(), expected);
    }
  };
  v1::ListRunsRequest other = request;
  other.set_page_token(first.next_page_token());
  other.set_state(v1::RUNNING);
  refused(other, "page_token '" + first.next_page_token() +
                     "' was given for another query (state or name_prefix); list again without "
                     "it, or with that query's filters");
  other.set_state(v1::RUN_STATE_UNSPECIFIED);
  other.set_name_prefix("x");
  refused(other, "page_token '" + first.next_page_token() +
                     "' was given for another query (state or name_prefix); list again without "
                     "it, or with that query's filters");
  for (const std::string garbled : {"abc", "r1.zz.3", "r1.0000000000000000.-4", "r1.1.2x"}) {
    v1::ListRunsRequest bad = request;
    bad.set_page_token(garbled);
    refused(bad, "page_token '" + garbled +
                     "' is not a token this coordinator gave; list again without it");
  }
  v1::ListRunsRequest negative;
  negative.set_page_size(-1);
  EXPECT_THROW(core_->ListRunsPage(negative), CoordinatorError);
  v1::ListRunsRequest huge;
  huge.set_page_size(5000);
  const v1::ListRunsResponse clamped = core_->ListRunsPage(huge);
  EXPECT_EQ(clamped.page_size(), Coordinator::kMaxPageSize);
  EXPECT_EQ(clamped.notice(), "page_size 5000 is over the maximum; clamped to 1000");
  EXPECT_EQ(clamped.runs_size(), 5);
  EXPECT_TRUE(clamped.next_page_token().empty());
  // The second page with the right query goes on after the first.
  request.set_page_token(first.next_page_token());
  const v1::ListRunsResponse second = core_->ListRunsPage(request);
  ASSERT_EQ(second.runs_size(), 2);
  EXPECT_EQ(second.runs(0).id(), "r-3");
}

}  // namespace
}  // namespace ddpm
