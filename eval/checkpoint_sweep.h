// Sweeps of FID and IS as CSV and PNG. An evaluation job over a run's checkpoints: sweep.csv
// (one row per checkpoint, every number at full precision, so that a restarted job reads back
// exactly what it reported) and sweep.png (FID above, IS below, against the checkpoint step).
// One model against one setting (the guidance scale, post-hoc EMA's sigma_rel): the same pair
// against the setting's values. Torch-free.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "eval/report.h"

namespace ddpm {

/// The header of sweep.csv.
extern const char* const kSweepCsvHeader;

/// Writes reports (in step order) as path, atomically (written aside, fsynced, renamed).
void WriteSweepCsv(const std::vector<EvalReport>& reports, const std::string& path);
/// The rows of a sweep.csv; empty when path does not exist. Throws naming the file and line
/// when a row does not read.
std::vector<EvalReport> ReadSweepCsv(const std::string& path);
/// Two panels against the checkpoint step: FID (blue, above) and IS with its spread over the
/// splits (orange, below), each with its range on the y axis; atomically.
void WriteSweepPlot(const std::vector<EvalReport>& reports, const std::string& path);

/// The report with the lowest score of select (FID when select is none) as a BestStatus whose
/// path is checkpoints_dir/step_XXXXXXXXX; nullopt when no report measured the score.
std::optional<BestStatus> BestOfSweep(const std::vector<EvalReport>& reports, EvalSelect select,
                                      const std::string& checkpoints_dir);
/// Writes best as path ("step 20\nfid 3.1699999999999999\ncheckpoint DIR/step_000000020\n"),
/// atomically.
void WriteBestTxt(const BestStatus& best, const std::string& path);

/// FID and IS of one model at several values of one setting.
struct ParameterSweep {
  /// The setting, the CSV's first column: "guidance", "sigma_rel".
  std::string name;
  /// The plot's x axis title, in the plot font's letters ("GUIDANCE W", "SIGMA REL").
  std::string title;
  std::vector<double> values;
  /// One per value.
  std::vector<EvalReport> reports;
};

/// The CSV's columns after the setting's (a sweep over guidance leaves out the second
/// guidance column).
extern const char* const kParameterSweepCsvTail;

/// Writes sweep as csv_path (a row per value in increasing order, numbers at full precision)
/// and png_path (FID above, IS with its spread below, against the value), each atomically.
void WriteParameterSweep(const ParameterSweep& sweep, const std::string& csv_path,
                         const std::string& png_path);

}  // namespace ddpm
