#include "coordinator/service.h"

#include <fcntl.h>
#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <prometheus/collectable.h>
#include <prometheus/exposer.h>
#include <prometheus/metric_family.h>
#include <pthread.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>

#include "base/errors.h"
#include "base/file_io.h"
#include "base/log.h"
#include "base/random.h"
#include "base/sha256.h"
#include "config/config.h"
#include "coordinator/console.h"
#include "coordinator/metrics.h"
#include "ddpm/v1/control.grpc.pb.h"
#include "ddpm/v1/worker_gateway.grpc.pb.h"
#include "proto/rpc.h"

namespace ddpm {

grpc::Status ToGrpcStatus(const std::exception& error) {
  if (const auto* refused = dynamic_cast<const CoordinatorError*>(&error)) {
    switch (refused->code()) {
      case ErrorCode::kInvalidArgument:
        return {grpc::StatusCode::INVALID_ARGUMENT, refused->what()};
      case ErrorCode::kNotFound:
        return {grpc::StatusCode::NOT_FOUND, refused->what()};
      case ErrorCode::kAlreadyExists:
        return {grpc::StatusCode::ALREADY_EXISTS, refused->what()};
      case ErrorCode::kFailedPrecondition:
        return {grpc::StatusCode::FAILED_PRECONDITION, refused->what()};
      case ErrorCode::kUnavailable:
        return {grpc::StatusCode::UNAVAILABLE, refused->what()};
    }
  }
  if (dynamic_cast<const ConfigError*>(&error) != nullptr) {
    return {grpc::StatusCode::INVALID_ARGUMENT, error.what()};
  }
  return {grpc::StatusCode::INTERNAL, error.what()};
}

// What every call of one service shares: its token, and where its calls are counted.
struct ServiceGate {
  std::string service;  // "Control" or "WorkerGateway"
  std::string token;
  const char* which;  // "control" or "worker", the token's name in errors
  RpcMetrics& metrics;
  // Calls must come with a client certificate that the server verified (mutual TLS).
  bool require_client_certificate = false;
};

namespace {

// Checks the bearer token, then runs body, turning exceptions into one status.
grpc::Status CheckAndRun(grpc::ServerContext* context, const ServiceGate& gate, const char* rpc,
                         const std::function<void()>& body) {
  if (gate.require_client_certificate) {
    // The handshake verified any certificate the client sent against --tls-client-ca; here the
    // call must have come with one.
    const std::shared_ptr<const grpc::AuthContext> auth = context->auth_context();
    if (auth == nullptr || !auth->IsPeerAuthenticated()) {
      return {grpc::StatusCode::UNAUTHENTICATED,
              std::string(rpc) +
                  ": worker groups must present a client certificate signed by "
                  "the coordinator's --tls-client-ca"};
    }
  }
  const auto& metadata = context->client_metadata();
  const auto header = metadata.find("authorization");
  if (header == metadata.end()) {
    return {grpc::StatusCode::UNAUTHENTICATED,
            std::string(rpc) + ": no bearer token; send the " + gate.which + " token"};
  }
  const std::string value(header->second.data(), header->second.size());
  const std::string prefix = "Bearer ";
  if (value.compare(0, prefix.size(), prefix) != 0 ||
      !SameToken(value.substr(prefix.size()), gate.token)) {
    return {grpc::StatusCode::UNAUTHENTICATED,
            std::string(rpc) + ": the bearer token is not the " + gate.which + " token"};
  }
  try {
    body();
    return grpc::Status::OK;
  } catch (const std::exception& error) {
    return ToGrpcStatus(error);
  }
}

// One call: checked, run, and counted by method and status code (timed when unary).
grpc::Status Serve(grpc::ServerContext* context, const ServiceGate& gate, const char* rpc,
                   const std::function<void()>& body, bool unary = true) {
  const auto start = std::chrono::steady_clock::now();
  grpc::Status status = CheckAndRun(context, gate, rpc, body);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  gate.metrics.Record(gate.service + "/" + rpc, StatusCodeName(status.error_code()),
                      unary ? seconds : -1);
  return status;
}

// How long a stream waits before it checks whether its client or the server went away: a
// group's closed command stream starts its grace (--stream-grace) within this. (At 200 ms, a
// thousand groups' streams waking cost the coordinator 12% more of a core: BENCHMARKS.md.)
constexpr std::chrono::milliseconds kStreamPoll(500);

// A group's command stream, open for this object's life (Coordinator::OpenStream).
class OpenCommandStream {
 public:
  OpenCommandStream(Coordinator& core, std::string group_id, std::string session)
      : core_(core), group_id_(std::move(group_id)), session_(std::move(session)) {
    core_.OpenStream(group_id_, session_);
  }
  ~OpenCommandStream() { core_.CloseStream(group_id_, session_); }
  OpenCommandStream(const OpenCommandStream&) = delete;
  OpenCommandStream& operator=(const OpenCommandStream&) = delete;

