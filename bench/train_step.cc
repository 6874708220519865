// ddpm_bench: times the C++ trainer's steps (loss, backward, clip, Adam, EMA) and its samplers
// on random images. Its peer is bench/train_step_torch.py, the same work in plain PyTorch.
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <vector>

#include "bench/stats.h"
#include "trainer/config.h"
#include "trainer/flags.h"
#include "trainer/trainer.h"

using ddpm::bench::Clock;
using ddpm::bench::Ms;
using ddpm::bench::Quantile;

int main(int argc, char** argv) {
  ddpm::Flags flags("ddpm_bench", "Times DDPM training and sampling steps of the C++ trainer.");
  flags.Add("config", "YAML config (model, diffusion, train and sample sections are used)", "");
  flags.Add("batch", "images per train step", "16");
  flags.Add("steps", "timed train steps", "20");
  flags.Add("warmup", "untimed train steps first", "3");
  flags.Add("threads", "torch intra-op threads", "2");
  flags.Add("sample-batch", "images per sampler step", "16");
  flags.Add("sample-steps", "timed sampler steps for each sampler", "10");
  return ddpm::RunMain(flags, argc, argv, [&] {
    ddpm::Config config = flags.Get("config").empty() ? ddpm::LoadConfigString("")
                                                      : ddpm::LoadConfigFile(flags.Get("config"));
    const int batch = static_cast<int>(flags.GetInt("batch"));
    ddpm::SetConfigKey(config, "train.batch_size", std::to_string(batch), "ddpm_bench flags");
    ddpm::SetConfigKey(config, "train.grad_accum", "1", "ddpm_bench flags");
    config.Validate();
    torch::set_num_threads(static_cast<int>(flags.GetInt("threads")));
    ddpm::Trainer trainer(config, torch::kCPU);
    const auto& m = config.model;
    const torch::Tensor images =
        torch::rand({batch, m.in_channels, m.image_size, m.image_size}) * 2 - 1;
    for (int64_t i = 0; i < flags.GetInt("warmup"); ++i) trainer.Step(images);
    std::vector<double> step_ms;
    for (int64_t i = 0; i < flags.GetInt("steps"); ++i) {
      const auto start = Clock::now();
      trainer.Step(images);
      step_ms.push_back(Ms(start));
    }

    // Forward and backward alone, on fixed timesteps and noise: the part both sides share.
    torch::manual_seed(0);
    const torch::Tensor t = torch::randint(0, config.diffusion.timesteps, {batch}, torch::kLong);
    const torch::Tensor noise = torch::randn_like(images);
    const ddpm::Denoiser train_model = [&](const torch::Tensor& x, const torch::Tensor& tt) {
      return trainer.model()->forward(x, tt);
    };
    trainer.model()->train();
    std::vector<double> fwd_bwd_ms;
    for (int64_t i = 0; i < flags.GetInt("steps"); ++i) {
      const auto start = Clock::now();
      trainer.diffusion().TrainingLoss(train_model, images, t, noise).loss.backward();
      fwd_bwd_ms.push_back(Ms(start));
    }

    // One sampler step costs the same whatever T is, so DDPM is timed on a schedule of
    // sample-steps steps, and DDIM on the config's T with sample-steps steps.
    const int sample_batch = static_cast<int>(flags.GetInt("sample-batch"));
    const int sample_steps = static_cast<int>(flags.GetInt("sample-steps"));
    if (sample_steps < 2) throw ddpm::FlagError("ddpm_bench: --sample-steps must be at least 2");
    const std::vector<int64_t> shape = {sample_batch, m.in_channels, m.image_size, m.image_size};
    const ddpm::Denoiser denoiser = ddpm::EvalDenoiser(trainer.ema_model());
    ddpm::DiffusionConfig short_schedule = config.diffusion;
    short_schedule.timesteps = sample_steps;
    const ddpm::GaussianDiffusion ddpm_diffusion(short_schedule);
    ddpm_diffusion.SampleDdpm(denoiser, shape, config.sample.variance, true, 0);  // warm-up
    auto start = Clock::now();
    ddpm_diffusion.SampleDdpm(denoiser, shape, config.sample.variance, true, 1);
    const double ddpm_step_ms = Ms(start) / sample_steps;
    start = Clock::now();
    trainer.diffusion().SampleDdim(denoiser, shape, sample_steps, 0.0, true, 1);
    const double ddim_step_ms = Ms(start) / sample_steps;

    rusage usage{};
    getrusage(RUSAGE_SELF, &usage);
    const double median = Quantile(step_ms, 0.5);
    std::printf(
        "impl=cpp params=%lld batch=%d threads=%lld train_ms_median=%.2f train_ms_p10=%.2f "
        "train_ms_p90=%.2f fwd_bwd_ms_median=%.2f images_per_second=%.1f ddpm_step_ms=%.2f "
        "ddim_step_ms=%.2f "
        "ddpm_ms_per_image=%.1f ddim_ms_per_image=%.1f peak_rss_mb=%.0f\n",
        static_cast<long long>(ddpm::CountParameters(*trainer.model())), batch,
        static_cast<long long>(flags.GetInt("threads")), median, Quantile(step_ms, 0.1),
        Quantile(step_ms, 0.9), Quantile(fwd_bwd_ms, 0.5), batch * 1000.0 / median, ddpm_step_ms,
        ddim_step_ms, ddpm_step_ms * config.diffusion.timesteps / sample_batch,
        ddim_step_ms * config.sample.steps / sample_batch, usage.ru_maxrss / 1024.0);
    return 0;
  });
}
