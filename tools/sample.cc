#include "tools/sample.h"

#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>

#include "base/errors.h"
#include "base/file_io.h"
#include "base/log.h"
#include "base/sha256.h"
#include "base/text.h"
#include "eval/fid.h"
#include "eval/inception.h"
#include "run/sampling.h"
#include "tools/trained_model.h"
#include "trainer/checkpoint.h"
#include "trainer/communicator.h"
#include "trainer/device.h"
#include "trainer/diffusion.h"
#include "trainer/image_io.h"
#include "trainer/tensor_io.h"
#include "trainer/trainer.h"
#include "trainer/unet.h"

namespace ddpm {

void AddTrainedModelFlags(Flags& flags) {
  flags.Add("checkpoint",
            "a checkpoint directory (RUN_DIR/checkpoints/step_*), a checkpoints folder or a run "
            "directory (its newest valid checkpoint), or RUN_DIR/best (the checkpoint "
            "eval.select kept); its EMA weights and config are used",
            "");
  flags.Add("weights", "or a weights file: ddpm_export's, or RUN_DIR/ema_weights.pt", "");
  flags.Add("config",
            "the YAML config the weights were trained with (default: the .yaml beside them)", "");
  flags.Add("device", "cpu, cuda or auto (default: the config's train.device)", "");
}

void CheckTrainedModelFlags(const Flags& flags, const std::string& tool) {
  if (flags.Get("checkpoint").empty() == flags.Get("weights").empty()) {
    throw FlagError(tool + ": give either --checkpoint or --weights");
  }
}

TrainedModel LoadTrainedModel(const Flags& flags,
                              std::vector<std::pair<std::string, std::string>> overrides,
                              const std::string& tool) {
  CheckTrainedModelFlags(flags, tool);
  if (flags.Given("device")) overrides.emplace_back("train.device", flags.Get("device"));
  return LoadTrainedModel(flags.Get("checkpoint"), flags.Get("weights"), flags.Get("config"),
                          overrides, tool);
}

void AddSampleFlags(Flags& flags) {
  AddTrainedModelFlags(flags);
  flags.Add("out", "a PNG grid, or a directory (ending in /) for one PNG per image", "samples.png");
  flags.Add("num", "number of images (default: the config's sample.num_images)", "");
  flags.Add("sampler", "ddpm, ddim or heun (default: the config's sample.sampler)", "");
  flags.Add("steps",
            "sampler steps: DDIM's S, or fewer than T to respace the ancestral sampler (default: "
            "the config's sample.steps; 0: T for ddpm, 100 for ddim)",
            "");
  flags.Add("eta", "DDIM eta (default: the config's sample.eta)", "");
  flags.Add("class",
            "a class-conditional model's classes: one (3), a list (0,2) or all, in contiguous "
            "blocks of images, one row per class in a grid (default: the config's sample.classes, "
            "else all)",
            "");
  flags.Add("guidance",
            "classifier-free guidance w: eps_uncond + w (eps_cond - eps_uncond); 1 conditional, "
            "0 unconditional (default: the config's sample.guidance)",
            "");
  flags.Add("churn", "heun: EDM's S_churn, 0 deterministic (default: the config's sample.churn)",
            "");
  flags.Add("variance", "DDPM variance, fixedlarge or fixedsmall (default: the config's)", "");
  flags.Add("seed",
            "sampler seed; image i draws from (seed, i) alone, on any batch size and number of "
            "ranks (default: the config's sample.seed)",
            "");
  flags.AddSwitch("resume",
                  "a directory job: keep the images already there and draw only the missing ones");
  flags.Add("batch", "images per forward pass", "64");
}

SampleJob SampleJobFromFlags(const Flags& flags) {
  SampleJob job;
  job.checkpoint = flags.Get("checkpoint");
  job.weights = flags.Get("weights");
  job.config_path = flags.Get("config");
  CheckTrainedModelFlags(flags, "ddpm_sample");
  job.out = flags.Get("out");
  job.batch_size = static_cast<int>(flags.GetInt("batch"));
  job.resume = flags.GetSwitch("resume");
  // Each override goes through the config loader, so it is checked like a config file.
  const std::pair<const char*, const char*> keys[] = {
      {"num", "sample.num_images"}, {"sampler", "sample.sampler"},   {"steps", "sample.steps"},
      {"eta", "sample.eta"},        {"variance", "sample.variance"}, {"seed", "sample.seed"},
      {"churn", "sample.churn"},    {"device", "train.device"}};
  for (const auto& [flag, key] : keys) {
    if (flags.Given(flag)) job.overrides.emplace_back(key, flags.Get(flag));
  }
  if (flags.Given("guidance")) job.overrides.emplace_back("sample.guidance", flags.Get("guidance"));
  if (flags.Given("class")) {
    // "all" is every class: an empty list; "3" and "0,2" are YAML lists.
    const std::string classes = flags.Get("class");
    job.overrides.emplace_back("sample.classes", classes == "all" ? "[]" : "[" + classes + "]");
  }
  return job;
}

TrainedModel LoadTrainedModel(const std::string& checkpoint, const std::string& weights_path,
                              const std::string& config_path,
                              const std::vector<std::pair<std::string, std::string>>& overrides,
                              const std::string& tool) {
  TrainedModel trained;
  std::map<std::string, torch::Tensor> weights;
  if (!checkpoint.empty()) {
    const CheckpointDir::Loaded loaded = LoadCheckpointAt(
        checkpoint,
        [](const std::string& message) { LogWarning("ddpm: warning: %s\n", message.c_str()); });
    trained.config = ConfigFromCheckpoint(loaded.tensors, loaded.path);
    weights = WeightsFromState(loaded.tensors, "ema");
    trained.origin = loaded.path;
    if (loaded.path != checkpoint) {
      LogInfo("%s: %s is %s\n", tool.c_str(), checkpoint.c_str(), loaded.path.c_str());
    }
  } else {
    // An exported weights file carries its config beside it (ddpm_export writes both).
    trained.config =
        LoadConfigFile(config_path.empty() ? ConfigBesideWeights(weights_path) : config_path);
    weights = LoadTensors(weights_path);
    trained.origin = weights_path;
  }
  for (const auto& [key, value] : overrides) {
    SetConfigKey(trained.config, key, value, tool + " flags");
  }
  trained.config.Validate();
  ConfigureThreads(trained.config.train);
  trained.device = torch::Device(ResolveDevice(trained.config.train));
  trained.model = UNet(trained.config.model);
  CheckLearnSigma(trained.config.model, weights, trained.origin);
  CheckNumClasses(trained.config.model, weights, trained.origin);
  LoadStateDict(*trained.model, weights, trained.origin);
  trained.model->to(trained.device);
  return trained;
}

namespace {

// The indices below count whose file (SampleFileName) is in dir, ascending: the images a job
// (every rank) has written.
std::vector<int64_t> SampleFilesIn(const std::string& dir, int64_t count) {
  std::vector<int64_t> found;
  std::error_code error;
  for (const auto& entry : std::filesystem::directory_iterator(dir, error)) {
    const std::string name = entry.path().filename().string();
    const std::size_t digits = name.size() - 4;  // NNNNNN.png, more digits past 999999
    if (name.size() >= 10 && name.compare(digits, 4, ".png") == 0 &&
        name.find_first_not_of("0123456789") == digits) {
      const int64_t index = std::stoll(name.substr(0, digits));
      if (index < count) found.push_back(index);
    }
  }
  std::sort(found.begin(), found.end());
  return found;
}

// Reads images 0 .. count - 1 of dir into one uint8 [N, H, W, C] array and writes it as the
// archive's arr_0, with a conditional model's labels (int64 [N]) as arr_1 (guided-diffusion's
// layout), then the archive's SHA-256 beside it.
void WriteSampleArchive(const std::string& dir, int64_t count, const std::string& out,
                        const torch::Tensor& labels) {
  const std::vector<int64_t> present = SampleFilesIn(dir, count);
  std::vector<torch::Tensor> images;
  for (int64_t i = 0; i < count; ++i) {
    if (i >= static_cast<int64_t>(present.size()) || present[i] != i) {
      throw FileError(dir + ": image " + SampleFileName(i) +
                      " is missing; run the job again with --resume");
    }
    const Image image = ReadImageFile((std::filesystem::path(dir) / SampleFileName(i)).string());
    images.push_back(torch::from_blob(const_cast<uint8_t*>(image.pixels.data()),
                                      {image.height, image.width, image.channels}, torch::kUInt8)
                         .clone());
  }
  const torch::Tensor stacked = torch::stack(images);
  std::map<std::string, torch::Tensor> arrays = {{"arr_0", stacked}};
  if (labels.defined()) arrays["arr_1"] = labels;
  WriteNpz(out, arrays);
  const std::string sha256 = Sha256File(out);
  // sha256sum -c reads this.
  WriteFileAtomically(out + ".sha256",
                      sha256 + "  " + std::filesystem::path(out).filename().string() + "\n");
  LogInfo("ddpm_sample: wrote %s: arr_0 uint8 %lld x %lld x %lld x %lld, sha256 %s\n", out.c_str(),
          static_cast<long long>(stacked.size(0)), static_cast<long long>(stacked.size(1)),
          static_cast<long long>(stacked.size(2)), static_cast<long long>(stacked.size(3)),
          sha256.c_str());
}

}  // namespace

std::vector<std::string> RunSampleJob(const SampleJob& job, Communicator& comm,
                                      const std::function<void(TrainedModel&)>& place) {
  if (job.batch_size < 1) throw ConfigError("ddpm_sample: --batch must be >= 1");
  // A .npz archive is assembled from a directory of images beside it, which --resume reuses.
  const bool to_npz = job.out.size() > 4 && job.out.compare(job.out.size() - 4, 4, ".npz") == 0;
  const std::string dir = to_npz ? job.out + ".images/" : job.out;
  const bool to_dir =
      to_npz || (!dir.empty() && dir.back() == '/') || std::filesystem::is_directory(dir);
  const int rank = comm.rank(), world = comm.world_size();
  if (!to_dir && world > 1) {
    throw FlagError("ddpm_sample: --out " + job.out + " is a grid, which one rank draws; under " +
                    "mpirun give a directory (ending in /), where each rank writes its images");
  }
  if (!to_dir && job.resume) {
    throw FlagError("ddpm_sample: --resume continues a directory of images; --out " + job.out +
                    " is a grid");
  }
  TrainedModel trained =
      LoadTrainedModel(job.checkpoint, job.weights, job.config_path, job.overrides, "ddpm_sample");
  if (place) place(trained);
  const Config& config = trained.config;
  const ModelConfig& m = config.model;
  const GaussianDiffusion diffusion(config.diffusion, trained.device);
  const std::vector<int> classes = ClassesToSample(config);
  const int64_t count = config.sample.num_images;
  const std::string what = std::string(Name(config.sample.sampler)) + " " +
                           std::to_string(config.sample.ResolvedSteps(config.diffusion.timesteps)) +
                           " steps";
  // Each rank's share, and in it what is still missing.
  const int64_t first = count * rank / world, last = count * (rank + 1) / world;
  std::vector<int64_t> pending;
  for (int64_t i = first; i < last; ++i) {
    const std::filesystem::path file = std::filesystem::path(dir) / SampleFileName(i);
    if (job.resume) {
      // A killed job may have left a file it was writing aside; the image is drawn again.
      std::error_code ignored;
      std::filesystem::remove(file.string() + ".tmp", ignored);
      if (std::filesystem::exists(file)) continue;
    }
    pending.push_back(i);
  }
  if (to_dir) MakeDirectories(dir);
  torch::Tensor missing = torch::tensor({static_cast<int64_t>(pending.size())}, torch::kLong);
  comm.AllReduce(missing, ReduceOp::kSum, "the count of images to draw");
  const int64_t to_draw = missing.item<int64_t>();
  const bool lead = rank == 0;
  if (lead) {
    LogInfo("ddpm_sample: %lld images (%s) on %d rank(s) into %s%s\n",
            static_cast<long long>(count), what.c_str(), world, dir.c_str(),
            job.resume ? (", " + std::to_string(count - to_draw) + " already there").c_str() : "");
  }
  const auto start = std::chrono::steady_clock::now();
  auto last_report = start;
  const int64_t before = count - to_draw;
  std::vector<std::string> written;
  std::vector<torch::Tensor> grid;
  for (std::size_t begin = 0; begin < pending.size(); begin += job.batch_size) {
    const std::size_t end = std::min(pending.size(), begin + job.batch_size);
    const std::vector<int64_t> indices(pending.begin() + begin, pending.begin() + end);
    std::vector<uint64_t> seeds;
    for (int64_t i : indices) seeds.push_back(ImageSeed(config.sample.seed, i));
    NoiseStreams streams(seeds);
    const int64_t n = static_cast<int64_t>(indices.size());
    // Image i's class depends on i alone (contiguous blocks): the same on any split.
    const Denoiser denoiser =
        EvalDenoiser(trained.model, config.train.precision, BlockLabels(classes, indices, count),
                     config.sample.guidance);
    const torch::Tensor images =
        diffusion
            .Sample(
                denoiser, {n, m.in_channels, m.image_size, m.image_size}, config.sample, streams,
                world == 1 && pending.size() <= static_cast<std::size_t>(job.batch_size)
                    ? ProgressPrinter("sampling " + std::to_string(n) + " images (" + what + ")",
                                      ProgressMode::kAuto)
                    : nullptr)
            .to(torch::kCPU);
    if (to_dir) {
      const auto files = WriteSampleFiles(images, dir, indices);
      written.insert(written.end(), files.begin(), files.end());
    } else {
      grid.push_back(images);
    }
    const double elapsed = SecondsSince(start);
    if (lead && to_dir && (end == pending.size() || SecondsSince(last_report) >= 5.0)) {
      last_report = std::chrono::steady_clock::now();
      // The whole job's progress, from the files every rank has written.
      const int64_t done = static_cast<int64_t>(SampleFilesIn(dir, count).size());
      const double rate = (done - before) / std::max(elapsed, 1e-9);
      LogInfo("ddpm_sample: %lld/%lld images (all ranks), %.2f images/s, elapsed %s, eta %s\n",
              static_cast<long long>(done), static_cast<long long>(count), rate,
              FormatDuration(elapsed).c_str(),
              rate > 0 ? FormatDuration((count - done) / rate).c_str() : "?");
    }
  }
  if (!to_dir) {
    WriteSampleGrid(torch::cat(grid), job.out,
                    classes.empty()
                        ? 0
                        : static_cast<int>((count + static_cast<int64_t>(classes.size()) - 1) /
                                           static_cast<int64_t>(classes.size())));
    written.push_back(job.out);
  }
  comm.Barrier("the end of sampling");
  if (lead && to_dir) {
    LogInfo("ddpm_sample: %lld images in %s (%lld drawn now) in %s\n",
            static_cast<long long>(SampleFilesIn(dir, count).size()), dir.c_str(),
            static_cast<long long>(to_draw), FormatDuration(SecondsSince(start)).c_str());
  }
  if (to_npz) {
    if (lead) {
      std::vector<int64_t> all(count);
      for (int64_t i = 0; i < count; ++i) all[i] = i;
      WriteSampleArchive(dir, count, job.out, BlockLabels(classes, all, count));
    }
    comm.Barrier("the sample archive");
    return {job.out};
  }
  return written;
}

std::string ConfigBesideWeights(const std::string& weights) {
  return std::filesystem::path(weights).replace_extension(".yaml").string();
}

}  // namespace ddpm
