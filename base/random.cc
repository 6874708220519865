#include "base/random.h"

#include <random>

namespace ddpm {

uint64_t SplitMix64::Mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

uint64_t SplitMix64::Next() { return Mix(state_ += 0x9e3779b97f4a7c15ULL); }

uint64_t SplitMix64::Below(uint64_t bound) {
  // Lemire's rejection: reject the low values that would bias the modulo.
  const uint64_t threshold = (0 - bound) % bound;
  while (true) {
    const uint64_t r = Next();
    if (r >= threshold) return r % bound;
  }
}

double SplitMix64::Uniform() { return static_cast<double>(Next() >> 11) * 0x1.0p-53; }

std::string RandomHex(int bytes) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::random_device entropy;
  std::string hex;
  hex.reserve(2 * static_cast<size_t>(bytes));
  uint32_t word = 0;
  for (int i = 0; i < bytes; ++i) {
    if (i % 4 == 0) word = entropy();
    const unsigned byte = word & 0xffU;
    word >>= 8;
    hex += kDigits[byte >> 4];
    hex += kDigits[byte & 0xfU];
  }
  return hex;
}

}  // namespace ddpm
