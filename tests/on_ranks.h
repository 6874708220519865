// Threads acting as the ranks of a LocalGroup, for tests.
#pragma once

#include <exception>
#include <functional>
#include <thread>
#include <vector>

namespace ddpm {

/// Runs body(rank) on world threads at once and rethrows the first failure.
inline void OnRanks(int world, const std::function<void(int)>& body) {
  std::vector<std::thread> threads;
  std::vector<std::exception_ptr> errors(world);
  threads.reserve(world);
  for (int r = 0; r < world; ++r) {
    threads.emplace_back([&, r] {
      try {
        body(r);
      } catch (...) {
        errors[r] = std::current_exception();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (auto& e : errors) {
    if (e) std::rethrow_exception(e);
  }
}

}  // namespace ddpm