 private:
  Coordinator& core_;
  const std::string group_id_, session_;
};

}  // namespace

class ControlService final : public v1::Control::Service {
 public:
  ControlService(Coordinator& core, std::string token, RpcMetrics& metrics,
                 const std::atomic<bool>& stopping, const std::unique_ptr<Console>& console)
      : core_(core),
        gate_{"Control", std::move(token), "control", metrics},
        stopping_(stopping),
        console_(console) {}

  grpc::Status StartRun(grpc::ServerContext* context, const v1::StartRunRequest* request,
                        v1::StartRunResponse* response) override {
    return Serve(context, gate_, "StartRun", [&] {
      *response->mutable_run() = core_.StartRun(*request);
      if (console_) response->set_page_url(console_->RunUrl(response->run().id()));
    });
  }
  grpc::Status StopRun(grpc::ServerContext* context, const v1::StopRunRequest* request,
                       v1::StopRunResponse* response) override {
    return Serve(context, gate_, "StopRun", [&] {
      *response->mutable_run() = core_.StopRun(request->run(), request->immediate());
    });
  }
  grpc::Status GetRun(grpc::ServerContext* context, const v1::GetRunRequest* request,
                      v1::GetRunResponse* response) override {
    return Serve(context, gate_, "GetRun",
                 [&] { *response->mutable_run() = core_.GetRun(request->run()); });
  }
  grpc::Status ListRuns(grpc::ServerContext* context, const v1::ListRunsRequest* request,
                        v1::ListRunsResponse* response) override {
    return Serve(context, gate_, "ListRuns", [&] { *response = core_.ListRunsPage(*request); });
  }
  grpc::Status WatchRun(grpc::ServerContext* context, const v1::WatchRunRequest* request,
                        grpc::ServerWriter<v1::WatchRunEvent>* writer) override {
    return Serve(
        context, gate_, "WatchRun",
        [&] {
          const std::string run_id = core_.GetRun(request->run()).id();
          Coordinator::WatchCursor cursor;
          bool done = false;
          while (!done && !context->IsCancelled()) {
            if (stopping_) {
              throw CoordinatorError(ErrorCode::kUnavailable, "the coordinator is shutting down");
            }
            for (const v1::WatchRunEvent& event : core_.WaitForRunEvents(
                     run_id, cursor, std::chrono::steady_clock::now() + kStreamPoll, done)) {
              if (!writer->Write(event)) return;
            }
          }
        },
        /*unary=*/false);
  }
  grpc::Status DeleteRun(grpc::ServerContext* context, const v1::DeleteRunRequest* request,
                         v1::DeleteRunResponse*) override {
    return Serve(context, gate_, "DeleteRun", [&] { core_.DeleteRun(request->run()); });
  }
  grpc::Status DeleteRuns(grpc::ServerContext* context, const v1::DeleteRunsRequest* request,
                          v1::DeleteRunsResponse* response) override {
    return Serve(context, gate_, "DeleteRuns", [&] {
      for (std::string& id : core_.DeleteRunsEndedBefore(request->ended_before_unix_ms())) {
        response->add_deleted(std::move(id));
      }
    });
  }
  grpc::Status BackupRegistry(grpc::ServerContext* context, const v1::BackupRegistryRequest*,
                              grpc::ServerWriter<v1::BackupChunk>* writer) override {
    return Serve(
        context, gate_, "BackupRegistry",
        [&] {
          // The copy is made beside the registry, sent, and removed however the call ends.
          const std::string path =
              (std::filesystem::path(core_.options().data_dir) / ("backup-" + RandomHex(8) + ".db"))
                  .string();
          const std::unique_ptr<const std::string, void (*)(const std::string*)> remove(
              &path, [](const std::string* file) { std::filesystem::remove(*file); });
          const int64_t runs = core_.BackupRegistry(path);
          std::ifstream file(path, std::ios::binary);
          const int64_t total = static_cast<int64_t>(std::filesystem::file_size(path));
          Sha256 hash;
          std::string buffer(1 << 20, '\0');
          int64_t sent = 0;
          do {
            file.read(buffer.data(), static_cast<std::streamsize>(buffer.size()));
            const auto got = static_cast<size_t>(file.gcount());
            v1::BackupChunk chunk;
            chunk.set_data(buffer.data(), got);
            chunk.set_total_bytes(total);
            hash.Update(buffer.data(), got);
            sent += static_cast<int64_t>(got);
            if (sent == total) {
              chunk.set_sha256(hash.HexDigest());
              chunk.set_runs(runs);
            }
            if (!writer->Write(chunk)) return;
          } while (sent < total && file);
          if (sent != total) {
            throw FileError("the backup copy " + path + " ended after " + std::to_string(sent) +
                            " of " + std::to_string(total) + " bytes");
          }
        },
        /*unary=*/false);
  }
  grpc::Status StartEval(grpc::ServerContext* context, const v1::StartEvalRequest* request,
                         v1::StartEvalResponse* response) override {
    return Serve(context, gate_, "StartEval",
                 [&] { *response->mutable_run() = core_.StartEval(*request); });
  }

