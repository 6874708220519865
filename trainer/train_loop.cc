#include "trainer/train_loop.h"

#include <torch/torch.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <thread>

#include "trainer/data.h"
#include "trainer/image_io.h"
#include "trainer/trainer.h"

namespace ddpm {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point since) {
  return std::chrono::duration<double>(Clock::now() - since).count();
}

std::string StepName(int64_t step) {
  char name[32];
  std::snprintf(name, sizeof(name), "step_%09lld", static_cast<long long>(step));
  return name;
}

// Images in [-1, 1], [N, C, H, W], as a PNG grid.
void WriteSampleGrid(const torch::Tensor& images, const std::string& path) {
  const torch::Tensor bytes = ((images.detach().to(torch::kCPU).clamp(-1, 1) + 1) * 127.5)
                                  .round()
                                  .to(torch::kUInt8)
                                  .contiguous();
  const int count = static_cast<int>(bytes.size(0));
  const int columns = static_cast<int>(std::ceil(std::sqrt(static_cast<double>(count))));
  WritePng(path, TileGrid(bytes.data_ptr<uint8_t>(), count, static_cast<int>(bytes.size(1)),
                          static_cast<int>(bytes.size(2)), columns));
}

// A sampler progress report: a rewritten line on a terminal, a few lines otherwise.
SampleProgress ProgressPrinter(const std::string& what) {
  const bool tty = isatty(STDOUT_FILENO) != 0;
  return [what, tty, start = Clock::now()](int done, int total) {
    if (tty) {
      std::printf("\r%s: %d/%d steps (%.1fs)%s", what.c_str(), done, total, Seconds(start),
                  done == total ? "\n" : "");
      std::fflush(stdout);
    } else if (done == total || done % std::max(1, total / 4) == 0) {
      std::printf("%s: %d/%d steps (%.1fs)\n", what.c_str(), done, total, Seconds(start));
      std::fflush(stdout);
    }
  };
}

torch::Tensor SampleImages(const GaussianDiffusion& diffusion, UNet& model, const Config& config,
                           const std::string& what) {
  const auto& m = config.model;
  return diffusion.Sample(EvalDenoiser(model),
                          {config.sample.num_images, m.in_channels, m.image_size, m.image_size},
                          config.sample, ProgressPrinter(what));
}

torch::Tensor ToModelInput(const std::vector<uint8_t>& bytes, int64_t count, int channels,
                           int size) {
  return torch::from_blob(const_cast<uint8_t*>(bytes.data()), {count, channels, size, size},
                          torch::kUInt8)
      .to(torch::kFloat32)
      .div_(127.5)
      .sub_(1.0);
}

}  // namespace

std::string FormatDuration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  const long long total = std::llround(seconds);
  char text[32];
  std::snprintf(text, sizeof(text), "%lld:%02lld:%02lld", total / 3600, (total / 60) % 60,
                total % 60);
  return text;
}

int ConfigureThreads(const TrainConfig& config) {
  int threads = config.threads;
  if (threads == 0) {
    int local_ranks = 1;
    for (const char* name : {"OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE"}) {
      if (const char* value = std::getenv(name)) {
        local_ranks = std::max(1, std::atoi(value));
        break;
      }
    }
    const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    threads = std::max(1, cores / local_ranks);
  }
  torch::set_num_threads(threads);
  return threads;
}

std::string ResolveDevice(const TrainConfig& config) {
  if (config.device == "cuda" && !torch::cuda::is_available()) {
    throw ConfigError("config: train.device: cuda was asked for, but LibTorch sees no CUDA device");
  }
  if (config.device == "auto") return torch::cuda::is_available() ? "cuda" : "cpu";
  return config.device;
}

double SampleFromWeights(const Config& config, const std::string& weights_path,
                         const std::string& png_path) {
  const auto start = Clock::now();
  const torch::Device device(ResolveDevice(config.train));
  UNet model(config.model);
  LoadStateDict(*model, LoadTensors(weights_path), weights_path);
  model->to(device);
  const GaussianDiffusion diffusion(config.diffusion, device);
  WriteSampleGrid(SampleImages(diffusion, model, config, "sampling"), png_path);
  return Seconds(start);
}

