// Random numbers that are the same on every platform (SplitMix64), and random tokens from the
// system's entropy. No dependencies.
#pragma once

#include <cstdint>
#include <string>

namespace ddpm {

/// SplitMix64: a small, fast, portable 64-bit generator for data order, augmentation and the
/// seeds of per-sample streams.
class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t seed) : state_(seed) {}
  uint64_t Next();
  /// SplitMix64's output function: a 64-bit bijection that scatters nearby inputs.
  static uint64_t Mix(uint64_t z);
  /// The whole generator state; SplitMix64(state()) continues the same stream.
  uint64_t state() const { return state_; }
  /// Uniform in [0, bound) without modulo bias.
  uint64_t Below(uint64_t bound);
  /// Uniform in [0, 1).
  double Uniform();

 private:
  uint64_t state_;
};

/// `bytes` bytes from the system's entropy source as lowercase hex (2 x bytes characters):
/// tokens and session ids.
std::string RandomHex(int bytes);

}  // namespace ddpm
