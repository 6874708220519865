#include "trainer/train_loop.h"

#include <fcntl.h>
#include <sched.h>
#include <torch/torch.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>
#include <thread>

#include "trainer/checkpoint.h"
#include "trainer/communicator.h"
#include "trainer/data.h"
#include "trainer/image_io.h"
#include "trainer/evaluation.h"
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
                        .Sample(EvalDenoiser(model, config.train.precision),
                                {n, m.in_channels, m.image_size, m.image_size},
                                sample, ProgressPrinter(label))
                        .to(torch::kCPU));
  }
  return torch::cat(parts);
}

// The loader's bytes as model input in [-1, 1] on device. To a GPU the bytes travel as uint8,
// a quarter of the floats' size, from pinned memory and without making the host wait.
torch::Tensor ToModelInput(const std::vector<uint8_t>& bytes, int64_t count, int channels,
                           int size, torch::Device device) {
  torch::Tensor pixels = torch::from_blob(const_cast<uint8_t*>(bytes.data()),
                                          {count, channels, size, size}, torch::kUInt8);
  if (device.is_cuda()) pixels = pixels.pin_memory().to(device, /*non_blocking=*/true);
  return pixels.to(torch::kFloat32).div_(127.5).sub_(1.0);
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

// Signals that stop training at the next step boundary (a second one exits at once), and the
// requests for a checkpoint (SIGUSR1) or a sample grid (SIGUSR2) at the next one.
std::atomic<int> g_stop_signal{0};
std::atomic<bool> g_checkpoint_requested{false};
std::atomic<bool> g_sample_requested{false};
// Seconds a stopping process may take to reach its checkpoint before SIGALRM ends it: a rank
// stuck in a collective (mpirun's SIGTERM after a peer aborted) must not outlive the job.
std::atomic<unsigned> g_stop_grace_seconds{600};

extern "C" void OnStopSignal(int signal) {
  if (g_stop_signal.exchange(signal) != 0) _exit(128 + signal);
  alarm(g_stop_grace_seconds.load());
}

extern "C" void OnRequestSignal(int signal) {
  if (signal == SIGUSR1) g_checkpoint_requested = true;
  if (signal == SIGUSR2) g_sample_requested = true;
}

// Installs the handlers for its lifetime.
class StopSignalScope {
 public:
  explicit StopSignalScope(double grace_seconds) {
    g_stop_grace_seconds = static_cast<unsigned>(std::max(1.0, std::ceil(grace_seconds)));
    g_stop_signal = 0;
    g_checkpoint_requested = false;
    g_sample_requested = false;
    Install(SIGINT, OnStopSignal, &old_int_);
    Install(SIGTERM, OnStopSignal, &old_term_);
    Install(SIGUSR1, OnRequestSignal, &old_usr1_);
    Install(SIGUSR2, OnRequestSignal, &old_usr2_);
  }
  ~StopSignalScope() {
    alarm(0);
    sigaction(SIGINT, &old_int_, nullptr);
    sigaction(SIGTERM, &old_term_, nullptr);
    sigaction(SIGUSR1, &old_usr1_, nullptr);
    sigaction(SIGUSR2, &old_usr2_, nullptr);
  }

 private:
  static void Install(int signal, void (*handler)(int), struct sigaction* old) {
    struct sigaction action {};
    action.sa_handler = handler;
    sigemptyset(&action.sa_mask);
    sigaction(signal, &action, old);
  }
  struct sigaction old_int_ {};
  struct sigaction old_term_ {};
  struct sigaction old_usr1_ {};
  struct sigaction old_usr2_ {};
};

// The control word rank 0 broadcasts at each step boundary: flags, and the stop signal above.
constexpr int64_t kControlStop = 1;
constexpr int64_t kControlCheckpoint = 2;
constexpr int64_t kControlSample = 4;
// A stop asked for through TrainOptions::poll_stop, with or without a checkpoint.
constexpr int64_t kControlRequested = 8;
constexpr int64_t kControlAbandon = 16;
constexpr int kControlSignalShift = 8;

int64_t TakeControlRequests() {
  int64_t control = 0;
  if (g_checkpoint_requested.exchange(false)) control |= kControlCheckpoint;
  if (g_sample_requested.exchange(false)) control |= kControlSample;
  if (const int signal = g_stop_signal.load(); signal != 0) {
    control |= kControlStop | (static_cast<int64_t>(signal) << kControlSignalShift);
  }
  return control;
}

// A test hook: DDPM_FAULT_INJECT="rank=R,step=S[,hang]" makes rank R throw (or hang) before
// step S, to check that one failing rank ends the whole job.
struct FaultInjection {
  int64_t step = -1;
  bool hang = false;

  static FaultInjection FromEnvironment(int rank) {
    FaultInjection fault;
    const char* text = std::getenv("DDPM_FAULT_INJECT");
    if (text == nullptr) return fault;
    int fault_rank = -1;
    long long fault_step = -1;
    if (std::sscanf(text, "rank=%d,step=%lld", &fault_rank, &fault_step) != 2) {
      throw std::invalid_argument(std::string("DDPM_FAULT_INJECT: expected rank=R,step=S[,hang], "
                                              "got '") +
                                  text + "'");
    }
    if (fault_rank == rank) {
      fault.step = fault_step;
      fault.hang = std::string(text).find(",hang") != std::string::npos;
    }
    return fault;
  }

  void MaybeFail(int64_t next_step) const {
    if (next_step != step) return;
    if (hang) {
      std::fprintf(stderr, "ddpm: DDPM_FAULT_INJECT: hanging before step %lld\n",
                   static_cast<long long>(step));
      while (true) std::this_thread::sleep_for(std::chrono::seconds(1));
    }
    throw std::runtime_error("DDPM_FAULT_INJECT: injected failure before step " +
                             std::to_string(step));
  }
};

// Where each rank has got to, one small file per rank in RUN_DIR/ranks/ (a folder all ranks
// share, as the checkpoints need): what a rank whose collective timed out reads to name the
// rank that is behind. Progress is 2 x step + 1 inside a step, 2 x step after it.
class RankProgress {
 public:
  RankProgress(const std::string& run_dir, int rank, int world)
      : dir_(run_dir + "/ranks"), world_(world) {
    if (world_ < 2) return;
    MakeDirectories(dir_);
    path_ = PathOf(rank);
    fd_ = ::open(path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  }
  ~RankProgress() {
    if (fd_ >= 0) ::close(fd_);
  }
  RankProgress(const RankProgress&) = delete;
  RankProgress& operator=(const RankProgress&) = delete;

  void Inside(int64_t step) { Write(2 * step + 1); }
  void Finished(int64_t step) { Write(2 * step); }

  /// "rank 0 inside step 3, rank 1 after step 2; behind: rank 1".
  std::string Describe() const {
    std::string text = "progress:";
    int64_t lowest = std::numeric_limits<int64_t>::max(), highest = -1;
    std::vector<int64_t> values(world_, -1);
    for (int r = 0; r < world_; ++r) {
      std::ifstream in(PathOf(r));
      long long value = -1;
      if (in >> value) values[r] = value;
      lowest = std::min<int64_t>(lowest, values[r]);
      highest = std::max<int64_t>(highest, values[r]);
      text += std::string(r ? "," : "") + " rank " + std::to_string(r) +
              (values[r] < 0 ? " unknown"
                             : (values[r] % 2 ? " inside step " : " after step ") +
                                   std::to_string(values[r] / 2));
    }
    if (lowest < highest) {
      text += "; behind:";
      for (int r = 0; r < world_; ++r) {
        if (values[r] == lowest) text += " rank " + std::to_string(r);
      }
    }
    return text;
  }

 private:
  std::string PathOf(int rank) const { return dir_ + "/rank-" + std::to_string(rank); }
  void Write(int64_t value) {
    if (fd_ < 0) return;
    char text[32];
    const int n = std::snprintf(text, sizeof(text), "%-20lld\n", static_cast<long long>(value));
    if (::pwrite(fd_, text, n, 0) != n) {
      ::close(fd_);
      fd_ = -1;  // progress is a diagnostic: never fail training over it
    }
  }

  std::string dir_;
  int world_;
  std::string path_;
  int fd_ = -1;
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

static std::string FormatSeconds(double seconds) {
  char text[32];
  std::snprintf(text, sizeof(text), "%.2fs", seconds);
  return text;
}

std::string FormatDuration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  const long long total = std::llround(seconds);
  char text[32];
  std::snprintf(text, sizeof(text), "%lld:%02lld:%02lld", total / 3600, (total / 60) % 60,
                total % 60);
  return text;
}

int ConfigureThreads(const TrainConfig& config, int local_ranks) {
  int threads = config.threads;
  if (threads == 0) {
    const char* omp = std::getenv("OMP_NUM_THREADS");
    threads = omp != nullptr ? std::atoi(omp) : 0;
  }
  if (threads <= 0) {
    if (local_ranks <= 0) {
      local_ranks = 1;
      for (const char* name :
           {"OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE"}) {
        if (const char* value = std::getenv(name)) {
          local_ranks = std::max(1, std::atoi(value));
          break;
        }
      }
    }
    const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    // A launcher that binds each rank to its own cores (mpirun does by default) has already
    // divided them: use what this process may run on.
    cpu_set_t allowed;
    CPU_ZERO(&allowed);
    const int bound =
        sched_getaffinity(0, sizeof(allowed), &allowed) == 0 ? CPU_COUNT(&allowed) : cores;
    threads = bound < cores ? bound : std::max(1, cores / local_ranks);
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

TrainResult RunTraining(const Config& config, const TrainOptions& options,
                        const DistributedContext& dist) {
  SoloCommunicator solo;
  Communicator& comm = dist.comm != nullptr ? *dist.comm : solo;
  comm.set_timeout(config.dist.timeout());
  const int rank = comm.rank();
  const int world = comm.world_size();
  const bool lead = rank == 0;
  config.Validate(world);
  config.CheckWorldSize(world);
  const int per_rank_batch = config.PerRankMicroBatch(world) * config.train.grad_accum;
  // Only rank 0 talks; the others print warnings and errors alone.
  auto say = [lead](const char* format, auto... args) {
    if (!lead) return;
    std::printf(format, args...);
    std::fflush(stdout);
  };

  const int threads = ConfigureThreads(config.train, dist.local_ranks);
  const torch::Device device(dist.device.empty() ? ResolveDevice(config.train) : dist.device);
  const std::string samples_dir = options.run_dir + "/samples";
  CheckpointDir checkpoints(options.run_dir + "/checkpoints");
  const std::vector<int64_t> existing = checkpoints.Steps();

  std::optional<CheckpointDir::Loaded> loaded;
  if (!options.resume_from.empty()) {
    loaded = LoadCheckpointAt(options.resume_from, [&](const std::string& message) {
      say("ddpm: warning: %s\n", message.c_str());
    });
  } else if (options.resume) {
    loaded = checkpoints.LoadLatestValid(
        [&](const std::string& message) { say("ddpm: warning: %s\n", message.c_str()); });
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

  if (lead) {
    MakeDirectories(samples_dir);
    // Before any rank writes (they all pass the broadcast below first).
    checkpoints.RemoveTemporaries();
  }
  say("ddpm: resolved config\n%s", config.ToTable().c_str());
  const std::unique_ptr<ImageDataset> dataset = MakeDataset(config);
  Trainer trainer(config, device, rank);
  DataCursor cursor;
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
    // Each rank continues its own dropout stream. A rank the checkpoint's world did not have
    // starts one derived from (seed, rank, step): the run is then statistically, not bitwise,
    // the one it would have been.
    const std::map<std::string, torch::Tensor> state =
        StateForRank(loaded->tensors, rank, device, config.train.seed, loaded->path);
    const int64_t saved_world =
        RequireTensor(state, "meta/world_size", loaded->path).item<int64_t>();
    if (saved_world != world) {
      say("ddpm: warning: the checkpoint was written by %lld rank(s) and this run has %d; "
          "timesteps, noise and data order continue exactly, dropout is statistically "
          "equivalent, not bitwise\n",
          static_cast<long long>(saved_world), world);
    }
    trainer.LoadState(state, loaded->path);
    cursor.epoch = RequireTensor(state, "data/epoch", loaded->path).item<int64_t>();
    cursor.offset = RequireTensor(state, "data/offset", loaded->path).item<int64_t>();
    const int64_t saved_threads =
        RequireTensor(state, "meta/threads", loaded->path).item<int64_t>();
    if (saved_threads != threads) {
      say("ddpm: warning: the checkpoint was written with %lld threads per rank and this run "
          "uses %d; results will not be bitwise identical to an uninterrupted run\n",
          static_cast<long long>(saved_threads), threads);
    }
    say("ddpm: resumed from %s at step %lld (epoch %lld, offset %lld)\n", loaded->path.c_str(),
        static_cast<long long>(trainer.step()), static_cast<long long>(cursor.epoch),
        static_cast<long long>(cursor.offset));
  }
  // Every rank starts from rank 0's weights, EMA and optimizer state.
  if (world > 1) {
    torch::NoGradGuard no_grad;
    std::map<std::string, torch::Tensor> state = trainer.State();
    for (auto& [name, tensor] : state) {
      if (name.rfind("rng/", 0) == 0) continue;
      comm.Broadcast(tensor, 0, "broadcast of the initial " + name);
    }
    trainer.LoadState(state, "rank 0's broadcast");
  }
  std::unique_ptr<GradientSync> sync;
  if (world > 1 || dist.make_gradient_sync) {
    if (!dist.make_gradient_sync) {
      throw std::logic_error("RunTraining: a world of " + std::to_string(world) +
                             " ranks needs DistributedContext::make_gradient_sync");
    }
    sync = dist.make_gradient_sync(trainer);
    trainer.set_gradient_sync(sync.get());
  }
  if (lead) {
    std::ofstream resolved(options.run_dir + "/config.yaml");
    resolved << config.ToYaml();
  }
  say("ddpm: %s\nddpm: UNet with %lld parameters on %s, %d threads per rank; %d rank(s) x %d "
      "images (global batch %d, %s); run dir %s\n",
      dataset->Describe().c_str(), static_cast<long long>(CountParameters(*trainer.model())),
      device.str().c_str(), threads, world, per_rank_batch, config.train.batch_size,
      comm.backend().c_str(), options.run_dir.c_str());

  const std::string metrics_path = options.run_dir + "/metrics.csv";
  std::ofstream metrics;
  if (lead) {
    const bool new_metrics = !fs::exists(metrics_path) || !loaded;
    metrics.open(metrics_path, new_metrics ? std::ios::trunc : std::ios::app);
    if (new_metrics) {
      metrics << "step,loss,grad_norm,lr,images_per_second,elapsed_seconds,allreduce_seconds,"
                 "overlap_fraction,loss_q0,loss_q1,loss_q2,loss_q3\n";
    }
  }

  TrainResult result;
  // Every rank copies its share at the step boundary and writes it in the background; rank 0
  // commits. A checkpoint waits for the one before.
  CheckpointWriter writer(checkpoints.dir(), rank, world, config.train.keep_checkpoints,
                          config.dist.timeout_seconds);
  if (lead && options.on_checkpoint) {
    // Save waits for the previous checkpoint, so the times are this commit's.
    writer.set_on_commit([&writer, &on_checkpoint = options.on_checkpoint](
                             int64_t step, const std::string& dir) {
      const CheckpointTimes times = writer.times();
      on_checkpoint({step, dir, times.stall_seconds, times.write_seconds});
    });
  }
  // The steps' values (loss, grad norm, per-quartile sums and counts) add up on the device
  // and are read only at log steps and checkpoints, so that no step waits for the GPU.
  torch::Tensor pending_values =
      torch::zeros({kStepValues}, torch::TensorOptions(device).dtype(torch::kFloat64));
  int64_t pending_steps = 0;
  // The same over the log interval, on the host.
  StepValues window{};
  int64_t window_steps = 0;
  // Reads the pending values into the window; a loss that is not finite stops the run before
  // anything is logged or saved from it.
  auto read_pending = [&] {
    if (pending_steps == 0) return;
    const StepValues v = ReadStepValues(pending_values);
    pending_values.zero_();
    const int64_t first = trainer.step() - pending_steps + 1;
    if (!std::isfinite(v.loss)) {
      throw std::runtime_error(
          "training diverged: the loss is not finite (" + std::to_string(v.loss) + ") in " +
          (pending_steps == 1 ? "step " + std::to_string(first)
                              : "steps " + std::to_string(first) + "-" +
                                    std::to_string(trainer.step())) +
          " on rank " + std::to_string(rank));
    }
    window.loss += v.loss;
    window.grad_norm += v.grad_norm;
    for (int q = 0; q < kTimestepQuartiles; ++q) {
      window.quartile_loss_sum[q] += v.quartile_loss_sum[q];
      window.quartile_count[q] += v.quartile_count[q];
    }
    result.last_metrics.loss = v.loss / pending_steps;
    result.last_metrics.grad_norm = v.grad_norm / pending_steps;
    pending_steps = 0;
  };
  int64_t last_saved_step = loaded ? trainer.step() : -1;
  auto save_checkpoint = [&] {
    // One checkpoint per step: a second request at the same step (SIGUSR1 right after a
    // periodic one) has nothing new to write.
    if (trainer.step() == last_saved_step) return;
    read_pending();
    last_saved_step = trainer.step();
    std::map<std::string, torch::Tensor> replicated = trainer.StateViews();
    std::map<std::string, torch::Tensor> own = {{"rng/default", replicated.at("rng/default")}};
    replicated.erase("rng/default");
    replicated["data/epoch"] = Int64Tensor(cursor.epoch);
    replicated["data/offset"] = Int64Tensor(cursor.offset);
    replicated["meta/threads"] = Int64Tensor(threads);
    replicated["meta/config"] = Text(config.ToYaml());
    writer.Save(trainer.step(), replicated, own);  // waits for the previous one first
    // write_seconds is now the previous checkpoint's (0 before the first has been written).
    const CheckpointTimes times = writer.times();
    result.last_metrics.checkpoint_stall_seconds = times.stall_seconds;
    result.last_metrics.checkpoint_write_seconds = times.write_seconds;
    const std::string previous =
        times.write_seconds > 0
            ? " (the previous one took " + FormatSeconds(times.write_seconds) + ")"
            : "";
    say("ddpm: checkpoint of step %lld: training resumed after %.2fs, writing in the "
        "background%s\n",
        static_cast<long long>(trainer.step()), times.stall_seconds, previous.c_str());
  };
  // Waits for the pending checkpoint (rank 0: until it is committed) and reports it.
  auto finish_checkpoint = [&] {
    const std::string committed = writer.Wait();
    result.last_metrics.checkpoint_write_seconds = writer.times().write_seconds;
    if (lead && !committed.empty()) {
      result.checkpoint = committed;
      say("ddpm: checkpoint %s committed (written in %.2fs)\n", committed.c_str(),
          writer.times().write_seconds);
    }
  };
  auto write_samples = [&](int64_t step) {
    if (lead) {
      const std::string path = samples_dir + "/" + StepName(step) + ".png";
      const auto start = Clock::now();
      // The other ranks of this node wait idle meanwhile: rank 0 borrows their threads.
      const int node_ranks = std::max(1, dist.local_ranks);
      if (device.is_cpu() && node_ranks > 1) torch::set_num_threads(threads * node_ranks);
      WriteSampleGrid(
          SampleImages(trainer.diffusion(), trainer.ema_model(), config, config.sample.num_images,
                       config.sample.num_images,
                       "sampling " + std::to_string(config.sample.num_images) + " EMA images"),
          path);
      torch::set_num_threads(threads);
      say("ddpm: wrote %s (%.1fs)\n", path.c_str(), Seconds(start));
      result.sample_grids.push_back(path);
      if (options.on_sample_grid) options.on_sample_grid(path);
    }
    // Rather than a barrier, in which MPI would spin on the cores rank 0 samples with, the
    // other ranks sleep until rank 0 says it is done.
    torch::Tensor done = torch::ones({1}, torch::kLong);
    comm.WaitForBroadcast(done, 0, "the end of the sample grid of step " + std::to_string(step));
  };

  const int channels = dataset->channels();
  const int size = dataset->image_size();
  const int64_t total = config.train.steps;
  const int64_t first_step = trainer.step();
  const bool tty = lead && StdoutIsTerminal();
  const FaultInjection fault = FaultInjection::FromEnvironment(rank);
  StopSignalScope stop_signals(config.dist.timeout_seconds);
  const DataShard shard = DataShard::Of(config.train.batch_size, rank, world);
  BatchLoader loader(*dataset, shard, config.data.random_flip, config.train.seed, cursor,
                     config.data.prefetch);
  // FID and IS every eval.every steps: the network and reference load now, so that a missing
  // file fails the run before it trains.
  std::unique_ptr<RunEvaluator> evaluator;
  if (config.eval.every > 0) evaluator = std::make_unique<RunEvaluator>(config, device);
  std::ofstream eval_log;
  if (lead && evaluator) {
    const std::string eval_path = options.run_dir + "/eval.csv";
    const bool new_log = !fs::exists(eval_path) || !loaded;
    eval_log.open(eval_path, new_log ? std::ios::trunc : std::ios::app);
    if (new_log) {
      eval_log << "step,fid,inception_score,inception_score_std,num_samples,sampler,"
                  "sampling_steps,eval_seconds,regularized,inception_sha256,reference_sha256\n";
    }
  }
  auto start = Clock::now();
  auto window_start = start;
  double window_allreduce = 0, window_overlap = 0;
  double last_rate = 0;
  int stop_signal = 0;
  RankProgress progress(options.run_dir, rank, world);
  progress.Finished(trainer.step());
  try {
    while (trainer.step() < total) {
      // Rank 0's decision for this step boundary, the same on every rank.
      int64_t control = lead ? TakeControlRequests() : 0;
      if (lead && options.poll_stop && (control & kControlStop) == 0) {
        const StopRequest request = options.poll_stop();
        if (request == StopRequest::kStop) control |= kControlStop | kControlRequested;
        if (request == StopRequest::kAbandon) {
          control |= kControlStop | kControlRequested | kControlAbandon;
        }
      }
      if (world > 1) {
        torch::Tensor word = torch::tensor({control}, torch::kLong);
        comm.Broadcast(
            word, 0,
            "broadcast of the control decision before step " + std::to_string(trainer.step() + 1));
        control = word.item<int64_t>();
      }
      if (control & kControlCheckpoint) save_checkpoint();
      if (control & kControlSample) write_samples(trainer.step());
      if (control & kControlStop) {
        stop_signal = static_cast<int>(control >> kControlSignalShift);
        if (control & kControlRequested) {
          result.stopped_by =
              (control & kControlAbandon) ? StopRequest::kAbandon : StopRequest::kStop;
        }
        break;
      }
      fault.MaybeFail(trainer.step() + 1);

      progress.Inside(trainer.step() + 1);
      const auto step_start = Clock::now();
      LoadedBatch batch = loader.Next();
      const StepStats stats = trainer.Step(
          ToModelInput(batch.pixels, batch.count, channels, size, device), shard.first);
      cursor = batch.after;
      progress.Finished(trainer.step());
      pending_values.add_(stats.values);
      ++pending_steps;
      const int64_t step = trainer.step();
      WorkerMetrics& m = result.last_metrics;
      m.step = step;
      m.rank = rank;
      m.lr = stats.lr;
      m.step_seconds = Seconds(step_start);
      m.images_per_second = per_rank_batch / std::max(m.step_seconds, 1e-9);
      const CommStats comm_stats = sync ? sync->last_stats() : CommStats{};
      m.allreduce_seconds = comm_stats.allreduce_seconds;
      m.overlap_fraction = comm_stats.overlap_fraction;
      m.exposed_seconds = comm_stats.exposed_seconds;
      if (options.on_step) options.on_step(m);

      window_allreduce += m.allreduce_seconds;
      window_overlap += m.overlap_fraction;
      ++window_steps;
      const double elapsed = Seconds(start);
      const double eta = elapsed / (step - first_step) * (total - step);
      if (step % config.train.log_every == 0 || step == total) {
        read_pending();  // waits for the device: the rate below counts finished steps
        last_rate = window_steps * config.train.batch_size / std::max(Seconds(window_start), 1e-9);
        // The loss over every rank's samples, and the per-quartile sums and counts.
        torch::Tensor sums = torch::empty({1 + 2 * kTimestepQuartiles}, torch::kFloat64);
        double* packed = sums.data_ptr<double>();
        packed[0] = window.loss / window_steps;
        for (int q = 0; q < kTimestepQuartiles; ++q) {
          packed[1 + q] = window.quartile_loss_sum[q];
          packed[1 + kTimestepQuartiles + q] = window.quartile_count[q];
        }
        comm.AllReduce(sums, ReduceOp::kSum,
                       "all-reduce of the loss at step " + std::to_string(step));
        const double* summed = sums.data_ptr<double>();
        result.last_loss = summed[0] / world;
        std::array<double, kTimestepQuartiles> loss_by_quartile{};
        std::ostringstream quartile_csv;
        for (int q = 0; q < kTimestepQuartiles; ++q) {
          const double count = summed[1 + kTimestepQuartiles + q];
          loss_by_quartile[q] =
              count > 0 ? summed[1 + q] / count : std::numeric_limits<double>::quiet_NaN();
          quartile_csv << ',';
          if (count > 0) quartile_csv << loss_by_quartile[q];
        }
        const double allreduce_ms = 1000 * window_allreduce / window_steps;
        const double overlap = window_overlap / window_steps;
        std::string comm_text;
        if (world > 1) {
          char text[96];
          std::snprintf(text, sizeof(text), " | all-reduce %.1f ms, %.0f%% hidden", allreduce_ms,
                        100 * overlap);
          comm_text = text;
        }
        say("%sstep %lld/%lld | loss %.4f | grad %.3f | lr %.2e | %.1f img/s%s | elapsed %s | "
            "eta %s\n",
            tty ? "\r\033[K" : "", static_cast<long long>(step), static_cast<long long>(total),
            result.last_loss, window.grad_norm / window_steps, stats.lr, last_rate, comm_text.c_str(),
            FormatDuration(elapsed).c_str(), FormatDuration(eta).c_str());
        if (lead && options.on_log) {
          LogMetrics log;
          log.step = step;
          log.total_steps = total;
          log.loss = result.last_loss;
          log.grad_norm = window.grad_norm / window_steps;
          log.lr = stats.lr;
          log.images_per_second = last_rate;
          log.elapsed_seconds = elapsed;
          log.eta_seconds = eta;
          log.loss_by_quartile = loss_by_quartile;
          options.on_log(log);
        }
        if (lead) {
          metrics << step << "," << result.last_loss << "," << window.grad_norm / window_steps << ","
                  << stats.lr << "," << last_rate << "," << elapsed << ","
                  << window_allreduce / window_steps << "," << overlap << quartile_csv.str() << "\n";
          metrics.flush();
        }
        window = StepValues{};
        window_allreduce = window_overlap = 0;
        window_steps = 0;
        window_start = Clock::now();
      } else if (tty) {
        DrawProgressBar(step, total, result.last_metrics.loss, last_rate, eta);
      }
      if (step != total && config.train.checkpoint_every > 0 &&
          step % config.train.checkpoint_every == 0) {
        save_checkpoint();
      }
      if (step != total && config.train.sample_every > 0 && step % config.train.sample_every == 0) {
        write_samples(step);
      }
      if (evaluator && (step % config.eval.every == 0 || step == total)) {
        const auto eval_start = Clock::now();
        say("%sddpm: evaluating FID and IS of %lld EMA samples at step %lld\n", tty ? "\r\033[K" : "",
            static_cast<long long>(config.eval.num_samples), static_cast<long long>(step));
        int64_t reported = 0;
        const EvalReport report = evaluator->Evaluate(
            trainer.diffusion(), trainer.ema_model(), comm, step, [&](int64_t done, int64_t share) {
              if (done * 10 / share > reported * 10 / share || done == share) {
                say("ddpm: eval: rank 0 has %lld/%lld of its samples (%.0fs)\n",
                    static_cast<long long>(done), static_cast<long long>(share), Seconds(eval_start));
              }
              reported = done;
            });
        say("ddpm: eval at step %lld: FID %.4f, IS %.4f +- %.4f (%lld samples, %s %d steps, "
            "%.1fs%s; Inception sha256 %.12s, reference sha256 %.12s)\n",
            static_cast<long long>(step), report.fid, report.inception_score,
            report.inception_score_std, static_cast<long long>(report.num_samples),
            report.sampler.c_str(), report.sampling_steps, report.seconds,
            report.regularized ? "; covariances regularized with eps" : "",
            report.inception_sha256.c_str(), report.reference_sha256.c_str());
        if (lead) {
          eval_log << step << "," << report.fid << "," << report.inception_score << ","
                   << report.inception_score_std << "," << report.num_samples << ","
                   << report.sampler << "," << report.sampling_steps << "," << report.seconds
                   << "," << report.regularized << "," << report.inception_sha256 << ","
                   << report.reference_sha256 << "\n";
          eval_log.flush();
          if (options.on_eval) options.on_eval(report);
        }
        // Evaluation is not training: keep it out of images/s, elapsed and the ETA.
        const auto spent = Clock::now() - eval_start;
        start += spent;
        window_start += spent;
      }
    }
  } catch (const CommError& error) {
    // Name the rank that is behind, if the others' progress shows one.
    if (world > 1) throw CommError(std::string(error.what()) + "; " + progress.Describe());
    throw;
  }
  result.steps = trainer.step();
  if (result.stopped_by == StopRequest::kAbandon) {
    finish_checkpoint();
    say("%sddpm: stopped at step %lld without a checkpoint, as asked\n", tty ? "\r\033[K" : "",
        static_cast<long long>(result.steps));
    return result;
  }
  if (stop_signal != 0 || result.stopped_by == StopRequest::kStop) {
    result.interrupted_by = stop_signal;
    say("%sddpm: %s at step %lld; saving a checkpoint\n", tty ? "\r\033[K" : "",
        stop_signal == 0 ? "asked to stop"
                         : (stop_signal == SIGINT ? "caught SIGINT" : "caught SIGTERM"),
        static_cast<long long>(result.steps));
    save_checkpoint();
    finish_checkpoint();
    say("ddpm: stopped; continue with --resume --run-dir %s\n", options.run_dir.c_str());
    return result;
  }
  if (result.steps != first_step) save_checkpoint();
  finish_checkpoint();
  write_samples(result.steps);
  if (lead) {
    result.ema_weights = options.run_dir + "/ema_weights.pt";
    SaveTensors(StateDict(*trainer.ema_model()), result.ema_weights);
  }
  say("ddpm: trained to step %lld (%lld this run) in %s; EMA weights in %s\n",
      static_cast<long long>(result.steps), static_cast<long long>(result.steps - first_step),
      FormatDuration(Seconds(start)).c_str(), result.ema_weights.c_str());
  return result;
}

std::vector<std::string> RunSampleJob(const SampleJob& job) {
  Config config;
  std::map<std::string, torch::Tensor> weights;
  std::string origin;
  if (!job.checkpoint.empty()) {
    const CheckpointDir::Loaded loaded = LoadCheckpointAt(
        job.checkpoint,
        [](const std::string& message) { std::printf("ddpm: warning: %s\n", message.c_str()); });
    config = ConfigFromCheckpoint(loaded.tensors, loaded.path);
    weights = WeightsFromState(loaded.tensors, "ema");
    origin = loaded.path;
  } else {
    // An exported weights file carries its config beside it (ddpm_export writes both).
    config = LoadConfigFile(job.config_path.empty() ? ConfigBesideWeights(job.weights)
                                                    : job.config_path);
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

std::string ConfigBesideWeights(const std::string& weights) {
  return fs::path(weights).replace_extension(".yaml").string();
}

std::vector<std::string> RunExport(const ExportJob& job) {
  if (job.which != "ema" && job.which != "model") {
    throw ConfigError("ddpm_export: --weights must be ema or model, got '" + job.which + "'");
  }
  const CheckpointDir::Loaded loaded = LoadCheckpointAt(
      job.checkpoint,
      [](const std::string& message) { std::printf("ddpm: warning: %s\n", message.c_str()); });
  const Config config = ConfigFromCheckpoint(loaded.tensors, loaded.path);
  const std::map<std::string, torch::Tensor> weights = WeightsFromState(loaded.tensors, job.which);
  // Check that the names and shapes are exactly the UNet's before writing anything.
  UNet model(config.model);
  LoadStateDict(*model, weights, loaded.path);
  SaveTensors(weights, job.out);
  const std::string config_path = ConfigBesideWeights(job.out);
  {
    std::ofstream out(config_path);
    out << config.ToYaml();
    if (!out) throw std::runtime_error(config_path + ": cannot write");
  }
  std::printf("ddpm: exported the %s weights of %s (%zu tensors) to %s, config to %s\n",
              job.which.c_str(), loaded.path.c_str(), weights.size(), job.out.c_str(),
              config_path.c_str());
  return {job.out, config_path};
}

}  // namespace ddpm
