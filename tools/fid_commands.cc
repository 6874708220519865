#include "tools/fid_commands.h"

#include <chrono>
#include <cstdio>
#include <optional>
#include <string>

#include "base/file_io.h"
#include "base/log.h"
#include "base/sha256.h"
#include "base/text.h"
#include "eval/evaluation.h"
#include "eval/feature_metrics.h"
#include "eval/fid.h"
#include "eval/inception.h"
#include "eval/report.h"
#include "tools/eval_flags.h"
#include "trainer/data.h"

namespace ddpm {
namespace {

void AddInceptionFlags(Flags& flags, const std::string& weights_help, const std::string& batch) {
  flags.Add("inception", weights_help, "");
  flags.Add("image-size", "folder images are centre-cropped and resized to this first", "32");
  flags.Add("batch", "images per Inception forward pass", batch);
  flags.Add("device", "cpu or cuda", "cpu");
}

InceptionInput InceptionInputFromFlags(const Flags& flags) {
  InceptionInput input;
  input.weights = InceptionWeightsFromFlags(flags);
  input.image_size = static_cast<int>(flags.GetInt("image-size"));
  input.batch = static_cast<int>(flags.GetInt("batch"));
  input.device = torch::Device(flags.Get("device"));
  return input;
}

constexpr char kWeightsHelp[] =
    "the FID Inception weights (pt_inception-2015-12-05, re-saved by PyTorch >= 1.6) or a "
    "TorchScript module of it (default: $DDPM_INCEPTION_WEIGHTS)";

}  // namespace

void AddFidStatsFlags(Flags& flags) {
  flags.Add("data", "the images: cifar10:PATH (the training split) or folder:PATH", "");
  flags.Add("out",
            "the .npz to write: mu and sigma (FID), and features, float32 [N, 2048] (KID, "
            "precision and recall)",
            "");
  AddInceptionFlags(flags, kWeightsHelp, "50");
}

void AddFidScoreFlags(Flags& flags) {
  flags.Add("samples", "the samples: folder:PATH (or cifar10:PATH)", "");
  flags.Add("ref", "reference statistics .npz (mu, sigma), ours or pytorch-fid's/TTUR's", "");
  flags.Add("metrics",
            "scores beside FID and IS, comma-separated: kid, prd (they need the reference's "
            "features, as `ddpm_fid stats` writes them)",
            "");
  flags.Add("seed", "the seed of KID's subsets and PRD's reference draw", "1");
  AddInceptionFlags(flags, kWeightsHelp, "50");
  flags.Add("is-logits",
            "the Inception Score's logits: unbiased (pool3 times the fc weights, the original "
            "TF code's, as the paper's 9.46) or biased (the fc's output)",
            "unbiased");
}

void AddMemorizationFlags(Flags& flags) {
  flags.Add("samples", "the samples: folder:PATH or npz:PATH", "");
  flags.Add("train",
            "the training images: cifar10:PATH (the training split), folder:PATH, npz:PATH, or "
            "run:RUN_DIR (the data set the run trained on, from its checkpoint)",
            "");
  flags.Add("out", "a directory for neighbours.csv, closest_pairs.png and summary.txt",
            "memorization");
  flags.Add("ratio", "the threshold on nearest / second-nearest distance", "0.3333333333333333");
  flags.Add("block", "training images per block of the search", "1000");
  AddInceptionFlags(flags,
                    "the FID Inception weights, for feature space (default: "
                    "$DDPM_INCEPTION_WEIGHTS; without them, pixel space only)",
                    "100");
}

FidStatsJob FidStatsJobFromFlags(const Flags& flags) {
  FidStatsJob job;
  job.data = flags.GetRequired("data");
  job.out = flags.GetRequired("out");
  job.input = InceptionInputFromFlags(flags);
  return job;
}

FidScoreJob FidScoreJobFromFlags(const Flags& flags) {
  FidScoreJob job;
  job.samples = flags.GetRequired("samples");
  job.ref = flags.GetRequired("ref");
  job.input = InceptionInputFromFlags(flags);
  const std::string is_logits = flags.Get("is-logits");
  if (is_logits != "unbiased" && is_logits != "biased") {
    throw FlagError(flags.program() + ": --is-logits '" + is_logits +
                    "' is not one of: unbiased, biased");
  }
  job.is_logits = is_logits == "unbiased" ? IsLogits::kUnbiased : IsLogits::kBiased;
  for (const std::string& metric : SplitList(flags.Get("metrics"))) {
    if (metric == "kid") {
      job.kid = true;
    } else if (metric == "prd") {
      job.prd = true;
    } else if (metric != "fid" && metric != "is") {
      throw FlagError(flags.program() + ": --metrics: '" + metric +
                      "' is not one of: fid, is, kid, prd");
    }
  }
  job.seed = static_cast<uint64_t>(flags.GetInt("seed"));
  return job;
}

MemorizationJob MemorizationJobFromFlags(const Flags& flags) {
  MemorizationJob job;
  job.samples = flags.GetRequired("samples");
  job.train = flags.GetRequired("train");
  job.out = flags.Get("out");
  job.input = InceptionInputFromFlags(flags);
  job.options.ratio = flags.GetDouble("ratio");
  job.options.block = flags.GetInt("block");
  job.options.batch_size = job.input.batch;
  return job;
}

int RunFidStats(const FidStatsJob& job) {
  const InceptionInput& in = job.input;
  FidInception model = LoadFidInception(in.weights, in.device);
  const std::string sha256 = Sha256File(in.weights);
  const auto data = OpenImageSet(job.data, in.image_size);
  InceptionStatistics measured =
      MeasureImageSet(*data, model, in.batch, in.device, "ddpm_fid stats", IsLogits::kUnbiased,
                      /*keep_features=*/true);
  WriteNpz(job.out, {{"mu", measured.features().Mean()},
                     {"sigma", measured.features().Covariance()},
                     {"features", measured.KeptFeatures().cpu()}});
  LogInfo(
      "ddpm_fid: wrote %s: mu, sigma and the features of %lld images of %s (Inception "
      "sha256 %s)",
      job.out.c_str(), static_cast<long long>(measured.features().count()),
      data->Describe().c_str(), sha256.c_str());
  return 0;
}

int RunFidScore(const FidScoreJob& job) {
  const InceptionInput& in = job.input;
  FidInception model = LoadFidInception(in.weights, in.device);
  const std::string sha256 = Sha256File(in.weights);
  const auto [mu, sigma] = ReadReferenceStats(job.ref);
  const bool features = job.kid || job.prd;
  // Before any image is read: a reference without features cannot give KID or PRD.
  const torch::Tensor reference_features =
      features ? ReadReferenceFeatures(job.ref, in.device) : torch::Tensor();
  const auto data = OpenImageSet(job.samples, in.image_size);
  InceptionStatistics measured =
      MeasureImageSet(*data, model, in.batch, in.device, "ddpm_fid score", job.is_logits, features);
  const FrechetResult fid =
      FrechetDistance(measured.features().Mean(), measured.features().Covariance(), mu, sigma);
  const auto [is_mean, is_std] = measured.scores().Score();
  std::printf(
      "FID %.4f\nIS %.4f +- %.4f (10 splits, %s logits)\nsamples %lld (%s)\nInception sha256 "
      "%s\nreference %s sha256 %s\n%s",
      fid.fid, is_mean, is_std, job.is_logits == IsLogits::kUnbiased ? "unbiased" : "biased",
      static_cast<long long>(measured.features().count()), data->Describe().c_str(), sha256.c_str(),
      job.ref.c_str(), Sha256File(job.ref).c_str(),
      fid.regularized ? "note: the covariances were regularized with eps * I\n" : "");
  if (features) {
    EvalReport report;
    report.num_samples = measured.features().count();
    SoloCommunicator solo;
    std::optional<PrdReference> prd_reference;
    ScoreFeatures(measured.KeptFeatures().to(in.device), reference_features, job.kid, job.prd,
                  job.seed, solo, &prd_reference, &report);
    std::fputs(DescribeKidAndPrd(report).c_str(), stdout);
  }
  std::fflush(stdout);
  return 0;
}

int RunMemorization(const MemorizationJob& job, Communicator& comm) {
  const InceptionInput& in = job.input;
  const bool lead = comm.rank() == 0;
  const auto samples = OpenImageSet(job.samples, in.image_size);
  const auto train = OpenTrainingSet(job.train, in.image_size);
  std::optional<FidInception> inception;
  if (!in.weights.empty()) inception = LoadFidInception(in.weights, in.device);
  if (lead) {
    MakeDirectories(job.out);
    LogInfo(
        "ddpm_fid memorization: %lld samples (%s) against %lld training images (%s) on %d "
        "rank(s)%s",
        static_cast<long long>(samples->size()), samples->Describe().c_str(),
        static_cast<long long>(train->size()), train->Describe().c_str(), comm.world_size(),
        inception ? "" : "; pixel space only (no --inception weights)");
  }
  const auto start = std::chrono::steady_clock::now();
  auto last = start;
  const std::vector<MemorizationSpace> spaces = MeasureMemorization(
      *samples, *train, inception, comm, in.device, job.options,
      [&](const std::string& what, int64_t done, int64_t share) {
        if (!lead || (SecondsSince(last) < 5.0 && done < share)) return;
        last = std::chrono::steady_clock::now();
        LogInfo(
            "ddpm_fid memorization: %s: rank 0 has searched %lld/%lld of its training "
            "images (%s)",
            what.c_str(), static_cast<long long>(done), static_cast<long long>(share),
            FormatDuration(SecondsSince(start)).c_str());
      });
  if (!lead) return 0;
  const std::string summary = DescribeMemorization(spaces, job.options.ratio);
  WriteMemorizationReport(spaces, *samples, *train, job.options.ratio, job.out);
  std::printf(
      "%sddpm_fid memorization: wrote %s/neighbours.csv, closest_pairs.png (the 16 samples "
      "nearest a training image in pixel space, each beside it) and summary.txt in %s\n",
      summary.c_str(), job.out.c_str(), FormatDuration(SecondsSince(start)).c_str());
  std::fflush(stdout);
  return 0;
}

}  // namespace ddpm
