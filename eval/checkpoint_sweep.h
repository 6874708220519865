// The results of an evaluation job over a run's checkpoints: sweep.csv (one row per
// checkpoint, every number at full precision, so that a restarted job reads back exactly what
// it reported) and sweep.png (FID above, IS below, against the checkpoint step). Torch-free.
#pragma once

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

}  // namespace ddpm
