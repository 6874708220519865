#include "run/best_checkpoint.h"

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <vector>

#include "base/csv.h"
#include "base/text.h"

namespace ddpm {
namespace fs = std::filesystem;

namespace {

// step -> score of select's column in eval.csv (a step evaluated twice, by a redone attempt:
// its last row); rows without the score are left out.
std::map<int64_t, double> ScoresOf(const std::string& path, const std::string& column) {
  std::map<int64_t, double> scores;
  std::ifstream in(path);
  std::string line;
  if (!std::getline(in, line)) return scores;
  const std::vector<std::string> header = SplitCsvLine(line);
  std::size_t at = header.size();
  for (std::size_t i = 0; i < header.size(); ++i) {
    if (header[i] == column) at = i;
  }
  if (at == header.size() || header.empty() || header[0] != "step") return scores;
  while (std::getline(in, line)) {
    const std::vector<std::string> fields = SplitCsvLine(line);
    if (fields.size() != header.size() || fields[at].empty()) continue;
    try {
      scores[std::stoll(fields[0])] = std::stod(fields[at]);
    } catch (const std::exception&) {
      // A torn last line of a killed writer: not a row.
    }
  }
  return scores;
}

}  // namespace

const char* EvalCsvColumn(EvalSelect select) {
  switch (select) {
    case EvalSelect::kFid:
      return "fid";
    case EvalSelect::kKid:
      return "kid";
    case EvalSelect::kNll:
      return "nll_bits_per_dim";
    case EvalSelect::kNone:
      break;
  }
  return "";
}

BestKeeper::BestKeeper(const EvalConfig& eval, std::string checkpoints_dir)
    : select_(eval.select), patience_(eval.patience), dir_(std::move(checkpoints_dir)) {}

void BestKeeper::Resume(int64_t resumed_step, const std::string& eval_csv,
                        const std::function<void(const std::string&)>& say) {
  if (!active()) return;
  best_ = ReadBestCheckpoint(dir_);
  since_ = 0;
  const auto committed = [this](int64_t step) {
    return fs::exists(fs::path(dir_) / StepName(step) / "COMMITTED");
  };
  if (best_ && (best_->step > resumed_step || !committed(best_->step))) {
    say("ddpm: " + dir_ + "/best named step " + std::to_string(best_->step) + ", which " +
        (best_->step > resumed_step ? "is after the step this run resumes from"
                                    : "is no longer on disk") +
        "; the best is chosen again from eval.csv");
    best_.reset();
  }
  if (best_ && best_->metric != Name(select_)) {
    say("ddpm: " + dir_ + "/best was chosen by " + best_->metric + "; eval.select is now " +
        Name(select_) + ", so the best is chosen again from eval.csv");
    best_.reset();
  }
  for (const auto& [step, score] : ScoresOf(eval_csv, EvalCsvColumn(select_))) {
    if (step > resumed_step || (best_ && step <= best_->step)) continue;
    if (Improves(score) && committed(step)) {
      Move(step, score, nullptr);
      say("ddpm: eval.select: step " + std::to_string(step) + "'s " + Name(select_) + " " +
          FormatNumber(score) + " (eval.csv) is the best; " + dir_ + "/best moved to it");
    } else {
      ++since_;
    }
  }
  if (best_) {
    say("ddpm: eval.select: " + Describe() +
        (patience_ > 0 ? ", " + std::to_string(since_) + " evaluation(s) since of " +
                             "eval.patience " + std::to_string(patience_)
                       : std::string()));
  }
}

bool BestKeeper::Improves(double score) const { return !best_ || score < best_->score; }

void BestKeeper::Move(int64_t step, double score,
                      const std::function<void(const std::string&)>& check) {
  if (check) check("`best` (step " + std::to_string(step) + ")");
  const BestCheckpoint best{step, Name(select_), score};
  WriteBestCheckpoint(dir_, best);
  best_ = best;
  since_ = 0;
}

bool BestKeeper::CountNoImprovement() {
  ++since_;
  return patience_ > 0 && since_ >= patience_;
}

std::optional<BestStatus> BestKeeper::Status() const {
  if (!best_) return std::nullopt;
  BestStatus status;
  status.step = best_->step;
  status.path = (fs::path(dir_) / StepName(best_->step)).string();
  status.metric = best_->metric;
  status.score = best_->score;
  status.evaluations_since = since_;
  status.patience = patience_;
  return status;
}

std::string BestKeeper::Describe() const {
  if (!best_) return "no best yet";
  char score[64];
  std::snprintf(score, sizeof(score), "%.6g", best_->score);
  return "best " + best_->metric + " " + score + " at step " + std::to_string(best_->step);
}

}  // namespace ddpm
