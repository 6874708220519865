#include "worker/group.h"

#include <torch/torch.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <optional>

#include "base/fence.h"
#include "base/log.h"
#include "base/signals.h"
#include "config/flags.h"
#include "proto/placement.h"
#include "run/evaluation_job.h"
#include "trainer/communicator.h"
#include "worker/gateway_client.h"
#include "worker/peer_watchdog.h"
#include "worker/worker.h"

namespace ddpm {
namespace {

// SIGINT or SIGTERM while the group waits between runs (during a run, the train loop's own
// handlers take them and stop the run with a checkpoint first).
std::atomic<bool> g_shutdown{false};
std::atomic<int> g_shutdown_signal{0};

extern "C" void OnGroupSignal(int signal) {
  g_shutdown_signal = signal;
  g_shutdown = true;
}

// What rank 0 tells the other ranks between runs.
enum Message : int64_t { kHello = 1, kTrain = 2, kShutdown = 3 };

void SendMessage(Communicator& comm, Message kind, const std::string& payload) {
  torch::Tensor header = torch::tensor(
      {static_cast<int64_t>(kind), static_cast<int64_t>(payload.size())}, torch::kLong);
  comm.WaitForBroadcast(header, 0, "broadcast of the group's next message");
  if (payload.empty()) return;
  torch::Tensor bytes = torch::empty({static_cast<int64_t>(payload.size())}, torch::kUInt8);
  std::memcpy(bytes.data_ptr(), payload.data(), payload.size());
  comm.Broadcast(bytes, 0, "broadcast of the group's message body");
}

std::pair<Message, std::string> ReceiveMessage(Communicator& comm) {
  torch::Tensor header = torch::zeros({2}, torch::kLong);
  comm.WaitForBroadcast(header, 0, "broadcast of the group's next message");
  const auto kind = static_cast<Message>(header[0].item<int64_t>());
  const int64_t size = header[1].item<int64_t>();
  std::string payload;
  if (size > 0) {
    torch::Tensor bytes = torch::empty({size}, torch::kUInt8);
    comm.Broadcast(bytes, 0, "broadcast of the group's message body");
    payload.assign(static_cast<const char*>(bytes.data_ptr()), static_cast<size_t>(size));
  }
  return {kind, payload};
}

// Every rank's text, indexed by rank.
std::vector<std::string> GatherText(Communicator& comm, const std::string& text) {
  constexpr int64_t kWidth = 128;
  torch::Tensor mine = torch::zeros({kWidth}, torch::kUInt8);
  std::memcpy(mine.data_ptr(), text.data(), std::min<size_t>(text.size(), kWidth - 1));
  const torch::Tensor all = comm.AllGather(mine, "all-gather of hostnames and devices");
  std::vector<std::string> texts;
  for (int64_t r = 0; r < all.size(0); ++r) {
    texts.emplace_back(static_cast<const char*>(all[r].data_ptr()));
  }
  return texts;
}

std::string HostName() {
  char name[256] = {};
  if (gethostname(name, sizeof(name) - 1) != 0) return "unknown-host";
  return name;
}

std::string Key(const v1::GroupCommand& command) {
  return command.run_id() + "#" + std::to_string(command.placement().attempt());
}

// A command to train or evaluate a run (the others stop or idle).
bool IsWork(const v1::GroupCommand& command) {
  return command.kind() == v1::GroupCommand::TRAIN || command.kind() == v1::GroupCommand::EVALUATE;
}

// What the coordinator's newest command means for the run this group trains.
StopRequest StopFor(const v1::GroupCommand& latest, const v1::GroupCommand& assigned) {
  if (latest.run_id() == assigned.run_id()) {
    if (latest.kind() == v1::GroupCommand::STOP) return StopRequest::kStop;
    if (latest.kind() == v1::GroupCommand::STOP_NOW) return StopRequest::kAbandon;
    if (IsWork(latest) && Key(latest) == Key(assigned)) return StopRequest::kNone;
  }
  // The run was taken away (declared lost and placed again, or ended): stop without writing.
  return StopRequest::kAbandon;
}

struct Member {
  const WorkerOptions& options;
  Communicator& comm;
  const ContextFactory& context_for;
  GatewayClient& client;
  RankRecorder& recorder;
  std::string group_id;
  Heartbeater* heartbeats = nullptr;
  CommandChannel* channel = nullptr;  // rank 0 only

