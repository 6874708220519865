#include "base/log.h"

#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <mutex>
#include <stdexcept>

namespace ddpm {
namespace {

LogLevel LevelFromEnvironment() {
  const char* text = std::getenv("DDPM_LOG_LEVEL");
  if (text == nullptr || *text == '\0') return LogLevel::kInfo;
  try {
    return ParseLogLevel(text);
  } catch (const std::invalid_argument& error) {
    std::fprintf(stderr, "warning: DDPM_LOG_LEVEL: %s; logging at info\n", error.what());
    return LogLevel::kInfo;
  }
}

std::atomic<int>& Threshold() {
  static std::atomic<int> threshold{static_cast<int>(LevelFromEnvironment())};
  return threshold;
}

std::atomic<int> rank_prefix_of{-1};  // the rank to name, or -1 for none

}  // namespace

LogLevel ParseLogLevel(std::string_view text) {
  if (text == "debug") return LogLevel::kDebug;
  if (text == "info") return LogLevel::kInfo;
  if (text == "warning") return LogLevel::kWarning;
  if (text == "error") return LogLevel::kError;
  throw std::invalid_argument("log level '" + std::string(text) +
                              "' is none of debug, info, warning, error");
}

void SetLogLevel(LogLevel level) { Threshold().store(static_cast<int>(level)); }

bool LogEnabled(LogLevel level) { return static_cast<int>(level) >= Threshold().load(); }

void SetLogRank(int rank, int world) { rank_prefix_of.store(world > 1 && rank != 0 ? rank : -1); }

void LogLine(LogLevel level, std::string_view line) {
  if (!LogEnabled(level)) return;
  std::string text;
  const int rank = rank_prefix_of.load();
  if (rank >= 0) text = "[rank " + std::to_string(rank) + "] ";
  text += line;
  if (text.empty() || text.back() != '\n') text += '\n';
  // stdio's lock makes the line one unit among threads; the flush makes it one write.
  static std::mutex mutex;
  const std::lock_guard<std::mutex> lock(mutex);
  std::FILE* stream = level >= LogLevel::kWarning ? stderr : stdout;
  std::fwrite(text.data(), 1, text.size(), stream);
  std::fflush(stream);
}

}  // namespace ddpm
