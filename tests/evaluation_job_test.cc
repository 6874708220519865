// An evaluation job on one process (run/evaluation_job.h), its sweep files and the samples it
// resumes from: a job stopped part-way and run again ends with exactly the results of a job
// that ran straight through; sweep.csv reads back every number exactly; the checkpoint choice
// and the failures name their culprit. Inception weights are random, in the standard file's
// layout (tests/reference/fid_ref.py); FID is checked against ddpm_fid's path elsewhere
// (e2e.eval_job_in_the_service).
#include "run/evaluation_job.h"

#include <gtest/gtest.h>
#include <torch/torch.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include "base/errors.h"
#include "eval/checkpoint_sweep.h"
#include "eval/plot.h"
#include "run/sampling.h"
#include "test_env.h"
#include "trainer/image_io.h"

namespace ddpm {
namespace {

namespace fs = std::filesystem;

fs::path TestDir(const std::string& what) {
  const fs::path dir =
      fs::temp_directory_path() / ("ddpm-evaljob-" + std::to_string(getpid()) + "-" + what + "-" +
                                   ::testing::UnitTest::GetInstance()->current_test_info()->name());
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

EvalReport Report(int64_t step, double fid) {
  EvalReport r;
  r.step = step;
  r.fid = fid;
  r.inception_score = 1 + 1.0 / 3;
  r.inception_score_std = 0.1 / 7;
  r.is_logits = "unbiased";
  r.num_samples = 50000;
  r.sampler = "heun";
  r.sampling_steps = 18;
  r.seed = 18446744073709551557ull;
  r.regularized = step == 20;
  r.seconds = 12.5;
  r.inception_sha256 = std::string(64, 'a');
  r.reference_sha256 = std::string(64, 'b');
  return r;
}

TEST(Sweep, CsvReadsBackEveryNumberExactlyAndNamesABadLine) {
  const fs::path dir = TestDir("csv");
  const std::string path = (dir / "sweep.csv").string();
  EXPECT_TRUE(ReadSweepCsv(path).empty());
  std::vector<EvalReport> written = {Report(10, 3.0 / 7), Report(20, 1e-17 + 2.0 / 3)};
  // The second measured KID (below 0, as an unbiased estimate may be) and PRD; the first not.
  EvalReport& scored = written[1];
  scored.has_kid = true;
  scored.kid = -1.0 / 3e5;
  scored.kid_std = 1.0 / 7e4;
  scored.kid_subsets = 100;
  scored.kid_subset_size = 1000;
  scored.has_prd = true;
  scored.precision = 2.0 / 3;
  scored.recall = 0.1;
  scored.density = 1.0 / 0.9;
  scored.coverage = 0.7;
  scored.prd_reference_count = 10000;
  WriteSweepCsv(written, path);
  EXPECT_FALSE(fs::exists(path + ".tmp"));
  const std::vector<EvalReport> read = ReadSweepCsv(path);
  ASSERT_EQ(read.size(), 2u);
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_EQ(read[i].step, written[i].step);
    EXPECT_EQ(read[i].fid, written[i].fid);  // bit for bit: %.17g
    EXPECT_EQ(read[i].inception_score, written[i].inception_score);
    EXPECT_EQ(read[i].inception_score_std, written[i].inception_score_std);
    EXPECT_EQ(read[i].seed, written[i].seed);
    EXPECT_EQ(read[i].regularized, written[i].regularized);
    EXPECT_EQ(read[i].sampler, "heun");
    EXPECT_EQ(read[i].sampling_steps, 18);
    EXPECT_EQ(read[i].inception_sha256, written[i].inception_sha256);
    EXPECT_EQ(read[i].has_kid, written[i].has_kid);
    EXPECT_EQ(read[i].kid, written[i].kid);
    EXPECT_EQ(read[i].kid_std, written[i].kid_std);
    EXPECT_EQ(read[i].kid_subsets, written[i].kid_subsets);
    EXPECT_EQ(read[i].kid_subset_size, written[i].kid_subset_size);
    EXPECT_EQ(read[i].has_prd, written[i].has_prd);
    EXPECT_EQ(read[i].precision, written[i].precision);
    EXPECT_EQ(read[i].recall, written[i].recall);
    EXPECT_EQ(read[i].density, written[i].density);
    EXPECT_EQ(read[i].coverage, written[i].coverage);
    EXPECT_EQ(read[i].prd_reference_count, written[i].prd_reference_count);
  }
  std::ofstream(path, std::ios::app)
      << "30,not-a-number,1,0,unbiased,5,ddpm,1000,1,0,1,x,y,,,,,,,,,\n";
  try {
    ReadSweepCsv(path);
    FAIL() << "read a malformed row";
  } catch (const FormatError& error) {
    EXPECT_NE(std::string(error.what()).find(path + ": line 4 does not read"), std::string::npos)
        << error.what();
  }
  std::ofstream(path) << "step,fid\n";
  EXPECT_THROW(ReadSweepCsv(path), FormatError);
  // A sweep.csv from before KID (13 columns) reads on, without KID or PRD.
  std::ofstream(path) << "step,fid,inception_score,inception_score_std,is_logits,num_samples,"
                         "sampler,sampling_steps,seed,regularized,seconds,inception_sha256,"
                         "reference_sha256\n10,3.5,1.25,0.5,unbiased,5,ddpm,1000,1,0,1,x,y\n";
  const std::vector<EvalReport> older = ReadSweepCsv(path);
  ASSERT_EQ(older.size(), 1u);
  EXPECT_EQ(older[0].fid, 3.5);
  EXPECT_FALSE(older[0].has_kid);
  EXPECT_FALSE(older[0].has_prd);
}

TEST(Sweep, PlotDrawsBothPanelsWithTickLabelsThatTellTicksApart) {
  const fs::path dir = TestDir("plot");
  const std::string path = (dir / "sweep.png").string();
  WriteSweepPlot({Report(10, 92798.87), Report(20, 92800.32), Report(30, 92797.43)}, path);
  const Image image = ReadImageFile(path);
  EXPECT_EQ(image.width, 720);
  EXPECT_EQ(image.height, 584);
  int blue = 0, orange = 0;
  for (size_t p = 0; p + 2 < image.pixels.size(); p += 3) {
    blue += image.pixels[p] == 31 && image.pixels[p + 1] == 119 && image.pixels[p + 2] == 180;
    orange += image.pixels[p] == 255 && image.pixels[p + 1] == 127 && image.pixels[p + 2] == 14;
  }
  EXPECT_GT(blue, 100);
  EXPECT_GT(orange, 100);
  // Five ticks over a range of 2.9: neighbours must not print alike (they did as "9.28e+04").
  const double low = 92797.3, spacing = 0.75;
  for (int i = 0; i < 4; ++i) {
    EXPECT_NE(TickLabel(low + i * spacing, spacing), TickLabel(low + (i + 1) * spacing, spacing));
  }
  EXPECT_EQ(TickLabel(1.0025, 0.0005), "1.0025");
  EXPECT_EQ(TickLabel(3e9, 1e9), "3.000e+09");
}

TEST(SampleFiles, ReadBackAreTheQuantizedValuesThatWereWritten) {
  const fs::path dir = TestDir("files");
  torch::manual_seed(3);
  const torch::Tensor images = torch::rand({3, 3, 8, 8}) * 2.2 - 1.1;
  // What RunEvaluator measures: 8-bit quantization in float32.
  const torch::Tensor quantized = ((images.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1;
  WriteSampleFiles(quantized, dir.string(), {5, 6, 7});
  const torch::Tensor read = ReadSampleFiles(dir.string(), 5, 3, 3, 8);
  ASSERT_TRUE(read.defined());
  EXPECT_TRUE(torch::equal(read, quantized));
  EXPECT_FALSE(ReadSampleFiles(dir.string(), 4, 3, 3, 8).defined());  // 000004.png is missing
  EXPECT_FALSE(ReadSampleFiles(dir.string(), 5, 3, 1, 8).defined());  // not of that shape
}

class EvaluationJobTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string python = DDPM_REFERENCE_PYTHON;
    if (std::system((python + " -c 'import torch, torchvision' > /dev/null 2>&1").c_str()) != 0) {
      GTEST_SKIP() << "the job's Inception weights are written by " << python
                   << " with torch and torchvision (Debian: python3-torchvision)";
    }
    dir_ = TestDir("job");
    const std::string script = std::string(DDPM_SOURCE_DIR) + "/tests/reference/fid_ref.py";
    const std::string log = " > " + (dir_ / "python.log").string() + " 2>&1";
    ASSERT_EQ(std::system((python + " " + script + " network " + dir_.string() + log).c_str()), 0);
    ASSERT_EQ(
        std::system((python + " " + script + " gaussian-stats " + (dir_ / "ref.npz").string() + log)
                        .c_str()),
        0);
    config_ = LoadConfigString(R"(
model: {ch: 16, ch_mult: [1, 2], num_res_blocks: 1, attn_resolutions: [8], image_size: 16,
        norm_groups: 8, dropout: 0.1}
diffusion: {timesteps: 100}
train: {steps: 4, batch_size: 8, lr: 0.001, warmup_steps: 1, threads: 1, log_every: 2,
        checkpoint_every: 2, device: cpu}
data: {shapes_size: 32}
sample: {sampler: ddim, steps: 3, num_images: 4}
eval: {num_samples: 10, batch_size: 5, sampler: ddim, steps: 3}
)");
    config_.eval.inception_weights = (dir_ / "inception.pt").string();
    config_.eval.reference_stats = (dir_ / "ref.npz").string();
    TrainOptions train;
    train.run_dir = (dir_ / "trained").string();
    train.progress = ProgressMode::kOff;
    RunTraining(config_, train);
  }
  void TearDown() override {
    if (!dir_.empty()) fs::remove_all(dir_);
  }
  EvaluationJobOptions Job(const std::string& name, const std::string& checkpoints) const {
    EvaluationJobOptions job;
    job.job_dir = (dir_ / name).string();
    job.source_run = "trained";
    job.source_run_dir = (dir_ / "trained").string();
    job.checkpoints = checkpoints;
    job.progress = ProgressMode::kOff;
    return job;
  }
  fs::path dir_;
  Config config_;
};

TEST_F(EvaluationJobTest, AStoppedJobRunAgainEndsWithTheResultsOfAJobThatRanStraight) {
  const EvaluationJobResult straight = RunEvaluationJob(config_, Job("straight", "all"), {});
  ASSERT_EQ(straight.planned, (std::vector<int64_t>{2, 4}));
  ASSERT_EQ(straight.reports.size(), 2u);
  EXPECT_EQ(straight.reports[0].num_samples, 10);

  // Stopped after the first checkpoint and one batch of the second.
  EvaluationJobOptions job = Job("resumed", "all");
  int batches = 0;
  job.poll_stop = [&] { return ++batches > 2 + 1; };
  std::vector<int64_t> reported;
  job.on_result = [&](const EvalReport& report) { reported.push_back(report.step); };
  const EvaluationJobResult first = RunEvaluationJob(config_, job, {});
  EXPECT_TRUE(first.stopped);
  EXPECT_EQ(reported, (std::vector<int64_t>{2}));
  ASSERT_EQ(ReadSweepCsv(job.job_dir + "/sweep.csv").size(), 1u);
  const fs::path saved = fs::path(job.job_dir) / "step_000000004";
  EXPECT_TRUE(fs::exists(saved / "000000.png") && fs::exists(saved / "000004.png"));
  EXPECT_FALSE(fs::exists(saved / "000005.png"));
  EXPECT_FALSE(fs::exists(fs::path(job.job_dir) / "step_000000002"));  // recorded: removed

  // Run again: only step 4 is evaluated, from the saved samples and the rest.
  job.poll_stop = nullptr;
  reported.clear();
  const EvaluationJobResult second = RunEvaluationJob(config_, job, {});
  EXPECT_FALSE(second.stopped);
  EXPECT_EQ(reported, (std::vector<int64_t>{4}));
  ASSERT_EQ(second.reports.size(), 2u);
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_EQ(second.reports[i].step, straight.reports[i].step);
    EXPECT_EQ(second.reports[i].fid, straight.reports[i].fid)
        << "step " << straight.reports[i].step;
    EXPECT_EQ(second.reports[i].inception_score, straight.reports[i].inception_score);
  }
  EXPECT_FALSE(fs::exists(saved));
  EXPECT_TRUE(fs::exists(fs::path(job.job_dir) / "sweep.png"));
}

TEST_F(EvaluationJobTest, TheChoiceIsKeptAndFailuresNameTheCheckpoint) {
  // The plan is chosen once: a later run of the job keeps it even with other text.
  EvaluationJobOptions job = Job("latest", "latest");
  EXPECT_EQ(RunEvaluationJob(config_, job, {}).planned, (std::vector<int64_t>{4}));
  job.checkpoints = "all";
  EXPECT_EQ(RunEvaluationJob(config_, job, {}).planned, (std::vector<int64_t>{4}));

  try {
    RunEvaluationJob(config_, Job("missing", "3"), {});
    FAIL() << "evaluated a checkpoint that does not exist";
  } catch (const std::exception& error) {
    EXPECT_NE(std::string(error.what()).find("checkpoints 3 of run trained"), std::string::npos)
        << error.what();
    EXPECT_NE(std::string(error.what()).find("(it has 2, 4)"), std::string::npos) << error.what();
  }
  // A planned checkpoint removed since (train.keep_checkpoints): named, with the reason.
  EvaluationJobOptions pruned = Job("pruned", "every:2");
  fs::create_directories(pruned.job_dir);
  std::ofstream(pruned.job_dir + "/plan.txt") << "2\n4\n";
  fs::remove_all(dir_ / "trained" / "checkpoints" / "step_000000002");
  try {
    RunEvaluationJob(config_, pruned, {});
    FAIL() << "evaluated a checkpoint that was removed";
  } catch (const std::exception& error) {
    EXPECT_NE(
        std::string(error.what()).find("checkpoint step 2 of run trained is no longer on disk"),
        std::string::npos)
        << error.what();
  }
}

}  // namespace
}  // namespace ddpm
