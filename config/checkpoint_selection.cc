#include "config/checkpoint_selection.h"

#include <algorithm>
#include <cctype>

#include "config/config.h"

namespace ddpm {
namespace {

// A positive integer, the whole of text; 0 when it is not one.
int64_t PositiveInteger(const std::string& text) {
  if (text.empty() || text.size() > 18 || !std::all_of(text.begin(), text.end(), [](char c) {
        return std::isdigit(static_cast<unsigned char>(c)) != 0;
      })) {
    return 0;
  }
  return std::stoll(text);
}

std::string List(const std::vector<int64_t>& steps) {
  if (steps.empty()) return "none";
  std::string text;
  for (int64_t step : steps) text += (text.empty() ? "" : ", ") + std::to_string(step);
  return text;
}

}  // namespace

CheckpointSelection CheckpointSelection::Parse(const std::string& text) {
  CheckpointSelection selection;
  if (text.empty() || text == "latest") return selection;
  if (text == "all") {
    selection.kind = Kind::kAll;
    return selection;
  }
  if (text.rfind("every:", 0) == 0) {
    selection.kind = Kind::kEvery;
    selection.value = PositiveInteger(text.substr(6));
  } else {
    selection.kind = Kind::kStep;
    selection.value = PositiveInteger(text);
  }
  if (selection.value <= 0) {
    throw ConfigError("checkpoints '" + text +
                      "': give latest, all, every:K (the steps that are multiples of K, K >= 1) "
                      "or a step >= 1");
  }
  return selection;
}

std::string CheckpointSelection::ToString() const {
  switch (kind) {
    case Kind::kLatest:
      return "latest";
    case Kind::kAll:
      return "all";
    case Kind::kEvery:
      return "every:" + std::to_string(value);
    case Kind::kStep:
      break;
  }
  return std::to_string(value);
}

std::vector<int64_t> CheckpointSelection::Select(std::vector<int64_t> available,
                                                 const std::string& run) const {
  std::sort(available.begin(), available.end());
  available.erase(std::unique(available.begin(), available.end()), available.end());
  std::vector<int64_t> chosen;
  switch (kind) {
    case Kind::kLatest:
      if (!available.empty()) chosen.push_back(available.back());
      break;
    case Kind::kAll:
      chosen = available;
      break;
    case Kind::kEvery:
      std::copy_if(available.begin(), available.end(), std::back_inserter(chosen),
                   [this](int64_t step) { return step % value == 0; });
      break;
    case Kind::kStep:
      if (std::binary_search(available.begin(), available.end(), value)) chosen.push_back(value);
      break;
  }
  if (chosen.empty()) {
    throw ConfigError("checkpoints " + ToString() + " of " + run + ": no such checkpoint (it has " +
                      List(available) + ")");
  }
  return chosen;
}

}  // namespace ddpm
