// ddpm_bench: times the C++ trainer's steps (loss, backward, clip, Adam, EMA) and its samplers
// on random images, on the CPU or a GPU, and reports model-FLOP utilization and peak memory.
// Its peer is bench/train_step_torch.py, the same work in plain PyTorch.
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <vector>

#ifdef DDPM_HAS_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif

#include "bench/stats.h"
#include "config/config.h"
#include "config/flags.h"
#include "trainer/flops.h"
#include "trainer/trainer.h"

using ddpm::bench::Clock;
using ddpm::bench::Ms;
using ddpm::bench::Quantile;

namespace {

// Waits for the device's queued work, so that wall-clock times cover it.
void Synchronize(torch::Device device) {
  if (device.is_cuda()) torch::cuda::synchronize(device.index());
}

// Peak memory so far in MB: the CUDA caching allocator's peak on a GPU, else this process's
// peak RSS.
double PeakMemoryMb(torch::Device device) {
#ifdef DDPM_HAS_CUDA
  if (device.is_cuda()) {
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device.index());
    return static_cast<double>(stats.allocated_bytes[0].peak) / (1 << 20);
  }
#endif
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_maxrss / 1024.0;
}

}  // namespace

int main(int argc, char** argv) {
  ddpm::Flags flags("ddpm_bench", "Times DDPM training and sampling steps of the C++ trainer.");
  flags.Add("config", "YAML config (model, diffusion, train and sample sections are used)", "");
  flags.Add("device", "cpu, cuda or cuda:N", "cpu");
  flags.Add("batch", "images per train step", "16");
  flags.Add("steps", "timed train steps", "20");
  flags.Add("round", "train steps per timing sample (a GPU runs them without waiting)", "1");
  flags.Add("warmup", "untimed train steps first (CUDA graphs capture during these)", "3");
  flags.Add("threads", "torch intra-op threads", "2");
  flags.Add("sample-batch", "images per sampler step", "16");
  flags.Add("sample-steps", "timed sampler steps for each sampler (when --sample-images is 0)",
            "10");
  flags.Add("sample-images",
            "0: time sample-steps sampler steps and extrapolate per image; N: time drawing N "
            "images with the config's full DDPM (T steps) and DDIM (sample.steps) samplers",
            "0");
  flags.Add("peak-tflops", "the device's peak TFLOP/s for the MFU column; 0 leaves it out", "0");
  return ddpm::RunMain(flags, argc, argv, [&] {
    ddpm::Config config = flags.Get("config").empty() ? ddpm::LoadConfigString("")
                                                      : ddpm::LoadConfigFile(flags.Get("config"));
    const int batch = static_cast<int>(flags.GetInt("batch"));
    ddpm::SetConfigKey(config, "train.batch_size", std::to_string(batch), "ddpm_bench flags");
    ddpm::SetConfigKey(config, "train.grad_accum", "1", "ddpm_bench flags");
    config.Validate();
    const torch::Device device(flags.Get("device"));
    torch::set_num_threads(static_cast<int>(flags.GetInt("threads")));
    ddpm::Trainer trainer(config, device);
    const auto& m = config.model;
    torch::Tensor images = torch::rand({batch, m.in_channels, m.image_size, m.image_size}) * 2 - 1;
    if (device.is_cuda()) images = images.pin_memory();

    // FLOPs of one image's forward, counted in fp32 eager mode; a train step is about three
    // forwards (the backward costs two).
    const double forward_flops = ddpm::CountFlops([&] {
      torch::NoGradGuard no_grad;
      const torch::Tensor one = images.narrow(0, 0, 1).to(device);
      trainer.model()->forward(one,
                               torch::zeros({1}, torch::TensorOptions(device).dtype(torch::kLong)));
    });
    const double step_flops = 3 * forward_flops * batch;
    // A class-conditional model (DDPM_MODEL_NUM_CLASSES) trains on every class in turn.
    torch::Tensor labels;
    if (m.num_classes > 0) labels = torch::arange(batch, torch::kLong) % m.num_classes;

    for (int64_t i = 0; i < flags.GetInt("warmup"); ++i) trainer.Step(images, 0, labels);
    Synchronize(device);
    const int64_t round = std::max<int64_t>(1, flags.GetInt("round"));
    const int64_t rounds = std::max<int64_t>(1, flags.GetInt("steps") / round);
    std::vector<double> step_ms;
    double total_ms = 0;
    for (int64_t r = 0; r < rounds; ++r) {
      const auto start = Clock::now();
      ddpm::StepStats stats;
      for (int64_t i = 0; i < round; ++i) stats = trainer.Step(images, 0, labels);
      stats.loss();  // waits for the round's last step
      const double ms = Ms(start);
      total_ms += ms;
      step_ms.push_back(ms / round);
    }
    const double steps_per_second = rounds * round * 1000.0 / total_ms;
    // The training's peak, before the measurements below add buffers of their own.
    const double train_peak_mb = PeakMemoryMb(device);

    // Forward and backward alone, on fixed timesteps and noise: the part both sides share.
    torch::manual_seed(0);
    const torch::Tensor device_images = images.to(device);
    const torch::Tensor t =
        torch::randint(0, config.diffusion.timesteps, {batch}, torch::kLong).to(device);
    const torch::Tensor noise = torch::randn_like(device_images);
    const ddpm::Denoiser train_model = [&](const torch::Tensor& x, const torch::Tensor& tt) {
      return trainer.model()->forward(x, tt);
    };
    trainer.model()->train();
    std::vector<double> fwd_bwd_ms;
    for (int64_t i = 0; i < flags.GetInt("steps"); ++i) {
      const auto start = Clock::now();
      trainer.diffusion().TrainingLoss(train_model, device_images, t, noise).loss.backward();
      Synchronize(device);
      fwd_bwd_ms.push_back(Ms(start));
    }

    // What a step does besides the model's forward and backward: drawing its timesteps and
    // noise on the host, and the update over the flat buffers (clip, Adam, EMA), each timed on
    // buffers of the model's size.
    std::vector<double> draw_ms, update_ms, op_by_op_ms;
    {
      const ddpm::FlatParameters& flat = trainer.parameters();
      torch::Tensor params = flat.data().detach().clone(), grads = flat.grad().detach().clone();
      torch::Tensor ema = params.clone();
      ddpm::FlatAdam adam(params, grads, config.train.adam_beta1, config.train.adam_beta2,
                          config.train.adam_eps);
      ddpm::Ema average(params, ema, config.train.ema_decay);
      for (int64_t i = 0; i < flags.GetInt("steps"); ++i) {
        auto start = Clock::now();
        const auto drawn = trainer.DrawTimestepsAndNoise(i, 0, batch, images.sizes().slice(1));
        Synchronize(device);
        draw_ms.push_back(Ms(start));
        grads.normal_();
        Synchronize(device);
        // Op by op (the GPU's path), and on the CPU also fused into one pass (the CPU's).
        start = Clock::now();
        ddpm::ClipGradNorm(grads, config.train.grad_clip);
        adam.Step(1e-4);
        average.Update();
        Synchronize(device);
        op_by_op_ms.push_back(Ms(start));
        if (device.is_cpu()) {
          grads.normal_();
          start = Clock::now();
          const double norm = grads.norm().item<double>();
          adam.Prepare(1e-4);
          adam.ApplyFusedCpu(ddpm::ClipCoefficient(norm, config.train.grad_clip), &average);
          update_ms.push_back(Ms(start));
        } else {
          update_ms.push_back(op_by_op_ms.back());
        }
      }
    }

    const int sample_batch = static_cast<int>(flags.GetInt("sample-batch"));
    const std::vector<int64_t> shape = {sample_batch, m.in_channels, m.image_size, m.image_size};
    // A conditional model samples every class in turn with sample.guidance (w != 0 or 1: one
    // batch of 2 x sample-batch per step).
    torch::Tensor sample_labels;
    if (m.num_classes > 0)
      sample_labels = torch::arange(sample_batch, torch::kLong) % m.num_classes;
    const ddpm::Denoiser denoiser = ddpm::EvalDenoiser(trainer.ema_model(), config.train.precision,
                                                       sample_labels, config.sample.guidance);
    double ddpm_step_ms = 0, ddim_step_ms = 0, ddpm_seconds = 0, ddim_seconds = 0;
    const int64_t sample_images = flags.GetInt("sample-images");
    if (m.num_classes > 0 && sample_images % sample_batch != 0) {
      throw ddpm::FlagError(
          "ddpm_bench: a conditional model's --sample-images must be a multiple "
          "of --sample-batch (its labels are one batch's)");
    }
    if (sample_images > 0) {
      // The real samplers over the whole schedule, in batches of sample-batch.
      const ddpm::GaussianDiffusion& diffusion = trainer.diffusion();
      auto time_sampler = [&](auto&& draw) {
        draw(std::min<int64_t>(sample_batch, sample_images), 2);  // warm-up: 2 steps
        Synchronize(device);
        const auto start = Clock::now();
        for (int64_t done = 0; done < sample_images; done += sample_batch) {
          draw(std::min<int64_t>(sample_batch, sample_images - done), 0);
        }
        Synchronize(device);
        return Ms(start) / 1000.0;
      };
      ddpm_seconds = time_sampler([&](int64_t n, int steps) {
        ddpm::DiffusionConfig schedule = config.diffusion;
        if (steps > 0) schedule.timesteps = steps;
        const ddpm::GaussianDiffusion sampler(schedule, device);
        sampler.SampleDdpm(denoiser, {n, m.in_channels, m.image_size, m.image_size},
                           config.sample.variance, true, 1);
      });
      ddim_seconds = time_sampler([&](int64_t n, int steps) {
        diffusion.SampleDdim(denoiser, {n, m.in_channels, m.image_size, m.image_size},
                             steps > 0 ? steps : config.sample.steps, 0.0, true, 1);
      });
      ddpm_step_ms = ddpm_seconds * 1000 / config.diffusion.timesteps /
                     ((sample_images + sample_batch - 1) / sample_batch);
      ddim_step_ms = ddim_seconds * 1000 / config.sample.steps /
                     ((sample_images + sample_batch - 1) / sample_batch);
    } else {
      // One sampler step costs the same whatever T is, so DDPM is timed on a schedule of
      // sample-steps steps, and DDIM on the config's T with sample-steps steps.
      const int sample_steps = static_cast<int>(flags.GetInt("sample-steps"));
      if (sample_steps < 2) throw ddpm::FlagError("ddpm_bench: --sample-steps must be at least 2");
      ddpm::DiffusionConfig short_schedule = config.diffusion;
      short_schedule.timesteps = sample_steps;
      const ddpm::GaussianDiffusion ddpm_diffusion(short_schedule, device);
      ddpm_diffusion.SampleDdpm(denoiser, shape, config.sample.variance, true, 0);  // warm-up
      Synchronize(device);
      auto start = Clock::now();
      ddpm_diffusion.SampleDdpm(denoiser, shape, config.sample.variance, true, 1);
      Synchronize(device);
      ddpm_step_ms = Ms(start) / sample_steps;
      start = Clock::now();
      trainer.diffusion().SampleDdim(denoiser, shape, sample_steps, 0.0, true, 1);
      Synchronize(device);
      ddim_step_ms = Ms(start) / sample_steps;
    }

    const double median = Quantile(step_ms, 0.5);
    const double peak_tflops = flags.GetDouble("peak-tflops");
    std::printf(
        "impl=cpp device=%s precision=%s channels_last=%d cuda_graphs=%d params=%lld batch=%d "
        "threads=%lld train_ms_median=%.2f train_ms_p10=%.2f train_ms_p90=%.2f "
        "steps_per_second=%.2f images_per_second=%.1f fwd_bwd_ms_median=%.2f draw_ms_median=%.2f "
        "update_ms_median=%.2f update_op_by_op_ms_median=%.2f forward_gflops_per_image=%.3f "
        "train_tflops_per_second=%.2f",
        device.str().c_str(), ddpm::Name(config.train.precision),
        config.train.channels_last ? 1 : 0, trainer.graph_captured() ? 1 : 0,
        static_cast<long long>(ddpm::CountParameters(*trainer.model())), batch,
        static_cast<long long>(flags.GetInt("threads")), median, Quantile(step_ms, 0.1),
        Quantile(step_ms, 0.9), steps_per_second, steps_per_second * batch,
        Quantile(fwd_bwd_ms, 0.5), Quantile(draw_ms, 0.5), Quantile(update_ms, 0.5),
        Quantile(op_by_op_ms, 0.5), forward_flops / 1e9, step_flops * steps_per_second / 1e12);
    if (peak_tflops > 0) {
      std::printf(" mfu=%.3f", step_flops * steps_per_second / (peak_tflops * 1e12));
    }
    std::printf(
        " ddpm_step_ms=%.2f ddim_step_ms=%.2f ddpm_ms_per_image=%.1f ddim_ms_per_image=%.1f",
        ddpm_step_ms, ddim_step_ms, ddpm_step_ms * config.diffusion.timesteps / sample_batch,
        ddim_step_ms * config.sample.steps / sample_batch);
    if (sample_images > 0) {
      std::printf(" sample_images=%lld ddpm_seconds=%.2f ddim_seconds=%.2f ddim_steps=%d",
                  static_cast<long long>(sample_images), ddpm_seconds, ddim_seconds,
                  config.sample.steps);
    }
    std::printf(" peak_%s_mb=%.0f\n", device.is_cuda() ? "device" : "rss", train_peak_mb);
    return 0;
  });
}
