#include "trainer/train_loop.h"

#include <torch/torch.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "trainer/checkpoint.h"
#include "trainer/data.h"
#include "trainer/image_io.h"
#include "trainer/trainer.h"

namespace ddpm {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point since) {
  return std::chrono::duration<double>(Clock::now() - since).count();
}

std::string StepName(int64_t step) {
  char name[32];
  std::snprintf(name, sizeof(name), "step_%09lld", static_cast<long long>(step));
  return name;
}

bool StdoutIsTerminal() { return isatty(STDOUT_FILENO) != 0; }

// Images in [-1, 1], [N, C, H, W], as uint8 NCHW on the CPU.
torch::Tensor ToBytes(const torch::Tensor& images) {
  return ((images.detach().to(torch::kCPU).clamp(-1, 1) + 1) * 127.5)
      .round()
      .to(torch::kUInt8)
      .contiguous();
}

void WriteSampleGrid(const torch::Tensor& images, const std::string& path) {
  const torch::Tensor bytes = ToBytes(images);
  const int count = static_cast<int>(bytes.size(0));
  const int columns = static_cast<int>(std::ceil(std::sqrt(static_cast<double>(count))));
  const int size = static_cast<int>(bytes.size(2));
  // Small images are enlarged (nearest neighbour) to at least 64 pixels, for looking at.
  const int scale = std::max(1, 64 / size);
  WritePng(path, TileGrid(bytes.data_ptr<uint8_t>(), count, static_cast<int>(bytes.size(1)), size,
                          columns, 2, 255, scale));
}