 private:
  Coordinator& core_;
  const ServiceGate gate_;
  const std::atomic<bool>& stopping_;
  const std::unique_ptr<Console>& console_;
};

class WorkerGatewayService final : public v1::WorkerGateway::Service {
 public:
  WorkerGatewayService(Coordinator& core, std::string token, bool require_client_certificate,
                       RpcMetrics& metrics, const std::atomic<bool>& stopping)
      : core_(core),
        gate_{"WorkerGateway", std::move(token), "worker", metrics, require_client_certificate},
        stopping_(stopping) {}

  grpc::Status Register(grpc::ServerContext* context, const v1::RegisterRequest* request,
                        v1::RegisterResponse* response) override {
    return Serve(context, gate_, "Register", [&] { *response = core_.Register(*request); });
  }
  grpc::Status Commands(grpc::ServerContext* context, const v1::CommandsRequest* request,
                        grpc::ServerWriter<v1::GroupCommand>* writer) override {
    return Serve(
        context, gate_, "Commands",
        [&] {
          // However the stream ends, the group's grace (--stream-grace) starts.
          const OpenCommandStream open(core_, request->group_id(), request->session());
          int64_t version = 0;
          while (!context->IsCancelled()) {
            if (stopping_) {
              throw CoordinatorError(ErrorCode::kUnavailable, "the coordinator is shutting down");
            }
            const std::optional<v1::GroupCommand> command =
                core_.WaitForCommand(request->group_id(), request->session(), version,
                                     std::chrono::steady_clock::now() + kStreamPoll);
            if (command && !writer->Write(*command)) return;
          }
        },
        /*unary=*/false);
  }
  grpc::Status Heartbeat(grpc::ServerContext* context, const v1::HeartbeatRequest* request,
                         v1::HeartbeatResponse*) override {
    return Serve(context, gate_, "Heartbeat", [&] { core_.Heartbeat(*request); });
  }
  grpc::Status ReportCheckpoint(grpc::ServerContext* context,
                                const v1::ReportCheckpointRequest* request,
                                v1::ReportCheckpointResponse*) override {
    return Serve(context, gate_, "ReportCheckpoint", [&] { core_.ReportCheckpoint(*request); });
  }
  grpc::Status ReportEval(grpc::ServerContext* context, const v1::ReportEvalRequest* request,
                          v1::ReportEvalResponse*) override {
    return Serve(context, gate_, "ReportEval", [&] { core_.ReportEval(*request); });
  }
  grpc::Status ReportRunEnd(grpc::ServerContext* context, const v1::ReportRunEndRequest* request,
                            v1::ReportRunEndResponse*) override {
    return Serve(context, gate_, "ReportRunEnd", [&] { core_.ReportRunEnd(*request); });
  }
  grpc::Status Leave(grpc::ServerContext* context, const v1::LeaveRequest* request,
                     v1::LeaveResponse*) override {
    return Serve(context, gate_, "Leave", [&] { core_.Leave(*request); });
  }

