#include "eval/report.h"

#include <cstdio>

namespace ddpm {

std::optional<double> SelectedScore(EvalSelect select, const EvalReport& report) {
  switch (select) {
    case EvalSelect::kFid:
      if (report.has_fid()) return report.fid;
      break;
    case EvalSelect::kKid:
      if (report.has_kid) return report.kid;
      break;
    case EvalSelect::kNll:
      if (report.has_nll) return report.nll_bits_per_dim;
      break;
    case EvalSelect::kNone:
      break;
  }
  return std::nullopt;
}

std::string DescribeKidAndPrd(const EvalReport& report) {
  std::string text;
  char line[512];
  if (report.has_kid) {
    std::snprintf(line, sizeof(line), "KID %.6f +- %.6f (%d subsets of %lld)\n", report.kid,
                  report.kid_std, report.kid_subsets,
                  static_cast<long long>(report.kid_subset_size));
    text += line;
  }
  if (report.has_prd) {
    std::snprintf(line, sizeof(line),
                  "precision %.4f, recall %.4f (k = 3); density %.4f, coverage %.4f (k = 5); "
                  "%lld samples against %lld reference features\n",
                  report.precision, report.recall, report.density, report.coverage,
                  static_cast<long long>(report.num_samples),
                  static_cast<long long>(report.prd_reference_count));
    text += line;
  }
  return text;
}

}  // namespace ddpm
