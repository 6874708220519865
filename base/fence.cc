#include "base/fence.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <sstream>

#include "base/errors.h"
#include "base/file_io.h"

namespace ddpm {
namespace {

constexpr char kHeader[] = "ddpm-train attempt fence 1";

// The attempt that holds the run: the newest listed (0 for none).
int Holder(const std::vector<AttemptRecord>& records) {
  int holder = 0;
  for (const AttemptRecord& record : records) holder = std::max(holder, record.attempt);
  return holder;
}

}  // namespace

RunFence::RunFence(std::string run_dir)
    : run_dir_(std::move(run_dir)), path_(run_dir_ + "/ATTEMPT") {}

std::vector<AttemptRecord> RunFence::Read() const {
  std::vector<AttemptRecord> records;
  std::ifstream in(path_);
  if (!in) return records;
  std::string line;
  int number = 0;
  while (std::getline(in, line)) {
    ++number;
    if (number == 1) {
      if (line != kHeader) {
        throw FormatError(path_ + ": line 1: expected '" + std::string(kHeader) + "', found '" +
                          line + "'");
      }
      continue;
    }
    if (line.empty()) continue;
    std::istringstream fields(line);
    std::string word, began;
    AttemptRecord record;
    if (!(fields >> word >> record.attempt) || word != "attempt" || record.attempt < 1 ||
        (fields >> began &&
         (began != "began" || !(fields >> record.began_at_step) || record.began_at_step < 0))) {
      throw FormatError(path_ + ": line " + std::to_string(number) +
                        ": expected 'attempt N [began STEP]', found '" + line + "'");
    }
    records.push_back(record);
  }
  if (number == 0) throw FormatError(path_ + ": empty fence file");
  return records;
}

int RunFence::Current() const { return Holder(Read()); }

void RunFence::Write(const std::vector<AttemptRecord>& records) const {
  std::string text = std::string(kHeader) + "\n";
  for (const AttemptRecord& record : records) {
    text += "attempt " + std::to_string(record.attempt);
    if (record.began_at_step >= 0) text += " began " + std::to_string(record.began_at_step);
    text += "\n";
  }
  // A temporary name of this process's own, so that two writers never share one.
  WriteFileAtomically(path_, text, Durability::kSyncedWithDirectory,
                      path_ + ".tmp." + std::to_string(::getpid()));
}

void RunFence::Grant(int attempt) const {
  std::vector<AttemptRecord> records = Read();
  const int current = Holder(records);
  if (attempt < current) {
    throw FencedError(path_ + ": attempt " + std::to_string(current) +
                      " already holds the run; attempt " + std::to_string(attempt) +
                      " cannot take it back");
  }
  if (attempt == current) return;
  records.push_back({attempt, -1});
  Write(records);
}

void RunFence::Began(int attempt, int64_t step) const {
  if (attempt == 0) return;
  Check(attempt, "the start of attempt " + std::to_string(attempt));
  std::vector<AttemptRecord> records = Read();
  auto it = std::find_if(records.begin(), records.end(),
                         [&](const AttemptRecord& record) { return record.attempt == attempt; });
  if (it == records.end()) {
    // The coordinator could not write the run directory: the group fences it itself.
    records.push_back({attempt, step});
  } else if (it->began_at_step < 0) {
    it->began_at_step = step;
  } else {
    return;  // a group restarted inside the same attempt keeps the first record
  }
  Write(records);
}

void RunFence::Check(int attempt, const std::string& what) const {
  if (attempt == 0) return;
  const int current = Current();
  if (current > attempt) {
    throw FencedError("attempt " + std::to_string(attempt) + " of the run in " + run_dir_ +
                      " has been superseded by attempt " + std::to_string(current) + " (" + path_ +
                      "); refusing to write " + what);
  }
}

std::string RunFence::Stale(int attempt, int64_t step) const {
  if (attempt == 0) return "";
  for (const AttemptRecord& record : Read()) {
    if (record.attempt > attempt && record.began_at_step >= 0 && step > record.began_at_step) {
      return "it was committed by attempt " + std::to_string(attempt) + " after attempt " +
             std::to_string(record.attempt) + " had begun from step " +
             std::to_string(record.began_at_step) + " (" + path_ + ")";
    }
  }
  return "";
}

}  // namespace ddpm