// A sampler progress report: a rewritten line on a terminal, a few lines otherwise.
SampleProgress ProgressPrinter(const std::string& what) {
  const bool tty = StdoutIsTerminal();
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

// Samples count images batch_size at a time; batch b uses seed sample.seed + b.
torch::Tensor SampleImages(const GaussianDiffusion& diffusion, UNet& model, const Config& config,
                           int count, int batch_size, const std::string& what) {
  const auto& m = config.model;
  std::vector<torch::Tensor> parts;
  const int batches = (count + batch_size - 1) / batch_size;
  for (int b = 0; b < batches; ++b) {
    const int n = std::min(batch_size, count - b * batch_size);
    SampleConfig sample = config.sample;
    sample.seed = config.sample.seed + static_cast<uint64_t>(b);
    const std::string label = batches == 1 ? what
                                           : what + " (batch " + std::to_string(b + 1) + "/" +
                                                 std::to_string(batches) + ")";
    parts.push_back(diffusion
                        .Sample(EvalDenoiser(model), {n, m.in_channels, m.image_size, m.image_size},
                                sample, ProgressPrinter(label))
                        .to(torch::kCPU));
  }
  return torch::cat(parts);
}

torch::Tensor ToModelInput(const std::vector<uint8_t>& bytes, int64_t count, int channels,
                           int size) {
  return torch::from_blob(const_cast<uint8_t*>(bytes.data()), {count, channels, size, size},
                          torch::kUInt8)
      .to(torch::kFloat32)
      .div_(127.5)
      .sub_(1.0);
}

torch::Tensor Text(const std::string& text) {
  return torch::from_blob(const_cast<char*>(text.data()), {static_cast<int64_t>(text.size())},
                          torch::kUInt8)
      .clone();
}
std::string TextOf(const torch::Tensor& t) {
  const torch::Tensor bytes = t.contiguous();
  return std::string(reinterpret_cast<const char*>(bytes.data_ptr<uint8_t>()), bytes.numel());
}

// The lines of one section of Config::ToYaml().
std::string SectionYaml(const Config& config, const std::string& section) {
  std::istringstream in(config.ToYaml());
  std::string line, out;
  bool inside = false;
  while (std::getline(in, line)) {
    if (!line.empty() && line[0] != ' ') inside = line == section + ":";
    if (inside) out += line + "\n";
  }
  return out;
}

Config ConfigFromCheckpoint(const std::map<std::string, torch::Tensor>& state,
                            const std::string& path) {
  return LoadConfigString(TextOf(RequireTensor(state, "meta/config", path)),
                          path + " (its config)");
}

// Signals that stop training at the next step boundary. A second one exits at once.
std::atomic<int> g_stop_signal{0};

extern "C" void OnStopSignal(int signal) {
  if (g_stop_signal.exchange(signal) != 0) _exit(128 + signal);
}

// Installs OnStopSignal for SIGINT and SIGTERM for its lifetime.
class StopSignalScope {
 public:
  StopSignalScope() {
    g_stop_signal = 0;
    struct sigaction action {};
    action.sa_handler = OnStopSignal;
    sigemptyset(&action.sa_mask);
    sigaction(SIGINT, &action, &old_int_);
    sigaction(SIGTERM, &action, &old_term_);
  }
  ~StopSignalScope() {
    sigaction(SIGINT, &old_int_, nullptr);
    sigaction(SIGTERM, &old_term_, nullptr);
  }

 private:
  struct sigaction old_int_ {};
  struct sigaction old_term_ {};
};

// A one-line progress bar, redrawn in place on a terminal.
void DrawProgressBar(int64_t step, int64_t total, double loss, double images_per_second,
                     double eta) {
  constexpr int kWidth = 30;
  const int filled = total > 0 ? static_cast<int>(kWidth * step / total) : kWidth;
  std::printf("\r\033[K[%s%s] %lld/%lld | loss %.4f | %.1f img/s | eta %s",
              std::string(filled, '#').c_str(), std::string(kWidth - filled, '.').c_str(),
              static_cast<long long>(step), static_cast<long long>(total), loss, images_per_second,
              FormatDuration(eta).c_str());
  std::fflush(stdout);
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
    const char* omp = std::getenv("OMP_NUM_THREADS");
    threads = omp != nullptr ? std::atoi(omp) : 0;
  }
  if (threads <= 0) {
    int local_ranks = 1;
    for (const char* name :
         {"OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE"}) {
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

TrainResult RunTraining(const Config& config, const TrainOptions& options) {
  const int threads = ConfigureThreads(config.train);
  const torch::Device device(ResolveDevice(config.train));
  const std::string samples_dir = options.run_dir + "/samples";
  CheckpointDir checkpoints(options.run_dir + "/checkpoints");
  const std::vector<int64_t> existing = checkpoints.Steps();

  std::optional<CheckpointDir::Loaded> loaded;
  if (!options.resume_from.empty()) {
    loaded = CheckpointDir::Loaded{options.resume_from, ReadCheckpointFile(options.resume_from)};
  } else if (options.resume) {
    loaded = checkpoints.LoadLatestValid(
        [](const std::string& message) { std::printf("ddpm: warning: %s\n", message.c_str()); });
    if (!loaded && !existing.empty()) {
      throw CheckpointError(checkpoints.dir() +
                            ": no checkpoint there can be read (see the "
                            "warnings above); move them aside to start afresh");
    }
  } else if (!existing.empty()) {
    throw std::runtime_error(options.run_dir + " already holds checkpoints (newest: step " +
                             std::to_string(existing.front()) +
                             "); pass --resume to continue that run, or choose another --run-dir");
  }

  MakeDirectories(samples_dir);
  std::printf("ddpm: resolved config\n%s", config.ToTable().c_str());
  const std::unique_ptr<ImageDataset> dataset = MakeDataset(config);
  Trainer trainer(config, device);
  LoaderState loader_state = LoaderState::Initial(config.train.seed);
  if (loaded) {
    const Config saved = ConfigFromCheckpoint(loaded->tensors, loaded->path);
    for (const char* section : {"model", "diffusion"}) {
      if (SectionYaml(saved, section) != SectionYaml(config, section)) {
        throw ConfigError(loaded->path + ": the checkpoint's " + section +
                          " section differs from this config's; resume with the config it was "
                          "trained with.\ncheckpoint:\n" +
                          SectionYaml(saved, section) + "this config:\n" +
                          SectionYaml(config, section));
      }
    }
    trainer.LoadState(loaded->tensors, loaded->path);
    loader_state.cursor.epoch =
        RequireTensor(loaded->tensors, "data/epoch", loaded->path).item<int64_t>();
    loader_state.cursor.offset =
        RequireTensor(loaded->tensors, "data/offset", loaded->path).item<int64_t>();
    loader_state.flip_rng = static_cast<uint64_t>(
        RequireTensor(loaded->tensors, "data/flip_rng", loaded->path).item<int64_t>());
    const int64_t saved_threads =
        RequireTensor(loaded->tensors, "meta/threads", loaded->path).item<int64_t>();
    if (saved_threads != threads) {
      std::printf(
          "ddpm: warning: the checkpoint was written with %lld threads and this run uses "
          "%d; results will not be bitwise identical to an uninterrupted run\n",
          static_cast<long long>(saved_threads), threads);
    }
    std::printf("ddpm: resumed from %s at step %lld (epoch %lld, offset %lld)\n",
                loaded->path.c_str(), static_cast<long long>(trainer.step()),
                static_cast<long long>(loader_state.cursor.epoch),
                static_cast<long long>(loader_state.cursor.offset));
  }
  {
    std::ofstream resolved(options.run_dir + "/config.yaml");
    resolved << config.ToYaml();
  }
  std::printf("ddpm: %s\nddpm: UNet with %lld parameters on %s, %d threads; run dir %s\n",
              dataset->Describe().c_str(),
              static_cast<long long>(CountParameters(*trainer.model())), device.str().c_str(),
              threads, options.run_dir.c_str());
  std::fflush(stdout);

  const std::string metrics_path = options.run_dir + "/metrics.csv";
  const bool new_metrics = !fs::exists(metrics_path) || !loaded;
  std::ofstream metrics(metrics_path, new_metrics ? std::ios::trunc : std::ios::app);
  if (new_metrics) metrics << "step,loss,grad_norm,lr,images_per_second,elapsed_seconds\n";

  TrainResult result;
  auto save_checkpoint = [&] {
    const auto start = Clock::now();
    std::map<std::string, torch::Tensor> state = trainer.State();
    state["data/epoch"] = Int64Tensor(loader_state.cursor.epoch);
    state["data/offset"] = Int64Tensor(loader_state.cursor.offset);
    state["data/flip_rng"] = Int64Tensor(static_cast<int64_t>(loader_state.flip_rng));
    state["meta/threads"] = Int64Tensor(threads);
    state["meta/config"] = Text(config.ToYaml());
    result.checkpoint = checkpoints.Save(trainer.step(), state, config.train.keep_checkpoints);
    std::printf("ddpm: checkpoint %s (%.1fs)\n", result.checkpoint.c_str(), Seconds(start));
    std::fflush(stdout);
  };
  auto write_samples = [&](int64_t step) {
    const std::string path = samples_dir + "/" + StepName(step) + ".png";
    const auto start = Clock::now();
    WriteSampleGrid(
        SampleImages(trainer.diffusion(), trainer.ema_model(), config, config.sample.num_images,
                     config.sample.num_images,
                     "sampling " + std::to_string(config.sample.num_images) + " EMA images"),
        path);
    std::printf("ddpm: wrote %s (%.1fs)\n", path.c_str(), Seconds(start));
    std::fflush(stdout);
    result.sample_grids.push_back(path);
  };

  const int channels = dataset->channels();
  const int size = dataset->image_size();
  const int64_t total = config.train.steps;
  const int64_t first_step = trainer.step();
  const bool tty = StdoutIsTerminal();
  StopSignalScope stop_signals;
  BatchLoader loader(*dataset, config.train.batch_size, config.data.random_flip, config.train.seed,
                     loader_state, config.data.prefetch);
  const auto start = Clock::now();
  auto window_start = start;
  double window_loss = 0, window_grad = 0, last_rate = 0;
  int64_t window_steps = 0;
  while (trainer.step() < total && g_stop_signal == 0) {
    LoadedBatch batch = loader.Next();
    const StepStats stats = trainer.Step(ToModelInput(batch.pixels, batch.count, channels, size));
    loader_state = batch.after;
    if (!std::isfinite(stats.loss)) {
      throw std::runtime_error("training diverged: loss is " + std::to_string(stats.loss) +
                               " at step " + std::to_string(trainer.step()));
    }
    window_loss += stats.loss;
    window_grad += stats.grad_norm;
    ++window_steps;
    const int64_t step = trainer.step();
    const double elapsed = Seconds(start);
    const double eta = elapsed / (step - first_step) * (total - step);
    if (step % config.train.log_every == 0 || step == total) {
      last_rate = window_steps * config.train.batch_size / std::max(Seconds(window_start), 1e-9);
      result.last_loss = window_loss / window_steps;
      std::printf(
          "%sstep %lld/%lld | loss %.4f | grad %.3f | lr %.2e | %.1f img/s | elapsed %s | "
          "eta %s\n",
          tty ? "\r\033[K" : "", static_cast<long long>(step), static_cast<long long>(total),
          result.last_loss, window_grad / window_steps, stats.lr, last_rate,
          FormatDuration(elapsed).c_str(), FormatDuration(eta).c_str());
      std::fflush(stdout);
      metrics << step << "," << result.last_loss << "," << window_grad / window_steps << ","
              << stats.lr << "," << last_rate << "," << elapsed << "\n";
      metrics.flush();
      window_loss = window_grad = 0;
      window_steps = 0;
      window_start = Clock::now();
    } else if (tty) {
      DrawProgressBar(step, total, stats.loss, last_rate, eta);
    }
    if (step != total && config.train.checkpoint_every > 0 &&
        step % config.train.checkpoint_every == 0) {
      save_checkpoint();
    }
    if (step != total && config.train.sample_every > 0 && step % config.train.sample_every == 0) {
      write_samples(step);
    }
  }
  result.steps = trainer.step();
  if (g_stop_signal != 0) {
    result.interrupted_by = g_stop_signal;
    std::printf("%sddpm: caught %s at step %lld; saving a checkpoint\n", tty ? "\r\033[K" : "",
                g_stop_signal == SIGINT ? "SIGINT" : "SIGTERM",
                static_cast<long long>(result.steps));
    save_checkpoint();
    std::printf("ddpm: stopped; continue with --resume --run-dir %s\n", options.run_dir.c_str());
    return result;
  }
  if (result.steps != first_step) save_checkpoint();
  write_samples(result.steps);
  result.ema_weights = options.run_dir + "/ema_weights.pt";
  SaveTensors(StateDict(*trainer.ema_model()), result.ema_weights);
  std::printf("ddpm: trained to step %lld (%lld this run) in %s; EMA weights in %s\n",
              static_cast<long long>(result.steps),
              static_cast<long long>(result.steps - first_step),
              FormatDuration(Seconds(start)).c_str(), result.ema_weights.c_str());
  return result;
}

std::vector<std::string> RunSampleJob(const SampleJob& job) {
  Config config;
  std::map<std::string, torch::Tensor> weights;
  std::string origin;
  if (!job.checkpoint.empty()) {
    const auto state = ReadCheckpointFile(job.checkpoint);
    config = ConfigFromCheckpoint(state, job.checkpoint);
    for (const auto& [name, tensor] : state) {
      if (name.rfind("ema/", 0) == 0) weights[name.substr(4)] = tensor;
    }
    origin = job.checkpoint;
  } else {
    config = LoadConfigFile(job.config_path);
    weights = LoadTensors(job.weights);
    origin = job.weights;
  }
  for (const auto& [key, value] : job.overrides)
    SetConfigKey(config, key, value, "ddpm_sample flags");
  config.Validate();
  if (job.batch_size < 1) throw ConfigError("ddpm_sample: --batch must be >= 1");

  ConfigureThreads(config.train);
  const torch::Device device(ResolveDevice(config.train));
  UNet model(config.model);
  LoadStateDict(*model, weights, origin);
  model->to(device);
  const GaussianDiffusion diffusion(config.diffusion, device);
  const int count = config.sample.num_images;
  const torch::Tensor images = SampleImages(
      diffusion, model, config, count, job.batch_size,
      "sampling " + std::to_string(count) + " images (" + Name(config.sample.sampler) + ")");

  std::vector<std::string> written;
  const bool to_dir = (!job.out.empty() && job.out.back() == '/') || fs::is_directory(job.out);
  if (to_dir) {
    MakeDirectories(job.out);
    const torch::Tensor bytes = ToBytes(images);
    for (int i = 0; i < count; ++i) {
      char name[32];
      std::snprintf(name, sizeof(name), "%06d.png", i);
      const std::string path = (fs::path(job.out) / name).string();
      WritePng(path, TileGrid(bytes[i].data_ptr<uint8_t>(), 1, static_cast<int>(bytes.size(1)),
                              static_cast<int>(bytes.size(2)), 1, 0));
      written.push_back(path);
    }
  } else {
    WriteSampleGrid(images, job.out);
    written.push_back(job.out);
  }
  return written;
}

}  // namespace ddpm
