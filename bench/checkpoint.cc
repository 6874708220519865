// ddpm_bench_checkpoint: the stall and the background write of one checkpoint of a config's
// whole training state (weights, EMA, both Adam moments), beside a plain torch::save of the same
// tensors, alternating. One process: the world-of-one case of the sharded format. Also the cost
// of one fence check (reading RUN_DIR/ATTEMPT), which rank 0 makes at most once a second and
// before each commit, and the cost of reading the EMA weights as ema_weights.pt holds them with
// our unpickler against LibTorch's torch::pickle_load of the same bytes, alternating.
#include "trainer/checkpoint.h"

#include <fcntl.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <stdexcept>
#include <vector>

#include "base/fence.h"
#include "bench/stats.h"
#include "config/config.h"
#include "config/flags.h"
#include "trainer/checkpoint_keys.h"
#include "trainer/tensor_io.h"
#include "trainer/trainer.h"

using ddpm::bench::Clock;
using ddpm::bench::Ms;
using ddpm::bench::Quantile;

int main(int argc, char** argv) {
  ddpm::Flags flags("ddpm_bench_checkpoint",
                    "Times a checkpoint's stall and background write against torch::save.");
  flags.Add("config", "YAML config (the model section sizes the state)", "configs/cifar10.yaml");
  flags.Add("dir", "scratch folder for the checkpoints (removed afterwards)",
            "bench_checkpoint.tmp");
  flags.Add("rounds", "checkpoints (and torch::save calls) timed", "3");
  return ddpm::RunMain(flags, argc, argv, [&] {
    const ddpm::Config config = ddpm::LoadConfigFile(flags.Get("config"));
    torch::set_num_threads(1);
    ddpm::Trainer trainer(config, torch::kCPU);
    std::map<std::string, torch::Tensor> replicated = trainer.StateViews();
    const std::map<std::string, torch::Tensor> own = {
        {ddpm::checkpoint_keys::kRng, replicated.at(ddpm::checkpoint_keys::kRng)}};
    replicated.erase(ddpm::checkpoint_keys::kRng);
    int64_t bytes = 0;
    for (const auto& [name, tensor] : replicated) bytes += tensor.numel() * tensor.element_size();
    const std::string dir = flags.Get("dir");
    std::filesystem::remove_all(dir);
    std::filesystem::create_directories(dir);

    std::vector<double> stall_ms, write_ms, save_ms;
    {
      ddpm::CheckpointWriter writer(dir + "/checkpoints", 0, 1, 2, 600);
      for (int64_t round = 0; round < flags.GetInt("rounds"); ++round) {
        auto start = Clock::now();
        writer.Save(round + 1, replicated, own);
        stall_ms.push_back(Ms(start));
        writer.Wait();
        write_ms.push_back(writer.times().write_seconds * 1000);

        // The plain way: torch::save of the same tensors into a new file (as one per step
        // would be), then fsync, so both reach the disk. Creating a file costs more than
        // overwriting one on this VM's disk, so both sides create theirs.
        std::vector<torch::Tensor> tensors;
        for (const auto& [name, tensor] : replicated) tensors.push_back(tensor);
        const std::string path = dir + "/plain_" + std::to_string(round) + ".pt";
        std::filesystem::remove(dir + "/plain_" + std::to_string(round - 2) + ".pt");
        start = Clock::now();
        torch::save(tensors, path);
        const int fd = ::open(path.c_str(), O_RDONLY);
        ::fsync(fd);
        ::close(fd);
        save_ms.push_back(Ms(start));
      }
    }
    // A fence of a run that restarted twice, read as a check reads it.
    const ddpm::RunFence fence(dir);
    for (int attempt = 1; attempt <= 3; ++attempt) {
      fence.Grant(attempt);
      fence.Began(attempt, 1000 * attempt);
    }
    std::vector<double> fence_us;
    for (int batch = 0; batch < 20; ++batch) {
      const auto start = Clock::now();
      for (int i = 0; i < 500; ++i) {
        if (fence.Current() != 3) throw std::logic_error("the fence moved");
      }
      fence_us.push_back(Ms(start) * 1000 / 500);
    }
    std::filesystem::remove_all(dir);

    const std::vector<char> pickled = ddpm::PickleTensors(ddpm::StateDict(*trainer.ema_model()));
    std::vector<double> unpickle_ms, pickle_load_ms;
    for (int64_t round = 0; round < flags.GetInt("rounds"); ++round) {
      auto start = Clock::now();
      const auto ours = ddpm::UnpickleTensors(pickled, "ema_weights.pt");
      unpickle_ms.push_back(Ms(start));
      start = Clock::now();
      const torch::IValue theirs = torch::pickle_load(pickled);
      pickle_load_ms.push_back(Ms(start));
      if (ours.size() != theirs.toGenericDict().size()) throw std::logic_error("readers disagree");
    }
    std::printf(
        "impl=cpp_checkpoint params=%lld state_mb=%.1f rounds=%lld stall_ms_median=%.1f "
        "write_ms_median=%.1f torch_save_ms_median=%.1f stall_over_write=%.3f "
        "write_over_torch_save=%.3f fence_check_us_median=%.1f weights_mb=%.1f "
        "unpickle_ms_median=%.1f torch_pickle_load_ms_median=%.1f unpickle_over_torch=%.3f\n",
        static_cast<long long>(ddpm::CountParameters(*trainer.model())), bytes / 1e6,
        static_cast<long long>(flags.GetInt("rounds")), Quantile(stall_ms, 0.5),
        Quantile(write_ms, 0.5), Quantile(save_ms, 0.5),
        Quantile(stall_ms, 0.5) / Quantile(write_ms, 0.5),
        Quantile(write_ms, 0.5) / Quantile(save_ms, 0.5), Quantile(fence_us, 0.5),
        pickled.size() / 1e6, Quantile(unpickle_ms, 0.5), Quantile(pickle_load_ms, 0.5),
        Quantile(unpickle_ms, 0.5) / Quantile(pickle_load_ms, 0.5));
    return 0;
  });
}