  // Runs work (a training run or an evaluation job: what, in words) and ends this rank's part
  // of it. A newer attempt that holds the run makes it not this group's to report: every rank
  // got there together (the fence is broadcast) and the group waits for its next command
  // (false). A failed collective loses the group; any other error fails the run (both rethrow).
  template <typename Work>
  bool Attempt(const std::string& what, const std::string& run_id, int attempt, Work&& work) {
    try {
      work();
    } catch (const FencedError& error) {
      heartbeats->SetRun("");
      recorder.SetRun("");
      if (comm.rank() == 0) {
        channel->SetCurrentRun("", 0);
        LogInfo("ddpm_worker: %s",
                (what + " (attempt " + std::to_string(attempt) + "): " + error.what()).c_str());
      }
      return false;
    } catch (const CommError& error) {
      ReportLost(error);
      throw;
    } catch (const std::exception& error) {
      ReportFailure(run_id, attempt, error);
      throw;
    }
    heartbeats->SetRun("");
    recorder.SetRun("");
    return true;
  }

  // Rank 0: what the newest command means for the assigned work; taken_away is set when the
  // coordinator gave it to another attempt (then it is not ours to report).
  StopRequest PollStop(const v1::GroupCommand& assigned, bool& taken_away) const {
    const v1::GroupCommand latest = channel->Latest();
    const StopRequest request = StopFor(latest, assigned);
    taken_away =
        request == StopRequest::kAbandon &&
        !(latest.kind() == v1::GroupCommand::STOP_NOW && latest.run_id() == assigned.run_id());
    return request;
  }

  // Rank 0: one evaluation's results, as the coordinator takes them.
  v1::ReportEvalRequest EvalRequest(const std::string& run_id, int attempt,
                                    const EvalReport& report) const {
    v1::ReportEvalRequest request;
    request.set_group_id(group_id);
    request.set_run_id(run_id);
    request.set_attempt(attempt);
    v1::EvalResult& eval = *request.mutable_eval();
    eval.set_step(report.step);
    eval.set_seconds(report.seconds);
    if (report.has_fid()) {
      eval.set_fid(report.fid);
      eval.set_inception_score(report.inception_score);
      eval.set_inception_score_std(report.inception_score_std);
      eval.set_is_logits(report.is_logits);
      eval.set_num_samples(report.num_samples);
      eval.set_sampler(report.sampler);
      eval.set_sampling_steps(report.sampling_steps);
      eval.set_inception_sha256(report.inception_sha256);
      eval.set_reference_sha256(report.reference_sha256);
      eval.set_regularized(report.regularized);
      if (report.guided) eval.set_guidance(report.guidance);
    }
    if (report.has_kid) {
      eval.set_kid(report.kid);
      eval.set_kid_std(report.kid_std);
      eval.set_kid_subsets(report.kid_subsets);
      eval.set_kid_subset_size(report.kid_subset_size);
    }
    if (report.best) {
      v1::BestCheckpointInfo& best = *request.mutable_best();
      best.set_step(report.best->step);
      best.set_path(report.best->path);
      best.set_metric(report.best->metric);
      best.set_score(report.best->score);
      best.set_evaluations_since(report.best->evaluations_since);
      best.set_patience(report.best->patience);
    }
    if (report.memorized_pixel >= 0) eval.set_memorized_pixel(report.memorized_pixel);
    if (report.memorized_feature >= 0) eval.set_memorized_feature(report.memorized_feature);
    if (report.has_prd) {
      eval.set_precision(report.precision);
      eval.set_recall(report.recall);
      eval.set_density(report.density);
      eval.set_coverage(report.coverage);
      eval.set_prd_reference_count(report.prd_reference_count);
    }
    if (report.has_nll) {
      eval.set_nll_bits_per_dim(report.nll_bits_per_dim);
      eval.set_nll_std_error(report.nll_std_error);
      eval.set_nll_images(report.nll_images);
      eval.set_nll_data(report.nll_data);
      eval.set_nll_timesteps(report.nll_timesteps);
      eval.set_nll_timesteps_total(report.nll_timesteps_total);
    }
    return request;
  }

