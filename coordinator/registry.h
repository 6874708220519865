// The run registry: runs, their transitions, checkpoints and evaluations in SQLite (WAL mode),
// so that a restarted coordinator loses no run.
#pragma once

#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include "ddpm/v1/run.pb.h"

struct sqlite3;

namespace ddpm {

/// A SQLite call failed, or the database is not a registry this build can read; the message
/// names the call, where it was made, the file and SQLite's own reason.
class RegistryError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// One database file. Not thread-safe: the coordinator core serialises calls under its lock.
class Registry {
 public:
  /// Opens or creates path; refuses a file that is not a ddpm registry, or one of a newer schema.
  explicit Registry(const std::string& path);
  ~Registry();
  Registry(const Registry&) = delete;
  Registry& operator=(const Registry&) = delete;

  /// Runs body in one transaction: all of its writes land, or none do.
  void Transaction(const std::function<void()>& body);

  /// The next run number (1, 2, ...), never reused, even after a delete.
  int64_t NextRunNumber();
  /// Stores a new run (without its transitions) at position seq of the submission order.
  void InsertRun(const v1::Run& run, int64_t seq);
  /// Rewrites a stored run (without its transitions).
  void UpdateRun(const v1::Run& run);
  /// Appends a transition to a run's history.
  void AddTransition(const std::string& run_id, const v1::Transition& transition);
  /// Records a committed checkpoint.
  void AddCheckpoint(const std::string& run_id, const v1::CheckpointInfo& checkpoint);
  /// Records an evaluation.
  void AddEval(const std::string& run_id, const v1::EvalResult& eval);
  /// Records a log interval's row of a run's metric history (replacing a row of the same step).
  void AddMetricRow(const std::string& run_id, const v1::TrainMetrics& row);
  /// A run's metric history after since_step, in step order (NaN for an absent quartile).
  std::vector<v1::TrainMetrics> MetricRows(const std::string& run_id, int64_t since_step);
  /// Forgets a run and everything recorded about it.
  void DeleteRun(const std::string& run_id);

  /// Every run with its transitions, in submission order, and its submission position.
  std::vector<std::pair<int64_t, v1::Run>> LoadRuns();
  /// Every checkpoint recorded for a run, oldest first.
  std::vector<v1::CheckpointInfo> Checkpoints(const std::string& run_id);
  /// Every evaluation recorded for a run, oldest first.
  std::vector<v1::EvalResult> Evals(const std::string& run_id);

  /// Copies the whole database to path (a new file) with SQLite's online backup API: a
  /// consistent copy, however the registry is being written; throws RegistryError naming path.
  void BackupTo(const std::string& path);

  const std::string& path() const { return path_; }
  /// Writes and commits one page (the schema version it already holds), as the health check's
  /// probe that the database is open and writable; throws RegistryError naming the file.
  void ProbeWritable();

 private:
  void Execute(const std::string& sql, const char* file, int line);

  std::string path_;
  sqlite3* db_ = nullptr;
};

/// What a registry file holds, read without changing it.
struct RegistryFileSummary {
  int64_t schema = 0;
  int64_t runs = 0;
};

/// Opens path read-only and checks that it is a whole ddpm run registry that this coordinator
/// can open (its application id, a schema no newer than this binary's, SQLite's integrity
/// check); throws RegistryError naming path and what is wrong.
RegistryFileSummary InspectRegistryFile(const std::string& path);

}  // namespace ddpm
