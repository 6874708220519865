// Signal handlers installed for a scope and restored after it. No dependencies.
#pragma once

#include <csignal>
#include <initializer_list>
#include <utility>
#include <vector>

namespace ddpm {

/// Installs one handler for each of a set of signals, and restores the handlers it replaced
/// when it ends. Construct and destroy on one thread; the handler must be async-signal-safe.
class SignalScope {
 public:
  SignalScope(std::initializer_list<int> signals, void (*handler)(int));
  ~SignalScope();
  SignalScope(const SignalScope&) = delete;
  SignalScope& operator=(const SignalScope&) = delete;

 private:
  std::vector<std::pair<int, struct sigaction>> replaced_;
};

}  // namespace ddpm
