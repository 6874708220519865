// The sharded checkpoint format: layout, several ranks writing, loading into any world,
// damage of every kind refused by name with a fall back, a crash mid-write, and exact resume
// of a training run.
#include "trainer/checkpoint.h"

#include <gtest/gtest.h>
#include <torch/torch.h>
#include <unistd.h>

#include <csignal>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <thread>

#include "config/batch_plan.h"
#include "config/config.h"
#include "run/run.h"
#include "run/run_control.h"
#include "test_env.h"
#include "tools/export.h"
#include "trainer/trainer.h"

namespace ddpm {
namespace {

namespace fs = std::filesystem;

std::string TempPath(const std::string& name) {
  const fs::path dir = fs::temp_directory_path() / ("ddpm_ckpt_" + std::to_string(getpid()));
  fs::create_directories(dir);
  return (dir / name).string();
}

std::map<std::string, torch::Tensor> Sample(float value) {
  // Odd sizes and mixed dtypes, so that rank ranges cut through tensors.
  return {{"a", torch::full({3, 5}, value)},
          {"b/step", torch::tensor(int64_t{7})},
          {"c", torch::arange(1001, torch::kFloat64) * value},
          {"d", torch::arange(37, torch::kUInt8)}};
}

std::string ErrorOf(const std::string& path) {
  try {
    ReadCheckpoint(path);
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

std::string Fresh(const std::string& name) {
  const std::string path = TempPath(name);
  fs::remove_all(path);
  return path;
}

void ExpectSame(const std::map<std::string, torch::Tensor>& expected,
                const std::map<std::string, torch::Tensor>& got, const std::string& what) {
  for (const auto& [name, tensor] : expected) {
    ASSERT_EQ(got.count(name), 1u) << what << ": missing " << name;
    EXPECT_EQ(got.at(name).scalar_type(), tensor.scalar_type()) << what << ": " << name;
    EXPECT_TRUE(torch::equal(got.at(name), tensor)) << what << ": " << name << " differs";
  }
}

TEST(Checkpoint, LayoutManifestShardsAndCommitMarker) {
  const std::string dir = Fresh("layout");
  const std::string path = SaveCheckpoint(dir, 5, Sample(1.5f), 3);
  EXPECT_EQ(path, dir + "/step_000000005");
  for (const char* file : {"manifest.json", "shard-00000-of-00001", "COMMITTED"}) {
    EXPECT_TRUE(fs::exists(fs::path(path) / file)) << file;
  }
  const std::vector<char> shard = Bytes(path + "/shard-00000-of-00001");
  ASSERT_GE(shard.size(), 8u);
  EXPECT_EQ(std::string(shard.data(), 8), "DDPMSHRD");
  std::ifstream latest(dir + "/latest");
  std::string name;
  latest >> name;
  EXPECT_EQ(name, "step_000000005");
  const auto back = ReadCheckpoint(path);
  ExpectSame(Sample(1.5f), back, "round trip");
  EXPECT_EQ(back.at("meta/world_size").item<int64_t>(), 1);
}

// Rank r of world writes Sample(value) as the replicated state, and a rank-own tensor r.
void SaveAsRanks(const std::string& dir, int64_t step, int world, float value) {
  std::vector<std::thread> threads;
  std::vector<std::exception_ptr> errors(world);
  for (int r = 0; r < world; ++r) {
    threads.emplace_back([&, r] {
      try {
        CheckpointWriter writer(dir, r, world, 5, 60);
        writer.Save(step, Sample(value), {{"rng", torch::full({5}, r, torch::kUInt8)}});
        writer.Wait();
      } catch (...) {
        errors[r] = std::current_exception();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (auto& e : errors) {
    if (e) std::rethrow_exception(e);
  }
}

TEST(Checkpoint, ShardsOfTwoRanksLoadIntoAnyWorld) {
  const std::string dir = Fresh("reshard");
  SaveAsRanks(dir, 3, 2, 2.5f);
  const std::string path = dir + "/step_000000003";
  EXPECT_TRUE(fs::exists(path + "/shard-00000-of-00002"));
  EXPECT_TRUE(fs::exists(path + "/shard-00001-of-00002"));
  // Each rank wrote about half of the replicated bytes.
  const auto size0 = fs::file_size(path + "/shard-00000-of-00002");
  const auto size1 = fs::file_size(path + "/shard-00001-of-00002");
  EXPECT_LT(std::abs(static_cast<double>(size0) - static_cast<double>(size1)), 200.0);
  const auto back = ReadCheckpoint(path);
  ExpectSame(Sample(2.5f), back, "2 ranks");
  EXPECT_TRUE(torch::equal(back.at("rng/0"), torch::full({5}, 0, torch::kUInt8)));
  EXPECT_TRUE(torch::equal(back.at("rng/1"), torch::full({5}, 1, torch::kUInt8)));
  EXPECT_EQ(back.at("meta/world_size").item<int64_t>(), 2);
  // And three ranks write what one rank reads, and the other way round.
  SaveAsRanks(dir, 4, 3, 3.5f);
  ExpectSame(Sample(3.5f), ReadCheckpoint(dir + "/step_000000004"), "3 ranks");
}

TEST(Checkpoint, KeepsTheNewestAndThoseMarkedKeep) {
  const std::string dir = Fresh("keep");
  SaveCheckpoint(dir, 10, Sample(10), 2);
  std::ofstream(dir + "/step_000000010/KEEP") << "\n";
  for (int step : {20, 30, 40}) SaveCheckpoint(dir, step, Sample(static_cast<float>(step)), 2);
  EXPECT_EQ(CheckpointDir(dir).Steps(), (std::vector<int64_t>{40, 30, 10}));
}

TEST(Checkpoint, RefusesEachKindOfDamageByNameAndFallsBack) {
  struct Damage {
    const char* what;
    std::function<void(const std::string& step_dir)> apply;
    const char* expected;
  };
  const std::vector<Damage> damages = {
      {"flipped byte",
       [](const std::string& d) {
         std::vector<char> bytes = Bytes(d + "/shard-00001-of-00002");
         bytes[bytes.size() / 2] ^= 0x10;
         Put(d + "/shard-00001-of-00002", bytes);
       },
       "shard-00001-of-00002: checksum mismatch"},
      {"truncated shard",
       [](const std::string& d) {
         std::vector<char> bytes = Bytes(d + "/shard-00000-of-00002");
         bytes.resize(bytes.size() - 9);
         Put(d + "/shard-00000-of-00002", bytes);
       },
       "shard-00000-of-00002: truncated or padded"},
      {"missing shard", [](const std::string& d) { fs::remove(d + "/shard-00001-of-00002"); },
       "shard-00001-of-00002: missing shard"},
      {"no COMMITTED", [](const std::string& d) { fs::remove(d + "/COMMITTED"); },
       "COMMITTED: missing"},
      {"no manifest", [](const std::string& d) { fs::remove(d + "/manifest.json"); },
       "manifest.json: missing or unreadable"},
      {"garbled manifest",
       [](const std::string& d) { std::ofstream(d + "/manifest.json") << "{\"version\": 2,"; },
       "manifest.json: not valid JSON"},
  };
  for (const Damage& damage : damages) {
    const std::string dir = Fresh("damage");
    SaveAsRanks(dir, 1, 2, 1.0f);
    SaveAsRanks(dir, 2, 2, 2.0f);
    damage.apply(dir + "/step_000000002");
    const std::string error = ErrorOf(dir + "/step_000000002");
    EXPECT_NE(error.find(damage.expected), std::string::npos) << damage.what << ": " << error;
    std::vector<std::string> warnings;
    const auto loaded =
        CheckpointDir(dir).LoadLatestValid([&](const std::string& w) { warnings.push_back(w); });
    ASSERT_TRUE(loaded) << damage.what;
    EXPECT_EQ(loaded->path, dir + "/step_000000001") << damage.what;
    EXPECT_EQ(loaded->tensors.at("a")[0][0].item<float>(), 1.0f) << damage.what;
    ASSERT_EQ(warnings.size(), 1u) << damage.what;
    EXPECT_NE(warnings[0].find("step_000000002"), std::string::npos) << warnings[0];
  }
}

TEST(CheckpointDeathTest, CrashMidWriteLeavesThePreviousCheckpointLoadable) {
  GTEST_FLAG_SET(death_test_style, "fast");  // fork here: the child shares the paths
  const std::string dir = Fresh("crash");
  SaveCheckpoint(dir, 1, Sample(1.0f), 3);
  // A big second checkpoint, written in several chunks; the process dies half-way through.
  std::map<std::string, torch::Tensor> big = Sample(2.0f);
  big["big"] = torch::ones({3 << 20});
  EXPECT_EXIT(
      {
        CheckpointWriter writer(dir, 0, 1, 3, 60, [](std::size_t written, std::size_t total) {
          if (written >= total / 2) _exit(7);
        });
        writer.Save(2, big, {});
        writer.Wait();
      },
      ::testing::ExitedWithCode(7), "");
  EXPECT_TRUE(fs::exists(dir + "/step_000000002.tmp")) << "the crash left a partial folder";
  EXPECT_EQ(CheckpointDir(dir).Steps(), (std::vector<int64_t>{1})) << "and no step 2";
  const auto loaded = CheckpointDir(dir).LoadLatestValid(nullptr);
  ASSERT_TRUE(loaded);
  EXPECT_EQ(loaded->path, dir + "/step_000000001");
  EXPECT_EQ(loaded->tensors.at("a")[0][0].item<float>(), 1.0f);
  CheckpointDir(dir).RemoveTemporaries();
  EXPECT_FALSE(fs::exists(dir + "/step_000000002.tmp"));
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

  const auto a = ReadCheckpoint(full.checkpoint);
  const auto b = ReadCheckpoint(second.checkpoint);
  int compared = 0;
  for (const auto& [name, tensor] : a) {
    if (name.rfind("meta/", 0) == 0) continue;
    ASSERT_EQ(b.count(name), 1u) << name;
    EXPECT_TRUE(torch::equal(tensor, b.at(name))) << name << " differs after resume";
    ++compared;
  }
  EXPECT_GT(compared, 50);
}

TEST(Export, PythonTorchLoadReadsTheCppEmaWeights) {
  const std::string python = DDPM_REFERENCE_PYTHON;
  if (std::system((python + " -c 'import torch, numpy' > /dev/null 2>&1").c_str()) != 0) {
    GTEST_SKIP() << "the export check needs " << python
                 << " with torch and numpy (Debian: python3-torch); it cannot run here";
  }
  const std::string dir = Fresh("export");
  Config config = TinyRun(2);
  Trainer trainer(config, torch::kCPU);
  const torch::Tensor batch = torch::rand({8, 3, 16, 16}) * 2 - 1;
  trainer.Step(batch);
  trainer.Step(batch);
  std::map<std::string, torch::Tensor> state = trainer.State();
  state["meta/config"] =
      torch::from_blob(const_cast<char*>(config.ToYaml().data()),
                       {static_cast<int64_t>(config.ToYaml().size())}, torch::kUInt8)
          .clone();
  SaveCheckpoint(dir + "/checkpoints", trainer.step(), state, 3);
  ExportJob job;
  job.checkpoint = dir;
  job.out = dir + "/model.pt";
  RunExport(job);
  EXPECT_TRUE(fs::exists(dir + "/model.yaml"));
  // The C++ EMA weights, dumped raw.
  fs::create_directories(dir + "/raw");
  std::ofstream names(dir + "/raw/names.txt");
  int index = 0;
  for (const auto& item : trainer.ema_model()->named_parameters()) {
    const torch::Tensor values = item.value().detach().contiguous();
    names << item.key();
    for (int64_t d : values.sizes()) names << " " << d;
    names << "\n";
    std::FILE* out = std::fopen((dir + "/raw/" + std::to_string(index++) + ".bin").c_str(), "wb");
    ASSERT_NE(out, nullptr);
    std::fwrite(values.data_ptr<float>(), sizeof(float), values.numel(), out);
    std::fclose(out);
  }
  names.close();
  const std::string log = dir + "/python.log";
  const int rc = std::system((python + " " + DDPM_SOURCE_DIR + "/tests/reference/check_export.py " +
                              job.out + " " + dir + "/raw > " + log + " 2>&1")
                                 .c_str());
  std::ifstream text(log);
  const std::string output((std::istreambuf_iterator<char>(text)),
                           std::istreambuf_iterator<char>());
  EXPECT_EQ(rc, 0) << output;
  EXPECT_NE(output.find(std::to_string(index) + " tensors equal"), std::string::npos) << output;
}

TEST(Run, DivergenceStopsBeforeACheckpointCouldSaveIt) {
  // Steps never read their loss back; the run reads the device's sums at log steps and before
  // checkpoints. A learning rate of 1e30 makes the loss infinite within two steps: the read
  // before step 5's checkpoint must stop the run, name the steps, and leave no checkpoint.
  const std::string dir = TempPath("diverge");
  fs::remove_all(dir);
  Config config = TinyRun(20);
  config.train.lr = 1e30;
  config.train.checkpoint_every = 5;
  TrainOptions options;
  options.run_dir = dir;
  try {
    RunTraining(config, options);
    FAIL() << "a run whose loss is not finite must stop";
  } catch (const std::runtime_error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("training diverged"), std::string::npos) << what;
    EXPECT_NE(what.find("steps 1-5 on rank 0"), std::string::npos) << what;
  }
  int committed = 0;
  for (const auto& entry : fs::recursive_directory_iterator(dir)) {
    if (entry.path().filename() == "COMMITTED") ++committed;
  }
  EXPECT_EQ(committed, 0) << "a checkpoint of diverged weights was committed";
}

// The model's weights of a checkpoint directory.
std::map<std::string, torch::Tensor> ModelWeights(const std::string& checkpoint) {
  std::map<std::string, torch::Tensor> weights;
  for (const auto& [name, tensor] : ReadCheckpoint(checkpoint)) {
    if (name.rfind("model/", 0) == 0) weights[name] = tensor;
  }
  return weights;
}

bool SameTensors(const std::map<std::string, torch::Tensor>& a,
                 const std::map<std::string, torch::Tensor>& b) {
  if (a.size() != b.size() || a.empty()) return false;
  for (const auto& [name, tensor] : a) {
    if (b.count(name) == 0 || !torch::equal(tensor, b.at(name))) return false;
  }
  return true;
}

TEST(Run, APlacementsBatchPlanIsTrainedAsItIsAndCheckedAgainstTheConfig) {
  // A coordinator's placement may split the batch into more micro-batches than the config's
  // train.grad_accum; the run trains with the placement's plan and the config stays as it was.
  TrainOptions asked;
  asked.run_dir = TempPath("plan_asked");
  fs::remove_all(asked.run_dir);
  Config two = TinyRun(6);
  two.train.grad_accum = 2;
  const TrainResult by_config = RunTraining(two, asked);

  TrainOptions placed;
  placed.run_dir = TempPath("plan_placed");
  fs::remove_all(placed.run_dir);
  DistributedContext dist;
  dist.plan = BatchPlan{8, 1, 4, 2};
  const TrainResult by_placement = RunTraining(TinyRun(6), placed, dist);
  EXPECT_TRUE(
      SameTensors(ModelWeights(by_config.checkpoint), ModelWeights(by_placement.checkpoint)))
      << "2 micro-batches from the placement train as 2 from the config";
  EXPECT_EQ(LoadConfigFile(placed.run_dir + "/config.yaml").train.grad_accum, 1)
      << "the config is not rewritten";

  // The split matters: one micro-batch of 8 gives other weights.
  TrainOptions whole;
  whole.run_dir = TempPath("plan_whole");
  fs::remove_all(whole.run_dir);
  const TrainResult one = RunTraining(TinyRun(6), whole);
  EXPECT_FALSE(SameTensors(ModelWeights(one.checkpoint), ModelWeights(by_config.checkpoint)));

  // A plan that is not a split of the config's batch is refused before anything is written.
  TrainOptions wrong;
  wrong.run_dir = TempPath("plan_wrong");
  fs::remove_all(wrong.run_dir);
  dist.plan = BatchPlan{8, 1, 8, 2};
  try {
    RunTraining(TinyRun(6), wrong, dist);
    FAIL() << "16 images a step is not train.batch_size 8";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("the placement's split (1 rank x 2 micro-batches x 8 "
                                         "images = global batch 8)"),
              std::string::npos)
        << e.what();
  }
  EXPECT_FALSE(fs::exists(wrong.run_dir + "/checkpoints"));
  for (const std::string& dir : {asked.run_dir, placed.run_dir, whole.run_dir}) {
    fs::remove_all(dir);
  }
}

TEST(Run, EveryControlDecisionCrossesTheBroadcastWordIntact) {
  // Every combination of the flags, with no signal, SIGINT and SIGTERM: the word rank 0
  // broadcasts decodes to the same decision, and no two decisions share a word.
  std::set<int64_t> words;
  int decisions = 0;
  for (int bits = 0; bits < 32; ++bits) {
    for (const int signal : {0, SIGINT, SIGTERM}) {
      ControlDecision decision;
      decision.checkpoint = (bits & 1) != 0;
      decision.sample = (bits & 2) != 0;
      decision.stop = (bits & 4) != 0;
      decision.requested = (bits & 8) != 0;
      decision.abandon = (bits & 16) != 0;
      decision.signal = signal;
      const int64_t word = decision.Encode();
      const ControlDecision back = ControlDecision::Decode(word);
      EXPECT_EQ(back.checkpoint, decision.checkpoint) << word;
      EXPECT_EQ(back.sample, decision.sample) << word;
      EXPECT_EQ(back.stop, decision.stop) << word;
      EXPECT_EQ(back.requested, decision.requested) << word;
      EXPECT_EQ(back.abandon, decision.abandon) << word;
      EXPECT_EQ(back.signal, signal) << word;
      words.insert(word);
      ++decisions;
    }
  }
  EXPECT_EQ(words.size(), static_cast<size_t>(decisions));
}

TEST(Run, ProgressBarsAreForTerminalsOnlyAndNotUnderALauncher) {
  EXPECT_EQ(ParseProgressMode("lines", "--progress"), ProgressMode::kLines);
  EXPECT_EQ(ParseProgressMode("off", "--progress"), ProgressMode::kOff);
  try {
    ParseProgressMode("fancy", "--progress");
    FAIL() << "fancy is not a progress mode";
  } catch (const ConfigError& e) {
    EXPECT_NE(
        std::string(e.what()).find("--progress: 'fancy' is not one of: auto, bar, lines, off"),
        std::string::npos)
        << e.what();
  }
  // What is asked for is what is drawn.
  EXPECT_EQ(ResolveProgressMode(ProgressMode::kBar), ProgressMode::kBar);
  EXPECT_EQ(ResolveProgressMode(ProgressMode::kOff), ProgressMode::kOff);
  // Under mpirun (its ranks' stdout is a pseudo-terminal) auto means lines.
  const char* before = std::getenv("OMPI_COMM_WORLD_SIZE");
  const std::string saved = before != nullptr ? before : "";
  setenv("OMPI_COMM_WORLD_SIZE", "2", 1);
  EXPECT_EQ(ResolveProgressMode(ProgressMode::kAuto), ProgressMode::kLines);
  if (before != nullptr) {
    setenv("OMPI_COMM_WORLD_SIZE", saved.c_str(), 1);
  } else {
    unsetenv("OMPI_COMM_WORLD_SIZE");
  }
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
