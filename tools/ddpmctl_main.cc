// ddpmctl: starts runs and evaluation jobs, stops, lists, shows, watches and deletes runs on a
// ddpm_coordinator, and backs up its registry. Thin main: the command and its flags to the
// library's Ctl* calls.
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "base/text.h"
#include "config/flags.h"
#include "tools/ctl.h"

namespace {

constexpr char kSummary[] =
    "Controls DDPM training runs on a ddpm_coordinator.\n"
    "Commands: start CONFIG, eval RUN, stop RUN, list, get RUN, watch RUN, delete RUN,\n"
    "delete --ended-before WHEN, backup FILE, health;\n"
    "flags may come before or after the command (ddpmctl COMMAND --help for its own).\n"
    "The control token comes from --token-file or $DDPM_CONTROL_TOKEN.\n"
    "Exit codes: 0 ok, 1 refused or run failed, 2 bad command line, 66 unreadable file,\n"
    "69 coordinator unreachable, 73 backup file not writable, 77 token refused.";

void AddGlobalFlags(ddpm::Flags& flags) {
  flags.Add("coordinator", "coordinator HOST:PORT (default $DDPM_COORDINATOR, else 127.0.0.1:7070)",
            "");
  flags.Add("token-file", "file holding the control token", "");
  flags.Add("tls-ca", "PEM CA certificate: connect over TLS and trust it", "");
  flags.AddSwitch("json", "print JSON (one object per line for watch)");
  flags.Add("timeout", "seconds a call may take", "30");
}

// The index of the command in argv: the first argument that is neither a flag nor the value
// of one of the global flags; 0 when there is none.
int CommandIndex(const ddpm::Flags& globals, int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg.rfind("--", 0) != 0) return i;
    if (arg.find('=') == std::string::npos && globals.TakesValue(arg.substr(2))) ++i;
  }
  return 0;
}

// Whether argv holds --name (or --name=VALUE).
bool HasFlag(int argc, char** argv, const std::string& name) {
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--" + name || arg.rfind("--" + name + "=", 0) == 0) return true;
  }
  return false;
}

// Declares the command's own flags and positional arguments; false for an unknown command.
bool AddCommandFlags(const std::string& command, ddpm::Flags& flags, int argc, char** argv) {
  if (command == "start") {
    flags.AddPositional("CONFIG", "the run's YAML config file");
    flags.Add("name", "a name; the run id is NAME-N", "");
    flags.Add("priority", "higher runs are scheduled first", "0");
    flags.Add("max-restarts", "restarts after lost groups (default: the coordinator's)", "");
    flags.AddSwitch("watch", "then watch it to its end");
  } else if (command == "eval") {
    flags.AddPositional("RUN", "the training run: id or unique name");
    flags.Add("checkpoint", "latest, all, every:K (steps that are multiples of K) or a step",
              "latest");
    flags.Add("protocol",
              "an evaluation protocol file (configs/eval/paper.yaml, quick.yaml); flags given "
              "override it",
              "");
    flags.Add("num",
              "samples per checkpoint (the paper: 50000; default: the run's eval.num_samples)", "");
    flags.Add("sampler", "ddpm, ddim or heun (default: the run's eval.sampler)", "");
    flags.Add("steps", "sampler steps (default: the run's eval.steps; 0: the sampler's own)", "");
    flags.Add("seed", "sample i draws from (seed, i) (default: the run's eval.seed)", "");
    flags.Add("batch", "samples per forward pass on each rank (default: the run's)", "");
    flags.Add("is-logits", "unbiased (the original TF code's) or biased (default: the run's)", "");
    flags.Add("metrics",
              "scores beside FID and IS, comma-separated: kid, prd (default: the run's "
              "eval.metrics)",
              "");
    flags.Add("memorization",
              "a memorization report of each checkpoint's samples against this training set: "
              "run (the run's own), cifar10:PATH, folder:PATH or npz:PATH (every group must "
              "read it)",
              "");
    flags.Add("guidance",
              "a class-conditional model's guidance w (eps_uncond + w (eps_cond - eps_uncond); "
              "default: the run's eval.guidance)",
              "");
    flags.Add("ref", "reference statistics .npz every group can read (default: the run's)", "");
    flags.Add("inception", "FID Inception weights every group can read (default: the run's)", "");
    flags.Add("name", "a name; the job id is NAME-N (default: the run's name + '-eval')", "");
    flags.Add("priority", "higher jobs and runs are scheduled first", "0");
    flags.Add("max-restarts", "restarts after lost groups (default: the coordinator's)", "");
    flags.AddSwitch("watch", "then watch it to its end");
  } else if (command == "stop") {
    flags.AddPositional("RUN", "run id or unique name");
    flags.AddSwitch("now", "stop at once, without a checkpoint");
  } else if (command == "list") {
    flags.Add("state", "only runs in this state (e.g. RUNNING)", "");
    flags.Add("name-prefix", "only runs whose name starts with this", "");
  } else if (command == "get" || command == "watch") {
    flags.AddPositional("RUN", "run id or unique name");
  } else if (command == "delete") {
    flags.Add("ended-before",
              "instead of one RUN: every run that ended before WHEN, an age (30d, 12h, 90m) or "
              "a UTC date or time (2026-11-01, 2026-11-01T12:00:00Z); run directories stay",
              "");
    if (!HasFlag(argc, argv, "ended-before")) {
      flags.AddPositional("RUN", "run id or unique name");
    }
  } else if (command == "backup") {
    flags.AddPositional("FILE",
                        "where the copy of the registry goes (whole or not at all); restore "
                        "it with ddpm_coordinator --data-dir DIR --restore FILE");
  } else if (command == "health") {
    flags.Add("service",
              "the service to ask about (ddpm.v1.Control, ddpm.v1.WorkerGateway; empty: the "
              "server)",
              "");
  } else {
    return false;
  }
  return true;
}

