// How durations, numbers and lists are written and read, once for every binary. No
// dependencies.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

namespace ddpm {

/// Seconds as H:MM:SS (rounded to the second); "-" for a value that is negative, not finite or
/// beyond about three years (an ETA that cannot be estimated yet).
std::string FormatDuration(double seconds);

/// Seconds with `decimals` digits after the point and a unit, as "2.35 s".
std::string FormatSeconds(double seconds, int decimals = 1);

/// A moment in milliseconds since the Unix epoch as UTC, to the second: "2026-12-06T23:54:26Z".
std::string FormatUtc(int64_t unix_ms);

/// A number as people write it: the shortest of %g's forms ("1", "2.5", "0.125").
std::string FormatNumber(double value);

/// The items of a comma-separated list, spaces around each trimmed, empty ones dropped.
std::vector<std::string> SplitList(const std::string& text);

/// Seconds since `start` on the steady clock.
double SecondsSince(std::chrono::steady_clock::time_point start);

}  // namespace ddpm