 private:
  Coordinator& core_;
  const ServiceGate gate_;
  const std::atomic<bool>& stopping_;
};

CoordinatorServer::CoordinatorServer(Coordinator& core, const ServerOptions& options)
    : core_(core) {
  if (options.control_token.empty() || options.worker_token.empty()) {
    throw RpcSetupError("the coordinator needs both a control and a worker token");
  }
  if (options.control_token == options.worker_token) {
    throw RpcSetupError("the control and worker tokens must differ");
  }
  if (options.tls_cert.empty() != options.tls_key.empty()) {
    throw RpcSetupError("TLS needs both a certificate and a key file");
  }
  if (!options.tls_client_ca.empty() && options.tls_cert.empty()) {
    throw RpcSetupError(
        "--tls-client-ca (mutual TLS for worker groups) needs TLS: give "
        "--tls-cert and --tls-key too");
  }
  rpc_metrics_ = std::make_unique<RpcMetrics>();
  control_ = std::make_unique<ControlService>(core, options.control_token, *rpc_metrics_, stopping_,
                                              console_);
  gateway_ = std::make_unique<WorkerGatewayService>(
      core, options.worker_token, !options.tls_client_ca.empty(), *rpc_metrics_, stopping_);
  std::shared_ptr<grpc::ServerCredentials> credentials = grpc::InsecureServerCredentials();
  if (!options.tls_cert.empty()) {
    grpc::SslServerCredentialsOptions ssl;
    ssl.pem_key_cert_pairs.push_back({ReadTextFile(options.tls_key, "TLS key"),
                                      ReadTextFile(options.tls_cert, "TLS certificate")});
    if (!options.tls_client_ca.empty()) {
      // Verify a client certificate when one is sent (worker groups must send one; ddpmctl
      // need not), against the workers' CA only.
      ssl.pem_root_certs = ReadTextFile(options.tls_client_ca, "TLS client CA certificate");
      ssl.client_certificate_request = GRPC_SSL_REQUEST_CLIENT_CERTIFICATE_AND_VERIFY;
    }
    credentials = grpc::SslServerCredentials(ssl);
  }
  // grpc.health.v1.Health and server reflection, from the gRPC library itself (its default
  // health service and libgrpc++_reflection's plugin); neither needs a token, as neither tells
  // anything about runs.
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options.listen, credentials, &port_);
  builder.SetMaxReceiveMessageSize(options.max_message_bytes);
  builder.RegisterService(control_.get());
  builder.RegisterService(gateway_.get());
  server_ = builder.BuildAndStart();
  if (!server_ || port_ == 0) {
    throw RpcSetupError("cannot listen for gRPC on " + options.listen +
                        " (in use, or not an address of this host)");
  }
  if (!options.metrics_listen.empty()) {
    try {
      exposer_ = std::make_unique<prometheus::Exposer>(options.metrics_listen);
    } catch (const std::exception& error) {
      server_->Shutdown();
      throw RpcSetupError("cannot serve /metrics on " + options.metrics_listen + ": " +
                          error.what());
    }
    collector_ = std::make_shared<CoordinatorCollector>(core);
    exposer_->RegisterCollectable(collector_);
    exposer_->RegisterCollectable(rpc_metrics_->registry());
    const std::vector<int> ports = exposer_->GetListeningPorts();
    metrics_port_ = ports.empty() ? 0 : ports.front();
  }
  if (!options.http_listen.empty()) {
    ConsoleOptions console;
    console.listen = options.http_listen;
    console.viewer_token = options.viewer_token;
    console.control_token = options.control_token;
    console.tls_cert = options.tls_cert;
    console.tls_key = options.tls_key;
    try {
      console_ = std::make_unique<Console>(core, console);
    } catch (const std::exception&) {
      server_->Shutdown();
      throw;
    }
  }
  UpdateHealth();
  ticker_ = std::thread([this, tick = options.tick_seconds, probe = options.health_probe_seconds] {
    auto probed = std::chrono::steady_clock::now();
    while (!stopping_) {
      try {
        core_.Tick();
      } catch (const std::exception& error) {
        LogWarning("ddpm_coordinator: health check failed: %s\n", error.what());
      }
      if (std::chrono::steady_clock::now() - probed >
          std::chrono::milliseconds(static_cast<int64_t>(probe * 1000))) {
        probed = std::chrono::steady_clock::now();
        UpdateHealth();
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(static_cast<int64_t>(tick * 1000)));
    }
  });
}

CoordinatorServer::~CoordinatorServer() { Shutdown(); }

void CoordinatorServer::UpdateHealth() {
  std::string error;
  const bool serving = core_.RegistryWritable(&error);
  if (!serving && serving_) {
    LogWarning("ddpm_coordinator: NOT_SERVING: the registry does not take writes: %s\n",
               error.c_str());
  } else if (serving && !serving_) {
    LogInfo("ddpm_coordinator: SERVING\n");
  }
  serving_ = serving;
  grpc::HealthCheckServiceInterface* health = server_->GetHealthCheckService();
  if (health == nullptr || stopping_) return;
  health->SetServingStatus(serving);  // the server as a whole ("")
  for (const char* service : {"ddpm.v1.Control", "ddpm.v1.WorkerGateway"}) {
    health->SetServingStatus(service, serving);
  }
}