  // Runs one evaluation job; returns true when a signal asked the whole group to shut down.
  bool Evaluate(const v1::GroupCommand& command) {
    const int rank = comm.rank();
    const std::string& run_id = command.run_id();
    const int attempt = command.placement().attempt();
    const v1::EvalJob& evaluation = command.evaluation();
    if (rank == 0) {
      LogInfo("ddpm_worker: %s",
              ("evaluating checkpoints " + evaluation.checkpoints() + " of run " +
               evaluation.source_run() + " as job " + run_id + " in " + command.run_dir() +
               " (attempt " + std::to_string(attempt) + ")")
                  .c_str());
    }
    recorder.SetRun(run_id);
    heartbeats->SetRun(run_id, attempt);
    bool taken_away = false;
    EvaluationJobOptions job;
    job.job_dir = command.run_dir();
    job.source_run = evaluation.source_run();
    job.source_run_dir = evaluation.source_run_dir();
    job.checkpoints = evaluation.checkpoints();
    job.memorization_train = evaluation.memorization_train();
    job.attempt = attempt;
    job.progress = options.progress;
    const auto start = std::chrono::steady_clock::now();
    auto last_push = start - std::chrono::hours(1);
    // Rank 0's results go on a thread of their own (see Train); the end follows the last.
    std::optional<RunReporter> reports;
    if (rank == 0) {
      reports.emplace(client, std::chrono::seconds(60));
      channel->SetCurrentRun(run_id, 0);
      job.poll_stop = [this, &command, &taken_away] {
        if (g_shutdown) return true;
        return PollStop(command, taken_away) != StopRequest::kNone;
      };
      job.on_progress = [this, &run_id, start, &last_push](int64_t done, int64_t total,
                                                           double rate) {
        recorder.RecordProgress(done);
        channel->SetCurrentRun(run_id, done);
        const auto now = std::chrono::steady_clock::now();
        if (now - last_push < std::chrono::seconds(2) && done < total) return;
        last_push = now;
        LogMetrics metrics;
        metrics.step = done;
        metrics.total_steps = total;
        metrics.images_per_second = rate;
        metrics.elapsed_seconds = std::chrono::duration<double>(now - start).count();
        metrics.eta_seconds = rate > 0 ? (total - done) / rate : 0;
        heartbeats->PushTrainMetrics(metrics);
      };
      job.on_result = [this, &run_id, attempt, &reports](const EvalReport& report) {
        reports->Post(EvalRequest(run_id, attempt, report));
      };
    }
    EvaluationJobResult result;
    const bool ran = Attempt("evaluation job " + run_id, run_id, attempt, [&] {
      const Config config =
          LoadConfigString(command.config_yaml(), "evaluation job " + run_id + "'s config");
      result = RunEvaluationJob(config, job, context_for(config));
    });
    if (!ran || rank != 0) return false;
    if (taken_away) {
      channel->SetCurrentRun("", 0);
      LogInfo("ddpm_worker: %s", ("evaluation job " + run_id + " (attempt " +
                                  std::to_string(attempt) + ") was taken away by the coordinator")
                                     .c_str());
      return false;
    }
    reports->Flush(std::chrono::seconds(60));
    ReportEnd(EndRequest(run_id, attempt,
                         result.stopped && g_shutdown ? g_shutdown_signal.load() : 0,
                         result.stopped));
    LogInfo("ddpm_worker: %s",
            ("evaluation job " + run_id + " ended with " + std::to_string(result.reports.size()) +
             " of " + std::to_string(result.planned.size()) +
             " checkpoints evaluated; waiting for the next")
                .c_str());
    return g_shutdown;
  }

  // How a run or job ended: interrupted by signal (0: none), else stopped or completed.
  v1::ReportRunEndRequest EndRequest(const std::string& run_id, int attempt, int signal,
                                     bool stopped) const {
    v1::ReportRunEndRequest end;
    end.set_group_id(group_id);
    end.set_run_id(run_id);
    end.set_attempt(attempt);
    if (signal != 0) {
      end.set_outcome(v1::ReportRunEndRequest::INTERRUPTED);
      end.set_message(signal == SIGINT ? "SIGINT" : "SIGTERM");
    } else if (stopped) {
      end.set_outcome(v1::ReportRunEndRequest::STOPPED);
    } else {
      end.set_outcome(v1::ReportRunEndRequest::COMPLETED);
    }
    return end;
  }

