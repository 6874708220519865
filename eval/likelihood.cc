#include "eval/likelihood.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <stdexcept>

#include "base/csv.h"
#include "base/file_io.h"
#include "eval/evaluation.h"
#include "eval/plot.h"
#include "trainer/communicator.h"
#include "trainer/data.h"
#include "trainer/diffusion.h"
#include "trainer/image_io.h"

namespace ddpm {

BoundReport MeasureBound(const GaussianDiffusion& diffusion, UNet& model, const ImageDataset& data,
                         const BoundOptions& options, Communicator& comm, torch::Device device,
                         const std::function<void(int64_t done, int64_t share)>& progress) {
  const int steps = diffusion.timesteps();
  if (options.num_images < 0 || options.num_images > data.size()) {
    throw std::invalid_argument("--num " + std::to_string(options.num_images) +
                                ": the dataset has " + std::to_string(data.size()) + " images");
  }
  if (options.num_timesteps != 0 && (options.num_timesteps < 2 || options.num_timesteps > steps)) {
    throw std::invalid_argument("--timesteps " + std::to_string(options.num_timesteps) +
                                ": must be 0 (all T = " + std::to_string(steps) + ") or in [2, T]");
  }
  if (options.batch_size < 1) throw std::invalid_argument("--batch must be >= 1");
  const int64_t total = options.num_images == 0 ? data.size() : options.num_images;
  // Ranks take contiguous runs of whole batches, so that the batches (and so their noise,
  // drawn from each batch's first image) are the same on any number of ranks.
  const int rank = comm.rank(), world = comm.world_size();
  const int64_t batches = (total + options.batch_size - 1) / options.batch_size;
  const int64_t first = std::min(total, batches * rank / world * options.batch_size);
  const int64_t last = std::min(total, batches * (rank + 1) / world * options.batch_size);

  torch::Generator strata = MakeCpuGenerator(options.seed);
  const auto [timesteps, weights] = diffusion.BoundTimesteps(options.num_timesteps, strata);
  const auto k = static_cast<int64_t>(timesteps.size());
  // Sums over this rank's images: each term, the prior, the total and its square, the count.
  torch::Tensor sums = torch::zeros({k + 4}, torch::kFloat64);

  model->eval();
  const Denoiser denoiser = [&](const torch::Tensor& x, const torch::Tensor& t) {
    return model->forward(x, t);
  };
  const int64_t share = (last - first) * k;
  for (int64_t begin = first; begin < last; begin += options.batch_size) {
    const int64_t n = std::min<int64_t>(options.batch_size, last - begin);
    const torch::Tensor x0 = ReadImages(data, begin, n, device);
    // The noise of a batch depends on (seed, its first image), not on the rank.
    torch::Generator generator =
        MakeCpuGenerator(options.seed * 1000003ULL + static_cast<uint64_t>(begin) + 1);
    const int64_t done_before = (begin - first) * k;
    const VariationalBound bound = diffusion.Bound(denoiser, x0, timesteps, weights,
                                                   options.variance, generator, [&](int done, int) {
                                                     if (progress)
                                                       progress(done_before + done * n, share);
                                                   });
    sums.slice(0, 0, k) += bound.terms.sum(0);
    sums[k] += bound.prior.sum();
    sums[k + 1] += bound.total.sum();
    sums[k + 2] += bound.total.square().sum();
    sums[k + 3] += static_cast<double>(n);
  }
  comm.AllReduce(sums, ReduceOp::kSum, "the bound's sums");

  BoundReport report;
  report.images = static_cast<int64_t>(sums[k + 3].item<double>());
  report.timesteps_in_all = steps;
  report.timesteps = timesteps;
  report.weights = weights;
  const double n = static_cast<double>(report.images);
  for (int64_t i = 0; i < k; ++i) report.term_means.push_back(sums[i].item<double>() / n);
  report.prior_mean = sums[k].item<double>() / n;
  report.total_mean = sums[k + 1].item<double>() / n;
  const double variance =
      std::max(0.0, sums[k + 2].item<double>() / n - report.total_mean * report.total_mean);
  report.total_std_error = n > 1 ? std::sqrt(variance / (n - 1)) : 0.0;
  return report;
}

HeldOutImages OpenHeldOut(const Config& config) {
  HeldOutImages held;
  const int size = config.model.image_size;
  switch (config.data.dataset) {
    case DatasetKind::kCifar10: {
      const CifarSplit other =
          config.data.split == CifarSplit::kTrain ? CifarSplit::kTest : CifarSplit::kTrain;
      held.data = std::make_unique<Cifar10Dataset>(config.data.path, other);
      held.description = std::string("cifar10 ") + (other == CifarSplit::kTest ? "test" : "train");
      break;
    }
    case DatasetKind::kShapes:
      held.data = std::make_unique<ShapesDataset>(config.eval.nll_images, size, kHeldOutShapesSeed);
      held.description = "shapes held-out";
      break;
    case DatasetKind::kFolder:
      held.data =
          std::make_unique<ImageFolderDataset>(config.data.path, size, config.model.in_channels);
      held.description = "folder " + config.data.path + " (the training images: no held-out split)";
      break;
  }
  if (held.data->size() < config.eval.nll_images) {
    throw ConfigError("eval.nll_images: " + std::to_string(config.eval.nll_images) +
                      " images asked for, but " + held.description + " has " +
                      std::to_string(held.data->size()));
  }
  return held;
}

void WriteBoundCsv(const BoundReport& report, const std::string& path) {
  std::string text = CsvHeader({"t", "weight", "bits_per_dim"});
  for (std::size_t i = 0; i < report.timesteps.size(); ++i) {
    text += CsvRow()
                .Number("%lld", static_cast<long long>(report.timesteps[i]))
                .Number("%g", report.weights[i])
                .Number("%.10g", report.term_means[i])
                .Line();
  }
  // The prior term L_T, as t = T.
  text += CsvRow()
              .Number("%d", report.timesteps_in_all)
              .Number("%d", 1)
              .Number("%.10g", report.prior_mean)
              .Line();
  WriteFileAtomically(path, text, Durability::kRenamed);
}

void WriteBoundPlot(const BoundReport& report, const std::string& path) {
  constexpr int kWidth = 720, kHeight = 420, kLeft = 70, kRight = 20, kTop = 20, kBottom = 40;
  constexpr Rgb kBlue{31, 119, 180};
  Canvas canvas(kWidth, kHeight);
  double low = 1e300, high = -1e300;
  for (double value : report.term_means) {
    if (value > 0) {
      low = std::min(low, std::log10(value));
      high = std::max(high, std::log10(value));
    }
  }
  if (low > high) low = high = 0;
  low = std::floor(low);
  high = std::max(std::ceil(high), low + 1);
  const double plot_w = kWidth - kLeft - kRight, plot_h = kHeight - kTop - kBottom;
  const double steps = std::max(1, report.timesteps_in_all - 1);
  auto px = [&](double t) { return kLeft + t / steps * plot_w; };
  auto py = [&](double log_value) { return kTop + (high - log_value) / (high - low) * plot_h; };
  // Decades: grid lines and labels.
  for (int decade = static_cast<int>(low); decade <= static_cast<int>(high); ++decade) {
    const double y = py(decade);
    canvas.Line(kLeft, y, kWidth - kRight, y, {220, 220, 220});
    canvas.Text(6, static_cast<int>(y) - 5, "1e" + std::to_string(decade));
  }
  for (int quarter = 0; quarter <= 4; ++quarter) {
    // 0, T/4, T/2, 3T/4 and the last step, T - 1.
    const double t = std::min(steps, std::round(report.timesteps_in_all * quarter / 4.0));
    canvas.Line(px(t), kTop, px(t), kHeight - kBottom, {235, 235, 235});
    const std::string label = std::to_string(static_cast<int>(std::lround(t)));
    canvas.Text(static_cast<int>(px(t)) - 4 * static_cast<int>(label.size()), kHeight - kBottom + 8,
                label);
  }
  canvas.Line(kLeft, kTop, kLeft, kHeight - kBottom, {});
  canvas.Line(kLeft, kHeight - kBottom, kWidth - kRight, kHeight - kBottom, {});
  // The terms, joined in t order (non-positive ones, which a log axis cannot show, skipped).
  bool have_previous = false;
  double previous_x = 0, previous_y = 0;
  for (std::size_t i = 0; i < report.timesteps.size(); ++i) {
    if (report.term_means[i] <= 0) continue;
    const double x = px(static_cast<double>(report.timesteps[i]));
    const double y = py(std::log10(report.term_means[i]));
    if (have_previous) canvas.Line(previous_x, previous_y, x, y, kBlue);
    canvas.Point(x, y, kBlue);
    previous_x = x;
    previous_y = y;
    have_previous = true;
  }
  WritePng(path, canvas.image());
}

}  // namespace ddpm