int RunCommand(const std::string& command, const ddpm::Flags& flags) {
  ddpm::CtlOptions options;
  if (flags.Given("coordinator")) {
    options.channel.address = flags.Get("coordinator");
  } else if (const char* address = std::getenv("DDPM_COORDINATOR")) {
    options.channel.address = address;
  }
  options.token_file = flags.Get("token-file");
  options.channel.tls_ca = flags.Get("tls-ca");
  options.json = flags.GetSwitch("json");
  options.timeout_seconds = flags.GetDouble("timeout");
  if (!(options.timeout_seconds > 0)) {
    throw ddpm::FlagError("ddpmctl: --timeout must be a positive number of seconds, got " +
                          flags.Get("timeout"));
  }
  options.terminal = !options.json && isatty(STDOUT_FILENO) != 0;
  if (command == "start") {
    ddpm::StartOptions start;
    start.config_path = flags.Get("CONFIG");
    start.name = flags.Get("name");
    start.priority = static_cast<int>(flags.GetInt("priority"));
    start.max_restarts = ddpm::MaxRestartsFromFlags(flags, "ddpmctl start");
    std::string id;
    const int code = ddpm::CtlStart(options, start, &id);
    if (code != ddpm::kCtlOk || !flags.GetSwitch("watch")) return code;
    return ddpm::CtlWatch(options, id);
  }
  if (command == "eval") {
    const ddpm::EvalOptions eval = ddpm::EvalOptionsFromFlags(flags);
    std::string id;
    const int code = ddpm::CtlEval(options, eval, &id);
    if (code != ddpm::kCtlOk || !flags.GetSwitch("watch")) return code;
    return ddpm::CtlWatch(options, id);
  }
  if (command == "health") return ddpm::CtlHealth(options, flags.Get("service"));
  if (command == "stop") return ddpm::CtlStop(options, flags.Get("RUN"), flags.GetSwitch("now"));
  if (command == "list") {
    return ddpm::CtlList(options, flags.Get("state"), flags.Get("name-prefix"));
  }
  if (command == "get") return ddpm::CtlGet(options, flags.Get("RUN"));
  if (command == "watch") return ddpm::CtlWatch(options, flags.Get("RUN"));
  if (command == "backup") return ddpm::CtlBackup(options, flags.Get("FILE"));
  if (flags.Given("ended-before")) {
    return ddpm::CtlDeleteEndedBefore(options, flags.Get("ended-before"));
  }
  return ddpm::CtlDelete(options, flags.Get("RUN"));
}

}  // namespace

int main(int argc, char** argv) {
  ddpm::Flags globals("ddpmctl", kSummary);
  AddGlobalFlags(globals);
  const int at = CommandIndex(globals, argc, argv);
  const std::string command = at > 0 ? argv[at] : "";
  ddpm::Flags flags(command.empty() ? "ddpmctl" : "ddpmctl " + command, kSummary);
  AddGlobalFlags(flags);
  if (!command.empty() && !AddCommandFlags(command, flags, argc, argv)) {
    std::fprintf(stderr,
                 "ddpmctl: unknown command '%s' (commands: start, eval, stop, list, get, "
                 "watch, delete, backup, health)\n",
                 command.c_str());
    return ddpm::kCtlUsage;
  }
  // The command's own flags and arguments, without the command's name.
  std::vector<const char*> args;
  for (int i = 0; i < argc; ++i) {
    if (i != at || at == 0) args.push_back(argv[i]);
  }
  return ddpm::RunMain(flags, static_cast<int>(args.size()), args.data(), [&] {
    if (command.empty()) {
      throw ddpm::FlagError(
          "ddpmctl: give a command: start, eval, stop, list, get, watch, delete, backup or "
          "health (see --help)");
    }
    return RunCommand(command, flags);
  });
}
