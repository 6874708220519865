#include "base/signals.h"

namespace ddpm {

SignalScope::SignalScope(std::initializer_list<int> signals, void (*handler)(int)) {
  for (const int signal : signals) {
    struct sigaction action {};
    action.sa_handler = handler;
    sigemptyset(&action.sa_mask);
    struct sigaction old {};
    sigaction(signal, &action, &old);
    replaced_.emplace_back(signal, old);
  }
}

SignalScope::~SignalScope() {
  for (auto it = replaced_.rbegin(); it != replaced_.rend(); ++it) {
    sigaction(it->first, &it->second, nullptr);
  }
}

}  // namespace ddpm