  // Rank 0: reports the end. The group goes on claiming the run until its end is reported: a
  // coordinator that restarts meanwhile must see the group come back with the run, not without
  // it (which would fail and restart a run that has ended). Until the group has registered
  // again the restarted coordinator answers NOT_FOUND, and the report goes again.
  void ReportEnd(const v1::ReportRunEndRequest& end) {
    const grpc::Status status =
        ReportWithRetry([&] { return client.ReportRunEnd(end); }, std::chrono::seconds(60));
    channel->SetCurrentRun("", 0);
    // A run taken away from the group is no longer its to report.
    if (!status.ok() && status.error_code() != grpc::StatusCode::FAILED_PRECONDITION) {
      LogInfo("ddpm_worker: %s", (DescribeStatus("ReportRunEnd", status)).c_str());
    }
  }

  // Reports an error from the rank that saw it, and that the group leaves; the caller then ends
  // the whole job.
  void ReportFailure(const std::string& run_id, int attempt, const std::exception& error) {
    const std::string message = "rank " + std::to_string(comm.rank()) + ": " + UserMessage(error);
    v1::ReportRunEndRequest end;
    end.set_group_id(group_id);
    end.set_run_id(run_id);
    end.set_attempt(attempt);
    end.set_outcome(v1::ReportRunEndRequest::FAILED);
    end.set_message(message);
    client.ReportRunEnd(end);
    // No registration again between the leave and the end of the job.
    if (channel != nullptr) channel->Stop();
    v1::LeaveRequest leave;
    leave.set_group_id(group_id);
    leave.set_reason("the group exits after an error on " + message);
    client.Leave(leave);
  }

  // A collective failed (a peer died or stopped answering): not the run's fault, so the group
  // leaves, naming the rank and the collective, and the coordinator places the run again. The
  // caller then ends the whole job.
  void ReportLost(const CommError& error) {
    // No registration again between the leave and the end of the job.
    if (channel != nullptr) channel->Stop();
    v1::LeaveRequest leave;
    leave.set_group_id(group_id);
    leave.set_reason("rank " + std::to_string(comm.rank()) + ": " + error.what());
    client.Leave(leave);
  }

