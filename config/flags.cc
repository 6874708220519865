#include "config/flags.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <sstream>

#include "base/log.h"

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace ddpm {

void TuneAllocator() {
#if defined(__GLIBC__)
  // A train step frees and reallocates the same activation-sized blocks (megabytes each) every
  // step. glibc serves blocks that large with mmap and returns them on free, so every step
  // page-faults its whole working set back in: on the demo UNet that was 10x the page faults and
  // about 14% of the step. Keep such blocks in the heap, and never trim it back. The user's own
  // malloc settings win.
  for (const char* name : {"GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"}) {
    const char* value = std::getenv(name);
    if (value != nullptr && *value != '\0') return;
  }
  mallopt(M_MMAP_THRESHOLD, 32 << 20);  // glibc's maximum on 64-bit systems.
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
#endif
}

Flags::Flags(std::string program, std::string summary)
    : program_(std::move(program)), summary_(std::move(summary)) {
  AddSwitch("help", "print this help and exit");
  Add("log-level",
      "the least severe log line written: debug, info, warning or error (DDPM_LOG_LEVEL sets it "
      "too)",
      "info");
}

void Flags::Add(const std::string& name, const std::string& help,
                const std::string& default_value) {
  order_.push_back(name);
  specs_[name] = Spec{help, default_value, false, false};
}

void Flags::AddSwitch(const std::string& name, const std::string& help) {
  order_.push_back(name);
  specs_[name] = Spec{help, "false", true, false};
}

void Flags::AddPositional(const std::string& name, const std::string& help) {
  positionals_.push_back(name);
  specs_[name] = Spec{help, "", false, false, true};
}

void Flags::Parse(int argc, const char* const* argv) {
  std::size_t filled = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg.rfind("--", 0) != 0) {
      if (filled == positionals_.size()) {
        throw FlagError(program_ + ": unexpected argument '" + arg + "' (flags start with --)");
      }
      Spec& spec = specs_[positionals_[filled++]];
      spec.value = arg;
      spec.given = true;
      continue;
    }
    std::string name = arg.substr(2);
    std::string value;
    bool has_value = false;
    if (const auto eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
      has_value = true;
    }
    const auto it = specs_.find(name);
    if (it == specs_.end() || it->second.positional) {
      throw FlagError(program_ + ": unknown flag --" + name + " (see --help)");
    }
    Spec& spec = it->second;
    if (spec.is_switch) {
      if (has_value) throw FlagError(program_ + ": --" + name + " takes no value");
      value = "true";
    } else if (!has_value) {
      if (i + 1 >= argc) throw FlagError(program_ + ": --" + name + " needs a value");
      value = argv[++i];
    }
    spec.value = value;
    spec.given = true;
  }
  if (filled < positionals_.size() && !GetSwitch("help")) {
    throw FlagError(program_ + ": missing " + positionals_[filled] + " (see --help)");
  }
}

const Flags::Spec& Flags::Find(const std::string& name) const {
  const auto it = specs_.find(name);
  if (it == specs_.end()) throw FlagError(program_ + ": flag --" + name + " was never declared");
  return it->second;
}

std::string Flags::Get(const std::string& name) const { return Find(name).value; }

std::string Flags::GetRequired(const std::string& name) const {
  std::string value = Get(name);
  if (value.empty()) throw FlagError(program_ + ": --" + name + " is required");
  return value;
}

namespace {

// value parsed whole by parse (std::stoll or std::stod), or FlagError naming the flag.
template <typename Parse>
auto ParseWhole(const std::string& program, const std::string& name, const std::string& value,
                Parse parse, const char* expected) {
  try {
    std::size_t used = 0;
    const auto parsed = parse(value, &used);
    if (used == value.size()) return parsed;
  } catch (const std::exception&) {
  }
  throw FlagError(program + ": --" + name + " expects " + expected + ", got '" + value + "'");
}

}  // namespace

int64_t Flags::GetInt(const std::string& name) const {
  return ParseWhole(
      program_, name, Find(name).value,
      [](const std::string& v, std::size_t* used) { return std::stoll(v, used); }, "an integer");
}

double Flags::GetDouble(const std::string& name) const {
  return ParseWhole(
      program_, name, Find(name).value,
      [](const std::string& v, std::size_t* used) { return std::stod(v, used); }, "a number");
}

std::vector<double> Flags::GetDoubleList(const std::string& name) const {
  std::vector<double> values;
  std::stringstream stream(Find(name).value);
  std::string item;
  while (std::getline(stream, item, ',')) {
    const double value = ParseWhole(
        program_, name, item,
        [](const std::string& v, std::size_t* used) { return std::stod(v, used); },
        "a comma-separated list of numbers");
    if (!std::isfinite(value)) {
      throw FlagError(program_ + ": --" + name + ": '" + item + "' is not a finite number");
    }
    values.push_back(value);
  }
  if (values.empty()) throw FlagError(program_ + ": --" + name + ": expected at least one number");
  return values;
}

bool Flags::GetSwitch(const std::string& name) const { return Find(name).value == "true"; }

bool Flags::Given(const std::string& name) const { return Find(name).given; }

bool Flags::TakesValue(const std::string& name) const {
  const auto it = specs_.find(name);
  return it != specs_.end() && !it->second.is_switch && !it->second.positional;
}

std::string Flags::Usage() const {
  std::ostringstream out;
  out << "usage: " << program_ << " [flags]";
  for (const auto& name : positionals_) out << " " << name;
  out << "\n" << summary_ << "\n";
  if (!positionals_.empty()) out << "\narguments:\n";
  for (const auto& name : positionals_)
    out << "  " << name << "\n      " << specs_.at(name).help << "\n";
  out << "\nflags:\n";
  for (const auto& name : order_) {
    const Spec& spec = specs_.at(name);
    out << "  --" << name << (spec.is_switch ? "" : " VALUE") << "\n      " << spec.help;
    if (!spec.is_switch && !spec.value.empty()) out << " (default: " << spec.value << ")";
    out << "\n";
  }
  return out.str();
}

int RunMain(Flags& flags, int argc, const char* const* argv, const std::function<int()>& body) {
  TuneAllocator();
  try {
    flags.Parse(argc, argv);
    if (flags.GetSwitch("help")) {
      std::printf("%s", flags.Usage().c_str());
      return 0;
    }
    if (flags.Given("log-level")) {
      try {
        SetLogLevel(ParseLogLevel(flags.Get("log-level")));
      } catch (const std::invalid_argument& error) {
        throw FlagError(flags.program() + ": --log-level: " + error.what());
      }
    }
    return body();
  } catch (const FlagError& e) {
    LogError("%s", e.what());
    return 2;
  } catch (const std::exception& e) {
    LogError("%s: error: %s", flags.program().c_str(), UserMessage(e).c_str());
    return 1;
  }
}

std::string UserMessage(const std::exception& error) {
  // LibTorch's errors append a C++ backtrace; the user needs the message.
  std::string message = error.what();
  if (const auto cut = message.find("\nException raised from"); cut != std::string::npos) {
    message.resize(cut);
  }
  return message;
}

}  // namespace ddpm
