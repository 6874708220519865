// The one command-line parser of every binary: --name=value, --name value, --switch, and
// required positional arguments.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

namespace ddpm {

/// A bad command line; the message names the flag.
class FlagError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// Declared flags, then parsed values. Unknown flags and missing values are errors.
class Flags {
 public:
  Flags(std::string program, std::string summary);
  /// Declares a flag that takes a value, with its default.
  void Add(const std::string& name, const std::string& help, const std::string& default_value);
  /// Declares a switch that is false unless given.
  void AddSwitch(const std::string& name, const std::string& help);
  /// Declares a required positional argument; they are filled in the order declared, and Get
  /// reads them by name.
  void AddPositional(const std::string& name, const std::string& help);
  /// Parses argv; throws FlagError naming the offending argument.
  void Parse(int argc, const char* const* argv);

  std::string Get(const std::string& name) const;
  /// The flag's value; throws FlagError "PROGRAM: --name is required" when it is empty.
  std::string GetRequired(const std::string& name) const;
  int64_t GetInt(const std::string& name) const;
  /// The flag's value as a number; throws FlagError naming the flag if it is not one.
  double GetDouble(const std::string& name) const;
  /// The flag's value as a comma-separated list of finite numbers ("0,1,2.5"); throws
  /// FlagError naming the flag and the item that is not one.
  std::vector<double> GetDoubleList(const std::string& name) const;
  bool GetSwitch(const std::string& name) const;
  /// True when the flag was given on the command line.
  bool Given(const std::string& name) const;
  /// True when --name is declared and takes a value (so the next argument is its value).
  bool TakesValue(const std::string& name) const;
  /// The --help text.
  std::string Usage() const;
  const std::string& program() const { return program_; }

 private:
  struct Spec {
    std::string help;
    std::string value;
    bool is_switch = false;
    bool given = false;
    bool positional = false;
  };
  const Spec& Find(const std::string& name) const;

  std::string program_;
  std::string summary_;
  std::vector<std::string> order_;
  std::vector<std::string> positionals_;
  std::map<std::string, Spec> specs_;
};

/// Tunes glibc malloc for a training process (large blocks stay mapped between steps), unless
/// the user set malloc tunables in the environment. RunMain calls it first.
void TuneAllocator();

/// The body of a thin main: parses argv into flags, answers --help, runs body, and turns errors
/// into exit codes: 2 for a bad command line, 1 for any other error, printed as
/// "program: error: ...".
int RunMain(Flags& flags, int argc, const char* const* argv, const std::function<int()>& body);

/// An error's message for a user: LibTorch's C++ backtrace cut off.
std::string UserMessage(const std::exception& error);

}  // namespace ddpm
