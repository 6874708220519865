// Config loading: defaults, unknown keys, wrong types, allowed values, batch division, and
// environment overrides.
#include "config/config.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include "config/batch_plan.h"
#include "config/checkpoint_selection.h"
#include "config/eval_protocol.h"
#include "config/flags.h"
#include "test_env.h"

namespace ddpm {
namespace {

std::string ErrorOf(const std::string& yaml) {
  try {
    LoadConfigString(yaml, "test.yaml");
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "";
}

TEST(Config, DefaultsAreThePapersCifar10Setup) {
  const Config c = LoadConfigString("");
  EXPECT_EQ(c.model.ch, 128);
  EXPECT_EQ(c.model.ch_mult, (std::vector<int>{1, 2, 2, 2}));
  EXPECT_EQ(c.model.num_res_blocks, 2);
  EXPECT_EQ(c.model.attn_resolutions, (std::vector<int>{16}));
  EXPECT_DOUBLE_EQ(c.model.dropout, 0.1);
  EXPECT_EQ(c.diffusion.timesteps, 1000);
  EXPECT_DOUBLE_EQ(c.diffusion.beta_start, 1e-4);
  EXPECT_DOUBLE_EQ(c.diffusion.beta_end, 0.02);
  EXPECT_EQ(c.train.batch_size, 128);
  EXPECT_DOUBLE_EQ(c.train.lr, 2e-4);
  EXPECT_EQ(c.train.warmup_steps, 5000);
  EXPECT_DOUBLE_EQ(c.train.grad_clip, 1.0);
  EXPECT_DOUBLE_EQ(c.train.ema_decay, 0.9999);
  EXPECT_EQ(c.train.steps, 800000);
  EXPECT_EQ(c.sample.variance, VarianceKind::kFixedLarge);
}

TEST(Config, ReadsEveryKindOfField) {
  const Config c = LoadConfigString(R"(
model: {ch: 64, ch_mult: [1, 2], attn_resolutions: [], image_size: 16, norm_groups: 16}
diffusion: {schedule: cosine, objective: v, loss: l1, weighting: min_snr, min_snr_gamma: 3}
train: {seed: 7, device: cpu, lr: 1.5e-4}
data: {random_flip: false}
sample: {sampler: ddim, steps: 50, eta: 0.5}
)");
  EXPECT_EQ(c.model.ch, 64);
  EXPECT_EQ(c.model.ch_mult, (std::vector<int>{1, 2}));
  EXPECT_TRUE(c.model.attn_resolutions.empty());
  EXPECT_EQ(c.diffusion.schedule, ScheduleKind::kCosine);
  EXPECT_EQ(c.diffusion.objective, Objective::kV);
  EXPECT_EQ(c.diffusion.loss, LossKind::kL1);
  EXPECT_EQ(c.diffusion.weighting, LossWeighting::kMinSnr);
  EXPECT_DOUBLE_EQ(c.diffusion.min_snr_gamma, 3.0);
  EXPECT_EQ(c.train.seed, 7u);
  EXPECT_DOUBLE_EQ(c.train.lr, 1.5e-4);
  EXPECT_FALSE(c.data.random_flip);
  EXPECT_EQ(c.sample.sampler, SamplerKind::kDdim);
  EXPECT_EQ(c.sample.steps, 50);
}

TEST(Config, UnknownKeyIsAnErrorThatNamesItAndItsLine) {
  const std::string error = ErrorOf("model:\n  ch: 64\n  chh: 3\n");
  EXPECT_NE(error.find("unknown key 'model.chh'"), std::string::npos) << error;
  EXPECT_NE(error.find("test.yaml:3:"), std::string::npos) << error;
  EXPECT_NE(error.find("ch_mult"), std::string::npos) << "lists the valid keys: " << error;
}

TEST(Config, UnknownSectionIsAnError) {
  const std::string error = ErrorOf("modle:\n  ch: 64\n");
  EXPECT_NE(error.find("unknown section 'modle'"), std::string::npos) << error;
}

TEST(Config, AKeyThatIsAListOrMappingIsRefusedByItsLine) {
  // Found by fuzz_config: a flow-style list as a key threw yaml-cpp's own exception.
  std::string error = ErrorOf("train: {steps: 3,\n  [1, 2]: 4}\n");
  EXPECT_NE(error.find("a key must be a plain name"), std::string::npos) << error;
  EXPECT_NE(error.find("test.yaml:2:"), std::string::npos) << error;
  error = ErrorOf("? {model: 1}\n: 2\n");
  EXPECT_NE(error.find("a key must be a plain name"), std::string::npos) << error;
}

TEST(Config, WrongTypeNamesTheKeyAndWhatWasExpected) {
  std::string error = ErrorOf("train:\n  batch_size: lots\n");
  EXPECT_NE(error.find("train.batch_size"), std::string::npos) << error;
  EXPECT_NE(error.find("expected an integer"), std::string::npos) << error;
  EXPECT_NE(error.find("'lots'"), std::string::npos) << error;
  error = ErrorOf("model:\n  ch_mult: 2\n");
  EXPECT_NE(error.find("model.ch_mult: expected a list"), std::string::npos) << error;
  error = ErrorOf("data:\n  random_flip: maybe\n");
  EXPECT_NE(error.find("data.random_flip: expected true or false"), std::string::npos) << error;
  error = ErrorOf("train:\n  seed: -1\n");
  EXPECT_NE(error.find("train.seed: expected a non-negative integer"), std::string::npos) << error;
}

TEST(Config, EnumErrorListsTheAllowedValues) {
  const std::string error = ErrorOf("sample:\n  variance: huge\n");
  EXPECT_NE(error.find("sample.variance"), std::string::npos) << error;
  EXPECT_NE(error.find("'huge' is not one of: fixedlarge, fixedsmall"), std::string::npos) << error;
  const std::string sampler = ErrorOf("train:\n  timestep_sampler: importance\n");
  EXPECT_NE(sampler.find("train.timestep_sampler"), std::string::npos) << sampler;
  EXPECT_NE(sampler.find("'importance' is not one of: uniform, loss_second_moment"),
            std::string::npos)
      << sampler;
  EXPECT_EQ(
      LoadConfigString("train: {timestep_sampler: loss_second_moment}").train.timestep_sampler,
      TimestepSamplerKind::kLossSecondMoment);
}

TEST(Config, BatchThatDoesNotDivideIsRefusedWithTheReason) {
  const Config c = LoadConfigString("train: {batch_size: 128, grad_accum: 2}");
  EXPECT_EQ(PlanBatch(c, 8).micro_batch, 8);
  try {
    c.Validate(3);
    FAIL() << "128 does not split over 3 ranks x 2 micro-batches";
  } catch (const ConfigError& e) {
    const std::string error = e.what();
    EXPECT_NE(error.find("train.batch_size: 128 does not divide"), std::string::npos) << error;
    EXPECT_NE(error.find("world size 3"), std::string::npos) << error;
    EXPECT_NE(error.find("train.grad_accum 2"), std::string::npos) << error;
  }
  EXPECT_NE(ErrorOf("train: {batch_size: 10, grad_accum: 4}").find("does not divide"),
            std::string::npos);
}

TEST(BatchPlan, EachWorldGetsTheFewestMicroBatchesWithinTheLimit) {
  // 8 images over 2 ranks is 4 each; at most 2 per micro-batch: 2 micro-batches of 2.
  const Config limited = LoadConfigString("train: {batch_size: 8}\ndist: {max_rank_batch: 2}");
  EXPECT_TRUE(PlanBatch(limited, 2) == (BatchPlan{8, 2, 2, 2})) << PlanBatch(limited, 2).Describe();
  EXPECT_EQ(PlanBatch(limited, 2).Describe(),
            "2 ranks x 2 micro-batches x 2 images = global batch 8");
  // 12 on one rank within 5: 12 > 5, 6 > 5, then 3 micro-batches of 4.
  const Config twelve = LoadConfigString("train: {batch_size: 12}\ndist: {max_micro_batch: 5}");
  EXPECT_TRUE(PlanBatch(twelve, 1) == (BatchPlan{12, 1, 4, 3})) << PlanBatch(twelve, 1).Describe();
  // Without a limit the config's grad_accum is the split, as asked.
  const Config asked = LoadConfigString("train: {batch_size: 8, grad_accum: 2}");
  EXPECT_TRUE(PlanBatch(asked, 2) == (BatchPlan{8, 2, 2, 2})) << PlanBatch(asked, 2).Describe();
  EXPECT_EQ(PlanBatch(asked, 1).Describe(), "1 rank x 2 micro-batches x 4 images = global batch 8");
  // With a limit, never fewer micro-batches than asked.
  const Config both =
      LoadConfigString("train: {batch_size: 8, grad_accum: 4}\ndist: {max_micro_batch: 8}");
  EXPECT_TRUE(PlanBatch(both, 1) == (BatchPlan{8, 1, 2, 4})) << PlanBatch(both, 1).Describe();
}

TEST(Config, AnOldNameOfARenamedKeyIsReadAsTheNewOneAndBothAtOnceAreRefused) {
  // dist.max_rank_batch is dist.max_micro_batch now (BatchPlan's word for it).
  const Config old = LoadConfigString("dist: {max_rank_batch: 3}");
  EXPECT_EQ(old.dist.max_micro_batch, 3);
  EXPECT_NE(old.ToYaml().find("max_micro_batch: 3"), std::string::npos) << old.ToYaml();
  EXPECT_EQ(old.ToYaml().find("max_rank_batch"), std::string::npos) << old.ToYaml();
  EXPECT_NE(ErrorOf("dist: {max_rank_batch: 3, max_micro_batch: 4}")
                .find("dist.max_micro_batch is given twice"),
            std::string::npos);
  ASSERT_EQ(setenv("DDPM_DIST_MAX_RANK_BATCH", "6", 1), 0);
  const Config from_env = LoadConfigString("train: {batch_size: 12}", "<test>", true);
  unsetenv("DDPM_DIST_MAX_RANK_BATCH");
  EXPECT_EQ(from_env.dist.max_micro_batch, 6);
}

TEST(BatchPlan, RefusalsNameTheKey) {
  const Config pinned = LoadConfigString("train: {batch_size: 8}\ndist: {world_size: 4}");
  try {
    PlanBatch(pinned, 2);
    FAIL() << "dist.world_size 4 on 2 ranks";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("dist.world_size: asks for 4 ranks, but this run has 2"),
              std::string::npos)
        << e.what();
  }
  const Config eight = LoadConfigString("train: {batch_size: 8}");
  EXPECT_THROW(PlanBatch(eight, 0), ConfigError);
  // A placement's split is checked against the config before a worker trains with it.
  EXPECT_NO_THROW(CheckBatchPlan(eight, BatchPlan{8, 2, 2, 2}, 2));
  EXPECT_THROW(CheckBatchPlan(eight, BatchPlan{8, 2, 2, 1}, 2), ConfigError);
  EXPECT_THROW(CheckBatchPlan(eight, BatchPlan{8, 2, 2, 2}, 4), ConfigError);
  EXPECT_THROW(CheckBatchPlan(eight, BatchPlan{16, 2, 4, 2}, 2), ConfigError);
}

TEST(Config, CrossFieldChecksNameTheKey) {
  EXPECT_NE(ErrorOf("model: {attn_resolutions: [7]}").find("model.attn_resolutions: 7"),
            std::string::npos);
  EXPECT_NE(ErrorOf("model: {norm_groups: 24}").find("model.norm_groups"), std::string::npos);
  EXPECT_NE(ErrorOf("model: {image_size: 20}").find("model.image_size"), std::string::npos);
  EXPECT_NE(ErrorOf("diffusion: {beta_start: 0.1, beta_end: 0.01}").find("diffusion.beta_start"),
            std::string::npos);
  // Each bound names its own key: a beta_end outside (0, 1) is beta_end's fault.
  EXPECT_NE(ErrorOf("diffusion: {beta_end: 1.5}").find("diffusion.beta_end: the linear schedule"),
            std::string::npos);
  EXPECT_NE(ErrorOf("diffusion: {beta_start: 0}").find("diffusion.beta_start: the linear schedule"),
            std::string::npos);
  EXPECT_NE(ErrorOf("sample: {steps: 2000}").find("sample.steps"), std::string::npos);
  // Respacing onto an explicit list: strictly increasing within [0, T), and for ddpm only.
  EXPECT_NE(ErrorOf("sample: {timesteps: [0, 5, 5]}").find("sample.timesteps"), std::string::npos);
  EXPECT_NE(ErrorOf("sample: {timesteps: [0, 1000]}").find("sample.timesteps"), std::string::npos);
  EXPECT_NE(ErrorOf("sample: {sampler: ddim, timesteps: [0, 10]}").find("ddpm sampler only"),
            std::string::npos);
  EXPECT_NE(ErrorOf("train: {device: tpu}").find("train.device"), std::string::npos);
}

TEST(Config, EvalMetricsSelectAndPatienceAreCheckedBeforeAnythingRuns) {
  const std::string scored =
      "eval: {every: 10, inception_weights: w.pt, reference_stats: r.npz, nll_every: 10, ";
  EXPECT_EQ(ErrorOf("eval: {metrics: [fid, is, kid, fd_dinov2]}"),
            "config: eval.metrics: 'fd_dinov2' is not one of: fid, is, kid, prd");
  EXPECT_EQ(ErrorOf("eval: {metrics: [kid, prd, kid]}"),
            "config: eval.metrics: 'kid' is listed twice");
  EXPECT_EQ(ErrorOf("eval: {metrics: kid}"),
            "test.yaml:1:17: eval.metrics: expected a list of names, got 'kid'");
  EXPECT_EQ(ErrorOf(scored + "patience: 3}"),
            "config: eval.patience: waits for the best of a score, so it needs eval.select (fid, "
            "kid or nll)");
  EXPECT_EQ(ErrorOf(scored + "select: kid}"),
            "config: eval.select: kid needs kid in eval.metrics, which is [\"fid\", \"is\"]");
  EXPECT_EQ(ErrorOf("eval: {select: fid}"),
            "config: eval.select: fid is measured every eval.every steps, which is 0 (never)");
  EXPECT_EQ(ErrorOf("eval: {select: nll}"),
            "config: eval.select: nll is measured every eval.nll_every steps, which is 0 (never)");
  EXPECT_EQ(ErrorOf("eval: {select: lpips}"),
            "test.yaml:1:16: eval.select: 'lpips' is not one of: none, fid, kid, nll");
  EXPECT_EQ(ErrorOf(scored + "select: fid, patience: -1}"),
            "config: eval.patience: must be >= 0 (0: never stop early), got -1");
  const Config c = LoadConfigString(scored + "metrics: [kid, prd], select: kid, patience: 2}");
  EXPECT_TRUE(c.eval.Computes("kid") && c.eval.Computes("prd") && c.eval.Computes("fid"));
  EXPECT_EQ(c.eval.select, EvalSelect::kKid);
  EXPECT_EQ(c.eval.patience, 2);
  const Config back = LoadConfigString(c.ToYaml());
  EXPECT_EQ(back.eval.metrics, c.eval.metrics);
  EXPECT_FALSE(LoadConfigString("").eval.Computes("kid"));
}

TEST(Config, YamlSyntaxErrorNamesTheLine) {
  const std::string error = ErrorOf("model:\n  ch: [1, 2\n");
  EXPECT_NE(error.find("test.yaml:"), std::string::npos) << error;
  EXPECT_NE(error.find("YAML syntax error"), std::string::npos) << error;
}

TEST(Config, ToYamlRoundTrips) {
  const Config c = LoadConfigString(
      "model: {ch: 64, ch_mult: [1, 2], image_size: 16, attn_resolutions: [8]}\n"
      "train: {lr: 0.000123456789, seed: 42}\nsample: {sampler: ddim}\n");
  const Config back = LoadConfigString(c.ToYaml());
  EXPECT_EQ(back.ToYaml(), c.ToYaml());
  EXPECT_DOUBLE_EQ(back.train.lr, 0.000123456789);
  EXPECT_EQ(back.model.ch_mult, (std::vector<int>{1, 2}));
  EXPECT_NE(c.ToTable().find("train.lr"), std::string::npos);
}

TEST(Config, EnvironmentOverridesAKey) {
  setenv("DDPM_TRAIN_STEPS", "123", 1);
  setenv("DDPM_MODEL_CH_MULT", "[1, 2]", 1);
  setenv("DDPM_MODEL_IMAGE_SIZE", "16", 1);
  const Config c = LoadConfigString("train: {steps: 5}", "test.yaml", /*apply_env=*/true);
  unsetenv("DDPM_TRAIN_STEPS");
  unsetenv("DDPM_MODEL_CH_MULT");
  unsetenv("DDPM_MODEL_IMAGE_SIZE");
  EXPECT_EQ(c.train.steps, 123);
  EXPECT_EQ(c.model.ch_mult, (std::vector<int>{1, 2}));
}

TEST(Config, UnknownEnvironmentKeyIsAnError) {
  setenv("DDPM_TRAIN_STEPZ", "1", 1);
  try {
    LoadConfigString("", "test.yaml", /*apply_env=*/true);
    unsetenv("DDPM_TRAIN_STEPZ");
    FAIL() << "a misspelt override must not be ignored";
  } catch (const ConfigError& e) {
    unsetenv("DDPM_TRAIN_STEPZ");
    EXPECT_NE(std::string(e.what()).find("DDPM_TRAIN_STEPZ"), std::string::npos) << e.what();
  }
}

TEST(Config, BadEnvironmentValueNamesTheVariable) {
  setenv("DDPM_TRAIN_LR", "fast", 1);
  std::string error;
  try {
    LoadConfigString("", "test.yaml", /*apply_env=*/true);
  } catch (const ConfigError& e) {
    error = e.what();
  }
  unsetenv("DDPM_TRAIN_LR");
  EXPECT_NE(error.find("environment DDPM_TRAIN_LR"), std::string::npos) << error;
  EXPECT_NE(error.find("train.lr: expected a number"), std::string::npos) << error;
}

TEST(Config, SetConfigKeyUsesTheSameChecks) {
  Config c = LoadConfigString("");
  SetConfigKey(c, "sample.sampler", "ddim", "flags");
  EXPECT_EQ(c.sample.sampler, SamplerKind::kDdim);
  EXPECT_THROW(SetConfigKey(c, "sample.sampler", "euler", "flags"), ConfigError);
  EXPECT_THROW(SetConfigKey(c, "sample.nope", "1", "flags"), ConfigError);
  EXPECT_THROW(SetConfigKey(c, "nodot", "1", "flags"), ConfigError);
}

TEST(Config, MissingFileNamesThePath) {
  try {
    LoadConfigFile("/nonexistent/run.yaml");
    FAIL();
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("/nonexistent/run.yaml"), std::string::npos);
  }
}

TEST(Flags, ParsesValuesSwitchesAndRefusesUnknowns) {
  Flags flags("prog", "test");
  flags.Add("config", "config path", "");
  flags.Add("steps", "steps", "5");
  flags.AddSwitch("print-params", "print");
  const char* argv[] = {"prog", "--config=a.yaml", "--steps", "12", "--print-params"};
  flags.Parse(5, argv);
  EXPECT_EQ(flags.Get("config"), "a.yaml");
  EXPECT_EQ(flags.GetInt("steps"), 12);
  EXPECT_TRUE(flags.GetSwitch("print-params"));
  Flags bad("prog", "test");
  bad.Add("steps", "steps", "5");
  const char* unknown[] = {"prog", "--step", "3"};
  EXPECT_THROW(bad.Parse(3, unknown), FlagError);
  const char* missing[] = {"prog", "--steps"};
  EXPECT_THROW(bad.Parse(2, missing), FlagError);
  const char* not_int[] = {"prog", "--steps=many"};
  bad.Parse(2, not_int);
  EXPECT_THROW(bad.GetInt("steps"), FlagError);
  Flags numbers("prog", "test");
  numbers.Add("peak", "peak", "0");
  const char* number[] = {"prog", "--peak", "790.5"};
  numbers.Parse(3, number);
  EXPECT_DOUBLE_EQ(numbers.GetDouble("peak"), 790.5);
  EXPECT_THROW(numbers.GetInt("peak"), FlagError) << "an integer flag takes the whole value";
  const char* trailing[] = {"prog", "--peak=790x"};
  numbers.Parse(2, trailing);
  try {
    numbers.GetDouble("peak");
    FAIL() << "790x is not a number";
  } catch (const FlagError& e) {
    EXPECT_NE(std::string(e.what()).find("--peak expects a number, got '790x'"), std::string::npos)
        << e.what();
  }
}

TEST(Flags, PositionalArgumentsFillInOrderAndAreRequired) {
  Flags flags("ddpmctl start", "test");
  flags.AddPositional("CONFIG", "the config");
  flags.Add("name", "a name", "");
  const char* argv[] = {"ddpmctl start", "--name", "x", "run.yaml"};
  flags.Parse(4, argv);
  EXPECT_EQ(flags.Get("CONFIG"), "run.yaml");
  EXPECT_EQ(flags.Get("name"), "x");
  EXPECT_TRUE(flags.Given("CONFIG"));
  // What ddpmctl asks to find its command among the global flags.
  EXPECT_TRUE(flags.TakesValue("name"));
  EXPECT_FALSE(flags.TakesValue("help")) << "a switch";
  EXPECT_FALSE(flags.TakesValue("CONFIG")) << "a positional";
  EXPECT_FALSE(flags.TakesValue("nope")) << "undeclared";
  Flags missing("ddpmctl start", "test");
  missing.AddPositional("CONFIG", "the config");
  const char* none[] = {"ddpmctl start"};
  try {
    missing.Parse(1, none);
    FAIL() << "CONFIG is required";
  } catch (const FlagError& e) {
    EXPECT_NE(std::string(e.what()).find("missing CONFIG"), std::string::npos) << e.what();
  }
  EXPECT_EQ(flags.GetRequired("name"), "x");
  try {
    missing.GetRequired("CONFIG");
    FAIL() << "an empty value is not there";
  } catch (const FlagError& e) {
    EXPECT_STREQ(e.what(), "ddpmctl start: --CONFIG is required");
  }
  // --help needs no positional, and a positional is not a flag.
  Flags help("ddpmctl start", "test");
  help.AddPositional("CONFIG", "the config");
  const char* asks[] = {"ddpmctl start", "--help"};
  EXPECT_NO_THROW(help.Parse(2, asks));
  EXPECT_NE(help.Usage().find("usage: ddpmctl start [flags] CONFIG"), std::string::npos)
      << help.Usage();
  Flags extra("ddpmctl get", "test");
  extra.AddPositional("RUN", "the run");
  const char* two[] = {"ddpmctl get", "a", "b"};
  EXPECT_THROW(extra.Parse(3, two), FlagError);
  const char* as_flag[] = {"ddpmctl get", "--RUN=a"};
  EXPECT_THROW(extra.Parse(2, as_flag), FlagError);
}

TEST(Config, EveryShippedConfigLoadsAndValidates) {
  int checked = 0;
  for (const auto& entry : std::filesystem::directory_iterator(DDPM_SOURCE_DIR "/configs")) {
    if (entry.path().extension() != ".yaml") continue;
    SCOPED_TRACE(entry.path().string());
    const Config config = LoadConfigFile(entry.path().string());
    EXPECT_NO_THROW(config.Validate(1));
    ++checked;
  }
  EXPECT_EQ(checked, 4) << "a config was added or removed: update this count";
}

TEST(EvalProtocol, TheShippedProtocolsSayWhatTheReadmeSaysAndBadFilesAreNamed) {
  const auto paper = LoadEvalProtocol(DDPM_SOURCE_DIR "/configs/eval/paper.yaml");
  const std::vector<std::pair<std::string, std::string>> expected_paper = {
      {"eval.num_samples", "50000"},  {"eval.sampler", "ddpm"}, {"eval.steps", "0"},
      {"eval.is_logits", "unbiased"}, {"eval.seed", "1"},       {"eval.batch_size", "250"}};
  EXPECT_EQ(paper, expected_paper);
  Config config;
  for (const auto& [key, value] : paper) SetConfigKey(config, key, value, "paper.yaml");
  // The paper's sampler: ancestral over all T = 1000 steps.
  SampleConfig sample;
  sample.sampler = config.eval.sampler;
  sample.steps = config.eval.steps;
  EXPECT_EQ(sample.ResolvedSteps(config.diffusion.timesteps), 1000);
  const auto quick = LoadEvalProtocol(DDPM_SOURCE_DIR "/configs/eval/quick.yaml");
  EXPECT_EQ(quick[0], (std::pair<std::string, std::string>{"eval.num_samples", "5000"}));
  EXPECT_EQ(quick[1], (std::pair<std::string, std::string>{"eval.sampler", "heun"}));
  EXPECT_EQ(quick[2], (std::pair<std::string, std::string>{"eval.steps", "18"}));

  const std::string dir = ::testing::TempDir();
  const std::pair<const char*, const char*> bad[] = {
      {"eval: {reference_stats: /x.npz}", "eval.reference_stats: a protocol sets num_samples"},
      {"train: {steps: 5}", "'train': a protocol sets only eval"},
      {"eval: {sampler: euler}", "eval.sampler"},
      {"eval: {num_samples: 5}", "eval.num_samples"},
      {"eval: [1, 2", "not YAML"}};
  for (const auto& [text, expected] : bad) {
    const std::string path = dir + "/protocol.yaml";
    std::ofstream(path) << text << "\n";
    try {
      LoadEvalProtocol(path);
      ADD_FAILURE() << "loaded " << text;
    } catch (const ConfigError& error) {
      EXPECT_NE(std::string(error.what()).find(path), std::string::npos) << error.what();
      EXPECT_NE(std::string(error.what()).find(expected), std::string::npos)
          << error.what() << " (expected " << expected << ")";
    }
  }
  EXPECT_THROW(LoadEvalProtocol(dir + "/missing.yaml"), ConfigError);
}

TEST(CheckpointSelection, ChoosesLatestAllEveryKOrAStepAndNamesWhatIsNotThere) {
  const std::vector<int64_t> steps = {30, 10, 20, 40};
  EXPECT_EQ(CheckpointSelection::Parse("").Select(steps, "run r"), (std::vector<int64_t>{40}));
  EXPECT_EQ(CheckpointSelection::Parse("latest").Select(steps, "run r"),
            (std::vector<int64_t>{40}));
  EXPECT_EQ(CheckpointSelection::Parse("all").Select(steps, "run r"),
            (std::vector<int64_t>{10, 20, 30, 40}));
  EXPECT_EQ(CheckpointSelection::Parse("every:20").Select(steps, "run r"),
            (std::vector<int64_t>{20, 40}));
  EXPECT_EQ(CheckpointSelection::Parse("30").Select(steps, "run r"), (std::vector<int64_t>{30}));
  for (const char* text : {"every:20", "30", "all", "latest"}) {
    EXPECT_EQ(CheckpointSelection::Parse(text).ToString(), text);
  }
  for (const char* bad : {"every:0", "every:", "every:-5", "-3", "0", "1e3", "newest", "3 "}) {
    try {
      CheckpointSelection::Parse(bad);
      ADD_FAILURE() << "parsed '" << bad << "'";
    } catch (const ConfigError& error) {
      EXPECT_NE(std::string(error.what()).find(std::string("checkpoints '") + bad + "'"),
                std::string::npos)
          << error.what();
    }
  }
  try {
    CheckpointSelection::Parse("every:7").Select(steps, "run r");
    FAIL() << "chose nothing without saying so";
  } catch (const ConfigError& error) {
    EXPECT_NE(std::string(error.what())
                  .find("checkpoints every:7 of run r: no such checkpoint (it has 10, 20, 30, 40)"),
              std::string::npos)
        << error.what();
  }
  EXPECT_THROW(CheckpointSelection::Parse("latest").Select({}, "run r"), ConfigError);
}

}  // namespace
}  // namespace ddpm
