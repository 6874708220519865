// The coordinator's gRPC server: thin Control and WorkerGateway services over the core, bearer
// token checks, optional TLS, a health ticker, and the Prometheus /metrics endpoint.
#pragma once

#include <atomic>
#include <memory>
#include <string>
#include <thread>

#include "coordinator/core.h"

namespace grpc {
class Server;
class Status;
}  // namespace grpc

namespace prometheus {
class Exposer;
}  // namespace prometheus

namespace ddpm {

/// Where and how the server listens.
struct ServerOptions {
  /// HOST:PORT for gRPC; port 0 picks a free one (see CoordinatorServer::port()).
  std::string listen = "127.0.0.1:7070";
  /// The bearer token Control calls must carry.
  std::string control_token;
  /// The bearer token WorkerGateway calls must carry.
  std::string worker_token;
  /// PEM certificate chain and private key; both set: TLS, both empty: plaintext.
  std::string tls_cert;
  std::string tls_key;
  /// PEM CA certificate of the worker groups (needs TLS): WorkerGateway calls must come over a
  /// connection whose client certificate this CA signed (mutual TLS); Control calls need none.
  /// Empty: tokens alone.
  std::string tls_client_ca;
  /// Requests larger than this many bytes are refused with RESOURCE_EXHAUSTED.
  int max_message_bytes = 4 << 20;
  /// HOST:PORT of the Prometheus /metrics endpoint; port 0 picks one; empty: none.
  std::string metrics_listen = "127.0.0.1:9464";
  /// HOST:PORT of the web console and its JSON API (console.h), served over TLS with the
  /// same certificate when tls_cert is set; port 0 picks one; empty: none.
  std::string http_listen;
  /// The console's read-only bearer token (the control token acts there too).
  std::string viewer_token;
  /// Seconds between probes that the registry takes a write, which set grpc.health.v1's
  /// status (SERVING, or NOT_SERVING naming the error on stderr).
  double health_probe_seconds = 5;
  /// Seconds between health checks (Coordinator::Tick).
  double tick_seconds = 0.25;
};

/// The gRPC status for an error from the core, the config or the registry.
grpc::Status ToGrpcStatus(const std::exception& error);

class ControlService;
class WorkerGatewayService;
class CoordinatorCollector;
class RpcMetrics;
class Console;

/// A running server over a core it does not own. Starts in the constructor.
class CoordinatorServer {
 public:
  /// Binds and starts; throws std::runtime_error naming the address when it cannot.
  CoordinatorServer(Coordinator& core, const ServerOptions& options);
  ~CoordinatorServer();
  CoordinatorServer(const CoordinatorServer&) = delete;
  CoordinatorServer& operator=(const CoordinatorServer&) = delete;

  /// The gRPC port bound.
  int port() const { return port_; }
  /// The /metrics port bound, or 0 when there is none.
  int metrics_port() const { return metrics_port_; }
  /// The console, or nullptr when it serves none.
  const Console* console() const { return console_.get(); }
  /// Ends streams, stops accepting calls and waits for the ones in flight (at most 5 s).
  void Shutdown();

 private:
  /// Probes the registry and sets the health service's status of "", ddpm.v1.Control and
  /// ddpm.v1.WorkerGateway.
  void UpdateHealth();

  Coordinator& core_;
  std::unique_ptr<RpcMetrics> rpc_metrics_;
  std::unique_ptr<ControlService> control_;
  std::unique_ptr<WorkerGatewayService> gateway_;
  std::unique_ptr<grpc::Server> server_;
  std::shared_ptr<CoordinatorCollector> collector_;
  std::unique_ptr<prometheus::Exposer> exposer_;
  std::unique_ptr<Console> console_;
  int port_ = 0;
  int metrics_port_ = 0;
  std::atomic<bool> stopping_{false};
  bool serving_ = true;
  std::thread ticker_;
};

}  // namespace ddpm

namespace ddpm {

/// Where the coordinator's tokens come from when ServerOptions does not hold them.
struct TokenSources {
  /// Files holding the tokens; empty: the DDPM_CONTROL_TOKEN and DDPM_WORKER_TOKEN environment
  /// variables; neither: tokens generated once into DATA_DIR/control.token and worker.token
  /// (mode 0600) and reused.
  std::string control_token_file;
  std::string worker_token_file;
  /// The console's viewer token, likewise: the file, DDPM_VIEWER_TOKEN, or
  /// DATA_DIR/viewer.token.
  std::string viewer_token_file;
};

/// Runs a coordinator until SIGINT or SIGTERM: opens the registry, starts the server, writes
/// the bound addresses to DATA_DIR/address and DATA_DIR/metrics_address, and shuts down
/// cleanly. Returns the exit code.
int ServeUntilSignalled(const CoordinatorOptions& core_options, ServerOptions server_options,
                        const TokenSources& tokens);

}  // namespace ddpm
