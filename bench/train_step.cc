// ddpm_bench: times full training steps (loss, backward, clip, Adam, EMA) of the C++ trainer.
// Its peer is bench/train_step_torch.py, the same step in plain PyTorch.
#include <chrono>
#include <cstdio>

#include "trainer/config.h"
#include "trainer/flags.h"
#include "trainer/trainer.h"

int main(int argc, char** argv) {
  ddpm::Flags flags("ddpm_bench", "Times DDPM training steps of the C++ trainer on random images.");
  flags.Add("config", "YAML config (model, diffusion and train sections are used)", "");
  flags.Add("batch", "images per step", "32");
  flags.Add("steps", "timed steps", "10");
  flags.Add("warmup", "untimed steps first", "2");
  flags.Add("threads", "torch intra-op threads", "2");
  return ddpm::RunMain(flags, argc, argv, [&] {
    ddpm::Config config = flags.Get("config").empty() ? ddpm::LoadConfigString("")
                                                      : ddpm::LoadConfigFile(flags.Get("config"));
    const int batch = static_cast<int>(flags.GetInt("batch"));
    ddpm::SetConfigKey(config, "train.batch_size", std::to_string(batch), "ddpm_bench flags");
    config.Validate();
    torch::set_num_threads(static_cast<int>(flags.GetInt("threads")));
    ddpm::Trainer trainer(config, torch::kCPU);
    const auto& m = config.model;
    const torch::Tensor images = torch::rand({batch, m.in_channels, m.image_size, m.image_size}) * 2 - 1;
    for (int64_t i = 0; i < flags.GetInt("warmup"); ++i) trainer.Step(images);
    const int64_t steps = flags.GetInt("steps");
    const auto start = std::chrono::steady_clock::now();
    double loss = 0;
    for (int64_t i = 0; i < steps; ++i) loss = trainer.Step(images).loss;
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::printf("impl=cpp params=%lld batch=%d threads=%lld steps=%lld ms_per_step=%.1f "
                "images_per_second=%.1f last_loss=%.4f\n",
                static_cast<long long>(ddpm::CountParameters(*trainer.model())), batch,
                static_cast<long long>(flags.GetInt("threads")), static_cast<long long>(steps),
                1000 * seconds / steps, batch * steps / seconds, loss);
    return 0;
  });
}
