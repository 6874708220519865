// ddpm_coordinator: the control plane. Thin main: flags to options, then the library.
#include <cstdio>
#include <string>

#include "base/log.h"
#include "config/flags.h"
#include "coordinator/core.h"
#include "coordinator/service.h"

int main(int argc, char** argv) {
  ddpm::Flags flags(
      "ddpm_coordinator",
      "Schedules DDPM training runs over worker groups: gRPC Control (ddpmctl) and\n"
      "WorkerGateway (mpirun ... ddpm_worker --coordinator HOST:PORT) services, a SQLite run\n"
      "registry, heartbeats and restarts, Prometheus /metrics, and a web console of every run\n"
      "(--http-listen). Tokens come from files or DDPM_CONTROL_TOKEN / DDPM_WORKER_TOKEN /\n"
      "DDPM_VIEWER_TOKEN; without either they are generated into the data directory. Stops\n"
      "cleanly on SIGINT or SIGTERM.");
  flags.Add("data-dir", "directory of the registry (registry.db), tokens and address files",
            "coordinator-data");
  flags.Add("runs-dir",
            "where run directories go (every worker must see it); default DATA_DIR/runs", "");
  flags.Add("listen", "gRPC HOST:PORT (port 0: any free port, written to DATA_DIR/address)",
            "127.0.0.1:7070");
  flags.Add("metrics-listen", "Prometheus /metrics HOST:PORT; empty: none", "127.0.0.1:9464");
  flags.Add("http-listen",
            "web console and JSON API /api/v1/ HOST:PORT (HTTPS with --tls-cert; port 0: any, "
            "written to DATA_DIR/console_address); empty: none",
            "127.0.0.1:8080");
  flags.Add("viewer-token-file",
            "file holding the console's read-only token (default DDPM_VIEWER_TOKEN, else "
            "generated into DATA_DIR/viewer.token)",
            "");
  flags.Add("control-token-file", "file holding the token Control calls must carry", "");
  flags.Add("worker-token-file", "file holding the token WorkerGateway calls must carry", "");
  flags.Add("tls-cert", "PEM certificate chain: serve TLS (with --tls-key)", "");
  flags.Add("tls-key", "PEM private key of --tls-cert", "");
  flags.Add("tls-client-ca",
            "PEM CA certificate of the worker groups: their calls must present a client "
            "certificate it signed (mutual TLS; needs --tls-cert)",
            "");
  flags.Add("heartbeat-interval", "seconds between each rank's heartbeats", "5");
  flags.Add("heartbeat-timeout", "seconds without a heartbeat before a group is declared lost",
            "30");
  flags.Add("stream-grace",
            "seconds a group whose command stream closed (process gone, connection reset) has "
            "to come back before it is declared lost",
            "3");
  flags.Add("retain-ended",
            "ended runs kept in the registry: a count (the newest 500) or an age (30d, 12h); "
            "older ones are forgotten, their run directories kept (default: all)",
            "");
  flags.Add("restore",
            "restore a registry backup (ddpmctl backup FILE) into --data-dir and exit; the "
            "registry it replaces is kept beside it. Refused while a coordinator runs there",
            "");
  flags.Add("max-restarts", "restarts a run gets after lost groups, unless StartRun says", "3");
  flags.Add("max-message-bytes", "largest request accepted", "4194304");
  return ddpm::RunMain(flags, argc, argv, [&] {
    ddpm::CoordinatorOptions core;
    core.data_dir = flags.Get("data-dir");
    if (flags.Given("restore")) {
      const ddpm::RegistryFileSummary restored =
          ddpm::RestoreRegistry(core.data_dir, flags.Get("restore"));
      ddpm::LogInfo(
          "ddpm_coordinator: restored %lld runs (schema %lld) from %s into %s/registry.db\n",
          static_cast<long long>(restored.runs), static_cast<long long>(restored.schema),
          flags.Get("restore").c_str(), core.data_dir.c_str());
      return 0;
    }
    if (flags.Given("retain-ended")) {
      try {
        ddpm::ParseRetainEnded(flags.Get("retain-ended"), core);
      } catch (const std::invalid_argument& error) {
        throw ddpm::FlagError(std::string("ddpm_coordinator: ") + error.what());
      }
    }
    core.runs_dir = flags.Get("runs-dir");
    core.heartbeat_interval_seconds = flags.GetDouble("heartbeat-interval");
    core.heartbeat_timeout_seconds = flags.GetDouble("heartbeat-timeout");
    core.default_max_restarts = static_cast<int>(flags.GetInt("max-restarts"));
    core.stream_grace_seconds = flags.GetDouble("stream-grace");
    if (!(core.stream_grace_seconds >= 0)) {
      throw ddpm::FlagError("ddpm_coordinator: --stream-grace must be 0 or more seconds");
    }
    if (core.heartbeat_interval_seconds <= 0 ||
        core.heartbeat_timeout_seconds <= core.heartbeat_interval_seconds) {
      throw ddpm::FlagError(
          "ddpm_coordinator: --heartbeat-timeout must exceed --heartbeat-interval > 0");
    }
    ddpm::ServerOptions server;
    server.listen = flags.Get("listen");
    server.metrics_listen = flags.Get("metrics-listen");
    server.http_listen = flags.Get("http-listen");
    server.tls_cert = flags.Get("tls-cert");
    server.tls_key = flags.Get("tls-key");
    server.tls_client_ca = flags.Get("tls-client-ca");
    server.max_message_bytes = static_cast<int>(flags.GetInt("max-message-bytes"));
    ddpm::TokenSources tokens;
    tokens.control_token_file = flags.Get("control-token-file");
    tokens.worker_token_file = flags.Get("worker-token-file");
    tokens.viewer_token_file = flags.Get("viewer-token-file");
    return ddpm::ServeUntilSignalled(core, server, tokens);
  });
}