void CoordinatorServer::Shutdown() {
  if (stopping_.exchange(true)) return;
  // NOT_SERVING first, to every Check and Watch, while calls are still answered.
  if (grpc::HealthCheckServiceInterface* health = server_->GetHealthCheckService()) {
    health->Shutdown();
  }
  core_.Shutdown();
  server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
  if (console_) console_->Shutdown();
  if (ticker_.joinable()) ticker_.join();
  exposer_.reset();
}

}  // namespace ddpm

namespace ddpm {
namespace {

// The token from its file or environment variable, else one generated into the data directory.
std::string ResolveToken(const std::string& file, const char* env, const std::string& data_dir,
                         const std::string& name, std::string& origin) {
  const char* from_env = std::getenv(env);
  if (!file.empty() || (from_env != nullptr && *from_env != '\0')) {
    origin = file.empty() ? std::string("$") + env : file;
    return ReadToken(file, env);
  }
  const std::string path = data_dir + "/" + name + ".token";
  origin = path;
  if (FILE* existing = std::fopen(path.c_str(), "r")) {
    std::fclose(existing);
    return ReadToken(path, env);
  }
  std::string token = RandomHex(32);
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL, 0600);
  if (fd < 0) throw RpcSetupError(ErrnoMessage("cannot create token file " + path));
  const std::string line = token + "\n";
  const bool written = ::write(fd, line.data(), line.size()) == static_cast<ssize_t>(line.size());
  ::close(fd);
  if (!written) throw RpcSetupError("cannot write token file " + path);
  return token;
}

void WriteAddress(const std::string& path, const std::string& address) {
  WriteFileAtomically(path, address + "\n", Durability::kRenamed);
}

std::string HostOf(const std::string& listen) { return listen.substr(0, listen.rfind(':')); }

}  // namespace

int ServeUntilSignalled(const CoordinatorOptions& core_options, ServerOptions server_options,
                        const TokenSources& tokens) {
  // Signals go to the thread that waits for them, not to gRPC's threads.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  SystemClock clock;
  Coordinator core(core_options, clock);
  std::string control_origin, worker_origin;
  if (server_options.control_token.empty()) {
    server_options.control_token = ResolveToken(tokens.control_token_file, "DDPM_CONTROL_TOKEN",
                                                core_options.data_dir, "control", control_origin);
  }
  if (server_options.worker_token.empty()) {
    server_options.worker_token = ResolveToken(tokens.worker_token_file, "DDPM_WORKER_TOKEN",
                                               core_options.data_dir, "worker", worker_origin);
  }
  std::string viewer_origin = "-";
  if (!server_options.http_listen.empty() && server_options.viewer_token.empty()) {
    server_options.viewer_token = ResolveToken(tokens.viewer_token_file, "DDPM_VIEWER_TOKEN",
                                               core_options.data_dir, "viewer", viewer_origin);
  }
  CoordinatorServer server(core, server_options);
  const std::string address = HostOf(server_options.listen) + ":" + std::to_string(server.port());
  WriteAddress(core_options.data_dir + "/address", address);
  std::string metrics = "none";
  if (server.metrics_port() != 0) {
    metrics = "http://" + HostOf(server_options.metrics_listen) + ":" +
              std::to_string(server.metrics_port()) + "/metrics";
    WriteAddress(core_options.data_dir + "/metrics_address", metrics);
  }
  std::string console = "none";
  if (server.console() != nullptr) {
    console = server.console()->url();
    WriteAddress(core_options.data_dir + "/console_address", console);
  }
  const std::vector<v1::Run> runs = core.ListRuns(v1::RUN_STATE_UNSPECIFIED);
  LogInfo(
      "ddpm_coordinator: serving on %s (%s), metrics at %s\n"
      "ddpm_coordinator: console at %s (viewer token from %s)\n"
      "ddpm_coordinator: registry %s/registry.db: %zu runs; control token from %s, worker "
      "token from %s\n",
      address.c_str(), server_options.tls_cert.empty() ? "plaintext" : "TLS", metrics.c_str(),
      console.c_str(), viewer_origin.c_str(), core_options.data_dir.c_str(), runs.size(),
      control_origin.c_str(), worker_origin.c_str());
  int signal = 0;
  sigwait(&signals, &signal);
  LogInfo("ddpm_coordinator: %s: shutting down\n", signal == SIGINT ? "SIGINT" : "SIGTERM");
  server.Shutdown();
  LogInfo("ddpm_coordinator: stopped\n");
  return 0;
}

}  // namespace ddpm
