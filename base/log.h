// The one leveled logger of every binary, in the manner of improved-diffusion's logger.py and
// Ray's RAY_LOG: a line at a level (debug, info, warning, error), dropped below the process's
// threshold (--log-level on every binary, through RunMain; DDPM_LOG_LEVEL before flags are read),
// info and debug on stdout, warnings and errors on stderr, each line one write and flushed.
// In a world of more than one rank, a line of rank r != 0 begins "[rank r] "; rank 0's lines
// keep the formats that users and tests read ("ddpm: step 100 ...").
#pragma once

#include <cstdio>
#include <string>
#include <string_view>

namespace ddpm {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3 };

/// Parses "debug", "info", "warning" or "error"; throws std::invalid_argument naming the value.
LogLevel ParseLogLevel(std::string_view text);
/// Sets the threshold below which lines are dropped (info unless set).
void SetLogLevel(LogLevel level);
/// True when a line at level is written.
bool LogEnabled(LogLevel level);
/// This process's rank and world size, for the "[rank r] " prefix; (0, 1) unless set.
void SetLogRank(int rank, int world);

/// Writes one line at level (a newline is added when it lacks one). Thread-safe.
void LogLine(LogLevel level, std::string_view line);

/// Writes one printf-formatted line at level.
template <typename... Args>
void Logf(LogLevel level, const char* format, Args... args) {
  if (!LogEnabled(level)) return;
  if constexpr (sizeof...(Args) == 0) {
    // No conversions to make: only printf's "%%" to undo.
    std::string text(format);
    for (std::size_t at = text.find("%%"); at != std::string::npos; at = text.find("%%", at + 1)) {
      text.erase(at, 1);
    }
    LogLine(level, text);
  } else {
    const int size = std::snprintf(nullptr, 0, format, args...);
    std::string text(size > 0 ? static_cast<std::size_t>(size) : 0, '\0');
    std::snprintf(text.data(), text.size() + 1, format, args...);
    LogLine(level, text);
  }
}

template <typename... Args>
void LogInfo(const char* format, Args... args) {
  Logf(LogLevel::kInfo, format, args...);
}
template <typename... Args>
void LogWarning(const char* format, Args... args) {
  Logf(LogLevel::kWarning, format, args...);
}
template <typename... Args>
void LogError(const char* format, Args... args) {
  Logf(LogLevel::kError, format, args...);
}

}  // namespace ddpm