  // Trains one assigned run; returns true when a signal asked the whole group to shut down.
  bool Train(const v1::GroupCommand& command) {
    const int rank = comm.rank();
    const std::string& run_id = command.run_id();
    if (rank == 0) {
      LogInfo("ddpm_worker: %s",
              ("training run " + run_id + " in " + command.run_dir() + " (attempt " +
               std::to_string(command.placement().attempt()) + ")")
                  .c_str());
    }
    const int attempt = command.placement().attempt();
    recorder.SetRun(run_id);
    heartbeats->SetRun(run_id, attempt);
    // Set when the coordinator gave the run to another attempt: then it is not ours to report.
    bool taken_away = false;
    TrainOptions train;
    train.run_dir = command.run_dir();
    train.resume = true;
    train.progress = options.progress;
    train.attempt = attempt;
    // Rank 0's checkpoint and evaluation reports go on a thread of their own (a coordinator
    // away stalls nothing); the end is reported after the last of them.
    std::optional<RunReporter> reports;
    if (rank == 0) reports.emplace(client, std::chrono::seconds(60));
    bool first_step = true;
    train.on_step = [this, rank, &run_id, &first_step](const WorkerMetrics& metrics) {
      recorder.RecordStep(metrics);
      if (rank == 0) channel->SetCurrentRun(run_id, metrics.step);
      // The attempt's first step goes out at once: the coordinator shows the run RUNNING.
      if (first_step && rank == 0) heartbeats->Poke();
      first_step = false;
    };
    if (rank == 0) {
      channel->SetCurrentRun(run_id, 0);
      train.poll_stop = [this, &command, &taken_away] { return PollStop(command, taken_away); };
      train.on_log = [this](const LogMetrics& metrics) { heartbeats->PushTrainMetrics(metrics); };
      train.on_sample_grid = [this](const std::string& path) { heartbeats->SetSampleGrid(path); };
      train.on_eval = [this, &run_id, attempt, &reports](const EvalReport& report) {
        reports->Post(EvalRequest(run_id, attempt, report));
      };
      train.on_checkpoint = [this, &run_id, attempt,
                             &reports](const CommittedCheckpoint& checkpoint) {
        recorder.RecordCheckpoint(checkpoint);
        v1::ReportCheckpointRequest request;
        request.set_group_id(group_id);
        request.set_run_id(run_id);
        request.set_attempt(attempt);
        request.mutable_checkpoint()->set_step(checkpoint.step);
        request.mutable_checkpoint()->set_path(checkpoint.dir);
        reports->Post(std::move(request));
      };
    }
    TrainResult result;
    const bool ran = Attempt("run " + run_id, run_id, attempt, [&] {
      const Config config = LoadConfigString(command.config_yaml(),
                                             "run " + run_id + "'s config from the coordinator");
      DistributedContext dist = context_for(config);
      // The split the coordinator placed the run with, used as it is (RunTraining checks it).
      dist.plan = PlacementPlan(command.placement());
      result = RunTraining(config, train, dist);
    });
    if (!ran) return false;
    if (rank != 0) return result.interrupted_by != 0;
    if (result.superseded) {
      channel->SetCurrentRun("", 0);
      LogInfo("ddpm_worker: %s", ("run " + run_id + " (attempt " + std::to_string(attempt) +
                                  ") was superseded by a newer attempt at step " +
                                  std::to_string(result.steps) + "; it wrote nothing after that")
                                     .c_str());
      return false;
    }
    if (taken_away) {
      channel->SetCurrentRun("", 0);
      LogInfo("ddpm_worker: %s",
              ("run " + run_id + " (attempt " + std::to_string(attempt) +
               ") was taken away by the coordinator at step " + std::to_string(result.steps))
                  .c_str());
      return false;
    }
    reports->Flush(std::chrono::seconds(60));
    v1::ReportRunEndRequest end =
        EndRequest(run_id, attempt, result.interrupted_by, result.stopped_by != StopRequest::kNone);
    end.set_step(result.steps);
    if (!result.completed_early.empty()) end.set_message(result.completed_early);
    if (!result.sample_grids.empty()) end.set_sample_grid(result.sample_grids.back());
    end.set_ema_weights(result.ema_weights);
    ReportEnd(end);
    LogInfo("ddpm_worker: %s", ("run " + run_id + " ended at step " + std::to_string(result.steps) +
                                "; waiting for the next")
                                   .c_str());
    return result.interrupted_by != 0;
  }
};

}  // namespace

int ServeGroup(const WorkerOptions& options, Communicator& comm, const ContextFactory& context_for,
               RankRecorder& recorder, RankLink* link) {
  const SignalScope signals({SIGINT, SIGTERM}, OnGroupSignal);
  const int rank = comm.rank();
  GatewayOptions gateway;
  gateway.channel.address = options.coordinator;
  gateway.channel.tls_ca = options.tls_ca;
  gateway.channel.tls_cert = options.tls_cert;
  gateway.channel.tls_key = options.tls_key;
  gateway.token = ReadToken(options.worker_token_file, "DDPM_WORKER_TOKEN");
  GatewayClient client(gateway);
  const std::vector<std::string> hosts = GatherText(comm, HostName());
  const std::vector<std::string> devices = GatherText(comm, recorder.device());
  std::vector<ProcessId> processes;
  for (const std::string& text : GatherText(comm, ThisProcess().ToText())) {
    processes.push_back(ProcessId::FromText(text));
  }

  Member member{options, comm, context_for, client, recorder, {}};
  std::unique_ptr<CommandChannel> channel;
  double interval = 5;
  if (rank == 0) {
    member.group_id =
        options.group_id.empty() ? HostName() + "-" + std::to_string(getpid()) : options.group_id;
    v1::RegisterRequest registration;
    registration.set_group_id(member.group_id);
    registration.set_world_size(comm.world_size());
    for (const std::string& host : hosts) registration.add_hostnames(host);
    for (const std::string& name : devices) registration.add_devices(name);
    channel = std::make_unique<CommandChannel>(client, registration);
    if (!channel->Start(g_shutdown)) {
      SendMessage(comm, kShutdown, "");
      if (channel->fatal().empty()) return 0;
      LogError("ddpm_worker: error: %s\n", channel->fatal().c_str());
      return 1;
    }
    interval = channel->heartbeat_interval_seconds();
    SendMessage(comm, kHello, member.group_id + "\n" + std::to_string(interval));
    member.channel = channel.get();
  } else {
    const auto [kind, payload] = ReceiveMessage(comm);
    if (kind != kHello) return 0;
    const size_t newline = payload.find('\n');
    member.group_id = payload.substr(0, newline);
    interval = std::stod(payload.substr(newline + 1));
  }
  Heartbeater heartbeats(client, member.group_id, recorder, interval, link);
  member.heartbeats = &heartbeats;
  // A peer that dies on its own: this rank reports it (the first to see it does) and ends the
  // job, which cannot train on without it. Not while the group shuts down in order.
  PeerWatchdog watchdog(rank, hosts, processes, [&](int peer, pid_t pid, const std::string& host) {
    if (g_shutdown) return;
    const std::string what =
        "rank " + std::to_string(peer) + " (pid " + std::to_string(pid) + " on " + host + ") died";
    // Rank 0's command channel would register the group again once the leave takes it away.
    if (channel) channel->Stop();
    v1::LeaveRequest leave;
    leave.set_group_id(member.group_id);
    leave.set_reason(what + ", as rank " + std::to_string(rank) + " saw");
    const grpc::Status status = client.Leave(leave);
    LogError("ddpm_worker: rank %d: error: %s; %s\n", rank, what.c_str(),
             status.ok() ? "the group left the coordinator and ends"
                         : (DescribeStatus("Leave", status) + "; the group ends").c_str());
    std::fflush(stdout);
    std::fflush(stderr);
    std::_Exit(1);
  });
  if (rank == 0 && comm.world_size() > 1) {
    LogInfo("ddpm_worker: %s",
            ("group " + member.group_id + ": " +
             (link != nullptr ? "one heartbeat for the group, gathered by rank 0"
                              : "a heartbeat from every rank (MPI lacks MPI_THREAD_MULTIPLE)") +
             "; watching " + std::to_string(watchdog.watched().size()) + " peers on this host")
                .c_str());
  }

  int exit_code = 0;
  std::string reason = "shut down";
  std::string last_started;
  while (true) {
    v1::GroupCommand command;
    if (rank == 0) {
      // The next TRAIN that is not the one just run, a signal, or a refusal.
      std::optional<v1::GroupCommand> next;
      while (!next) {
        if (g_shutdown) {
          reason = g_shutdown_signal == SIGINT ? "SIGINT" : "SIGTERM";
          break;
        }
        if (const std::string fatal = channel->fatal(); !fatal.empty()) {
          LogError("ddpm_worker: error: %s\n", fatal.c_str());
          reason = fatal;
          exit_code = 1;
          break;
        }
        int64_t version = 0;
        const v1::GroupCommand latest = channel->Latest(&version);
        if (IsWork(latest) && Key(latest) != last_started) {
          next = latest;
        } else {
          channel->WaitForChange(version, std::chrono::milliseconds(200));
        }
      }
      if (!next) {
        watchdog.Stop();
        SendMessage(comm, kShutdown, "");
        break;
      }
      command = *next;
      SendMessage(comm, kTrain, command.SerializeAsString());
    } else {
      const auto [kind, payload] = ReceiveMessage(comm);
      if (kind != kTrain) {
        watchdog.Stop();
        break;
      }
      if (!command.ParseFromString(payload)) throw CommError("a garbled run assignment");
    }
    last_started = Key(command);
    const bool shutdown = command.kind() == v1::GroupCommand::EVALUATE ? member.Evaluate(command)
                                                                       : member.Train(command);
    if (shutdown && rank == 0) {
      g_shutdown_signal = SIGTERM;
      g_shutdown = true;
    }
  }
  if (rank == 0) {
    channel->Stop();
    v1::LeaveRequest leave;
    leave.set_group_id(member.group_id);
    leave.set_reason(reason);
    client.Leave(leave);
    LogInfo("ddpm_worker: %s",
            ("group " + member.group_id + " left the coordinator (" + reason + ")").c_str());
  }
  return exit_code;
}

}  // namespace ddpm
