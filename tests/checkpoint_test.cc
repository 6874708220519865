// The checkpoint file format, atomic writes under a crash, the checkpoints folder, and exact
// resume of a training run.
#include "trainer/checkpoint.h"

#include <gtest/gtest.h>
#include <torch/torch.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "trainer/config.h"
#include "trainer/train_loop.h"

namespace ddpm {
namespace {

namespace fs = std::filesystem;

std::string TempPath(const std::string& name) {
  const fs::path dir = fs::temp_directory_path() / ("ddpm_ckpt_" + std::to_string(getpid()));
  fs::create_directories(dir);
  return (dir / name).string();
}

std::map<std::string, torch::Tensor> Sample(float value) {
  return {{"a", torch::full({3, 4}, value)}, {"b/step", torch::tensor(int64_t{7})}};
}

std::string ErrorOf(const std::string& path) {
  try {
    ReadCheckpointFile(path);
  } catch (const CheckpointError& e) {
    return e.what();
  }
  return "";
}

std::vector<char> Bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<char>((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

void Put(const std::string& path, const std::vector<char>& bytes) {
  std::ofstream(path, std::ios::binary)
      .write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

TEST(CheckpointFile, RoundTripsWithMagicAndVersion) {
  const std::string path = TempPath("round.ckpt");
  WriteCheckpointFile(path, Sample(1.5f));
  const std::vector<char> bytes = Bytes(path);
  EXPECT_EQ(std::string(bytes.data(), 8), "DDPMCKPT");
  EXPECT_EQ(bytes[8], 1) << "format version 1, little-endian";
  const auto back = ReadCheckpointFile(path);
  EXPECT_TRUE(torch::equal(back.at("a"), torch::full({3, 4}, 1.5f)));
  EXPECT_EQ(back.at("b/step").item<int64_t>(), 7);
  EXPECT_FALSE(fs::exists(path + ".tmp"));
}

TEST(CheckpointFile, RefusesDamageByName) {
  const std::string path = TempPath("damaged.ckpt");
  WriteCheckpointFile(path, Sample(2.0f));
  const std::vector<char> good = Bytes(path);

  std::vector<char> bytes = good;
  bytes[0] = 'X';
  Put(path, bytes);
  EXPECT_NE(ErrorOf(path).find("not a ddpm-train checkpoint"), std::string::npos) << ErrorOf(path);

  bytes = good;
  bytes[8] = 9;
  Put(path, bytes);
  EXPECT_NE(ErrorOf(path).find("format version 9 is unknown"), std::string::npos) << ErrorOf(path);

  bytes = good;
  bytes.resize(bytes.size() - 10);
  Put(path, bytes);
  EXPECT_NE(ErrorOf(path).find("truncated"), std::string::npos) << ErrorOf(path);
  EXPECT_NE(ErrorOf(path).find(path), std::string::npos);

  bytes = good;
  bytes[bytes.size() - 20] ^= 0x40;
  Put(path, bytes);
  EXPECT_NE(ErrorOf(path).find("checksum mismatch"), std::string::npos) << ErrorOf(path);

  Put(path, std::vector<char>(5, 'D'));
  EXPECT_NE(ErrorOf(path).find("shorter than the 32-byte header"), std::string::npos)
      << ErrorOf(path);
}

TEST(CheckpointDirTest, KeepsTheNewestAndMovesLatest) {
  CheckpointDir dir(TempPath("keep"));
  for (int step : {10, 20, 30, 40}) dir.Save(step, Sample(static_cast<float>(step)), 2);
  EXPECT_EQ(dir.Steps(), (std::vector<int64_t>{40, 30}));
  std::ifstream latest(dir.dir() + "/latest");
  std::string name;
  latest >> name;
  EXPECT_EQ(name, "step_000000040.ckpt");
  const auto loaded = dir.LoadLatestValid(nullptr);
  ASSERT_TRUE(loaded);
  EXPECT_EQ(loaded->tensors.at("a")[0][0].item<float>(), 40.0f);
}

TEST(CheckpointDirTest, FallsBackPastACorruptNewestAndSaysSo) {
  CheckpointDir dir(TempPath("fallback"));
  dir.Save(1, Sample(1.0f), 3);
  dir.Save(2, Sample(2.0f), 3);
  std::vector<char> bytes = Bytes(dir.PathFor(2));
  bytes[bytes.size() / 2] ^= 1;
  Put(dir.PathFor(2), bytes);
  std::vector<std::string> warnings;
  const auto loaded = dir.LoadLatestValid([&](const std::string& w) { warnings.push_back(w); });
  ASSERT_TRUE(loaded);
  EXPECT_EQ(loaded->path, dir.PathFor(1));
  ASSERT_EQ(warnings.size(), 1u);
  EXPECT_NE(warnings[0].find("step_000000002.ckpt"), std::string::npos) << warnings[0];
}

TEST(CheckpointDeathTest, CrashMidWriteLeavesThePreviousCheckpointLoadable) {
  GTEST_FLAG_SET(death_test_style, "fast");  // fork here: the child shares the paths
  CheckpointDir dir(TempPath("crash"));
  dir.Save(1, Sample(1.0f), 3);
  // A big second checkpoint, written in several chunks; the process dies half-way through.
  std::map<std::string, torch::Tensor> big = {{"a", torch::full({3, 4}, 2.0f)},
                                              {"big", torch::ones({3 << 20})}};
  EXPECT_EXIT(dir.Save(2, big, 3,
                       [](std::size_t written, std::size_t total) {
                         if (written >= total / 2) _exit(7);
                       }),
              ::testing::ExitedWithCode(7), "");
  EXPECT_TRUE(fs::exists(dir.PathFor(2) + ".tmp")) << "the crash left a partial temporary file";
  EXPECT_EQ(dir.Steps(), (std::vector<int64_t>{1})) << "and no step_2 checkpoint";
  const auto loaded = dir.LoadLatestValid(nullptr);
  ASSERT_TRUE(loaded);
  EXPECT_EQ(loaded->path, dir.PathFor(1));
  EXPECT_EQ(loaded->tensors.at("a")[0][0].item<float>(), 1.0f);
}

Config TinyRun(int64_t steps) {
  Config config = LoadConfigString(R"(
model: {ch: 16, ch_mult: [1, 2], num_res_blocks: 1, attn_resolutions: [8], image_size: 16,
        norm_groups: 8, dropout: 0.1}
diffusion: {timesteps: 100}
train: {batch_size: 8, lr: 0.001, warmup_steps: 5, ema_decay: 0.9, threads: 1, log_every: 10,
        checkpoint_every: 0, device: cpu}
data: {shapes_size: 64}
sample: {sampler: ddim, steps: 5, num_images: 4}
)");
  config.train.steps = steps;
  return config;
}

TEST(Resume, TwentyStepsSaveResumeTwentyMoreIsBitwiseFortyStraight) {
  // Dropout is on, the data wraps into a second epoch (64 images, 8 per batch), and flips
  // are random: every RNG stream must be carried over for this to hold.
  const std::string straight_dir = TempPath("straight");
  const std::string split_dir = TempPath("split");
  fs::remove_all(straight_dir);
  fs::remove_all(split_dir);
  TrainOptions straight;
  straight.run_dir = straight_dir;
  const TrainResult full = RunTraining(TinyRun(40), straight);

  TrainOptions split;
  split.run_dir = split_dir;
  const TrainResult first = RunTraining(TinyRun(20), split);
  ASSERT_EQ(first.steps, 20);
  split.resume = true;
  const TrainResult second = RunTraining(TinyRun(40), split);
  ASSERT_EQ(second.steps, 40);

  const auto a = ReadCheckpointFile(full.checkpoint);
  const auto b = ReadCheckpointFile(second.checkpoint);
  int compared = 0;
  for (const auto& [name, tensor] : a) {
    if (name.rfind("meta/", 0) == 0) continue;
    ASSERT_EQ(b.count(name), 1u) << name;
    EXPECT_TRUE(torch::equal(tensor, b.at(name))) << name << " differs after resume";
    ++compared;
  }
  EXPECT_GT(compared, 50);
}

TEST(Resume, RefusesToOverwriteARunAndChecksTheConfig) {
  const std::string dir = TempPath("refuse");
  fs::remove_all(dir);
  TrainOptions options;
  options.run_dir = dir;
  RunTraining(TinyRun(3), options);
  try {
    RunTraining(TinyRun(6), options);
    FAIL() << "a second run into the same directory must not start afresh";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("pass --resume"), std::string::npos) << e.what();
  }
  options.resume = true;
  Config other = TinyRun(6);
  other.model.ch = 32;
  try {
    RunTraining(other, options);
    FAIL() << "a different model must not load";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("model section differs"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace ddpm
