// ddpmctl: starts, stops, lists, shows, watches and deletes runs on a ddpm_coordinator.
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cstdlib>

#include "tools/ctl.h"

int main(int argc, char** argv) {
  CLI::App app{
      "ddpmctl: controls DDPM training runs on a ddpm_coordinator.\n"
      "The control token comes from --token-file or $DDPM_CONTROL_TOKEN.\n"
      "Exit codes: 0 ok, 1 refused or run failed, 2 bad command line, 66 unreadable file,\n"
      "69 coordinator unreachable, 77 token refused."};
  app.require_subcommand(1);
  // Global options may also follow the subcommand: `ddpmctl get RUN --json`.
  app.fallthrough();
  ddpm::CtlOptions options;
  const char* address = std::getenv("DDPM_COORDINATOR");
  if (address != nullptr) options.channel.address = address;
  app.add_option("--coordinator", options.channel.address,
                 "coordinator HOST:PORT (default $DDPM_COORDINATOR, else 127.0.0.1:7070)");
  app.add_option("--token-file", options.token_file, "file holding the control token");
  app.add_option("--tls-ca", options.channel.tls_ca,
                 "PEM CA certificate: connect over TLS and trust it");
  app.add_flag("--json", options.json, "print JSON (one object per line for watch)");
  app.add_option("--timeout", options.timeout_seconds, "seconds a call may take")
      ->check(CLI::PositiveNumber);

  ddpm::StartOptions start;
  bool start_watch = false;
  CLI::App* start_cmd = app.add_subcommand("start", "queue a run from a YAML config");
  start_cmd->add_option("config", start.config_path, "the run's config file")->required();
  start_cmd->add_option("--name", start.name, "a name; the run id is NAME-N");
  start_cmd->add_option("--priority", start.priority, "higher runs are scheduled first");
  start_cmd->add_option("--max-restarts", start.max_restarts,
                        "restarts after lost groups (default: the coordinator's)")
      ->check(CLI::NonNegativeNumber);
  start_cmd->add_flag("--watch", start_watch, "then watch it to its end");

  std::string run;
  bool now = false;
  CLI::App* stop_cmd = app.add_subcommand("stop", "stop a run: checkpoint, then stop");
  stop_cmd->add_option("run", run, "run id or unique name")->required();
  stop_cmd->add_flag("--now", now, "stop at once, without a checkpoint");

  std::string state;
  CLI::App* list_cmd = app.add_subcommand("list", "list runs");
  list_cmd->add_option("--state", state, "only runs in this state (e.g. RUNNING)");

  CLI::App* get_cmd = app.add_subcommand("get", "show a run and its transitions");
  get_cmd->add_option("run", run, "run id or unique name")->required();
  CLI::App* watch_cmd =
      app.add_subcommand("watch", "follow a run to its end: progress, loss, images/s, ETA");
  watch_cmd->add_option("run", run, "run id or unique name")->required();
  CLI::App* delete_cmd = app.add_subcommand("delete", "forget a finished run (files stay)");
  delete_cmd->add_option("run", run, "run id or unique name")->required();

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& error) {
    const int code = app.exit(error);
    return code == 0 ? 0 : ddpm::kCtlUsage;
  }
  options.terminal = !options.json && isatty(STDOUT_FILENO) != 0;

  if (*start_cmd) {
    std::string id;
    const int code = ddpm::CtlStart(options, start, &id);
    if (code != ddpm::kCtlOk || !start_watch) return code;
    return ddpm::CtlWatch(options, id);
  }
  if (*stop_cmd) return ddpm::CtlStop(options, run, now);
  if (*list_cmd) return ddpm::CtlList(options, state);
  if (*get_cmd) return ddpm::CtlGet(options, run);
  if (*watch_cmd) return ddpm::CtlWatch(options, run);
  if (*delete_cmd) return ddpm::CtlDelete(options, run);
  return ddpm::kCtlUsage;
}
