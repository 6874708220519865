// The coordinator's web console: an HTTP(S) server (cpp-httplib) with the read-only JSON API
// /api/v1/ (Protobuf's JSON mapping of the Control and console messages), Server-Sent Events
// for live pages, the runs' images from inside the runs directory, its three actions as POSTs,
// and the page itself (HTML, CSS and JavaScript compiled into the binary, Chart.js from
// Debian's libjs-chart.js).
#pragma once

#include <atomic>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>

#include "coordinator/core.h"

namespace httplib {
class Server;
}  // namespace httplib

namespace ddpm {

/// Where and how the console serves.
struct ConsoleOptions {
  /// HOST:PORT; port 0 picks a free one (Console::port()).
  std::string listen = "127.0.0.1:8080";
  /// The read-only token (sees everything, acts on nothing) and the control token (acts).
  std::string viewer_token;
  std::string control_token;
  /// PEM certificate chain and key (the coordinator's --tls-cert/--tls-key): HTTPS.
  std::string tls_cert;
  std::string tls_key;
  /// The most points a curve is served with (GET .../metrics caps max_points here).
  int max_points = 2000;
  /// Live event streams at once; one more is refused with 503.
  int max_streams = 100;
  /// Seconds between an event stream's keep-alive comments when nothing changes.
  double keepalive_seconds = 15;
};

/// Why a file of a run may not be served; the message names the path and the reason.
class FileRefused : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// The file relative under run_dir, after checking that it stays inside runs_dir: refuses an
/// empty, absolute or NUL-holding path, a ".." component, a name that is not .png or .csv, a
/// file that does not exist, and a path (through symlinks) that leads out of run_dir or
/// runs_dir.
std::filesystem::path ResolveRunFile(const std::string& runs_dir, const std::string& run_dir,
                                     const std::string& relative);

/// A running console over a core it does not own. Binds and starts in the constructor.
class Console {
 public:
  /// Throws std::runtime_error naming the address or the TLS file when it cannot serve.
  Console(Coordinator& core, ConsoleOptions options);
  ~Console();
  Console(const Console&) = delete;
  Console& operator=(const Console&) = delete;

  int port() const { return port_; }
  /// The page's address: http(s)://HOST:PORT/.
  std::string url() const { return url_; }
  /// A run's page.
  std::string RunUrl(const std::string& run_id) const { return url_ + "#/runs/" + run_id; }
  /// Ends event streams and stops serving.
  void Shutdown();

 private:
  void Route();

  Coordinator& core_;
  const ConsoleOptions options_;
  std::unique_ptr<httplib::Server> server_;
  std::thread thread_;
  int port_ = 0;
  std::string url_;
  std::atomic<bool> stopping_{false};
  std::atomic<int> streams_{0};
};

}  // namespace ddpm
