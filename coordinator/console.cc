#include "coordinator/console.h"

#include <google/protobuf/util/json_util.h>
#include <httplib.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <sstream>

#include "base/csv.h"
#include "coordinator/console_assets.h"
#include "proto/rpc.h"

namespace ddpm {
namespace fs = std::filesystem;

fs::path ResolveRunFile(const std::string& runs_dir, const std::string& run_dir,
                        const std::string& relative) {
  const auto refuse = [&](const std::string& why) {
    return FileRefused("file '" + relative + "': " + why);
  };
  if (relative.empty()) throw refuse("empty path");
  if (relative.find('\0') != std::string::npos) throw refuse("holds a NUL byte");
  if (relative.front() == '/') throw refuse("an absolute path; give one relative to the run");
  for (const fs::path& part : fs::path(relative)) {
    if (part == "..") throw refuse("'..' leads out of the run directory");
  }
  const std::string extension = fs::path(relative).extension().string();
  if (extension != ".png" && extension != ".csv") {
    throw refuse("only .png and .csv files of a run are served");
  }
  std::error_code error;
  const fs::path root = fs::canonical(runs_dir, error);
  if (error) throw refuse("the runs directory " + runs_dir + " cannot be read: " + error.message());
  const fs::path run = fs::canonical(run_dir, error);
  if (error) throw refuse("the run directory " + run_dir + " cannot be read: " + error.message());
  fs::path file = fs::canonical(fs::path(run_dir) / relative, error);
  if (error) throw refuse("no such file in the run directory");
  const auto inside = [](const fs::path& path, const fs::path& folder) {
    const std::string prefix = folder.string() + "/";
    return path.string().compare(0, prefix.size(), prefix) == 0;
  };
  if (!inside(run, root)) throw refuse("the run directory is outside the runs directory");
  if (!inside(file, run) || !inside(file, root)) {
    throw refuse("it leads (through a symlink) out of the run directory");
  }
  if (!fs::is_regular_file(file, error)) throw refuse("not a regular file");
  return file;
}

namespace {

// Served with every response: no inline script or style, no framing, no sniffing.
const httplib::Headers kSecurityHeaders = {
    {"Content-Security-Policy",
     "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
     "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"},
    {"X-Content-Type-Options", "nosniff"},
    {"X-Frame-Options", "DENY"},
    {"Referrer-Policy", "no-referrer"},
    {"Cache-Control", "no-store"},
};

enum class Role { kNone, kViewer, kControl };

// An error for the API: its HTTP status and one line.
struct ApiFailure {
  int status;
  std::string message;
};

void SendJson(httplib::Response& response, const google::protobuf::Message& message,
              int status = 200) {
  response.status = status;
  response.set_content(ToJson(message), "application/json");
}

void SendError(httplib::Response& response, int status, const std::string& message) {
  v1::ApiError error;
  error.set_error(message);
  SendJson(response, error, status);
}

int HttpStatusOf(const std::exception& error) {
  if (const auto* refused = dynamic_cast<const CoordinatorError*>(&error)) {
    switch (refused->code()) {
      case ErrorCode::kInvalidArgument:
        return 400;
      case ErrorCode::kNotFound:
        return 404;
      case ErrorCode::kAlreadyExists:
      case ErrorCode::kFailedPrecondition:
        return 409;
      case ErrorCode::kUnavailable:
        return 503;
    }
  }
  if (dynamic_cast<const ConfigError*>(&error) != nullptr) return 400;
  if (dynamic_cast<const FileRefused*>(&error) != nullptr) return 403;
  return 500;
}

// The request's body as message: JSON, any unknown field refused by name.
void ParseBody(const httplib::Request& request, google::protobuf::Message& message) {
  if (request.body.empty()) return;
  google::protobuf::util::JsonParseOptions options;
  options.ignore_unknown_fields = false;
  const auto status = google::protobuf::util::JsonStringToMessage(request.body, &message, options);
  if (!status.ok()) {
    throw CoordinatorError(ErrorCode::kInvalidArgument,
                           "the request body is not a " + message.GetTypeName() +
                               " in JSON: " + std::string(status.message()));
  }
}

int64_t IntParameter(const httplib::Request& request, const char* name, int64_t fallback) {
  if (!request.has_param(name)) return fallback;
  const std::string text = request.get_param_value(name);
  try {
    size_t used = 0;
    const int64_t value = std::stoll(text, &used);
    if (used == text.size()) return value;
  } catch (const std::exception&) {
  }
  throw CoordinatorError(ErrorCode::kInvalidArgument, std::string("query parameter ") + name +
                                                          "='" + text + "' is not a whole number");
}

// RUN_DIR/samples/step_X.png, in step order.
std::vector<v1::SampleGrid> SampleGrids(const std::string& run_dir) {
  std::vector<v1::SampleGrid> grids;
  std::error_code error;
  for (const auto& entry : fs::directory_iterator(fs::path(run_dir) / "samples", error)) {
    const std::string name = entry.path().filename().string();
    if (name.rfind("step_", 0) != 0 || entry.path().extension() != ".png") continue;
    try {
      v1::SampleGrid& grid = grids.emplace_back();
      grid.set_step(std::stoll(name.substr(5)));
      grid.set_path("samples/" + name);
    } catch (const std::exception&) {
      grids.pop_back();
    }
  }
  std::sort(grids.begin(), grids.end(),
            [](const v1::SampleGrid& a, const v1::SampleGrid& b) { return a.step() < b.step(); });
  return grids;
}

// Files under a run directory a few levels down, relative paths, skipping checkpoints,
// post-hoc EMA snapshots and an evaluation job's per-step sample folders.
std::vector<std::string> RunFiles(const std::string& run_dir, const std::string& extension) {
  std::vector<std::string> files;
  std::error_code error;
  fs::recursive_directory_iterator it(run_dir, error), end;
  for (; !error && it != end; it.increment(error)) {
    const std::string name = it->path().filename().string();
    if (it->is_directory()) {
      if (it.depth() >= 2 || name == "checkpoints" || name == "phema" || name == "ranks" ||
          name == "samples" || name.rfind("step_", 0) == 0) {
        it.disable_recursion_pending();
      }
      continue;
    }
    if (it->path().extension() == extension) {
      files.push_back(fs::relative(it->path(), run_dir).string());
    }
  }
  std::sort(files.begin(), files.end());
  return files;
}

// A sweep CSV of ddpm_fid or ddpm_phema (first column "guidance" or "sigma_rel", then fid and
// inception_score), or nothing when the file is not one.
std::optional<v1::Sweep> ReadParameterSweep(const fs::path& path, const std::string& source) {
  std::ifstream in(path);
  std::string line;
  if (!std::getline(in, line)) return std::nullopt;
  std::string against;
  if (line.rfind("guidance,fid,inception_score,", 0) == 0) against = "guidance";
  if (line.rfind("sigma_rel,fid,inception_score,", 0) == 0) against = "sigma_rel";
  if (against.empty()) return std::nullopt;
  v1::Sweep sweep;
  sweep.set_against(against);
  sweep.set_source(source);
  while (std::getline(in, line)) {
    const std::vector<std::string> fields = SplitCsvLine(line);
    if (fields.size() < 3) continue;
    try {
      v1::SweepPoint& point = *sweep.add_points();
      point.set_x(std::stod(fields[0]));
      point.set_fid(std::stod(fields[1]));
      point.set_inception_score(std::stod(fields[2]));
    } catch (const std::exception&) {
      sweep.mutable_points()->RemoveLast();
    }
  }
  return sweep;
}

// The evaluation jobs of a training run, in submission order.
std::vector<v1::Run> EvaluationJobsOf(const Coordinator& core, const std::string& run_id) {
  std::vector<v1::Run> jobs;
  for (v1::Run& job : core.ListRuns(v1::RUN_STATE_UNSPECIFIED)) {
    if (job.kind() == v1::EVALUATION && job.evaluation().source_run() == run_id) {
      jobs.push_back(std::move(job));
    }
  }
  return jobs;
}

void AddFidPoint(v1::Sweep& sweep, double x, const v1::EvalResult& eval) {
  v1::SweepPoint& point = *sweep.add_points();
  point.set_x(x);
  point.set_fid(eval.fid());
  point.set_inception_score(eval.inception_score());
}

// The id in /api/v1/runs/{id}...
constexpr const char* kRunId = "([A-Za-z0-9._-]+)";

std::string Pattern(const std::string& tail) {
  return std::string("/api/v1/runs/") + kRunId + tail;
}

// An SSE frame: "event: NAME" and the JSON on one data line (protobuf's JSON has no newlines).
std::string EventFrame(const std::string& name, const std::string& json) {
  return "event: " + name + "\ndata: " + json + "\n\n";
}

}  // namespace

Console::Console(Coordinator& core, ConsoleOptions options)
    : core_(core), options_(std::move(options)) {
  if (options_.viewer_token.empty() || options_.control_token.empty()) {
    throw RpcSetupError("the console needs a viewer and a control token");
  }
  if (options_.viewer_token == options_.control_token) {
    throw RpcSetupError("the viewer and control tokens must differ");
  }
  if (options_.tls_cert.empty() != options_.tls_key.empty()) {
    throw RpcSetupError("the console's TLS needs both a certificate and a key file");
  }
  const bool tls = !options_.tls_cert.empty();
  if (tls) {
    // Read here so that a missing file is named; the server reads them again by path.
    ReadTextFile(options_.tls_cert, "TLS certificate");
    ReadTextFile(options_.tls_key, "TLS key");
    auto server =
        std::make_unique<httplib::SSLServer>(options_.tls_cert.c_str(), options_.tls_key.c_str());
    if (!server->is_valid()) {
      throw RpcSetupError("the console cannot serve HTTPS with " + options_.tls_cert + " and " +
                          options_.tls_key + " (not a PEM certificate and its key)");
    }
    server_ = std::move(server);
  } else {
    server_ = std::make_unique<httplib::Server>();
  }
  // Event streams hold a thread each while open: room for all of them and the requests beside.
  const size_t threads = static_cast<size_t>(options_.max_streams) + 16;
  server_->new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
  server_->set_default_headers(kSecurityHeaders);
  server_->set_payload_max_length(4 << 20);
  Route();
  const size_t colon = options_.listen.rfind(':');
  if (colon == std::string::npos) {
    throw RpcSetupError("--http-listen " + options_.listen + ": give HOST:PORT");
  }
  const std::string host = options_.listen.substr(0, colon);
  int port = 0;
  try {
    port = std::stoi(options_.listen.substr(colon + 1));
  } catch (const std::exception&) {
    throw RpcSetupError("--http-listen " + options_.listen + ": the port is not a number");
  }
  port_ = port == 0 ? server_->bind_to_any_port(host) : port;
  if (port_ <= 0 || (port != 0 && !server_->bind_to_port(host, port))) {
    throw RpcSetupError("cannot serve the console on " + options_.listen +
                        " (in use, or not an address of this host)");
  }
  url_ = std::string(tls ? "https" : "http") + "://" + host + ":" + std::to_string(port_) + "/";
  thread_ = std::thread([this] { server_->listen_after_bind(); });
}

Console::~Console() { Shutdown(); }

void Console::Shutdown() {
  if (stopping_.exchange(true)) return;
  server_->stop();
  if (thread_.joinable()) thread_.join();
}

void Console::Route() {
  httplib::Server& server = *server_;
  // The role the request's bearer token grants, or a 401 naming what is wrong.
  const auto authorize = [this](const httplib::Request& request) {
    if (!request.has_header("Authorization")) {
      throw ApiFailure{401,
                       "no bearer token: send the viewer or the control token as "
                       "'Authorization: Bearer TOKEN'"};
    }
    const std::string value = request.get_header_value("Authorization");
    const std::string prefix = "Bearer ";
    if (value.compare(0, prefix.size(), prefix) == 0) {
      const std::string token = value.substr(prefix.size());
      if (SameToken(token, options_.control_token)) return Role::kControl;
      if (SameToken(token, options_.viewer_token)) return Role::kViewer;
    }
    throw ApiFailure{401, "the bearer token is neither the viewer nor the control token"};
  };
  // Every API handler: authorized, its errors turned into one JSON line with a status.
  const auto api = [authorize](bool action, auto body) {
    return [authorize, action, body](const httplib::Request& request, httplib::Response& response) {
      try {
        const Role role = authorize(request);
        if (action) {
          if (role != Role::kControl) {
            throw ApiFailure{403, "POST " + request.path +
                                      " needs the control token; the viewer token only reads"};
          }
          // A cross-site form can send neither this header nor a JSON body, but a page that
          // has the token in another origin must not act either.
          const std::string origin = request.get_header_value("Origin");
          const std::string host = request.get_header_value("Host");
          if (!origin.empty() && origin != "http://" + host && origin != "https://" + host) {
            throw ApiFailure{403, "POST " + request.path + " from origin " + origin +
                                      " refused: actions come from the console's own page"};
          }
          const std::string type = request.get_header_value("Content-Type");
          if (type.rfind("application/json", 0) != 0) {
            throw ApiFailure{415, "POST " + request.path +
                                      " takes Content-Type application/json, not '" + type + "'"};
          }
        }
        body(request, response, role);
      } catch (const ApiFailure& failure) {
        SendError(response, failure.status, failure.message);
      } catch (const std::exception& error) {
        SendError(response, HttpStatusOf(error), error.what());
      }
    };
  };

  // The page: static files compiled in, no data in them, so no token.
  const auto asset = [](const httplib::Request& request, httplib::Response& response) {
    const std::string name = request.path == "/" ? "index.html" : request.path.substr(1);
    const ConsoleAsset* found = FindConsoleAsset(name);
    if (found == nullptr) {
      SendError(response, 404, "no page file '" + request.path + "'");
      return;
    }
    response.set_content(reinterpret_cast<const char*>(found->data), found->size,
                         found->content_type);
  };
  server.Get("/", asset);
  // No icon: an empty answer rather than a 404 in every browser's console.
  server.Get("/favicon.ico",
             [](const httplib::Request&, httplib::Response& response) { response.status = 204; });
  server.Get(R"(/([a-z_.]+\.(html|js|css)))", asset);

  server.Get("/api/v1/session",
             api(false, [](const httplib::Request&, httplib::Response& response, Role role) {
               v1::Session session;
               session.set_role(role == Role::kControl ? "control" : "viewer");
               SendJson(response, session);
             }));
  server.Get("/api/v1/runs",
             api(false, [this](const httplib::Request& request, httplib::Response& response, Role) {
               v1::RunState state = v1::RUN_STATE_UNSPECIFIED;
               if (request.has_param("state")) {
                 const std::string name = request.get_param_value("state");
                 if (!name.empty() && !v1::RunState_Parse(name, &state)) {
                   throw CoordinatorError(ErrorCode::kInvalidArgument,
                                          "query parameter state='" + name +
                                              "' is not a run state (QUEUED .. FAILED)");
                 }
               }
               v1::ListRunsResponse list;
               for (v1::Run& run : core_.ListRuns(state)) *list.add_runs() = std::move(run);
               SendJson(response, list);
             }));
  server.Get(Pattern(""),
             api(false, [this](const httplib::Request& request, httplib::Response& response, Role) {
               v1::GetRunResponse run;
               *run.mutable_run() = core_.GetRun(request.matches[1]);
               SendJson(response, run);
             }));
  server.Get(Pattern("/metrics"),
             api(false, [this](const httplib::Request& request, httplib::Response& response, Role) {
               const int64_t since = IntParameter(request, "since", -1);
               const int64_t wanted = IntParameter(request, "max_points", options_.max_points);
               const int max_points =
                   static_cast<int>(std::clamp<int64_t>(wanted, 2, options_.max_points));
               SendJson(response, core_.MetricHistory(request.matches[1], since, max_points));
             }));
  server.Get(Pattern("/checkpoints"),
             api(false, [this](const httplib::Request& request, httplib::Response& response, Role) {
               const v1::Run run = core_.GetRun(request.matches[1]);
               v1::Scorecard card;
               card.set_run(run.id());
               for (v1::SampleGrid& grid : SampleGrids(run.run_dir())) {
                 *card.add_grids() = std::move(grid);
               }
               // Each step's evaluation: the run's own, then any evaluation job's of it.
               std::map<int64_t, v1::EvalResult> evals;
               for (const v1::EvalResult& eval : core_.Evals(run.id())) {
                 v1::EvalResult& merged = evals[eval.step()];
                 if (eval.num_samples() > 0) {
                   merged.set_fid(eval.fid());
                   merged.set_inception_score(eval.inception_score());
                   merged.set_num_samples(eval.num_samples());
                   if (eval.has_kid()) merged.set_kid(eval.kid());
                 }
                 if (eval.has_nll_bits_per_dim())
                   merged.set_nll_bits_per_dim(eval.nll_bits_per_dim());
                 merged.set_step(eval.step());
               }
               for (const v1::Run& job : EvaluationJobsOf(core_, run.id())) {
                 for (const v1::EvalResult& eval : job.evaluation().results()) {
                   if (evals.count(eval.step()) == 0) evals[eval.step()] = eval;
                 }
               }
               for (const v1::CheckpointInfo& checkpoint : core_.Checkpoints(run.id())) {
                 v1::ScorecardRow& row = *card.add_rows();
                 *row.mutable_checkpoint() = checkpoint;
                 const v1::SampleGrid* nearest = nullptr;
                 for (const v1::SampleGrid& grid : card.grids()) {
                   if (nearest == nullptr || std::llabs(grid.step() - checkpoint.step()) <
                                                 std::llabs(nearest->step() - checkpoint.step())) {
                     nearest = &grid;
                   }
                 }
                 if (nearest != nullptr) *row.mutable_grid() = *nearest;
                 if (const auto it = evals.find(checkpoint.step()); it != evals.end()) {
                   *row.mutable_eval() = it->second;
                 }
               }
               // A checkpoint reported again after a restart is one row.
               auto* rows = card.mutable_rows();
               std::stable_sort(rows->begin(), rows->end(), [](const auto& a, const auto& b) {
                 return a.checkpoint().step() < b.checkpoint().step();
               });
               for (int i = rows->size() - 1; i > 0; --i) {
                 if ((*rows)[i].checkpoint().step() == (*rows)[i - 1].checkpoint().step()) {
                   rows->DeleteSubrange(i - 1, 1);
                 }
               }
               SendJson(response, card);
             }));
  server.Get(Pattern("/evaluations"),
             api(false, [this](const httplib::Request& request, httplib::Response& response, Role) {
               const v1::Run run = core_.GetRun(request.matches[1]);
               v1::Evaluations evaluations;
               evaluations.set_run(run.id());
               v1::Sweep training;
               training.set_against("step");
               training.set_source("training");
               for (v1::EvalResult& eval : core_.Evals(run.id())) {
                 if (eval.num_samples() > 0) AddFidPoint(training, eval.step(), eval);
                 *evaluations.add_evaluations() = std::move(eval);
               }
               if (training.points_size() > 0) *evaluations.add_sweeps() = training;
               std::map<int64_t, v1::Sweep> by_guidance;  // per step
               for (const v1::Run& job : EvaluationJobsOf(core_, run.id())) {
                 v1::Sweep steps;
                 steps.set_against("step");
                 steps.set_source(job.id());
                 for (const v1::EvalResult& eval : job.evaluation().results()) {
                   AddFidPoint(steps, eval.step(), eval);
                   if (eval.has_guidance()) {
                     v1::Sweep& sweep = by_guidance[eval.step()];
                     sweep.set_against("guidance");
                     sweep.set_source("evaluation jobs at step " + std::to_string(eval.step()));
                     AddFidPoint(sweep, eval.guidance(), eval);
                   }
                 }
                 if (steps.points_size() > 0) *evaluations.add_sweeps() = steps;
               }
               for (auto& [step, sweep] : by_guidance) {
                 if (sweep.points_size() < 2) continue;
                 auto* points = sweep.mutable_points();
                 std::sort(points->begin(), points->end(),
                           [](const auto& a, const auto& b) { return a.x() < b.x(); });
                 *evaluations.add_sweeps() = sweep;
               }
               for (const std::string& csv : RunFiles(run.run_dir(), ".csv")) {
                 if (auto sweep = ReadParameterSweep(fs::path(run.run_dir()) / csv, csv)) {
                   *evaluations.add_sweeps() = std::move(*sweep);
                 }
               }
               for (const std::string& png : RunFiles(run.run_dir(), ".png")) {
                 evaluations.add_plots(png);
               }
               SendJson(response, evaluations);
             }));
  server.Get(
      Pattern("/files/(.+)"),
      api(false, [this](const httplib::Request& request, httplib::Response& response, Role) {
        const v1::Run run = core_.GetRun(request.matches[1]);
        const fs::path file = ResolveRunFile(core_.runs_dir(), run.run_dir(), request.matches[2]);
        std::ifstream in(file, std::ios::binary);
        std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
        response.set_content(bytes,
                             file.extension() == ".png" ? "image/png" : "text/csv; charset=utf-8");
      }));
  server.Get("/api/v1/groups",
             api(false, [this](const httplib::Request&, httplib::Response& response, Role) {
               v1::ListGroupsResponse list;
               for (const GroupStatus& group : core_.Groups()) {
                 v1::WorkerGroup& out = *list.add_groups();
                 out.set_id(group.id);
                 out.set_world_size(group.world_size);
                 out.set_run(group.run_id);
                 v1::Run run;
                 if (!group.run_id.empty()) {
                   try {
                     run = core_.GetRun(group.run_id);
                   } catch (const CoordinatorError&) {
                   }
                 }
                 for (int rank = 0; rank < group.world_size; ++rank) {
                   v1::RankStatus& status = *out.add_ranks();
                   status.set_rank(rank);
                   const auto at = static_cast<size_t>(rank);
                   if (at < group.hostnames.size()) status.set_host(group.hostnames[at]);
                   if (at < group.devices.size()) status.set_device(group.devices[at]);
                   status.set_heartbeat_age_seconds(group.heartbeat_age_seconds[at]);
                   status.set_device_memory_bytes(group.device_memory_bytes[at]);
                   if (rank < run.ranks_size()) {
                     status.set_step(run.ranks(rank).step());
                     status.set_step_seconds(run.ranks(rank).step_seconds());
                     status.set_exposed_allreduce_seconds(run.ranks(rank).exposed_seconds());
                   }
                 }
               }
               SendJson(response, list);
             }));

  // Live updates as Server-Sent Events. Each stream holds a thread: they are counted and
  // bounded, and they end within half a second of a shutdown or of the client leaving.
  const auto stream = [this](httplib::Response& response, auto next) {
    if (streams_.fetch_add(1) >= options_.max_streams) {
      streams_.fetch_sub(1);
      throw ApiFailure{503, "too many live event streams (" + std::to_string(options_.max_streams) +
                                "); close another console page"};
    }
    response.set_header("X-Accel-Buffering", "no");
    response.set_chunked_content_provider(
        "text/event-stream",
        [this, next, quiet = std::chrono::steady_clock::now()](size_t,
                                                               httplib::DataSink& sink) mutable {
          while (!stopping_) {
            std::string frames;
            const bool more = next(frames);
            if (!frames.empty()) {
              quiet = std::chrono::steady_clock::now();
              if (!sink.write(frames.data(), frames.size())) return false;
              if (!more) sink.done();  // the last chunk, so the client sees a whole stream
              return true;
            }
            if (!more) {
              sink.done();
              return true;
            }
            if (!sink.is_writable()) return false;
            if (std::chrono::steady_clock::now() - quiet >
                std::chrono::duration<double>(options_.keepalive_seconds)) {
              quiet = std::chrono::steady_clock::now();
              const std::string ping = ": keep-alive\n\n";
              return sink.write(ping.data(), ping.size());
            }
          }
          sink.done();
          return true;
        },
        [this](bool) { streams_.fetch_sub(1); });
  };
  constexpr auto kPoll = std::chrono::milliseconds(500);
  // Any change to runs or groups: the lists refetch what they show.
  server.Get(
      "/api/v1/events",
      api(false, [this, stream, kPoll](const httplib::Request&, httplib::Response& response, Role) {
        stream(response,
               [this, kPoll, seen = uint64_t{0}, first = true](std::string& frames) mutable {
                 const uint64_t now =
                     first ? core_.WaitForChange(~uint64_t{0}, std::chrono::steady_clock::now())
                           : core_.WaitForChange(seen, std::chrono::steady_clock::now() + kPoll);
                 if (first || now != seen) {
                   first = false;
                   seen = now;
                   frames = "event: change\ndata: {\"change\":" + std::to_string(now) + "}\n\n";
                 }
                 return true;
               });
      }));
  // One run, as WatchRun streams it: the run now, then an event per transition and per new
  // metrics or evaluation, until it ends.
  server.Get(Pattern("/watch"),
             api(false, [this, stream, kPoll](const httplib::Request& request,
                                              httplib::Response& response, Role) {
               const std::string run_id = core_.GetRun(request.matches[1]).id();
               stream(response, [this, kPoll, run_id,
                                 cursor = Coordinator::WatchCursor{}](std::string& frames) mutable {
                 bool done = false;
                 for (const v1::WatchRunEvent& event : core_.WaitForRunEvents(
                          run_id, cursor, std::chrono::steady_clock::now() + kPoll, done)) {
                   frames += EventFrame("run", ToJson(event));
                 }
                 if (done) frames += "event: end\ndata: {}\n\n";
                 return !done;
               });
             }));

  // Actions: POSTs with the control token and a JSON body.
  server.Post("/api/v1/runs",
              api(true, [this](const httplib::Request& request, httplib::Response& response, Role) {
                v1::StartRunRequest start;
                ParseBody(request, start);
                v1::StartRunResponse started;
                *started.mutable_run() = core_.StartRun(start);
                started.set_page_url(RunUrl(started.run().id()));
                SendJson(response, started, 201);
              }));
  server.Post(Pattern(":stop"),
              api(true, [this](const httplib::Request& request, httplib::Response& response, Role) {
                v1::StopRunRequest stop;
                ParseBody(request, stop);
                v1::StopRunResponse stopped;
                *stopped.mutable_run() = core_.StopRun(request.matches[1], stop.immediate());
                SendJson(response, stopped);
              }));
  server.Post(Pattern(":delete"),
              api(true, [this](const httplib::Request& request, httplib::Response& response, Role) {
                core_.DeleteRun(request.matches[1]);
                SendJson(response, v1::DeleteRunResponse());
              }));
  server.Post(Pattern(":evaluate"),
              api(true, [this](const httplib::Request& request, httplib::Response& response, Role) {
                v1::StartEvalRequest eval;
                ParseBody(request, eval);
                eval.set_run(request.matches[1]);
                v1::StartEvalResponse started;
                *started.mutable_run() = core_.StartEval(eval);
                SendJson(response, started, 201);
              }));
  // Everything else under /api/: one JSON error naming the path, not httplib's HTML.
  server.set_error_handler([](const httplib::Request& request, httplib::Response& response) {
    if (!response.body.empty()) return;
    const std::string what = request.method + " " + request.path + ": ";
    switch (response.status) {
      case 404:
        SendError(response, 404, what + "no such page or API call");
        break;
      case 413:
        SendError(response, 413, what + "the body is over the console's 4 MiB");
        break;
      default:
        SendError(response, response.status,
                  what + "malformed request (HTTP " + std::to_string(response.status) + ")");
    }
  });
}

}  // namespace ddpm
