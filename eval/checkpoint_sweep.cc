#include "eval/checkpoint_sweep.h"

#include <algorithm>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <stdexcept>

#include "base/csv.h"
#include "base/errors.h"
#include "base/file_io.h"
#include "eval/plot.h"
#include "trainer/image_io.h"

namespace ddpm {

const char* const kSweepCsvHeader =
    "step,fid,inception_score,inception_score_std,is_logits,num_samples,sampler,sampling_steps,"
    "seed,regularized,seconds,inception_sha256,reference_sha256,kid,kid_std,kid_subsets,"
    "kid_subset_size,precision,recall,density,coverage,prd_reference_count";

namespace {

// The header before KID and PRD: a job restarted on an older sweep.csv reads it on.
constexpr char kSweepCsvHeaderBeforeKid[] =
    "step,fid,inception_score,inception_score_std,is_logits,num_samples,sampler,sampling_steps,"
    "seed,regularized,seconds,inception_sha256,reference_sha256";

// The kid, kid_std, kid_subsets, kid_subset_size, precision, recall, density, coverage and
// prd_reference_count fields of a report, empty for what it did not measure; at full precision.
void AddKidAndPrd(const EvalReport& r, CsvRow& row) {
  if (r.has_kid) {
    row.Number("%.17g", r.kid).Number("%.17g", r.kid_std).Number("%d", r.kid_subsets);
    row.Number("%" PRId64, r.kid_subset_size);
  } else {
    row.Empty().Empty().Empty().Empty();
  }
  if (r.has_prd) {
    row.Number("%.17g", r.precision).Number("%.17g", r.recall).Number("%.17g", r.density);
    row.Number("%.17g", r.coverage).Number("%" PRId64, r.prd_reference_count);
  } else {
    row.Empty().Empty().Empty().Empty().Empty();
  }
}

// The fields every sweep row has after its first: FID, IS and how they were measured.
void AddScores(const EvalReport& r, CsvRow& row) {
  row.Number("%.17g", r.fid).Number("%.17g", r.inception_score);
  row.Number("%.17g", r.inception_score_std).Text(r.is_logits).Number("%" PRId64, r.num_samples);
  row.Text(r.sampler).Number("%d", r.sampling_steps).Number("%" PRIu64, r.seed);
}

}  // namespace

void WriteSweepCsv(const std::vector<EvalReport>& reports, const std::string& path) {
  std::string text = std::string(kSweepCsvHeader) + "\n";
  for (const EvalReport& r : reports) {
    CsvRow row;
    row.Number("%" PRId64, r.step);
    AddScores(r, row);
    row.Number("%d", r.regularized ? 1 : 0).Number("%.3f", r.seconds);
    row.Text(r.inception_sha256).Text(r.reference_sha256);
    AddKidAndPrd(r, row);
    text += row.Line();
  }
  WriteFileAtomically(path, text);
}

std::vector<EvalReport> ReadSweepCsv(const std::string& path) {
  std::ifstream in(path);
  if (!in) return {};
  std::vector<EvalReport> reports;
  std::string line;
  int number = 0;
  std::size_t columns = 22;
  while (std::getline(in, line)) {
    ++number;
    if (number == 1) {
      if (line == kSweepCsvHeaderBeforeKid) columns = 13;
      if (line != kSweepCsvHeader && line != kSweepCsvHeaderBeforeKid) {
        throw FormatError(path + ": line 1 is not the header of an evaluation sweep (" +
                          kSweepCsvHeader + ")");
      }
      continue;
    }
    if (line.empty()) continue;
    const std::vector<std::string> f = SplitCsvLine(line);
    try {
      if (f.size() != columns) {
        throw std::invalid_argument(std::to_string(columns) + " fields expected");
      }
      EvalReport r;
      r.step = std::stoll(f[0]);
      r.fid = std::stod(f[1]);
      r.inception_score = std::stod(f[2]);
      r.inception_score_std = std::stod(f[3]);
      r.is_logits = f[4];
      r.num_samples = std::stoll(f[5]);
      r.sampler = f[6];
      r.sampling_steps = std::stoi(f[7]);
      r.seed = std::stoull(f[8]);
      r.regularized = f[9] == "1";
      r.seconds = std::stod(f[10]);
      r.inception_sha256 = f[11];
      r.reference_sha256 = f[12];
      if (columns > 13 && !f[13].empty()) {
        r.has_kid = true;
        r.kid = std::stod(f[13]);
        r.kid_std = std::stod(f[14]);
        r.kid_subsets = std::stoi(f[15]);
        r.kid_subset_size = std::stoll(f[16]);
      }
      if (columns > 13 && !f[17].empty()) {
        r.has_prd = true;
        r.precision = std::stod(f[17]);
        r.recall = std::stod(f[18]);
        r.density = std::stod(f[19]);
        r.coverage = std::stod(f[20]);
        r.prd_reference_count = std::stoll(f[21]);
      }
      reports.push_back(r);
    } catch (const std::exception& error) {
      throw FormatError(path + ": line " + std::to_string(number) + " does not read (" +
                        error.what() + "): " + line);
    }
  }
  return reports;
}

namespace {

// FID above, IS with its spread below, against xs (one per report, increasing), the x axis
// labelled with labels and titled title.
void PlotFidAndIs(const std::vector<EvalReport>& reports, const std::vector<double>& xs,
                  const std::vector<std::string>& labels, const std::string& title,
                  const std::string& path) {
  constexpr int kWidth = 720, kPanel = 240, kLeft = 96, kRight = 24, kTop = 16, kGap = 40;
  constexpr int kHeight = kTop + 2 * kPanel + kGap + 48;
  constexpr Rgb kBlue{31, 119, 180}, kOrange{255, 127, 14}, kGrid{225, 225, 225};
  Canvas canvas(kWidth, kHeight);
  double first = 0, last = 1;
  if (!xs.empty()) {
    first = xs.front();
    last = xs.back();
  }
  if (last == first) {  // One point: centre it.
    first -= 1;
    last += 1;
  }
  const double plot_w = kWidth - kLeft - kRight;
  auto px = [&](double x) { return kLeft + (x - first) / (last - first) * plot_w; };
  struct Series {
    int top;
    const char* title;
    Rgb color;
    double (*value)(const EvalReport&);
    double (*spread)(const EvalReport&);
  };
  const Series panels[] = {
      {kTop, "FID", kBlue, [](const EvalReport& r) { return r.fid; }, nullptr},
      {kTop + kPanel + kGap, "IS", kOrange, [](const EvalReport& r) { return r.inception_score; },
       [](const EvalReport& r) { return r.inception_score_std; }}};
  for (const Series& s : panels) {
    double low = 1e300, high = -1e300;
    for (const EvalReport& r : reports) {
      const double spread = s.spread != nullptr ? s.spread(r) : 0;
      low = std::min(low, s.value(r) - spread);
      high = std::max(high, s.value(r) + spread);
    }
    if (reports.empty()) low = 0, high = 1;
    if (high - low < 1e-9) low -= 0.5, high += 0.5;
    const double pad = 0.05 * (high - low);
    low -= pad;
    high += pad;
    auto py = [&](double v) { return s.top + (high - v) / (high - low) * kPanel; };
    for (int tick = 0; tick <= 4; ++tick) {
      const double v = low + (high - low) * tick / 4;
      canvas.Line(kLeft, py(v), kWidth - kRight, py(v), kGrid);
      const std::string label = TickLabel(v, (high - low) / 4);
      canvas.Text(kLeft - 8 - Canvas::TextWidth(label), static_cast<int>(py(v)) - 5, label);
    }
    canvas.Text(kLeft + 8, s.top + 4, s.title, 3, s.color);
    canvas.Line(kLeft, s.top, kLeft, s.top + kPanel, {});
    canvas.Line(kLeft, s.top + kPanel, kWidth - kRight, s.top + kPanel, {});
    for (std::size_t i = 0; i < reports.size(); ++i) {
      const double x = px(xs[i]);
      const double y = py(s.value(reports[i]));
      if (i > 0) canvas.Line(px(xs[i - 1]), py(s.value(reports[i - 1])), x, y, s.color);
      if (s.spread != nullptr) {
        const double spread = s.spread(reports[i]);
        canvas.Line(x, py(s.value(reports[i]) - spread), x, py(s.value(reports[i]) + spread),
                    s.color);
      }
      canvas.Point(x, y, s.color);
    }
  }
  // The points' x values under the lower panel (at most 8 labelled).
  const int bottom = kTop + 2 * kPanel + kGap;
  const std::size_t every = std::max<std::size_t>(1, (reports.size() + 7) / 8);
  for (std::size_t i = 0; i < reports.size(); i += every) {
    const double x = px(xs[i]);
    canvas.Line(x, bottom, x, bottom + 4, {});
    canvas.Text(static_cast<int>(x) - Canvas::TextWidth(labels[i]) / 2, bottom + 8, labels[i]);
  }
  canvas.Text(kWidth - kRight - Canvas::TextWidth(title), bottom + 8 + 14, title);
  WritePng(path, canvas.image());
}

// The shortest of %.15g, %.16g and %.17g that reads back to value: 0.05, not
// 0.050000000000000003.
std::string RoundTrip(double value) {
  char text[32];
  for (int digits = 15; digits <= 17; ++digits) {
    std::snprintf(text, sizeof(text), "%.*g", digits, value);
    if (std::strtod(text, nullptr) == value) break;
  }
  return text;
}

std::string ShortNumber(double value) {
  char text[32];
  std::snprintf(text, sizeof(text), "%.4g", value);
  return text;
}

}  // namespace

void WriteSweepPlot(const std::vector<EvalReport>& reports, const std::string& path) {
  std::vector<double> xs;
  std::vector<std::string> labels;
  for (const EvalReport& r : reports) {
    xs.push_back(static_cast<double>(r.step));
    labels.push_back(std::to_string(r.step));
  }
  PlotFidAndIs(reports, xs, labels, "STEP", path);
}

std::optional<BestStatus> BestOfSweep(const std::vector<EvalReport>& reports, EvalSelect select,
                                      const std::string& checkpoints_dir) {
  const EvalSelect by = select == EvalSelect::kNone ? EvalSelect::kFid : select;
  std::optional<BestStatus> best;
  for (const EvalReport& r : reports) {
    const std::optional<double> score = SelectedScore(by, r);
    if (!score || (best && !(*score < best->score))) continue;
    best = BestStatus{};
    best->step = r.step;
    char name[32];
    std::snprintf(name, sizeof(name), "step_%09" PRId64, r.step);
    best->path = checkpoints_dir + "/" + name;
    best->metric = Name(by);
    best->score = *score;
  }
  return best;
}

void WriteBestTxt(const BestStatus& best, const std::string& path) {
  char text[1024];
  std::snprintf(text, sizeof(text), "step %" PRId64 "\n%s %.17g\ncheckpoint %s\n", best.step,
                best.metric.c_str(), best.score, best.path.c_str());
  WriteFileAtomically(path, text);
}

const char* const kParameterSweepCsvTail =
    "fid,inception_score,inception_score_std,is_logits,num_samples,sampler,sampling_steps,seed,"
    "guidance,regularized,seconds,inception_sha256,reference_sha256,kid,kid_std,kid_subsets,"
    "kid_subset_size,precision,recall,density,coverage,prd_reference_count";

void WriteParameterSweep(const ParameterSweep& sweep, const std::string& csv_path,
                         const std::string& png_path) {
  if (sweep.values.size() != sweep.reports.size()) {
    throw std::invalid_argument("WriteParameterSweep: one report per value expected");
  }
  // A sweep over guidance has it as its first column already.
  const bool over_guidance = sweep.name == "guidance";
  std::string tail = kParameterSweepCsvTail;
  if (over_guidance) tail.replace(tail.find(",guidance,"), 10, ",");
  std::string text = sweep.name + "," + tail + "\n";
  std::vector<std::size_t> order(sweep.values.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(),
            [&](std::size_t a, std::size_t b) { return sweep.values[a] < sweep.values[b]; });
  std::vector<EvalReport> reports;
  std::vector<double> xs;
  std::vector<std::string> labels;
  for (std::size_t i : order) {
    const EvalReport& r = sweep.reports[i];
    CsvRow row;
    row.Text(RoundTrip(sweep.values[i]));
    AddScores(r, row);
    if (!over_guidance) row.Number("%.17g", r.guidance);
    row.Number("%d", r.regularized ? 1 : 0).Number("%.3f", r.seconds);
    row.Text(r.inception_sha256).Text(r.reference_sha256);
    AddKidAndPrd(r, row);
    text += row.Line();
    reports.push_back(r);
    xs.push_back(sweep.values[i]);
    labels.push_back(ShortNumber(sweep.values[i]));
  }
  WriteFileAtomically(csv_path, text);
  PlotFidAndIs(reports, xs, labels, sweep.title, png_path);
}

}  // namespace ddpm
