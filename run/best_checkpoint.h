// A run's best checkpoint by eval.select, and eval.patience: rank 0 decides after each
// evaluation whether its score improves on the best (lower is better), moves the `best`
// pointer beside `latest` once the step's checkpoint is committed, and counts the evaluations
// since. The pointer survives a kill: on resume it is read back, and eval.csv's rows up to the
// resumed step are replayed, so a move that a kill cut short is made then.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>

#include "config/config.h"
#include "eval/report.h"
#include "trainer/checkpoint.h"

namespace ddpm {

class BestKeeper {
 public:
  /// Keeps nothing when eval.select is none.
  BestKeeper(const EvalConfig& eval, std::string checkpoints_dir);
  bool active() const { return select_ != EvalSelect::kNone; }

  /// Rank 0, at start: reads `best` (one whose checkpoint is gone, or after resumed_step, is
  /// dropped and said so), then replays eval_csv's rows up to resumed_step in step order: a row
  /// that improved on the best, with its checkpoint on disk, moves the pointer now; the others
  /// count towards patience. Throws CheckpointError naming a `best` file that does not read.
  void Resume(int64_t resumed_step, const std::string& eval_csv,
              const std::function<void(const std::string&)>& say);
  /// Whether score improves on the best (any score does when there is none).
  bool Improves(double score) const;
  /// Rank 0: moves `best` to step's committed checkpoint, calling check(what) first (the
  /// fence; it throws when a newer attempt holds the run), and restarts the patience count.
  void Move(int64_t step, double score, const std::function<void(const std::string&)>& check);
  /// Rank 0: an evaluation that did not improve; true when eval.patience is used up.
  bool CountNoImprovement();
  /// The best so far with the patience count, for reports; nullopt before the first.
  std::optional<BestStatus> Status() const;
  /// "best nll 3.0 at step 2", or "no best yet".
  std::string Describe() const;
  EvalSelect select() const { return select_; }

 private:
  EvalSelect select_;
  int patience_;
  std::string dir_;
  std::optional<BestCheckpoint> best_;
  int since_ = 0;
};

/// The column of eval.csv that holds select's score: "fid", "kid" or "nll_bits_per_dim".
const char* EvalCsvColumn(EvalSelect select);

}  // namespace ddpm