TrainResult RunTraining(const Config& config, const TrainOptions& options) {
  const int threads = ConfigureThreads(config.train);
  const torch::Device device(ResolveDevice(config.train));
  const std::string samples_dir = options.run_dir + "/samples";
  MakeDirectories(samples_dir);
  {
    std::ofstream resolved(options.run_dir + "/config.yaml");
    resolved << config.ToYaml();
  }

  std::printf("ddpm: resolved config\n%s", config.ToTable().c_str());
  const std::unique_ptr<ImageDataset> dataset = MakeDataset(config);
  Trainer trainer(config, device);
  std::printf("ddpm: %s\nddpm: UNet with %lld parameters on %s, %d threads; run dir %s\n",
              dataset->Describe().c_str(),
              static_cast<long long>(CountParameters(*trainer.model())),
              device.str().c_str(), threads, options.run_dir.c_str());
  std::fflush(stdout);

  const int channels = dataset->channels();
  const int size = dataset->image_size();
  EpochSampler sampler(dataset->size(), config.train.seed);
  SplitMix64 flip_rng(config.train.seed ^ 0x6a09e667f3bcc909ULL);

  std::ofstream metrics(options.run_dir + "/metrics.csv");
  metrics << "step,loss,grad_norm,lr,images_per_second,elapsed_seconds\n";

  TrainResult result;
  const int64_t total = config.train.steps;
  const auto start = Clock::now();
  auto window_start = start;
  double window_loss = 0;
  double window_grad = 0;
  int64_t window_steps = 0;
  auto write_samples = [&](int64_t step) {
    const std::string path = samples_dir + "/" + StepName(step) + ".png";
    const auto sample_start = Clock::now();
    WriteSampleGrid(SampleImages(trainer.diffusion(), trainer.ema_model(), config,
                                 "sampling " + std::to_string(config.sample.num_images) +
                                     " EMA images"),
                    path);
    std::printf("ddpm: wrote %s (%.1fs)\n", path.c_str(), Seconds(sample_start));
    std::fflush(stdout);
    result.sample_grids.push_back(path);
  };

  while (trainer.step() < total) {
    const std::vector<uint8_t> bytes =
        ReadBatch(*dataset, sampler.Next(config.train.batch_size), config.data.random_flip,
                  flip_rng);
    const StepStats stats =
        trainer.Step(ToModelInput(bytes, config.train.batch_size, channels, size));
    if (!std::isfinite(stats.loss)) {
      throw std::runtime_error("training diverged: loss is " + std::to_string(stats.loss) +
                               " at step " + std::to_string(trainer.step()));
    }
    window_loss += stats.loss;
    window_grad += stats.grad_norm;
    ++window_steps;
    const int64_t step = trainer.step();
    if (step % config.train.log_every == 0 || step == total) {
      const double window_seconds = Seconds(window_start);
      const double images_per_second =
          window_steps * config.train.batch_size / std::max(window_seconds, 1e-9);
      const double elapsed = Seconds(start);
      const double eta = elapsed / step * (total - step);
      result.last_loss = window_loss / window_steps;
      std::printf("step %lld/%lld | loss %.4f | grad %.3f | lr %.2e | %.1f img/s | elapsed %s | "
                  "eta %s\n",
                  static_cast<long long>(step), static_cast<long long>(total), result.last_loss,
                  window_grad / window_steps, stats.lr, images_per_second,
                  FormatDuration(elapsed).c_str(), FormatDuration(eta).c_str());
      std::fflush(stdout);
      metrics << step << "," << result.last_loss << "," << window_grad / window_steps << ","
              << stats.lr << "," << images_per_second << "," << elapsed << "\n";
      metrics.flush();
      window_loss = window_grad = 0;
      window_steps = 0;
      window_start = Clock::now();
    }
    if (config.train.sample_every > 0 && step % config.train.sample_every == 0 && step != total) {
      write_samples(step);
    }
  }
  result.steps = trainer.step();
  write_samples(result.steps);
  result.ema_weights = options.run_dir + "/ema_weights.pt";
  SaveTensors(StateDict(*trainer.ema_model()), result.ema_weights);
  std::printf("ddpm: trained %lld steps in %s; EMA weights in %s\n",
              static_cast<long long>(result.steps), FormatDuration(Seconds(start)).c_str(),
              result.ema_weights.c_str());
  return result;
}

}  // namespace ddpm
