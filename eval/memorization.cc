#include "eval/memorization.h"

#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <stdexcept>

#include "base/csv.h"
#include "base/file_io.h"
#include "eval/evaluation.h"
#include "trainer/communicator.h"
#include "trainer/data.h"
#include "trainer/image_io.h"

namespace ddpm {

const std::vector<double> kDistanceQuantiles = {0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1};

namespace {

// Images first .. first + n - 1 of data as rows of pixels in [0, 1]: [n, C * H * W].
torch::Tensor PixelRows(const ImageDataset& data, int64_t first, int64_t n, torch::Device device) {
  return (ReadImages(data, first, n, device).flatten(1) + 1) * 0.5;
}

// pool3 features [n, 2048] of images first .. first + n - 1 of data, batch_size at a time.
torch::Tensor FeatureRows(FidInception& model, const ImageDataset& data, int64_t first, int64_t n,
                          int batch_size, torch::Device device) {
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> parts;
  for (int64_t at = first; at < first + n; at += batch_size) {
    const int64_t count = std::min<int64_t>(batch_size, first + n - at);
    torch::Tensor images = ReadImages(data, at, count, device);
    if (images.size(1) == 1) images = images.repeat({1, 3, 1, 1});
    parts.push_back(model->forward(images).pool3.to(torch::kFloat32));
  }
  return torch::cat(parts);
}

MemorizationSpace Summarize(std::string name, NearestTwo neighbours, double threshold) {
  MemorizationSpace space;
  space.name = std::move(name);
  const torch::Tensor nearest = neighbours.distance.select(1, 0);
  const torch::Tensor second = neighbours.distance.select(1, 1);
  space.ratio =
      torch::where(second > 0, nearest / second.clamp_min(1e-300), torch::zeros_like(nearest));
  space.flagged = (space.ratio < threshold).to(torch::kFloat64).mean().item<double>();
  const torch::Tensor sorted = std::get<0>(nearest.sort());
  const int64_t n = sorted.size(0);
  for (const double q : kDistanceQuantiles) {
    // numpy's default (linear) quantile.
    const double position = q * static_cast<double>(n - 1);
    const auto below = static_cast<int64_t>(position);
    const int64_t above = std::min(below + 1, n - 1);
    const double low = sorted[below].item<double>(), high = sorted[above].item<double>();
    space.quantiles.push_back(low + (high - low) * (position - static_cast<double>(below)));
  }
  space.neighbours = std::move(neighbours);
  return space;
}

}  // namespace

std::vector<MemorizationSpace> MeasureMemorization(
    const ImageDataset& samples, const ImageDataset& train, std::optional<FidInception> inception,
    Communicator& comm, torch::Device device, const MemorizationOptions& options,
    const std::function<void(const std::string&, int64_t, int64_t)>& progress) {
  if (samples.image_size() != train.image_size() || samples.channels() != train.channels()) {
    throw std::invalid_argument(
        "the samples (" + samples.Describe() + ") and the training images (" + train.Describe() +
        ") differ in size or channels; pixel distances need the same: " +
        std::to_string(samples.channels()) + "x" + std::to_string(samples.image_size()) + " vs " +
        std::to_string(train.channels()) + "x" + std::to_string(train.image_size()));
  }
  if (samples.size() < 1 || train.size() < 2) {
    throw std::invalid_argument("the search needs at least 1 sample and 2 training images, got " +
                                std::to_string(samples.size()) + " and " +
                                std::to_string(train.size()));
  }
  if (!(options.ratio > 0 && options.ratio <= 1)) {
    throw std::invalid_argument("the ratio threshold must be in (0, 1], got " +
                                std::to_string(options.ratio));
  }
  std::vector<MemorizationSpace> spaces;
  const torch::Tensor sample_pixels = PixelRows(samples, 0, samples.size(), device);
  NearestTwo pixel = FindNearestTwo(
      sample_pixels,
      [&](int64_t first, int64_t count) { return PixelRows(train, first, count, device); },
      train.size(), comm, options.block,
      [&](int64_t done, int64_t share) {
        if (progress) progress("pixel space", done, share);
      });
  spaces.push_back(Summarize("pixel", std::move(pixel), options.ratio));
  if (inception) {
    // Each rank extracts its share of the samples' features; every rank then holds them all.
    const int rank = comm.rank(), world = comm.world_size();
    const int64_t n = samples.size();
    const int64_t largest = (n + world - 1) / world;
    const int64_t first = n * rank / world, end = n * (rank + 1) / world;
    // On the host: the tools' communicator (MPI) moves CPU tensors only.
    torch::Tensor padded = torch::zeros({largest, 2048});
    if (end > first) {
      padded.slice(0, 0, end - first)
          .copy_(FeatureRows(*inception, samples, first, end - first, options.batch_size, device));
    }
    const torch::Tensor gathered =
        comm.AllGather(padded, "all-gather of the samples' features").to(device);
    std::vector<torch::Tensor> shares;
    for (int r = 0; r < world; ++r) {
      shares.push_back(gathered[r].slice(0, 0, n * (r + 1) / world - n * r / world));
    }
    NearestTwo feature = FindNearestTwo(
        torch::cat(shares),
        [&](int64_t at, int64_t count) {
          return FeatureRows(*inception, train, at, count, options.batch_size, device);
        },
        train.size(), comm, options.block,
        [&](int64_t done, int64_t share) {
          if (progress) progress("feature space", done, share);
        });
    spaces.push_back(Summarize("feature", std::move(feature), options.ratio));
  }
  return spaces;
}

std::string DescribeMemorization(const std::vector<MemorizationSpace>& spaces, double ratio) {
  std::string summary;
  char line[512];
  for (const MemorizationSpace& space : spaces) {
    std::snprintf(line, sizeof(line),
                  "%s space: %.2f%% of %lld samples have nearest / second-nearest < %.4g "
                  "(copies, Yoon et al.)\n",
                  space.name.c_str(), 100 * space.flagged,
                  static_cast<long long>(space.ratio.size(0)), ratio);
    summary += line;
    std::string quantiles;
    for (std::size_t q = 0; q < space.quantiles.size(); ++q) {
      std::snprintf(line, sizeof(line), "%s%g%% %.4g", q ? ", " : "", 100 * kDistanceQuantiles[q],
                    space.quantiles[q]);
      quantiles += line;
    }
    summary += space.name + " space: nearest distance quantiles: " + quantiles + "\n";
  }
  return summary;
}

void WriteMemorizationReport(const std::vector<MemorizationSpace>& spaces,
                             const ImageDataset& samples, const ImageDataset& train, double ratio,
                             const std::string& dir) {
  MakeDirectories(dir);
  WriteNeighboursCsv(spaces, dir + "/neighbours.csv");
  WriteClosestPairs(spaces.front(), samples, train, 16, dir + "/closest_pairs.png");
  WriteFileAtomically(dir + "/summary.txt", DescribeMemorization(spaces, ratio));
}

void WriteNeighboursCsv(const std::vector<MemorizationSpace>& spaces, const std::string& path) {
  std::vector<std::string> columns = {"sample"};
  for (const MemorizationSpace& space : spaces) {
    for (const char* column :
         {"nearest", "nearest_distance", "second", "second_distance", "ratio"}) {
      columns.push_back(space.name + "_" + column);
    }
  }
  std::string text = CsvHeader(columns);
  const int64_t n = spaces.front().ratio.size(0);
  std::vector<torch::TensorAccessor<double, 2>> distances;
  std::vector<torch::TensorAccessor<int64_t, 2>> indices;
  std::vector<torch::TensorAccessor<double, 1>> ratios;
  for (const MemorizationSpace& space : spaces) {
    distances.push_back(space.neighbours.distance.accessor<double, 2>());
    indices.push_back(space.neighbours.index.accessor<int64_t, 2>());
    ratios.push_back(space.ratio.accessor<double, 1>());
  }
  for (int64_t i = 0; i < n; ++i) {
    CsvRow row;
    row.Number("%" PRId64, i);
    for (std::size_t s = 0; s < spaces.size(); ++s) {
      row.Number("%" PRId64, indices[s][i][0]).Number("%.9g", distances[s][i][0]);
      row.Number("%" PRId64, indices[s][i][1]).Number("%.9g", distances[s][i][1]);
      row.Number("%.9g", ratios[s][i]);
    }
    text += row.Line();
  }
  WriteFileAtomically(path, text);
}

void WriteClosestPairs(const MemorizationSpace& space, const ImageDataset& samples,
                       const ImageDataset& train, int count, const std::string& path) {
  const torch::Tensor nearest = space.neighbours.distance.select(1, 0);
  const int64_t shown = std::min<int64_t>(count, nearest.size(0));
  const torch::Tensor order = std::get<1>(nearest.sort()).slice(0, 0, shown);
  const int size = samples.image_size(), channels = samples.channels();
  const std::size_t bytes = static_cast<std::size_t>(channels) * size * size;
  std::vector<uint8_t> tiles(2 * shown * bytes);
  for (int64_t k = 0; k < shown; ++k) {
    const int64_t sample = order[k].item<int64_t>();
    samples.Read(sample, tiles.data() + 2 * k * bytes);
    train.Read(space.neighbours.index[sample][0].item<int64_t>(),
               tiles.data() + (2 * k + 1) * bytes);
  }
  WritePng(path, TileGrid(tiles.data(), static_cast<int>(2 * shown), channels, size,
                          /*columns=*/8, /*padding=*/2, /*border=*/255,
                          /*scale=*/std::max(1, 64 / size)));
}

}  // namespace ddpm
