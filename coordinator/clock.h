// Time as the coordinator sees it, and the fake beside it that tests move by hand.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>

namespace ddpm {

/// Wall-clock time for timestamps and heartbeat ages. Thread-safe.
class Clock {
 public:
  virtual ~Clock() = default;
  /// Milliseconds since the Unix epoch.
  virtual int64_t NowUnixMs() const = 0;
};

/// The system clock.
class SystemClock : public Clock {
 public:
  int64_t NowUnixMs() const override {
    return std::chrono::duration_cast<std::chrono::milliseconds>(
               std::chrono::system_clock::now().time_since_epoch())
        .count();
  }
};

/// A clock that stands still until Advance moves it. For tests.
class FakeClock : public Clock {
 public:
  explicit FakeClock(int64_t start_unix_ms = 1'700'000'000'000) : now_(start_unix_ms) {}
  int64_t NowUnixMs() const override { return now_.load(); }
  /// Moves the clock forward by seconds.
  void Advance(double seconds) { now_ += static_cast<int64_t>(seconds * 1000); }

 private:
  std::atomic<int64_t> now_;
};

}  // namespace ddpm
